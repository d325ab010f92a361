"""Dropless mixture-of-experts compute: each token's chosen experts run as grouped matrix products.

`expert_swiglu(x, experts, w_gate, w_up, w_down)` gives, for every token and each of its `k`
chosen experts, that expert's SwiGLU output. The `T * k` (token, expert) assignments are sorted
by expert and run through `jax.lax.ragged_dot` (one grouped matrix product per weight, every
group a contiguous block of rows), so no token is dropped and no expert computes a token it was
not given.

Two JAX facts shape this file:

- `jax.lax.ragged_dot` has no batching rule for a batched left operand and shared weights, and
  eqzoo's models are vmapped over the batch. A `jax.custom_batching.custom_vmap` rule therefore
  flattens the batch into the token axis and routes every token of the batch in one sort: the
  natural way to run MoE anyway.
- A `custom_vmap` function cannot be differentiated in reverse mode, so the op is a
  `jax.custom_vjp` whose forward and backward passes are each `custom_vmap` functions; the
  backward pass is written out (three grouped products for the input gradient, three for the
  weights). A batched backward pass cannot tell the gradient of a batched loss (`grad` of
  `vmap`, where JAX then sums the weight gradients over the batch) from per-example gradients
  (`vmap` of `grad`, as in DP-SGD, where they must stay apart). So by default it gives every
  batch member its own weight gradient (one sort and three grouped products per member), which
  is right for both. eqzoo's train step, which only ever takes the gradient of the batch's
  loss, traces it inside `summed_weight_gradients()`: there the backward pass routes the whole
  batch in one sort and returns the weight gradients already summed, without a per-member
  copy of the expert weights' gradient (batch times the experts' size). A batch of cotangents
  for one input (`jax.jacrev`) is run one cotangent at a time. Forward mode (`jax.jvp`) raises
  JAX's own `TypeError` for a `custom_vjp` function; second derivatives a `ConfigError`.

The residuals the backward pass keeps are in token order, so they are per token whatever batch
they were computed in. Under an eqzoo mesh ([`eqzoo.sharding.activation_sharding`][]) the
flattened computation runs in a `shard_map` over the batch axes: each device sorts and computes
only its own tokens, with the expert weights gathered over `fsdp` and split over `tensor` along
the hidden units.
"""

import contextlib
import contextvars
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

from .._errors import ConfigError


def _plan(experts, num_experts):
    """Sort the (token, slot) assignments by expert: the order, its inverse and the group sizes."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # sorted row -> assignment
    n = flat.shape[0]
    inverse = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, inverse, sizes


# Per-expert `a[rows of e].T @ dy[rows of e]`: the rows (tokens) are the contracted, ragged axis.
_WEIGHT_GRAD = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=(0,), rhs_group_dimensions=()
)


def _weight_grad(a, dy, sizes):
    """The weight gradient of a grouped product: `(experts, a_features, dy_features)`."""
    return lax.ragged_dot_general(a, dy, sizes, _WEIGHT_GRAD)


def _forward(x, experts, w_gate, w_up, w_down, tensor_axis=None):
    """Unbatched forward: `(tokens, embed)` and `(tokens, k)` expert ids -> `(tokens, k, embed)`,
    plus the residuals the backward pass needs: the pre-activations, `(tokens, k, hidden)` in
    token order (so that they are per token, whatever batch they were computed in)."""
    tokens, k = experts.shape
    order, inverse, sizes = _plan(experts, w_gate.shape[0])
    xs = x[order // k]  # (tokens * k, embed), grouped by expert
    g = lax.ragged_dot(xs, w_gate, sizes)  # (tokens * k, hidden)
    u = lax.ragged_dot(xs, w_up, sizes)
    ys = lax.ragged_dot(jax.nn.silu(g) * u, w_down, sizes)  # (tokens * k, embed)
    if tensor_axis is not None:  # hidden units split over `tensor`: sum the partial products
        ys = lax.psum(ys, tensor_axis)
    unsort = lambda a: a[inverse].reshape(tokens, k, -1)  # noqa: E731
    return unsort(ys), (unsort(g), unsort(u))


def _backward(x, experts, w_gate, w_up, w_down, g, u, dy, tensor_axis=None):
    """Unbatched backward of `_forward`: gradients for `x` and the three weights."""
    tokens, k = experts.shape
    num_experts = w_gate.shape[0]
    order, inverse, sizes = _plan(experts, num_experts)
    sort = lambda a: a.reshape(tokens * k, -1)[order]  # noqa: E731
    xs = x[order // k]
    dys, g, u = sort(dy), sort(g), sort(u)
    sig = jax.nn.sigmoid(g)
    act = g * sig  # silu(g)
    h = act * u
    dh = lax.ragged_dot(dys, jnp.swapaxes(w_down, 1, 2), sizes)
    du = dh * act
    dg = dh * u * (sig * (1 + g * (1 - sig)))  # silu'(g)
    dxs = lax.ragged_dot(dg, jnp.swapaxes(w_gate, 1, 2), sizes)
    dxs = dxs + lax.ragged_dot(du, jnp.swapaxes(w_up, 1, 2), sizes)
    if tensor_axis is not None:
        dxs = lax.psum(dxs, tensor_axis)
    dx = dxs[inverse].reshape(tokens, k, -1).sum(axis=1).astype(x.dtype)
    d_gate = _weight_grad(xs, dg, sizes)
    d_up = _weight_grad(xs, du, sizes)
    d_down = _weight_grad(h, dys, sizes)
    return dx, d_gate, d_up, d_down


# ----------------------------------------------------------------------------- batching rules


_WEIGHTS = (2, 3, 4)  # argument positions of w_gate, w_up, w_down in both ops

_SUMMED = contextvars.ContextVar("eqzoo_moe_summed_weight_gradients", default=False)


@contextlib.contextmanager
def summed_weight_gradients() -> Iterator[None]:
    """While tracing the gradient of a loss over a whole batch (`jax.grad` of a `jax.vmap`,
    never the reverse), let the batched backward pass of the dropless experts sum the weight
    gradients over the batch in one pass, and let fp8 products ([`eqzoo.quant.fp8_matmul`][])
    run once on the whole batch with its scales. eqzoo's train step traces its gradient inside it.

    Outside it the backward pass keeps one weight gradient per batch member, right for
    per-example gradients too, at the cost of a transient `(batch, *expert weights)` gradient
    per layer; inside it a `jax.vmap` of `jax.grad` would get the batch's sum for every
    member. It is read while tracing, and `jax.jit`'s cache does not know of it: enter it
    inside the traced function (as the train step does), never around a call of a function
    that is also traced outside it."""
    token = _SUMMED.set(True)
    try:
        yield
    finally:
        _SUMMED.reset(token)


def _batched_call(fn, axis_size, in_batched, args, *, weight_outs):
    """Run the unbatched `fn(x, experts, w_gate, w_up, w_down, *per_token)` on a batch.

    The forward pass (`weight_outs=0`) flattens the batch into the token axis, so one sort
    routes every token of the batch, and every output comes back with the batch axis.

    The backward pass (`weight_outs=3`: its last three outputs are weight gradients) runs one
    batch member at a time and returns every output with the batch axis, weight gradients
    included: per-example weight gradients. That is right both for the gradient of a batched
    call (`jax.grad` of a `jax.vmap`ped loss: JAX sums them over the batch, as it does for any
    unbatched input of a batched `custom_vjp`) and for per-example gradients (`jax.vmap` of
    `jax.grad`, where they must stay apart): the rule is called the same way for both and
    cannot tell them apart, so summing here gave every example the batch's sum.

    A batch of weights (a vmap over models), or of cotangents for one input (`jax.jacrev`,
    `jax.vmap` of a `jax.vjp`), is also run one member at a time."""

    def batched(a, b):
        return a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)

    if any(in_batched[i] for i in _WEIGHTS) or not in_batched[0]:
        out = _map_members(lambda a: fn(*a), tuple(map(batched, args, in_batched)))
        return out, jax.tree.map(lambda _: True, out)
    if weight_outs and not _SUMMED.get():
        args = tuple(a if i in _WEIGHTS else batched(a, b) for i, (a, b) in enumerate(zip(args, in_batched, strict=True)))
        out = _mesh_fn(_per_member(fn), weight_outs, axis_size, per_member=True)(*args)
        return out, jax.tree.map(lambda _: True, out)
    flat = [
        a if i in _WEIGHTS else batched(a, b).reshape(-1, *a.shape[1 + b:])
        for i, (a, b) in enumerate(zip(args, in_batched, strict=True))
    ]
    fn = _mesh_fn(fn, weight_outs, flat[0].shape[0])
    leaves, tree = jax.tree.flatten(fn(*flat))
    # per token: back with the batch axis; weight gradients (summed mode): summed, unbatched
    per_token = len(leaves) - weight_outs
    out = [leaf.reshape(axis_size, -1, *leaf.shape[1:]) if i < per_token else leaf for i, leaf in enumerate(leaves)]
    return jax.tree.unflatten(tree, out), jax.tree.unflatten(tree, [i < per_token for i in range(len(leaves))])


def _per_member(fn):
    """`fn` over a leading batch axis of every argument but the (shared) weights, one member
    at a time (`lax.map`): each member sorts its own tokens and gets its own weight gradients."""

    def run(x, experts, w_gate, w_up, w_down, *per_token, tensor_axis=None):
        def one(a):
            x, experts, *rest = a
            return fn(x, experts, w_gate, w_up, w_down, *rest, tensor_axis=tensor_axis)

        return _map_members(one, (x, experts, *per_token))

    return run


def _map_members(one, xs):
    """`lax.map(one, xs)`; called eagerly (the backward pass of an eager `jax.grad`, as in a
    notebook), a Python loop over the members instead: an eager `lax.map` traces a new scan from
    `one`, a new closure on every call, and compiled it again on every call (2 programs per
    eager gradient of a `"ragged"` MoE model), while each eager operation reuses its program."""
    from ._stacked import eager_mode  # _stacked imports the layers that import this module

    if eager_mode(xs) == "staged":
        return lax.map(one, xs)
    n = jax.tree.leaves(xs)[0].shape[0]
    outs = [one(jax.tree.map(lambda a, i=i: a[i], xs)) for i in range(n)]
    return jax.tree.map(lambda *o: jnp.stack(o), *outs)


def _mesh_fn(fn, n_weight_grads, tokens, *, per_member=False):
    """`fn` (unbatched, on `tokens` flat tokens; with `per_member`, on `tokens` batch members
    along a leading axis), or its `shard_map` over the active eqzoo mesh: each device routes and
    computes its own tokens (with `per_member`, its own members' weight gradients, which the
    caller's `grad` sums; otherwise the weight gradients summed over the batch devices).
    Not inside another `shard_map` (a nested vmap's outer level runs inside the inner level's),
    and not when the tokens do not split evenly over the batch devices (then XLA partitions the
    plain computation as it can)."""
    from ..sharding._activation import active_mesh, batch_axes

    mesh = active_mesh()
    if mesh is None or jax.sharding.get_abstract_mesh().manual_axes:
        return fn
    batch = batch_axes(mesh) or None
    tensor = "tensor" if mesh.shape.get("tensor", 1) > 1 else None
    if batch is None and tensor is None:
        return fn
    if batch is not None and tokens % math.prod(mesh.shape[a] for a in batch):
        return fn
    from jax.sharding import PartitionSpec as P

    lead = (batch,) if per_member else ()  # the batch members' axis, split over the batch axes
    tok = P(batch)  # tokens (or batch members) along the leading axis
    w_specs = (P(None, None, tensor), P(None, None, tensor), P(None, tensor, None))
    res = P(*lead, None, None, tensor) if per_member else P(batch, None, tensor)  # ([batch,] tokens, k, hidden)
    # forward: (x, experts, weights) -> (y, (g, u)); backward: (+ g, u, dy) -> (dx, dW...)
    if n_weight_grads:
        dw = tuple(P(*lead, *s) for s in w_specs)  # per member when per_member
        in_specs, out_specs = (tok, tok, *w_specs, res, res, tok), (tok, *dw)
    else:
        in_specs, out_specs = (tok, tok, *w_specs), (tok, (res, res))

    def body(*a):
        out = fn(*a, tensor_axis=tensor)
        if n_weight_grads and batch and not per_member:  # summed mode: each device's partial sum
            out = (out[0], *(lax.psum(w, batch) for w in out[1:]))
        return out

    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


@custom_vmap
def _forward_op(x, experts, w_gate, w_up, w_down):
    return _forward(x, experts, w_gate, w_up, w_down)


@_forward_op.def_vmap
def _forward_rule(axis_size, in_batched, x, experts, w_gate, w_up, w_down):
    return _batched_call(_forward_flat, axis_size, in_batched, (x, experts, w_gate, w_up, w_down), weight_outs=0)


def _forward_flat(x, experts, w_gate, w_up, w_down, tensor_axis=None):
    # Called again through the op, so an enclosing vmap (a vmap of a vmap) batches it in turn.
    if tensor_axis is not None:
        return _forward(x, experts, w_gate, w_up, w_down, tensor_axis)
    return _forward_op(x, experts, w_gate, w_up, w_down)


@custom_vmap
def _backward_op(x, experts, w_gate, w_up, w_down, g, u, dy):
    return _backward(x, experts, w_gate, w_up, w_down, g, u, dy)


def _backward_flat(x, experts, w_gate, w_up, w_down, g, u, dy, tensor_axis=None):
    if tensor_axis is not None:
        return _backward(x, experts, w_gate, w_up, w_down, g, u, dy, tensor_axis)
    return _backward_op(x, experts, w_gate, w_up, w_down, g, u, dy)


@_backward_op.def_vmap
def _backward_rule(axis_size, in_batched, x, experts, w_gate, w_up, w_down, g, u, dy):
    return _batched_call(_backward_flat, axis_size, in_batched, (x, experts, w_gate, w_up, w_down, g, u, dy), weight_outs=3)


_NO_FORWARD_MODE = (
    "MoE(implementation='ragged') supports reverse-mode gradients (jax.grad of a batched or "
    "unbatched call, as training takes them), not forward-mode or higher-order differentiation "
    "(jax.jvp, jax.jacfwd, jax.hessian, a gradient of a gradient); use implementation='dense' "
    "or 'capacity' there (on a mesh without an `expert` axis, where those are reverse-mode only too)."
)


def refuse_forward_mode(op, message: str = _NO_FORWARD_MODE):
    """`op`, whose forward-mode derivative raises a `ConfigError` with `message` saying what
    to use instead (JAX would otherwise recurse through the batching rules without end; a
    derivative of a `custom_vjp`'s backward pass reaches it too)."""

    @jax.custom_jvp
    def guarded(*args):
        return op(*args)

    @guarded.defjvp
    def _(primals, tangents):
        raise ConfigError(message)

    return guarded


_forward_guarded = refuse_forward_mode(_forward_op)
_backward_guarded = refuse_forward_mode(_backward_op)


@jax.custom_vjp
def _expert_swiglu(x, experts, w_gate, w_up, w_down):
    return _forward_guarded(x, experts, w_gate, w_up, w_down)[0]


def _vjp_forward(x, experts, w_gate, w_up, w_down):
    y, (g, u) = _forward_guarded(x, experts, w_gate, w_up, w_down)
    return y, (x, experts, w_gate, w_up, w_down, g, u)


def _vjp_backward(residuals, dy):
    x, experts, w_gate, w_up, w_down, g, u = residuals
    dx, d_gate, d_up, d_down = _backward_guarded(x, experts, w_gate, w_up, w_down, g, u, dy)
    return dx, None, d_gate, d_up, d_down


_expert_swiglu.defvjp(_vjp_forward, _vjp_backward)


def expert_swiglu(x, experts, w_gate, w_up, w_down):
    """Every token's SwiGLU output from each of its chosen experts, computed dropless.

    **Arguments:**

    - `x`: `(tokens, embed)` inputs.
    - `experts`: `(tokens, k)` int32 ids of the experts each token goes to.
    - `w_gate`, `w_up`: `(experts, embed, hidden)`; `w_down`: `(experts, hidden, embed)`, all
      in `x`'s dtype.

    **Returns:** `(tokens, k, embed)`: `down_e(silu(x gate_e) * (x up_e))` for each chosen `e`.
    """
    return _expert_swiglu(x, experts.astype(jnp.int32), w_gate, w_up, w_down)

