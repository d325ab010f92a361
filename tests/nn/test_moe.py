"""eqzoo.nn.MoE: the grouped ("ragged") and fixed-capacity ("capacity") implementations against
every-expert ("dense") and against per-token NumPy references (including which assignments
"capacity" drops), under every transformation a model meets (jit, vmap, nested vmap, grad,
scan, remat, bf16), plus the router losses and the input/config errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo import nn
from eqzoo._errors import ConfigError, ShapeError

TOL = 1e-5  # fp32, one layer
EMBED, HIDDEN, EXPERTS, K = 16, 24, 4, 2


# Capacity EXPERTS / K: every expert can take every token of a sequence, so nothing is dropped.
NO_DROP = EXPERTS / K
SPARSE = ["ragged", "capacity"]


def _layer(implementation, capacity_factor=NO_DROP, **kwargs):
    args = dict(embed_dim=EMBED, hidden_dim=HIDDEN, num_experts=EXPERTS, experts_per_token=K)
    return nn.MoE(
        **(args | kwargs), implementation=implementation, capacity_factor=capacity_factor, key=jax.random.key(0)
    )


def _pair(implementation="ragged", **kwargs):
    """The same layer (same key, same weights) with `implementation` and with "dense"."""
    return _layer(implementation, **kwargs), _layer("dense", **kwargs)


def _x(shape, seed=1, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _leaves(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_array))


def _assert_trees_close(a, b, tol=TOL):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def _numpy_reference(layer, x):
    """Each token on its own: softmax over experts, top-k, renormalise, weighted SwiGLU sum."""
    x = np.asarray(x, np.float64)
    router = np.asarray(layer.router.weight, np.float64)
    wg, wu, wd = (np.asarray(w, np.float64) for w in (layer.gate_proj, layer.up_proj, layer.down_proj))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        logits = router @ x[t]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-probs, kind="stable")[: layer.experts_per_token]
        weights = probs[chosen] / (probs[chosen].sum() if layer.normalize_weights else 1.0)
        for w, e in zip(weights, chosen, strict=True):
            g, u = x[t] @ wg[e], x[t] @ wu[e]
            out[t] += w * ((g / (1 + np.exp(-g))) * u) @ wd[e]
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_matches_per_token_reference(normalize):
    x = _x((11, EMBED))
    layers = [_layer(impl, normalize_weights=normalize) for impl in ("dense", "capacity", "ragged")]
    expected = _numpy_reference(layers[0], x)
    for layer in layers:
        np.testing.assert_allclose(np.asarray(eqx.filter_jit(layer)(x)), expected, atol=TOL, rtol=TOL)


def _numpy_capacity_reference(layer, x):
    """"capacity" by hand: token by token, each token's choices in order; an assignment past
    its expert's `capacity(seq)` slots adds nothing."""
    weights, experts, _ = (np.asarray(a, np.float64) for a in layer.route(x))
    experts = experts.astype(int)
    x64 = np.asarray(x, np.float64)
    wg, wu, wd = (np.asarray(w, np.float64) for w in (layer.gate_proj, layer.up_proj, layer.down_proj))
    cap = layer.capacity(x.shape[0])
    used = np.zeros(layer.num_experts, int)
    out = np.zeros_like(x64)
    dropped = 0
    for t in range(x.shape[0]):
        for j in range(layer.experts_per_token):
            e = experts[t, j]
            if used[e] >= cap:
                dropped += 1
                continue
            used[e] += 1
            g, u = x64[t] @ wg[e], x64[t] @ wu[e]
            out[t] += weights[t, j] * ((g / (1 + np.exp(-g))) * u) @ wd[e]
    return out, dropped / experts.size


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_drops_what_the_rule_says(capacity_factor):
    layer = _layer("capacity", capacity_factor=capacity_factor)
    x = _x((20, EMBED), seed=4)
    expected, dropped = _numpy_capacity_reference(layer, x)
    y, aux = eqx.filter_jit(layer.with_aux)(x)
    np.testing.assert_allclose(np.asarray(y), expected, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(float(aux["moe_dropped"]), dropped, atol=1e-7)
    assert layer.capacity(20) == max(1, min(20, int(np.ceil(capacity_factor * 20 * K / EXPERTS))))
    if capacity_factor == 0.5:
        assert dropped > 0.4  # 5 slots an expert for 40 assignments: at least half dropped


def test_one_token_is_never_dropped():
    layer = _layer("capacity", capacity_factor=0.01)
    x = _x((1, EMBED))
    assert layer.capacity(1) == 1
    y, aux = layer.with_aux(x)
    assert float(aux["moe_dropped"]) == 0.0
    np.testing.assert_allclose(np.asarray(y), _numpy_reference(layer, x), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("implementation", SPARSE)
def test_sparse_equals_dense_values_and_grads_batched(implementation):
    ragged, dense = _pair(implementation)
    x = _x((3, 10, EMBED))
    ct = _x((3, 10, EMBED), seed=2)

    def loss(layer, x):
        return jnp.sum(jax.vmap(layer)(x) * ct)

    grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    (va, ga), (vb, gb) = grad(ragged, x), grad(dense, x)
    np.testing.assert_allclose(float(va), float(vb), atol=TOL, rtol=TOL)
    _assert_trees_close(ga, gb)
    # and the input gradient
    dx = eqx.filter_jit(jax.grad(loss, argnums=1))
    dxa, dxb = dx(ragged, x), dx(dense, x)
    np.testing.assert_allclose(dxa, dxb, atol=TOL, rtol=TOL)
    # every parameter gets a gradient: the router through the mixing weights
    assert all(bool(jnp.any(g != 0)) for g in _leaves(ga))


def test_eager_ragged_gradient_compiles_once_and_equals_the_jitted_one(compile_log):
    # An eager `jax.grad` of a vmapped ragged layer (a notebook) ran its per-member backward
    # pass as a `lax.map` over a new closure, compiled again on every call (one program a call
    # here, two for a ragged Mixtral's `lm_loss`).
    layer = _layer("ragged")
    x, ct = _x((3, 10, EMBED)), _x((3, 10, EMBED), seed=2)

    def loss(layer, x):
        return jnp.sum(jax.vmap(layer)(x) * ct)

    grad = eqx.filter_value_and_grad(loss)
    first = grad(layer, x)  # eager: compiles each operation once
    with compile_log() as log:
        again = grad(layer, x)
    assert log.compiled == [], log.compiled
    _assert_trees_close(again, first, tol=0.0)
    _assert_trees_close(again, eqx.filter_jit(grad)(layer, x))  # op by op against one program: TOL


@pytest.mark.parametrize("implementation", SPARSE)
def test_sparse_equals_dense_unbatched_grad(implementation):
    ragged, dense = _pair(implementation)
    x = _x((9, EMBED))

    def loss(layer):
        return jnp.sum(jnp.sin(layer(x)))

    grad = eqx.filter_jit(eqx.filter_grad(loss))
    _assert_trees_close(grad(ragged), grad(dense))


def test_ragged_is_dropless_when_every_token_picks_one_expert():
    # A router that sends every token to expert 2 first: that expert gets the whole batch (no
    # capacity, nothing dropped), the others few or none.
    ragged, dense = _pair("ragged", capacity_factor=1.0)
    router = jnp.zeros((EXPERTS, EMBED)).at[2].set(10.0)
    ragged, dense = (eqx.tree_at(lambda m: m.router.weight, m, router) for m in (ragged, dense))
    x = jnp.abs(_x((2, 12, EMBED)))  # positive inputs: expert 2's logit is the largest everywhere
    _, experts, _ = ragged.route(x[0])
    assert bool(jnp.all(experts[:, 0] == 2))
    np.testing.assert_allclose(jax.vmap(ragged)(x), jax.vmap(dense)(x), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("implementation", SPARSE)
def test_nested_vmap_and_vmap_over_layers(implementation):
    ragged, dense = _pair(implementation)
    x = _x((2, 3, 5, EMBED))
    nested = eqx.filter_jit(lambda layer: jax.vmap(jax.vmap(layer))(x))
    np.testing.assert_allclose(nested(ragged), nested(dense), atol=TOL, rtol=TOL)
    # A batch of layers (weights batched too): an ensemble, vmapped over layers and inputs.
    keys = jax.random.split(jax.random.key(3), 2)
    make = lambda impl: eqx.filter_vmap(  # noqa: E731
        lambda k: nn.MoE(EMBED, HIDDEN, EXPERTS, K, implementation=impl, capacity_factor=NO_DROP, key=k)
    )(keys)
    xs = _x((2, 7, EMBED))
    call = lambda layers: eqx.filter_vmap(lambda m, x: m(x))(layers, xs)  # noqa: E731
    np.testing.assert_allclose(eqx.filter_jit(call)(make(implementation)), eqx.filter_jit(call)(make("dense")), atol=TOL, rtol=TOL)
    grad = eqx.filter_jit(eqx.filter_grad(lambda m: jnp.sum(call(m) ** 2)))
    _assert_trees_close(grad(make(implementation)), grad(make("dense")))


@pytest.mark.parametrize(
    "implementation, remat, scan",
    [("ragged", "none", True), ("ragged", "full", True), ("ragged", "minimal", False), ("capacity", "full", True), ("capacity", "none", False)],
)
def test_inside_stacked_scan_and_remat(implementation, remat, scan):
    def block(impl):
        return lambda k: nn.MoE(EMBED, HIDDEN, EXPERTS, K, implementation=impl, capacity_factor=NO_DROP, key=k)

    ragged = nn.Stacked(block(implementation), 3, remat=remat, scan=scan, key=jax.random.key(0))
    dense = nn.Stacked(block("dense"), 3, remat=remat, scan=scan, key=jax.random.key(0))
    x = _x((2, 6, EMBED))

    def loss(stack):
        return jnp.sum(jnp.tanh(jax.vmap(stack)(x)))

    grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    (va, ga), (vb, gb) = grad(ragged), grad(dense)
    np.testing.assert_allclose(float(va), float(vb), atol=TOL, rtol=TOL)
    _assert_trees_close(ga, gb)


@pytest.mark.parametrize("implementation", SPARSE)
def test_bf16_inputs_compute_in_bf16(implementation):
    ragged, dense = _pair(implementation)
    ragged, dense = (jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, m) for m in (ragged, dense))
    x = _x((2, 8, EMBED), dtype=jnp.bfloat16)
    a, b = jax.vmap(ragged)(x), jax.vmap(dense)(x)
    assert a.dtype == b.dtype == jnp.bfloat16
    # bf16 keeps 8 bits of mantissa: both round the same products, in different groupings.
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-2, rtol=2e-2)


def test_route_picks_largest_probabilities_first():
    layer, _ = _pair()
    x = _x((13, EMBED))
    weights, experts, logits = layer.route(x)
    probs = jax.nn.softmax(logits, axis=-1)
    expected = np.argsort(-np.asarray(probs), axis=-1, kind="stable")[:, :K]
    np.testing.assert_array_equal(np.asarray(experts), expected)
    np.testing.assert_allclose(np.sum(np.asarray(weights), -1), 1.0, atol=1e-6)
    assert experts.dtype == jnp.int32 and weights.dtype == logits.dtype == jnp.float32


def test_router_losses_match_their_formulas():
    layer, _ = _pair()
    x = _x((17, EMBED))
    _, aux = layer.with_aux(x)
    _, experts, logits = layer.route(x)
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    fraction = np.bincount(np.asarray(experts).reshape(-1), minlength=EXPERTS) / experts.shape[0]
    balance = EXPERTS * np.sum(fraction * probs.mean(0))
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(aux["moe_load_balance"]), balance, rtol=1e-5)
    np.testing.assert_allclose(float(aux["moe_z_loss"]), np.mean(lse**2), rtol=1e-5)


def test_load_balance_is_k_with_uniform_probabilities_and_grows_when_collapsed():
    layer, _ = _pair()
    x = jnp.abs(_x((16, EMBED)))
    # Uniform router probabilities: the loss is k whatever the (tied) assignment.
    uniform = eqx.tree_at(lambda m: m.router.weight, layer, jnp.zeros((EXPERTS, EMBED)))
    assert float(uniform.with_aux(x)[1]["moe_load_balance"]) == pytest.approx(K, abs=1e-6)
    collapsed = eqx.tree_at(lambda m: m.router.weight, layer, jnp.zeros((EXPERTS, EMBED)).at[0].set(5.0))
    # Every token picks expert 0 (which holds nearly all the probability) and one other.
    assert float(collapsed.with_aux(x)[1]["moe_load_balance"]) > 0.9 * EXPERTS


def test_router_statistics_follow_the_mask():
    layer = _layer("capacity", capacity_factor=0.5)
    x = _x((12, EMBED), seed=5)
    mask = jnp.arange(12) < 7
    _, masked = layer.with_aux(x, mask)
    _, prefix = layer.with_aux(x[:7])
    # Masked-out positions do not count (the prefix is routed identically: capacity is causal,
    # though its slot count follows the full length, so only the router statistics compare).
    for name in ("moe_load_balance", "moe_z_loss"):
        np.testing.assert_allclose(float(masked[name]), float(prefix[name]), rtol=1e-6)
    weights = jnp.linspace(0.0, 1.0, 12)
    _, weighted = layer.with_aux(x, weights)
    lse = jax.nn.logsumexp(layer.route(x)[2], axis=-1)
    np.testing.assert_allclose(float(weighted["moe_z_loss"]), float(jnp.sum(weights * lse**2) / jnp.sum(weights)), rtol=1e-6)


@pytest.mark.parametrize("implementation", ["dense", "capacity", "ragged"])
def test_a_position_never_depends_on_later_ones(implementation):
    # Capacity 1.0 drops some assignments (the load is not balanced); the ones dropped must
    # depend only on earlier positions.
    layer = _layer(implementation, capacity_factor=1.0)
    x = _x((16, EMBED), seed=6)
    changed = x.at[10:].set(_x((6, EMBED), seed=7))
    a, b = eqx.filter_jit(layer)(x), eqx.filter_jit(layer)(changed)
    if implementation == "capacity":
        assert 0 < float(layer.with_aux(x)[1]["moe_dropped"]) < 0.5
    np.testing.assert_array_equal(np.asarray(a[:10]), np.asarray(b[:10]))
    assert not np.allclose(np.asarray(a[10:]), np.asarray(b[10:]))


def test_ragged_reverse_mode_compositions():
    ragged, dense = _pair()
    x = _x((2, 5, EMBED))
    # jax.jacrev: one backward pass per output element, for an unbatched forward.
    jac = lambda layer: eqx.filter_jit(jax.jacrev(lambda x: layer(x)))(x[0])  # noqa: E731
    np.testing.assert_allclose(np.asarray(jac(ragged)), np.asarray(jac(dense)), atol=TOL, rtol=TOL)
    # Forward mode and second derivatives are refused with what to use instead.
    with pytest.raises(ConfigError, match=r"implementation='ragged'\) supports reverse-mode gradients .* use implementation='dense' or 'capacity'"):
        jax.hessian(lambda x: jnp.sum(jax.vmap(ragged)(x) ** 2))(x)
    with pytest.raises(ConfigError, match=r"not forward-mode or higher-order differentiation"):
        jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(jax.vmap(ragged)(x) ** 2))(x)))(x)


@pytest.mark.parametrize("implementation", ["ragged", "dense", "capacity"])
def test_per_example_gradients_equal_a_loop(implementation):
    # jax.vmap of jax.grad (DP-SGD): each example's weight gradient is its own, not the batch's
    # sum ("ragged" once gave every example the sum). fp32, one layer: 1e-5 (weights of scale
    # 0.5, so that the gradients are of order one and the tolerance means something).
    layer = _layer(implementation, init_std=0.5)
    x = _x((3, 5, EMBED), seed=4)
    loss = lambda m, x: jnp.sum(m(x) ** 2)  # noqa: E731
    per_example = eqx.filter_jit(eqx.filter_vmap(eqx.filter_grad(loss), in_axes=(None, 0)))(layer, x)
    for i in range(x.shape[0]):
        one = eqx.filter_grad(loss)(layer, x[i])
        _assert_trees_close(jax.tree.map(lambda a, i=i: a[i], per_example), one)
    # The members differ (a sum broadcast to each would not).
    g = per_example.gate_proj
    assert float(jnp.max(jnp.abs(g[0] - g[1]))) > 0.1 * float(jnp.max(jnp.abs(g[0]))) > 0.1
    # ... and the gradient of the batched loss is still their sum.
    total = eqx.filter_jit(eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(x) ** 2)))(layer)
    _assert_trees_close(total, jax.tree.map(lambda a: jnp.sum(a, axis=0), per_example))


def test_the_train_step_sums_ragged_weight_gradients_in_one_pass():
    # Inside summed_weight_gradients() (eqzoo's train step traces its gradient there) the batched
    # backward pass routes the whole batch in one sort and sums the weight gradients: no
    # per-member loop (lax.map: a scan in the jaxpr) and no (batch, *weights) gradient. Same
    # gradient as the per-member path within 1e-5 (fp32).
    from eqzoo.nn import summed_weight_gradients

    layer = _layer("ragged", init_std=0.5)
    x = _x((3, 5, EMBED), seed=4)
    grad = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(x) ** 2))

    def loops(jaxpr):
        return str(jaxpr).count("scan[")

    per_member = grad(layer)
    assert loops(jax.make_jaxpr(lambda m: grad(m))(layer)) >= 1
    with summed_weight_gradients():
        summed = grad(layer)
        assert loops(jax.make_jaxpr(lambda m: grad(m))(layer)) == 0
    _assert_trees_close(summed, per_member)


def test_config_errors():
    with pytest.raises(ConfigError, match=r"experts_per_token must be between 1 and num_experts=4, got 5"):
        nn.MoE(EMBED, HIDDEN, 4, 5, key=jax.random.key(0))
    with pytest.raises(ConfigError, match=r"MoE needs num_experts >= 1, got 0"):
        nn.MoE(EMBED, HIDDEN, 0, 1, key=jax.random.key(0))
    with pytest.raises(ConfigError, match=r"MoE implementation must be one of \('dense', 'capacity', 'ragged'\), got 'sparse'"):
        nn.MoE(EMBED, HIDDEN, 4, 2, implementation="sparse", key=jax.random.key(0))
    with pytest.raises(ConfigError, match=r"MoE capacity_factor must be positive, got 0.0"):
        nn.MoE(EMBED, HIDDEN, 4, 2, capacity_factor=0.0, key=jax.random.key(0))


def test_batched_input_says_vmap():
    layer, _ = _pair()
    with pytest.raises(ShapeError, match=r"MoE takes one sequence of shape \(seq, embed\); got \(2, 5, 16\)\. Wrap the call in jax.vmap"):
        layer(_x((2, 5, EMBED)))


def test_one_expert_with_renormalised_weights_leaves_the_router_to_the_router_losses():
    layer = nn.MoE(EMBED, HIDDEN, EXPERTS, 1, key=jax.random.key(0))
    assert not layer.router_trains_from_loss()
    x = _x((6, EMBED))
    router_grad = jax.grad(lambda m: jnp.sum(m(x) ** 2))(layer).router.weight
    assert float(jnp.max(jnp.abs(router_grad))) < 1e-9  # p / p: rounding only
    switch = nn.MoE(EMBED, HIDDEN, EXPERTS, 1, normalize_weights=False, key=jax.random.key(0))
    assert switch.router_trains_from_loss()
    router_grad = jax.grad(lambda m: jnp.sum(m(x) ** 2))(switch).router.weight
    assert float(jnp.max(jnp.abs(router_grad))) > 1e-6
