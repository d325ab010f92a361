"""Fused output projection + cross-entropy: the float32 logits of the whole batch never exist.

The language-model head (`features @ head.T`, with vocabularies of 32k-128k) and its
cross-entropy dominate a small model's activation memory: GPT-2 124M at batch 16 x 1024 has
3.3 GB of float32 logits. Here the sequence is cut into chunks; for each chunk the logits are
formed (bfloat16 inputs, float32 accumulation), reduced to the loss, and — because the loss is the
last operation of the forward pass — turned at once into the gradients with respect to the
features and the head. The backward pass only scales those by the incoming cotangent. Per chunk
that is three matrix products (logits, d_features, d_head), the same as the plain path and one
fewer than recomputing the logits under `jax.checkpoint`.
"""

import functools
from typing import no_type_check

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .._errors import ConfigError, ShapeError, shape_str

# Upper bound on one chunk's float32 logits when the chunk size is chosen automatically.
_AUTO_CHUNK_BYTES = 512 * 2**20


def auto_chunk_size(batch: int, seq: int, vocab: int) -> int:
    """The chunk length (positions per sequence) used when `chunk_size=None`.

    The largest power of two (at most `seq`) whose float32 logits for the whole batch,
    `batch * chunk * vocab * 4` bytes, fit in 512 MiB; at least 1.
    """
    rows = max(1, _AUTO_CHUNK_BYTES // (4 * vocab * max(batch, 1)))
    chunk = 1 << (rows.bit_length() - 1)
    return max(1, min(chunk, seq))


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


def _logits(fc, head):
    rows = fc.reshape(-1, fc.shape[-1])  # (batch * chunk, embed)
    logits = jnp.dot(rows, head.T, preferred_element_type=jnp.float32)
    return logits.reshape(*fc.shape[:-1], head.shape[0])


def _nll(logits, tc):
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    return lse, lse - target


def _loss_only(features, head, targets, weights, chunk):
    f, t, w = _pad(features, targets, weights, chunk)

    def body(total, xs):
        fc, tc, wc = xs
        _, nll = _nll(_logits(fc, head), tc)
        return total + jnp.sum(nll * wc), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (f, t, w))
    return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(features, head, targets, weights, chunk):
    return _loss_only(features, head, targets, weights, chunk)


def _fused_fwd(features, head, targets, weights, chunk):
    f, t, w = _pad(features, targets, weights, chunk)
    vocab = head.shape[0]

    def body(carry, xs):
        total, d_head = carry
        fc, tc, wc = xs
        logits = _logits(fc, head)  # (batch, chunk, vocab) float32
        # logsumexp and softmax from one pass of exp (jax.nn.logsumexp + exp would take two)
        top = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - top)
        total_e = jnp.sum(e, axis=-1, keepdims=True)
        lse = (top + jnp.log(total_e))[..., 0]
        nll = lse - jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        # d(sum w * nll) / d logits = w * (softmax - onehot(target))
        g = (e / total_e - jax.nn.one_hot(tc, vocab, dtype=jnp.float32)) * wc[..., None]
        # (batch * chunk) rows: plain 2-d matrix products
        g = g.astype(fc.dtype).reshape(-1, vocab)
        rows = fc.reshape(-1, fc.shape[-1])
        d_fc = jnp.dot(g, head, preferred_element_type=jnp.float32).astype(fc.dtype).reshape(fc.shape)
        d_head = d_head + jnp.dot(g.T, rows, preferred_element_type=jnp.float32)
        return (total + jnp.sum(nll * wc), d_head), d_fc

    init = (jnp.zeros((), jnp.float32), jnp.zeros(head.shape, jnp.float32))
    (total, d_head), d_f = jax.lax.scan(body, init, (f, t, w))
    d_features = _unchunk(d_f, features.shape[1])
    return total, (d_features, d_head.astype(head.dtype), targets, weights)


def _fused_bwd(chunk, residuals, cotangent):
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
    targets: Int[Array, "batch seq"],
    weights: Float[Array, "batch seq"] | None = None,
    *,
    chunk_size: int | None = None,
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
    - `targets`: integer class ids `(batch, seq)`.
    - `weights`: optional per-position weights (a mask); default all ones.
    - `chunk_size`: positions per sequence in one chunk (default:
      [`eqzoo.train.auto_chunk_size`][], which keeps a chunk's logits under 512 MiB).

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
    if chunk_size is None:
        chunk_size = auto_chunk_size(batch, seq, head.shape[0])
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    chunk_size = min(chunk_size, max(seq, 1))
    if weights is None:
        weights = jnp.ones((batch, seq), jnp.float32)
    elif weights.shape != targets.shape:
        raise ShapeError(
            f"fused_cross_entropy: weights {shape_str(weights.shape)} must match targets {shape_str(targets.shape)}."
        )
    head = head.astype(features.dtype)
    return _fused(features, head, targets.astype(jnp.int32), weights.astype(jnp.float32), chunk_size)

