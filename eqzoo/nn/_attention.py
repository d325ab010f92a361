"""Causal multi-head / grouped-query self-attention with rotary embeddings and a KV cache."""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int

from .._errors import ConfigError, ShapeError, shape_str
from .._typing import PRNGKey
from ._linear import AbstractLinear, apply_linear, init_linear, linear_dtype
from ._norm import RMSNorm
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


def _xla_attention(q, k, v, mask, scale=None, cap=None):
    """Scaled dot-product attention of one sequence; `mask` is `(seq, kv_seq)`, True = attend.
    `scale` multiplies the logits (default `head_dim ** -0.5`); `cap` soft-caps them
    (`softcap`) before the mask (Gemma 2)."""
    # The XLA path, written out rather than `jax.nn.dot_product_attention(implementation="xla")`:
    # for half-precision inputs JAX's version requests a BF16_BF16_F32 dot algorithm whose
    # backward pass fails to lower under strict dtype promotion. Same numerics: logits and softmax
    # in float32, probabilities cast back to the value dtype.
    seq, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(seq, kv_heads, heads // kv_heads, head_dim)  # query head h uses kv head h // group
    logits = jnp.einsum("tkgh,skh->kgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(head_dim**-0.5 if scale is None else scale)
    if cap is not None:
        logits = softcap(logits, cap)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("kgts,skh->tkgh", probs, v)
    return out.reshape(seq, heads, head_dim)


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


class KVCache(eqx.Module):
    """Keys and values of the positions already decoded, for one sequence: one layer's, or every
    layer's stacked along a leading axis (what a model's `init_cache` returns).

    Positions at or beyond the current decode index hold stale values; attention masks them.
    """

    keys: Float[Array, "*layers max_seq kv_heads head_dim"]
    values: Float[Array, "*layers max_seq kv_heads head_dim"]

    @property
    def max_seq(self) -> int:
        """How many positions the cache can hold."""
        return self.keys.shape[-3]


class Attention(eqx.Module):
    """Causal self-attention with multi-head or grouped-query heads (Ainslie et al., 2023).

    `num_kv_heads < num_heads` shares each key/value head between `num_heads // num_kv_heads`
    query heads. Rotary embeddings are applied to queries and keys when `use_rope`. The attention
    itself is cuDNN flash attention (`jax.nn.dot_product_attention`) on GPU, or a plain XLA
    einsum-softmax-einsum program (`backend`).
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
        if backend not in _BACKENDS:
            raise ConfigError(f"attention backend must be one of {_BACKENDS}, got {backend!r}.")
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
        for name, value in (("scale", scale), ("logit_softcap", logit_softcap)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0):
                raise ConfigError(f"{name} must be a positive number or None, got {value!r}.")
        if logit_softcap is not None and backend == "cudnn":
            raise ConfigError(
                "logit_softcap has no cuDNN implementation (jax.nn.dot_product_attention takes no "
                "softcap); use backend='xla', or 'auto', which runs XLA's attention for it."
            )
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
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        layer: Int[Array, ""] | int | None = None,
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
        seq = x.shape[0]
        check_per_position("positions", positions, seq, "Attention")
        check_per_position("segment_ids", segment_ids, seq, "Attention")
        if positions is None:
            positions = jnp.arange(seq, dtype=jnp.int32)
        windowed = self._windowed(layer)
        q, k, v = self._qkv(x, positions, windowed)
        mask = None
        if segment_ids is not None:
            mask = segment_ids[:, None] == segment_ids[None, :]
        window = self.sliding_window if windowed is not False else None
        backend = "xla" if self.logit_softcap is not None else resolve_backend(self.backend, q.dtype, self.head_dim)
        if backend == "cudnn":
            # The segment mask reaches cuDNN as an additive bias (jax turns a boolean mask into
            # one), given per head: under vmap, jax 0.10's batching rule for the cuDNN call
            # reshapes a batched bias to (batch, heads, seq, seq) and fails on a head axis of 1.
            # The window is cuDNN's own (`(window - 1, 0)`: itself and window - 1 before).
            # A window on some layers of a stack only: both calls are compiled and the layer's
            # flag picks one at run time (cuDNN's window is a static argument).
            if mask is not None:
                mask = jnp.broadcast_to(mask, (self.num_heads, seq, seq))

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
            if self.causal:
                causal = jnp.tril(jnp.ones((seq, seq), bool))
                if window is not None and window < seq:
                    band = jnp.triu(jnp.ones((seq, seq), bool), -(window - 1))
                    causal = causal & (band if windowed is True else band | ~windowed)
                mask = causal if mask is None else mask & causal
            elif mask is None:
                mask = jnp.ones((seq, seq), bool)
            o = _xla_attention(q, k, v, mask, self.scale, self.logit_softcap)
        return self._out(o)

    def init_cache(self, max_seq: int, *, dtype=None) -> KVCache:
        """An empty [`eqzoo.nn.KVCache`][] for `max_seq` positions (dtype defaults to the params')."""
        dtype = linear_dtype(self.q_proj) if dtype is None else dtype
        shape = (max_seq, self.num_kv_heads, self.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def decode(
        self,
        x: Float[Array, "seq embed"],
        cache: KVCache,
        index: Int[Array, ""],
        layer: Int[Array, ""] | None = None,
    ) -> tuple[Float[Array, "seq embed"], KVCache]:
        """Attend from `seq` new positions starting at `index`, reading and extending `cache`.

        Used for prefill (`seq` = prompt length, `index` = 0) and for decoding one token at a time
        (`seq` = 1). Equal to `__call__` on the full sequence, position by position.

        **Arguments:**

        - `x`: the new positions' inputs.
        - `cache`: the keys/values of earlier positions: this layer's `(max_seq, kv_heads,
          head_dim)` arrays, or, with `layer`, every layer's `(layers, max_seq, kv_heads,
          head_dim)` arrays.
        - `index`: the absolute position of `x[0]` (an int32 scalar array).
        - `layer`: which layer's slot of a stacked cache to read and write. The new keys and
          values are written into the stacked arrays in place (inside a scan over layers the
          cache is then a loop carry that is updated, never copied whole). A layer built with
          `window_layers` needs it (and a stacked cache).

        **Returns:** `(output, updated cache)`.

        **Raises:** `ConfigError` for a layer built with `causal=False` (a KV cache only makes
        sense when a position never attends to later ones).
        """
        if not self.causal:
            raise ConfigError(
                "decode needs causal attention; this layer was built with causal=False (a "
                "bidirectional layer sees later positions, which a KV cache does not hold yet)."
            )
        if layer is not None and cache.keys.ndim != 4:
            raise ShapeError(
                f"decode(layer=...) reads slot `layer` of a stacked cache (layers, max_seq, kv_heads, "
                f"head_dim); got one layer's cache {shape_str(cache.keys.shape)}. Use the model's "
                "init_cache, or stack this layer's: jax.tree.map(lambda a: a[None], cache)."
            )
        seq = x.shape[0]
        index = jnp.asarray(index, dtype=jnp.int32)
        positions = index + jnp.arange(seq, dtype=jnp.int32)
        windowed = self._windowed(layer)
        q, k, v = self._qkv(x, positions, windowed)
        zero = jnp.zeros((), jnp.int32)
        k = k.astype(cache.keys.dtype)
        v = v.astype(cache.values.dtype)
        if layer is None:
            keys = jax.lax.dynamic_update_slice(cache.keys, k, (index, zero, zero))
            values = jax.lax.dynamic_update_slice(cache.values, v, (index, zero, zero))
            layer_keys, layer_values = keys, values
        else:
            layer = jnp.asarray(layer, dtype=jnp.int32)
            keys = jax.lax.dynamic_update_slice(cache.keys, k[None], (layer, index, zero, zero))
            values = jax.lax.dynamic_update_slice(cache.values, v[None], (layer, index, zero, zero))
            layer_keys = jax.lax.dynamic_index_in_dim(keys, layer, keepdims=False)
            layer_values = jax.lax.dynamic_index_in_dim(values, layer, keepdims=False)
        max_seq = layer_keys.shape[0]
        key_positions = jnp.arange(max_seq, dtype=jnp.int32)
        mask = key_positions[None, :] <= positions[:, None]  # (seq, max_seq)
        if windowed is not False:
            band = key_positions[None, :] > positions[:, None] - self.sliding_window
            mask = mask & (band if windowed is True else band | ~windowed)
        o = _xla_attention(
            q, layer_keys.astype(q.dtype), layer_values.astype(q.dtype), mask, self.scale, self.logit_softcap
        )
        return self._out(o), KVCache(keys, values)
