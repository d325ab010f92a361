"""Llama (Touvron et al., 2023): RMSNorm, rotary positions, grouped-query attention, SwiGLU."""

import dataclasses
import math

import equinox as eqx
import jax

from .._errors import ConfigError, check_positive
from .._typing import PRNGKey
from ..nn import (
    REMAT_POLICIES,
    Attention,
    Embedding,
    RMSNorm,
    RopeScaling,
    Stacked,
    SwiGLU,
    TransformerBlock,
)
from ._lm import AbstractLM
from ._validate import check_integer_fields, check_scan_layers

_BACKENDS = ("xla", "cudnn", "auto")
LAYER_TYPES = ("sliding_attention", "full_attention")
"""The attention kinds a layer can have (Hugging Face's `layer_types` spelling)."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama model. Frozen and hashable; held by the model as a static field.

    **Arguments:**

    - `vocab_size`, `max_seq`, `num_layers`, `num_heads`, `embed_dim`.
    - `num_kv_heads`: key/value heads for grouped-query attention (must divide `num_heads`).
    - `hidden_dim`: SwiGLU inner width.
    - `head_dim`: per-head width; `None` means `embed_dim // num_heads`.
    - `rope_theta`, `rope_scaling`: rotary embedding base and optional Llama-3 scaling.
    - `rms_norm_eps`: RMSNorm epsilon.
    - `tie_embeddings`: share the token embedding with the output head.
    - `sliding_window`: each position attends to itself and the `sliding_window - 1` before it
      (Mistral); `None` attends to every earlier position. Hugging Face `MistralForCausalLM`
      checkpoints load as a Llama with it.
    - `qkv_bias`: biases on the query, key and value projections (not the output one): Qwen2's
      attention. Hugging Face `Qwen2ForCausalLM` checkpoints load as a Llama with it.
    - `qk_norm`: an RMSNorm (epsilon `rms_norm_eps`) over each head's queries and keys before
      the rotary embedding: Qwen3's attention. Hugging Face `Qwen3ForCausalLM` checkpoints load
      as a Llama with it.
    - `layer_types`: with a `sliding_window`, which layers use it: `"sliding_attention"` or
      `"full_attention"` for each layer (Qwen2's and Qwen3's `max_window_layers`: full layers
      first, windowed from there on). `None`: every layer windowed. Kinds that are all the same
      are stored one way: all sliding as `None`, all full as `sliding_window=None`.
    - `remat`, `scan_layers`, `attention_backend`: as in [`eqzoo.models.GPT2Config`][].
    """

    vocab_size: int = 32000
    max_seq: int = 2048
    num_layers: int = 16
    num_heads: int = 32
    num_kv_heads: int = 8
    embed_dim: int = 2048
    hidden_dim: int = 8192
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    sliding_window: int | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    layer_types: tuple[str, ...] | None = None
    remat: str = "none"
    scan_layers: bool | str = "auto"
    attention_backend: str = "auto"

    def __post_init__(self):
        check_integer_fields(self)
        check_positive(
            "LlamaConfig", vocab_size=self.vocab_size, max_seq=self.max_seq,
            num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            embed_dim=self.embed_dim, hidden_dim=self.hidden_dim, rms_norm_eps=self.rms_norm_eps,
        )
        check_decoder("LlamaConfig", self)
        if self.layer_types is not None:
            check_layer_types("LlamaConfig", self.layer_types, self.num_layers, self.sliding_window)
            if "full_attention" not in self.layer_types:
                object.__setattr__(self, "layer_types", None)
            elif "sliding_attention" not in self.layer_types:
                object.__setattr__(self, "layer_types", None)
                object.__setattr__(self, "sliding_window", None)

    @property
    def window_layers(self) -> tuple[bool, ...] | None:
        """For a stack that mixes windowed and full layers, whether each layer is windowed
        (what [`eqzoo.nn.Attention`][] takes); `None` when all layers are alike."""
        return None if self.layer_types is None else tuple(k == "sliding_attention" for k in self.layer_types)

    @property
    def resolved_head_dim(self) -> int:
        """`head_dim`, or `embed_dim // num_heads` when it is `None`."""
        return self.embed_dim // self.num_heads if self.head_dim is None else self.head_dim

    def num_params(self) -> int:
        """Number of parameters (a tied head counted once)."""
        d, h, hd = self.embed_dim, self.hidden_dim, self.resolved_head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        per_layer = attn + 3 * d * h + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + head + self.num_layers * per_layer + d

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: `6 N + 12 L d_attn T`, N without the input embedding table
        when the head is separate (a lookup does no matmul; a tied table is counted once, as the
        head), `d_attn = num_heads * head_dim` (the width attention runs at: `embed_dim` unless
        `head_dim` says otherwise, as in Qwen3) and T at most `sliding_window` on the windowed
        layers (the sum over layers of each one's span when `layer_types` mixes them)."""
        t = self.max_seq if seq_len is None else seq_len
        windowed = self.window_layers or (self.sliding_window is not None,) * self.num_layers
        spans = sum(min(t, self.sliding_window) if w else t for w in windowed)
        n = self.num_params() - (0 if self.tie_embeddings else self.vocab_size * self.embed_dim)
        return 6.0 * n + 12.0 * self.num_heads * self.resolved_head_dim * spans


class Llama(AbstractLM):
    """The Llama decoder: `logits = model(tokens)` for one sequence of token ids."""

    config: LlamaConfig = eqx.field(static=True)
    embed: Embedding
    blocks: Stacked[TransformerBlock]
    final_norm: RMSNorm
    lm_head: Embedding | None

    def __init__(self, config: LlamaConfig, *, key: PRNGKey):
        """**Arguments:** `config`, a [`eqzoo.models.LlamaConfig`][]; `key`, a PRNG key."""
        c = config

        def mlp(out_std, key):
            return SwiGLU(c.embed_dim, c.hidden_dim, out_init_std=out_std, key=key)

        self.config = c
        self.embed, self.blocks, self.final_norm, self.lm_head = decoder_layers(c, mlp, key)


def check_decoder(name: str, c) -> None:
    """The checks a Llama-style config (`LlamaConfig`, `MixtralConfig`) shares: heads, remat,
    scan, attention backend and sliding window. Raises `ConfigError` naming `name`."""
    if not (isinstance(c.rope_theta, int | float) and not isinstance(c.rope_theta, bool) and c.rope_theta > 0):
        raise ConfigError(f"{name}: rope_theta must be a positive number (the rotary base), got {c.rope_theta!r}.")
    if c.head_dim is None and c.embed_dim % c.num_heads:
        raise ConfigError(
            f"{name}: num_heads={c.num_heads} must divide embed_dim={c.embed_dim} "
            "(or set head_dim explicitly)."
        )
    if c.num_heads % c.num_kv_heads:
        raise ConfigError(
            f"{name}: num_kv_heads={c.num_kv_heads} must divide num_heads={c.num_heads} "
            "for grouped-query attention; pick a divisor of num_heads."
        )
    if c.remat not in REMAT_POLICIES:
        raise ConfigError(f"{name}: unknown remat {c.remat!r}; choose from {list(REMAT_POLICIES)}.")
    object.__setattr__(c, "scan_layers", check_scan_layers(c.scan_layers, name))
    if c.attention_backend not in _BACKENDS:
        raise ConfigError(f"{name}: attention_backend must be one of {_BACKENDS}, got {c.attention_backend!r}.")
    window = c.sliding_window
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ConfigError(f"{name}: sliding_window must be a positive integer or None, got {window!r}.")


def check_layer_types(name: str, layer_types, num_layers: int, sliding_window: int | None) -> None:
    """Raise `ConfigError` naming `name` unless `layer_types` is a tuple of one of
    `LAYER_TYPES` per layer, with a window for its sliding layers."""
    if isinstance(layer_types, str) or not isinstance(layer_types, tuple):
        raise ConfigError(f"{name}: layer_types must be a tuple of strings (one per layer), got {layer_types!r}.")
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown or len(layer_types) != num_layers:
        raise ConfigError(
            f"{name}: layer_types must give one of {LAYER_TYPES} for each of the "
            f"num_layers={num_layers} layers; got {len(layer_types)} entries"
            + (f" with unknown kinds {unknown}" if unknown else "") + "."
        )
    if sliding_window is None and "sliding_attention" in layer_types:
        raise ConfigError(
            f"{name}: layer_types has sliding_attention layers but sliding_window is None; give "
            "the window's size."
        )


def decoder_layers(c, make_mlp, key):
    """The layers of a Llama-style decoder (`LlamaConfig` or `MixtralConfig`): the token
    embedding, the stacked pre-norm blocks (RMSNorm, rotary grouped-query attention and
    `make_mlp(out_init_std, key)`), the final norm and the untied head (`None` when tied).
    Residual output projections start at `0.02 / sqrt(2 num_layers)`."""
    k_tok, k_blocks, k_head = jax.random.split(key, 3)
    out_std = 0.02 / math.sqrt(2 * c.num_layers)

    def make_block(k):
        ka, km = jax.random.split(k)
        return TransformerBlock(
            RMSNorm(c.embed_dim, eps=c.rms_norm_eps),
            Attention(
                c.embed_dim, c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.resolved_head_dim,
                use_rope=True, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                use_bias=getattr(c, "qkv_bias", False), out_bias=False,
                qk_norm=c.qk_norm, qk_norm_eps=c.rms_norm_eps,
                backend=c.attention_backend, sliding_window=c.sliding_window,
                window_layers=getattr(c, "window_layers", None), out_init_std=out_std, key=ka,  # type: ignore[arg-type]
            ),
            RMSNorm(c.embed_dim, eps=c.rms_norm_eps),
            make_mlp(out_std, km),
        )

    embed = Embedding(c.vocab_size, c.embed_dim, key=k_tok)
    blocks = Stacked(make_block, c.num_layers, remat=c.remat, scan=c.scan_layers, key=k_blocks)  # type: ignore[arg-type]
    final_norm = RMSNorm(c.embed_dim, eps=c.rms_norm_eps)
    lm_head = None if c.tie_embeddings else Embedding(c.vocab_size, c.embed_dim, key=k_head)
    return embed, blocks, final_norm, lm_head
