"""Losses: cross-entropy with a mask, and a language-model loss that never materialises the
float32 logits of the whole batch at once."""

import inspect
import warnings
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Integer, PyTree

from .._errors import ConfigError, ShapeError, as_flag, shape_str, user_stacklevel
from .._typing import PRNGKey
from ..nn._stacked import eager_mode
from ..sharding._activation import active_mesh
from ._fused_ce import (
    _cap,
    _chunk,
    _constrain,
    _context_fold,
    _fold,
    _layout,
    _unfold,
    fused_cross_entropy,
)


def cross_entropy(
    logits: Float[Array, "*batch vocab"],
    targets: Integer[Array, "*batch"],
    mask: Bool[Array, "*batch"] | Float[Array, "*batch"] | None = None,
) -> Float[Array, ""]:
    """Mean negative log-likelihood of `targets` under `softmax(logits)`, computed in float32.

    **Arguments:**

    - `logits`: unnormalised scores, any leading shape.
    - `targets`: integer class ids with the leading shape of `logits`. A negative target
      (Hugging Face's `-100`) does not count, as if masked out.
    - `mask`: optional weights (bool or float) of the targets' shape; masked-out positions do
      not count.

    **Returns:** the mean over counted positions, a float32 scalar (0 when none counts).
    """
    if logits.shape[:-1] != targets.shape:
        raise ShapeError(
            f"cross_entropy: logits {shape_str(logits.shape)} and targets {shape_str(targets.shape)} "
            "must share their leading shape."
        )
    if mask is not None and jnp.shape(mask) != targets.shape:  # would broadcast over the wrong axis
        raise ShapeError(
            f"cross_entropy: mask must have the targets' shape {shape_str(targets.shape)}; got "
            f"{shape_str(jnp.shape(mask))}."
        )
    logits = logits.astype(jnp.float32)
    ignored = targets < 0  # read as class 0 and not counted, rather than indexing from the end
    targets = jnp.where(ignored, 0, targets)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = lse - target_logit
    w = (~ignored).astype(jnp.float32) if mask is None else jnp.where(ignored, 0.0, mask.astype(jnp.float32))
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def _chunked_nll(features, head, targets, chunk_size, softcap=None):
    """Per-position NLL, computing `chunk_size` rows of logits at a time (recomputed in backward);
    `softcap`: the model's logit soft cap, if any."""
    seq = features.shape[0]
    pad = (-seq) % chunk_size
    if pad:
        features = jnp.pad(features, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
    n = features.shape[0] // chunk_size
    f = features.reshape(n, chunk_size, features.shape[-1])
    t = targets.reshape(n, chunk_size)

    @jax.checkpoint
    def one(args):
        fc, tc = args
        logits = (fc @ head.T.astype(fc.dtype)).astype(jnp.float32)  # (chunk, vocab)
        logits, _ = _cap(logits, softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tl = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        return lse - tl

    nll = jax.lax.map(one, (f, t)).reshape(-1)
    return nll[:seq]


def _chunked_batch_nll(features, head, targets, chunk_size, softcap=None):
    """`_chunked_nll` of every sequence. Under a mesh, each batch shard gets its own copy of the
    head (a broadcast `(shards, vocab, embed)`, split over the batch axes), so the backward
    pass accumulates one head gradient per shard through the chunks and sums them once at the
    end; with one shared head, XLA all-reduced the whole head gradient in every chunk."""
    fold = _context_fold(targets.shape[1])  # under context parallelism, each device's piece is a row
    features, targets = _fold(features, fold), _fold(targets, fold)
    layout = _layout(targets.shape[0], head.shape[0], context=fold > 1)
    chunk = _chunk(chunk_size, *targets.shape, head.shape[0], layout)
    per_sequence = jax.vmap(lambda h, f, t: _chunked_nll(f, h, t, chunk, softcap), in_axes=(None, 0, 0))
    if layout is None:
        return _unfold(per_sequence(head, features, targets), fold)
    s = layout.shards
    heads = _constrain(jnp.broadcast_to(head, (s, *head.shape)), layout, layout.batch_axes, layout.vocab_axis, None)
    f = features.reshape(s, -1, *features.shape[1:])
    t = targets.reshape(s, -1, targets.shape[1])
    nll = jax.vmap(per_sequence, spmd_axis_name=layout.batch_axes)(heads, f, t)
    return _unfold(nll.reshape(targets.shape), fold)


def packing_args(tokens, label: str, **values) -> dict[str, Array]:
    """The given (not `None`) per-position arrays for the model (`segment_ids`, `positions`),
    each checked to have the tokens' `(batch, seq)` shape; `label.format(name=...)` names one
    in errors."""
    given = {name: v for name, v in values.items() if v is not None}
    for name, value in given.items():
        if getattr(value, "shape", None) != tokens.shape:
            raise ShapeError(
                f"{label.format(name=name)} must have the tokens' shape {shape_str(tokens.shape)}; "
                f"got {shape_str(getattr(value, 'shape', ()))}."
            )
    return given


def _batch_vmap(fn):
    # eqzoo.sharding.batch_vmap: under a mesh the batch axis is pinned to the batch axes (data x fsdp x expert) (imported
    # here: eqzoo.sharding imports eqzoo.train).
    from ..sharding._activation import batch_vmap

    return batch_vmap(fn)


LM_LOSS_IMPLEMENTATIONS = ("fused", "chunked", "full")
"""The values of `lm_loss(..., implementation=...)`."""


def lm_loss(
    model,
    batch: dict[str, Array | np.ndarray],
    key: PRNGKey | None = None,
    *,
    implementation: str = "fused",
    chunk_size: int | None = None,
    per_layer: bool = False,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Next-token cross-entropy of an eqzoo language model on a batch.

    **Arguments:**

    - `model`: a [`eqzoo.models.GPT2`][] / [`eqzoo.models.Llama`][] /
      [`eqzoo.models.Mixtral`][] (or any model with `features(tokens)` and `head_weight()`).
    - `batch`: `{"tokens": (batch, seq) int, "targets": (batch, seq) int}` and optionally
      `"mask"`: (batch, seq) weights of positions that count. A negative target (Hugging
      Face's `-100`) does not count either, as if masked out; a target at or above the
      vocabulary size makes the loss NaN; for packed documents (what
      [`eqzoo.data.pack_documents`][] makes) `"segment_ids"` and `"positions"` (batch, seq)
      int, passed to the model so each document attends only to itself. With `"segment_ids"`
      and no `"mask"`, the padding (segment id 0) does not count.
    - `key`: unused (no dropout); accepted so this is a `loss_fn(model, batch, key)`.
    - `implementation`: how the output projection and the loss are computed; all three give the
      same loss and gradients (tested to 1e-5):
        - `"fused"` (default): [`eqzoo.train.fused_cross_entropy`][] — logits formed
          `chunk_size` positions at a time and turned into gradients in the same pass; the
          whole batch's float32 logits never exist, and no logits are recomputed.
        - `"chunked"`: logits formed chunk by chunk under `jax.checkpoint` and recomputed in
          the backward pass (one more matrix product than `"fused"`; supports forward-mode
          differentiation). Under a mesh each batch shard accumulates its own head gradient,
          summed once after the last chunk, as in `"fused"`.
        - `"full"`: `eqzoo.sharding.batch_vmap(model)(tokens)` then [`eqzoo.train.cross_entropy`][] on the whole
          batch's logits (the plain reference path).
    - `chunk_size`: positions per sequence in one chunk for `"fused"`/`"chunked"` (default:
      [`eqzoo.train.auto_chunk_size`][], under 512 MiB of float32 logits per chunk).
    - `per_layer`: also report each auxiliary statistic layer by layer (see below), to find the
      layer whose routing collapses; off by default, since it adds three scalar metrics per
      layer to every step's output and every log record (192 for a 64-layer model). Pass it
      to a train step with `functools.partial(lm_loss, per_layer=True)`. The loss and the
      averaged metrics are the same with it (bit for bit); a dense model adds nothing.

    The batch is vmapped with [`eqzoo.sharding.batch_vmap`][], so under a mesh the batch axis
    stays split over the batch axes (`data` x `fsdp` x `expert`) inside the model.

    A model with auxiliary losses (a mixture-of-experts [`eqzoo.models.Mixtral`][]: its
    `aux_loss_weights()` is not empty) is run through `features_and_aux`, and the loss is the
    mean next-token NLL plus each auxiliary loss (averaged over the batch's sequences) times
    its weight.

    **Returns:** `(loss, {"tokens": number of counted positions})`; with auxiliary losses the
    metrics also hold `"nll"` (the next-token loss alone) and each auxiliary loss by name
    (`"moe_load_balance"`, `"moe_z_loss"`), and statistics that carry no weight
    (`"moe_dropped"`, the fraction of expert assignments dropped for lack of capacity). With a
    `"mask"`, the router statistics count only the masked-in positions too (every position is
    still routed, and under `"capacity"` still takes expert slots).

    With `per_layer=True` the metrics also hold each statistic of each block as a scalar,
    `"<name>/layer_<i>"` (`"moe_dropped/layer_0"`, ...; `i` zero-padded to the width of the
    last index, `layer_07` in a 12-layer model, so the keys sort in layer order), weighted over
    the batch's sequences as the averages are: their mean over layers is the averaged metric
    (up to float rounding). The model's `features_and_aux` must then take `per_layer=True`
    and return `(num_layers,)` arrays, as eqzoo's models do.
    """
    tokens, targets, mask = _checked_lm_batch(model, batch, implementation, chunk_size, per_layer)
    packing = packing_args(tokens, "lm_loss: batch[{name!r}]", segment_ids=batch.get("segment_ids"), positions=batch.get("positions"))
    mask, targets = _counted_positions(targets, mask, packing)
    # Auxiliary losses (the router losses of mixture-of-experts layers): per sequence, averaged.
    aux_weights = model.aux_loss_weights() if hasattr(model, "aux_loss_weights") else {}
    feats, aux = None, {}
    if aux_weights:
        feats, aux = _features_and_aux(model, tokens, mask, packing, bool(per_layer))
    nll_mean = _mean_nll(model, implementation, chunk_size, feats, tokens, targets, mask, packing)
    count = jnp.sum(mask.astype(jnp.float32))
    if not aux_weights:
        return nll_mean, {"tokens": count}
    loss = nll_mean + sum(jnp.float32(w) * aux[name] for name, w in aux_weights.items())
    return loss, {"tokens": count, "nll": nll_mean, **aux}


def missing_batch_keys(batch, keys: Sequence[str], who: str) -> list[str]:
    """The `keys` the batch dict lacks, in order; `ConfigError` when the batch is not a mapping
    at all (a `(tokens, targets)` tuple, a bare array), which `in` would otherwise meet with an
    error about arrays' truth values."""
    if isinstance(batch, Mapping):
        return [k for k in keys if k not in batch]
    if isinstance(batch, tuple | list):
        got = f"a {type(batch).__name__} of {len(batch)} entries"
    elif hasattr(batch, "shape"):
        got = f"an array of shape {shape_str(batch.shape)}"
    else:
        got = f"a {type(batch).__name__}"
    example = ", ".join(f"{k!r}: ..." for k in keys)
    raise ConfigError(
        f"{who} takes the batch as a dict of arrays with the keys {list(keys)}; got {got}. Name its entries: "
        f"{{{example}}} (eqzoo's loaders yield such dicts)."
    )


def _checked_lm_batch(model, batch, implementation, chunk_size, per_layer):
    """`lm_loss`'s arguments checked before anything is traced: the batch's keys and shapes,
    the options, and that the model has what the implementation calls. **Returns:** the
    batch's tokens, targets and mask (`None` when it has none)."""
    missing = missing_batch_keys(batch, ("tokens", "targets"), "lm_loss")
    if missing:
        raise ConfigError(
            f"lm_loss needs batch['tokens'] and batch['targets'] (the next token at each position); the batch "
            f"has no {missing} (its keys: {sorted(batch)})."
        )
    tokens, targets = batch["tokens"], batch["targets"]
    if tokens.ndim != 2 or tokens.shape != targets.shape:
        raise ShapeError(
            f"lm_loss takes batch['tokens'] and batch['targets'] of one shape (batch, seq); got "
            f"{shape_str(tokens.shape)} and {shape_str(targets.shape)}."
        )
    if implementation not in LM_LOSS_IMPLEMENTATIONS:
        raise ConfigError(
            f"lm_loss implementation must be one of {LM_LOSS_IMPLEMENTATIONS}, got {implementation!r}."
        )
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    if as_flag(per_layer) is None:
        raise ConfigError(f"lm_loss: per_layer must be True or False, got {per_layer!r}.")
    mask = batch.get("mask")
    packing_args(tokens, "lm_loss: batch[{name!r}]", mask=mask)  # a mask of another shape would broadcast
    needs = ("__call__",) if implementation == "full" else ("features", "head_weight")
    if not all(hasattr(model, name) for name in needs):
        raise ConfigError(
            f"lm_loss(implementation={implementation!r}) needs a model with "
            f"{' and '.join(f'`{n}`' for n in needs)} (eqzoo's language models have them); "
            f"{type(model).__name__} has not"
            + (". Use implementation='full', which only calls model(tokens) -> (seq, vocab) logits."
               if implementation != "full" and callable(model) else ".")
        )
    return tokens, targets, mask


def _counted_positions(targets, mask, packing):
    """The weights of the positions that count, and the targets with the ignored ones read as
    class 0. Without a mask, packed rows' padding (segment id 0) does not count; a negative
    target (Hugging Face's -100) never does, and is read as class 0 rather than indexing the
    vocabulary from its end. The weights are never `None`: what follows reads them as they are."""
    if mask is None and "segment_ids" in packing:
        mask = packing["segment_ids"] != 0
    ignored = targets < 0
    mask = ~ignored if mask is None else jnp.where(ignored, jnp.zeros((), mask.dtype), mask)
    return mask, jnp.where(ignored, 0, targets)


def _features_and_aux(
    model, tokens, mask, packing, per_layer: bool
) -> tuple[Array, dict[str, Array]]:
    """The features of a model with auxiliary losses, and those losses and statistics as
    metrics: each sequence's over its counted positions, averaged over the sequences weighted
    by their number (and, with `per_layer`, each layer's too)."""
    _warn_untrained_routers(model)
    layers: dict[str, Array] = {}
    if per_layer:
        feats, aux, layers = _batch_vmap(_with_layers(model))(tokens, mask, **packing)
    else:
        feats, aux = _batch_vmap(model.features_and_aux)(tokens, mask, **packing)
    counted = jnp.sum(mask.astype(jnp.float32), axis=1)
    weight = jnp.maximum(jnp.sum(counted), 1.0)
    aux = {name: jnp.sum(v * counted) / weight for name, v in aux.items()}
    aux |= _layer_metrics(layers, counted, weight)
    return feats, aux


def _mean_nll(
    model, implementation: str, chunk_size, feats, tokens, targets, mask, packing
) -> Float[Array, ""]:
    """The mean next-token NLL over the counted positions, by `implementation`; `feats`: the
    features already computed along with the auxiliary losses, or `None` to run the model."""
    if implementation == "full":
        logits = _batch_vmap(model.logits)(feats) if feats is not None else _batch_vmap(model)(tokens, **packing)
        return cross_entropy(logits, targets, mask)
    head = model.head_weight()
    cap = getattr(model, "logit_softcap", None)
    if feats is None:
        feats = _batch_vmap(model.features)(tokens, **packing)
    w = mask.astype(jnp.float32)
    static = (implementation, chunk_size, cap)
    if (
        eager_mode((feats, head)) != "staged"
        and active_mesh() is None
        and all(v is None or isinstance(v, int | float | str) for v in static)
    ):
        # Called eagerly (a notebook's `lm_loss(model, batch)` or its `jax.grad`): the head's
        # chunk loop built a new scan body on every call, which JAX compiled again each time;
        # one jitted function compiles once per shape. Not inside `activation_sharding`: the
        # head reads that mesh while tracing, and jit's cache does not know of it.
        return _head_mean_nll_jit(feats, head, targets, w, *static)
    return _head_mean_nll(feats, head, targets, w, *static)


def _head_mean_nll(feats, head, targets, w, implementation, chunk_size, softcap):
    """`_mean_nll`'s head part for `"fused"`/`"chunked"`: the weighted mean NLL of `feats`."""
    if implementation == "fused":
        total = fused_cross_entropy(feats, head, targets, w, chunk_size=chunk_size, softcap=softcap)
    else:
        nll = _chunked_batch_nll(feats, head, targets, chunk_size, softcap)
        total = jnp.sum(nll * w)
    return total / jnp.maximum(jnp.sum(w), 1.0)


_head_mean_nll_jit = jax.jit(_head_mean_nll, static_argnums=(4, 5, 6))


def _with_layers(model):
    """`features_and_aux` of one sequence with its statistics both averaged over layers (the
    same computation as the default, so the averages stay bit-identical) and per layer."""
    params = inspect.signature(model.features_and_aux).parameters
    if "per_layer" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ConfigError(
            f"lm_loss(per_layer=True) needs the model's features_and_aux to take per_layer=True and return each "
            f"statistic per layer; {type(model).__name__}.features_and_aux has no per_layer argument. Add one "
            "(returning (num_layers,) arrays), or leave per_layer=False."
        )

    def run(*args, **kwargs):
        feats, per = model.features_and_aux(*args, per_layer=True, **kwargs)
        for name, v in per.items():
            if jnp.ndim(v) != 1:
                raise ShapeError(
                    f"lm_loss(per_layer=True): {type(model).__name__}.features_and_aux(..., per_layer=True) must "
                    f"return each statistic as a (num_layers,) array; got {name!r} of shape {shape_str(jnp.shape(v))}."
                )
        return feats, {name: jnp.mean(v) for name, v in per.items()}, per

    return run


def _layer_metrics(layers: dict[str, Array], counted, weight) -> dict[str, Array]:
    """`"<name>/layer_<i>"`: each `(batch, layers)` statistic weighted over the sequences by
    their `counted` positions, as the averaged metrics are."""
    out = {}
    for name, v in layers.items():
        per = jnp.sum(v * counted[:, None], axis=0) / weight  # (layers,)
        width = len(str(per.shape[0] - 1))
        out |= {f"{name}/layer_{i:0{width}d}": per[i] for i in range(per.shape[0])}
    return out


def _warn_untrained_routers(model) -> None:
    from ..nn import MoE  # here: eqzoo.nn imports eqzoo.sharding, which imports this module

    layers = [x for x in jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, MoE)) if isinstance(x, MoE)]
    if any(not layer.router_trains_from_loss() for layer in layers):
        warnings.warn(
            "lm_loss: this model's MoE layers route each token to one expert and renormalise its "
            "weight to 1, so the loss gives the routers no gradient; only the router losses "
            "train them. That is how such a checkpoint routes (keep it to match it); to train the "
            "routers from the loss, weight the expert by its probability "
            "(MixtralConfig(normalize_router_weights=False), nn.MoE(normalize_weights=False)) or "
            "route each token to 2 or more experts.",
            stacklevel=user_stacklevel(),
        )


def classification_loss(
    model, batch: dict[str, Array | np.ndarray], key: PRNGKey | None = None
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Softmax cross-entropy of a stateless classifier on `{"x": inputs, "y": labels}`.

    **Returns:** `(loss, {"accuracy": fraction correct})`.
    """
    missing = missing_batch_keys(batch, ("x", "y"), "classification_loss")
    if missing:
        raise ConfigError(
            f"classification_loss needs batch['x'] (the inputs) and batch['y'] (integer labels); the batch has no "
            f"{missing} (its keys: {sorted(batch)}). Rename the entries, e.g. {{'x': images, 'y': labels}}."
        )
    logits = _batch_vmap(model)(batch["x"])
    loss = cross_entropy(logits, batch["y"])
    acc = jnp.mean((jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32))
    return loss, {"accuracy": acc}


def tree_global_norm(tree: PyTree) -> Float[Array, ""]:
    """The L2 norm of all floating-point leaves of `tree` together, in float32."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
