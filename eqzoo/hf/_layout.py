"""Where each parameter of an eqzoo model lives in a Hugging Face state dict, and how it is laid out.

One table per model family, used in both directions by the loader and the saver.
"""

import dataclasses
import functools
import itertools
import re
from collections.abc import Iterable
from typing import Any

from ..models import GemmaConfig, GPT2Config, LlamaConfig, MixtralConfig, ViTConfig
from ._errors import HFFormatError

_INDICES = ("i", "j")  # layer, expert


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One eqzoo array leaf and the Hugging Face tensor(s) it comes from.

    - `path`: attribute names from the model to the leaf, e.g. `("embed", "weight")`.
    - `hf_name`: the HF tensor name, with a placeholder for each leading axis of the leaf that
      HF splits into separate tensors, in this order: `{i}` the layer (axis 0 of every
      parameter in `Stacked.layers`), `{j}` the expert (axis 1 of Mixtral's expert weights,
      which HF keeps as one tensor per expert).
    - `transpose`: HF stores the transpose (GPT-2's `Conv1D` keeps weights as (in, out)).
    - `part`: `(k, n)` when the leaf is the `k`-th of `n` equal chunks of the HF tensor's last
      axis (GPT-2 fuses q, k and v into one `c_attn`).
    - `hf_leading`: the HF tensor has this many extra leading axes of size 1 (ViT keeps its
      class token as (1, 1, embed) and its position embeddings as (1, seq, embed)).
    """

    path: tuple[str, ...]
    hf_name: str
    transpose: bool = False
    part: tuple[int, int] | None = None
    hf_leading: int = 0

    @property
    def indices(self) -> tuple[str, ...]:
        """The placeholders in `hf_name`, in the order of the leaf axes they index."""
        return tuple(k for k in _INDICES if "{" + k + "}" in self.hf_name)

    @property
    def lead(self) -> int:
        """How many leading axes of the eqzoo leaf are split into separate HF tensors."""
        return len(self.indices)

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    def hf_names(self, leaf_shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], str]]:
        """`(index, name)` for every HF tensor of a leaf of `leaf_shape`: `leaf[index]` is stored
        as `name` (`index == ()` when the leaf is one tensor)."""
        keys = self.indices
        return [
            (index, self.hf_name.format(**dict(zip(keys, index, strict=True))))
            for index in itertools.product(*(range(n) for n in leaf_shape[: len(keys)]))
        ]

    def hf_shape(self, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of each HF tensor given the shape of the eqzoo leaf."""
        leaf_shape = leaf_shape[self.lead :]
        shape = tuple(reversed(leaf_shape)) if self.transpose else tuple(leaf_shape)
        if self.part is not None:
            shape = shape[:-1] + (shape[-1] * self.part[1],)
        return (1,) * self.hf_leading + shape

    def hf_index(self, leaf_shape: tuple[int, ...]) -> tuple[slice, ...]:
        """Which part of each HF tensor holds (its slice of) the leaf of `leaf_shape`."""
        hf_shape = self.hf_shape(leaf_shape)
        index = [slice(0, n) for n in hf_shape]
        if self.part is not None:
            k, n = self.part
            width = hf_shape[-1] // n
            index[-1] = slice(k * width, (k + 1) * width)
        return tuple(index)


def get_path(tree: Any, path: Iterable[str]) -> Any:
    """`tree.a.b.c` for `path == ("a", "b", "c")`."""
    return functools.reduce(getattr, path, tree)


def _gpt2_rules(prefix: str) -> list[TensorRule]:
    p, h = prefix, f"{prefix}h.{{i}}."
    layer = ("blocks", "layers")
    rules = [
        TensorRule(("embed", "weight"), f"{p}wte.weight"),
        TensorRule(("pos_embed", "weight"), f"{p}wpe.weight"),
        TensorRule(("final_norm", "weight"), f"{p}ln_f.weight"),
        TensorRule(("final_norm", "bias"), f"{p}ln_f.bias"),
    ]
    for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        for leaf in ("weight", "bias"):
            rules.append(TensorRule(layer + (ours, leaf), f"{h}{theirs}.{leaf}"))
    for k, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        rules.append(TensorRule(layer + ("attn", proj, "weight"), f"{h}attn.c_attn.weight", True, (k, 3)))
        rules.append(TensorRule(layer + ("attn", proj, "bias"), f"{h}attn.c_attn.bias", False, (k, 3)))
    for ours, theirs in ((("attn", "o_proj"), "attn.c_proj"), (("mlp", "up"), "mlp.c_fc"), (("mlp", "down"), "mlp.c_proj")):
        rules.append(TensorRule(layer + ours + ("weight",), f"{h}{theirs}.weight", True))
        rules.append(TensorRule(layer + ours + ("bias",), f"{h}{theirs}.bias"))
    return rules


def _decoder_rules(tied: bool, qkv_bias: bool = False, qk_norm: bool = False) -> list[TensorRule]:
    """Llama's embeddings, norms, attention and head, which Mixtral shares."""
    h = "model.layers.{i}."
    layer = ("blocks", "layers")
    rules = [
        TensorRule(("embed", "weight"), "model.embed_tokens.weight"),
        TensorRule(("final_norm", "weight"), "model.norm.weight"),
        TensorRule(layer + ("attn_norm", "weight"), f"{h}input_layernorm.weight"),
        TensorRule(layer + ("mlp_norm", "weight"), f"{h}post_attention_layernorm.weight"),
    ]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules.append(TensorRule(layer + ("attn", proj, "weight"), f"{h}self_attn.{proj}.weight"))
    if qkv_bias:  # Qwen2
        for proj in ("q_proj", "k_proj", "v_proj"):
            rules.append(TensorRule(layer + ("attn", proj, "bias"), f"{h}self_attn.{proj}.bias"))
    if qk_norm:  # Qwen3
        for norm in ("q_norm", "k_norm"):
            rules.append(TensorRule(layer + ("attn", norm, "weight"), f"{h}self_attn.{norm}.weight"))
    if not tied:
        rules.append(TensorRule(("lm_head", "weight"), "lm_head.weight"))
    return rules


def _llama_rules(tied: bool, qkv_bias: bool = False, qk_norm: bool = False) -> list[TensorRule]:
    mlp = ("blocks", "layers", "mlp")
    return _decoder_rules(tied, qkv_bias, qk_norm) + [
        TensorRule(mlp + (ours, "weight"), f"model.layers.{{i}}.mlp.{theirs}.weight")
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))
    ]


def _mixtral_rules(tied: bool) -> list[TensorRule]:
    # HF keeps one Linear per expert, (out, in); eqzoo stacks experts as (in, out) arrays.
    # w1 is the gate, w3 the up and w2 the down projection (Mixtral's reference code's names).
    moe, mlp = "model.layers.{i}.block_sparse_moe.", ("blocks", "layers", "mlp")
    rules = _decoder_rules(tied) + [TensorRule(mlp + ("router", "weight"), f"{moe}gate.weight")]
    for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
        rules.append(TensorRule(mlp + (ours,), f"{moe}experts.{{j}}.{theirs}.weight", transpose=True))
    return rules


def _qwen3_moe_rules(tied: bool) -> list[TensorRule]:
    # Qwen3-MoE names its router `mlp.gate` and its experts' projections as a Llama MLP's.
    moe, mlp = "model.layers.{i}.mlp.", ("blocks", "layers", "mlp")
    rules = _decoder_rules(tied, qk_norm=True) + [TensorRule(mlp + ("router", "weight"), f"{moe}gate.weight")]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules.append(TensorRule(mlp + (proj,), f"{moe}experts.{{j}}.{proj}.weight", transpose=True))
    return rules


def _gemma_rules(c: GemmaConfig) -> list[TensorRule]:
    # Gemma's tensors are Llama's, norms included (HF stores the weight w of `1 + w`, which is
    # eqzoo's offset-1 RMSNorm weight). Gemma 2 and 3 add the sandwich norms; there the pre-MLP
    # norm is `pre_feedforward_layernorm` and `post_attention_layernorm` normalises the
    # attention's output (in Gemma and Llama it is the pre-MLP norm).
    h, layer = "model.layers.{i}.", ("blocks", "layers")
    rules = [r for r in _llama_rules(c.tie_embeddings, qk_norm=c.qk_norm) if r.path != layer + ("mlp_norm", "weight")]
    if not c.post_norms:
        return rules + [TensorRule(layer + ("mlp_norm", "weight"), f"{h}post_attention_layernorm.weight")]
    return rules + [
        TensorRule(layer + ("post_attn_norm", "weight"), f"{h}post_attention_layernorm.weight"),
        TensorRule(layer + ("mlp_norm", "weight"), f"{h}pre_feedforward_layernorm.weight"),
        TensorRule(layer + ("post_mlp_norm", "weight"), f"{h}post_feedforward_layernorm.weight"),
    ]


def _vit_rules() -> list[TensorRule]:
    e, h = "vit.embeddings.", "vit.encoder.layer.{i}."
    layer = ("blocks", "layers")
    rules = [
        TensorRule(("patch_embed", "weight"), f"{e}patch_embeddings.projection.weight"),  # Conv2d's layout
        TensorRule(("patch_embed", "bias"), f"{e}patch_embeddings.projection.bias"),
        TensorRule(("cls_token",), f"{e}cls_token", hf_leading=2),
        TensorRule(("pos_embed", "weight"), f"{e}position_embeddings", hf_leading=1),
        TensorRule(("final_norm", "weight"), "vit.layernorm.weight"),
        TensorRule(("final_norm", "bias"), "vit.layernorm.bias"),
        TensorRule(("head", "weight"), "classifier.weight"),
        TensorRule(("head", "bias"), "classifier.bias"),
    ]
    for ours, theirs in (
        (("attn_norm",), "layernorm_before"),
        (("mlp_norm",), "layernorm_after"),
        (("attn", "q_proj"), "attention.attention.query"),
        (("attn", "k_proj"), "attention.attention.key"),
        (("attn", "v_proj"), "attention.attention.value"),
        (("attn", "o_proj"), "attention.output.dense"),
        (("mlp", "up"), "intermediate.dense"),
        (("mlp", "down"), "output.dense"),
    ):
        for leaf in ("weight", "bias"):
            rules.append(TensorRule(layer + ours + (leaf,), f"{h}{theirs}.{leaf}"))
    return rules


# Tensors some checkpoints carry that are not parameters (constant buffers, or a tied head
# written out twice); they are skipped on load. `{p}` is the GPT-2 prefix.
_GPT2_IGNORED = (r"{p}h\.\d+\.attn\.bias", r"{p}h\.\d+\.attn\.masked_bias", r"lm_head\.weight")
_LLAMA_IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
_VIT_IGNORED = (r"vit\.pooler\..*",)  # ViTModel's tanh pooler, unused by the classifier
_FUSED_EXPERTS = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)")


def _refuse_fused_experts(names: Iterable[str]) -> None:
    fused = sorted(n for n in names if _FUSED_EXPERTS.fullmatch(n))
    if fused:
        raise HFFormatError(
            f"the checkpoint stores its experts fused (for example {fused[0]!r}), "
            "transformers' in-memory layout, not the one its save_pretrained writes. eqzoo reads "
            "the per-expert layout ('model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight' "
            "for Mixtral, 'model.layers.{i}.mlp.experts.{j}.gate_proj.weight' for Qwen3-MoE); "
            "re-save the model with AutoModelForCausalLM.from_pretrained(...).save_pretrained(...)."
        )


def rules_for(
    config: GPT2Config | LlamaConfig | MixtralConfig | GemmaConfig | ViTConfig, names: Iterable[str] = ()
) -> tuple[list[TensorRule], re.Pattern[str]]:
    """The tensor rules of a model with `config`, and a pattern matching ignorable tensor names.

    `names` (the checkpoint's tensor names, if loading) decides GPT-2's prefix: files written by
    `GPT2LMHeadModel` say `transformer.wte.weight`, the original OpenAI conversions `wte.weight`.
    """
    if isinstance(config, GPT2Config):
        names = set(names)
        prefix = "" if "wte.weight" in names and "transformer.wte.weight" not in names else "transformer."
        ignored = [pat.replace("{p}", re.escape(prefix)) for pat in _GPT2_IGNORED]
        return _gpt2_rules(prefix), re.compile("|".join(ignored))
    if isinstance(config, ViTConfig):
        if config.pool != "cls":
            raise HFFormatError(
                f"Hugging Face's ViT classifies a class token; a ViTConfig(pool={config.pool!r}) has "
                "none. Use pool='cls' to load or save Hugging Face ViT checkpoints."
            )
        return _vit_rules(), re.compile("|".join(_VIT_IGNORED))
    ignored = list(_LLAMA_IGNORED)
    if config.tie_embeddings:
        ignored.append(r"lm_head\.weight")
    if isinstance(config, MixtralConfig):
        _refuse_fused_experts(names)
        rules = _qwen3_moe_rules if config.qk_norm else _mixtral_rules
        return rules(config.tie_embeddings), re.compile("|".join(ignored))
    if isinstance(config, GemmaConfig):
        return _gemma_rules(config), re.compile("|".join(ignored))
    return _llama_rules(config.tie_embeddings, config.qkv_bias, config.qk_norm), re.compile("|".join(ignored))
