"""Ring attention over the `context` mesh axis: each device keeps its query and key/value blocks
and passes the key/value blocks round the ring, combining them with an online softmax."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from ..sharding._activation import batch_axes
from ..sharding._mesh import CONTEXT_AXIS, context_size


def ring_attention(  # noqa: C901 (next: the load-balanced order rewrites this function)
    q, k, v, *, mesh: Mesh, causal: bool, window: int | None, windowed, segment_ids, scale, cap
):
    """Attention of one sequence split over `mesh`'s `context` axis, without gathering it.

    `q` `(seq, heads, head_dim)`, `k`, `v` `(seq, kv_heads, head_dim)` and `segment_ids` `(seq,)`
    (or `None`) are the whole sequence as the caller's program sees it; inside, device `i` of
    the `context` axis holds positions `[i * blk, (i + 1) * blk)` of each. In `context` steps it
    scores its queries against the key/value block it holds and hands that block to its ring
    neighbour (`jax.lax.ppermute`), keeping a float32 running max, sum and output per query row
    (the online softmax of Milakov & Gimelshein, 2018, as in Liu et al., 2023). The masks are
    built from global positions (the block's owner times `blk`), as `_xla_attention`'s caller
    builds them for the whole sequence: causal, Gemma 2's sliding `window` where `windowed` (a
    bool or a traced flag), and `segment_ids` (a query attends to keys of its own segment);
    `cap` soft-caps the scaled logits before the mask. Equal to the one-device attention up to
    the order of float32 sums.

    A block no query of this device may see (wholly in its future under the causal mask, or
    wholly before the window) skips its scores with `lax.cond`; the ring exchange still runs.

    Manual over `context` and the mesh's batch axes (the model is vmapped over the batch with
    `spmd_axis_name` set to them, [`eqzoo.sharding.batch_vmap`][], and shard_map's batching
    rule places the batch over those axes); `tensor` stays automatic (heads split by XLA).
    """
    ctx = context_size(mesh)
    seq, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    blk = seq // ctx
    scale = jnp.float32(head_dim**-0.5 if scale is None else scale)
    perm = [(i, (i + 1) % ctx) for i in range(ctx)]  # device i hands its block to i + 1
    has_seg = segment_ids is not None
    traced_flag = window is not None and not isinstance(windowed, bool)
    use_window = window is not None and windowed is not False

    def step(carry, kb, vb, kseg, src, qseg, me, flag, qb):
        # One key/value block (owned by device `src`) folded into the running softmax.
        m, total, o = carry  # (kv, g, blk) running max and sum (float32); (kv, g, blk, hd) output
        q_pos = me * blk + jnp.arange(blk, dtype=jnp.int32)
        k_pos = src * blk + jnp.arange(blk, dtype=jnp.int32)
        qg = qb.reshape(blk, kv_heads, group, head_dim)
        logits = jnp.einsum("tkgh,skh->kgts", qg, kb, preferred_element_type=jnp.float32) * scale
        if cap is not None:
            c = jnp.float32(cap)
            logits = c * jnp.tanh(logits / c)
        mask = jnp.ones((blk, blk), bool)
        if causal:
            mask = k_pos[None, :] <= q_pos[:, None]
        if use_window:
            band = k_pos[None, :] > q_pos[:, None] - window
            mask = mask & (band | ~flag if traced_flag else band)
        if has_seg:
            mask = mask & (qseg[:, None] == kseg[None, :])
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        p = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)  # (kv, g, blk, blk)
        alpha = jnp.exp(m - m_new)
        total = total * alpha + jnp.sum(p, axis=-1)
        pv = jnp.einsum("kgts,skh->kgth", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return m_new, total, o * alpha[..., None] + pv

    # The backward pass recomputes each step's scores from its inputs instead of storing every
    # step's (kv, g, blk, blk) block.
    step = jax.checkpoint(step)

    def live(src, me, flag):
        # Whether any (query, key) pair of blocks (me, src) can be unmasked by position alone.
        ok = jnp.asarray(True)
        if causal:
            ok = src <= me
        if use_window:
            # the block's last key is within the window of the block's first query
            near = src * blk + blk - 1 > me * blk - window
            ok = ok & (near | ~flag if traced_flag else near)
        return ok

    def body(qb, kb, vb, *rest):
        rest = list(rest)
        seg = rest.pop(0) if has_seg else None
        flag = rest.pop(0) if traced_flag else True
        me = jax.lax.axis_index(CONTEXT_AXIS)
        shape = (kv_heads, group, blk)
        carry = (
            jnp.full(shape, jnp.finfo(jnp.float32).min, jnp.float32),
            jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32),
        )
        kseg = seg
        for t in range(ctx):
            src = jnp.mod(me - t, ctx)
            if t < ctx - 1:  # start the next exchange before this block's scores
                nxt = [jax.lax.ppermute(a, CONTEXT_AXIS, perm) for a in (kb, vb) + ((kseg,) if has_seg else ())]
            args = (kb, vb, kseg, src, seg, me, flag, qb)
            if t == 0 or not (causal or use_window):
                carry = step(carry, *args)
            else:
                carry = jax.lax.cond(
                    live(src, me, flag), lambda c, a=args: step(c, *a), lambda c: c, carry
                )
            if t < ctx - 1:
                kb, vb = nxt[0], nxt[1]
                kseg = nxt[2] if has_seg else None
        _, total, o = carry
        out = o / total[..., None]  # every query sees at least itself: total > 0
        return out.transpose(2, 0, 1, 3).reshape(blk, heads, head_dim).astype(qb.dtype)

    split = P(CONTEXT_AXIS)
    args = [q, k, v]
    specs = [split, split, split]
    if has_seg:
        args.append(segment_ids)
        specs.append(split)
    if traced_flag:
        args.append(jnp.asarray(windowed))
        specs.append(P())
    return jax.shard_map(
        body, mesh=mesh, in_specs=tuple(specs), out_specs=split,
        axis_names={CONTEXT_AXIS, *batch_axes(mesh)}, check_vma=False,
    )(*args)
