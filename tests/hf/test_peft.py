"""Hugging Face PEFT LoRA adapters: read onto eqzoo models and written from them, checked against
transformers models whose weights were merged by hand in torch (PEFT itself is not installed)."""

import copy
import functools
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


def _check_logits(model, merged, hf_base, hft):
    """eqzoo's adapted logits match the hand-merged transformers model's, and differ from the
    base model's (in torch: eqzoo's base matches it, tests/hf/test_load.py, and compiling it
    here again would only cost time)."""
    tokens = hft.random_tokens(3)
    ours, theirs = _logits(model, tokens), hft.hf_logits(merged, tokens)
    assert np.abs(ours - theirs).max() < ATOL
    assert np.abs(ours - hft.hf_logits(hf_base, tokens)).max() > 1000 * ATOL  # the adapters matter


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
    _check_logits(adapted, _merged(hf_model, folder, hft), hf_model, hft)


# The other families eqzoo.hf loads (Llama and GPT-2 are tested above). Their PEFT module names
# are Llama's; the mixture-of-experts ones get adapters on attention only (in transformers 5
# their experts and router are not torch.nn.Linear layers, so PEFT puts no module LoRA there).
DECODERS = ["mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "mixtral", "qwen3-moe"]
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# One rank and alpha per projection, the same in the hand-written adapters and in eqzoo's own
# (so that both compile to one model), and eqzoo's layer for each.
RANK_ALPHA = {"q_proj": (4, 8), "k_proj": (2, 8), "v_proj": (4, 8), "o_proj": (4, 5), "gate_proj": (4, 8), "up_proj": (4, 3), "down_proj": (3, 8)}
EQZOO = {"q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj", "o_proj": "attn.o_proj",
         "gate_proj": "mlp.gate", "up_proj": "mlp.up", "down_proj": "mlp.down"}


def _is_moe(family):
    return family in ("mixtral", "qwen3-moe")


def _projections(family):
    return ATTENTION if _is_moe(family) else ATTENTION + MLP


def _linears(hf_model, hft, ends):
    """Full name -> (in, out) of each torch.nn.Linear of `hf_model` whose name ends in one of
    `ends` at a dot (PEFT's rule for a list of `target_modules`)."""
    return {
        name: (m.in_features, m.out_features)
        for name, m in hf_model.named_modules()
        if isinstance(m, hft.torch.nn.Linear) and any(name == e or name.endswith("." + e) for e in ends)
    }


def _adapter_for(hf_model, hft, folder, ends, config, seed):
    """A PEFT adapter folder on the Linear layers of `hf_model` that `ends` name, every factor
    random and non-zero, each module's rank the one `config`'s rank_pattern gives it."""
    modules = _linears(hf_model, hft, ends)
    assert len(modules) == len(ends) * hf_model.config.num_hidden_layers, sorted(modules)
    rank = lambda m: _pattern(config.get("rank_pattern", {}), m, config["r"])  # noqa: E731
    return _write(folder, config, _random_factors(sorted(modules), rank, modules.__getitem__, seed))


def _check_settings(model, family):
    for proj in _projections(family):
        name = proj.split(".")[1]
        layer = functools.reduce(getattr, EQZOO[name].split("."), model.blocks.layers)
        rank, alpha = RANK_ALPHA[name]
        assert (layer.rank, layer.scaling) == (rank, alpha / rank), name


@pytest.mark.parametrize("family", DECODERS)
def test_peft_adapter_on_every_projection_matches_transformers(family, hf_checkpoints, loaded, tmp_path, hft):
    """A hand-written PEFT adapter on all of the family's projections (q/k/v/o and
    gate/up/down; attention only for Mixtral and Qwen3-MoE), with rank and alpha patterns keyed
    by its module names: the logits match transformers with the update merged by hand (Qwen2's
    q/k/v biases, Gemma's tied head and norms, Gemma 2's soft caps stay the base's)."""
    hf_model, _ = hf_checkpoints(family)
    config = {"r": 4, "lora_alpha": 8, "target_modules": sorted(p.split(".")[1] for p in _projections(family)),
              "rank_pattern": {"self_attn.k_proj": 2, "down_proj": 3}, "alpha_pattern": {"o_proj": 5, "mlp.up_proj": 3}}
    folder = _adapter_for(hf_model, hft, tmp_path / "adapter", _projections(family), config, 5)
    adapted = eqzoo.hf.load_peft(loaded(family), folder)
    _check_settings(adapted, family)
    _check_logits(adapted, _merged(hf_model, folder, hft), hf_model, hft)


@pytest.mark.parametrize("family", DECODERS)
def test_peft_default_q_v_adapter_with_rslora_matches_transformers(family, hf_checkpoints, loaded, tmp_path, hft):
    """PEFT's default targets for these families, q_proj and v_proj only, with use_rslora
    (scaling alpha / sqrt(r)) and v_proj's own rank: only those layers are adapted, and the
    logits match transformers merged by hand."""
    hf_model, _ = hf_checkpoints(family)
    config = {"r": 4, "lora_alpha": 6, "use_rslora": True, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 1}}
    folder = _adapter_for(hf_model, hft, tmp_path / "adapter", ("q_proj", "v_proj"), config, 6)
    adapted = eqzoo.hf.load_peft(loaded(family), folder)
    attn = adapted.blocks.layers.attn
    assert (attn.q_proj.scaling, attn.v_proj.rank, attn.v_proj.scaling) == (6 / 2, 1, 6.0)
    rest = [attn.k_proj, attn.o_proj] + ([] if _is_moe(family) else list(vars(adapted.blocks.layers.mlp).values()))
    assert not any(isinstance(x, peft.LoRALinear) for x in rest)
    _check_logits(adapted, _merged(hf_model, folder, hft), hf_model, hft)


@pytest.mark.parametrize("family", DECODERS)
def test_eqzoo_adapters_save_under_the_family_peft_names(family, hf_checkpoints, loaded, tmp_path, hft):
    """eqzoo's own adapters on every projection (random B; ranks and alphas as above) written
    with save_peft: each factor pair sits on a torch.nn.Linear of the transformers model under
    its PEFT name, with the shapes PEFT gives it; target_modules picks exactly those modules by
    PEFT's rule and rank_pattern / alpha_pattern give each its rank and scaling; merged by hand
    from the file into transformers they give eqzoo's logits; load_peft reads back the same model."""
    hf_model, _ = hf_checkpoints(family)
    base = adapted = loaded(family)
    names = [p.split(".")[1] for p in _projections(family)]
    for k, (rank, alpha) in enumerate(sorted({RANK_ALPHA[n] for n in names})):  # one peft.lora per setting
        targets = [r"\." + EQZOO[n].replace(".", r"\.") + "$" for n in names if RANK_ALPHA[n] == (rank, alpha)]
        adapted = peft.lora(adapted, rank=rank, alpha=alpha, targets=targets, experts=False, key=jax.random.key(k))
    adapted = _random_b(adapted, 4)
    _check_settings(adapted, family)
    folder = eqzoo.hf.save_peft(adapted, tmp_path / "adapter", base_model_name_or_path=family)
    config = json.loads((folder / "adapter_config.json").read_text())
    written = load_file(str(folder / "adapter_model.safetensors"))
    modules = _linears(hf_model, hft, _projections(family))
    assert written.keys() == {f"{PREFIX}{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    assert config["target_modules"] == sorted(p.split(".")[1] for p in _projections(family))
    assert _linears(hf_model, hft, config["target_modules"]).keys() == modules.keys()
    assert {n for n, _ in hf_model.named_modules() if any(n.endswith("." + t) for t in config["target_modules"])} == modules.keys()
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, False)
    for m, (fan_in, fan_out) in modules.items():  # each module's rank and alpha by PEFT's pattern rule
        r, alpha = _pattern(config["rank_pattern"], m, config["r"]), _pattern(config["alpha_pattern"], m, config["lora_alpha"])
        assert (r, alpha) == RANK_ALPHA[m.rsplit(".", 1)[1]], m
        assert (written[f"{PREFIX}{m}.lora_A.weight"].shape, written[f"{PREFIX}{m}.lora_B.weight"].shape) == ((r, fan_in), (fan_out, r)), m
    _check_logits(adapted, _merged(hf_model, folder, hft), hf_model, hft)
    assert eqx.tree_equal(eqzoo.hf.load_peft(base, folder), adapted)


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
    _check_logits(adapted, _merged(hf_model, folder, hft), hf_model, hft)

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
    _check_logits(adapted, _merged(hf_model, folder, hft), hf_model, hft)
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
    with pytest.raises(HFFormatError, match=r"expert weights .* have adapters .*targets='attn'"):
        eqzoo.hf.save_peft(peft.lora(mixtral, rank=2, key=jax.random.key(1)), tmp_path / "moe")
    # transformers 5's routers are not linear layers: PEFT could not load a router adapter
    with pytest.raises(HFFormatError, match=r"routers \['blocks\.layers\.mlp\.router'\] have adapters.*targets='attn'"):
        eqzoo.hf.save_peft(peft.lora(mixtral, rank=2, experts=False, key=jax.random.key(1)), tmp_path / "moe")
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
