"""Path-based sharding rules: an ordered list of `(regex, PartitionSpec)`, first match wins."""

import math
import re
from collections.abc import Sequence
from typing import Any, TypeAlias

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from .._errors import shape_str
from ._errors import ShardingError

Rules: TypeAlias = Sequence[tuple[str, P]]
"""Sharding rules: `(regex, PartitionSpec)` pairs tried in order against a parameter's dotted
path with `re.search`; the first match gives the spec. A parameter no rule matches is
replicated."""

# Shapes (eqx.nn.Linear weights are (out, in); everything under `blocks.layers` has the stacked
# layer axis first, which the rules leave to `partition_specs`: it splits it over `stage` for
# every eqzoo.nn.Stacked on a mesh with stage > 1, pipeline parallelism):
#   embed.weight, lm_head.weight     (vocab, embed)
#   blocks.layers.attn.q_proj.weight (layers, heads * head_dim, embed)   column-parallel
#   blocks.layers.attn.o_proj.weight (layers, embed, heads * head_dim)   row-parallel
#   blocks.layers.mlp.up.weight      (layers, hidden, embed)             column-parallel
#   blocks.layers.mlp.down.weight    (layers, embed, hidden)             row-parallel
_TRANSFORMER_RULES: tuple[tuple[str, P], ...] = (
    # Vocab-parallel embedding / output head, FSDP over the embedding dimension.
    (r"^(embed|lm_head)\.weight$", P("tensor", "fsdp")),
    # Column-parallel: outputs (heads, MLP hidden units) split over `tensor`, inputs over `fsdp`.
    # A projection wrapped by eqzoo.peft (`q_proj.base.weight`) or quantized by eqzoo.quant
    # (int8 `codes`, per-output-channel `scale`) keeps its base weight's layout.
    (r"attn\.(q|k|v)_proj\.(base\.)*(weight|codes)$", P(None, "tensor", "fsdp")),
    (r"attn\.(q|k|v)_proj\.(base\.)*(bias|scale)$", P(None, "tensor")),
    (r"mlp\.(up|gate)\.(base\.)*(weight|codes)$", P(None, "tensor", "fsdp")),
    (r"mlp\.(up|gate)\.(base\.)*(bias|scale)$", P(None, "tensor")),
    # Row-parallel: inputs split over `tensor` (one all-reduce after the layer), outputs over
    # `fsdp`. Their biases, and the norms, are small: replicated.
    (r"attn\.o_proj\.(base\.)*(weight|codes)$", P(None, "fsdp", "tensor")),
    (r"mlp\.down\.(base\.)*(weight|codes)$", P(None, "fsdp", "tensor")),
    # LoRA factors (rank r is tiny): the column-parallel `lora_b` (layers, out, r) is split like
    # its layer's outputs and the row-parallel `lora_a` (layers, r, in) like its inputs, so the
    # adapter's output has the base output's layout; the other factors are replicated.
    (r"attn\.(q|k|v)_proj\.lora_b$", P(None, "tensor", None)),
    (r"mlp\.(up|gate)\.lora_b$", P(None, "tensor", None)),
    (r"(attn\.o_proj|mlp\.down)\.lora_a$", P(None, None, "tensor")),
)

GPT2_RULES: tuple[tuple[str, P], ...] = (
    *_TRANSFORMER_RULES,
    (r"^pos_embed\.weight$", P(None, "fsdp")),  # (max_seq, embed)
)
"""Default rules for [`eqzoo.models.GPT2`][]: FSDP over the embedding dimension; Megatron
tensor parallelism (column-split Q/K/V and MLP up, row-split attention output and MLP down,
heads split across `tensor`); vocab-parallel tied embedding; norms and output biases
replicated."""

LLAMA_RULES: tuple[tuple[str, P], ...] = _TRANSFORMER_RULES
"""Default rules for [`eqzoo.models.Llama`][]: as `GPT2_RULES`, with the SwiGLU gate split like
the up projection and the untied `lm_head` like the embedding."""

MIXTRAL_RULES: tuple[tuple[str, P], ...] = (
    *_TRANSFORMER_RULES,
    # Experts (layers, experts, embed, hidden) and (layers, experts, hidden, embed): whole
    # experts split over `expert` (expert parallelism), and inside each expert, like a SwiGLU's
    # projections, hidden units over `tensor` and the embedding over `fsdp`. The router
    # (layers, experts, embed) is small: replicated.
    # Int8 experts (eqzoo.quant.QuantizedWeight) keep the layout: codes as the weight, the
    # per-column scale (layers, experts, out) as its columns.
    # LoRA on experts (eqzoo.peft.LoRAWeight) keeps the base's layout under `.base`; its
    # factors (layers, experts, ...) are split over `expert` like their experts, and along the
    # side of the weight they share: `lora_b` of gate/up (layers, experts, r, hidden) and
    # `lora_a` of down (layers, experts, hidden, r) over `tensor`.
    (r"mlp\.(gate|up)_proj(\.base)*(\.codes)?$", P(None, "expert", "fsdp", "tensor")),
    (r"mlp\.(gate|up)_proj(\.base)*\.scale$", P(None, "expert", "tensor")),
    (r"mlp\.down_proj(\.base)*(\.codes)?$", P(None, "expert", "tensor", "fsdp")),
    (r"mlp\.down_proj(\.base)*\.scale$", P(None, "expert", "fsdp")),
    (r"mlp\.(gate|up)_proj\.lora_b$", P(None, "expert", None, "tensor")),
    (r"mlp\.down_proj\.lora_a$", P(None, "expert", "tensor", None)),
    (r"mlp\.(gate|up|down)_proj\.lora_(a|b)$", P(None, "expert")),
)
"""Default rules for [`eqzoo.models.Mixtral`][]: `LLAMA_RULES` for attention, embeddings and
norms; whole experts split over the mesh's `expert` axis (expert parallelism: with
`expert=4`, each device holds a quarter of the experts), and each expert's SwiGLU split as a
dense SwiGLU is (hidden units over `tensor`, embedding over `fsdp`); the router replicated.
Under `"capacity"` and `"dense"` tokens travel to their experts' devices and back by
all-to-all over `expert` (see [`eqzoo.nn.MoE`][]); under `"ragged"`, and without an `expert`
axis, each device routes and computes its own batch shard's tokens, with the experts' weights
gathered over `fsdp` (and `expert`) as every FSDP weight is."""

VIT_RULES: tuple[tuple[str, P], ...] = (
    *_TRANSFORMER_RULES,
    (r"^pos_embed\.weight$", P(None, "fsdp")),  # (seq, embed)
    (r"^patch_embed\.weight$", P("fsdp")),  # (embed, channels, patch, patch)
    (r"^head\.weight$", P(None, "fsdp")),  # (classes, embed)
)
"""Default rules for [`eqzoo.models.ViT`][]: its blocks are GPT-2's, so as `GPT2_RULES` (FSDP
over the embedding dimension, Megatron tensor parallelism in the blocks); the patch projection,
position embeddings and classifier head split over `fsdp` along the embedding; the class token,
norms and biases replicated."""

DIT_RULES: tuple[tuple[str, P], ...] = (
    *_TRANSFORMER_RULES,
    # (layers, 6 embed, embed) and (2 embed, embed): the adaLN projections of the conditioning
    # vector, FSDP over their input (the embedding), like every other projection.
    (r"^blocks\.layers\.modulation\.(base\.)*(weight|codes)$", P(None, None, "fsdp")),
    (r"^final_modulation\.(base\.)*(weight|codes)$", P(None, "fsdp")),
    (r"^patch_embed\.(base\.)*(weight|codes)$", P("fsdp")),  # (embed, patch pixels)
    (r"^final_linear\.(base\.)*(weight|codes)$", P(None, "fsdp")),  # (patch pixels, embed)
    (r"^label_embed\.weight$", P(None, "fsdp")),  # (classes + 1, embed)
    (r"^time_embed\.second\.(base\.)*(weight|codes)$", P("fsdp")),  # (embed, hidden)
)
"""Default rules for [`eqzoo.models.DiT`][]: its attention and MLP are GPT-2's, so as
`GPT2_RULES` (FSDP over the embedding dimension, Megatron tensor parallelism in the blocks); the
adaLN modulation, patch projection, output layer, class embeddings and the timestep MLP's output
layer split over `fsdp` along the embedding; biases, the small timestep input layer replicated."""


def path_str(path: Sequence[Any]) -> str:
    """A pytree key path as the dotted string rules match: `blocks.layers.attn.q_proj.weight`.

    Attribute names, dict keys and sequence indices are joined with `.` (so
    `jax.tree_util.keystr`'s `.blocks.layers[0]['w']` becomes `blocks.layers.0.w`).
    """
    return jax.tree_util.keystr(tuple(path), simple=True, separator=".")


def _compile(rules: Rules) -> list[tuple[re.Pattern, P, str]]:
    compiled = []
    for item in rules:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], P)):
            raise ShardingError(
                f"a sharding rule is a (regex, PartitionSpec) pair; got {item!r}."
            )
        pattern, spec = item
        try:
            compiled.append((re.compile(pattern), spec, pattern))
        except re.error as err:
            raise ShardingError(f"sharding rule regex {pattern!r} does not compile: {err}.") from err
    return compiled


def spec_for(path: str, rules: Rules) -> P:
    """The `PartitionSpec` the first rule matching `path` gives (`P()`, replicated, if none).

    **Arguments:** `path`, a dotted parameter path; `rules`, `(regex, PartitionSpec)` pairs.
    """
    for regex, spec, _ in _compile(rules):
        if regex.search(path):
            return spec
    return P()


def _entry_axes(entry: Any) -> tuple[str, ...]:
    if entry is None or entry is P.UNCONSTRAINED:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def drop_missing_axes(spec: P, mesh: Mesh) -> P:
    """`spec` without the mesh axes `mesh` lacks: eqzoo's defaults (rules, `BATCH_SPEC`) name
    eqzoo axes, and fit a mesh built by hand with only some of them."""

    def keep(entry):
        if entry is None or entry is P.UNCONSTRAINED:
            return entry
        axes = tuple(a for a in _entry_axes(entry) if a in mesh.shape)
        return None if not axes else axes[0] if len(axes) == 1 else axes

    return P(*(keep(e) for e in spec))


def check_spec(path: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> P:
    """Check that `spec` can shard an array of `shape` on `mesh`, and return it.

    **Raises:** [`eqzoo.sharding.ShardingError`][] naming the parameter, its shape and the mesh
    axis when the spec has more entries than the array has dimensions, names an axis the mesh
    lacks, uses an axis twice, or assigns a dimension to mesh axes whose size does not divide it.
    """
    sizes = {str(k): int(v) for k, v in mesh.shape.items()}
    if len(spec) > len(shape):
        raise ShardingError(
            f"parameter {path!r} of shape {shape_str(shape)} has {len(shape)} dimension(s) but "
            f"its sharding rule gives {spec} with {len(spec)} entries; fix the rule or add a more "
            "specific rule before it."
        )
    used: list[str] = []
    for dim, entry in enumerate(spec):
        axes = _entry_axes(entry)
        for axis in axes:
            if axis not in sizes:
                raise ShardingError(
                    f"parameter {path!r}: its sharding rule {spec} names mesh axis {axis!r}, but "
                    f"the mesh has the axes {sizes}."
                )
            if axis in used:
                raise ShardingError(
                    f"parameter {path!r}: its sharding rule {spec} uses mesh axis {axis!r} twice."
                )
            used.append(axis)
        n = math.prod(sizes[a] for a in axes)
        if shape[dim] % n:
            names = "x".join(f"{a}={sizes[a]}" for a in axes if sizes[a] > 1)
            what = "num_experts" if "expert" in axes and sizes["expert"] > 1 else "heads, hidden or vocab"
            raise ShardingError(
                f"parameter {path!r} of shape {shape_str(shape)}: dimension {dim} (size "
                f"{shape[dim]}) is assigned to mesh axis {names} ({n} devices), which does not "
                f"divide it. Choose sizes divisible by {n} (e.g. {what}), a "
                "smaller mesh axis, or a rule that leaves this dimension unsharded (None)."
            )
    return spec


def _is_leaf_array(x: Any) -> bool:
    return isinstance(x, jax.Array | jax.ShapeDtypeStruct | np.ndarray)


def partition_specs(tree: Any, rules: Rules, mesh: Mesh | None = None) -> Any:
    """The `PartitionSpec` of every array leaf of `tree` (a model, or any pytree).

    **Arguments:**

    - `tree`: a pytree whose leaves are arrays or `jax.ShapeDtypeStruct`s (for example from
      `eqx.filter_eval_shape`); other leaves get `None`.
    - `rules`: `(regex, PartitionSpec)` pairs matched against each leaf's dotted path (see
      [`eqzoo.sharding.path_str`][]).
    - `mesh`: if given, every spec is checked against it ([`eqzoo.sharding.check_spec`][]).
      On a mesh with `stage > 1` the stacked layer axis (the first) of every array of an
      [`eqzoo.nn.Stacked`][] is split over `stage` (pipeline parallelism) where the rule leaves
      that axis whole.

    **Returns:** a pytree of the same structure with a `PartitionSpec` (or `None`) per leaf.
    Scalars are always replicated.

    **Raises:** [`eqzoo.sharding.ShardingError`][] as `check_spec` does, and when the mesh's
    `stage` does not divide a stack's number of layers.
    """
    compiled = _compile(rules)
    stacks = _stack_prefixes(tree) if mesh is not None and int(mesh.shape.get("stage", 1)) > 1 else ()

    def one(path, leaf):
        if not _is_leaf_array(leaf):
            return None
        shape = tuple(leaf.shape)
        if not shape:
            return P()
        name = path_str(path)
        spec = next((s for regex, s, _ in compiled if regex.search(name)), P())
        if any(name.startswith(prefix) for prefix in stacks):
            spec = _by_stage(name, shape, spec, mesh)
        return check_spec(name, shape, spec, mesh) if mesh is not None else spec

    return jax.tree_util.tree_map_with_path(one, tree)


def _stack_prefixes(tree: Any) -> tuple[str, ...]:
    """The dotted path prefixes (`"blocks.layers."`) of the stacked arrays of every
    `eqzoo.nn.Stacked` in `tree` (not those of an `unstacked()` stack: its layers are a tuple)."""
    from ..nn import Stacked  # eqzoo.nn imports eqzoo.sharding lazily; this is the other way

    found = []
    nodes = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, Stacked))[0]
    for path, node in nodes:
        if isinstance(node, Stacked) and not isinstance(node.layers, tuple):
            found.append(path_str((*path, jax.tree_util.GetAttrKey("layers"))) + ".")
    return tuple(found)


def _by_stage(name: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> P:
    """`spec` with the stacked layer axis split over `stage`, unless the rule placed it."""
    if tuple(spec)[:1] not in ((), (None,)):
        return spec
    stages = int(mesh.shape["stage"])
    if shape[0] % stages:
        raise ShardingError(
            f"parameter {name!r} of shape {shape_str(shape)}: its stack of {shape[0]} layers cannot "
            f"be split over mesh axis stage={stages} (pipeline parallelism gives each stage an equal "
            f"share of the layers). Use a stage size that divides {shape[0]}, or a depth divisible "
            f"by {stages}."
        )
    return P("stage", *tuple(spec)[1:])


def default_rules(model: Any) -> tuple[tuple[str, P], ...]:
    """The default rules for a model (or its config, or an abstract model).

    **Returns:** `GPT2_RULES` for GPT-2, `LLAMA_RULES` for Llama and Gemma (the same parameter
    layout; Gemma's extra norms are replicated), `MIXTRAL_RULES` for Mixtral,
    `VIT_RULES` for ViT, `DIT_RULES` for DiT, and `()` otherwise (every parameter replicated:
    plain data parallelism, whatever the mesh).
    """
    # Imported here: eqzoo.models imports eqzoo.sharding.
    from ..models import (
        GPT2,
        DiT,
        DiTConfig,
        Gemma,
        GemmaConfig,
        GPT2Config,
        Llama,
        LlamaConfig,
        Mixtral,
        MixtralConfig,
        ViT,
        ViTConfig,
    )

    if isinstance(model, GPT2 | GPT2Config):
        return GPT2_RULES
    if isinstance(model, Llama | LlamaConfig | Gemma | GemmaConfig):
        return LLAMA_RULES
    if isinstance(model, Mixtral | MixtralConfig):
        return MIXTRAL_RULES
    if isinstance(model, ViT | ViTConfig):
        return VIT_RULES
    if isinstance(model, DiT | DiTConfig):
        return DIT_RULES
    return ()
