"""Compiled train and eval steps: pure functions of (state, batch), dispatched with low overhead."""

import inspect
import operator
import threading
from collections.abc import Callable, Collection
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import PyTree

from .._errors import ConfigError, ShapeError, holds_deleted, int_hint, shape_str
from ..nn._grouped import summed_weight_gradients
from ..sharding._activation import (
    ContextAttention,
    batch_axes,
    check_context_attention,
    check_pipeline_microbatches,
    check_pipeline_repeats,
)
from ..sharding._errors import ShardingError
from ..sharding._mesh import SEQUENCE_KEYS, check_mesh
from ._losses import tree_global_norm
from ._precision import DynamicLossScale, Precision, check_precision
from ._state import StateParts, TrainState

LossFn = Callable[..., Any]


def _split_loss(out: Any, stateful: bool) -> tuple[Any, Any, dict]:  # the loss is checked after
    """Normalise a loss function's return value to `(loss, model_state, aux)`."""
    if stateful:
        if not isinstance(out, tuple) or len(out) not in (2, 3):
            raise ConfigError(
                "with a model_state, loss_fn(model, model_state, batch, key) must return "
                "(loss, model_state) or (loss, model_state, aux)."
            )
        return out[0], out[1], (out[2] if len(out) == 3 else {})
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ConfigError("loss_fn(model, batch, key) must return a loss or (loss, aux).")
        return out[0], None, out[1]
    return out, None, {}


def _check_arity(loss_fn: LossFn, stateful: bool, who: str) -> None:
    """Raise `ConfigError` when `loss_fn` cannot take the arguments the step passes: four with a
    `model_state` (`model, model_state, batch, key`), three without. Python's own `TypeError`
    ("missing 1 required positional argument: 'key'") does not say that the state decides."""
    try:
        params = inspect.signature(loss_fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): let the call decide
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is p.empty for p in positional)
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    if stateful and not varargs and len(positional) < 4:
        raise ConfigError(
            f"{who}: the state holds a model_state, so the loss is called as {name}(model, model_state, "
            f"batch, key), but {name} takes at most {len(positional)} positional arguments. Write a loss "
            "that takes and returns the model_state, or build the state without model_state=."
        )
    if not stateful and required > 3:
        raise ConfigError(
            f"{who}: {name} needs {required} positional arguments (model, model_state, batch, key?), but the "
            "state has no model_state, so it is called as loss_fn(model, batch, key). For a stateful model "
            "(BatchNorm) pass model_state= to TrainState.create (from eqx.nn.make_with_state)."
        )


def _check_scalar_loss(loss):
    if not hasattr(loss, "shape"):  # a Python number does not depend on the parameters
        raise ShapeError(
            f"loss_fn must return a JAX scalar computed from the model; got a {type(loss).__name__} "
            f"({loss!r}), which no gradient can flow through (a float(...) or .item() inside the loss?)."
        )
    if loss.shape != ():
        raise ShapeError(
            f"loss_fn must return a scalar loss; got shape {shape_str(loss.shape)}. "
            "Reduce it with jnp.mean."
        )


def _weigh(x, w):
    """`x * w` for a floating array; other arrays (integer counts) unchanged."""
    return x * w.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _weigh_aux(aux, w, counted):
    """Every floating metric times `w`, except the count `"tokens"` itself when weighting by it."""
    if isinstance(aux, dict):
        return {name: a if counted and name == "tokens" else jax.tree.map(lambda x: _weigh(x, w), a) for name, a in aux.items()}
    return jax.tree.map(lambda x: _weigh(x, w), aux)


def _microbatches(batch: PyTree, k: int, strided: bool = False) -> PyTree:
    def split(x):
        if x.ndim == 0 or x.shape[0] % k:
            raise ShapeError(
                f"gradient accumulation over {k} micro-batches needs every batch array's leading "
                f"axis divisible by {k}; got an array of shape {shape_str(x.shape)}."
            )
        if strided:
            # Micro-batch i takes rows i, i+k, ...: with the batch split over devices, every
            # micro-batch then has rows on every device and none has to be gathered.
            return x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
        return x.reshape((k, x.shape[0] // k) + x.shape[1:])

    return jax.tree.map(split, batch)


def _check_microbatches(batch: PyTree, k: int, mesh) -> None:
    """With `mesh=`, micro-batch `i` takes rows `i, i+k, ...` so that it is spread over every
    device of the batch axes; its rows must fill them evenly (read at trace time). Fewer rows, or
    a count they do not divide, left each micro-batch for XLA to re-lay out inside the scan:
    ring attention's `shard_map` failed on it, and on `data=2,fsdp=2,tensor=2` XLA:CPU's
    collectives deadlocked and aborted the process."""
    if mesh is None or k == 1:
        return
    axes = batch_axes(mesh)
    ways = int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))
    rows = {x.shape[0] // k for x in jax.tree.leaves(batch) if x.ndim and x.shape[0] % k == 0}
    for n in sorted(rows):
        if n % ways:
            whole = n * k
            fewer = [d for d in range(k - 1, 0, -1) if whole % ways == 0 and (whole // ways) % d == 0]
            hint = f", or grad_accum_steps={fewer[0]} for this batch" if fewer else ""
            raise ShardingError(
                f"make_train_step: grad_accum_steps={k} cuts the batch of {whole} rows into micro-batches of {n} "
                f"rows, but each micro-batch is split over the mesh's batch axes "
                f"{dict((a, int(mesh.shape[a])) for a in axes)} ({ways} ways), which {n} rows do not fill evenly. "
                f"Use a batch of a multiple of {k * ways} rows{hint}."
            )


def _known(compiled: dict, structure, same: Callable[[Any], bool] = lambda known: True) -> Callable | None:
    """The function compiled for `structure`, or for an earlier structure equal to it.

    Structures are looked up by identity (no per-step work), but `state.replace(...)`,
    `TrainState.from_parts`, `shard_state` and a checkpoint restore each make a new, equal one:
    matched here by treedef, non-array leaves and trainable filter, they reuse the compiled
    step rather than trace and compile it again (and keep another executable alive). `same`
    adds a test of the earlier structure (a mesh step's compiled layout)."""
    fn = compiled.get(structure)
    if fn is not None:
        return fn
    for known, known_fn in compiled.items():
        if (
            known.treedef == structure.treedef
            and known.trainable is structure.trainable
            and eqx.tree_equal(known.static, structure.static) is True
            and same(known)
        ):
            compiled[structure] = known_fn
            return known_fn
    return None


def _state_parts(state, who: str) -> tuple:
    """`(state.structure, state.arrays)`, or a `ConfigError` when `state` is not a `TrainState`
    (a model passed where the state belongs): read without a check on the per-step path, so a
    `TrainState` costs nothing more."""
    try:
        return state.structure, state.arrays
    except AttributeError:
        raise ConfigError(
            f"a {who} is called as step(state, batch) with a TrainState; got a {type(state).__name__}. Build the "
            "state once, state = eqzoo.train.TrainState.create(model, optimizer, key=...), and go on with the state "
            "each call returns."
        ) from None


def _refuse_donated(arrays: tuple, err: Exception, who: str) -> None:
    """After a step's call failed with `err`: a `ConfigError` (from it) when the cause is a state
    whose buffers an earlier train step donated, which JAX reports only as an invalid or deleted
    buffer; otherwise nothing (the caller re-raises `err`). Both are asked for: JAX's message
    names a deleted or donated buffer, and an input array is deleted (a step that fails while it
    runs, out of memory say, has deleted its donated inputs too)."""
    said = "deleted" in str(err) or "donated" in str(err)
    if said and holds_deleted(arrays):
        raise ConfigError(
            f"the {who} was given a state whose arrays were deleted: a train step donates the state it is given "
            "(its buffers hold the new state), so a state can go into one train step only. Go on with the state "
            "the step returns, state, metrics = step(state, batch), and read the model from it (state.model); "
            "or build the step with make_train_step(..., donate=False) to keep every state, at twice the memory."
        ) from err


class TrainStep:
    """A compiled `step(state, batch) -> (state, metrics)`; made by [`eqzoo.train.make_train_step`][].

    The first call for a given state structure traces and compiles; later calls dispatch the
    cached executable over the state's flat arrays (donated, so the input state must not be used
    again; the model arrays the trainable filter leaves out are neither donated nor copied: the
    new state holds the same ones). Metrics are device scalars; convert with `float()` only when you log them.
    """

    def __init__(
        self, pure_step: Callable, donate: bool, mesh: jax.sharding.Mesh | None = None,
        sequence_keys: Collection[str] | None = SEQUENCE_KEYS, context_attention: str = "gather",
        pipeline_microbatches: int | None = None, pipeline_repeats: int = 1,
    ):
        self._pure_step = pure_step
        self._donate = donate
        self._mesh = mesh
        self._context_attention = context_attention
        self._pipeline_microbatches = pipeline_microbatches
        self._pipeline_repeats = pipeline_repeats
        self._sequence_keys = _checked_sequence_keys(sequence_keys, "make_train_step")
        # One process holds the whole batch, so a host (numpy) batch is the global batch and is
        # split over the mesh here; on several processes which rows it is is the caller's to say
        # (make_global_batch).
        self._place_host_batches = mesh is not None and jax.process_count() == 1
        self._compiled: dict[Any, Callable] = {}
        self._traces: dict[Any, int] = {}
        self._compiles = 0  # XLA compilations of the step, counted by _on_compile
        _listen_for_compiles()
        self._layouts: dict[Any, tuple] = {}  # under a mesh: the state layout each was compiled for

    def _jitted(self, structure, arrays):
        fn = self._compiled.get(structure)  # the per-step path: one dict lookup
        if fn is None and self._mesh is None:
            fn = _known(self._compiled, structure)
        elif fn is None:  # the compiled step pins the state to its layout: reuse it only for that one
            layout = tuple(getattr(a, "sharding", None) for a in arrays)
            fn = _known(self._compiled, structure, lambda known: self._layouts.get(known) == layout)
            if fn is not None:
                self._layouts[structure] = layout
        if fn is None:
            pure = self._pure_step
            mesh = self._mesh
            jit_kwargs = {}
            frozen = _frozen_indices(structure, arrays)
            split = _Split(len(arrays), frozen) if frozen else None
            if mesh is None:

                def flat_step(arrays, batch):
                    return pure(structure, arrays, batch)

            else:
                from ..sharding import activation_sharding  # eqzoo.sharding imports eqzoo.train

                shardings = _mesh_shardings(arrays, mesh)

                options = {
                    "context_attention": self._context_attention,
                    "pipeline_microbatches": self._pipeline_microbatches,
                    "pipeline_repeats": self._pipeline_repeats,
                }

                def flat_step(arrays, batch):
                    with activation_sharding(mesh, **options):
                        return pure(structure, arrays, batch, shardings)

                # Pin the new state to the input state's layout, so it stays sharded step after
                # step and donated buffers are reused; metrics are replicated.
                out = shardings if split is None else split.updated(shardings)
                jit_kwargs["out_shardings"] = (out, jax.NamedSharding(mesh, jax.P()))
                self._layouts[structure] = shardings
            untraced = flat_step

            def flat_step(arrays, batch):  # counts traces, for num_compilations' fallback
                self._traces[structure] = self._traces.get(structure, 0) + 1
                return untraced(arrays, batch)

            if split is None:
                fn = jax.jit(flat_step, donate_argnums=(0,) if self._donate else (), **jit_kwargs)
            else:
                whole = flat_step

                def flat_step(updated, frozen, batch):  # only the updated arrays go in donated and come back
                    arrays, metrics = whole(split.merge(updated, frozen), batch)
                    return split.updated(arrays), metrics

                jitted = jax.jit(flat_step, donate_argnums=(0,) if self._donate else (), **jit_kwargs)
                fn = _SplitStep(jitted, split)
            self._compiled[structure] = fn
        return fn

    def __call__(self, state: TrainState, batch: PyTree) -> tuple[TrainState, dict[str, jax.Array]]:
        """Take one optimizer step. **Returns:** `(new state, metrics)`."""
        if self._place_host_batches and any(isinstance(x, np.ndarray) and x.ndim for x in jax.tree.leaves(batch)):
            batch = _place_host_batch(batch, self._mesh, self._sequence_keys)
        structure, arrays = _state_parts(state, "train step")
        fn = self._jitted(structure, arrays)
        outer = getattr(_calling, "step", None)  # a step whose loss calls this one (restored below)
        _calling.step = self  # the compile listener credits compilations during the call to this step
        try:
            arrays, metrics = fn(arrays, batch)
        except Exception as err:
            _refuse_donated(arrays, err, "train step")
            raise
        finally:
            _calling.step = outer
        # Called through the class: a bound method of an Equinox module costs ~17 µs to build.
        return TrainState._with_arrays(state, arrays), metrics

    def lower(self, state: TrainState, batch: PyTree):
        """`jax.jit(...).lower` for this state and batch (to inspect HLO or compile ahead):
        `.compile()` of it is called as `compiled(state.arrays, batch)` and returns the new
        state's flat arrays and the metrics, whether or not the state has frozen arrays."""
        return self._jitted(state.structure, state.arrays).lower(state.arrays, batch)

    @property
    def num_compilations(self) -> int:
        """How many programs the step has needed: one per state structure, batch shape and
        input layout, so a second one means the step recompiled (`jax_log_compiles` shows the
        same count). It is the larger of two counts: JAX's compile events during the step's
        calls (XLA compiling, or reading JAX's persistent compilation cache), which see a
        recompile for a new input layout that needs no new trace; and the step's traces, which
        see the program a call found compiled ahead (`step.lower(...).compile()`, which JAX then
        reuses without a compile event). (The `jax.jit` dispatch cache's entries are not
        compilations: on a mesh a typed PRNG key that a call returned gets a second entry,
        without a trace or compile, by the third call.) Where a JAX release emits no compile
        event, the traces alone are counted."""
        traces = sum(self._traces.values())
        return max(self._compiles, traces) if _compile_events_seen else traces


def _frozen_indices(structure, arrays) -> tuple[int, ...]:
    """The positions in `arrays` of the model arrays that the trainable filter leaves out (a
    base model under LoRA, int8 codes): the step returns them unchanged. Read from a trace of
    the state (`arrays` may be abstract), where the filter sees what it sees in the step."""
    frozen: list[int] = []

    def probe(arrays):
        position = {id(a): i for i, a in enumerate(arrays)}
        model = structure.unflatten(arrays).model
        is_none = lambda x: x is None  # noqa: E731  (keeps the two flattenings aligned)
        chosen = jax.tree.leaves(eqx.filter(model, structure.trainable), is_leaf=is_none)
        for leaf, kept in zip(jax.tree.leaves(model, is_leaf=is_none), chosen, strict=True):
            if kept is None and id(leaf) in position:
                frozen.append(position[id(leaf)])

    jax.eval_shape(probe, tuple(arrays))
    return tuple(sorted(frozen))


def _getter(indices: tuple[int, ...]) -> Callable[[tuple], tuple]:
    """`lambda xs: tuple(xs[i] for i in indices)`, at C speed (one item still gives a tuple)."""
    if not indices:
        return lambda xs: ()
    get = operator.itemgetter(*indices)
    return get if len(indices) > 1 else lambda xs: (get(xs),)


class _Split:
    """A state's flat arrays split into those the step updates and the frozen ones, and back."""

    def __init__(self, num_arrays: int, frozen: tuple[int, ...]):
        kept = set(frozen)
        updated = tuple(i for i in range(num_arrays) if i not in kept)
        self.updated = _getter(updated)
        self.frozen = _getter(frozen)
        where = {i: j for j, i in enumerate(updated + frozen)}
        self._order = _getter(tuple(where[i] for i in range(num_arrays)))

    def merge(self, updated: tuple, frozen: tuple) -> tuple:
        return self._order(tuple(updated) + tuple(frozen))


class _SplitStep:
    """The compiled step of a state with frozen model arrays. Only the arrays the step updates
    (trainable parameters, optimizer state, step, key, model_state) are donated and returned:
    the frozen ones go in undonated and the new state holds those very arrays. Donating them
    would delete a base model the caller still holds (to reuse, merge or load adapters onto);
    returning them undonated would make XLA copy them, doubling their memory."""

    __slots__ = ("jitted", "_split")

    def __init__(self, jitted, split: _Split):
        self.jitted = jitted
        self._split = split

    def __call__(self, arrays: tuple, batch: PyTree) -> tuple[tuple, dict]:
        split = self._split
        frozen = split.frozen(arrays)
        updated, metrics = self.jitted(split.updated(arrays), frozen, batch)
        return split.merge(updated, frozen), metrics

    def lower(self, arrays: tuple, batch: PyTree) -> "_SplitLowered":
        split = self._split
        return _SplitLowered(self.jitted.lower(split.updated(arrays), split.frozen(arrays), batch), split)


class _Delegate:
    """Forwards every other attribute (`as_text`, `cost_analysis`, `memory_analysis`, ...) to
    the wrapped JAX object."""

    __slots__ = ("_inner", "_split")

    def __init__(self, inner, split: _Split):
        self._inner = inner
        self._split = split

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class _SplitLowered(_Delegate):
    """A `_SplitStep`'s lowered program: `compile()` gives one called as `(arrays, batch)`, as
    a step without frozen arrays is."""

    __slots__ = ()

    def compile(self, *args, **kwargs) -> "_SplitCompiled":
        return _SplitCompiled(self._inner.compile(*args, **kwargs), self._split)


class _SplitCompiled(_Delegate):
    """A compiled `_SplitStep`: called with the state's flat arrays and a batch, returns the
    new flat arrays (the frozen ones the very same) and the metrics."""

    __slots__ = ()

    def __call__(self, arrays: tuple, batch: PyTree) -> tuple[tuple, dict]:
        split = self._split
        frozen = split.frozen(arrays)
        updated, metrics = self._inner(split.updated(arrays), frozen, batch)
        return split.merge(updated, frozen), metrics


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
"""The `jax.monitoring` event JAX records once per executable it builds (compiled by XLA, or
read from the persistent compilation cache), with the program's `fun_name`."""
_calling = threading.local()  # .step: the TrainStep whose call is running in this thread
_compile_events_seen = False
_listening = False


def _on_compile(event: str, duration: float, **kwargs: Any) -> None:
    global _compile_events_seen
    if event != _COMPILE_EVENT:
        return
    _compile_events_seen = True
    step = getattr(_calling, "step", None)
    name = kwargs.get("fun_name")
    if step is not None and (name is None or "flat_step" in str(name)):
        step._compiles += 1


def _listen_for_compiles() -> None:
    """Register `_on_compile` with `jax.monitoring`, once per process. Compilation runs in the
    thread that calls the step, so the listener credits the step that thread is calling."""
    global _listening
    if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_on_compile)
        _listening = True


def _checked_sequence_keys(sequence_keys: Collection[str] | None, who: str) -> frozenset[str] | None:
    from ..sharding._shard import _sequence_keys  # eqzoo.sharding imports eqzoo.train

    return _sequence_keys(sequence_keys, who)


def _place_host_batch(batch: PyTree, mesh: jax.sharding.Mesh, sequence_keys: frozenset[str] | None) -> PyTree:
    # numpy leaves would enter the step replicated on every device, then be resharded inside
    # it (and compile another program than a placed batch): split them as shard_batch does.
    # A leaf whose leading axis the split does not divide (a short last batch, a (classes,)
    # table that is not per example) is replicated, as jit would place it.
    # eqzoo.sharding imports eqzoo.train
    from ..sharding._shard import BATCH_SPEC, _leaf_sharding, batch_split

    n = batch_split(mesh)
    replicated = jax.NamedSharding(mesh, jax.P())

    def place(path, x):
        # Under context parallelism a sequence entry's second axis is split too (and an error
        # says so when context does not divide it).
        if not (isinstance(x, np.ndarray) and x.ndim):
            return x
        if x.shape[0] % n:
            return jax.device_put(x, replicated)
        return jax.device_put(x, _leaf_sharding("shard_batch", path, x.shape, mesh, BATCH_SPEC, sequence_keys))

    return jax.tree_util.tree_map_with_path(place, batch)


def _check_optimizer(optimizer, params, opt_state) -> None:
    """Raise `ConfigError` when the state's optimizer state is not what this step's optimizer
    makes (at trace time, from shapes only): the step's optimizer would otherwise update with
    a state built by another one (Adam's moments under SGD), or fail deep inside optax."""
    expected = jax.eval_shape(optimizer.init, params)
    if jax.tree.structure(expected) != jax.tree.structure(opt_state):
        raise ConfigError(
            "the state's optimizer state does not match the train step's optimizer: build both from one "
            "optimizer (TrainState.create(model, optimizer, ...) and make_train_step(loss_fn, optimizer)). "
            f"The step's optimizer makes {_describe(expected)}; the state holds {_describe(opt_state)}."
        )


def _describe(opt_state) -> str:
    names = [type(x).__name__ for x in jax.tree.leaves(opt_state, is_leaf=lambda x: x is not opt_state and isinstance(x, tuple) and hasattr(x, "_fields"))]
    return "(" + ", ".join(names) + ")" if names else "an empty state"


def _keep_layout(x, sharding):
    # Leaves that are not arrays (static fields, functions) have no sharding to keep.
    return jax.lax.with_sharding_constraint(x, sharding) if isinstance(sharding, jax.sharding.Sharding) else x


def _mesh_shardings(arrays, mesh) -> tuple:
    shardings = tuple(getattr(a, "sharding", None) for a in arrays)
    if not all(isinstance(s, jax.NamedSharding) and s.mesh == mesh for s in shardings):
        raise ConfigError(
            "make_train_step(..., mesh=mesh) needs a state whose arrays are all placed on that "
            "mesh; place it with eqzoo.sharding.shard_state(state, mesh) or build it with "
            "eqzoo.sharding.sharded_init."
        )
    return shardings


def _split_loss_scale(opt_state, scaling: bool) -> tuple[Any, DynamicLossScale | None]:
    """The optimizer's own state and the dynamic loss scale that `TrainState.create(...,
    precision=...)` pairs it with (`None` without dynamic loss scaling)."""
    if not scaling:
        return opt_state, None
    if not (isinstance(opt_state, tuple) and len(opt_state) == 2 and isinstance(opt_state[1], DynamicLossScale)):
        raise ConfigError(
            "precision uses dynamic loss scaling but the state has no loss scale: create it "
            "with TrainState.create(..., precision=precision)."
        )
    return opt_state


def _compute_model_shardings(structure, shardings, params, precision: Precision):
    """Under a mesh, the model's shardings for its compute-dtype copy to keep (`None`: no mesh,
    or a cast that changes nothing), so that a weight that must be gathered is gathered after
    the cast (in bf16), not before it (in fp32). Left to itself, XLA's sharding propagation
    moved the gather of the tied embedding in front of the cast."""
    # Whether the cast changes anything: read from the parameters themselves (a float32
    # model under a bf16-param policy is still cast).
    compute_dtype = jnp.dtype(precision.compute_dtype)
    casts = any(jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != compute_dtype for x in jax.tree.leaves(params))
    return None if shardings is None or not casts else structure.unflatten(shardings).model


def _make_grad_fn(loss_fn: LossFn, precision: Precision, frozen, scale, stateful: bool, model_shardings) -> Callable:
    """`grad_fn(params, model_state, batch, key) -> ((scaled loss, (loss, model_state, aux)),
    grads)`: the loss of the trainable `params` joined with the `frozen` rest, cast to the
    compute dtype, checked to be a scalar, and times the loss `scale` (if any) before
    differentiation."""

    def compute(p, model_state, mb, k):
        m = precision.cast_to_compute(eqx.combine(p, frozen))
        if model_shardings is not None:
            m = jax.tree.map(_keep_layout, m, model_shardings)
        if stateful:
            out = loss_fn(m, model_state, mb, k)
        else:
            out = loss_fn(m, mb, k)
        loss, new_model_state, aux = _split_loss(out, stateful)
        _check_scalar_loss(loss)
        loss = loss.astype(jnp.dtype(precision.output_dtype))
        scaled = loss * scale.astype(loss.dtype) if scale is not None else loss
        return scaled, (loss, new_model_state, aux)

    value_and_grad = jax.value_and_grad(compute, has_aux=True)

    def grad_fn(*args):
        # the gradient of the batch's loss, never per-example ones: dropless experts may sum
        # their weight gradients over the batch in one pass (eqzoo/nn/_grouped.py)
        with summed_weight_gradients():
            return value_and_grad(*args)

    return grad_fn


def _accumulate_grads(grad_fn, params, model_state, batch, key, steps: int, *, strided: bool, loss_dtype):
    """Gradient accumulation: `grad_fn` over `steps` micro-batches of `batch` in one `lax.scan`.
    **Returns:** the whole batch's `(grads, loss, aux, model_state)`, each micro-batch weighted
    by the positions it counted (its `"tokens"` metric) when the loss reports them, else alike."""
    mbs = _microbatches(batch, steps, strided=strided)
    keys = jax.random.split(key, steps)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    first_mb = jax.tree.map(lambda x: x[0], mbs)
    aux_shape = jax.eval_shape(lambda: grad_fn(params, model_state, first_mb, keys[0])[0][1][2])
    zero_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)

    # A loss that reports how many positions it averaged over (`"tokens"`, as lm_loss
    # does) is a mean over a different count in each micro-batch (masks, packed rows):
    # weighting each micro-batch by its count makes the accumulated loss and gradient
    # those of the whole batch. Otherwise micro-batches (of equal size) weigh alike.
    counted = isinstance(aux_shape, dict) and "tokens" in aux_shape and aux_shape["tokens"].shape == ()

    def body(carry, xs):
        g_acc, loss_acc, aux_acc, w_acc, mstate = carry
        mb, k = xs
        (_, (loss, mstate, aux)), g = grad_fn(params, mstate, mb, k)
        w = aux["tokens"].astype(jnp.float32) if counted else jnp.ones((), jnp.float32)
        g_acc = jax.tree.map(lambda acc, x: acc + _weigh(x, w), g_acc, g)
        aux_acc = jax.tree.map(jnp.add, aux_acc, _weigh_aux(aux, w, counted))
        return (g_acc, loss_acc + _weigh(loss, w), aux_acc, w_acc + w, mstate), None

    zero = jnp.zeros((), jnp.float32)
    init = (zero_grads, jnp.zeros((), loss_dtype), zero_aux, zero, model_state)
    (grads, loss, aux, total, model_state), _ = jax.lax.scan(body, init, (mbs, keys))
    inv = 1.0 / jnp.maximum(total, 1.0)  # total: the tokens counted, or the micro-batches
    grads = jax.tree.map(lambda g: _weigh(g, inv), grads)
    loss = _weigh(loss, inv)
    aux = _weigh_aux(aux, inv, counted)
    return grads, loss, aux, model_state


def _apply_grads(optimizer, grads, params, opt_state, scale, loss_scale: DynamicLossScale | None):
    """One optimizer update from the (loss-scaled) gradients. Under dynamic loss scaling a step
    whose gradients are not finite leaves the parameters and optimizer state as they were,
    and the scale adjusts. **Returns:** `(grad_norm, new_params, new_opt_state)`, the last
    paired with the new loss scale under dynamic loss scaling."""
    if scale is not None:
        grads = jax.tree.map(lambda g: g / scale.astype(g.dtype), grads)
    grad_norm = tree_global_norm(grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = eqx.apply_updates(params, updates)
    if loss_scale is not None:
        finite = jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_params = keep(new_params, params)
        new_opt_state = keep(new_opt_state, opt_state)
        new_opt_state = (new_opt_state, loss_scale.adjust(finite))
    return grad_norm, new_params, new_opt_state


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    precision: Precision | None = None,
    grad_accum_steps: int = 1,
    donate: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    sequence_keys: Collection[str] | None = SEQUENCE_KEYS,
    context_attention: ContextAttention = "gather",
    pipeline_microbatches: int | None = None,
    pipeline_repeats: int = 1,
) -> TrainStep:
    """Build the compiled training step.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, batch, key)` returning a scalar loss or `(loss, aux)` where
      `aux` is a dict of scalars to report. For a state holding a `model_state` (BatchNorm), it is
      called as `loss_fn(model, model_state, batch, key)` and returns `(loss, model_state)` or
      `(loss, model_state, aux)`.
    - `optimizer`: the optax transformation the state was created with.
    - `precision`: a [`eqzoo.train.Precision`][] policy (default float32 throughout). With
      `loss_scale="dynamic"` the optimizer state must come from `TrainState.create(...,
      precision=...)`.
    - `grad_accum_steps`: split each batch into this many micro-batches along the leading axis
      and accumulate gradients with `lax.scan` inside the one compiled step. When `loss_fn`
      reports the number of positions it averaged over as the scalar metric `"tokens"` (as
      [`eqzoo.train.lm_loss`][] does), each micro-batch is weighted by it, so the loss, the
      metrics and the gradient are those of the whole batch even when masks or packed rows
      count different numbers of positions per micro-batch (and `"tokens"` is the batch's
      total); otherwise the micro-batches weigh alike.
    - `donate`: donate the input state's buffers to the output (halves peak state memory).
      Frozen model arrays (those the state's `trainable` filter leaves out) are never donated:
      the step does not return them, and the new state holds the input's.
    - `mesh`: for a state sharded on this `jax.sharding.Mesh` (see `eqzoo.sharding`): the new
      state keeps the input state's shardings (`out_shardings`), metrics are replicated, and
      the step is traced inside `eqzoo.sharding.activation_sharding(mesh)`. The state passed to
      the first call fixes the layout. In one process, a host (numpy) batch, as the eqzoo
      loaders yield and `fit` passes on, is split over the mesh as
      `eqzoo.sharding.shard_batch` does (on a mesh with `context > 1` the second axis of each
      entry named in `sequence_keys` is split over `context` too: context parallelism,
      docs/scaling.md; a leaf
      whose leading axis the split does not divide,
      a short last batch say, is copied to every device, as `jax.jit` would place it); on several processes pass batches already placed
      (`eqzoo.sharding.make_global_batch`: which rows a process holds is yours to say). With gradient accumulation, micro-batch `i` then takes rows
      `i, i+k, ...` of the batch, so each micro-batch stays spread over every device: its rows
      must be divisible by the mesh's batch axes (`data * fsdp * expert`), so the batch by
      `grad_accum_steps * data * fsdp * expert` (a `ShardingError` when the step is traced says so).
    - `sequence_keys`: the batch keys whose entries are `(batch, seq, ...)` sequences, which a
      mesh with `context > 1` splits along `seq` (default [`eqzoo.sharding.SEQUENCE_KEYS`][],
      the keys eqzoo's losses read); other named entries (labels `(batch, k)`, images) are
      split over the batch axes only. `None` reads every leaf of two or more dimensions as a
      sequence. As for [`eqzoo.sharding.shard_batch`][].
    - `context_attention`: under a `mesh` with `context > 1`, how attention runs: `"gather"`
      (all-gather each layer's keys and values over `context`), `"ring"` (ring attention:
      key/value blocks passed round the `context` ring; per-device attention memory falls
      with `context`) or `"ring_balanced"` (ring attention in the load-balanced order, which
      evens out causal attention's work across the ring). See
      [`eqzoo.sharding.CONTEXT_ATTENTION`][] and docs/scaling.md.
    - `pipeline_microbatches`: under a `mesh` with `stage > 1` (pipeline parallelism), how many
      micro-batches each layer stack cuts the batch (each accumulation micro-batch, with
      `grad_accum_steps > 1`) into; `None` picks up to `2 * stage`. As for
      [`eqzoo.sharding.activation_sharding`][]; docs/scaling.md, "Pipeline parallelism".
    - `pipeline_repeats`: under a `mesh` with `stage > 1`, how many times each micro-batch goes
      round the stages: `1` (the default) runs GPipe's schedule, more the circular
      (interleaved) one, each stage holding that many non-contiguous chunks of its layers,
      which cuts the bubble to `(stage - 1) / (micro * pipeline_repeats + stage - 1)`.
      `stage * pipeline_repeats` must divide the depth, and the micro-batches number at least
      `stage`. As for [`eqzoo.sharding.activation_sharding`][].

    **Returns:** a [`eqzoo.train.TrainStep`][]; `state, metrics = step(state, batch)`, with
    metrics `loss`, `grad_norm` and the `aux` entries (averaged over micro-batches).
    """
    precision = Precision() if precision is None else precision
    check_precision(precision, "make_train_step")
    check_context_attention(context_attention, "make_train_step")
    check_pipeline_microbatches(pipeline_microbatches, "make_train_step")
    pipeline_repeats = check_pipeline_repeats(pipeline_repeats, "make_train_step")
    if mesh is not None:
        check_mesh(mesh, "make_train_step")
    if isinstance(grad_accum_steps, bool) or not isinstance(grad_accum_steps, int | np.integer) or grad_accum_steps < 1:
        raise ConfigError(f"grad_accum_steps must be an integer >= 1, got {grad_accum_steps!r}.{int_hint(grad_accum_steps)}")
    grad_accum_steps = int(grad_accum_steps)
    scaling = precision.loss_scale == "dynamic"

    def pure_step(structure, arrays, batch, shardings=None):
        parts: StateParts = structure.unflatten(arrays)
        stateful = parts.model_state is not None
        _check_arity(loss_fn, stateful, "make_train_step")
        opt_state, loss_scale = _split_loss_scale(parts.opt_state, scaling)
        scale = None if loss_scale is None else loss_scale.scale
        params, frozen = eqx.partition(parts.model, structure.trainable)
        _check_optimizer(optimizer, params, opt_state)
        key, step_key = jax.random.split(parts.key)
        model_shardings = _compute_model_shardings(structure, shardings, params, precision)
        grad_fn = _make_grad_fn(loss_fn, precision, frozen, scale, stateful, model_shardings)
        if grad_accum_steps == 1:
            (_, (loss, model_state, aux)), grads = grad_fn(params, parts.model_state, batch, step_key)
        else:
            _check_microbatches(batch, grad_accum_steps, mesh)
            grads, loss, aux, model_state = _accumulate_grads(
                grad_fn, params, parts.model_state, batch, step_key, grad_accum_steps,
                strided=mesh is not None, loss_dtype=jnp.dtype(precision.output_dtype),
            )
        grad_norm, new_params, new_opt_state = _apply_grads(optimizer, grads, params, opt_state, scale, loss_scale)
        new_parts = StateParts(
            eqx.combine(new_params, frozen), new_opt_state, parts.step + 1, key,
            model_state if stateful else parts.model_state,
        )
        new_arrays, new_treedef = jax.tree.flatten(eqx.filter(new_parts, eqx.is_array))
        if new_treedef != structure.treedef:
            raise ConfigError(
                "the train step changed the structure of the state (for example the optimizer "
                "state or the model_state returned by loss_fn has a different tree structure)."
            )
        metrics = {"loss": loss, "grad_norm": grad_norm, **aux}
        if scaling:
            metrics["loss_scale"] = new_opt_state[1].scale
        return tuple(new_arrays), metrics

    return TrainStep(
        pure_step, donate, mesh, sequence_keys, context_attention, pipeline_microbatches, pipeline_repeats
    )


class EvalStep:
    """A compiled `metrics = evaluate(state, batch)`; made by [`eqzoo.train.make_eval_step`][]."""

    def __init__(
        self, pure: Callable, mesh: jax.sharding.Mesh | None = None,
        sequence_keys: Collection[str] | None = SEQUENCE_KEYS, context_attention: str = "gather",
        pipeline_microbatches: int | None = None, pipeline_repeats: int = 1,
    ):
        self._pure = pure
        self._mesh = mesh
        self._context_attention = context_attention
        self._pipeline_microbatches = pipeline_microbatches
        self._pipeline_repeats = pipeline_repeats
        self._sequence_keys = _checked_sequence_keys(sequence_keys, "make_eval_step")
        self._place_host_batches = mesh is not None and jax.process_count() == 1
        self._compiled: dict[Any, Callable] = {}

    def _jitted(self, structure) -> Callable:
        fn = _known(self._compiled, structure)
        if fn is None:
            mesh = self._mesh
            if mesh is None:
                fn = jax.jit(lambda arrays, b: self._pure(structure, arrays, b))
            else:
                from ..sharding import activation_sharding  # eqzoo.sharding imports eqzoo.train

                options = {
                    "context_attention": self._context_attention,
                    "pipeline_microbatches": self._pipeline_microbatches,
                    "pipeline_repeats": self._pipeline_repeats,
                }

                def traced(arrays, b):
                    with activation_sharding(mesh, **options):
                        return self._pure(structure, arrays, b)

                fn = jax.jit(traced, out_shardings=jax.NamedSharding(mesh, jax.P()))
            self._compiled[structure] = fn
        return fn

    def __call__(self, state: TrainState, batch: PyTree) -> dict[str, jax.Array]:
        """Evaluate on one batch. **Returns:** a dict of device scalars."""
        if self._place_host_batches and any(isinstance(x, np.ndarray) and x.ndim for x in jax.tree.leaves(batch)):
            batch = _place_host_batch(batch, self._mesh, self._sequence_keys)
        structure, arrays = _state_parts(state, "eval step")
        try:
            return self._jitted(structure)(arrays, batch)
        except Exception as err:
            _refuse_donated(arrays, err, "eval step")
            raise

    def lower(self, state: TrainState, batch: PyTree):
        """`jax.jit(...).lower` for this state and batch (to inspect HLO or compile ahead)."""
        return self._jitted(state.structure).lower(state.arrays, batch)


def make_eval_step(
    metric_fn: LossFn,
    *,
    precision: Precision | None = None,
    mesh: jax.sharding.Mesh | None = None,
    sequence_keys: Collection[str] | None = SEQUENCE_KEYS,
    context_attention: ContextAttention = "gather",
    pipeline_microbatches: int | None = None,
    pipeline_repeats: int = 1,
) -> EvalStep:
    """Build a compiled evaluation step.

    **Arguments:**

    - `metric_fn`: `metric_fn(model, batch, key)` (or `metric_fn(model, model_state, batch,
      key)` for stateful models) returning a scalar, `(loss, aux)` or, for stateful models,
      `(loss, model_state[, aux])` — the same contract as a loss function, so a loss function can
      be reused. The model is put in inference mode (`eqx.nn.inference_mode`) first.
    - `precision`: compute-dtype policy, as for training.
    - `mesh`: for a state sharded on this mesh: the step is traced inside
      `eqzoo.sharding.activation_sharding(mesh)` (so the activation rules apply: under
      context parallelism the sequence stays split, as in the train step) and, in one process,
      a host (numpy) batch is split over the mesh as `make_train_step(mesh=...)` splits it.
      Metrics are replicated.
    - `sequence_keys`: which batch entries are sequences, as for `make_train_step`.
    - `context_attention`: `"gather"`, `"ring"` or `"ring_balanced"`, as for `make_train_step`.
    - `pipeline_microbatches`: under a `mesh` with `stage > 1`, as for `make_train_step`.
    - `pipeline_repeats`: under a `mesh` with `stage > 1`, as for `make_train_step`.

    **Returns:** an [`eqzoo.train.EvalStep`][]: `metrics = evaluate(state, batch)` with `loss`
    and the aux entries.
    """
    precision = Precision() if precision is None else precision
    check_context_attention(context_attention, "make_eval_step")
    check_pipeline_microbatches(pipeline_microbatches, "make_eval_step")
    pipeline_repeats = check_pipeline_repeats(pipeline_repeats, "make_eval_step")
    if mesh is not None:
        check_mesh(mesh, "make_eval_step")

    def pure(structure, arrays, batch):
        parts: StateParts = structure.unflatten(arrays)
        model = precision.cast_to_compute(eqx.nn.inference_mode(parts.model))
        stateful = parts.model_state is not None
        _check_arity(metric_fn, stateful, "make_eval_step")
        if stateful:
            out = metric_fn(model, parts.model_state, batch, None)
        else:
            out = metric_fn(model, batch, None)
        loss, _, aux = _split_loss(out, stateful)
        _check_scalar_loss(loss)
        return {"loss": loss.astype(jnp.float32), **aux}

    return EvalStep(pure, mesh, sequence_keys, context_attention, pipeline_microbatches, pipeline_repeats)
