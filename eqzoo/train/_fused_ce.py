"""Fused output projection + cross-entropy: the float32 logits of the whole batch never exist.

The language-model head (`features @ head.T`, with vocabularies of 32k-128k) and its
cross-entropy dominate a small model's activation memory: GPT-2 124M at batch 16 x 1024 has
3.3 GB of float32 logits. Here the sequence is cut into chunks; for each chunk the logits are
formed (bfloat16 inputs, float32 accumulation), reduced to the loss, and — because the loss is the
last operation of the forward pass — turned at once into the gradients with respect to the
features and the head. The backward pass only scales those by the incoming cotangent. Per chunk
that is three matrix products (logits, d_features, d_head), the same as the plain path and one
fewer than recomputing the logits under `jax.checkpoint`.

Under a mesh (inside `eqzoo.sharding.activation_sharding`, as `make_train_step(mesh=...)` sets
up), the batch rows are split over the batch axes (`data` x `fsdp` x `expert`) and each device keeps its
own partial head gradient, `(shards, vocab, embed)` with the first axis sharded, summed once
after the last chunk. Accumulated into one replicated `(vocab, embed)` array instead, it costs
an all-reduce of the whole head gradient per chunk; and the head is gathered over `fsdp` once,
before the loop, rather than contracted shard by shard with the logits all-reduced.
"""

import functools
import math
from typing import NamedTuple, no_type_check

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Integer

from .._errors import ConfigError, ShapeError, shape_str

# Upper bound on one chunk's float32 logits when the chunk size is chosen automatically.
_AUTO_CHUNK_BYTES = 512 * 2**20


def auto_chunk_size(batch: int, seq: int, vocab: int) -> int:
    """The chunk length (positions per sequence) used when `chunk_size=None`.

    The largest power of two (at most `seq`) whose float32 logits for `batch` sequences,
    `batch * chunk * vocab * 4` bytes, fit in 512 MiB; at least 1. Under a mesh,
    [`eqzoo.train.fused_cross_entropy`][] passes the batch one device holds.
    """
    rows = max(1, _AUTO_CHUNK_BYTES // (4 * vocab * max(batch, 1)))
    chunk = 1 << (rows.bit_length() - 1)
    return max(1, min(chunk, seq))


class _Layout(NamedTuple):
    """Where the rows live: the `mesh`, its axes that split the batch (`shards` pieces in all),
    and the axis the head's vocabulary is split over (`None`: whole on every device)."""

    mesh: jax.sharding.Mesh
    batch_axes: tuple[str, ...]
    shards: int
    vocab_axis: str | None


def _context_fold(seq: int) -> int:
    """Under context parallelism (the active mesh's `context` > 1, dividing `seq`), the number
    of pieces each sequence is split into; else 1."""
    from ..sharding._activation import active_mesh
    from ..sharding._mesh import context_size

    ctx = context_size(active_mesh())
    return ctx if ctx > 1 and seq % ctx == 0 else 1


def _fold(x, fold):
    # (batch, seq, ...) -> (fold * batch, seq / fold, ...), piece-major: with the sequence split
    # over `context`, piece i of every sequence is what context device i holds, so the new
    # leading axis is split over `context` then the batch axes, and no data moves.
    if fold == 1:
        return x
    b, s = x.shape[:2]
    pieces = jnp.swapaxes(x.reshape(b, fold, s // fold, *x.shape[2:]), 0, 1)
    return pieces.reshape(fold * b, s // fold, *x.shape[2:])


def _unfold(x, fold):
    # The inverse of `_fold`.
    if fold == 1:
        return x
    n, c = x.shape[:2]
    pieces = jnp.swapaxes(x.reshape(fold, n // fold, c, *x.shape[2:]), 0, 1)
    return pieces.reshape(n // fold, fold * c, *x.shape[2:])


def _layout(batch: int, vocab: int, context: bool = False) -> _Layout | None:
    # Read at trace time, like eqzoo.sharding.constrain (imported here: eqzoo.sharding imports
    # eqzoo.train). `context`: the rows were folded by `_fold`, so `context` splits them too.
    from ..sharding._activation import active_mesh, batch_axes

    mesh = active_mesh()
    if mesh is None:
        return None
    axes = (("context",) if context else ()) + batch_axes(mesh)
    shards = math.prod(mesh.shape[a] for a in axes)
    if shards == 1 or batch % shards:
        return None  # nothing to split, or a batch the mesh cannot split: XLA's own choice
    tensor = mesh.shape.get("tensor", 1)
    vocab_axis = "tensor" if tensor > 1 and vocab % tensor == 0 else None
    return _Layout(mesh, axes, shards, vocab_axis)


def _chunk(chunk_size: int | None, batch: int, seq: int, vocab: int, layout: _Layout | None) -> int:
    # The chunk length both chunked losses use: the given one, or auto_chunk_size of the rows
    # one device holds; never longer than the sequence.
    if chunk_size is None:
        chunk_size = auto_chunk_size(batch // (1 if layout is None else layout.shards), seq, vocab)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    return min(chunk_size, max(seq, 1))


def _constrain(x, layout, *spec):
    P = jax.sharding.PartitionSpec
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(layout.mesh, P(*spec)))


def _place_head(head, layout):
    # Vocab-parallel over `tensor` (eqzoo's default rules), whole along embed: gathered over
    # `fsdp` here, once, instead of inside every chunk.
    return head if layout is None else _constrain(head, layout, layout.vocab_axis, None)


def _rows(fc, layout):
    # (batch, chunk, embed) -> rows for the matrix products: (batch * chunk, embed), or under a
    # mesh (shards, batch * chunk / shards, embed) with the first axis over the batch axes.
    if layout is None:
        return fc.reshape(-1, fc.shape[-1])
    rows = fc.reshape(layout.shards, -1, fc.shape[-1])
    return _constrain(rows, layout, layout.batch_axes, None, None)


def _zero_total(layout):
    # The running sum of the loss: a scalar, or under a mesh one per batch shard (no all-reduce
    # of a scalar in every chunk).
    if layout is None:
        return jnp.zeros((), jnp.float32)
    return _constrain(jnp.zeros((layout.shards,), jnp.float32), layout, layout.batch_axes)


def _add_total(total, weighted_nll, layout):
    if layout is None:
        return total + jnp.sum(weighted_nll)
    return total + jnp.sum(weighted_nll.reshape(layout.shards, -1), axis=1)


def _chunks(x, n, c):
    # (batch, seq, ...) -> (n, batch, c, ...): the scan runs over chunks, each keeps the batch axis
    # (so a batch sharded over devices stays sharded inside every chunk).
    return jnp.swapaxes(x.reshape(x.shape[0], n, c, *x.shape[2:]), 0, 1)


def _unchunk(x, seq):
    n, b, c = x.shape[:3]
    return jnp.swapaxes(x, 0, 1).reshape(b, n * c, *x.shape[3:])[:, :seq]


def _pad(features, targets, weights, chunk):
    seq = features.shape[1]
    pad = (-seq) % chunk
    if pad:
        features = jnp.pad(features, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))  # padded positions weigh 0
    n = features.shape[1] // chunk
    return _chunks(features, n, chunk), _chunks(targets, n, chunk), _chunks(weights, n, chunk)


def _dot(a, b, dims):
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


# Contractions of rows (r, e) / (s, r, e), logits-shaped g (r, v) / (s, r, v) and the head (v, e),
# with the shard axis s as a batch dimension of the matrix product.
_LOGITS = {2: (((1,), (1,)), ((), ())), 3: (((2,), (1,)), ((), ()))}  # rows . head -> (.., r, v)
_D_ROWS = {2: (((1,), (0,)), ((), ())), 3: (((2,), (0,)), ((), ()))}  # g . head -> (.., r, e)
_D_HEAD = {2: (((0,), (0,)), ((), ())), 3: (((1,), (1,)), ((0,), (0,)))}  # g . rows -> (.., v, e)


def _logits(rows, head):
    return _dot(rows, head, _LOGITS[rows.ndim])


def _nll(logits, tc):
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    return lse, lse - target


def _cap(logits, softcap):
    """The soft-capped logits and `d capped / d logits` (`None` without a cap)."""
    if softcap is None:
        return logits, None
    t = jnp.tanh(logits / jnp.float32(softcap))
    return jnp.float32(softcap) * t, 1.0 - t * t


def _loss_only(features, head, targets, weights, chunk, layout, softcap):
    f, t, w = _pad(features, targets, weights, chunk)
    head = _place_head(head, layout)

    def body(total, xs):
        fc, tc, wc = xs
        logits, _ = _cap(_logits(_rows(fc, layout), head).reshape(*tc.shape, head.shape[0]), softcap)
        _, nll = _nll(logits, tc)
        return _add_total(total, nll * wc, layout), None

    total, _ = jax.lax.scan(body, _zero_total(layout), (f, t, w))
    return jnp.sum(total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(features, head, targets, weights, chunk, layout, softcap):
    return _loss_only(features, head, targets, weights, chunk, layout, softcap)


def _fused_fwd(features, head, targets, weights, chunk, layout, softcap):
    f, t, w = _pad(features, targets, weights, chunk)
    vocab = head.shape[0]
    head = _place_head(head, layout)

    def body(carry, xs):
        total, d_head = carry
        fc, tc, wc = xs
        rows = _rows(fc, layout)  # (batch * chunk, embed), or (shards, rows per shard, embed)
        logits = _logits(rows, head).reshape(*tc.shape, vocab)  # (batch, chunk, vocab) float32
        logits, d_cap = _cap(logits, softcap)
        # logsumexp and softmax from one pass of exp (jax.nn.logsumexp + exp would take two)
        top = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - top)
        total_e = jnp.sum(e, axis=-1, keepdims=True)
        lse = (top + jnp.log(total_e))[..., 0]
        nll = lse - jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        # d(sum w * nll) / d logits = w * (softmax - onehot(target))
        g = (e / total_e - jax.nn.one_hot(tc, vocab, dtype=jnp.float32)) * wc[..., None]
        if d_cap is not None:  # through the cap: d capped / d raw = 1 - tanh^2
            g = g * d_cap
        # the rows' shape: plain 2-d matrix products, or batched over the shards
        g = g.astype(fc.dtype).reshape(*rows.shape[:-1], vocab)
        d_fc = _dot(g, head, _D_ROWS[g.ndim]).astype(fc.dtype).reshape(fc.shape)
        d_head = d_head + _dot(g, rows, _D_HEAD[g.ndim])
        return (_add_total(total, nll * wc, layout), d_head), d_fc

    if layout is None:
        d_head0 = jnp.zeros(head.shape, jnp.float32)
    else:  # one partial sum per batch shard, each on the devices holding that shard's rows
        d_head0 = jnp.zeros((layout.shards, *head.shape), jnp.float32)
        d_head0 = _constrain(d_head0, layout, layout.batch_axes, layout.vocab_axis, None)
    (total, d_head), d_f = jax.lax.scan(body, (_zero_total(layout), d_head0), (f, t, w))
    # Each shard's sum is accumulated in float32 and cast to the head's dtype before the one
    # reduction over the batch axes, which then travels in that dtype (bf16 in mixed precision,
    # like every other weight gradient).
    d_head = d_head.astype(head.dtype)
    if layout is not None:  # lax.reduce: jnp.sum would sum (and so all-reduce) bf16 in float32
        total = jnp.sum(total)
        d_head = jax.lax.reduce(d_head, jnp.zeros((), d_head.dtype), jax.lax.add, (0,))
    d_features = _unchunk(d_f, features.shape[1])
    return total, (d_features, d_head, targets, weights)


def _fused_bwd(chunk, layout, softcap, residuals, cotangent):
    d_features, d_head, targets, weights = residuals
    scale_f = cotangent.astype(d_features.dtype)
    scale_h = cotangent.astype(d_head.dtype)
    # Targets are integers and the weights are treated as constants (masks): zero cotangents.
    return d_features * scale_f, d_head * scale_h, None, jnp.zeros_like(weights)


_fused.defvjp(_fused_fwd, _fused_bwd)


@no_type_check  # validated below with messages that name the fix
def fused_cross_entropy(
    features: Float[Array, "batch seq embed"],
    head: Float[Array, "vocab embed"],
    targets: Integer[Array, "batch seq"],
    weights: Float[Array, "batch seq"] | None = None,
    *,
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> Float[Array, ""]:
    """`sum(weights * nll)` of `targets` under `softmax(features @ head.T)`, chunk by chunk.

    Equal to `cross_entropy(features @ head.T, targets)` times the (weighted) number of
    positions, but only `batch x chunk_size` rows of float32 logits exist at any time, and the
    gradients with respect to `features` and `head` are formed in the same pass (reverse-mode
    differentiation only; `weights` are treated as constants).

    **Arguments:**

    - `features`: final hidden states, `(batch, seq, embed)`, usually bfloat16.
    - `head`: the output projection `(vocab, embed)` — the token embedding when tied. Cast to
      the features' dtype for the matrix products, which accumulate in float32.
    - `targets`: integer class ids `(batch, seq)`. A negative target (Hugging Face's `-100`)
      has weight 0, as in [`eqzoo.train.cross_entropy`][].
    - `weights`: optional per-position weights (a mask); default all ones.
    - `chunk_size`: positions per sequence in one chunk (default:
      [`eqzoo.train.auto_chunk_size`][] of the batch one device holds, which keeps a chunk's
      logits under 512 MiB per device).
    - `softcap`: if given, the logits are `softcap * tanh(logits / softcap)` (a model's
      `logit_softcap`, Gemma 2's `final_logit_softcapping`); the gradient goes through the cap.

    Inside [`eqzoo.sharding.activation_sharding`][] (which `make_train_step(mesh=...)` enters),
    the rows are kept split over the mesh's batch axes (`data` x `fsdp` x `expert`; with
    `context > 1` each device's piece of a sequence counts as a row of its own, so the chunks
    run inside every piece at once), the head is gathered over
    `fsdp` once (vocab-parallel over `tensor` when it divides the vocabulary), and each device
    accumulates its own partial head gradient (in float32), cast to the head's dtype and reduced
    once at the end rather than once per chunk.

    **Returns:** the float32 scalar `sum(weights * nll)`. Divide by `sum(weights)` for the mean.
    """
    if features.ndim != 3 or targets.shape != features.shape[:2]:
        raise ShapeError(
            f"fused_cross_entropy takes features (batch, seq, embed) and targets (batch, seq); got "
            f"{shape_str(features.shape)} and {shape_str(targets.shape)}."
        )
    if head.ndim != 2 or head.shape[1] != features.shape[2]:
        raise ShapeError(
            f"fused_cross_entropy: head must be (vocab, embed={features.shape[2]}); got {shape_str(head.shape)}."
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ShapeError(f"fused_cross_entropy: targets must be integer class ids; got dtype {targets.dtype}.")
    batch, seq = targets.shape
    if weights is None:
        weights = jnp.ones((batch, seq), jnp.float32)
    elif weights.shape != targets.shape:
        raise ShapeError(
            f"fused_cross_entropy: weights {shape_str(weights.shape)} must match targets {shape_str(targets.shape)}."
        )
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, int | float) or not softcap > 0):
        raise ConfigError(f"fused_cross_entropy: softcap must be a positive number or None, got {softcap!r}.")
    head = head.astype(features.dtype)
    cap = None if softcap is None else float(softcap)
    ignored = targets < 0  # read as class 0 with weight 0, rather than indexing from the end
    targets, weights = jnp.where(ignored, 0, targets), jnp.where(ignored, 0.0, weights.astype(jnp.float32))
    # Under context parallelism each device's piece of a sequence is a row of its own: chunks
    # are then cut inside every device's piece, and every device works on every chunk.
    fold = _context_fold(seq)
    features, targets, weights = _fold(features, fold), _fold(targets, fold), _fold(weights, fold)
    layout = _layout(batch * fold, head.shape[0], context=fold > 1)
    chunk_size = _chunk(chunk_size, batch * fold, seq // fold, head.shape[0], layout)
    return _fused(features, head, targets.astype(jnp.int32), weights.astype(jnp.float32), chunk_size, layout, cap)

