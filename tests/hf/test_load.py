"""Loading transformers checkpoints: logits parity, bitwise round trips, shards, bf16, shardings."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import eqzoo.hf
from eqzoo.models import GPT2, Gemma, Llama, Mixtral

safetensors = pytest.importorskip("safetensors")
from safetensors.numpy import load_file  # noqa: E402

FAMILIES = ["gpt2", "llama-gqa-untied", "llama-gqa-tied", "mixtral", "mistral", "qwen2", "qwen3", "qwen3-moe", "gemma2", "gemma3"]
CLASSES = {
    "gpt2": GPT2, "llama-gqa-untied": Llama, "llama-gqa-tied": Llama, "mixtral": Mixtral, "mistral": Llama,
    "qwen2": Llama, "qwen3": Llama, "qwen3-moe": Mixtral, "gemma2": Gemma, "gemma3": Gemma,
}
ATOL = 1e-4  # fp32, whole model (STYLE.md rule 11)


@eqx.filter_jit
def _batched(model, tokens):
    return jax.vmap(model)(tokens)


def _logits(model, tokens):
    return np.asarray(_batched(model, jnp.asarray(tokens)))


def _same(a, b) -> bool:
    return bool(eqx.tree_equal(a, b))


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_logits_match_transformers(family, hf_checkpoints, loaded, hft):
    hf_model, _ = hf_checkpoints(family)
    model = loaded(family)
    assert type(model) is CLASSES[family]
    tokens = hft.random_tokens(1)
    ours, theirs = _logits(model, tokens), hft.hf_logits(hf_model, tokens)
    err = np.abs(ours - theirs).max()
    assert err < ATOL, f"{family}: max |eqzoo - transformers| logit = {err:.2e} >= {ATOL}"


def test_loaded_config_mirrors_the_hf_config(hf_checkpoints, loaded):
    gqa = loaded("llama-gqa-tied").config
    assert (gqa.num_heads, gqa.num_kv_heads, gqa.head_dim, gqa.tie_embeddings) == (4, 2, 32, True)
    assert gqa.rope_theta == 500000.0 and gqa.rms_norm_eps == 1e-5
    assert loaded("llama-gqa-untied").lm_head is not None
    assert loaded("gpt2").config.mlp_ratio == 4
    moe = loaded("mixtral").config
    assert (moe.num_experts, moe.experts_per_token, moe.hidden_dim, moe.num_kv_heads) == (4, 2, 96, 2)
    assert moe.router_aux_loss_coef == 0.05 and moe.rope_theta == 1e6 and not moe.tie_embeddings


def test_mixtral_experts_are_stacked_in_eqzoo_layout(hf_checkpoints, loaded):
    """HF's per-expert (out, in) Linear weights become eqzoo's stacked (in, out) arrays."""
    _, folder = hf_checkpoints("mixtral")
    tensors = load_file(str(folder / "model.safetensors"))
    mlp = loaded("mixtral").blocks.layers.mlp
    assert mlp.gate_proj.shape == mlp.up_proj.shape == (2, 4, 64, 96)
    assert mlp.down_proj.shape == (2, 4, 96, 64)
    moe = "model.layers.1.block_sparse_moe."
    np.testing.assert_array_equal(np.asarray(mlp.router.weight[1]), tensors[f"{moe}gate.weight"])
    np.testing.assert_array_equal(np.asarray(mlp.gate_proj[1, 3]), tensors[f"{moe}experts.3.w1.weight"].T)
    np.testing.assert_array_equal(np.asarray(mlp.up_proj[1, 3]), tensors[f"{moe}experts.3.w3.weight"].T)
    np.testing.assert_array_equal(np.asarray(mlp.down_proj[1, 3]), tensors[f"{moe}experts.3.w2.weight"].T)


def test_loaded_sliding_windows(hf_checkpoints, loaded, tmp_path, hft):
    """Mistral's window reaches the config; a Mixtral with a window shorter than the sequence
    matches transformers past the window too."""
    assert loaded("mistral").config.sliding_window == 8 and loaded("mixtral").config.sliding_window is None
    hf_model = hft.make_mixtral(5, sliding_window=6)
    hf_model.save_pretrained(tmp_path)
    model = eqzoo.hf.load_pretrained(tmp_path)
    assert model.config.sliding_window == 6 and model.config.max_seq == hft.MAX_SEQ
    tokens = hft.random_tokens(6, shape=(2, 20))
    err = np.abs(_logits(model, tokens) - hft.hf_logits(hf_model, tokens)).max()
    assert err < ATOL, f"mixtral, sliding window 6: max logit error {err:.2e} >= {ATOL}"
    # Qwen2 with its window on every layer (max_window_layers=0).
    hf_model = hft.make_qwen2(7, use_sliding_window=True, sliding_window=5, max_window_layers=0)
    hf_model.save_pretrained(tmp_path / "qwen2")
    model = eqzoo.hf.load_pretrained(tmp_path / "qwen2")
    assert model.config.sliding_window == 5 and model.config.qkv_bias
    err = np.abs(_logits(model, tokens) - hft.hf_logits(hf_model, tokens)).max()
    assert err < ATOL, f"qwen2, sliding window 5: max logit error {err:.2e} >= {ATOL}"



@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_windows_on_some_layers_match_transformers(family, tmp_path, hft):
    """Qwen2's max_window_layers (full layers first, windowed from there on) and Qwen3's explicit
    layer_types (windowed first, then full; 3 layers, window 5 of 20 positions): loaded, the
    logits and greedy decoding through the ring caches match transformers; exported, transformers
    reads the same kinds back."""
    if family == "qwen2":
        hf_model = hft.make_qwen2(8, use_sliding_window=True, sliding_window=5, max_window_layers=1, num_hidden_layers=3)
        kinds = ("full_attention", "sliding_attention", "sliding_attention")
    else:
        kinds = ("sliding_attention", "full_attention", "sliding_attention")
        hf_model = hft.make_qwen3(9, use_sliding_window=True, sliding_window=5, layer_types=list(kinds), num_hidden_layers=3)
    hf_model.save_pretrained(tmp_path / "hf")
    model = eqzoo.hf.load_pretrained(tmp_path / "hf")
    assert model.config.layer_types == kinds and model.config.sliding_window == 5
    tokens = hft.random_tokens(10, shape=(2, 20))
    err = np.abs(_logits(model, tokens) - hft.hf_logits(hf_model, tokens)).max()
    assert err < ATOL, f"{family}, windows on {kinds}: max logit error {err:.2e} >= {ATOL}"
    cache = model.init_cache(24)
    assert cache.keys.shape[0] + cache.window_keys.shape[0] == 3 and cache.window_keys.shape[1] == 5
    new = eqzoo.generate(model, jnp.asarray(tokens[0, :9]), max_new_tokens=10)
    with hft.torch.no_grad():
        want = hf_model.generate(hft.torch.as_tensor(tokens[:1, :9], dtype=hft.torch.long), max_new_tokens=10, do_sample=False)
    np.testing.assert_array_equal(np.asarray(new), want[0].numpy())
    eqzoo.hf.save_pretrained(model, tmp_path / "out")
    back = hft.load_with_transformers(tmp_path / "out")
    assert tuple(back.config.layer_types) == kinds and back.config.sliding_window == 5
    err = np.abs(hft.hf_logits(back, tokens) - hft.hf_logits(hf_model, tokens)).max()
    assert err == 0.0, f"{family}: exported logits differ by {err:.2e}"


def test_first_gemma_matches_transformers(tmp_path, hft):
    """Gemma (the first generation: no sandwich norms, windows or caps) with random norms."""
    hf_model = hft.make_gemma(11)
    hf_model.save_pretrained(tmp_path)
    model = eqzoo.hf.load_pretrained(tmp_path)
    assert type(model) is Gemma and not model.config.post_norms and model.config.sliding_window is None
    tokens = hft.random_tokens(3)
    err = np.abs(_logits(model, tokens) - hft.hf_logits(hf_model, tokens)).max()
    assert err < ATOL, f"gemma: max logit error {err:.2e} >= {ATOL}"


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_to_eqzoo_to_transformers_is_bitwise(family, hf_checkpoints, loaded, tmp_path):
    _, folder = hf_checkpoints(family)
    eqzoo.hf.save_pretrained(loaded(family), tmp_path)
    original = load_file(str(folder / "model.safetensors"))
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert exported[name].shape == tensor.shape, name
        assert exported[name].tobytes() == tensor.tobytes(), f"{name} differs after the round trip"


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_with_index(family, hf_checkpoints, loaded, tmp_path, hft):
    hf_model, _ = hf_checkpoints(family)
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "model.safetensors").exists()
    model = eqzoo.hf.load_pretrained(tmp_path)
    assert _same(model, loaded(family))
    tokens = hft.random_tokens(2)
    err = np.abs(_logits(model, tokens) - hft.hf_logits(hf_model, tokens)).max()
    assert err < ATOL, f"{family} sharded load: max logit error {err:.2e} >= {ATOL}"


def _bf16_checkpoint(folder, out, hft):
    """Re-save a checkpoint in bf16 with transformers (leaving the shared fp32 model alone)."""
    hft.transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=hft.torch.bfloat16).save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_checkpoint_with_dtype(family, hf_checkpoints, tmp_path, hft):
    stored = _bf16_checkpoint(hf_checkpoints(family)[1], tmp_path, hft)

    kept = eqzoo.hf.load_pretrained(tmp_path)  # dtype=None keeps what the file holds
    assert {leaf.dtype for leaf in jax.tree.leaves(kept)} == {jnp.dtype(jnp.bfloat16)}
    embed = next(v for k, v in stored.items() if k.endswith(("wte.weight", "embed_tokens.weight")))
    assert np.asarray(kept.embed.weight).tobytes() == embed.tobytes()
    eqzoo.hf.save_pretrained(kept, tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert sorted(again) == sorted(stored)
    assert all(again[k].dtype == v.dtype and again[k].tobytes() == v.tobytes() for k, v in stored.items())

    upcast = eqzoo.hf.load_pretrained(tmp_path, dtype=jnp.float32)
    assert {leaf.dtype for leaf in jax.tree.leaves(upcast)} == {jnp.dtype(jnp.float32)}
    # Reference: transformers' own fp32 model holding the same bf16-rounded weights.
    reference = hft.transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=hft.torch.float32).eval()
    tokens = hft.random_tokens(3)
    err = np.abs(_logits(upcast, tokens) - hft.hf_logits(reference, tokens)).max()
    assert err < ATOL, f"{family} bf16 checkpoint loaded as fp32: max logit error {err:.2e} >= {ATOL}"


def test_bf16_model_runs(hf_checkpoints, tmp_path, hft):
    _bf16_checkpoint(hf_checkpoints("llama-gqa-tied")[1], tmp_path, hft)
    model = eqzoo.hf.load_pretrained(tmp_path)
    reference = hft.transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=hft.torch.float32).eval()
    tokens = hft.random_tokens(3)
    # jax.nn.dot_product_attention itself promotes bf16 with f32, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        logits = _logits(model, tokens)
    assert logits.dtype == jnp.bfloat16
    err = np.abs(logits.astype(np.float32) - hft.hf_logits(reference, tokens)).max()
    assert err < 2e-2, f"bf16 compute vs fp32 reference: max logit error {err:.2e} >= 2e-2 (bf16 tolerance)"


def test_llama3_rope_scaling_parity(tmp_path, hft):
    scaling = {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    hf_model = hft.make_llama(3, rope_theta=50000.0, rope_scaling=scaling)
    hf_model.save_pretrained(tmp_path)
    model = eqzoo.hf.load_pretrained(tmp_path)
    assert model.config.rope_scaling is not None and model.config.rope_scaling.factor == 8.0
    tokens = hft.random_tokens(4, shape=(2, 48))
    err = np.abs(_logits(model, tokens) - hft.hf_logits(hf_model, tokens)).max()
    assert err < ATOL, f"llama3 rope scaling: max logit error {err:.2e} >= {ATOL}"
    # The scaling matters at these positions: the same weights without it give other logits.
    with pytest.warns(UserWarning, match=r"config_overrides change \['rope_scaling'\] from the checkpoint's .*computes something other than the checkpoint"):
        plain = eqzoo.hf.load_pretrained(tmp_path, config_overrides={"rope_scaling": None})
    assert np.abs(_logits(plain, tokens) - _logits(model, tokens)).max() > 1e-3


def test_sharding_places_each_parameter(hf_checkpoints, loaded):
    _, folder = hf_checkpoints("llama-gqa-untied")
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    model = eqzoo.hf.load_pretrained(folder, sharding=replicated)
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(model))

    seen = {}

    def rule(path, struct):
        seen[path] = struct.shape
        # Shard the output axis of 2-d weights (and of stacked per-layer weights) over fsdp.
        if len(struct.shape) >= 2 and struct.shape[-2] % 8 == 0:
            return NamedSharding(mesh, P(*([None] * (len(struct.shape) - 2)), "fsdp", None))
        return None

    by_rule = eqzoo.hf.load_pretrained(folder, sharding=rule)
    assert seen["blocks.layers.attn.q_proj.weight"] == (2, 64, 64)
    assert seen["embed.weight"] == (160, 64)
    q = by_rule.blocks.layers.attn.q_proj.weight
    assert q.sharding.spec == P(None, "fsdp", None)
    assert q.addressable_shards[0].data.shape == (2, 8, 64)
    assert _same(jax.device_get(by_rule), jax.device_get(loaded("llama-gqa-untied")))

    as_tree = jax.tree.map(lambda _: replicated, eqx.filter(loaded("llama-gqa-untied"), eqx.is_array))
    from_tree = eqzoo.hf.load_pretrained(folder, sharding=as_tree)
    assert from_tree.final_norm.weight.sharding == replicated


def test_sharding_by_a_mesh_uses_the_default_rules(hf_checkpoints, loaded):
    # `sharding=mesh` places each parameter as eqzoo.sharding.shard would. A Mesh is callable
    # (a context manager), so it used to be called as the (path, shape_dtype) function and
    # raised a TypeError from inside JAX.
    _, folder = hf_checkpoints("llama-gqa-untied")
    mesh = eqzoo.sharding.make_mesh("fsdp=4,tensor=2")
    model = eqzoo.hf.load_pretrained(folder, sharding=mesh)
    want = eqzoo.sharding.tree_shardings(model, mesh)
    for got, expected in zip(jax.tree.leaves(model), jax.tree.leaves(want), strict=True):
        assert got.sharding == expected
    assert model.blocks.layers.attn.q_proj.weight.sharding.spec == P(None, "tensor", "fsdp")
    assert _same(jax.device_get(model), jax.device_get(loaded("llama-gqa-untied")))
    # The layout is checked before any tensor is read: a mesh axis that does not divide a
    # dimension raises, naming the parameter.
    odd = eqzoo.sharding.make_mesh("tensor=3", devices=jax.devices()[:3])
    with pytest.warns(UserWarning, match="tensor=3 does not divide num_heads=4"):
        with pytest.raises(eqzoo.sharding.ShardingError, match=r"'embed.weight' of shape \(160, 64\): dimension 0 \(size 160\) is assigned to mesh axis tensor=3"):
            eqzoo.hf.load_pretrained(folder, sharding=odd)


def test_gpt2_checkpoint_without_prefix_and_with_buffers(hf_checkpoints, loaded, tmp_path):
    """The original OpenAI GPT-2 files name tensors without `transformer.` and carry the causal
    mask buffers `attn.bias` / `attn.masked_bias`; both are read."""
    from safetensors.numpy import save_file

    _, folder = hf_checkpoints("gpt2")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(str(folder / "model.safetensors")).items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    assert _same(eqzoo.hf.load_pretrained(tmp_path), loaded("gpt2"))


@pytest.mark.parametrize("where", ["top-level", "rope_parameters"])
def test_partial_rotary_factor_with_default_rope_is_ignored_as_transformers_does(where, tmp_path, hft):
    # transformers' Llama-family default rotary embedding never reads partial_rotary_factor: it
    # rotates the whole head, as eqzoo does, so such files load (the scaled rope types, which do
    # read it, are refused: test_errors.py).
    hf_model = hft.make_llama(12)
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    if where == "top-level":
        config["partial_rotary_factor"] = 0.5
    else:
        config["rope_parameters"] = {**config["rope_parameters"], "partial_rotary_factor": 0.5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    reread = hft.transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reread.config.rope_parameters["partial_rotary_factor"] == 0.5  # transformers sees it ...
    model = eqzoo.hf.load_pretrained(tmp_path)
    tokens = hft.random_tokens(7, shape=(2, 40))
    err = np.abs(_logits(model, tokens) - hft.hf_logits(reread, tokens)).max()  # ... and ignores it
    assert err < ATOL, f"partial_rotary_factor ({where}): max logit error {err:.2e} >= {ATOL}"
    assert np.abs(hft.hf_logits(reread, tokens) - hft.hf_logits(hf_model, tokens)).max() == 0.0
