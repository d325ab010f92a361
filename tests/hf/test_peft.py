"""Hugging Face PEFT LoRA adapters: read onto eqzoo models and written from them, checked against
transformers models whose weights were merged by hand in torch (PEFT itself is not installed)."""

import copy
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqzoo
import eqzoo.hf
from eqzoo import peft
from eqzoo.hf import HFFormatError

safetensors = pytest.importorskip("safetensors")
from safetensors.numpy import load_file, save_file  # noqa: E402

ATOL = 1e-4  # fp32, whole model (STYLE.md rule 11)
PREFIX = "base_model.model."


@eqx.filter_jit
def _batched(model, tokens):
    return jax.vmap(model)(tokens)


def _logits(model, tokens):
    return np.asarray(_batched(model, jnp.asarray(tokens)))


def _write(folder, config, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
    (folder / "adapter_config.json").write_text(json.dumps(base | config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _random_factors(modules, rank, shapes, seed):
    """`lora_A` (r, in) and non-zero `lora_B` (out, r) for each HF module name."""
    rng = np.random.default_rng(seed)
    out = {}
    for module in modules:
        (fan_in, fan_out), r = shapes(module), rank(module)
        out[f"{PREFIX}{module}.lora_A.weight"] = rng.normal(0, 0.3, (r, fan_in)).astype(np.float32)
        out[f"{PREFIX}{module}.lora_B.weight"] = rng.normal(0, 0.3, (fan_out, r)).astype(np.float32)
    return out


def _pattern(patterns, module, default):
    # An independent reading of PEFT's rule: a key names the end of the module's dotted name.
    return next((v for k, v in patterns.items() if module == k or module.endswith("." + k)), default)


def _merged(hf_model, folder, hft):
    """A copy of the transformers model with the PEFT adapter in `folder` added to its weights by
    hand: W += scaling * B @ A, transposed for GPT-2's (in, out) Conv1D weights."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    merged = copy.deepcopy(hf_model)
    params = dict(merged.named_parameters())
    with hft.torch.no_grad():
        for name, a in tensors.items():
            if not name.endswith("lora_A.weight"):
                continue
            module = name[len(PREFIX) : -len(".lora_A.weight")]
            b = tensors[f"{PREFIX}{module}.lora_B.weight"]
            r = a.shape[0]
            alpha = _pattern(config["alpha_pattern"], module, config["lora_alpha"])
            scaling = alpha / (np.sqrt(r) if config["use_rslora"] else r)
            delta = scaling * (b.astype(np.float64) @ a.astype(np.float64))  # (out, in)
            weight = params[f"{module}.weight"]
            weight += hft.torch.as_tensor((delta.T if config.get("fan_in_fan_out") else delta).astype(np.float32))
    return merged.eval()


def _check_logits(model, hf_model, base, hft):
    tokens = hft.random_tokens(3)
    ours, theirs = _logits(model, tokens), hft.hf_logits(hf_model, tokens)
    assert np.abs(ours - theirs).max() < ATOL
    assert np.abs(ours - _logits(base, tokens)).max() > 1000 * ATOL  # the adapters matter


def test_llama_peft_adapter_loads_with_rslora_and_patterns(hf_checkpoints, loaded, tmp_path, hft):
    """A hand-written PEFT adapter (rsLoRA, a rank and alpha pattern for down_proj, both layers
    different) matches transformers with the update merged by hand."""
    hf_model, _ = hf_checkpoints("llama-gqa-untied")
    base = loaded("llama-gqa-untied")
    modules = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    shapes = {"q_proj": (64, 64), "v_proj": (64, 32), "down_proj": (176, 64)}
    tensors = _random_factors(modules, lambda m: 2 if "down" in m else 4, lambda m: shapes[m.rsplit(".", 1)[1]], 0)
    config = {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"down_proj": 3}}
    folder = _write(tmp_path / "adapter", config, tensors)
    adapted = eqzoo.hf.load_peft(base, folder)
    attn = adapted.blocks.layers.attn
    assert attn.q_proj.scaling == 8 / 2 and adapted.blocks.layers.mlp.down.scaling == 3 / np.sqrt(2)
    assert not isinstance(attn.k_proj, peft.LoRALinear)
    _check_logits(adapted, _merged(hf_model, folder, hft), base, hft)


def test_gpt2_c_attn_adapter_loads_and_saves_back_unchanged(hf_checkpoints, loaded, tmp_path, hft):
    """GPT-2's fused c_attn (one A, B split by rows into q, k, v) and Conv1D layers
    (fan_in_fan_out): logits match the hand-merged model, and save_peft writes the same file back."""
    hf_model, _ = hf_checkpoints("gpt2")
    base = loaded("gpt2")
    shapes = {"attn.c_attn": (64, 192), "attn.c_proj": (64, 64), "mlp.c_fc": (64, 256)}
    modules = [f"transformer.h.{i}.{m}" for i in (0, 1) for m in shapes]
    tensors = _random_factors(modules, lambda m: 4, lambda m: shapes[m.split(".", 3)[3]], 1)
    config = {"r": 4, "lora_alpha": 8, "fan_in_fan_out": True, "target_modules": ["c_attn", "attn.c_proj", "c_fc"]}
    folder = _write(tmp_path / "adapter", config, tensors)
    adapted = eqzoo.hf.load_peft(base, folder)
    _check_logits(adapted, _merged(hf_model, folder, hft), base, hft)

    out = eqzoo.hf.save_peft(adapted, tmp_path / "again", base_model_name_or_path="gpt2")
    written = load_file(str(out / "adapter_model.safetensors"))
    assert written.keys() == tensors.keys()
    for name, x in tensors.items():
        np.testing.assert_array_equal(written[name], x, err_msg=name)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["rank_pattern"], saved["alpha_pattern"]) == (4, 8, {}, {})
    assert saved["target_modules"] == ["attn.c_proj", "c_attn", "c_fc"] and saved["fan_in_fan_out"] is True
    assert (saved["base_model_name_or_path"], saved["task_type"], saved["bias"]) == ("gpt2", "CAUSAL_LM", "none")


def _random_b(model, seed):
    def rand(x):
        if isinstance(x, peft.LoRALinear):
            key = jax.random.fold_in(jax.random.key(seed), x.lora_b.size)
            return eqx.tree_at(lambda m: m.lora_b, x, 0.3 * jax.random.normal(key, x.lora_b.shape, x.lora_b.dtype))
        return x

    return jax.tree.map(rand, model, is_leaf=lambda x: isinstance(x, peft.LoRALinear))


@pytest.mark.parametrize("family", ["llama-gqa-untied", "gpt2"])
def test_eqzoo_adapters_export_as_peft_and_read_back(family, hf_checkpoints, loaded, tmp_path, hft):
    """Adapters trained in eqzoo (random B; separate A's for GPT-2's q and v, written as one
    block-diagonal c_attn adapter of rank 8) merged by hand from the written file into
    transformers give eqzoo's logits, and load_peft reads the same update back."""
    hf_model, _ = hf_checkpoints(family)
    base = loaded(family)
    targets = "q_proj|v_proj|mlp.up" if family == "gpt2" else "q_proj|o_proj|mlp.down"
    adapted = _random_b(peft.lora(base, rank=4, alpha=8, targets=targets, key=jax.random.key(1)), 2)
    folder = eqzoo.hf.save_peft(adapted, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    if family == "gpt2":  # c_attn: q's and v's A stacked, rank 8; c_fc keeps rank 4 through the patterns
        assert (config["r"], config["lora_alpha"], config["target_modules"]) == (8, 16, ["c_attn", "c_fc"])
        assert (config["rank_pattern"], config["alpha_pattern"]) == ({"c_fc": 4}, {"c_fc": 8})
    else:
        assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (4, 8, False)
        assert config["target_modules"] == ["down_proj", "o_proj", "q_proj"]
    _check_logits(adapted, _merged(hf_model, folder, hft), base, hft)
    again = eqzoo.hf.load_peft(base, folder)
    if family != "gpt2":  # the same factors and scalings, bit for bit
        assert eqx.tree_equal(again, adapted)
    tokens = hft.random_tokens(4)
    assert np.abs(_logits(again, tokens) - _logits(adapted, tokens)).max() < ATOL


def test_peft_adapters_eqzoo_cannot_map_are_refused(hf_checkpoints, loaded, tmp_path):
    base = loaded("llama-gqa-untied")
    q = "model.layers.{}.self_attn.q_proj"
    good = _random_factors([q.format(0), q.format(1)], lambda m: 2, lambda m: (64, 64), 3)
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    cases = [
        ({"use_dora": True}, good, r"use_dora=true .*merge_and_unload"),
        ({"modules_to_save": ["lm_head"]}, good, r"modules_to_save=\['lm_head'\]"),
        ({"bias": "all"}, good, r"bias='all'"),
        ({"peft_type": "IA3"}, good, r"peft_type 'IA3'"),
        ({}, good | {f"{PREFIX}model.embed_tokens.lora_embedding_A": np.zeros((2, 160), np.float32)}, r"LoRA on an embedding"),
        ({}, good | _random_factors(["lm_head"], lambda m: 2, lambda m: (64, 160), 4), r"\['lm_head'\] that have no linear layer in this eqzoo Llama"),
        ({"rank_pattern": {"layers.1.self_attn.q_proj": 1}}, good, r"rank 1 that adapter_config.json gives it"),
        ({"alpha_pattern": {"layers.1.self_attn.q_proj": 1}}, good, r"different ranks or alphas in different layers"),
        ({}, {k: v for k, v in good.items() if ".1." not in k}, r"no factors for .*q_proj in layer\(s\) \[1\]"),
        ({}, _random_factors([q.format(0), q.format(1)], lambda m: 2, lambda m: (32, 64), 3), r"does not fit this model .*in=64"),
        ({}, _random_factors([q.format(2)], lambda m: 2, lambda m: (64, 64), 3), r"layers.2.self_attn.q_proj.*2 layer\(s\)"),
    ]
    for k, (overrides, tensors, match) in enumerate(cases):
        folder = _write(tmp_path / f"case{k}", config | overrides, tensors)
        with pytest.raises(HFFormatError, match=match):
            eqzoo.hf.load_peft(base, folder)
    # layers_to_transform leaves layer 0 out: zero factors there
    folder = _write(tmp_path / "only1", config | {"layers_to_transform": [1]}, {k: v for k, v in good.items() if ".1." in k})
    q_proj = eqzoo.hf.load_peft(base, folder / "adapter_model.safetensors").blocks.layers.attn.q_proj
    assert not np.any(np.asarray(q_proj.lora_b[0])) and np.array_equal(np.asarray(q_proj.lora_a[1]), good[f"{PREFIX}{q.format(1)}.lora_A.weight"])
    # writing: expert adapters and a model without adapters
    mixtral = eqzoo.models.create("tiny-mixtral", key=jax.random.key(0))
    with pytest.raises(HFFormatError, match=r"expert weights .* have adapters .*experts=False"):
        eqzoo.hf.save_peft(peft.lora(mixtral, rank=2, key=jax.random.key(1)), tmp_path / "moe")
    with pytest.raises(HFFormatError, match="has no LoRA adapters"):
        eqzoo.hf.save_peft(base, tmp_path / "none")


def test_written_keys_name_one_module_each():
    # rank_pattern / alpha_pattern keys and target_modules entries match ends of module names in
    # PEFT, so a key shared by GPT-2's attn.c_proj and mlp.c_proj ("c_proj") gave both one
    # scaling; where no plain end is a module's own (ViT's output.dense inside
    # attention.output.dense), target_modules is one regex of full names, which PEFT fullmatches.
    import re

    from eqzoo.hf._peft import _pattern_value, _target_keys

    gpt2 = ["transformer.h.{i}.attn.c_attn", "transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_fc", "transformer.h.{i}.mlp.c_proj"]
    keys, targets = _target_keys(gpt2[1::2], gpt2)
    assert keys == {gpt2[1]: "attn.c_proj", gpt2[3]: "mlp.c_proj"} and targets == ["attn.c_proj", "mlp.c_proj"]
    vit = [f"vit.encoder.layer.{{i}}.{m}" for m in ("attention.output.dense", "intermediate.dense", "output.dense")]
    keys, targets = _target_keys(vit[1:], vit)
    names = [m.format(i=3) for m in vit]
    assert [bool(re.fullmatch(targets, n)) for n in names] == [False, True, True]
    patterns = {keys[vit[2]]: 2, keys[vit[1]]: 5}
    assert [_pattern_value(patterns, n, None) for n in names] == [None, 5, 2]
