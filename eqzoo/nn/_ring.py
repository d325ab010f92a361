"""Ring attention over the `context` mesh axis: each device keeps its query and key/value blocks
and passes the key/value blocks round the ring, combining them with an online softmax. In the
load-balanced order each device holds an early and a late chunk of the sequence instead of one
contiguous block, so that causal attention gives every device the same work at every step."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from ..sharding._activation import batch_axes
from ..sharding._mesh import CONTEXT_AXIS, context_size


def _zigzag_perms(ctx: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    # Contiguously, device i holds chunks 2i (first half) and 2i + 1 (second half) of 2 ctx;
    # chunk m < ctx belongs on device m, chunk m >= ctx on device 2 ctx - 1 - m. The first halves
    # go to distinct devices (even chunks below ctx to even devices, those above to odd ones),
    # and so do the second halves: two permutations. An even device receives its early chunk
    # from the first, an odd device from the second.
    def owner(m):
        return m if m < ctx else 2 * ctx - 1 - m

    return [(i, owner(2 * i)) for i in range(ctx)], [(i, owner(2 * i + 1)) for i in range(ctx)]


def ring_attention(
    q, k, v, *, mesh: Mesh, causal: bool, window: int | None, windowed, segment_ids, scale, cap,
    balanced: bool = False,
):
    """Attention of one sequence split over `mesh`'s `context` axis, without gathering it.

    `q` `(seq, heads, head_dim)`, `k`, `v` `(seq, kv_heads, head_dim)` and `segment_ids` `(seq,)`
    (or `None`) are the whole sequence as the caller's program sees it; inside, device `i` of
    the `context` axis holds positions `[i * blk, (i + 1) * blk)` of each. In `context` steps it
    scores its queries against the key/value block it holds and hands that block to its ring
    neighbour (`jax.lax.ppermute`), keeping a float32 running max, sum and output per query row
    (the online softmax of Milakov & Gimelshein, 2018, as in Liu et al., 2023). The masks are
    built from global positions, as `_xla_attention`'s caller builds them for the whole
    sequence: causal, Gemma 2's sliding `window` where `windowed` (a bool or a traced flag), and
    `segment_ids` (a query attends to keys of its own segment); `cap` soft-caps the scaled logits
    before the mask. Equal to the one-device attention up to the order of float32 sums.

    A block no query of this device may see (wholly in its future under the causal mask, or
    wholly before the window) skips its scores with `lax.cond`; the ring exchange still runs.

    `balanced` (with `causal`): the load-balanced ("zigzag") order. The sequence is cut into
    `2 * context` chunks of `blk / 2` and, on entry, two `ppermute`s of half-blocks move them so
    that device `i` holds chunk `i` (early) and chunk `2 * context - 1 - i` (late) of q, k, v
    and `segment_ids`; the output's halves go back the same way on exit. The first step scores
    three of the four (query chunk, key chunk) pairs (early queries against late keys are in
    their future); at every later step the keys come from a device `src != i` and exactly two
    pairs can be unmasked: both query chunks against `src`'s early chunk when `src < i`, this
    device's late chunk against both of `src`'s when `src > i`. So every device has the same
    work at every step, where in the contiguous order the last device scores a whole block at
    every step while the others wait for it.

    Manual over `context` and the mesh's batch axes (the model is vmapped over the batch with
    `spmd_axis_name` set to them, [`eqzoo.sharding.batch_vmap`][], and shard_map's batching
    rule places the batch over those axes); `tensor` stays automatic (heads split by XLA).
    """
    ring = _Ring(
        ctx=context_size(mesh), shape=q.shape, kv_heads=k.shape[1], causal=causal, window=window,
        windowed=windowed, has_seg=segment_ids is not None, scale=scale, cap=cap, balanced=balanced,
    )
    split = P(CONTEXT_AXIS)
    args = [q, k, v]
    specs = [split, split, split]
    if ring.has_seg:
        args.append(segment_ids)
        specs.append(split)
    if ring.traced_flag:
        args.append(jnp.asarray(windowed))
        specs.append(P())
    return jax.shard_map(
        ring.body, mesh=mesh, in_specs=tuple(specs), out_specs=split,
        axis_names={CONTEXT_AXIS, *batch_axes(mesh)}, check_vma=False,
    )(*args)


class _Ring:
    """The static shape of one ring-attention call (sizes, which masks apply, the order) and the
    per-device program `body` that `jax.shard_map` runs; see `ring_attention`."""

    def __init__(self, *, ctx, shape, kv_heads, causal, window, windowed, has_seg, scale, cap, balanced):
        seq, self.heads, self.head_dim = shape
        self.ctx, self.kv_heads = ctx, kv_heads
        self.group = self.heads // kv_heads
        self.blk = seq // ctx
        self.half = self.blk // 2
        self.causal, self.window, self.has_seg, self.cap = causal, window, has_seg, cap
        self.balanced = balanced and causal  # without the causal mask every device has the same work
        self.scale = jnp.float32(self.head_dim**-0.5 if scale is None else scale)
        self.perm = [(i, (i + 1) % ctx) for i in range(ctx)]  # device i hands its block to i + 1
        self.traced_flag = window is not None and not isinstance(windowed, bool)
        self.use_window = window is not None and windowed is not False
        if self.balanced:
            self.firsts, self.seconds = _zigzag_perms(ctx)
        # The backward pass recomputes each step's scores from its inputs instead of storing
        # every step's score block.
        self.step = jax.checkpoint(self._step)

    def _mask(self, q_pos, k_pos, qseg, kseg, flag):
        """Which (query, key) pairs attend, from their global positions: causal, the window,
        the segments."""
        mask = jnp.ones((q_pos.shape[0], k_pos.shape[0]), bool)
        if self.causal:
            mask = k_pos[None, :] <= q_pos[:, None]
        if self.use_window:
            band = k_pos[None, :] > q_pos[:, None] - self.window
            mask = mask & (band | ~flag if self.traced_flag else band)
        if self.has_seg:
            mask = mask & (qseg[:, None] == kseg[None, :])
        return mask

    def _step(self, carry, qb, q_pos, kb, vb, k_pos, qseg, kseg, flag):
        """Query rows at global positions `q_pos` against keys at `k_pos`, folded into their
        running softmax: `carry` is the (kv, g, rows) running max and sum (float32) and the
        (kv, g, rows, head_dim) output."""
        m, total, o = carry
        rows = qb.shape[0]
        qg = qb.reshape(rows, self.kv_heads, self.group, self.head_dim)
        logits = jnp.einsum("tkgh,skh->kgts", qg, kb, preferred_element_type=jnp.float32) * self.scale
        if self.cap is not None:
            c = jnp.float32(self.cap)
            logits = c * jnp.tanh(logits / c)
        mask = self._mask(q_pos, k_pos, qseg, kseg, flag)
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        p = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)  # (kv, g, rows, keys)
        alpha = jnp.exp(m - m_new)
        total = total * alpha + jnp.sum(p, axis=-1)
        pv = jnp.einsum("kgts,skh->kgth", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return m_new, total, o * alpha[..., None] + pv

    def _near(self, k_last, q_first, flag):
        """Whether the last key is within the window of the first query (always, off the window)."""
        ok = k_last > q_first - self.window
        return ok | ~flag if self.traced_flag else ok

    def fold_contiguous(self, carry, t, me, src, qb, seg, kb, vb, kseg, flag):
        """The block of `src` against this device's block; skipped when no query may see it."""
        blk = self.blk
        ar = jnp.arange(blk, dtype=jnp.int32)
        args = (qb, me * blk + ar, kb, vb, src * blk + ar, seg, kseg, flag)
        if t == 0 or not (self.causal or self.use_window):
            return self.step(carry, *args)
        live = jnp.asarray(True)
        if self.causal:
            live = src <= me
        if self.use_window:
            live = live & self._near(src * blk + blk - 1, me * blk, flag)
        return jax.lax.cond(live, lambda c: self.step(c, *args), lambda c: c, carry)

    def fold_balanced(self, carry, t, me, src, qb, seg, kb, vb, kseg, flag):
        """`src`'s (early, late) chunks against this device's (early, late) chunks: three pairs
        at the first step, then the two `src < me` or `src > me` leaves unmasked."""
        half, blk, ctx = self.half, self.blk, self.ctx
        ar = jnp.arange(half, dtype=jnp.int32)

        def positions(device):  # (blk,) global positions of the device's early and late chunk
            return jnp.concatenate([device * half + ar, (2 * ctx - 1 - device) * half + ar])

        q_pos, k_pos = positions(me), positions(src)
        early, late, everything = slice(0, half), slice(half, blk), slice(0, blk)

        def pair(c, rows, keys):  # the query rows `rows` against the keys `keys`
            sub = tuple(x[:, :, rows] for x in c)
            new = self.step(
                sub, qb[rows], q_pos[rows], kb[keys], vb[keys], k_pos[keys],
                seg[rows] if self.has_seg else None, kseg[keys] if self.has_seg else None, flag,
            )
            if rows == everything:
                return new
            return tuple(jnp.concatenate([x[:, :, :half], y], axis=2) for x, y in zip(c, new, strict=True))

        if t == 0:  # early keys for every query, then the late keys for the late queries
            return pair(pair(carry, everything, early), late, late)
        branches = [
            lambda c: pair(c, everything, early),  # src < me: src's early chunk precedes both of mine
            lambda c: pair(c, late, everything),  # src > me: both of src's precede my late chunk
        ]
        index = jnp.where(src < me, 0, 1)
        if self.use_window:  # neither: the pair's keys are wholly before the window
            live = jnp.where(
                src < me, self._near(src * half + half - 1, me * half, flag),
                self._near((2 * ctx - src) * half - 1, (2 * ctx - 1 - me) * half, flag),
            )
            index = jnp.where(live, index, 2)
            branches.append(lambda c: c)
        return jax.lax.switch(index, branches, carry)

    def to_zigzag(self, x, even):
        """This device's contiguous block -> its (early, late) chunks."""
        half = self.half
        a = jax.lax.ppermute(x[:half], CONTEXT_AXIS, self.firsts)
        b = jax.lax.ppermute(x[half:], CONTEXT_AXIS, self.seconds)
        return jnp.concatenate([jnp.where(even, a, b), jnp.where(even, b, a)])

    def from_zigzag(self, x, even):
        """This device's (early, late) output chunks -> its contiguous block."""
        half = self.half
        a, b = jnp.where(even, x[:half], x[half:]), jnp.where(even, x[half:], x[:half])
        a = jax.lax.ppermute(a, CONTEXT_AXIS, [(d, s) for s, d in self.firsts])
        b = jax.lax.ppermute(b, CONTEXT_AXIS, [(d, s) for s, d in self.seconds])
        return jnp.concatenate([a, b])

    def body(self, qb, kb, vb, *rest):
        """One device's program: its query block against every key/value block as they pass."""
        rest = list(rest)
        seg = rest.pop(0) if self.has_seg else None
        flag = rest.pop(0) if self.traced_flag else True
        me = jax.lax.axis_index(CONTEXT_AXIS)
        even = me % 2 == 0
        if self.balanced:
            qb, kb, vb = (self.to_zigzag(x, even) for x in (qb, kb, vb))
            seg = self.to_zigzag(seg, even) if self.has_seg else None
        shape = (self.kv_heads, self.group, self.blk)
        carry = (
            jnp.full(shape, jnp.finfo(jnp.float32).min, jnp.float32),
            jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, self.head_dim), jnp.float32),
        )
        fold = self.fold_balanced if self.balanced else self.fold_contiguous
        kseg = seg
        for t in range(self.ctx):
            src = jnp.mod(me - t, self.ctx)
            if t < self.ctx - 1:  # start the next exchange before this block's scores
                nxt = [jax.lax.ppermute(a, CONTEXT_AXIS, self.perm) for a in (kb, vb) + ((kseg,) if self.has_seg else ())]
            carry = fold(carry, t, me, src, qb, seg, kb, vb, kseg, flag)
            if t < self.ctx - 1:
                kb, vb = nxt[0], nxt[1]
                kseg = nxt[2] if self.has_seg else None
        _, total, o = carry
        out = o / total[..., None]  # every query sees at least itself: total > 0
        out = out.transpose(2, 0, 1, 3).reshape(self.blk, self.heads, self.head_dim).astype(qb.dtype)
        return self.from_zigzag(out, even) if self.balanced else out
