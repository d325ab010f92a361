"""Mixtral: the router losses in lm_loss, dropless routing through a whole model (grouped products
equal every-expert products), batched decoding, parameter counts and config errors."""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqzoo
from eqzoo import models, quant, train
from eqzoo._errors import ConfigError, ShapeError

MODEL_TOL = 1e-4  # fp32, whole models
CONFIG = models.get_config("tiny-mixtral", max_seq=32)


@pytest.fixture(scope="module")
def pair():
    """The same weights with grouped ("ragged") and every-expert ("dense", the default) experts."""
    ragged = models.create(dataclasses.replace(CONFIG, moe_implementation="ragged"), key=jax.random.key(0))
    dense = models.create(CONFIG, key=jax.random.key(0))
    return ragged, dense


@eqx.filter_jit
def _forward(model, tokens):
    """`model(tokens)` compiled (called eagerly, the layer scan compiles anew on every call)."""
    return model(tokens)


@eqx.filter_jit
def _decode(model, tokens, cache, index, batch_size):
    """`model.decode` compiled once per model, token count and batch size (eagerly, every step
    compiled its layer scan anew)."""
    return model.decode(tokens, cache, index, batch_size=batch_size)


def _batch(seed=1, batch=4, seq=24):
    toks = jax.random.randint(jax.random.key(seed), (batch, seq + 1), 0, CONFIG.vocab_size, dtype=jnp.int32)
    return {"tokens": toks[:, :-1], "targets": toks[:, 1:]}


def test_lm_loss_adds_weighted_router_losses(pair):
    ragged, dense = pair
    batch = _batch()
    grad = eqx.filter_jit(eqx.filter_value_and_grad(lambda m: train.lm_loss(m, batch), has_aux=True))
    (total, metrics), grads = grad(ragged)
    (total_d, metrics_d), grads_d = grad(dense)
    assert set(metrics) == {"tokens", "nll", "moe_load_balance", "moe_z_loss", "moe_dropped"}
    assert float(metrics["moe_dropped"]) == 0.0
    # per_layer=True adds one scalar per statistic and layer, and nothing else
    _, layered = eqx.filter_eval_shape(lambda m: train.lm_loss(m, batch, per_layer=True), ragged)  # values: below
    stats = ("moe_load_balance", "moe_z_loss", "moe_dropped")
    assert set(layered) == set(metrics) | {f"{n}/layer_{i}" for n in stats for i in range(CONFIG.num_layers)}
    assert all(layered[k].shape == () for k in layered)
    expected = (
        metrics["nll"]
        + CONFIG.router_aux_loss_coef * metrics["moe_load_balance"]
        + CONFIG.router_z_loss_coef * metrics["moe_z_loss"]
    )
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
    # the next-token part is the plain cross-entropy of the model's logits
    logits = eqx.filter_jit(lambda m, t: jax.vmap(m)(t))(ragged, batch["tokens"])
    np.testing.assert_allclose(float(metrics["nll"]), float(train.cross_entropy(logits, batch["targets"])), atol=1e-5)
    # grouped experts compute what every-expert products compute, gradients included
    np.testing.assert_allclose(float(total), float(total_d), atol=1e-5)
    for a, b in zip(jax.tree.leaves(eqx.filter(grads, eqx.is_array)), jax.tree.leaves(eqx.filter(grads_d, eqx.is_array)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_every_loss_implementation_adds_the_same_router_losses(pair):
    ragged, _ = pair
    batch = _batch()
    loss = eqx.filter_jit(lambda m, impl: train.lm_loss(m, batch, implementation=impl))
    results = {impl: loss(ragged, impl) for impl in train.LM_LOSS_IMPLEMENTATIONS}
    ref_total, ref_metrics = results["fused"]
    for total, metrics in results.values():
        np.testing.assert_allclose(float(total), float(ref_total), atol=1e-5)
        for name in ("moe_load_balance", "moe_z_loss"):
            np.testing.assert_allclose(float(metrics[name]), float(ref_metrics[name]), rtol=1e-6)


def test_router_losses_average_the_layers(pair):
    ragged, _ = pair
    tokens = _batch()["tokens"][0]
    _, aux = eqx.filter_jit(lambda m, t: m.features_and_aux(t))(ragged, tokens)

    @eqx.filter_jit
    def layer_by_layer(m, t):
        x = m.embed_tokens(t, jnp.arange(t.shape[0], dtype=jnp.int32))
        per_layer = []
        for i in range(CONFIG.num_layers):
            x, a = m.blocks[i].with_aux(x)
            per_layer.append(a)
        return per_layer

    per_layer = layer_by_layer(ragged, tokens)
    for name in ("moe_load_balance", "moe_z_loss"):
        np.testing.assert_allclose(float(aux[name]), np.mean([float(a[name]) for a in per_layer]), rtol=1e-5)


def test_capacity_model_reports_dropped_assignments():
    # Capacity 0.25 of a balanced load: most assignments dropped, and the metric says how many;
    # the loss still trains (dropped tokens keep their residual).
    model = models.create(dataclasses.replace(CONFIG, moe_implementation="capacity", moe_capacity_factor=0.25), key=jax.random.key(0))
    loss, metrics = eqx.filter_jit(train.lm_loss)(model, _batch())
    assert 0.5 < float(metrics["moe_dropped"]) < 1.0
    assert np.isfinite(float(loss))


def test_with_moe_implementation_switches_every_layer_and_shares_the_weights(pair):
    # A "capacity" model that drops assignments (capacity 0.5 of a balanced load), switched to
    # "dense" for evaluation: the same logits as a "dense" model of the same weights (fp32,
    # MODEL_TOL), none dropped, and not one array copied.
    _, dense = pair
    capacity = models.create(
        dataclasses.replace(CONFIG, moe_implementation="capacity", moe_capacity_factor=0.5), key=jax.random.key(0)
    )
    batch = _batch()
    forward = eqx.filter_jit(lambda m, t: jax.vmap(m)(t))
    assert float(eqx.filter_jit(train.lm_loss)(capacity, batch)[1]["moe_dropped"]) > 0.1
    switched = capacity.with_moe_implementation("dense")
    assert switched.config == dataclasses.replace(capacity.config, moe_implementation="dense")
    assert switched.blocks.layers.mlp.implementation == "dense"
    np.testing.assert_allclose(forward(switched, batch["tokens"]), forward(dense, batch["tokens"]), atol=MODEL_TOL, rtol=0)
    assert float(np.max(np.abs(forward(capacity, batch["tokens"]) - forward(dense, batch["tokens"])))) > 10 * MODEL_TOL
    assert float(eqx.filter_jit(train.lm_loss)(switched, batch)[1]["moe_dropped"]) == 0.0
    mine, theirs = jax.tree.leaves(eqx.filter(switched, eqx.is_array)), jax.tree.leaves(eqx.filter(capacity, eqx.is_array))
    assert len(mine) == len(theirs) and all(a is b for a, b in zip(mine, theirs, strict=True))
    # a model whose layers are not scanned, and back again
    unrolled = models.create(dataclasses.replace(CONFIG, moe_implementation="capacity", scan_layers=False), key=jax.random.key(0))
    ragged = unrolled.with_moe_implementation("ragged")
    layers = [m for m in jax.tree.leaves(ragged, is_leaf=lambda m: isinstance(m, eqzoo.nn.MoE)) if isinstance(m, eqzoo.nn.MoE)]
    assert layers and all(m.implementation == "ragged" for m in layers)
    assert ragged.with_moe_implementation("capacity").config == unrolled.config
    with pytest.raises(ConfigError, match=r"with_moe_implementation: implementation must be one of .*'dense'.*got 'sparse'"):
        capacity.with_moe_implementation("sparse")


def test_zero_weights_leave_the_plain_loss(pair):
    ragged, _ = pair
    off = models.create(dataclasses.replace(CONFIG, router_aux_loss_coef=0.0, router_z_loss_coef=0.0), key=jax.random.key(0))
    loss, metrics = eqx.filter_jit(train.lm_loss)(off, _batch())
    np.testing.assert_allclose(float(loss), float(metrics["nll"]), rtol=0)


def test_dense_models_report_no_router_losses():
    llama = models.create("tiny-llama", key=jax.random.key(0))
    assert llama.aux_loss_weights() == {}
    _, metrics = eqx.filter_jit(train.lm_loss)(llama, _batch())
    assert set(metrics) == {"tokens"}


def test_batched_greedy_generation_equals_argmax_of_forward(pair):
    ragged, _ = pair
    prompts = _batch(seed=3, batch=3, seq=6)["tokens"]
    out = eqzoo.generation.generate_batch(ragged, prompts, max_new_tokens=8)
    assert out.shape == (3, 14)
    forward = eqx.filter_jit(lambda m, t: m(t))
    for row in np.asarray(out):
        logits = forward(ragged, jnp.asarray(row[:-1]))
        np.testing.assert_array_equal(np.argmax(np.asarray(logits[5:]), -1), row[6:])


def test_active_parameters_and_flops():
    c = models.get_config("mixtral-8x7b")
    assert c.num_params() == 46_702_792_704
    assert c.num_active_params() == 12_879_925_248  # 2 of 8 experts
    dense_equivalent = dataclasses.replace(c, experts_per_token=c.num_experts)
    assert dense_equivalent.num_active_params() == c.num_params()
    assert c.flops_per_token(4096) < dense_equivalent.flops_per_token(4096) / 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_experts": 4, "experts_per_token": 5}, r"experts_per_token=5 exceeds num_experts=4"),
        ({"num_experts": 0}, r"these must be positive, got \{'num_experts': 0\}"),
        ({"router_aux_loss_coef": -0.1}, r"router_aux_loss_coef must be a finite number >= 0, got -0\.1"),
        ({"router_z_loss_coef": float("nan")}, r"router_z_loss_coef must be a finite number >= 0, got nan"),
        ({"moe_implementation": "sparse"}, r"moe_implementation must be one of \('dense', 'capacity', 'ragged'\), got 'sparse'"),
        ({"moe_capacity_factor": 0.0}, r"moe_capacity_factor must be a finite number > 0, got 0\.0"),
        # these failed inside the forward pass (OverflowError, TypeError) or were read as truthy
        ({"moe_capacity_factor": float("inf")}, r"moe_capacity_factor must be a finite number > 0, got inf"),
        ({"moe_capacity_factor": "1.5"}, r"moe_capacity_factor must be a finite number > 0, got '1\.5'"),
        ({"normalize_router_weights": "no"}, r"normalize_router_weights must be True or False, got 'no'"),
    ],
)
def test_config_errors(overrides, message, unchecked):
    with unchecked(), pytest.raises(ConfigError, match=message):  # eqzoo's own checks, as a user's run meets them
        models.get_config("tiny-mixtral", **overrides)


def test_masked_positions_leave_the_router_losses_alone(pair):
    _, dense = pair
    batch = _batch()
    mask = jnp.broadcast_to(jnp.arange(batch["tokens"].shape[1]) < 16, batch["tokens"].shape)
    changed = {**batch, "tokens": batch["tokens"].at[:, 16:].set((batch["tokens"][:, 16:] + 7) % CONFIG.vocab_size)}
    loss = eqx.filter_jit(train.lm_loss)
    (_, a), (_, b) = loss(dense, {**batch, "mask": mask}), loss(dense, {**changed, "mask": mask})
    for name in ("nll", "moe_load_balance", "moe_z_loss"):
        np.testing.assert_allclose(float(a[name]), float(b[name]), rtol=1e-6)
    _, unmasked = loss(dense, changed)
    assert abs(float(unmasked["moe_z_loss"]) - float(b["moe_z_loss"])) > 1e-4


def test_lm_loss_warns_when_the_loss_cannot_reach_the_routers():
    top1 = models.create(dataclasses.replace(CONFIG, experts_per_token=1), key=jax.random.key(0))
    with pytest.warns(UserWarning, match=r"route each token to one expert and renormalise its weight to 1, so the loss gives the routers no gradient") as caught:
        eqx.filter_eval_shape(train.lm_loss, top1, _batch())  # warned while tracing: nothing need run
    assert caught[0].filename == __file__
    switch = models.create(dataclasses.replace(CONFIG, experts_per_token=1, normalize_router_weights=False), key=jax.random.key(0))
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: train.lm_loss(m, _batch())[1]["nll"]))(switch)
    assert float(jnp.max(jnp.abs(grads.blocks.layers.mlp.router.weight))) > 0  # Switch weighting trains them


@pytest.mark.parametrize("implementation", ["dense", "ragged"])
def test_decoding_one_token_reads_only_the_chosen_experts(implementation):
    """At batch 1 a decode step gathers its 2 of 8 experts' weights (no product touches the
    whole expert stack) and gives the logits of the full forward pass."""
    model = models.create("tiny-mixtral", key=jax.random.key(0), num_experts=8, moe_implementation=implementation)
    tokens = jax.random.randint(jax.random.key(1), (9,), 0, 200, dtype=jnp.int32)
    cache = model.init_cache(16)
    logits, cache = _decode(model, tokens[:5], cache, jnp.int32(0), 1)  # prefill: 10 assignments, all experts
    rows = [logits]
    for t in range(5, 9):
        logits, cache = _decode(model, tokens[t : t + 1], cache, jnp.int32(t), 1)
        rows.append(logits)
    np.testing.assert_allclose(jnp.concatenate(rows), _forward(model, tokens), atol=1e-5, rtol=1e-5)
    moe = model.blocks[0].mlp
    assert moe.gathers(1) and not moe.gathers(4)
    x = jnp.ones((1, model.config.embed_dim))
    stack = tuple(moe.gate_proj.shape)  # (experts, embed, hidden)

    def operands(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield from (tuple(v.aval.shape) for v in eqn.invars)

    assert stack in set(operands(jax.make_jaxpr(lambda x: moe.decode(x, None))(x).jaxpr)) or implementation == "ragged"
    assert stack not in set(operands(jax.make_jaxpr(lambda x: moe.decode(x, 1))(x).jaxpr))


def test_gathered_and_full_expert_decoding_generate_the_same_tokens():
    model = models.create("tiny-mixtral", key=jax.random.key(0), num_experts=8)
    prompt = jax.random.randint(jax.random.key(2), (6,), 0, 200, dtype=jnp.int32)
    alone = eqzoo.generate(model, prompt, max_new_tokens=12)  # batch 1: gathers
    batched = eqzoo.generation.generate_batch(model, jnp.stack([prompt] * 8), None, max_new_tokens=12)
    np.testing.assert_array_equal(alone, batched[0])  # batch 8 routes 16 assignments: every expert read


def _primitives_reading(jaxpr, shape):
    """The primitives (inside nested jaxprs too) that take an operand of `shape`."""
    found = set()
    for eqn in jaxpr.eqns:
        subs = [v for v in eqn.params.values() if isinstance(v, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr)]
        if subs:
            for sub in subs:
                found |= _primitives_reading(getattr(sub, "jaxpr", sub), shape)
        elif any(tuple(getattr(v.aval, "shape", ())) == shape for v in eqn.invars):
            found.add(eqn.primitive.name)
    return found


@pytest.mark.parametrize("kind", ["int8", "int8-lora"])  # int8-lora: LoRAWeight.take over QuantizedWeight.take
def test_int8_and_lora_experts_decode_by_gathering_too(kind):
    """Int8 experts, LoRA-adapted experts and LoRA over int8 experts are read expert by expert
    when decoding (only a gather touches the whole stack) and give the full pass's logits."""
    from eqzoo import peft

    model = models.create("tiny-mixtral", key=jax.random.key(0), num_experts=8)
    if kind.startswith("int8"):
        model = eqx.filter_jit(quant.quantize)(model)  # compiled: eagerly, op by op
    if kind.endswith("lora"):
        model = peft.lora(model, rank=2, targets="router", experts=True, key=jax.random.key(3))
        model = jax.tree.map(lambda a: a + 0.05 if eqx.is_inexact_array(a) and a.ndim == 4 and a.shape[-2] == 2 else a, model)
    moe = model.blocks[0].mlp
    assert moe.gathers(1)
    x = jax.random.normal(jax.random.key(4), (1, model.config.embed_dim))
    np.testing.assert_allclose(*eqx.filter_jit(lambda moe, x: (moe.decode(x, 1), moe.decode(x, None)))(moe, x), atol=1e-5, rtol=1e-5)
    jaxpr = jax.make_jaxpr(lambda x: moe.decode(x, 1))(x).jaxpr
    # Codes, LoRA factors, float bases (the (experts, ., .) arrays; a 2-D scale shares its shape
    # with the router's weight): each only gathered.
    leaves = [a for a in jax.tree.leaves((moe.gate_proj, moe.up_proj, moe.down_proj)) if eqx.is_array(a) and a.ndim == 3]
    for leaf in leaves:
        assert _primitives_reading(jaxpr, tuple(leaf.shape)) <= {"gather"}, (kind, leaf.shape)
    prompt = jax.random.randint(jax.random.key(2), (6,), 0, 200, dtype=jnp.int32)
    cache = model.init_cache(16)
    logits, cache = _decode(model, prompt[:5], cache, jnp.int32(0), 1)
    step, _ = _decode(model, prompt[5:], cache, jnp.int32(5), 1)
    np.testing.assert_allclose(step, _forward(model, prompt)[5:], atol=1e-4, rtol=1e-4)


def test_gathered_experts_are_multiplied_in_their_stored_layout():
    """The batch-1 decode step multiplies each chosen expert in its stored layout, products
    batched over the position and choice (XLA:CPU once transposed the k gathered weights into
    one (embed, k * hidden) float operand, element by element); int4 experts on CPU multiply
    from their packed bytes, the low and high nibbles as two (embed // 2, hidden) halves, and no
    float (embed, hidden) expert weight is formed. Equal to the dequantize-then-multiply
    product within 1e-5 (float32), per channel, in groups, and with an odd group size (which
    splits bytes between groups, so it dequantizes instead)."""
    embed, hidden, k = 48, 128, 2
    moe = eqzoo.nn.MoE(embed, hidden, 8, k, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(4), (3, k, embed))
    idx = jnp.array([[0, 5], [7, 7], [2, 1]], jnp.int32)

    @eqx.filter_jit  # compiled: eagerly, quantizing and multiplying ran op by op
    def products(weight, group_size):
        w = quant.QuantizedWeight(weight, bits=4, group_size=group_size)
        return w.take_matmul(x, idx), jnp.einsum("tkd,tkdh->tkh", x, w.take(idx, jnp.float32))

    for group_size in (None, 16, 3):  # 3: odd (group_size=1 is refused)
        got, want = products(moe.gate_proj, group_size)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    fields = lambda m: (m.gate_proj, m.up_proj, m.down_proj)  # noqa: E731
    moe = eqx.filter_jit(lambda m: eqx.tree_at(fields, m, tuple(quant.QuantizedWeight(a, bits=4, group_size=16) for a in fields(m))))(moe)
    hlo = jax.jit(jax.vmap(lambda x: moe.decode(x, 1))).lower(jnp.ones((1, 1, embed))).compile().as_text()
    on_cpu = jax.default_backend() == "cpu"
    assert f"f32[{embed},{k * hidden}]" not in hlo
    assert (f"f32[{k},{embed // 2},{hidden}]" in hlo) == on_cpu  # the nibble halves, gate and up
    assert (f"f32[{k},{embed},{hidden}]" not in hlo) == on_cpu


def test_capacity_prefill_does_not_depend_on_the_batch_size():
    """A short prefill under "capacity" may drop assignments; the gather path would not, so it
    is not taken there and batch 1 and batch 8 give the same logits and tokens."""
    model = models.create("tiny-mixtral", key=jax.random.key(0), num_experts=8, experts_per_token=1,
                          moe_implementation="capacity")
    prompt = jax.random.randint(jax.random.key(2), (3,), 0, 200, dtype=jnp.int32)
    cache = model.init_cache(8)
    one, _ = _decode(model, prompt, cache, jnp.int32(0), 1)
    eight, _ = _decode(model, prompt, cache, jnp.int32(0), 8)
    np.testing.assert_array_equal(one, eight)
    alone = eqzoo.generate(model, prompt, max_new_tokens=8)
    np.testing.assert_array_equal(alone, eqzoo.generation.generate_batch(model, jnp.stack([prompt] * 8), None, max_new_tokens=8)[0])


@pytest.mark.parametrize("scan_layers", [True, False])
def test_per_layer_router_statistics_average_to_the_reported_ones(scan_layers):
    # The statistics were only available averaged over layers, which hides one collapsing layer.
    config = dataclasses.replace(CONFIG, moe_implementation="capacity", moe_capacity_factor=0.5, scan_layers=scan_layers)
    model = models.create(config, key=jax.random.key(0))
    tokens = _batch()["tokens"][0]

    @eqx.filter_jit
    def both(m, t):
        return m.features_and_aux(t)[1], m.features_and_aux(t, per_layer=True)[1]

    averaged, per_layer = both(model, tokens)
    assert set(per_layer) == set(averaged) == {"moe_load_balance", "moe_z_loss", "moe_dropped"}
    for name, values in per_layer.items():
        assert values.shape == (CONFIG.num_layers,)
        np.testing.assert_array_equal(jnp.mean(values), averaged[name])  # the same reduction: bit-identical
    assert float(jnp.max(per_layer["moe_dropped"])) > 0.0


# A tiny Qwen3-MoE (a Mixtral with query/key norms, renormalised top-k, "capacity" experts).
QWEN3_MOE = dataclasses.replace(
    CONFIG, qk_norm=True, normalize_router_weights=True, router_aux_loss_coef=0.001, moe_implementation="capacity"
)


@pytest.mark.parametrize(
    "config",
    [
        dataclasses.replace(CONFIG, num_layers=3, moe_implementation="capacity", moe_capacity_factor=0.5, scan_layers=False),
        dataclasses.replace(QWEN3_MOE, num_layers=3, moe_capacity_factor=0.5),
    ],
    ids=["mixtral-unrolled", "qwen3-moe-scanned"],
)
def test_per_layer_metrics_in_a_train_step_leave_the_loss_alone(config, compile_log):
    # fit logged only the layers' averages, which hide one collapsing layer. Three layers with a
    # mask that counts each sequence differently, so the layers and the weighting both matter.
    model = models.create(config, key=jax.random.key(0))
    optimizer = optax.sgd(0.1)
    loss = functools.partial(train.lm_loss, implementation="full")  # the quickest to compile; all share the router path
    batch = _batch() | {"mask": jnp.arange(24)[None, :] < jnp.array([[24], [10], [5], [20]])}

    def one_step(loss_fn):
        state = train.TrainState.create(model, optimizer, key=jax.random.key(1))
        return train.make_train_step(loss_fn, optimizer, donate=False)(state, batch)

    before_state, before = one_step(loss)
    jax.clear_caches()  # counted from a cold cache (see tests/conftest.py's CompileLog)
    with compile_log("flat_step") as log:
        after_state, after = one_step(functools.partial(loss, per_layer=True))
    assert len(log.compiled) == 1  # one program, with the per-layer scalars among its outputs
    for name, value in before.items():  # the loss, the averages, the gradient norm: bit for bit
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    # The updated parameters to float32 rounding: the two programs differ (the per-layer outputs),
    # and XLA:CPU's code for them may round an update differently in the last bit (seen: 3.7e-9
    # on 4e-3 with the suite's older emitters, tests/conftest.py).
    params = [jax.tree.leaves(eqx.filter(s.model, eqx.is_array)) for s in (before_state, after_state)]
    for a, b in zip(*params, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    for name in ("moe_load_balance", "moe_z_loss", "moe_dropped"):
        layers = [after[f"{name}/layer_{i}"] for i in range(3)]
        # the same sums in another order: fp32 rounding only
        np.testing.assert_allclose(np.mean(layers), before[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert len({float(after[f"moe_load_balance/layer_{i}"]) for i in range(3)}) == 3  # not one value repeated
    assert set(after) - set(before) == {f"{n}/layer_{i}" for n in ("moe_load_balance", "moe_z_loss", "moe_dropped") for i in range(3)}


def test_per_layer_keys_are_zero_padded_and_a_dense_model_adds_none():
    # shapes only: nothing is initialised or compiled
    def metrics(config):
        model = eqx.filter_eval_shape(models.create, config, key=jax.random.key(0))
        return eqx.filter_eval_shape(lambda m: train.lm_loss(m, _batch(batch=1, seq=4), per_layer=True), model)[1]

    deep = metrics(dataclasses.replace(CONFIG, num_layers=11))
    layers = sorted(k.split("/")[1] for k in deep if k.startswith("moe_dropped/"))
    assert layers == [f"layer_{i:02d}" for i in range(11)]  # sorted as the layers are
    assert set(metrics(models.get_config("tiny-llama", max_seq=32))) == {"tokens"}


class _TwoLayerToy(eqx.Module):
    """A model with an auxiliary loss whose features_and_aux predates per_layer (or, with
    `scalar=True`, takes it and still returns averages)."""

    embed: jax.Array
    scalar: bool = eqx.field(static=True, default=False)

    def features(self, tokens):
        return self.embed[tokens]

    def head_weight(self):
        return self.embed

    def aux_loss_weights(self):
        return {"toy": 0.1}

    def features_and_aux(self, tokens, mask=None, **kwargs):
        if not self.scalar and "per_layer" in kwargs:
            raise TypeError("unexpected per_layer")
        return self.embed[tokens], {"toy": jnp.sum(self.embed)}


def test_per_layer_metrics_need_a_model_that_reports_layers(unchecked):
    batch = _batch(batch=2, seq=4)
    embed = jnp.ones((CONFIG.vocab_size, 8))

    class Old(eqx.Module):
        inner: _TwoLayerToy

        def features(self, tokens):
            return self.inner.features(tokens)

        def head_weight(self):
            return self.inner.head_weight()

        def aux_loss_weights(self):
            return self.inner.aux_loss_weights()

        def features_and_aux(self, tokens, mask=None):
            return self.inner.features_and_aux(tokens, mask)

    assert set(train.lm_loss(Old(_TwoLayerToy(embed)), batch)[1]) == {"tokens", "nll", "toy"}
    with pytest.raises(ConfigError, match=r"per_layer=True\) needs the model's features_and_aux to take per_layer=True.*Old"):
        train.lm_loss(Old(_TwoLayerToy(embed)), batch, per_layer=True)
    with pytest.raises(ShapeError, match=r"each statistic as a \(num_layers,\) array; got 'toy' of shape \(\)"):
        train.lm_loss(_TwoLayerToy(embed, scalar=True), batch, per_layer=True)
    with unchecked(), pytest.raises(ConfigError, match=r"lm_loss: per_layer must be True or False, got 'yes'"):
        train.lm_loss(_TwoLayerToy(embed), batch, per_layer="yes")
