"""The contract every registered preset meets: one parametrized suite over `list_presets()`.

Presets small enough for CPU (`config.num_params() < SMALL`) run through init, jit, vmap, finite
gradients, the bf16 dtype policy, a second train step without recompiling, and a serialisation
round trip. The big ones are checked at the config level: `num_params()` against the parameter
count of `eqx.filter_eval_shape(...)` of the model, and `flops_per_token` against the matmul
FLOPs of a traced (never run) gradient computation.
"""

import contextlib

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqzoo import diffusion, models, train
from eqzoo._errors import ConfigError, ShapeError
from eqzoo.models._build import _INIT_FREE
from eqzoo.models._registry import _construct
from eqzoo.nn import RopeScaling

SMALL = 5_000_000  # parameters; presets below this run on CPU in the contract suite
SEQ = 16  # tokens per sequence for language-model presets
BATCH = 4
MODEL_TOL = 1e-4  # fp32, whole models

PRESETS = models.list_presets()
SMALL_PRESETS = [p for p in PRESETS if models.get_config(p).num_params() < SMALL]
BIG_PRESETS = [p for p in PRESETS if p not in SMALL_PRESETS]


# ------------------------------------------------------------------------------ family adapters
# How to make a batch and a loss for each model family. A preset of a new family fails here with
# a KeyError until the family gets an adapter.


def _lm_batch(config, key):
    tokens = jax.random.randint(key, (BATCH, SEQ + 1), 0, config.vocab_size, dtype=jnp.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}


def _mlp_batch(config, key):
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (BATCH, config.in_features)),
        "y": jax.random.randint(ky, (BATCH,), 0, config.out_features, dtype=jnp.int32),
    }


def _cnn_batch(config, key):
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (BATCH, config.in_channels, 8, 8)),
        "y": jax.random.randint(ky, (BATCH,), 0, config.num_classes, dtype=jnp.int32),
    }


def _vit_batch(config, key):
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (BATCH, config.in_channels, config.image_size, config.image_size)),
        "y": jax.random.randint(ky, (BATCH,), 0, config.num_classes, dtype=jnp.int32),
    }


def _cnn_loss(model, model_state, batch, key):
    logits, model_state = jax.vmap(
        model, in_axes=(0, None), out_axes=(0, None), axis_name="batch"
    )(batch["x"], model_state)
    return train.cross_entropy(logits, batch["y"]), model_state


ADAPTERS = {
    # config type: (make_batch, loss_fn, input key)
    models.GPT2Config: (_lm_batch, train.lm_loss, "tokens"),
    models.LlamaConfig: (_lm_batch, train.lm_loss, "tokens"),
    models.MixtralConfig: (_lm_batch, train.lm_loss, "tokens"),
    models.GemmaConfig: (_lm_batch, train.lm_loss, "tokens"),
    models.MLPConfig: (_mlp_batch, train.classification_loss, "x"),
    models.CNNConfig: (_cnn_batch, _cnn_loss, "x"),
    models.ViTConfig: (_vit_batch, train.classification_loss, "x"),
    models.DiTConfig: (_vit_batch, diffusion.make_diffusion_loss(diffusion.NoiseSchedule.linear(100)), "x"),
    models.UNetConfig: (_vit_batch, diffusion.make_diffusion_loss(diffusion.NoiseSchedule.linear(100)), "x"),
}

# Families whose forward takes more than the input: how the suite calls them on one input.
FORWARDS = {
    models.DiTConfig: lambda model, x: model(x, jnp.int32(10), jnp.int32(1)),  # timestep, label
    models.UNetConfig: lambda model, x: model(x, jnp.int32(10), jnp.int32(1)),
}

# Families whose output layers start at zero (adaLN-Zero, zero-initialised output convolutions):
# the first step's gradient reaches only those layers, the layers feeding them the next steps.
ZERO_INIT_FAMILIES = (models.DiTConfig, models.UNetConfig)


class Case:
    """One preset, built once per module: model, optional state, batch, loss and jitted forward."""

    def __init__(self, name):
        self.name = name
        self.config = models.get_config(name)
        make_batch, self.loss_fn, self.input_key = ADAPTERS[type(self.config)]
        self.stateful = models.is_stateful(self.config)
        out = models.create(name, key=jax.random.key(0))
        self.model, self.model_state = out if self.stateful else (out, None)
        self.batch = make_batch(self.config, jax.random.key(1))
        self.inputs = self.batch[self.input_key]
        self.forward_traces = 0
        # Modules may hold non-array leaves (e.g. the MLP's activation), hence filter_jit.
        self.jit_forward = eqx.filter_jit(self.forward)

    def forward(self, model, model_state, x):
        """One example through the model (inference mode for stateful models)."""
        self.forward_traces += 1  # Python side effect: counts traces
        if self.stateful:
            return eqx.nn.inference_mode(model)(x, model_state)[0]
        if type(self.config) in FORWARDS:
            return FORWARDS[type(self.config)](model, x)
        return model(x)

    def fresh(self):
        """A copy of (model, model_state): train steps donate their input buffers. (Copied
        through the host: a device copy compiles one program per leaf shape.)"""
        return jax.tree.map(
            lambda a: jnp.asarray(np.array(a)) if eqx.is_array(a) else a, (self.model, self.model_state)
        )


@pytest.fixture(scope="module")
def cases():
    """`cases(name)`: the preset's `Case`, built on first use and shared by every test of this
    module (each small preset is built once here, not once per test)."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = Case(name)
        return built[name]

    yield get
    built.clear()


@pytest.fixture(scope="module", params=SMALL_PRESETS)
def case(request, cases):
    return cases(request.param)


def _params(model):
    return eqx.filter(model, eqx.is_inexact_array)


def _bitwise_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True)
    )


def test_presets_are_split_sensibly():
    # Guards the parametrization itself: the suite must exercise something of every family.
    families = {type(models.get_config(p)) for p in SMALL_PRESETS}
    assert families == set(ADAPTERS), f"small presets cover {families}"
    assert {"gpt2-124m", "llama-8b"} <= set(BIG_PRESETS)


# ------------------------------------------------------------------------------ small presets


def _create(name, seed):
    out = models.create(name, key=jax.random.key(seed))
    return out[0] if models.is_stateful(models.get_config(name)) else out


def test_init_is_deterministic_and_float32(case):
    # `create` builds in one compiled program (case.model); eager building, op by op, gives the
    # same pytree (static fields, non-array leaves, BatchNorm state) and the same bits.
    eager = models.create(case.name, key=jax.random.key(0), jit=False)
    built = (case.model, case.model_state) if case.stateful else case.model
    assert jax.tree.structure(eager) == jax.tree.structure(built)
    assert jax.tree.leaves(eqx.filter(eager, eqx.is_array, inverse=True)) == jax.tree.leaves(eqx.filter(built, eqx.is_array, inverse=True))
    assert _bitwise_equal(eqx.filter(eager, eqx.is_array), eqx.filter(built, eqx.is_array))
    assert not _bitwise_equal(_params(_create(case.name, 7)), _params(case.model))
    leaves = jax.tree.leaves(_params(case.model))
    assert leaves and all(x.dtype == jnp.float32 for x in leaves)
    # A weakly typed parameter turns strong after its first update (and Adam's moments after
    # the second), so the train step would compile three times.
    assert not [x.shape for x in leaves if x.weak_type], "weakly typed parameters"
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)  # on the host: no program per leaf shape
    n = sum(x.size for x in leaves)
    assert n == case.config.num_params(), f"{case.name}: counted {n}, config says {case.config.num_params()}"


def test_jit_and_vmap(case):
    traces = case.forward_traces
    single = jnp.stack([case.jit_forward(case.model, case.model_state, x) for x in case.inputs])
    batched = eqx.filter_jit(eqx.filter_vmap(case.forward, in_axes=(None, None, 0)))(
        case.model, case.model_state, case.inputs
    )
    assert batched.shape == single.shape and batched.shape[0] == BATCH
    assert batched.dtype == single.dtype == jnp.float32
    np.testing.assert_allclose(batched, single, atol=MODEL_TOL, rtol=MODEL_TOL)
    # Another instance of the same structure reuses the compiled program (statics compare equal).
    other = jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + 1) if eqx.is_inexact_array(a) else a, case.model)
    case.jit_forward(other, case.model_state, case.inputs[0])
    assert case.forward_traces - traces <= 2, "jit: 1 trace, vmap: 1 trace, new instance: none"


# Presets whose models take floating-point inputs (language models take integer tokens:
# tested in test_lm_models.py).
FLOAT_INPUT_PRESETS = [p for p in SMALL_PRESETS if ADAPTERS[type(models.get_config(p))][2] == "x"]


@pytest.mark.parametrize("checked", [True, False])
@pytest.mark.parametrize("name", FLOAT_INPUT_PRESETS)
def test_float_inputs_may_be_numpy_and_integers_are_refused(name, checked, unchecked, cases):
    # Integer images (uint8 pixels) were silently cast as 0..255 values with checking off and
    # rejected by a private method's annotation with it on; NumPy floats the other way round.
    case = cases(name)
    x = case.inputs[0]
    want = case.jit_forward(case.model, case.model_state, x)
    fix = "/ 255" if x.ndim == 3 else r"\."
    with contextlib.nullcontext() if checked else unchecked():
        got = case.forward(case.model, case.model_state, np.asarray(x))
        np.testing.assert_allclose(got, want, atol=MODEL_TOL, rtol=MODEL_TOL)  # eager vs jit
        with pytest.raises(ShapeError, match=rf"takes floating-point \w+; got dtype uint8\. Convert with x\.astype\(jnp\.float32\) ?{fix}"):
            case.forward(case.model, case.model_state, np.asarray(x).astype(np.uint8))


def _count_traces(loss_fn, counter):
    def counted(*args):
        counter.append(1)  # a Python side effect: runs once per trace, never per execution
        return loss_fn(*args)

    return counted


def _run_steps(case, precision, compile_log, n=3, lr=1e-2):
    traces = []
    optimizer = optax.sgd(lr)
    step = train.make_train_step(_count_traces(case.loss_fn, traces), optimizer, precision=precision)
    model, model_state = case.fresh()
    state = train.TrainState.create(
        model, optimizer, key=jax.random.key(0), model_state=model_state, precision=precision
    )
    with compile_log("flat_step") as log:
        state, first = step(state, case.batch)  # compiles
        compiled_first = list(log.compiled)
        after_first = jax.tree.map(np.asarray, _params(state.model))
        metrics = [first]
        for _ in range(n - 1):
            state, m = step(state, case.batch)
            metrics.append(m)
        jax.block_until_ready(state.arrays)
    assert len(compiled_first) == 1, compiled_first  # the log does see compilations...
    assert log.compiled == compiled_first, f"later steps recompiled: {log.compiled[1:]}"  # ...only one
    assert step.num_compilations == 1
    assert len(traces) == 1, f"loss_fn traced {len(traces)} times over {n} steps"
    assert int(state.step) == n
    return state, [jax.tree.map(float, m) for m in metrics], after_first


def test_fp32_steps_finite_gradients_no_recompilation(case, compile_log):
    lr = 1e-2
    model, _ = case.fresh()
    before = jax.tree.map(np.asarray, _params(model))
    state, metrics, after_first = _run_steps(case, None, compile_log, lr=lr)
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) for m in metrics)
    if case.stateful:  # the loss's new model_state (BatchNorm statistics) is carried forward
        assert not _bitwise_equal(state.model_state, case.model_state)
    # With plain SGD the first update is -lr * grad: every parameter leaf gets a finite, non-zero
    # gradient (a layer left out of the forward pass would get none).
    grads = jax.tree.map(lambda b, a: (b - a) / lr, before, after_first)
    if isinstance(case.config, ZERO_INIT_FAMILIES):
        # The first gradient reaches only the zero-initialised layers; after n steps they have
        # moved, and the gradient there must reach every leaf.
        grad_fn = eqx.filter_jit(eqx.filter_grad(lambda m: case.loss_fn(m, case.batch, jax.random.key(0))))
        grads = jax.tree.map(np.asarray, _params(grad_fn(state.model)))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
        assert np.any(g != 0), f"{case.name}: no gradient reaches {jax.tree_util.keystr(path)}"


def test_bf16_policy_keeps_fp32_params(case, compile_log):
    precision = train.Precision.bf16()
    # The compute copy really computes in bf16 (shapes only: nothing compiled).
    out = eqx.filter_eval_shape(case.forward, precision.cast_to_compute(case.model), case.model_state, case.inputs[0])
    assert out.dtype == jnp.bfloat16
    state, metrics, _ = _run_steps(case, precision, compile_log)
    assert all(np.isfinite(m["loss"]) for m in metrics)
    leaves = jax.tree.leaves(_params(state.model))
    assert all(x.dtype == jnp.float32 for x in leaves), "master params must stay fp32"
    if case.stateful:  # running statistics stay fp32 too
        assert all(x.dtype == y.dtype for x, y in zip(jax.tree.leaves(state.model_state), jax.tree.leaves(case.model_state), strict=True))
    assert not _bitwise_equal(_params(state.model), _params(case.model)), "bf16 steps must update params"


def test_serialisation_round_trip(case, tmp_path):
    # Plain equinox serialisation; the orbax-based eqzoo.checkpoint is tested on its own.
    path = tmp_path / f"{case.name}.eqx"
    tree = (case.model, case.model_state)
    eqx.tree_serialise_leaves(path, tree)
    like = jax.tree.map(lambda a: jnp.asarray(np.zeros(a.shape, a.dtype)) if eqx.is_array(a) else a, tree)
    loaded = eqx.tree_deserialise_leaves(path, like)
    assert _bitwise_equal(eqx.filter(loaded, eqx.is_array), eqx.filter(tree, eqx.is_array))
    x = case.inputs[0]
    assert np.array_equal(case.jit_forward(*loaded, x), case.jit_forward(*tree, x))


# ------------------------------------------------------------------------------ compiled builds

FAMILY_PRESETS = {type(models.get_config(p)): p for p in reversed(SMALL_PRESETS)}  # one small preset a family

# A second value for each field some config declares init-free (`_build._INIT_FREE`); a field
# declared without one here fails the test below.
OTHER_VALUES = {
    "remat": "full", "attention_backend": "xla", "layer_norm_eps": 1e-3, "rms_norm_eps": 1e-3,
    "rope_theta": 1234.0, "rope_scaling": RopeScaling(factor=8.0), "local_rope_theta": 1234.0,
    "sliding_window": 16, "query_pre_attn_scalar": 32.0, "attn_logit_softcap": None,
    "final_logit_softcap": None, "router_aux_loss_coef": 0.5, "router_z_loss_coef": 0.5,
    "moe_implementation": "capacity", "moe_capacity_factor": 2.0, "normalize_router_weights": False,
    ("activation", models.MLPConfig): "tanh", ("activation", models.GemmaConfig): "silu",
}


def _arrays(tree):
    return [x for x in jax.tree.leaves(tree) if eqx.is_array(x)]


def _build_program(config):
    """The traced build of `config`'s arrays from a key: equal programs, equal arrays for every key."""
    closed = jax.make_jaxpr(lambda k: _arrays(_construct(config, k)))(jax.random.key(0))
    return str(closed.jaxpr), [np.asarray(c) for c in closed.consts]


@pytest.mark.parametrize("family", list(ADAPTERS), ids=lambda t: t.__name__)
def test_init_free_fields_do_not_change_the_build(family):
    # Configs differing only in declared init-free fields share one compiled build: each such
    # field, set to another value, must trace to the same program (same ops, same constants).
    base = models.get_config(FAMILY_PRESETS[family])
    program, consts = _build_program(base)
    for field in sorted(_INIT_FREE[family]):
        other = OTHER_VALUES.get((field, family), OTHER_VALUES.get(field))
        assert getattr(base, field) != other, f"{field}: pick a value other than the preset's"
        got, got_consts = _build_program(models.get_config(base, **{field: other}))
        assert got == program, f"{family.__name__}.{field} changes the initialisation; it is not init-free"
        assert len(got_consts) == len(consts) and all(map(np.array_equal, got_consts, consts)), field


def test_create_compiles_once_per_initialisation(compile_log):
    # A new key, or a field that cannot change the arrays, reuses the compiled build; a new size
    # compiles anew. Each result carries its own config; config errors come before any tracing.
    config = models.MLPConfig(in_features=4, out_features=3, width=8, depth=1)
    jax.clear_caches()  # counted from a cold cache (an earlier module may have built this config)
    with compile_log("create_") as log:
        first = models.create(config, key=jax.random.key(0))
        again = models.create(config, key=jax.random.PRNGKey(1))  # a raw key: the same program
        gelu = models.create(config, key=jax.random.key(0), activation="gelu")
        assert len(log.compiled) == 1, log.compiled
        wider = models.create(config, key=jax.random.key(0), width=16)
        with pytest.raises(ConfigError, match=r"MLPConfig: depth must be >= 0, got -1\."):
            models.create(config, key=jax.random.key(0), depth=-1)
    assert len(log.compiled) == 2, log.compiled
    assert gelu.config.activation == "gelu" and gelu.net.activation is jax.nn.gelu and first.net.activation is jax.nn.relu
    assert _bitwise_equal(_arrays(gelu), _arrays(first))
    assert _bitwise_equal(_arrays(again), _arrays(models.create(config, key=jax.random.key(1), jit=False)))
    assert wider.config.width == 16 and wider.net.layers[0].weight.shape == (16, 4)


# ------------------------------------------------------------------------------ every preset


def _eval_shape_model(name):
    out = eqx.filter_eval_shape(lambda k: models.create(name, key=k), jax.random.key(0))
    return out[0] if models.is_stateful(models.get_config(name)) else out


@pytest.mark.parametrize("name", PRESETS)
def test_num_params_matches_eval_shape(name):
    config = models.get_config(name)
    model = _eval_shape_model(name)  # shapes only: nothing allocated, so 8B is fine
    leaves = [x for x in jax.tree.leaves(model) if isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.inexact)]
    counted = sum(int(np.prod(x.shape)) for x in leaves)
    assert counted == config.num_params()


# Published parameter counts (vocab padded to 50304 for the GPT-2 presets).
KNOWN_SIZES = {
    "gpt2-124m": 124_475_904,
    "llama-1b": 1_235_814_400,  # Llama 3.2 1B
    "llama-8b": 8_030_261_248,  # Llama 3.1 8B
    "mixtral-8x7b": 46_702_792_704,  # Mixtral 8x7B
    "gemma2-2b": 2_614_341_888,  # Gemma 2 2B
    "gemma3-1b": 999_885_952,  # Gemma 3 1B
    "vit-s16": 22_050_664,  # ViT-S/16 (DeiT-S), 1000 classes
    "vit-b16": 86_567_656,  # ViT-B/16, 1000 classes
    "vit-l16": 304_326_632,  # ViT-L/16, 1000 classes
}


@pytest.mark.parametrize("name", sorted(KNOWN_SIZES))
def test_num_params_known_sizes(name):
    assert models.get_config(name).num_params() == KNOWN_SIZES[name]


def _matmul_flops(jaxpr) -> float:
    """FLOPs of every dot_general in a jaxpr (2 per multiply-add), scans counted `length` times.

    A grouped product (`ragged_dot_general`, mixture-of-experts layers) multiplies each row of
    its ragged operand with one group's matrix: 2 x (lhs elements) x (rhs free dimensions)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract_dims, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            contract = np.prod([lhs_shape[i] for i in contract_dims])
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * contract
        if eqn.primitive.name == "ragged_dot_general":
            numbers = eqn.params["ragged_dot_dimension_numbers"]
            (_, rhs_contract), (_, rhs_batch) = numbers.dot_dimension_numbers
            rhs_shape = eqn.invars[1].aval.shape
            skip = set(rhs_contract) | set(rhs_batch) | set(numbers.rhs_group_dimensions)
            free = np.prod([n for i, n in enumerate(rhs_shape) if i not in skip])
            total += 2.0 * np.prod(eqn.invars[0].aval.shape) * free
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += times * _matmul_flops(sub)
    return total


LM_PRESETS = [
    p for p in PRESETS
    if isinstance(models.get_config(p), models.GPT2Config | models.LlamaConfig | models.MixtralConfig | models.GemmaConfig)
]


@pytest.mark.parametrize("name", LM_PRESETS)
def test_flops_per_token_counts_the_matmuls(name):
    # Trace (never run) one training step's gradient and count its matmul FLOPs. The formula
    # 6N + 12 L d T ignores the few non-matmul parameters (norms, biases): 2% tolerance. It counts
    # model FLOPs (the MFU convention), so remat's recomputation is switched off here.
    config = models.get_config(name, remat="none")
    if isinstance(config, models.MixtralConfig):
        # Model FLOPs count the experts a token uses: "ragged" multiplies exactly those ("dense",
        # the default, multiplies every expert).
        config = models.get_config(config, moe_implementation="ragged")
    # Model FLOPs count a window's positions only; XLA's masked attention multiplies them all,
    # so trace at most one window long (tiny-gemma2's window is 8).
    seq = min(64, getattr(config, "sliding_window", None) or 64)
    model = eqx.filter_eval_shape(lambda k: models.create(config, key=k), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def grads(m, t):
        return eqx.filter_grad(lambda m: train.lm_loss(m, {"tokens": t, "targets": t})[0])(m)

    jaxpr = jax.make_jaxpr(grads)(model, tokens).jaxpr
    measured = _matmul_flops(jaxpr) / seq
    expected = config.flops_per_token(seq)
    assert abs(measured - expected) <= 0.02 * expected, f"{name}: traced {measured:.4g}, formula {expected:.4g}"
    # Attention is counted at num_heads * head_dim (GPT-2: embed_dim), and a Gemma sliding
    # layer's span stops growing at its window.
    if isinstance(config, models.GPT2Config):
        width = config.embed_dim
    else:
        width = config.num_heads * (config.head_dim if isinstance(config, models.GemmaConfig) else config.resolved_head_dim)
    if isinstance(config, models.GemmaConfig):
        grown = [
            min(2 * seq, config.sliding_window) - seq if kind == "sliding_attention" else seq
            for kind in config.resolved_layer_types
        ]
    else:
        grown = [seq] * config.num_layers
    increment = 12 * width * sum(grown)
    assert config.flops_per_token(2 * seq) - expected == pytest.approx(increment)


VIT_PRESETS = [p for p in PRESETS if isinstance(models.get_config(p), models.ViTConfig)]


@pytest.mark.parametrize("name", VIT_PRESETS)
def test_vit_flops_per_image_counts_the_matmuls(name):
    # As for the language models: trace one image's gradient, count its matmul FLOPs. The
    # formula leaves out norms, biases and the softmax: 2% tolerance.
    config = models.get_config(name, remat="none")
    model = eqx.filter_eval_shape(lambda k: models.create(config, key=k), jax.random.key(0))
    images = jax.ShapeDtypeStruct((1, config.in_channels, config.image_size, config.image_size), jnp.float32)
    labels = jax.ShapeDtypeStruct((1,), jnp.int32)

    def grads(m, x, y):
        return eqx.filter_grad(lambda m: train.classification_loss(m, {"x": x, "y": y})[0])(m)

    measured = _matmul_flops(jax.make_jaxpr(grads)(model, images, labels).jaxpr)
    expected = config.flops_per_image()
    assert abs(measured - expected) <= 0.02 * expected, f"{name}: traced {measured:.4g}, formula {expected:.4g}"
