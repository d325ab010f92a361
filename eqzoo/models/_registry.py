"""Named presets and one call to build a model from a preset name or a config."""

import dataclasses
from typing import Any

import equinox as eqx
import jax

from .._errors import ConfigError
from .._typing import PRNGKey
from ..nn import RopeScaling
from ._build import compiled_build
from ._cnn import CNN, CNNConfig
from ._dit import DiT, DiTConfig
from ._gemma import Gemma, GemmaConfig
from ._gpt2 import GPT2, GPT2Config
from ._llama import Llama, LlamaConfig
from ._mixtral import Mixtral, MixtralConfig
from ._mlp import MLP, MLPConfig
from ._unet import UNet, UNetConfig
from ._vit import ViT, ViTConfig

ModelConfig = GPT2Config | LlamaConfig | MixtralConfig | GemmaConfig | MLPConfig | CNNConfig | ViTConfig | DiTConfig | UNetConfig
"""Any of eqzoo's model configs: what [`eqzoo.models.get_config`][] returns and
[`eqzoo.models.create`][] builds a model from."""

_FAMILIES: dict[type, type] = {
    GPT2Config: GPT2, LlamaConfig: Llama, MixtralConfig: Mixtral, GemmaConfig: Gemma, MLPConfig: MLP, CNNConfig: CNN, ViTConfig: ViT,
    DiTConfig: DiT, UNetConfig: UNet,
}
_STATEFUL = (CNNConfig,)

# Remat per preset: the policy recomputing least whose estimated peak memory for one training
# step (bf16 compute, fp32 AdamW state, fused loss, flash attention) stays under 60 GiB, 75% of
# an 80 GB H100, at batch 16 x 1024 (GPT-2) or 8 x 2048 (Llama). Estimated on CPU with
# benchmarks/memory_estimate.py (table in docs/performance.md). No remat, estimated:
# gpt2-124m 24 GiB, gpt2-350m 63, gpt2-774m 119, gpt2-1.5b 203, llama-1b 93.
_PRESETS: dict[str, Any] = {
    "tiny-gpt2": GPT2Config(vocab_size=256, max_seq=128, num_layers=2, num_heads=4, embed_dim=64),
    "gpt2-124m": GPT2Config(),
    "gpt2-350m": GPT2Config(num_layers=24, num_heads=16, embed_dim=1024, remat="dots_no_batch"),
    "gpt2-774m": GPT2Config(num_layers=36, num_heads=20, embed_dim=1280, remat="dots_no_batch"),
    "gpt2-1.5b": GPT2Config(num_layers=48, num_heads=25, embed_dim=1600, remat="minimal"),
    "tiny-llama": LlamaConfig(
        vocab_size=256, max_seq=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
        hidden_dim=176,
    ),
    "llama-1b": LlamaConfig(  # the shape of Llama 3.2 1B
        vocab_size=128256, max_seq=8192, num_layers=16, num_heads=32, num_kv_heads=8,
        embed_dim=2048, hidden_dim=8192, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        tie_embeddings=True, remat="dots_no_batch",
    ),
    "llama-8b": LlamaConfig(  # the shape of Llama 3.1 8B
        vocab_size=128256, max_seq=8192, num_layers=32, num_heads=32, num_kv_heads=8,
        embed_dim=4096, hidden_dim=14336, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0), tie_embeddings=False,
    ),
    "qwen3-0.6b": LlamaConfig(  # the shape of Qwen3 0.6B: per-head query/key norms, tied head
        vocab_size=151936, max_seq=40960, num_layers=28, num_heads=16, num_kv_heads=8,
        embed_dim=1024, hidden_dim=3072, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_embeddings=True, qk_norm=True,
    ),
    # Gemma family. tiny-gemma2 alternates 8-token windows with full attention and soft-caps
    # its logits; gemma2-2b is the shape of Gemma 2 2B; gemma3-1b of Gemma 3 1B (5 windowed
    # layers of 512 to 1 full layer, query/key norms, rotary base 10k locally and 1M globally).
    "tiny-gemma2": GemmaConfig(
        vocab_size=256, max_seq=128, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=64,
        hidden_dim=128, head_dim=16, query_pre_attn_scalar=16.0, sliding_window=8,
    ),
    "gemma2-2b": GemmaConfig(remat="full"),
    "gemma3-1b": GemmaConfig(
        vocab_size=262144, max_seq=32768, num_layers=26, num_heads=4, num_kv_heads=1,
        embed_dim=1152, hidden_dim=6912, head_dim=256, query_pre_attn_scalar=256.0,
        rope_theta=1e6, local_rope_theta=10000.0, sliding_window=512, sliding_window_pattern=6,
        qk_norm=True, attn_logit_softcap=None, final_logit_softcap=None, remat="dots_no_batch",
    ),
    # Mixture-of-experts decoders. tiny-mixtral routes each token to 2 of 4 experts; mixtral-8x7b
    # is the shape of Mixtral 8x7B (46.7B parameters, 12.9B active per token).
    "tiny-mixtral": MixtralConfig(
        vocab_size=256, max_seq=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
        hidden_dim=128, num_experts=4, experts_per_token=2,
    ),
    "mixtral-8x7b": MixtralConfig(),
    # The shape of Qwen3 30B-A3B: 128 experts, 8 a token. "capacity": "dense" would run all
    # 128 experts on every token (16 times the expert FLOPs).
    "qwen3-30b-a3b": MixtralConfig(
        vocab_size=151936, max_seq=40960, num_layers=48, num_heads=32, num_kv_heads=4,
        embed_dim=2048, hidden_dim=768, num_experts=128, experts_per_token=8, head_dim=128,
        rope_theta=1e6, rms_norm_eps=1e-6, router_aux_loss_coef=0.001, qk_norm=True,
        normalize_router_weights=True, moe_implementation="capacity",
    ),
    "mlp-small": MLPConfig(),
    "cnn-digits": CNNConfig(),
    # Vision Transformers. tiny-vit fits scikit-learn's 8x8 digits (16 patches of 2x2); the others
    # are the ImageNet shapes of Dosovitskiy et al. (2021) and DeiT (Touvron et al., 2021).
    "tiny-vit": ViTConfig(
        image_size=8, patch_size=2, in_channels=1, num_classes=10, num_layers=4, num_heads=4,
        embed_dim=64, mlp_ratio=2,
    ),
    "vit-s16": ViTConfig(num_layers=12, num_heads=6, embed_dim=384),
    "vit-b16": ViTConfig(),
    "vit-l16": ViTConfig(num_layers=24, num_heads=16, embed_dim=1024),
    # Diffusion models. The tiny ones fit scikit-learn's 8x8 digits, class-conditional; dit-s2 and
    # dit-xl2 are DiT-S/2 and DiT-XL/2 on the 32x32x4 latents of 256x256 ImageNet (Peebles & Xie,
    # 2023); unet-cifar10 is the DDPM CIFAR-10 UNet (Ho et al., 2020), unconditional.
    "tiny-dit": DiTConfig(
        image_size=8, in_channels=1, patch_size=2, num_classes=10, num_layers=4, num_heads=4,
        embed_dim=64, frequency_dim=64,
    ),
    "dit-s2": DiTConfig(num_layers=12, num_heads=6, embed_dim=384),
    "dit-xl2": DiTConfig(),
    "tiny-unet": UNetConfig(
        image_size=8, in_channels=1, num_classes=10, base_channels=32, channel_mults=(1, 2),
        num_res_blocks=1, attention_resolutions=(4,), num_groups=8,
    ),
    "unet-cifar10": UNetConfig(),
}


def list_presets() -> list[str]:
    """The names of all registered presets, sorted."""
    return sorted(_PRESETS)


def register_preset(name: str, config: ModelConfig, *, overwrite: bool = False) -> None:
    """Register `config` under `name` so `create(name)` builds it.

    **Raises:** `ConfigError` if `name` exists and `overwrite` is false, or the config type is
    not one of eqzoo's model families.
    """
    if type(config) not in _FAMILIES:
        raise ConfigError(f"cannot register a {type(config).__name__}; expected one of {[t.__name__ for t in _FAMILIES]}.")
    if name in _PRESETS and not overwrite:
        raise ConfigError(f"preset {name!r} already exists; pass overwrite=True to replace it.")
    _PRESETS[name] = config


def check_buildable(config: Any) -> None:
    """Raise `ConfigError` unless `config` is a preset name or a config of one of eqzoo's model
    families (checked before `create`, whose annotations would give a generic type error): a
    config of the user's own model says to pass the model instead."""
    if isinstance(config, str) or type(config) in _FAMILIES:
        return
    raise ConfigError(
        f"{type(config).__name__} is not one of eqzoo's model configs ({[t.__name__ for t in _FAMILIES]}), "
        "so eqzoo cannot build its model. For a model of your own pass the model itself: "
        "checkpoint.abstract_state(lambda k: MyModel(config, key=k), optimizer), "
        "checkpoint.load_weights(eqx.filter_eval_shape(MyModel, config, key=key), path)."
    )


def get_config(preset: str | ModelConfig, **overrides: Any) -> ModelConfig:
    """The config of a named preset (or `preset` itself if it is a config), with fields replaced.

    **Example:** `get_config("tiny-gpt2", num_layers=4, remat="full")`.

    **Raises:** `ConfigError` for an unknown name or field (listing the valid ones).
    """
    if isinstance(preset, str):
        if preset not in _PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; available presets: {list_presets()}.")
        config = _PRESETS[preset]
    elif type(preset) in _FAMILIES:
        config = preset
    elif dataclasses.is_dataclass(preset) and not isinstance(preset, type):
        check_buildable(preset)
    else:
        raise ConfigError(f"expected a preset name or a model config, got {type(preset).__name__}.")
    if overrides:
        fields = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(f"{type(config).__name__} has no field(s) {unknown}; valid fields: {sorted(fields)}.")
        config = dataclasses.replace(config, **overrides)
    return config


def model_class(config: ModelConfig) -> type:
    """The model class a config builds (`GPT2Config` -> `GPT2`, ...).

    **Raises:** `ConfigError` for a config that is not one of eqzoo's model families."""
    check_buildable(config)
    return _FAMILIES[type(config)]


def is_stateful(config: ModelConfig) -> bool:
    """Whether the family carries `eqx.nn.State` (BatchNorm statistics)."""
    return isinstance(config, _STATEFUL)


def _construct(config: ModelConfig, key: PRNGKey) -> Any:
    cls = _FAMILIES[type(config)]
    if is_stateful(config):
        return eqx.nn.make_with_state(cls)(config, key=key)
    return cls(config, key=key)


def create(preset: str | ModelConfig, *, key: PRNGKey, jit: bool = True, **overrides: Any) -> Any:
    """Build a model from a preset name or a config.

    By default the whole initialisation runs as one compiled program: the same arrays, bit for
    bit, as building eagerly (`jit=False`), and one compile instead of one per small random op
    (CPU seconds of a first build on a 2-core machine: `tiny-gpt2` 4.3 -> 2.8, `gpt2-124m`
    10.2 -> 5.4; `benchmarks/create_time.py`). Configs that differ only in fields that cannot
    change the arrays (remat policy, attention backend, norm epsilons, rotary settings, ...)
    share one program, and a new key reuses it. Called while tracing (inside `jax.jit`,
    `eqx.filter_eval_shape`, [`eqzoo.sharding.sharded_init`][]), it builds as part of the
    enclosing trace.

    **Arguments:**

    - `preset`: a name from `list_presets()` or a config instance.
    - `key`: PRNG key for initialisation (a typed key or a raw `uint32[2]` key).
    - `jit`: `False` runs each initialiser eagerly, op by op (the same arrays, slower to build
      the first time, nothing compiled for the config as a whole).
    - `**overrides`: config fields to replace (e.g. `num_layers=4`).

    **Returns:** the model; for stateful families (`CNN`) the pair `(model, state)` from
    `eqx.nn.make_with_state`.

    **Raises:** `ConfigError` for an unknown preset or field or an invalid config, before
    anything is traced.
    """
    config = get_config(preset, **overrides)
    model_class(config)
    if not jit or isinstance(key, jax.core.Tracer):
        return _construct(config, key)
    return compiled_build(_construct, config, key)
