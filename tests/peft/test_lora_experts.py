"""LoRA on mixture-of-experts expert weights: identity at init, merge exact for every expert
implementation, only adapters train, save/load, int8 bases, any mesh."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import pytest

import eqzoo
from eqzoo import peft, quant, sharding as sh
from eqzoo._errors import ConfigError
from eqzoo.train import TrainState, lm_loss, make_train_step

TOKENS = jnp.arange(1, 13, dtype=jnp.int32)
_logits = eqx.filter_jit(lambda model: model(TOKENS))  # one compile per model structure


def _run(model):
    return np.asarray(_logits(model))


def _mixtral(**overrides):
    return eqzoo.models.create("tiny-mixtral", key=jax.random.key(0), **overrides)


def _is_weight(x):
    return isinstance(x, peft.LoRAWeight)


def _with_random_b(model, key):
    """Trained adapters have lora_b != 0: random ones on every adapter, linear or expert."""

    def rand(x):
        if isinstance(x, peft.LoRALinear | peft.LoRAWeight):
            b = 0.05 * jax.random.normal(jax.random.fold_in(key, x.lora_b.size), x.lora_b.shape, x.lora_b.dtype)
            return eqx.tree_at(lambda m: m.lora_b, x, b)
        return x

    return jax.tree.map(rand, model, is_leaf=lambda x: isinstance(x, peft.LoRALinear | peft.LoRAWeight))


def _batch(vocab, batch=4, seq=16, seed=0):
    toks = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    return {"tokens": toks[:, :-1], "targets": toks[:, 1:]}


def test_fresh_expert_adapters_compute_the_base_model():
    model = _mixtral()
    adapted = peft.lora(model, rank=4, key=jax.random.key(1))
    mlp = adapted.blocks.layers.mlp
    assert all(_is_weight(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
    np.testing.assert_array_equal(_run(adapted), _run(model))
    c = model.config
    linear = sum(c.num_layers * 4 * (x.in_features + x.out_features)
                 for x in jax.tree.leaves(adapted, is_leaf=lambda x: isinstance(x, peft.LoRALinear))
                 if isinstance(x, peft.LoRALinear))
    experts = c.num_layers * c.num_experts * 3 * 4 * (c.embed_dim + c.hidden_dim)
    assert peft.adapter_count(adapted) == linear + experts
    # Naming layers leaves the experts alone unless asked.
    attn_only = peft.lora(model, rank=4, targets="attn", key=jax.random.key(1))
    assert not _is_weight(attn_only.blocks.layers.mlp.gate_proj)
    both = peft.lora(model, rank=4, targets="attn", experts=True, key=jax.random.key(1))
    assert _is_weight(both.blocks.layers.mlp.gate_proj)
    # Adapting the experts does not change the linear adapters a key draws.
    np.testing.assert_array_equal(both.blocks.layers.attn.q_proj.lora_a, attn_only.blocks.layers.attn.q_proj.lora_a)


@pytest.mark.parametrize("implementation", ["dense", "capacity", "ragged"])
def test_merge_equals_the_adapted_model(implementation):
    model = _mixtral(moe_implementation=implementation)
    adapted = _with_random_b(peft.lora(model, rank=4, alpha=8, key=jax.random.key(1)), jax.random.key(2))
    merged = peft.merge(adapted)
    assert jax.tree.structure(merged) == jax.tree.structure(model)
    ref = _run(adapted)
    np.testing.assert_allclose(_run(merged), ref, rtol=1e-5, atol=1e-5)  # fp32 model
    assert np.max(np.abs(ref - _run(model))) > 1e-3  # the update is not trivial
    np.testing.assert_array_equal(_run(peft.unwrap(adapted)), _run(model))


def test_only_adapters_train_and_experts_learn():
    model = _mixtral(moe_implementation="ragged")
    frozen = jax.tree.map(np.asarray, eqx.filter(model, eqx.is_array))  # host copies (donation)
    adapted = peft.lora(model, rank=4, targets="attn", experts=True, key=jax.random.key(1))
    optimizer = optax.adam(1e-2)
    state = TrainState.create(adapted, optimizer, trainable=peft.adapter_filter(adapted), key=jax.random.key(2))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * peft.adapter_count(adapted)
    step = make_train_step(lm_loss, optimizer)
    batch = _batch(model.config.vocab_size)
    losses = []
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam bias correction assumes it
        for _ in range(12):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    for a, b in zip(jax.tree.leaves(eqx.filter(peft.unwrap(state.model), eqx.is_array)), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # the base model did not move
    assert float(jnp.max(jnp.abs(state.model.blocks.layers.mlp.down_proj.lora_b))) > 0


def test_save_and_load_expert_adapters(tmp_path):
    adapted = _with_random_b(peft.lora(_mixtral(), rank=2, key=jax.random.key(1)), jax.random.key(3))
    peft.save_adapters(adapted, tmp_path / "a.safetensors")
    fresh = peft.lora(_mixtral(), rank=2, key=jax.random.key(9))
    loaded = peft.load_adapters(fresh, tmp_path / "a.safetensors")
    np.testing.assert_array_equal(_run(loaded), _run(adapted))
    other_alpha = peft.lora(_mixtral(), rank=2, alpha=4, key=jax.random.key(9))
    with pytest.raises(eqzoo.checkpoint.CheckpointMismatchError, match=r"blocks.layers.mlp.gate_proj: the file's adapter has scaling 1.0"):
        peft.load_adapters(other_alpha, tmp_path / "a.safetensors")


def test_expert_adapters_on_an_int8_base():
    model = quant.quantize(_mixtral())
    adapted = _with_random_b(peft.lora(model, rank=4, key=jax.random.key(1)), jax.random.key(2))
    assert isinstance(adapted.blocks.layers.mlp.up_proj.base, quant.QuantizedWeight)
    merged = peft.merge(adapted)  # dequantized, then the update added
    assert merged.blocks.layers.mlp.up_proj.dtype == jnp.float32
    np.testing.assert_allclose(_run(merged), _run(adapted), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"quantize before adding LoRA"):
        quant.quantize(peft.lora(_mixtral(), rank=2, targets="attn", experts=True, key=jax.random.key(1)), targets="router", experts=True)


def test_expert_lora_errors():
    with pytest.raises(ConfigError, match=r"lora\(experts=True\): the model has no mixture-of-experts layer"):
        peft.lora(eqzoo.models.create("tiny-llama", key=jax.random.key(0)), experts=True, key=jax.random.key(1))
    adapted = peft.lora(_mixtral(), rank=2, targets="attn", experts=True, key=jax.random.key(1))
    with pytest.raises(ConfigError, match=r"the experts already have LoRA adapters"):
        peft.lora(adapted, targets="router", experts=True, key=jax.random.key(1))
    with pytest.raises(ConfigError, match=r"LoRA rank must be a positive integer, got 0"):
        peft.LoRAWeight(jnp.zeros((4, 8, 16)), rank=0, key=jax.random.key(0))
    # The jaxtyping hook of the test suite rejects the annotation first; without it, our check does.
    with pytest.raises((ConfigError, jaxtyping.TypeCheckError), match=r"LoRAWeight|base"):
        peft.LoRAWeight(jnp.zeros((16,)), rank=2, key=jax.random.key(0))


def test_sharded_expert_lora_step_equals_one_device():
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    optimizer = optax.sgd(0.5)

    def init(key):
        model = eqzoo.models.create("tiny-mixtral", key=key, moe_implementation="ragged")
        adapted = _with_random_b(peft.lora(model, rank=4, targets="attn", experts=True, key=jax.random.fold_in(key, 1)), key)
        return TrainState.create(adapted, optimizer, trainable=peft.adapter_filter(adapted), key=key)

    batch = _batch(256, batch=8, seed=3)
    one, m1 = make_train_step(lm_loss, optimizer, donate=False)(init(jax.random.key(4)), batch)
    state = sh.sharded_init(init, jax.random.key(4), mesh=mesh, rules=sh.MIXTRAL_RULES)
    mlp = state.model.blocks.layers.mlp
    assert mlp.up_proj.lora_b.sharding.spec == jax.P(None, "expert", None, "tensor")
    assert mlp.up_proj.base.sharding.spec == jax.P(None, "expert", "fsdp", "tensor")
    assert mlp.down_proj.lora_a.sharding.spec == jax.P(None, "expert", "tensor", None)
    many, mk = make_train_step(lm_loss, optimizer, mesh=mesh, donate=False)(state, sh.shard_batch(batch, mesh))
    assert abs(float(m1["loss"]) - float(mk["loss"])) < 1e-5
    for a, b in zip(jax.tree.leaves(one.arrays), jax.tree.leaves(many.arrays), strict=True):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_expert_adapters_add_their_update_to_the_base_product():  # ~2 s
    # A LoRAWeight multiplies through its base's own product and adds scaling * (x a) b: on an
    # Fp8Weight the products stay fp8 (a float product of base + delta would sit ~1e-7 from
    # the float reference, not at fp8's error); int4, int8 and QAT bases keep theirs too.
    rng = np.random.default_rng(4)
    w = jnp.asarray(0.1 * rng.standard_normal((4, 32, 24)), jnp.float32)  # (experts, embed, hidden)
    x = rng.standard_normal((4, 6, 32)).astype(np.float32)  # each expert's slots
    x[1, 2, 3] = 20.0  # an outlier sets the fp8 scale, as activations' do
    x, idx = jnp.asarray(x), jnp.asarray([[0, 3], [2, 1]])  # idx: decoding, each token's chosen experts
    xk = x[:2, :2]
    spec = "ecd,edh->ech"

    def adapt(base):  # trained adapters: lora_b != 0
        adapted = peft.LoRAWeight(base, rank=2, alpha=4, key=jax.random.key(1))
        return eqx.tree_at(lambda m: m.lora_b, adapted, 0.3 * jax.random.normal(jax.random.key(2), adapted.lora_b.shape))

    @eqx.filter_jit  # built in one program, and multiplied in another (eager ops compile one by one)
    def build(w):
        bases = [quant.Fp8Weight(w), quant.QuantizedWeight(w, bits=4, group_size=8), quant.QuantizedWeight(w), quant.FakeQuantWeight(w)]
        return bases, [adapt(b) for b in bases]

    xt = x[0]  # (seq, embed): the dense implementation's tokens, each multiplied by every expert
    dense = "td,edh->teh"

    @eqx.filter_jit
    def products(weights):
        return [(eqzoo.nn.weight_einsum(spec, x, v), eqzoo.nn.weight_take_matmul(v, xk, idx), eqzoo.nn.weight_value(v, jnp.float32),
                 eqzoo.nn.weight_einsum(dense, xt, v)) for v in weights]

    def low_rank(adapted, x, idx=None, three="ecd,edr,erh->ech"):  # float64 reference: 2 * (x @ a) @ b, per expert
        a, b = (np.asarray(t, np.float64) for t in (adapted.lora_a, adapted.lora_b))
        if idx is None:
            return 2.0 * np.einsum(three, np.asarray(x, np.float64), a, b)
        i = np.asarray(idx)
        return 2.0 * np.einsum("tkd,tkdr,tkrh->tkh", np.asarray(x, np.float64), a[i], b[i])

    bases, adapted = build(w)
    for a, (got, taken, merged, got_dense), (base, base_taken, _, base_dense) in zip(adapted, products(adapted), products(bases), strict=True):
        # the base's own product (fp8, packed int4, ...) plus the update (float32 sums: 1e-5)
        np.testing.assert_allclose(got, np.asarray(base, np.float64) + low_rank(a, x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_dense, np.asarray(base_dense, np.float64) + low_rank(a, xt, three="td,edr,erh->teh"),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(taken, np.asarray(base_taken, np.float64) + low_rank(a, xk, idx), rtol=1e-5, atol=1e-5)
        ref = np.einsum("ecd,edh->ech", np.asarray(x, np.float64), np.asarray(merged, np.float64))  # the merged weight's product
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        if isinstance(a.base, quant.Fp8Weight):
            assert 0.005 < err < 0.1, err  # fp8's rounding: not the float product
        else:
            assert err < 1e-5, (type(a.base).__name__, err)  # int4, int8, QAT: the merged weight's product

    # "ragged" multiplies materialised float arrays: it refuses LoRA on fp8 experts too.
    def ragged():
        moe = eqzoo.nn.MoE(32, 24, 4, 2, implementation="ragged", key=jax.random.key(2))
        return eqx.tree_at(lambda m: m.gate_proj, moe, adapt(quant.Fp8Weight(moe.gate_proj)))(x[0])

    with pytest.raises(ConfigError, match=r"the experts' gate_proj \(LoRAWeight\) compute their own products"):
        eqx.filter_eval_shape(ragged)  # traced only

    # Linear layers: a LoRALinear on an Fp8Linear adds its update to the fp8 product.
    @eqx.filter_jit
    def linear(x):
        lin = eqx.nn.Linear(32, 24, key=jax.random.key(3))
        layer = peft.LoRALinear(quant.Fp8Linear(lin), rank=2, key=jax.random.key(4))
        layer = eqx.tree_at(lambda m: m.lora_b, layer, 0.3 * jax.random.normal(jax.random.key(5), layer.lora_b.shape))
        return layer.apply(x), quant.fp8_matmul(x, lin.weight) + lin.bias, layer.lora_a, layer.lora_b

    got, base, a, b = (np.asarray(t, np.float64) for t in linear(x[0]))
    np.testing.assert_allclose(got, base + (np.asarray(x[0], np.float64) @ a.T) @ b.T, rtol=1e-5, atol=1e-5)
