"""`Stacked`: N identical layers held as one module with stacked parameters, run by `lax.scan`."""

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, Literal, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ConfigError, as_flag, check_sizes
from .._typing import PRNGKey
from ._fields import with_fields
from ._jaxpr import holds_primitive
from ._pipeline import pipelined_apply

M = TypeVar("M", bound=eqx.Module)
RematPolicy = Literal["none", "full", "dots", "dots_no_batch", "minimal"]
ScanMode = bool | Literal["auto"]

# What `scan="auto"` means on each JAX backend. CPU: scanning compiles ~4x faster at 12 layers
# (benchmarks/compile_time.py) and runs as fast as unrolling (benchmarks/train_throughput.py
# --scan true/false; docs/performance.md). GPU and TPU: scan until benchmarks/gpu_suite.py's
# unrolled row shows a gain there.
SCAN_DEFAULTS: dict[str, bool] = {"cpu": True, "gpu": True, "tpu": True}
"""What `Stacked(scan="auto")` (and the model configs' default `scan_layers="auto"`) does on
each JAX backend: `True` runs `lax.scan`, `False` unrolls. Measured per backend; see the
performance guide."""


def resolve_scan(scan: bool | str, backend: str | None = None) -> bool:
    """Whether a `Stacked` with this `scan` setting runs `lax.scan` on `backend`.

    **Arguments:** `scan`, `True`, `False` or `"auto"` (look up `SCAN_DEFAULTS` for the
    backend; unknown backends scan); `backend` defaults to `jax.default_backend()`.
    """
    if (flag := as_flag(scan)) is not None:
        return flag
    if not (isinstance(scan, str) and scan == "auto"):
        raise ConfigError(f"scan must be True, False or 'auto', got {scan!r}.")
    backend = jax.default_backend() if backend is None else backend
    return SCAN_DEFAULTS.get(backend, True)

def _eager_traces() -> tuple[type, ...] | None:
    """The JAX trace types that evaluate each operation as it is called (no trace at all, and
    `jax.grad`, `jax.jvp` and `jax.vmap` applied eagerly); `None` where this JAX release moved
    them (then only tracer-free inputs count as eager)."""
    try:  # no public names for these
        from jax._src.core import EvalTrace
        from jax._src.interpreters.ad import JVPTrace, LinearizeTrace
        from jax._src.interpreters.batching import BatchTrace
    except ImportError:
        return None
    return (EvalTrace, JVPTrace, LinearizeTrace, BatchTrace)


_EAGER_TRACES = _eager_traces()


def eager_mode(values: Any) -> Literal["staged", "eager", "eager_grad"]:
    """How a computation on `values` runs at this point: `"staged"` while `jax.jit`,
    `lax.scan`, `jax.checkpoint`, `eqx.filter_eval_shape` or any other tracing into a program
    is in progress; `"eager"` when each operation runs as it is called (no JAX transformation,
    or only `jax.vmap`); `"eager_grad"` when also under an eager `jax.grad` / `jax.jvp`.

    Read from the active JAX traces (the stack of transformations in progress), and from
    `values`' leaves where those cannot be read: a `jax.core.Tracer` among them then means
    `"staged"`.
    """
    from jax._src import core as jax_core  # trace_ctx: no public name either

    trace = getattr(getattr(jax_core, "trace_ctx", None), "trace", None) if _EAGER_TRACES else None
    if trace is None:
        tracers = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(values))
        return "staged" if tracers else "eager"
    differentiated = False
    while trace is not None:
        if not isinstance(trace, _EAGER_TRACES):
            return "staged"
        differentiated = differentiated or isinstance(trace, _EAGER_TRACES[1:3])
        trace = getattr(trace, "parent_trace", None)
    return "eager_grad" if differentiated else "eager"


# Primitives whose eager evaluation compiles their sub-programs, cached by the sub-program object
# itself, which a layer's closure builds anew on every call.
_EAGER_COMPILED = frozenset({"cond", "while", "scan"})


def _compiles_eagerly(jaxpr: Any) -> bool:
    """Whether `jaxpr` (or one of its sub-programs, except those of nested `jax.jit` calls,
    which JAX caches by function) holds a `cond`, `while_loop` or `scan`: run eagerly, each
    would be compiled again on every call."""
    return holds_primitive(jaxpr, _EAGER_COMPILED, skip=("jit", "pjit"))


# Names given with `jax.ad_checkpoint.checkpoint_name` inside eqzoo's layers. "minimal" keeps only
# each residual branch's output, so the backward pass recomputes everything inside a layer except
# what the next layer needs.
_MINIMAL_SAVED = ("attn_out", "mlp_out")

REMAT_POLICIES: dict[str, str] = {
    "none": "store every intermediate (fastest, most memory)",
    "full": "store only each layer's input; recompute the whole layer in the backward pass",
    "dots": "store matrix-multiply results, recompute elementwise work",
    "dots_no_batch": "store matrix multiplies without batch dimensions (weights x activations)",
    "minimal": "store only the named outputs of the attention and MLP branches",
}


def remat_policy(name: str) -> Callable[..., Any] | None:
    """The `jax.checkpoint` policy for a named remat policy; `None` for `"none"`.

    **Arguments:** `name`, one of `eqzoo.nn.REMAT_POLICIES`.

    **Returns:** a policy usable as `jax.checkpoint(f, policy=...)`, or `None`.
    """
    policies = jax.checkpoint_policies
    table = {
        "none": None,
        "full": policies.nothing_saveable,
        "dots": policies.checkpoint_dots,
        "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
        "minimal": policies.save_only_these_names(*_MINIMAL_SAVED),
    }
    if name not in table:
        raise ConfigError(f"unknown remat policy {name!r}; choose one of {sorted(table)}.")
    return table[name]


class Stacked(eqx.Module, Generic[M]):
    """N layers of identical structure whose array leaves are stacked along a leading axis.

    Applying it runs `lax.scan` over that axis, so the layer is traced and compiled once whatever
    N is (compile time flat in depth); `scan=False` unrolls a Python loop instead (one copy of the
    layer per depth in the compiled program, which can be faster to run on some backends). Each
    layer's body is wrapped in `jax.checkpoint` with the named `remat` policy.

    Both apply while the call is being traced (inside `jax.jit`, `eqx.filter_jit`, a train step,
    `lax.scan`, ...). Called eagerly, outside any of those (`model(tokens)` in a notebook, also
    under an eager `jax.grad` or `jax.vmap`), the stack loops over its layers in Python and JAX
    runs it op by op: a scan of the call's new closure would be compiled again on every call,
    while each operation reuses the program JAX compiled for it the first time. The first eager
    call compiles more (one small program per operation and shape), later ones nothing. The
    eager loop skips `jax.checkpoint` when no eager `jax.grad` / `jax.jvp` is in progress
    (nothing would be saved for a backward pass) and never runs the pipeline schedule. A layer
    holding control flow (`lax.cond`, a loop or a scan, which JAX compiles whenever it runs
    one built anew) still runs the scan eagerly: one compile per call rather than one per
    layer and call. Values match the scan's within the compute dtype's rounding (unfused, op by
    op).
    """

    layers: M
    num_layers: int = eqx.field(static=True)
    remat: str = eqx.field(static=True)
    scan: ScanMode = eqx.field(static=True)

    def __init__(
        self,
        make_layer: Callable[[PRNGKey], M],
        num_layers: int,
        *,
        remat: RematPolicy = "none",
        scan: bool | str = True,  # a ScanMode; checked below with a clearer message than beartype's
        key: PRNGKey,
    ):
        """**Arguments:**

        - `make_layer`: builds one layer from a key; called under `eqx.filter_vmap` over
          `num_layers` keys, so every layer has the same structure.
        - `num_layers`: depth.
        - `remat`: the rematerialisation policy name (see `REMAT_POLICIES`).
        - `scan`: `lax.scan` over layers (`True`), an unrolled loop (`False`), or `"auto"`:
          whichever `SCAN_DEFAULTS` records as faster on the backend at trace time. Eager
          calls loop in Python whatever it says (see above).
        - `key`: a PRNG key.
        """
        check_sizes("Stacked", num_layers=num_layers)
        remat_policy(remat)  # validate
        resolve_scan(scan, "cpu")  # validate
        keys = jax.random.split(key, num_layers)
        self.layers = eqx.filter_vmap(make_layer)(keys)
        self.num_layers = num_layers
        self.remat = remat
        self.scan = scan if as_flag(scan) is None else as_flag(scan)  # "auto", or a bool

    @classmethod
    def from_layers(cls, layers: Sequence[M], *, remat: RematPolicy = "none", scan: ScanMode = True) -> "Stacked[M]":
        """Stack a list of layers with identical structure and static fields.

        **Raises:** `ConfigError` if the layers differ in structure or in static fields.
        """
        if not layers:
            raise ConfigError("Stacked.from_layers needs at least one layer.")
        parts = [eqx.partition(layer, eqx.is_array) for layer in layers]
        statics = [jax.tree.structure(p[0]) for p in parts]
        if any(s != statics[0] for s in statics) or any(
            not eqx.tree_equal(p[1], parts[0][1]) for p in parts
        ):
            raise ConfigError("Stacked.from_layers: layers must share structure and static fields.")
        arrays = jax.tree.map(lambda *xs: jnp.stack(xs), *[p[0] for p in parts])
        template = cls(lambda _: layers[0], len(layers), remat=remat, scan=scan, key=jax.random.key(0))
        return eqx.tree_at(lambda s: s.layers, template, eqx.combine(arrays, parts[0][1]))

    def unstacked(self) -> "Stacked[M]":
        """The layers sliced out of the stack once, held as a tuple and run unrolled.

        For code that applies the stack many times inside one loop (token-by-token decoding):
        call this outside the loop, so the loop body reads each layer's own arrays instead of
        slicing (copying) them out of the stacked arrays on every iteration.
        """
        if isinstance(self.layers, tuple):
            return self
        return with_fields(self, layers=tuple(self[i] for i in range(self.num_layers)), scan=False)

    def first(self, n: int) -> "Stacked[M]":
        """The first `n` layers as a stack of their own (same scan and remat settings): e.g. a
        model's early layers as a draft for [`eqzoo.generation.generate_speculative`][],
        `eqx.tree_at(lambda m: m.blocks, model, model.blocks.first(2))`. (Such a model's
        `config` still gives the full depth: fine for decoding, not for `num_params` or for
        saving and rebuilding it from its config.)"""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.num_layers:
            raise ConfigError(f"Stacked.first: n must be between 1 and num_layers={self.num_layers}, got {n!r}.")
        if isinstance(self.layers, tuple):
            layers = self.layers[:n]
        else:
            arrays, static = eqx.partition(self.layers, eqx.is_array)
            layers = eqx.combine(jax.tree.map(lambda a: a[:n], arrays), static)
        return with_fields(self, layers=layers, num_layers=n)

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, i: int) -> M:
        """Layer `i` as an ordinary module (its arrays sliced out of the stack); a negative `i`
        counts from the end, as for a list.

        **Raises:** `IndexError` for `i` outside `[-num_layers, num_layers)`: JAX would clamp
        it and return the last layer instead.
        """
        if isinstance(i, int | np.integer) and not isinstance(i, bool):
            if not -self.num_layers <= i < self.num_layers:
                raise IndexError(
                    f"Stacked index {int(i)} is out of range for a stack of {self.num_layers} layers."
                )
            i = int(i) % self.num_layers
        if isinstance(self.layers, tuple):  # unstacked()
            return self.layers[i]
        arrays, static = eqx.partition(self.layers, eqx.is_array)
        return eqx.combine(jax.tree.map(lambda a: a[i], arrays), static)

    def __iter__(self) -> Iterator[M]:
        """Each layer in order, as `self[i]` gives it."""
        return (self[i] for i in range(self.num_layers))

    def apply(
        self, fn: Callable[[M, Any, Any], tuple[Any, Any]], carry: Any, xs: Any = None, *, pipeline: bool = True
    ) -> tuple[Any, Any]:
        """Run `carry, y = fn(layer, carry, x)` through the layers in order.

        Under an eqzoo mesh with `stage > 1` (inside [`eqzoo.sharding.activation_sharding`][])
        and `jax.vmap` over a batch, while traced (under `jax.jit`, a train step; not eagerly,
        see the class docstring), the stack runs as a pipeline: its layers split by depth
        over `stage`, the batch in micro-batches (docs/scaling.md, "Pipeline parallelism").
        The values are those of the plain scan.

        **Arguments:**

        - `fn`: called once per layer with that layer, the running carry and that layer's slice
          of `xs` (or `None`).
        - `carry`: the initial carry (usually the activations).
        - `xs`: optional per-layer inputs with a leading axis of size `num_layers` (for example
          per-layer KV caches or dropout keys).
        - `pipeline`: `False` always runs the plain scan (XLA gathers each stage's layers where
          they are used). For a carry holding per-layer state, such as the stacked KV cache
          the models' decoding passes, which a pipeline would ship whole from stage to stage
          with every micro-batch. Where `stage` is 1 it changes nothing.

        **Returns:** the final carry and the per-layer outputs stacked along a leading axis.
        """
        unstacked = isinstance(self.layers, tuple)  # see unstacked(): each layer's own arrays
        if unstacked:
            per_layer = [eqx.partition(layer, eqx.is_array) for layer in self.layers]
            static = per_layer[0][1]
        else:
            arrays, static = eqx.partition(self.layers, eqx.is_array)

        def body(c, inputs):
            layer_arrays, x = inputs
            return fn(eqx.combine(layer_arrays, static), c, x)

        # Eagerly (no jit), a scan or a checkpoint of this call's new `body` closure would be
        # traced and compiled anew on every call; a Python loop runs op by op, each operation
        # reusing JAX's compiled program for its primitive and shapes.
        mode = eager_mode((carry, per_layer if unstacked else arrays, xs))
        if mode != "staged" and not unstacked and self._layer_compiles_eagerly(body, carry, arrays, xs):
            mode = "staged"  # a layer with control flow: one scan compile per call beats one per layer
        policy = remat_policy(self.remat)
        scan = not unstacked and mode == "staged" and resolve_scan(self.scan)
        if self.remat != "none" and mode != "eager":  # no backward pass to save memory for
            body = jax.checkpoint(body, policy=policy, prevent_cse=not scan)
        if pipeline and not unstacked and mode == "staged":
            piped = pipelined_apply(body, arrays, carry, xs, self.num_layers, scan=scan)
            if piped is not None:
                return piped
        if scan:
            return jax.lax.scan(body, carry, (arrays, xs))
        ys = []
        for i in range(self.num_layers):
            layer_arrays = per_layer[i][0] if unstacked else jax.tree.map(lambda a, i=i: a[i], arrays)
            carry, y = body(carry, (layer_arrays, jax.tree.map(lambda a, i=i: a[i], xs)))
            ys.append(y)
        return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)

    def _layer_compiles_eagerly(self, body: Callable, carry: Any, arrays: Any, xs: Any) -> bool:
        """Whether one layer's `body` holds control flow (`_compiles_eagerly`), traced on the
        first layer's shapes (no compilation). Such a layer run eagerly, op by op, would compile
        its `cond` or loop once per layer and call, where the scan compiles once per call."""
        first = jax.tree.map(lambda a: a[0], (arrays, xs))
        return _compiles_eagerly(jax.make_jaxpr(body)(carry, first).jaxpr)

    def __call__(self, x: Any, *, key: PRNGKey | None = None) -> Any:
        """Apply each layer in turn: `x = layer(x)` (with a distinct key per layer if given)."""
        if key is None:
            out, _ = self.apply(lambda layer, c, _: (layer(c), None), x)
        else:
            keys = jax.random.split(key, self.num_layers)
            out, _ = self.apply(lambda layer, c, k: (layer(c, key=k), None), x, keys)
        return out
