"""Ring attention over the `context` mesh axis: each device keeps its query and key/value blocks
and passes the key/value blocks round the ring, combining them with an online softmax. In the
load-balanced order each device holds an early and a late chunk of the sequence instead of one
contiguous block, so that causal attention gives every device the same work at every step."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from ..sharding._activation import batch_axes
from ..sharding._mesh import CONTEXT_AXIS, context_size

_TILE = 512
"""Query rows (and keys) a ring step scores at once. A step over more rows splits them into
equal tiles (the largest size above `_TILE / 2` and at most `_TILE` that divides them) scored one
after another, and a visiting block of more keys is folded in key tiles cut the same way, so that
a step's float32 scores and the arrays made from them are `(heads, tile, key tile)`, not
`(heads, blk, blk)`. Where no such size divides the rows (twice a prime, say), the rows are
padded to the next multiple of `ceil(rows / ceil(rows / _TILE))`, fewer than one padded row per
tile, and the padded rows (or keys) are masked out. Blocks up to `_TILE` rows (sequences up to
`_TILE * context` positions) score in one tile, as before tiling. Private: the tests lower it to
put tile edges inside small blocks."""


def _tiling(rows: int, tile: int) -> tuple[int, int]:
    """`(n, padded)`: `rows` split into `n` equal tiles of at most `tile` rows (more than `tile / 2`
    when `n > 1`), after padding them to `padded` rows. `(1, rows)` when the rows fit one tile;
    no padding when a size above `tile / 2` divides them."""
    if rows <= tile:
        return 1, rows
    for size in range(tile, tile // 2, -1):
        if rows % size == 0:
            return rows // size, rows
    n = -(-rows // tile)
    return n, n * -(-rows // n)


def _pad(x, extra: int, axis: int, value=None):
    """`x` with `extra` rows added at the end of axis `axis`: `value`, or copies of the last row."""
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, mode="edge") if value is None else jnp.pad(x, widths, constant_values=value)


def _split(x, n: int, axis: int):
    """`x` with its axis `axis` cut into `n` equal tiles, stacked on a new leading axis."""
    shape = x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _join(x, axis: int):
    """The inverse of `_split`: the leading tile axis put back in place along `axis`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])


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

    A step over more than `_TILE` (512) query rows scores them in equal tiles, one after another
    (as FlashAttention, Dao et al., 2022, tiles its rows), and a tile meets more than `_TILE`
    visiting keys in key tiles (an online softmax inside the step; the backward pass sums dq
    over them), so that a step's float32 scores are `(heads, tile, key tile)` whatever the
    block. A row tile wholly past the window of the block's keys is skipped as a block is (key
    tiles are not). Blocks of up to `_TILE` rows score in one tile. Rows or keys that no size
    from `_TILE / 2 + 1` to `_TILE` divides (twice a prime, say) are padded to equal tiles of at
    most `_TILE` (fewer padded rows than tiles): padded rows are dropped from the forward's
    output and have zero probabilities in the backward pass, so they add nothing to any
    gradient; padded keys are masked out.

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

    The backward pass is the ring's own (`jax.custom_vjp`, as in Liu et al., 2023, with the
    log-sum-exp recomputation of FlashAttention, Dao et al., 2022): the forward pass saves q,
    the device's own k/v block, the output and each row's float32 log-sum-exp, not the blocks
    it received. The backward pass passes the key/value blocks round again, recomputes each
    step's scores (same masks, skips and cap), keeps the queries' gradient, and sends each
    block's key/value gradient with it, one step further at the end so that it arrives home.
    Reverse mode only: `jax.jvp` through it raises JAX's `custom_vjp` error (use
    `context_attention="gather"` for forward mode); forward over reverse (a `jax.jvp` of a
    gradient, for Hessian-vector products) differentiates the two passes themselves and runs.

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


class _Queries(NamedTuple):
    """One device's query rows in the backward pass: the queries, their global positions and
    segment ids, the output's cotangent `do` (like `q`), and per row the forward's float32
    log-sum-exp `lse` and `delta = sum(do * out)`, both `(kv_heads, group, rows)`."""

    q: Any
    pos: Any
    seg: Any
    do: Any
    lse: Any
    delta: Any

    def rows(self, part):
        """The rows `part` (a slice of the block) of each."""
        return _Queries(
            self.q[part], self.pos[part], None if self.seg is None else self.seg[part],
            self.do[part], self.lse[:, :, part], self.delta[:, :, part],
        )

    def pad(self, extra):
        """`extra` rows added that contribute nothing to a gradient: zero queries and cotangents,
        zero `delta` and an infinite log-sum-exp (so their probabilities are exactly 0), and the
        last row's position and segment (so a tile's window test is unchanged)."""
        return _Queries(
            _pad(self.q, extra, 0, 0), _pad(self.pos, extra, 0), None if self.seg is None else _pad(self.seg, extra, 0),
            _pad(self.do, extra, 0, 0), _pad(self.lse, extra, 2, jnp.inf), _pad(self.delta, extra, 2, 0),
        )

    def tiles(self, n):
        """Each cut into `n` tiles of rows, stacked on a leading axis (for `lax.scan`)."""
        return _Queries(
            _split(self.q, n, 0), _split(self.pos, n, 0), None if self.seg is None else _split(self.seg, n, 0),
            _split(self.do, n, 0), _split(self.lse, n, 2), _split(self.delta, n, 2),
        )


class _Keys(NamedTuple):
    """A key/value block visiting in the backward pass: keys, values, their global positions and
    segment ids."""

    k: Any
    v: Any
    pos: Any
    seg: Any

    def rows(self, part):
        """The keys `part` (a slice of the block) of each."""
        return _Keys(self.k[part], self.v[part], self.pos[part], None if self.seg is None else self.seg[part])


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
        # A Python float: an array made here would be a tracer of the caller's trace (a scanned
        # layer's), which the custom VJP's backward, traced later, must not close over.
        self.scale = float(self.head_dim**-0.5 if scale is None else scale)
        self.perm = [(i, (i + 1) % ctx) for i in range(ctx)]  # device i hands its block to i + 1
        self.tile = _TILE
        self.traced_flag = window is not None and not isinstance(windowed, bool)
        self.use_window = window is not None and windowed is not False
        if self.balanced:
            self.firsts, self.seconds = _zigzag_perms(ctx)
        # The static values (sizes, masks, order) live on this object, which the custom VJP
        # closes over; its array arguments are q, k, v, the segment ids and the traced flag.
        self.attend = jax.custom_vjp(self._attend)
        self.attend.defvjp(self._attend_fwd, self._attend_bwd)

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

    def _scores(self, qb, q_pos, kb, k_pos, qseg, kseg, flag, valid=None):
        """The (kv, g, rows, keys) float32 scaled and soft-capped logits (unmasked) of the query
        rows against the keys, and the (rows, keys) mask; `valid` (keys,) masks padded keys."""
        rows = qb.shape[0]
        qg = qb.reshape(rows, self.kv_heads, self.group, self.head_dim)
        logits = jnp.einsum("tkgh,skh->kgts", qg, kb, preferred_element_type=jnp.float32) * jnp.float32(self.scale)
        if self.cap is not None:
            c = jnp.float32(self.cap)
            logits = c * jnp.tanh(logits / c)
        mask = self._mask(q_pos, k_pos, qseg, kseg, flag)
        return logits, mask if valid is None else mask & valid[None, :]

    def tile_live(self, q_pos, k_pos, flag):
        """Whether any query of a tile at `q_pos` may see a key at `k_pos` under the window: not
        when the last key is before the first query's window. (The causal mask never hides a
        whole tile of query rows: a step's keys are all in their past, or it is the diagonal.)"""
        return self._near(jnp.max(k_pos), jnp.min(q_pos), flag)

    def step(self, carry, qb, q_pos, kb, vb, k_pos, qseg, kseg, flag):
        """Query rows at global positions `q_pos` against keys at `k_pos`, folded into their
        running softmax: `carry` is the (kv, g, rows) running max and sum (float32) and the
        (kv, g, rows, head_dim) output. More rows than a tile are scored tile by tile
        (`lax.map`), each tile's rows against all the keys, into its part of the carry; rows that
        no tile size divides are padded first (`_tiling`), and the padded rows' carry dropped."""
        rows = qb.shape[0]
        n, padded = _tiling(rows, self.tile)
        if n == 1:
            return self.step_tile(carry, qb, q_pos, kb, vb, k_pos, qseg, kseg, flag)
        extra = padded - rows  # padded rows: zero queries, the last row's position and segment
        carry = tuple(_pad(x, extra, 2, 0) for x in carry)
        qb, q_pos = _pad(qb, extra, 0, 0), _pad(q_pos, extra, 0)
        qseg = None if qseg is None else _pad(qseg, extra, 0)

        def one(tile):  # one tile's rows: their (max, sum, output) carry, q, positions, segments
            c, qt, pt, st = tile

            def score(c):
                return self.step_tile(c, qt, pt, kb, vb, k_pos, st, kseg, flag)

            return jax.lax.cond(self.tile_live(pt, k_pos, flag), score, lambda c: c, c) if self.use_window else score(c)

        tiles = (tuple(_split(x, n, 2) for x in carry), _split(qb, n, 0), _split(q_pos, n, 0), None if qseg is None else _split(qseg, n, 0))
        return tuple(_join(x, 2)[:, :, :rows] for x in jax.lax.map(one, tiles))

    def key_tiles(self, k_pos, kseg, *values):
        """`(n, tiles)`: the keys cut into `n` tiles as `_tiling` cuts rows, for `lax.scan`:
        positions, segments (or None), a (keys,) validity (None without padding) and each of
        `values` (zeros where padded)."""
        keys = k_pos.shape[0]
        n, padded = _tiling(keys, self.tile)
        extra = padded - keys
        valid = None if extra == 0 else _pad(jnp.ones((keys,), bool), extra, 0, False)
        cut = [_pad(k_pos, extra, 0), None if kseg is None else _pad(kseg, extra, 0), valid]
        cut += [_pad(x, extra, 0, 0) for x in values]
        return n, tuple(None if x is None else _split(x, n, 0) for x in cut)

    def step_tile(self, carry, qb, q_pos, kb, vb, k_pos, qseg, kseg, flag):
        """`step` for rows scored at once. More keys than a tile are folded in tile by tile
        (`lax.scan`, the online softmax over key tiles; padded keys masked out), so that the
        float32 scores are `(kv, g, rows, key tile)`. No key tile is skipped (the diagonal step's
        future tiles could be; with the masks built in the loop, `device`, a `lax.cond` here
        costs no memory, but it would save arithmetic on one step in `context`)."""
        n, tiles = self.key_tiles(k_pos, kseg, kb, vb)
        if n == 1:
            return self.fold_keys(carry, qb, q_pos, kb, vb, k_pos, qseg, kseg, flag)

        def one(c, tile):
            kp, ks, valid, kt, vt = tile
            return self.fold_keys(c, qb, q_pos, kt, vt, kp, qseg, ks, flag, valid), None

        return jax.lax.scan(one, carry, tiles)[0]

    def fold_keys(self, carry, qb, q_pos, kb, vb, k_pos, qseg, kseg, flag, valid=None):
        """The rows against the keys scored at once: the (kv, g, rows, keys) float32 scores live
        here."""
        m, total, o = carry
        logits, mask = self._scores(qb, q_pos, kb, k_pos, qseg, kseg, flag, valid)
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        p = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)  # (kv, g, rows, keys)
        alpha = jnp.exp(m - m_new)
        total = total * alpha + jnp.sum(p, axis=-1)
        pv = jnp.einsum("kgts,skh->kgth", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return m_new, total, o * alpha[..., None] + pv

    def grad_step(self, qs: _Queries, ks: _Keys, flag):
        """The gradient of the query rows `qs` against the keys `ks`, from the scores recomputed
        and the forward's log-sum-exp: float32 dq `(rows, kv, g, head_dim)`, dk and dv
        `(keys, kv, head_dim)` (summed over the query heads that share a key/value head). More
        rows than a tile are scored tile by tile (`lax.scan`): dq per tile, dk and dv summed
        over the tiles. Rows that no tile size divides are padded first with rows whose
        probabilities are 0 (`_Queries.pad`), and their dq dropped."""
        rows = qs.q.shape[0]
        n, padded = _tiling(rows, self.tile)
        if n == 1:
            return self.grad_tile(qs, ks, flag)
        qs = qs.pad(padded - rows)
        zero = jnp.zeros((ks.k.shape[0], self.kv_heads, self.head_dim), jnp.float32)

        def one(acc, qt):
            if self.use_window:
                zq = jnp.zeros((qt.q.shape[0], self.kv_heads, self.group, self.head_dim), jnp.float32)
                live = self.tile_live(qt.pos, ks.pos, flag)
                dq, dk, dv = jax.lax.cond(live, lambda: self.grad_tile(qt, ks, flag), lambda: (zq, zero, zero))
            else:
                dq, dk, dv = self.grad_tile(qt, ks, flag)
            return (acc[0] + dk, acc[1] + dv), dq

        (dk, dv), dq = jax.lax.scan(one, (zero, zero), qs.tiles(n))
        return _join(dq, 0)[:rows], dk, dv

    def grad_tile(self, qs: _Queries, ks: _Keys, flag):
        """`grad_step` for rows scored at once. More keys than a tile are scored tile by tile
        (`lax.scan`, as in `step_tile`): dq summed over the key tiles, dk and dv per key tile."""
        n, tiles = self.key_tiles(ks.pos, ks.seg, ks.k, ks.v)
        if n == 1:
            return self.grad_keys(qs, ks, flag)
        rows, keys = qs.q.shape[0], ks.k.shape[0]
        zq = jnp.zeros((rows, self.kv_heads, self.group, self.head_dim), jnp.float32)

        def one(dq, tile):  # no key tile skipped, as in `step_tile`
            kp, kseg, valid, kt, vt = tile
            dq_t, dk, dv = self.grad_keys(qs, _Keys(kt, vt, kp, kseg), flag, valid)
            return dq + dq_t, (dk, dv)

        dq, (dk, dv) = jax.lax.scan(one, zq, tiles)
        return dq, _join(dk, 0)[:keys], _join(dv, 0)[:keys]

    def grad_keys(self, qs: _Queries, ks: _Keys, flag, valid=None):
        """The gradient of rows against keys scored at once: the (kv, g, rows, keys) float32
        scores, probabilities and their gradients live here."""
        logits, mask = self._scores(qs.q, qs.pos, ks.k, ks.pos, qs.seg, ks.seg, flag, valid)
        p = jnp.where(mask, jnp.exp(logits - qs.lse[..., None]), 0.0)  # the probabilities (kv, g, rows, keys)
        rows = qs.q.shape[0]
        do = qs.do.reshape(rows, self.kv_heads, self.group, self.head_dim)
        dv = jnp.einsum("kgts,tkgh->skh", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("tkgh,skh->kgts", do.astype(ks.v.dtype), ks.v, preferred_element_type=jnp.float32)
        ds = p * (dp - qs.delta[..., None])  # the softmax's derivative (zero where masked)
        if self.cap is not None:  # d(c tanh(x / c))/dx = 1 - tanh^2; p = 0 where masked
            ds = ds * (1.0 - jnp.square(logits / jnp.float32(self.cap)))
        ds = ds * jnp.float32(self.scale)
        qg = qs.q.reshape(do.shape)
        dq = jnp.einsum("kgts,skh->tkgh", ds.astype(ks.k.dtype), ks.k, preferred_element_type=jnp.float32)
        dk = jnp.einsum("kgts,tkgh->skh", ds.astype(qg.dtype), qg, preferred_element_type=jnp.float32)
        return dq, dk, dv

    def device(self, qb):
        """This device's index on the `context` axis, and `qb`, passed together through
        `jax.lax.optimization_barrier` so that the index depends on the queries. Without it the
        index, and with it every position, mask and skip test, depends on nothing the caller
        computes: when a differentiated `lax.scan` over layers hoists what its body computes
        from loop constants alone out of the loop (JAX's scan partial evaluation), it computed
        the masks of every ring step, row tile and key tile of the layer before the loop and
        kept them all live (stacked over the tiles; a `lax.cond` on a position-only test made
        them float32 and 3.7 times larger)."""
        return jax.lax.optimization_barrier((jax.lax.axis_index(CONTEXT_AXIS), qb))

    def _near(self, k_last, q_first, flag):
        """Whether the last key is within the window of the first query (always, off the window)."""
        ok = k_last > q_first - self.window
        return ok | ~flag if self.traced_flag else ok

    def positions(self, device):
        """The (blk,) global positions of `device`'s block: contiguous, or its (early, late)
        chunks in the balanced order."""
        if not self.balanced:
            return device * self.blk + jnp.arange(self.blk, dtype=jnp.int32)
        half, ar = self.half, jnp.arange(self.half, dtype=jnp.int32)
        return jnp.concatenate([device * half + ar, (2 * self.ctx - 1 - device) * half + ar])

    def contiguous_live(self, me, src, flag):
        """Whether a query of `me` may see a key of `src` (contiguous order, after the first step)."""
        blk = self.blk
        live = jnp.asarray(True)
        if self.causal:
            live = src <= me
        if self.use_window:
            live = live & self._near(src * blk + blk - 1, me * blk, flag)
        return live

    def balanced_index(self, me, src, flag):
        """Which pairs of chunks a later step of the balanced order scores: 0 both query chunks
        against `src`'s early chunk (`src < me`), 1 the late query chunk against both of `src`'s
        (`src > me`), 2 none (the keys wholly before the window)."""
        half, ctx = self.half, self.ctx
        index = jnp.where(src < me, 0, 1)
        if self.use_window:
            live = jnp.where(
                src < me, self._near(src * half + half - 1, me * half, flag),
                self._near((2 * ctx - src) * half - 1, (2 * ctx - 1 - me) * half, flag),
            )
            index = jnp.where(live, index, 2)
        return index

    def fold_contiguous(self, carry, t, me, src, qb, seg, kb, vb, kseg, flag):
        """The block of `src` against this device's block; skipped when no query may see it."""
        args = (qb, self.positions(me), kb, vb, self.positions(src), seg, kseg, flag)
        if t == 0 or not (self.causal or self.use_window):
            return self.step(carry, *args)
        return jax.lax.cond(self.contiguous_live(me, src, flag), lambda c: self.step(c, *args), lambda c: c, carry)

    def fold_balanced(self, carry, t, me, src, qb, seg, kb, vb, kseg, flag):
        """`src`'s (early, late) chunks against this device's (early, late) chunks: three pairs
        at the first step, then the two `src < me` or `src > me` leaves unmasked."""
        half, blk = self.half, self.blk
        q_pos, k_pos = self.positions(me), self.positions(src)
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
            lambda c: c,  # neither: the pair's keys are wholly before the window
        ]
        return jax.lax.switch(self.balanced_index(me, src, flag), branches[: 3 if self.use_window else 2], carry)

    def zero_grads(self, dtype=jnp.float32):
        """Zero (dq, dk, dv) contributions of one step, shaped as `grad_step` returns them."""
        kv = (self.blk, self.kv_heads, self.head_dim)
        return jnp.zeros((self.blk, self.kv_heads, self.group, self.head_dim), dtype), jnp.zeros(kv, dtype), jnp.zeros(kv, dtype)

    def grad_pair(self, qs, ks, rows, keys, flag):
        """`grad_step` of the query rows `rows` against the keys `keys` (slices of the block),
        padded with zeros to whole blocks."""
        dq, dk, dv = self.grad_step(qs.rows(rows), ks.rows(keys), flag)
        zq, zk, zv = self.zero_grads()
        return zq.at[rows].set(dq), zk.at[keys].set(dk), zv.at[keys].set(dv)

    def grad_fold(self, t, me, src, qs, ks, flag):
        """One backward step: this device's queries against `src`'s block, with the forward's
        pairs and skips; the (dq, dk, dv) contributions, float32."""
        half, blk = self.half, self.blk
        early, late, everything = slice(0, half), slice(half, blk), slice(0, blk)
        if not self.balanced:
            if t == 0 or not (self.causal or self.use_window):
                return self.grad_step(qs, ks, flag)
            return jax.lax.cond(self.contiguous_live(me, src, flag), lambda: self.grad_step(qs, ks, flag), self.zero_grads)
        if t == 0:
            a, b = self.grad_pair(qs, ks, everything, early, flag), self.grad_pair(qs, ks, late, late, flag)
            return tuple(x + y for x, y in zip(a, b, strict=True))
        branches = [
            lambda: self.grad_pair(qs, ks, everything, early, flag),
            lambda: self.grad_pair(qs, ks, late, everything, flag),
            self.zero_grads,
        ]
        return jax.lax.switch(self.balanced_index(me, src, flag), branches[: 3 if self.use_window else 2])

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

    def _forward(self, qb, kb, vb, seg, flag):
        """This device's queries against every key/value block as they pass: the output
        `(blk, heads, head_dim)` and the float32 log-sum-exp of each row `(kv, g, blk)`."""
        flag = True if flag is None else flag
        me, qb = self.device(qb)
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
        m, total, o = carry
        out = o / total[..., None]  # every query sees at least itself: total > 0
        out = out.transpose(2, 0, 1, 3).reshape(self.blk, self.heads, self.head_dim).astype(qb.dtype)
        return out, m + jnp.log(total)

    def _attend(self, qb, kb, vb, seg, flag):
        return self._forward(qb, kb, vb, seg, flag)[0]

    def _attend_fwd(self, qb, kb, vb, seg, flag):
        # Saved: this device's q and its own k/v block, the output and the (kv, g, blk) float32
        # log-sum-exp; not the blocks received from the ring.
        out, lse = self._forward(qb, kb, vb, seg, flag)
        return out, (qb, kb, vb, seg, flag, out, lse)

    def _attend_bwd(self, res, dout):
        """The ring once more: each visiting block's scores are recomputed from q and the
        log-sum-exp; dq accumulates here, and each block's dk/dv accumulator travels with it."""
        qb, kb, vb, seg, flag, out, lse = res
        me, qb = self.device(qb)
        split = (self.blk, self.kv_heads, self.group, self.head_dim)
        delta = jnp.einsum(  # (kv, g, blk): sum(do * out) per row
            "tkgh,tkgh->kgt", dout.reshape(split).astype(jnp.float32), out.reshape(split).astype(jnp.float32),
        )
        qs = _Queries(qb, self.positions(me), seg, dout, lse, delta)
        ks = _Keys(kb, vb, None, seg)
        dq, own, acc = jnp.zeros(split, jnp.float32), None, None
        for t in range(self.ctx):
            src = jnp.mod(me - t, self.ctx)
            if t < self.ctx - 1:  # the next block, before this one's scores (as in the forward)
                nxt = [jax.lax.ppermute(a, CONTEXT_AXIS, self.perm) for a in (ks.k, ks.v) + ((ks.seg,) if self.has_seg else ())]
            dq_t, dk_t, dv_t = self.grad_fold(t, me, src, qs, ks._replace(pos=self.positions(src)), True if flag is None else flag)
            dq = dq + dq_t
            # The own block's dk/dv stay here; the block that arrives at step 1 starts an
            # accumulator, which is added to after this step's scores (so its exchange overlaps
            # them) and handed on with the block. After the last step it holds every device's
            # part of block me + 1's gradient and goes one step on, home: context - 1 exchanges.
            if t == 0:
                own = (dk_t, dv_t)
            else:
                acc = (dk_t, dv_t) if acc is None else (acc[0] + dk_t, acc[1] + dv_t)
                acc = tuple(jax.lax.ppermute(a, CONTEXT_AXIS, self.perm) for a in acc)
            if t < self.ctx - 1:
                ks = _Keys(nxt[0], nxt[1], None, nxt[2] if self.has_seg else None)
        dk, dv = own if acc is None else (own[0] + acc[0], own[1] + acc[1])
        # The segment ids and the window flag are integer/bool inputs: no cotangent (None).
        return dq.reshape(qb.shape).astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None, None

    def body(self, qb, kb, vb, *rest):
        """One device's program: its query block against every key/value block as they pass."""
        rest = list(rest)
        seg = rest.pop(0) if self.has_seg else None
        flag = rest.pop(0) if self.traced_flag else None
        even = jax.lax.axis_index(CONTEXT_AXIS) % 2 == 0
        if self.balanced:
            qb, kb, vb = (self.to_zigzag(x, even) for x in (qb, kb, vb))
            seg = self.to_zigzag(seg, even) if self.has_seg else None
        out = self.attend(qb, kb, vb, seg, flag)
        return self.from_zigzag(out, even) if self.balanced else out
