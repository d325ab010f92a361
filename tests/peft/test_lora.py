"""LoRA adapters: identity at init, only adapters train, merge/save/load exact, any model, any mesh."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqzoo
from eqzoo import peft, sharding as sh
from eqzoo.checkpoint import CheckpointMismatchError
from eqzoo.train import TrainState, lm_loss, make_train_step

PRESETS = ["tiny-gpt2", "tiny-llama"]


def _model(preset="tiny-gpt2", **overrides):
    return eqzoo.models.create(preset, key=jax.random.key(0), **overrides)


def _batch(vocab, batch=4, seq=16, seed=0):
    toks = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    return {"tokens": toks[:, :-1], "targets": toks[:, 1:]}


@eqx.filter_jit
def _forward(model, x):
    """`model(x)`, compiled once per model structure and input shape (called eagerly, a model's
    layer scan compiles anew on every call: ~1 s each on CI's CPUs)."""
    return model(x)


def _host(x):
    return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def _with_random_b(model, key):
    # Trained adapters have lora_b != 0; random ones exercise the update path exactly.
    def rand(x):
        if isinstance(x, peft.LoRALinear):
            b = 0.05 * jax.random.normal(jax.random.fold_in(key, x.lora_b.size), x.lora_b.shape, x.lora_b.dtype)
            return eqx.tree_at(lambda m: m.lora_b, x, b)
        return x

    return jax.tree.map(rand, model, is_leaf=lambda x: isinstance(x, peft.LoRALinear))


@pytest.mark.parametrize("preset", PRESETS)
def test_fresh_adapters_compute_the_base_model(preset):
    model = _model(preset)
    adapted = peft.lora(model, rank=4, key=jax.random.key(1))
    tokens = jnp.arange(12, dtype=jnp.int32)
    # lora_b starts at zero: the update is exactly 0.
    np.testing.assert_array_equal(np.asarray(_forward(adapted, tokens)), np.asarray(_forward(model, tokens)))
    paths = eqzoo.nn.linear_paths(model)
    assert eqzoo.nn.linear_paths(adapted) == paths
    layers = [x for x in jax.tree.leaves(adapted, is_leaf=lambda x: isinstance(x, peft.LoRALinear))
              if isinstance(x, peft.LoRALinear)]
    assert len(layers) == len(paths)
    n = model.config.num_layers
    assert peft.adapter_count(adapted) == sum(n * 4 * (x.in_features + x.out_features) for x in layers)


def test_targets_pick_layers_by_path_and_bad_targets_say_what_exists():
    adapted = peft.lora(_model("tiny-llama"), rank=2, targets="q_proj|v_proj", key=jax.random.key(1))
    attn = adapted.blocks.layers.attn
    assert isinstance(attn.q_proj, peft.LoRALinear) and isinstance(attn.v_proj, peft.LoRALinear)
    assert isinstance(attn.k_proj, eqx.nn.Linear) and isinstance(adapted.blocks.layers.mlp.up, eqx.nn.Linear)
    # stacked: one factor per layer
    assert attn.q_proj.lora_a.shape == (2, 2, 64) and attn.q_proj.lora_b.shape == (2, 64, 2)
    with pytest.raises(eqzoo._errors.ConfigError, match=r"match no linear layer.*blocks\.layers\.attn\.q_proj"):
        peft.lora(_model(), targets="qproj", key=jax.random.key(1))
    with pytest.raises(eqzoo._errors.ConfigError, match=r"\['gate_proj', 'down_proj'\] match no linear layer.*Hugging Face's 'gate_proj' is eqzoo's 'mlp.gate'\. Hugging Face's 'down_proj' is eqzoo's 'mlp.down'\.$"):
        peft.lora(_model("tiny-llama"), targets=["q_proj", "gate_proj", "down_proj"], key=jax.random.key(1))
    with pytest.raises(eqzoo._errors.ConfigError, match="already have LoRA adapters"):
        peft.lora(adapted, targets="q_proj", key=jax.random.key(2))
    with pytest.raises(eqzoo._errors.ConfigError, match="positive integer"):
        peft.lora(_model(), rank=0, key=jax.random.key(1))
    with pytest.raises(eqzoo._errors.ConfigError, match="does not compile"):
        peft.lora(_model(), targets="(", key=jax.random.key(1))


def test_scaling_alpha_and_rslora():
    base = eqx.nn.Linear(8, 6, key=jax.random.key(0))
    assert peft.LoRALinear(base, rank=4, key=jax.random.key(1)).scaling == 1.0
    assert peft.LoRALinear(base, rank=4, alpha=16, key=jax.random.key(1)).scaling == 4.0
    assert peft.LoRALinear(base, rank=4, alpha=16, use_rslora=True, key=jax.random.key(1)).scaling == 8.0
    layer = _with_random_b(peft.LoRALinear(base, rank=4, alpha=8, key=jax.random.key(1)), jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (5, 8))
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_a.T) @ layer.lora_b.T
    np.testing.assert_allclose(np.asarray(eqzoo.nn.apply_linear(layer, x)), np.asarray(expected), rtol=1e-6, atol=1e-6)
    # equinox.nn.MLP calls its layers on one vector: LoRALinear works there too
    np.testing.assert_allclose(np.asarray(layer(x[0])), np.asarray(expected[0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_only_adapters_train_and_the_loss_falls(preset):
    model = _model(preset)
    frozen = jax.tree.map(np.asarray, eqx.filter(model, eqx.is_array))  # host copies (donation)
    adapted = peft.lora(model, rank=4, targets="attn", key=jax.random.key(1))
    optimizer = optax.adam(1e-2)
    spec = peft.adapter_filter(adapted)
    state = TrainState.create(adapted, optimizer, trainable=spec, key=jax.random.key(2))
    # The optimizer holds moments for the adapters alone (plus Adam's step count).
    opt_sizes = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert opt_sizes == 2 * peft.adapter_count(adapted)
    step = make_train_step(lm_loss, optimizer)
    batch = _batch(model.config.vocab_size)
    losses = []
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam bias correction assumes it
        for _ in range(15):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    trained = state.model
    base_after = eqx.filter(peft.unwrap(trained), eqx.is_array)
    for a, b in zip(jax.tree.leaves(base_after), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # the base model did not move at all
    assert any(float(jnp.max(jnp.abs(x.lora_b))) > 0 for x in jax.tree.leaves(
        trained, is_leaf=lambda x: isinstance(x, peft.LoRALinear)) if isinstance(x, peft.LoRALinear))


def test_adapter_filter_also_trains_named_parameters():
    adapted = peft.lora(_model(), rank=2, key=jax.random.key(1))
    spec = peft.adapter_filter(adapted, also="final_norm")
    assert spec.final_norm.weight is True and spec.blocks.layers.attn_norm.weight is False
    assert spec.blocks.layers.attn.q_proj.lora_a is True and spec.blocks.layers.attn.q_proj.base.weight is False
    with pytest.raises(eqzoo._errors.ConfigError, match="match no floating-point parameter"):
        peft.adapter_filter(adapted, also="no_such_norm")
    with pytest.raises(eqzoo._errors.ConfigError, match="no LoRA adapters"):
        peft.adapter_filter(_model())


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("scan", [True, False])
def test_merge_equals_the_adapted_model(preset, scan):
    model = _model(preset, scan_layers=scan)
    adapted = _with_random_b(peft.lora(model, rank=4, alpha=8, key=jax.random.key(1)), jax.random.key(2))
    tokens = jnp.arange(12, dtype=jnp.int32)
    merged = peft.merge(adapted)
    assert not any(isinstance(x, eqzoo.nn.AbstractLinear)
                   for x in jax.tree.leaves(merged, is_leaf=lambda x: isinstance(x, eqzoo.nn.AbstractLinear)))
    assert jax.tree.structure(merged) == jax.tree.structure(model)
    out, ref = np.asarray(_forward(merged, tokens)), np.asarray(_forward(adapted, tokens))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)  # fp32 whole model: 1e-5
    assert np.max(np.abs(ref - np.asarray(_forward(model, tokens)))) > 1e-3  # the update is not trivial
    with pytest.raises(eqzoo._errors.ConfigError, match="nothing to merge"):
        peft.merge(model)


def test_generation_with_adapters_matches_the_merged_model():
    adapted = _with_random_b(peft.lora(_model(), rank=4, key=jax.random.key(1)), jax.random.key(2))
    prompt = jnp.array([1, 2, 3, 4], jnp.int32)
    out = eqzoo.generate(adapted, prompt, max_new_tokens=6)
    merged = eqzoo.generate(peft.merge(adapted), prompt, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(merged))
    assert adapted.init_cache(8).keys.dtype == jnp.float32


def test_save_and_load_adapters_round_trip_and_refuse_mismatches(tmp_path):
    adapted = _with_random_b(peft.lora(_model(), rank=4, targets="attn", key=jax.random.key(1)), jax.random.key(2))
    spec = peft.adapter_filter(adapted, also="final_norm")
    adapted = eqx.combine(
        jax.tree.map(lambda x: x + 0.5, eqx.filter(adapted, spec)), eqx.filter(adapted, spec, inverse=True)
    )
    path = tmp_path / "adapters.safetensors"
    peft.save_adapters(adapted, path, also="final_norm")
    # Only adapters (and the norm trained with them) are in the file.
    import safetensors

    with safetensors.safe_open(str(path), framework="numpy") as f:
        names = set(f.keys())
    assert names and all("lora_" in n or n.startswith("final_norm") for n in names)
    assert "final_norm.weight" in names

    fresh = peft.lora(_model(), rank=4, targets="attn", key=jax.random.key(7))
    loaded = peft.load_adapters(fresh, path)
    tokens = jnp.arange(10, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(_forward(loaded, tokens)), np.asarray(_forward(adapted, tokens)))

    with pytest.raises(CheckpointMismatchError, match=r"(?s)lora_a: expected float32\(2, 2, 64\).*Adapt the model"):
        peft.load_adapters(peft.lora(_model(), rank=2, targets="attn", key=jax.random.key(7)), path)
    with pytest.raises(CheckpointMismatchError, match="scaling 1.0, the model's 4.0"):
        peft.load_adapters(peft.lora(_model(), rank=4, alpha=16, targets="attn", key=jax.random.key(7)), path)
    plain = tmp_path / "plain.safetensors"
    eqzoo.checkpoint.save_weights(_model(), plain)
    with pytest.raises(CheckpointMismatchError, match="not written by eqzoo.peft.save_adapters"):
        peft.load_adapters(fresh, plain)
    # A base of another config whose shapes fit (8 heads of 8 rather than 4 of 16, another norm
    # epsilon) is refused; how it runs (remat) may differ; allow_base_change loads on purpose.
    rewired = peft.lora(_model(num_heads=8, layer_norm_eps=1e-6), rank=4, targets="attn", key=jax.random.key(7))
    with pytest.raises(CheckpointMismatchError, match=r"trained on a base model whose config differs(.|\n)*layer_norm_eps: adapters' base 1e-05, this model 1e-06(.|\n)*num_heads: adapters' base 4, this model 8"):
        peft.load_adapters(rewired, path)
    peft.load_adapters(rewired, path, allow_base_change=True)
    remat = peft.lora(_model(remat="full"), rank=4, targets="attn", key=jax.random.key(7))
    peft.load_adapters(remat, path)


def test_load_adapters_refuses_another_base_of_the_same_config(tmp_path):
    # A pretrained base and its instruct-tuned sibling share every shape and the config: only
    # the weights tell them apart.
    adapted = _with_random_b(peft.lora(_model(), rank=2, targets="attn", key=jax.random.key(1)), jax.random.key(2))
    path = tmp_path / "a.safetensors"
    peft.save_adapters(adapted, path)
    sibling = peft.lora(eqzoo.models.create("tiny-gpt2", key=jax.random.key(5)), rank=2, targets="attn", key=jax.random.key(7))
    # Four of the eight sampled arrays differ: biases (zeros) and norm weights (ones) at init do not.
    with pytest.raises(CheckpointMismatchError, match=r"trained on a base model of this config with other weights: the sampled values of 4 frozen array\(s\) differ \(blocks\.layers\.attn\.k_proj\.base\.weight, .*allow_base_change=True"):
        peft.load_adapters(sibling, path)
    tokens = jnp.arange(10, dtype=jnp.int32)
    on_purpose = peft.load_adapters(sibling, path, allow_base_change=True)
    np.testing.assert_array_equal(
        np.asarray(on_purpose.blocks.layers.attn.q_proj.lora_b), np.asarray(adapted.blocks.layers.attn.q_proj.lora_b)
    )
    # The same base in bfloat16 (as served) is the same base: compared in the narrower dtype.
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if eqx.is_inexact_array(x) else x, _model())
    served = peft.load_adapters(peft.lora(low, rank=2, targets="attn", key=jax.random.key(7)), path, cast=True)
    np.testing.assert_allclose(
        np.asarray(_forward(served, tokens).astype(jnp.float32)), np.asarray(_forward(adapted, tokens)), rtol=0.1, atol=0.1
    )  # bfloat16 weights: a loose tolerance, the test is that the load is accepted
    # One changed value in a sampled array (the first row of the first arrays by path) is seen.
    nudged = eqx.tree_at(lambda m: m.blocks.layers.attn.k_proj.weight, _model(), replace_fn=lambda w: w.at[0, 0, 3].add(1e-3))
    with pytest.raises(CheckpointMismatchError, match=r"1 frozen array\(s\) differ \(blocks\.layers\.attn\.k_proj\.base\.weight\)"):
        peft.load_adapters(peft.lora(nudged, rank=2, targets="attn", key=jax.random.key(7)), path)


def test_load_adapters_compares_the_codes_and_scales_of_an_int8_base(tmp_path):
    quant = pytest.importorskip("eqzoo.quant")
    preset = "tiny-llama"
    base = eqzoo.models.create(preset, key=jax.random.key(0))
    other = eqzoo.models.create(preset, key=jax.random.key(5))

    def load(model, path):
        return peft.load_adapters(peft.lora(model, rank=2, targets="attn", key=jax.random.key(7)), path, cast=True)

    on_int8 = tmp_path / "int8.safetensors"
    peft.save_adapters(_with_random_b(peft.lora(quant.quantize(base), rank=2, targets="attn", key=jax.random.key(1)), jax.random.key(2)), on_int8)
    on_float = tmp_path / "float.safetensors"
    peft.save_adapters(peft.lora(base, rank=2, targets="attn", key=jax.random.key(1)), on_float)
    # The same base, however it is stored, is accepted: the int8 copy, the float base it was
    # quantized from (to within half a step), its bfloat16 serving copy and the int8 copy of that.
    bf16 = eqzoo.train.cast_floating(base, jnp.bfloat16)
    for same in (quant.quantize(base), base, bf16, quant.quantize(bf16)):
        load(same, on_int8)
    load(quant.quantize(base), on_float)
    load(quant.quantize(bf16), on_float)
    # Another base is refused, int8 or float, whichever side is int8.
    refused = r"trained on a base model of this config with other weights: the sampled values of 7 frozen array\(s\) differ \(blocks\.layers\.attn\.k_proj\.base\.weight"
    for path, model in ((on_int8, quant.quantize(other)), (on_int8, other), (on_float, quant.quantize(other))):
        with pytest.raises(CheckpointMismatchError, match=refused):
            load(model, path)
    # The codes are compared, not only the scales: one code of a sampled row moved (its row's
    # scale, the row's largest weight, unchanged) is seen.
    q = quant.quantize(base)
    codes = q.blocks.layers.attn.k_proj.codes
    i = int(jnp.argmin(jnp.abs(codes[0, 0, :16])))  # not the row's largest code
    moved = eqx.tree_at(lambda m: m.blocks.layers.attn.k_proj.codes, q, codes.at[0, 0, i].add(1))
    assert np.array_equal(np.asarray(moved.blocks.layers.attn.k_proj.scale), np.asarray(q.blocks.layers.attn.k_proj.scale))
    with pytest.raises(CheckpointMismatchError, match=r"1 frozen array\(s\) differ \(blocks\.layers\.attn\.k_proj\.base\.weight\)"):
        load(moved, on_int8)


def test_load_adapters_compares_an_int4_base_by_its_unpacked_codes_and_group_scales(tmp_path):
    # An int4 base is sampled as codes (unpacked) with each code's group scale: accepted on the
    # float base it came from and on its int8 copy (each within half a step), refused elsewhere.
    quant = pytest.importorskip("eqzoo.quant")
    base = eqzoo.models.create("tiny-llama", key=jax.random.key(0))
    other = eqzoo.models.create("tiny-llama", key=jax.random.key(5))

    def load(model, path):
        return peft.load_adapters(peft.lora(model, rank=2, targets="attn", key=jax.random.key(7)), path)

    on_int4 = tmp_path / "int4.safetensors"
    peft.save_adapters(peft.lora(quant.quantize(base, bits=4, group_size=16), rank=2, targets="attn", key=jax.random.key(1)), on_int4)
    for same in (quant.quantize(base, bits=4, group_size=16), base, quant.quantize(base)):
        load(same, on_int4)
    refused = r"the sampled values of 7 frozen array\(s\) differ"
    for model in (quant.quantize(other, bits=4, group_size=16), other):
        with pytest.raises(CheckpointMismatchError, match=refused):
            load(model, on_int4)


def test_load_adapters_compares_copies_on_other_grids_within_their_rounding(tmp_path, create):
    # Two quantized copies of one float base on different grids (int4 with 32-wide and 128-wide
    # groups; int8 and int4) hold different codes and scales: each dequantized value is within
    # half its own step of the float weight, so they agree within the sum of both half-steps.
    # The base code compared same-dtype copies bit for bit and refused g32 -> g128 as another base.
    quant = pytest.importorskip("eqzoo.quant")
    sizes = {"embed_dim": 128, "hidden_dim": 256}  # inputs of 128 and 256: both group sizes divide them
    base, other = (create("tiny-llama", key=jax.random.key(seed), **sizes) for seed in (0, 5))
    quantize = eqx.filter_jit(quant.quantize)  # compiled: ~0.7 s a copy here, eagerly ~5 s

    def load(model, path):
        return peft.load_adapters(peft.lora(model, rank=2, targets="attn", key=jax.random.key(7)), path)

    def save(model, name):
        peft.save_adapters(peft.lora(model, rank=2, targets="attn", key=jax.random.key(1)), tmp_path / name)
        return tmp_path / name

    g32, g128, int8 = (quantize(base, bits=bits, group_size=g) for bits, g in ((4, 32), (4, 128), (8, None)))
    assert not np.array_equal(np.asarray(g32.blocks.layers.attn.k_proj.scale[0, 0, 0]), np.asarray(g128.blocks.layers.attn.k_proj.scale[0, 0, 0]))
    on_g32, on_int8 = save(g32, "g32.safetensors"), save(int8, "int8.safetensors")
    load(g128, on_g32)  # refused by the base code
    load(int8, on_g32)
    load(g128, on_int8)
    other_g128 = quantize(other, bits=4, group_size=128)
    for path in (on_g32, on_int8):
        with pytest.raises(CheckpointMismatchError, match=r"the sampled values of 7 frozen array\(s\) differ"):
            load(other_g128, path)


def test_hf_export_refuses_adapters_and_takes_the_merged_model(tmp_path):
    hf = pytest.importorskip("eqzoo.hf")
    adapted = _with_random_b(peft.lora(_model(), rank=2, key=jax.random.key(1)), jax.random.key(2))
    with pytest.raises(hf.HFFormatError, match=r"not plain linear layers.*LoRALinear.*eqzoo\.peft\.merge"):
        hf.save_pretrained(adapted, tmp_path / "bad")
    hf.save_pretrained(peft.merge(adapted), tmp_path / "ok")
    back = hf.load_pretrained(tmp_path / "ok")
    tokens = jnp.arange(10, dtype=jnp.int32)
    np.testing.assert_allclose(np.asarray(_forward(back, tokens)), np.asarray(_forward(adapted, tokens)), rtol=1e-5, atol=1e-5)


def test_sharded_lora_step_equals_one_device():
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    optimizer = optax.sgd(0.5)

    def init(key):
        model = eqzoo.models.create("tiny-llama", key=key, num_heads=8, num_kv_heads=4)
        adapted = _with_random_b(peft.lora(model, rank=4, key=jax.random.fold_in(key, 1)), key)
        return TrainState.create(adapted, optimizer, trainable=peft.adapter_filter(adapted), key=key)

    batch = _batch(256, batch=8, seed=3)
    one, m1 = make_train_step(lm_loss, optimizer, donate=False)(init(jax.random.key(4)), batch)
    state = sh.sharded_init(init, jax.random.key(4), mesh=mesh)
    lora_b = state.model.blocks.layers.attn.q_proj.lora_b
    assert lora_b.sharding.spec == jax.P(None, "tensor", None)  # the base output's layout
    many, mk = make_train_step(lm_loss, optimizer, mesh=mesh, donate=False)(state, sh.shard_batch(batch, mesh))
    assert abs(float(m1["loss"]) - float(mk["loss"])) < 1e-5
    for a, b in zip(jax.tree.leaves(one.arrays), jax.tree.leaves(many.arrays), strict=True):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_lora_training_state_checkpoints_and_resumes_exactly(tmp_path):
    optimizer = optax.sgd(0.5, momentum=0.9)

    def make(seed):
        adapted = peft.lora(_model(), rank=2, targets="attn", key=jax.random.key(seed))
        return TrainState.create(adapted, optimizer, trainable=peft.adapter_filter(adapted), key=jax.random.key(seed))

    step = make_train_step(lm_loss, optimizer, donate=False)
    batches = [_batch(256, seed=s) for s in range(4)]
    state = make(1)
    for b in batches[:2]:
        state, _ = step(state, b)
    ckpt = eqzoo.checkpoint.Checkpointer(tmp_path / "ckpt")
    try:
        ckpt.save(state)
        ckpt.wait()
        restored = ckpt.restore(make(5)).state  # another draw of the adapters: overwritten
    finally:
        ckpt.close()
    straight, resumed = state, restored
    for b in batches[2:]:
        straight, _ = step(straight, b)
        resumed, _ = step(resumed, b)
    for a, b in zip(straight.arrays, resumed.arrays, strict=True):
        np.testing.assert_array_equal(_host(a), _host(b))  # bitwise: the same trajectory
    # the momentum lives for the adapters only
    assert sum(x.size for x in jax.tree.leaves(resumed.opt_state)) == peft.adapter_count(resumed.model)


def test_lora_on_an_int8_base_trains_and_merges_to_float():
    quant = pytest.importorskip("eqzoo.quant")
    q = quant.quantize(_model())
    adapted = peft.lora(q, rank=4, key=jax.random.key(1))
    layer = adapted.blocks.layers.attn.q_proj
    assert isinstance(layer.base, quant.QuantizedLinear) and layer.lora_a.dtype == jnp.float32
    tokens = jnp.arange(12, dtype=jnp.int32)
    # lora_b = 0: the int8 model's function (to float rounding: the programs fuse differently)
    np.testing.assert_allclose(np.asarray(_forward(adapted, tokens)), np.asarray(_forward(q, tokens)), atol=1e-5)
    optimizer = optax.sgd(0.5)
    state = TrainState.create(adapted, optimizer, trainable=peft.adapter_filter(adapted), key=jax.random.key(2))
    step = make_train_step(lm_loss, optimizer)
    batch = _batch(256)
    first = None
    for _ in range(8):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < first
    tuned = state.model
    assert tuned.blocks.layers.attn.q_proj.base.codes.dtype == jnp.int8  # the base stayed int8
    merged = peft.merge(tuned)
    assert isinstance(merged.blocks.layers.attn.q_proj, eqx.nn.Linear)
    assert merged.blocks.layers.attn.q_proj.weight.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(_forward(merged, tokens)), np.asarray(_forward(tuned, tokens)), rtol=1e-5, atol=1e-5)


def test_lora_on_the_mlp_preset():
    model = eqzoo.models.create("mlp-small", key=jax.random.key(0))
    adapted = _with_random_b(peft.lora(model, rank=2, key=jax.random.key(1)), jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (model.config.in_features,))
    np.testing.assert_allclose(np.asarray(_forward(peft.merge(adapted), x)), np.asarray(_forward(adapted, x)), rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(_forward(adapted, x) - _forward(model, x)))) > 1e-4


def test_a_bf16_base_gets_float32_factors_that_train():
    # A bf16 checkpoint's base: factors default to float32, so Adam's small early updates are
    # not rounded away (in bf16 most of lora_a would not move).
    base = eqzoo.train.cast_floating(_model("tiny-llama"), jnp.bfloat16)
    adapted = peft.lora(base, rank=4, key=jax.random.key(1))
    q = adapted.blocks.layers.attn.q_proj
    assert q.lora_a.dtype == jnp.float32 and q.base.weight.dtype == jnp.bfloat16 and q.dtype == jnp.bfloat16
    assert adapted.init_cache(8).keys.dtype == jnp.bfloat16
    out = _forward(adapted, jnp.arange(8, dtype=jnp.int32))
    assert out.dtype == jnp.bfloat16
    assert peft.lora(base, rank=4, dtype=jnp.bfloat16, key=jax.random.key(1)).blocks.layers.attn.q_proj.lora_a.dtype == jnp.bfloat16


def test_load_adapters_casts_dtypes_on_request_and_says_so(tmp_path):
    path = tmp_path / "a.safetensors"
    low = peft.lora(_model(), rank=2, dtype=jnp.bfloat16, key=jax.random.key(1))
    peft.save_adapters(low, path)
    full = peft.lora(_model(), rank=2, key=jax.random.key(1))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)expected float32.*found bfloat16.*load_adapters\(\.\.\., cast=True\)") as info:
        peft.load_adapters(full, path)
    assert "targets and rank" not in str(info.value)  # names and shapes fit: only the dtypes differ
    loaded = peft.load_adapters(full, path, cast=True)
    a = loaded.blocks.layers.attn.q_proj.lora_a
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(low.blocks.layers.attn.q_proj.lora_a.astype(jnp.float32)))


def test_adapter_io_and_filter_errors(tmp_path, unchecked):
    adapted = peft.lora(_model(), rank=2, key=jax.random.key(1))
    with pytest.raises(eqzoo._errors.ConfigError, match="metadata key 'eqzoo.peft' is eqzoo's own"):
        peft.save_adapters(adapted, tmp_path / "x.safetensors", metadata={"eqzoo.peft": "{}"})
    with pytest.raises(eqzoo._errors.ConfigError, match=r"adapter_filter\(also=\.\.\.\): target regex '\(' does not compile"):
        peft.adapter_filter(adapted, also="(")
    # saved with also="final_norm", loaded into a model that has no final_norm
    path = tmp_path / "n.safetensors"
    peft.save_adapters(adapted, path, also="final_norm")
    mlp = peft.lora(eqzoo.models.create("mlp-small", key=jax.random.key(0)), rank=2, key=jax.random.key(1))
    with pytest.raises(CheckpointMismatchError, match=r"saved with also=\['final_norm'\]"):
        peft.load_adapters(mlp, path)
    # onto a model with no adapters at all: it blamed the file's also=None ("saved with also=None,
    # which does not fit the model")
    plain = tmp_path / "plain.safetensors"
    peft.save_adapters(peft.lora(_model(), rank=2, targets="q_proj|v_proj", key=jax.random.key(1)), plain)
    with pytest.raises(CheckpointMismatchError, match=r"load_adapters: the model has no LoRA adapters to load .*plain\.safetensors into; the file adapts 2 layer\(s\) "
                       r"\(blocks\.layers\.attn\.q_proj, blocks\.layers\.attn\.v_proj\)\. Adapt the base model .*eqzoo\.peft\.lora\(base, rank="):
        peft.load_adapters(_model(), plain)
    # a rank given as a NumPy integer is one; a JAX scalar is named as such, a bool refused
    # (checking off: the annotation says int, and checking on, beartype refuses both itself)
    with unchecked():
        assert peft.lora(_model(), rank=np.int64(2), key=jax.random.key(1)).blocks.layers.attn.q_proj.rank == 2
        with pytest.raises(eqzoo._errors.ConfigError, match=r"LoRA rank must be a positive integer, got Array\(2, dtype=int32\)\. That is a JAX array, not a Python int: pass int\(x\)"):
            peft.lora(_model(), rank=jnp.int32(2), key=jax.random.key(1))
        with pytest.raises(eqzoo._errors.ConfigError, match=r"LoRA rank must be a positive integer, got True\.$"):
            peft.lora(_model(), rank=True, key=jax.random.key(1))
    # Hugging Face PEFT's adapter folder and file: named as such, with the way to use them
    # (the file was "not written by save_adapters", the folder "no weights file")
    import safetensors.numpy

    folder = tmp_path / "hf-peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 2}')
    name = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    safetensors.numpy.save_file({name: np.zeros((2, 64), np.float32)}, str(folder / "adapter_model.safetensors"))
    for where in (folder, folder / "adapter_model.safetensors"):
        with pytest.raises(CheckpointMismatchError, match=r"is a Hugging Face PEFT adapter .*eqzoo.hf.load_peft\(eqzoo.hf.load_pretrained\(BASE\)"):
            peft.load_adapters(adapted, where)


class _Opaque(eqzoo.nn.AbstractLinear):
    """A linear layer with no dense equivalent (as_linear is not implemented)."""

    weight: jax.Array
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def apply(self, x):
        return x @ self.weight.T

    @property
    def dtype(self):
        return self.weight.dtype


def test_lora_refuses_layers_it_cannot_adapt_or_merge():
    with pytest.raises(eqzoo._errors.ConfigError, match="'scalar' features are not supported"):
        peft.LoRALinear(eqx.nn.Linear("scalar", 3, key=jax.random.key(0)), rank=2, key=jax.random.key(1))
    adapted = peft.lora([_Opaque(jnp.ones((3, 4)), 4, 3)], rank=2, key=jax.random.key(1))
    np.testing.assert_allclose(np.asarray(adapted[0](jnp.ones(4))), np.full(3, 4.0))  # lora_b = 0
    with pytest.raises(eqzoo._errors.ConfigError, match="base is a _Opaque, which has no dense"):
        peft.merge(adapted)
    # a selected layer of a kind the caller does not replace
    with pytest.raises(eqzoo._errors.ConfigError, match=r"0 is a _Opaque, not one of \['Linear'\]; narrow the targets"):
        eqzoo.nn.replace_linears([_Opaque(jnp.ones((3, 4)), 4, 3)], lambda p, x: x, targets="0")


def test_a_train_step_leaves_the_frozen_base_usable_and_shares_it():
    # The step donates only what it updates: the base model passed to peft.lora stays alive
    # (to merge, reuse or load adapters onto) and the new state holds those very arrays, not
    # copies (XLA returns no frozen array: its output is the adapters and optimizer state).
    base = _model()
    tokens = jnp.arange(12, dtype=jnp.int32)
    before = np.asarray(_forward(base, tokens))
    adapted = peft.lora(base, rank=2, targets="attn", key=jax.random.key(1))
    optimizer = optax.sgd(0.5)
    first = TrainState.create(adapted, optimizer, trainable=peft.adapter_filter(adapted), key=jax.random.key(2))
    step = make_train_step(lm_loss, optimizer, grad_accum_steps=2)
    batch = _batch(256)
    frozen = [x for x in jax.tree.leaves(eqx.filter(base, eqx.is_array))]
    frozen_bytes = sum(x.nbytes for x in frozen)
    memory = step.lower(first, batch).compile().memory_analysis()
    assert memory.output_size_in_bytes < memory.argument_size_in_bytes - frozen_bytes
    # compiled ahead, the step is still called with the state's flat arrays
    ahead = make_train_step(lm_loss, optimizer, grad_accum_steps=2, donate=False).lower(first, batch).compile()
    ahead_arrays, ahead_metrics = ahead(first.arrays, batch)
    assert len(ahead_arrays) == len(first.arrays)
    state, metrics = step(first, batch)
    np.testing.assert_allclose(float(ahead_metrics["loss"]), float(metrics["loss"]), rtol=1e-6)
    state, _ = step(state.replace(key=jax.random.key(3)), batch)  # an equal structure: no recompile
    assert step.num_compilations == 1
    assert not any(x.is_deleted() for x in frozen)
    np.testing.assert_array_equal(np.asarray(_forward(base, tokens)), before)  # exactly the base's outputs
    assert first.model.blocks.layers.attn.q_proj.lora_b.is_deleted()  # the adapters were donated
    kept = {id(x) for x in jax.tree.leaves(eqx.filter(peft.unwrap(state.model), eqx.is_array))}
    assert all(id(x) in kept for x in frozen)  # the same arrays, not copies
    assert float(jnp.max(jnp.abs(state.model.blocks.layers.attn.q_proj.lora_b))) > 0
    merged = peft.merge(peft.lora(base, rank=2, targets="attn", key=jax.random.key(1)))
    np.testing.assert_array_equal(np.asarray(_forward(merged, tokens)), before)


def test_a_rank_past_the_layer_warns():
    # rank=64 on tiny-llama (width 64, 2 kv heads of 16: k/v_proj are 32 wide) used to build
    # adapters silently: B @ A of a (32, 64) layer has rank <= 32 whatever r is.
    base = _model("tiny-llama")
    with pytest.warns(UserWarning, match=r"lora: rank=64 exceeds the smaller side of 2 adapted layer\(s\): blocks\.layers\.attn\.k_proj \(32x64\), blocks\.layers\.attn\.v_proj \(32x64\)\. .*pass rank <= 32"):
        peft.lora(base, rank=64, targets="attn", key=jax.random.key(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft.lora(base, rank=32, targets="attn", key=jax.random.key(1))
        # A mixture-of-experts router (tiny-mixtral's has 4 outputs) is not counted.
        peft.lora(_model("tiny-mixtral"), rank=8, key=jax.random.key(1))


def test_alpha_zero_warns_that_the_adapters_train_nothing():
    # alpha=0 made scaling 0: the adapted model was the base and every adapter gradient 0, silently.
    base = _model("tiny-llama")
    with pytest.warns(UserWarning, match=r"lora: alpha=0 scales every adapter's update by 0.*training changes nothing") as record:
        adapted = peft.lora(base, rank=2, alpha=0, targets="attn", key=jax.random.key(1))
    assert adapted.blocks.layers.attn.q_proj.scaling == 0.0 and record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft.lora(base, rank=2, alpha=4, targets="attn", key=jax.random.key(1))
