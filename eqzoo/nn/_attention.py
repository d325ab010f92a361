"""Causal multi-head / grouped-query self-attention with rotary embeddings and a KV cache."""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int, Int8, Integer

from .._errors import (
    ConfigError,
    ShapeError,
    check_last_axis,
    check_positive_numbers,
    check_sizes,
    shape_str,
)
from .._typing import PRNGKey
from ..sharding._activation import (
    active_context_attention,
    active_mesh,
    check_context_split,
    constrain,
)
from ..sharding._errors import ShardingError
from ..sharding._mesh import context_size
from ._linear import AbstractLinear, apply_linear, init_linear, linear_dtype
from ._norm import RMSNorm
from ._ring import ring_attention
from ._rope import RopeScaling, RotaryEmbedding, rotate

AttentionBackend = Literal["xla", "cudnn", "auto"]
_BACKENDS = ("xla", "cudnn", "auto")


def _cudnn_max_head_dim() -> int:
    """The widest head cuDNN flash attention takes on this GPU: 256 from Hopper (compute
    capability 9.0) on, 128 before (as `jax.nn.dot_product_attention` checks)."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return 256 if float(capability) >= 9.0 else 128
    except (TypeError, ValueError):
        return 128


def resolve_backend(backend: str, dtype, head_dim: int | None = None) -> Literal["xla", "cudnn"]:
    """The attention implementation `backend` means for arrays of `dtype` on this platform.

    `"auto"` picks cuDNN flash attention on a GPU for half-precision inputs (the only ones cuDNN
    supports) whose heads cuDNN takes there (`head_dim`, when given: a multiple of 8, at most
    128 before Hopper and 256 from it), and XLA's own attention everywhere else.
    """
    if backend not in _BACKENDS:
        raise ConfigError(f"attention backend must be one of {_BACKENDS}, got {backend!r}.")
    if backend == "auto":
        on_gpu = jax.default_backend() == "gpu"
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        fits = head_dim is None or not on_gpu or (head_dim % 8 == 0 and head_dim <= _cudnn_max_head_dim())
        return "cudnn" if on_gpu and half and fits else "xla"
    return backend  # type: ignore[return-value]


def softcap(x: Array, cap: float) -> Array:
    """`cap * tanh(x / cap)`: squashes `x` smoothly into `(-cap, cap)` (Gemma 2's soft caps on
    attention and output logits)."""
    c = jnp.asarray(cap, x.dtype)
    return c * jnp.tanh(x / c)


@jax.custom_jvp
def _masked_logits(logits, mask, fill):
    """`jnp.where(mask, logits, fill)` whose tangent is the logits' own tangent, masked or not.

    For a softmax over rows that each keep at least one logit, the probabilities of the masked
    logits are exactly 0, and so is the gradient the softmax sends back to them: the mask on the
    tangent changes nothing, and without it the backward pass need not keep the mask (with
    `jnp.where`, a boolean of the logits' broadcast shape, per layer of a scanned stack)."""
    return jnp.where(mask, logits, fill)


@_masked_logits.defjvp
def _masked_logits_jvp(primals, tangents):
    logits, mask, fill = primals
    return _masked_logits(logits, mask, fill), tangents[0]


def _xla_attention(q, k, v, mask, scale=None, cap=None, k_scale=None, v_scale=None, fill=None):
    """Scaled dot-product attention of one sequence; `mask` is `(seq, kv_seq)`, True = attend
    (`None`: every position attends to every key). `scale` multiplies the logits (default
    `head_dim ** -0.5`); `cap` soft-caps them (`softcap`) before the mask (Gemma 2). `k_scale`,
    `v_scale`: `(kv_seq, kv_heads)` scales of int8 keys/values (an int8
    [`eqzoo.nn.KVCache`][]): `k`'s scale multiplies the logits and `v`'s the probabilities, so
    the codes are never multiplied by their scales. `fill`: the float32 value given to masked
    logits (`finfo(float32).min` as a traced scalar), passed only when every row of `mask`
    keeps a key (self-attention, where each position sees itself); the mask then applies
    through `_masked_logits` unless `cap` is set."""
    # The XLA path, written out rather than `jax.nn.dot_product_attention(implementation="xla")`:
    # for half-precision inputs JAX's version requests a BF16_BF16_F32 dot algorithm whose
    # backward pass fails to lower under strict dtype promotion. Same numerics: logits and softmax
    # in float32, probabilities cast back to the value dtype.
    seq, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(seq, kv_heads, heads // kv_heads, head_dim)  # query head h uses kv head h // group
    logits = jnp.einsum("tkgh,skh->kgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(head_dim**-0.5 if scale is None else scale)
    if k_scale is not None:
        logits = logits * k_scale.astype(jnp.float32).T[:, None, None, :]
    if cap is not None:
        logits = softcap(logits, cap)
    if mask is not None and fill is not None and cap is None:
        logits = _masked_logits(logits, mask, fill)
    elif mask is not None:
        # With a soft cap, the plain `where`: its select in the backward pass keeps XLA:CPU from
        # fusing the soft cap's derivative into the softmax's backward, which there costs two
        # more logits-sized float32 buffers per recomputed layer (remat "full" / "dots"), more
        # than the mask `_masked_logits` would save (tiny-gemma2, batch 2 x 2048, "full":
        # 975.9 MiB of temporaries against 719.9; docs/performance.md).
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min if fill is None else fill)
    probs = jax.nn.softmax(logits, axis=-1)
    if v_scale is None:
        out = jnp.einsum("kgts,skh->tkgh", probs.astype(v.dtype), v)
        return out.reshape(seq, heads, head_dim)
    # The value scales enter the probabilities relative to each head's largest, so the products
    # stay in [0, 1]: `probability * scale` itself (~1/context * max|v|/127) would fall below
    # float16's normal range at long contexts. The head's largest scale among the positions some
    # query attends to (stale slots have probability 0) multiplies the output.
    v_scale = v_scale.astype(jnp.float32).T  # (kv_heads, kv_seq)
    seen = v_scale if mask is None else jnp.where(jnp.any(mask, axis=0), v_scale, 0.0)
    top = jnp.max(seen, axis=-1)
    top = jnp.where(top > 0, top, jnp.ones_like(top))
    probs = probs * (v_scale / top[:, None])[:, None, None, :]
    out = jnp.einsum("kgts,skh->tkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out * top[None, :, None, None]).astype(v.dtype).reshape(seq, heads, head_dim)


def check_per_position(name: str, value, seq: int, who: str) -> None:
    """Raise `ShapeError` unless `value` is `None` or a `(seq,)` integer array."""
    if value is None:
        return
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None:
        raise ShapeError(f"{who}: {name} must be a JAX integer array of shape ({seq},); got {type(value).__name__}.")
    if tuple(shape) != (seq,):
        raise ShapeError(
            f"{who}: {name} must have one entry per position, shape ({seq},); got "
            f"{shape_str(shape)}. For a batch, vmap over it together with the tokens."
        )
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ShapeError(
            f"{who}: {name} must be integers; got dtype {jnp.dtype(dtype).name}. Convert with "
            f"{name}.astype(jnp.int32)."
        )


class QuantizedKV(eqx.Module):
    """Cached keys or values stored as int8 codes, with one scale per position and head: the
    arrays of an int8 [`eqzoo.nn.KVCache`][] (`init_cache(dtype=jnp.int8)`).

    Each new `head_dim` row `x` is stored as `codes = clip(round(x / s), -127, 127)` with
    `s = max|x| / 127` (as [`eqzoo.quant.quantize_int8`][] rounds a weight row), so every entry
    is within `s / 2` of `codes * s`. Attention never multiplies the codes by their scales: the
    key scales multiply the query-key logits and the value scales the attention probabilities
    (the codes are only widened to the compute dtype for the products). A position
    takes `head_dim` bytes plus one scale per head, against `2 * head_dim` in bfloat16.
    """

    codes: Int8[Array, "*layers slots kv_heads head_dim"]
    scales: Float[Array, "*layers slots kv_heads 1"]

    def __init__(self, codes: Int8[Array, "*layers slots kv_heads head_dim"], scales: Float[Array, "*layers slots kv_heads 1"]):
        """**Arguments:** `codes`, int8; `scales`, one per row of `codes` (its shape with a last
        axis of 1)."""
        if jnp.dtype(codes.dtype) != jnp.int8:
            raise ConfigError(f"QuantizedKV: codes must be int8; got dtype {jnp.dtype(codes.dtype).name}.")
        if tuple(scales.shape) != (*codes.shape[:-1], 1):
            raise ShapeError(
                f"QuantizedKV: scales must have shape {shape_str((*codes.shape[:-1], 1))} (one per row "
                f"of codes {shape_str(codes.shape)}); got {shape_str(scales.shape)}."
            )
        self.codes = codes
        self.scales = scales

    @property
    def shape(self) -> tuple[int, ...]:
        """The codes' shape (that of the floating array it stands for)."""
        return self.codes.shape

    @property
    def ndim(self) -> int:
        """The codes' rank."""
        return self.codes.ndim

    @property
    def dtype(self):
        """`int8`, the codes' dtype."""
        return self.codes.dtype


def _quantize_rows(x, scale_dtype) -> QuantizedKV:
    """`x` `(seq, kv_heads, head_dim)` as int8 codes with one `scale_dtype` scale per row."""
    from ..quant._int8 import QMAX, quantize_groups  # eqzoo.quant imports eqzoo.nn

    # not quantize_int8: its checks are for weights (a host sync per layer per eager decode
    # step, and a NaN key reported as a diverged weight); activations pass NaN on as a float cache does
    codes, scales = quantize_groups(x.astype(scale_dtype), QMAX, None)
    return QuantizedKV(codes, scales[..., None])


def _as_stored(x, like):
    """The new keys or values `x` in the form of the cache arrays `like`: cast to their dtype,
    or quantized for a [`QuantizedKV`][eqzoo.nn.QuantizedKV]."""
    if isinstance(like, QuantizedKV):
        return _quantize_rows(x, like.scales.dtype)
    return x.astype(like.dtype)


class KVCache(eqx.Module):
    """Keys and values of the positions already decoded, for one sequence: one layer's, or every
    layer's stacked along a leading axis (what a model's `init_cache` returns).

    A layer with a `sliding_window` attends to its last `sliding_window` positions only, so its
    cache is a ring of `min(max_seq, sliding_window + lookahead)` slots: position `p` lives in slot
    `p % slots`, and the slot count, not `max_seq`, sets its memory (Gemma 3 1B at 32k positions
    keeps 4 of its 26 layers at full length). A stack that mixes windowed and full layers (Gemma 2
    and 3, [`eqzoo.nn.Attention`][]'s `window_layers`) keeps two stacks: `keys`/`values` for its
    full layers, `window_keys`/`window_values` (rings) for its windowed ones, each in layer order.

    Slots at or beyond the current decode index (or, in a ring, holding positions that fell out of
    the window) hold stale values; attention masks them.

    The arrays are floating (any dtype: new keys and values are cast to it), or, for an int8
    cache, [`eqzoo.nn.QuantizedKV`][]s of codes and per-position scales; all four alike.
    """

    keys: Float[Array, "*layers slots kv_heads head_dim"] | QuantizedKV
    values: Float[Array, "*layers slots kv_heads head_dim"] | QuantizedKV
    window_keys: Float[Array, "window_layers window_slots kv_heads head_dim"] | QuantizedKV | None
    window_values: Float[Array, "window_layers window_slots kv_heads head_dim"] | QuantizedKV | None
    max_seq: int = eqx.field(static=True)

    def __init__(
        self,
        keys: Float[Array, "*layers slots kv_heads head_dim"] | QuantizedKV,
        values: Float[Array, "*layers slots kv_heads head_dim"] | QuantizedKV,
        window_keys: Float[Array, "window_layers window_slots kv_heads head_dim"] | QuantizedKV | None = None,
        window_values: Float[Array, "window_layers window_slots kv_heads head_dim"] | QuantizedKV | None = None,
        *,
        max_seq: int | None = None,
    ):
        """**Arguments:** the arrays described above; `max_seq`, how many positions the cache
        covers (the last position it can be asked for plus one): default the slot count of
        `keys`, which is right for a cache without rings."""
        if (window_keys is None) != (window_values is None):
            raise ConfigError("KVCache: give window_keys and window_values together, or neither.")
        arrays = [a for a in (keys, values, window_keys, window_values) if a is not None]
        if len({isinstance(a, QuantizedKV) for a in arrays}) > 1:
            raise ConfigError("KVCache: the arrays must be all int8 (QuantizedKV) or all floating, not a mix.")
        self.keys = keys
        self.values = values
        self.window_keys = window_keys
        self.window_values = window_values
        self.max_seq = int(keys.shape[-3] if max_seq is None else max_seq)


def ring_positions(last: Array, slots: int) -> Int[Array, " slots"]:
    """The position each slot of a [`KVCache`][eqzoo.nn.KVCache] ring of `slots` slots holds
    once positions up to `last` are written (position `p` lives in slot `p % slots`): the
    latest `p <= last` with `p % slots == slot`, negative for a slot never written.

    Internal (not exported), shared by attention, which masks a ring's keys by it, and by
    prefix caching (`eqzoo.generation`), which lays a cache kept in position order out as a
    slot's ring with it.

    **Arguments:**

    - `last`: the last position written (an int32 scalar, possibly traced).
    - `slots`: the ring's slot count (static).

    **Returns:** int32 `(slots,)`, the position each slot holds."""
    slot = jnp.arange(slots, dtype=jnp.int32)
    return last - jnp.mod(last - slot, slots)


def _layer_slice(arr, slot):
    if slot is None:
        return arr
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, slot, keepdims=False), arr)


def _writes_first(arr, seq, max_seq) -> bool:
    """Whether a decode step writes its keys before attending (it overwrites nothing it needs):
    a full-length cache, or one new position; else a ring attends over its old slots and the new
    keys side by side, then writes."""
    return arr.shape[-3] >= max_seq or seq == 1


def _cache_write(arr, new, slot, index, max_seq, *, valid=None, keep=None):
    """`arr` (one layer's `(slots, kv, hd)`, or layer `slot` of a stack) with `new`'s rows
    written at positions `index, index + 1, ...`: at those rows when the cache is full length,
    at `position % slots` in a ring. A ring keeps the last rows of `new` that fit, and of those
    only the first `valid` (padding never pushes real positions out). `keep`: a traced bool; when
    False the cache is left as it was (a layer of a mixed stack writes one of its two stacks).
    `new` is already in `arr`'s form (`_as_stored`); a `QuantizedKV` writes codes and scales alike."""
    if isinstance(arr, QuantizedKV):
        return jax.tree.map(
            lambda a, n: _cache_write(a, n, slot, index, max_seq, valid=valid, keep=keep), arr, new
        )
    slots, seq = arr.shape[-3], new.shape[0]
    zero = jnp.zeros((), jnp.int32)
    if _writes_first(arr, seq, max_seq):
        start = index if slots >= max_seq else jnp.mod(index, slots)
        where = (start, zero, zero) if slot is None else (slot, start, zero, zero)
        update = new if slot is None else new[None]
        if slots < max_seq and valid is not None:  # a padding row must not take a ring slot
            keep = valid > 0 if keep is None else keep & (valid > 0)
        if keep is not None:
            update = jnp.where(keep, update, jax.lax.dynamic_slice(arr, where, update.shape))
        return jax.lax.dynamic_update_slice(arr, update, where)
    count = min(seq, slots)  # consecutive positions: distinct slots
    valid = seq if valid is None else valid
    first = jnp.clip(valid - count, 0, seq - count).astype(jnp.int32)
    rows = first + jnp.arange(count, dtype=jnp.int32)
    update = jax.lax.dynamic_slice_in_dim(new, first, count)
    at = jnp.mod(index + rows, slots)
    target = arr.at[at] if slot is None else arr.at[slot, at]
    write = rows < valid
    if keep is not None:
        write = write & keep
    update = jnp.where(write[:, None, None], update, target.get())
    return target.set(update)


def check_cache_dtype(dtype, default):
    """`dtype` for a KV cache as a numpy dtype (`None`: `default`), checked: floating or int8."""
    try:
        dtype = jnp.dtype(default if dtype is None else dtype)
    except TypeError as e:
        raise ConfigError(f"cache dtype {dtype!r} is not a dtype; use e.g. jnp.bfloat16 or jnp.int8.") from e
    if not (jnp.issubdtype(dtype, jnp.floating) or dtype == jnp.int8):
        raise ConfigError(
            f"a KV cache is floating or int8 (codes with per-position scales); got dtype {dtype.name}."
        )
    return dtype


def _head_layout(embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int | None) -> int:
    """The head size (default `embed_dim // num_heads`), once the heads split the width evenly
    and each key/value head serves a whole group of query heads."""
    if head_dim is None:
        if embed_dim % num_heads:
            raise ConfigError(
                f"num_heads={num_heads} must divide embed_dim={embed_dim} (or pass head_dim)."
            )
        head_dim = embed_dim // num_heads
    if num_heads % num_kv_heads:
        raise ConfigError(
            f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} for grouped-query "
            "attention; pick a divisor of num_heads."
        )
    return head_dim


def _window_options(
    sliding_window, window_layers, causal: bool, use_rope: bool, local_rope_theta
) -> tuple[bool, ...] | None:
    """`window_layers` as a tuple, once the sliding-window options agree with each other: a
    window needs causal attention, per-layer windows need a window, and a local rotary base
    needs per-layer windows (the layers it applies to)."""
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
            raise ConfigError(f"sliding_window must be a positive integer or None, got {sliding_window!r}.")
        if not causal:
            raise ConfigError(
                "sliding_window needs causal=True: the window counts the positions before each "
                "one (a bidirectional layer has no such window here)."
            )
    if window_layers is not None:
        window_layers = tuple(window_layers)
        if sliding_window is None or not all(isinstance(w, bool) for w in window_layers) or not window_layers:
            raise ConfigError(
                "window_layers must be a non-empty tuple of booleans (True: that layer uses "
                f"sliding_window), given together with sliding_window; got {window_layers!r} "
                f"with sliding_window={sliding_window!r}."
            )
    if local_rope_theta is not None and (window_layers is None or not use_rope):
        raise ConfigError(
            "local_rope_theta sets the rotary base of the windowed layers of a stack that "
            "mixes windowed and full layers: it needs use_rope=True and window_layers."
        )
    return window_layers


def _check_logit_options(scale, logit_softcap, backend: str) -> None:
    """Refuse a logit scale or soft cap that is not a positive number, and a soft cap on the
    cuDNN backend, which has none."""
    for name, value in (("scale", scale), ("logit_softcap", logit_softcap)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0):
            raise ConfigError(f"{name} must be a positive number or None, got {value!r}.")
    if logit_softcap is not None and backend == "cudnn":
        raise ConfigError(
            "logit_softcap has no cuDNN implementation (jax.nn.dot_product_attention takes no "
            "softcap); use backend='xla', or 'auto', which runs XLA's attention for it."
        )


class Attention(eqx.Module):
    """Causal self-attention with multi-head or grouped-query heads (Ainslie et al., 2023).

    `num_kv_heads < num_heads` shares each key/value head between `num_heads // num_kv_heads`
    query heads. Rotary embeddings are applied to queries and keys when `use_rope`. The attention
    itself is cuDNN flash attention (`jax.nn.dot_product_attention`) on GPU, or a plain XLA
    einsum-softmax-einsum program (`backend`). Under context parallelism (a mesh with
    `context > 1` in [`eqzoo.sharding.activation_sharding`][]) it runs XLA's attention with the
    keys and values gathered over `context`, or ring attention with `context_attention="ring"`
    (or `"ring_balanced"`, its load-balanced order; [`eqzoo.sharding.CONTEXT_ATTENTION`][]).
    """

    q_proj: eqx.nn.Linear | AbstractLinear
    k_proj: eqx.nn.Linear | AbstractLinear
    v_proj: eqx.nn.Linear | AbstractLinear
    o_proj: eqx.nn.Linear | AbstractLinear
    rope: RotaryEmbedding | None
    local_rope: RotaryEmbedding | None
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    backend: str = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    sliding_window: int | None = eqx.field(static=True)
    window_layers: tuple[bool, ...] | None = eqx.field(static=True)
    scale: float | None = eqx.field(static=True)
    logit_softcap: float | None = eqx.field(static=True)

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        use_bias: bool = False,
        out_bias: bool | None = None,
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        rope_scaling: RopeScaling | None = None,
        backend: AttentionBackend = "auto",
        causal: bool = True,
        sliding_window: int | None = None,
        window_layers: tuple[bool, ...] | None = None,
        local_rope_theta: float | None = None,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-6,
        qk_norm_offset: float = 0.0,
        scale: float | None = None,
        logit_softcap: float | None = None,
        init_std: float = 0.02,
        out_init_std: float | None = None,
        dtype=None,
        key: PRNGKey,
    ):
        """**Arguments:**

        - `embed_dim`: model width.
        - `num_heads`: query heads.
        - `num_kv_heads`: key/value heads (default `num_heads`); must divide `num_heads`.
        - `head_dim`: size of each head (default `embed_dim // num_heads`).
        - `use_bias`: biases on the four projections.
        - `out_bias`: a bias on the output projection (default `use_bias`); Qwen2 has biases on
          the query, key and value projections only (`use_bias=True, out_bias=False`).
        - `use_rope`, `rope_theta`, `rope_scaling`: rotary position embeddings.
        - `backend`: `"xla"`, `"cudnn"` or `"auto"` (cuDNN on GPU for half precision).
        - `causal`: each position attends only to itself and earlier ones (language models);
          `False` lets every position attend to every other (vision and diffusion transformers).
          Decoding with a KV cache needs `causal=True`.
        - `sliding_window`: if given, each position attends only to itself and the
          `sliding_window - 1` positions before it (Mistral's sliding-window attention, counted
          as Hugging Face's `sliding_window`); needs `causal=True`. `None`: every earlier position.
        - `window_layers`: for a layer of a [`eqzoo.nn.Stacked`][] whose layers alternate
          between windowed and full attention (Gemma 2 and 3), which layers of the stack use
          `sliding_window`: entry `i` for layer `i`. Every layer of the stack holds the same
          tuple, and is told its index at run time (`layer=`). `None`: every layer windowed
          if `sliding_window` is given.
        - `local_rope_theta`: the rotary base of the windowed layers when it differs from the
          full layers' `rope_theta` (Gemma 3: 10,000 locally, 1,000,000 globally; `rope_scaling`
          applies to the full layers only). Needs `window_layers`.
        - `qk_norm`: an RMSNorm over each head's queries and keys (one `head_dim` scale for
          the queries, one for the keys, shared by the heads), before the rotary embedding:
          Qwen3's and Gemma 3's attention. `qk_norm_eps`: its epsilon; `qk_norm_offset`: its
          [`eqzoo.nn.RMSNorm`][] offset (1 for Gemma's `1 + weight` norms).
        - `scale`: the factor on the query-key logits; default `head_dim ** -0.5` (Gemma:
          `query_pre_attn_scalar ** -0.5`).
        - `logit_softcap`: if given, the logits become `logit_softcap * tanh(logits /
          logit_softcap)` before masking (Gemma 2's `attn_logit_softcapping`). cuDNN has no
          such option: `backend="auto"` then runs XLA's attention, and `"cudnn"` is refused.
        - `init_std`, `out_init_std`: normal init scale of the input / output projections.
        - `dtype`: parameter dtype. `key`: a PRNG key.
        """
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_sizes("Attention", embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        if head_dim is not None:
            check_sizes("Attention", head_dim=head_dim)
        if use_rope:
            check_positive_numbers("Attention", rope_theta=rope_theta)
            if local_rope_theta is not None:
                check_positive_numbers("Attention", local_rope_theta=local_rope_theta)
        head_dim = _head_layout(embed_dim, num_heads, num_kv_heads, head_dim)
        if backend not in _BACKENDS:
            raise ConfigError(f"attention backend must be one of {_BACKENDS}, got {backend!r}.")
        window_layers = _window_options(sliding_window, window_layers, causal, use_rope, local_rope_theta)
        _check_logit_options(scale, logit_softcap, backend)
        kq, kk, kv, ko = jax.random.split(key, 4)
        out_std = init_std if out_init_std is None else out_init_std
        lin = dict(use_bias=use_bias, dtype=dtype)
        self.q_proj = init_linear(embed_dim, num_heads * head_dim, std=init_std, key=kq, **lin)
        self.k_proj = init_linear(embed_dim, num_kv_heads * head_dim, std=init_std, key=kk, **lin)
        self.v_proj = init_linear(embed_dim, num_kv_heads * head_dim, std=init_std, key=kv, **lin)
        out_lin = lin if out_bias is None else dict(lin, use_bias=out_bias)
        self.o_proj = init_linear(num_heads * head_dim, embed_dim, std=out_std, key=ko, **out_lin)
        self.rope = RotaryEmbedding(head_dim, theta=rope_theta, scaling=rope_scaling) if use_rope else None
        self.local_rope = None if local_rope_theta is None else RotaryEmbedding(head_dim, theta=local_rope_theta)
        norm = dict(eps=qk_norm_eps, offset=qk_norm_offset, dtype=dtype)
        self.q_norm = RMSNorm(head_dim, **norm) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, **norm) if qk_norm else None
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.backend = backend
        self.causal = causal
        self.sliding_window = sliding_window
        self.window_layers = window_layers
        self.scale = None if scale is None else float(scale)
        self.logit_softcap = None if logit_softcap is None else float(logit_softcap)

    def _windowed(self, layer) -> bool | Array:
        """Whether this layer attends within `sliding_window`: a Python bool when it is known
        without the layer index, else a traced boolean from `window_layers[layer]`."""
        if self.window_layers is None:
            return self.sliding_window is not None
        if layer is None:
            raise ConfigError(
                "this Attention uses sliding_window on some layers of its stack only "
                "(window_layers), so it needs its layer index: call it with layer=i (the "
                "models pass it; decode also needs the stacked cache of every layer), or build "
                "it without window_layers."
            )
        if isinstance(layer, bool):
            raise ConfigError(f"layer must be an integer index, got {layer!r}.")
        if isinstance(layer, int):
            if not 0 <= layer < len(self.window_layers):
                raise ConfigError(f"layer={layer} is outside window_layers (length {len(self.window_layers)}).")
            return self.window_layers[layer]
        flags = jnp.asarray(self.window_layers, dtype=bool)
        return flags[jnp.clip(jnp.asarray(layer, jnp.int32), 0, len(self.window_layers) - 1)]

    def _rotate(self, x, positions, windowed):
        if self.local_rope is None or windowed is False:
            return self.rope(x, positions)
        if windowed is True:
            return self.local_rope(x, positions)
        inv_freq = jnp.where(windowed, jnp.asarray(self.local_rope.inv_freq()), jnp.asarray(self.rope.inv_freq()))
        return rotate(x, positions, inv_freq)

    def _qkv(self, x, positions, windowed=False):
        seq = x.shape[0]
        q = apply_linear(self.q_proj, x).reshape(seq, self.num_heads, self.head_dim)
        k = apply_linear(self.k_proj, x).reshape(seq, self.num_kv_heads, self.head_dim)
        v = apply_linear(self.v_proj, x).reshape(seq, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q = self._rotate(q, positions, windowed)
            k = self._rotate(k, positions, windowed)
        return checkpoint_name(q, "attn_q"), checkpoint_name(k, "attn_k"), checkpoint_name(v, "attn_v")

    def _out(self, o):
        o = o.reshape(o.shape[0], self.num_heads * self.head_dim)
        return checkpoint_name(apply_linear(self.o_proj, o), "attn_out")

    def __call__(
        self,
        x: Float[Array, "seq embed"],
        *,
        positions: Integer[Array, " seq"] | None = None,
        segment_ids: Integer[Array, " seq"] | None = None,
        layer: Integer[Array, ""] | int | None = None,
        key: PRNGKey | None = None,
    ) -> Float[Array, "seq embed"]:
        """Self-attention over one whole sequence (causal unless built with `causal=False`).

        **Arguments:**

        - `x`: one sequence.
        - `positions`: the rotary position of each row (default `0, 1, ..., seq-1`); packed
          documents restart at 0 (see [`eqzoo.data.pack_documents`][]).
        - `segment_ids`: for several documents packed into one row, which document each
          position belongs to (contiguous runs of equal ids); a position then attends only to
          positions of its own segment. `None`: one segment.
        - `layer`: this layer's index in its stack; needed (and only read) when the layer was
          built with `window_layers`.
        - `key`: unused (no dropout).

        **Returns:** the attention output, same shape and dtype as `x`.
        """
        if x.ndim != 2:
            raise ShapeError(
                f"Attention takes one sequence of shape (seq, embed); got {shape_str(x.shape)}. "
                "Wrap the call in jax.vmap for a batch."
            )
        check_last_axis("Attention", x, self.q_proj.in_features)
        seq = x.shape[0]
        check_per_position("positions", positions, seq, "Attention")
        check_per_position("segment_ids", segment_ids, seq, "Attention")
        if positions is None:
            positions = jnp.arange(seq, dtype=jnp.int32)
        windowed = self._windowed(layer)
        q, k, v = self._qkv(x, positions, windowed)
        mesh = active_mesh()
        strategy = active_context_attention()
        if context_size(mesh) > 1 and strategy != "gather":
            # Ring attention: every device keeps its own query and key/value blocks and the
            # key/value blocks travel round the context ring (eqzoo/nn/_ring.py).
            self._check_context_backend(mesh, strategy)
            check_context_split(seq, "Attention")  # each device takes an equal block
            balanced = strategy == "ring_balanced" and self.causal
            if balanced:
                self._check_balanced_split(seq, context_size(mesh))
            o = ring_attention(
                q, k, v, mesh=mesh, causal=self.causal,
                window=self.sliding_window if windowed is not False else None, windowed=windowed,
                segment_ids=segment_ids, scale=self.scale, cap=self.logit_softcap, balanced=balanced,
            )
            return self._out(o)
        # Context parallelism (a mesh with context > 1): the queries stay split along the
        # sequence and the keys/values are gathered, so each device scores its own query rows
        # against every key. The mask below is written for global positions; XLA splits its
        # rows like the queries'. No-ops without a mesh.
        q, k, v = constrain(q, "attn_q"), constrain(k, "attn_kv"), constrain(v, "attn_kv")
        return self._out(self._attend_among(q, k, v, windowed, segment_ids))

    def _attend_among(self, q, k, v, windowed, segment_ids=None):
        """Attention of `seq` positions among themselves: causal unless built otherwise, within
        the window when `windowed` (a bool, or a traced flag for a mixed stack), and within
        each position's segment when `segment_ids` (`(seq,)`) is given. The path of
        `__call__`, and of `prefill`: cuDNN's fused kernel where `backend` resolves to it,
        else XLA's."""
        seq = q.shape[0]
        window = self.sliding_window if windowed is not False else None
        backend = "xla" if self.logit_softcap is not None else resolve_backend(self.backend, q.dtype, self.head_dim)
        if backend == "cudnn" and context_size(active_mesh()) > 1:
            # jax's partitioner for the cuDNN call takes batch- and head-split operands only
            # ("Sharding on sequence dim is not allowed"): it would need the whole sequence on
            # every device. "auto" takes the XLA path (queries split, keys/values gathered).
            self._check_context_backend(active_mesh(), "gather")
            backend = "xla"
        if backend == "cudnn":
            # The segment mask reaches cuDNN as an additive bias (jax turns a boolean mask into
            # one), given per head: under vmap, jax 0.10's batching rule for the cuDNN call
            # reshapes a batched bias to (batch, heads, seq, seq) and fails on a head axis of 1.
            # The window is cuDNN's own (`(window - 1, 0)`: itself and window - 1 before).
            # A window on some layers of a stack only: both calls are compiled and the layer's
            # flag picks one at run time (cuDNN's window is a static argument).
            mask = None
            if segment_ids is not None:
                same = segment_ids[:, None] == segment_ids[None, :]
                mask = jnp.broadcast_to(same, (self.num_heads, seq, seq))

            def cudnn(local_window):
                return jax.nn.dot_product_attention(
                    q, k, v, mask=mask, is_causal=self.causal, implementation="cudnn",
                    scale=self.scale, local_window_size=local_window,
                )

            if window is None:
                o = cudnn(None)
            elif windowed is True:
                o = cudnn((window - 1, 0))
            else:
                o = jax.lax.cond(windowed, lambda: cudnn((window - 1, 0)), lambda: cudnn(None))
        else:
            # The positions and the masks' fill value pass through `optimization_barrier` with
            # the queries, so that the masks depend on the layer's input. Built from `iota` and
            # constants alone, they were hoisted out of a differentiated `lax.scan` over layers
            # by JAX's scan partial evaluation (as `eqzoo.nn._ring._Ring.device` explains), the
            # fill value broadcast to the logits' shape, per sequence of the batch, and all of
            # it was held for the whole step. Every row sees its own position, so the mask
            # need not be kept for the backward pass either (`_masked_logits`). The rows' and
            # the columns' positions are two values: under context parallelism the rows are
            # split like the queries and the columns stay whole (one value would be split,
            # then all-gathered in every layer).
            zero = jnp.zeros((), jnp.int32)
            q, row0, col0, fill, segment_ids = jax.lax.optimization_barrier(
                (q, zero, zero, jnp.asarray(jnp.finfo(jnp.float32).min), segment_ids)
            )
            row = (row0 + jnp.arange(seq, dtype=jnp.int32))[:, None]
            col = (col0 + jnp.arange(seq, dtype=jnp.int32))[None, :]
            mask = None if segment_ids is None else segment_ids[:, None] == segment_ids[None, :]
            if self.causal:
                causal = col <= row
                if window is not None and window < seq:
                    band = col > row - window  # itself and window - 1 before
                    causal = causal & (band if windowed is True else band | ~windowed)
                mask = causal if mask is None else mask & causal
            o = _xla_attention(q, k, v, mask, self.scale, self.logit_softcap, fill=fill)
        return o

    def _check_context_backend(self, mesh, strategy):
        """Refuse `backend="cudnn"` under context parallelism; `"auto"` runs XLA's attention."""
        if self.backend != "cudnn":
            return
        ctx = context_size(mesh)
        if strategy != "gather":
            raise ConfigError(
                f"attention backend 'cudnn' cannot run ring attention (mesh context={ctx}, "
                f"context_attention={strategy!r}): each ring step needs the block's running softmax "
                "max and sum, which jax's cuDNN attention does not return. Use backend='auto' "
                "or 'xla' (XLA's attention on each key/value block), or context_attention='gather'."
            )
        raise ConfigError(
            f"attention backend 'cudnn' cannot run under context parallelism (mesh "
            f"context={ctx}): jax's cuDNN attention takes "
            "operands split over batch and heads only, not along the sequence. Use "
            "backend='auto' or 'xla' (XLA's attention with the keys and values gathered "
            "over context, or context_attention='ring'), or a mesh with context=1."
        )

    def _check_balanced_split(self, seq, ctx):
        """Refuse a sequence that `2 * context` chunks cannot split (the load-balanced order)."""
        if seq % (2 * ctx):
            down, up = seq - seq % (2 * ctx), seq + 2 * ctx - seq % (2 * ctx)
            raise ShardingError(
                f"Attention: context_attention='ring_balanced' cuts a sequence into 2 * context = "
                f"{2 * ctx} chunks (mesh context={ctx}), and {seq} positions are not divisible by "
                f"{2 * ctx}. Use sequences of {down or up} or {up} positions (pad the rows; packed "
                "rows can be padded with segment id 0), or context_attention='ring'."
            )

    def init_cache(self, max_seq: int, *, dtype=None, layers: int | None = None, lookahead: int = 0) -> KVCache:
        """An empty [`eqzoo.nn.KVCache`][] for `max_seq` positions.

        **Arguments:**

        - `max_seq`: how many positions it covers.
        - `dtype`: a floating dtype, default the parameters'; or `jnp.int8` for an int8 cache
          ([`eqzoo.nn.QuantizedKV`][]: about half the bytes of bfloat16, its scales in the
          parameters' dtype).
        - `layers`: `None` for this layer's own cache; `n` for the stacked cache of a stack of
          `n` layers like this one (a model's `init_cache`), which for a stack that mixes
          windowed and full layers (`window_layers`) is one stack of each.
        - `lookahead`: with a `sliding_window`, the windowed layers keep rings of
          `min(max_seq, sliding_window + lookahead)` slots. A decode call that writes
          positions which a later call rewrites (speculative decoding writes proposals, then
          rewinds to the first rejected one) needs `lookahead` at least how far past the next
          decode index it wrote, so that those stale rows never take the slot of a position
          still in the window.

        **Raises:** `ConfigError` for a `max_seq` that is not a positive integer, a negative
        `lookahead`, a `layers` larger than the stack's `window_layers`, or a `dtype` that is
        neither floating nor int8.
        """
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise ConfigError(f"lookahead must be a non-negative integer, got {lookahead!r}.")
        check_sizes("Attention.init_cache", max_seq=max_seq)
        param_dtype = linear_dtype(self.q_proj)
        dtype = check_cache_dtype(dtype, param_dtype)
        ring = max_seq if self.sliding_window is None else min(max_seq, self.sliding_window + lookahead)

        def zeros(n, slots):
            shape = (() if n is None else (n,)) + (slots, self.num_kv_heads, self.head_dim)
            if dtype == jnp.int8:
                return QuantizedKV(jnp.zeros(shape, jnp.int8), jnp.zeros(shape[:-1] + (1,), param_dtype))
            return jnp.zeros(shape, dtype)

        if self.window_layers is None:
            return KVCache(zeros(layers, ring), zeros(layers, ring), max_seq=max_seq)
        if layers is None:  # one layer of a mixed stack, index unknown: full length
            return KVCache(zeros(None, max_seq), zeros(None, max_seq), max_seq=max_seq)
        if layers > len(self.window_layers):
            raise ConfigError(
                f"init_cache(layers={layers}): this attention's window_layers covers "
                f"{len(self.window_layers)} layers."
            )
        windowed = sum(self.window_layers[:layers])
        full = layers - windowed
        return KVCache(
            zeros(full, max_seq), zeros(full, max_seq), zeros(windowed, ring), zeros(windowed, ring),
            max_seq=max_seq,
        )

    def _group_slots(self, layer):
        """For layer `layer` of a mixed stack: its slot in the full layers' stack and in the
        windowed layers' stack (0 in the one it is not in)."""
        full, window, nf, nw = [], [], 0, 0
        for w in self.window_layers:
            full.append(0 if w else nf)
            window.append(nw if w else 0)
            nf, nw = nf + (not w), nw + w
        if isinstance(layer, int):
            return full[layer], window[layer]
        i = jnp.clip(jnp.asarray(layer, jnp.int32), 0, len(self.window_layers) - 1)
        return jnp.asarray(full, jnp.int32)[i], jnp.asarray(window, jnp.int32)[i]

    def _attend_cached(self, q, keys, values, key_positions, positions, window):
        """Attention of the new positions' queries over cached keys at `key_positions`
        (negative: empty); `window`: `None`, a width, or `(width, traced flag)`."""
        mask = (key_positions[None, :] <= positions[:, None]) & (key_positions[None, :] >= 0)
        if window is not None:
            width, flag = window if isinstance(window, tuple) else (window, True)
            band = key_positions[None, :] > positions[:, None] - width
            mask = mask & (band if flag is True else band | ~flag)
        if isinstance(keys, QuantizedKV):
            return _xla_attention(
                q, keys.codes.astype(q.dtype), values.codes.astype(q.dtype), mask, self.scale, self.logit_softcap,
                k_scale=keys.scales[..., 0], v_scale=values.scales[..., 0],
            )
        return _xla_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask, self.scale, self.logit_softcap)

    def _decode_group(self, q, k, v, keys, values, slot, index, positions, max_seq, window, valid, keep):
        """Write this step's keys/values into one stack (`keys`, `values`; layer `slot`), and
        attend. Returns `(attend, keys, values, finish)`: `attend()` the attention output,
        `finish(keys, values)` the writes still to do after it."""
        seq = q.shape[0]
        slots = keys.shape[-3]
        k, v = _as_stored(k, keys), _as_stored(v, values)

        def write(keys, values):
            return (
                _cache_write(keys, k, slot, index, max_seq, valid=valid, keep=keep),
                _cache_write(values, v, slot, index, max_seq, valid=valid, keep=keep),
            )

        if _writes_first(keys, seq, max_seq):
            keys, values = write(keys, values)
            if slots >= max_seq:
                key_positions = jnp.arange(slots, dtype=jnp.int32)
            else:
                key_positions = ring_positions(index + seq - 1, slots)

            def attend():
                return self._attend_cached(
                    q, _layer_slice(keys, slot), _layer_slice(values, slot), key_positions, positions, window
                )

            return attend, keys, values, lambda keys, values: (keys, values)

        # A ring taking several positions: the old slots and the new rows side by side.
        key_positions = jnp.concatenate([ring_positions(index - 1, slots), positions])

        def attend_ring():
            both_k = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), _layer_slice(keys, slot), k)
            both_v = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), _layer_slice(values, slot), v)
            return self._attend_cached(q, both_k, both_v, key_positions, positions, window)

        return attend_ring, keys, values, write

    def decode(
        self,
        x: Float[Array, "seq embed"],
        cache: KVCache,
        index: Integer[Array, ""] | int,
        layer: Integer[Array, ""] | int | None = None,
        valid_length: Integer[Array, ""] | int | None = None,
    ) -> tuple[Float[Array, "seq embed"], KVCache]:
        """Attend from `seq` new positions starting at `index`, reading and extending `cache`.

        Used for decoding one token at a time (`seq` = 1), for several at once (speculative
        decoding's checks), and for a prompt at `index` 0, though `prefill` does that one with
        attention over the prompt alone. Equal to `__call__` on the full sequence, position by
        position.

        **Arguments:**

        - `x`: the new positions' inputs.
        - `cache`: the keys/values of earlier positions (from `init_cache`): this layer's
          `(slots, kv_heads, head_dim)` arrays, or, with `layer`, every layer's stacked ones.
        - `index`: the absolute position of `x[0]` (an int32 scalar array, or a Python int).
        - `layer`: which layer's slot of a stacked cache to read and write. The new keys and
          values are written into the stacked arrays in place (inside a scan over layers the
          cache is then a loop carry that is updated, never copied whole). A layer built with
          `window_layers` needs it (and a stacked cache). A Python int routes a mixed stack's
          layer at trace time; a traced one writes both stacks (one of them unchanged) and picks
          the attention with `lax.cond`.
        - `valid_length`: how many of the new positions are real (right-padded prompts); a
          sliding-window ring then keeps the last `sliding_window` real positions rather than
          padding. Default: all.

        **Returns:** `(output, updated cache)`.

        **Raises:** `ConfigError` for a layer built with `causal=False` (a KV cache only makes
        sense when a position never attends to later ones); `ShapeError` for a cache whose
        layout does not match the call or the layer's heads, or (for a concrete `index`)
        positions past the cache's end.
        """
        return self._extend(x, cache, index, layer, valid_length, fresh=False)

    def prefill(
        self,
        x: Float[Array, "seq embed"],
        cache: KVCache,
        layer: Integer[Array, ""] | int | None = None,
        valid_length: Integer[Array, ""] | int | None = None,
    ) -> tuple[Float[Array, "seq embed"], KVCache]:
        """Start a sequence: `decode(x, cache, 0, layer, valid_length)`, with the attention
        computed among the new positions alone, as `__call__` computes it.

        Position 0 has nothing before it, so the cache's earlier contents are never read: the
        attention runs on the layer's training path (cuDNN's fused kernel where `backend`
        resolves to it: half precision, no `logit_softcap`) over `seq` keys rather than over
        every slot of the cache, with the exact keys and values rather than the cache's copy.
        The new keys and values are written as `decode` writes them. Equal to `decode` at
        index 0 to rounding, and exactly on the XLA path with a cache in the compute dtype;
        with a narrower cache (bfloat16 for a float32 model, int8) it is closer to `__call__`
        than `decode` is, since the prompt's attention skips the cache's rounding.

        **Arguments:** as for `decode`, without `index`.

        **Returns:** `(output, updated cache)`.

        **Raises:** as `decode`.
        """
        return self._extend(x, cache, jnp.zeros((), jnp.int32), layer, valid_length, fresh=True)

    def _check_cache(self, cache, seq, index, layer, method):
        """Refuse a cache this layer cannot use: heads of another size or count, a stacked
        cache without `layer`, or (a concrete `index`) positions past its end, where the write
        would be clamped to the last slots and the output silently wrong."""
        who = f"Attention.{method}"
        want = (self.num_kv_heads, self.head_dim)
        for arr in (cache.keys, cache.window_keys):
            if arr is not None and tuple(arr.shape[-2:]) != want:
                raise ShapeError(
                    f"{who}: the cache holds keys of shape {shape_str(arr.shape)}, but this layer has "
                    f"num_kv_heads={want[0]} heads of head_dim={want[1]} (shape (..., slots, {want[0]}, "
                    f"{want[1]})); build the cache with this layer's (or its model's) init_cache."
                )
        if layer is None and cache.keys.ndim != 3:
            raise ShapeError(
                f"{who}: got a stacked cache {shape_str(cache.keys.shape)} (layers, slots, kv_heads, "
                "head_dim) without layer=; pass this layer's index in the stack as layer=i, or use "
                "one layer's cache (init_cache(max_seq) without layers=)."
            )
        if not isinstance(index, jax.core.Tracer):
            start = int(index)
            if start < 0 or start + seq > cache.max_seq:
                raise ShapeError(
                    f"{who}: {seq} position(s) at index {start} need cache positions {start} .. "
                    f"{start + seq - 1}, but the cache covers positions 0 .. {cache.max_seq - 1}; "
                    f"build a longer one with init_cache({max(start + seq, 1)}), or start a new sequence."
                )

    def _extend(self, x, cache, index, layer, valid_length, *, fresh):
        """`decode` (`fresh=False`) or `prefill` (`fresh=True`: attention among the new
        positions only, `index` 0)."""
        if not self.causal:
            raise ConfigError(
                "decode and prefill need causal attention; this layer was built with causal=False (a "
                "bidirectional layer sees later positions, which a KV cache does not hold yet)."
            )
        if layer is not None and cache.keys.ndim != 4:
            raise ShapeError(
                f"decode(layer=...) reads slot `layer` of a stacked cache (layers, slots, kv_heads, "
                f"head_dim); got one layer's cache {shape_str(cache.keys.shape)}. Use the model's "
                "init_cache, or stack this layer's: jax.tree.map(lambda a: a[None], cache)."
            )
        seq = x.shape[0]
        index = jnp.asarray(index, dtype=jnp.int32)
        positions = index + jnp.arange(seq, dtype=jnp.int32)
        windowed = self._windowed(layer)
        self._check_cache(cache, seq, index, layer, "prefill" if fresh else "decode")
        q, k, v = self._qkv(x, positions, windowed)
        layer = layer if layer is None or isinstance(layer, int) else jnp.asarray(layer, jnp.int32)
        mixed = self.window_layers is not None and cache.window_keys is not None
        common = dict(index=index, positions=positions, max_seq=cache.max_seq, valid=valid_length)
        if not mixed:
            if self.window_layers is not None and cache.keys.shape[-3] < cache.max_seq:
                raise ShapeError(
                    "this attention mixes windowed and full layers (window_layers): its cache needs "
                    "either full-length slots for every layer or the two stacks of a mixed cache; "
                    "build it with the model's init_cache (or init_cache(max_seq, layers=n))."
                )
            window = None if windowed is False else self.sliding_window if windowed is True else (self.sliding_window, windowed)
            attend, keys, values, finish = self._decode_group(
                q, k, v, cache.keys, cache.values, layer, window=window, keep=None, **common
            )
            o = self._attend_among(q, k, v, windowed) if fresh else attend()
            keys, values = finish(keys, values)
            return self._out(o), KVCache(keys, values, max_seq=cache.max_seq)
        full_slot, window_slot = self._group_slots(layer)
        static = isinstance(windowed, bool)
        groups = []
        for arrays, slot, in_group, window in (
            ((cache.keys, cache.values), full_slot, not windowed if static else ~windowed, None),
            ((cache.window_keys, cache.window_values), window_slot, windowed, self.sliding_window),
        ):
            if arrays[0].shape[0] == 0 or in_group is False:  # no such layers / not this layer's
                groups.append((None, *arrays, lambda keys, values: (keys, values)))
                continue
            keep = None if in_group is True else in_group
            groups.append(self._decode_group(q, k, v, *arrays, slot, window=window, keep=keep, **common))
        (attend_full, keys, values, finish_full), (attend_window, wkeys, wvalues, finish_window) = groups
        if fresh:
            o = self._attend_among(q, k, v, windowed)
        elif attend_full is None or attend_window is None:
            o = (attend_window or attend_full)()
        else:
            o = jax.lax.cond(windowed, attend_window, attend_full)
        keys, values = finish_full(keys, values)
        wkeys, wvalues = finish_window(wkeys, wvalues)
        return self._out(o), KVCache(keys, values, wkeys, wvalues, max_seq=cache.max_seq)
