"""The examples' `--smoke --json` runs, in-process: each prints one JSON summary line last, with
the figures the README quotes, and learns something even in a few dozen steps."""

import importlib.util
import json
import math
from pathlib import Path

import jax
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name: str, argv: list[str], capsys) -> dict:
    # Examples run as scripts, with JAX's default dtype promotion (optax's Adam relies on it).
    with jax.numpy_dtype_promotion("standard"):
        summary = _load(name).main(argv)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert lines, f"{name} printed nothing on stdout"
    printed = json.loads(lines[-1])  # exactly one JSON summary line, last
    assert printed == json.loads(json.dumps(summary))
    return printed


@pytest.mark.slow
def test_train_char_gpt_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    s = _run("train_char_gpt", ["--smoke", "--json", "--out", str(out), "--profile", str(tmp_path / "prof")], capsys)
    for key in ("train_loss", "val_loss", "unigram_loss", "steps", "seconds", "tokens_per_s", "sample"):
        assert key in s, f"summary lacks {key!r}: {sorted(s)}"
    assert all(math.isfinite(s[k]) for k in ("train_loss", "val_loss", "unigram_loss"))
    # Even a few dozen steps beat predicting characters by their frequency alone.
    assert s["val_loss"] < s["unigram_loss"], s
    assert s["steps"] == 40 and s["tokens_per_s"] > 0
    assert isinstance(s["sample"], str) and s["sample"].startswith("def ")
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 40 and "eval/loss" in records[-1]
    (trace,) = (tmp_path / "prof" / "plugins" / "profile").glob("*/*.xplane.pb")  # --profile: steps 4-8 traced
    assert trace.stat().st_size > 0


@pytest.mark.slow
def test_digits_cnn_smoke(capsys):
    s = _run("digits_cnn", ["--smoke", "--json"], capsys)
    for key in ("test_accuracy", "train_accuracy", "seconds"):
        assert key in s, f"summary lacks {key!r}: {sorted(s)}"
    assert 0.0 <= s["train_accuracy"] <= 1.0
    assert s["test_accuracy"] > 0.5, s  # ten classes: chance is 0.1


@pytest.mark.slow
def test_digits_vit_smoke(capsys):
    s = _run("digits_vit", ["--smoke", "--json"], capsys)
    for key in ("test_accuracy", "train_accuracy", "num_params", "seconds"):
        assert key in s, f"summary lacks {key!r}: {sorted(s)}"
    assert s["num_params"] == 136_138 and s["steps"] == 6 * 22  # 22 full batches of 64 per epoch
    assert 0.0 <= s["train_accuracy"] <= 1.0
    assert s["test_accuracy"] > 0.4, s  # ten classes: chance is 0.1


@pytest.mark.slow
def test_digits_diffusion_smoke(capsys):
    s = _run("digits_diffusion", ["--smoke", "--json"], capsys)
    for key in ("eval_loss_init", "eval_loss", "sample_accuracy", "classifier_test_accuracy", "seconds"):
        assert key in s, f"summary lacks {key!r}: {sorted(s)}"
    # The untrained (zero-output) model scores mean(noise^2) ~ 1 on the fixed test draw; 60 steps
    # of denoising training must cut that by more than half.
    assert abs(s["eval_loss_init"] - 1.0) < 0.1, s
    assert s["eval_loss"] < 0.5 * s["eval_loss_init"], s
    assert s["num_samples"] == 50 and 0.0 <= s["sample_accuracy"] <= 1.0
    assert s["classifier_test_accuracy"] > 0.9, s  # the judge of the samples is a good classifier


@pytest.mark.slow
def test_finetune_lora_smoke(tmp_path, capsys):
    s = _run("finetune_lora", ["--smoke", "--json", "--out", str(tmp_path / "run")], capsys)
    # The adapters learn the new domain, the merged model and the reloaded adapters compute
    # the same function (1e-4 on a loss of ~4 nats), and the adapter file is a small fraction.
    assert s["lora_prose_val_loss"] < s["base_prose_val_loss"]
    assert abs(s["merged_prose_val_loss"] - s["lora_prose_val_loss"]) < 1e-4
    assert s["reloaded_prose_val_loss"] == s["lora_prose_val_loss"]
    assert 0 < s["adapter_params"] < s["num_params"] / 5
    assert s["adapter_file_bytes"] < s["model_file_bytes"] / 4


@pytest.mark.slow
def test_char_moe_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    s = _run("char_moe", ["--smoke", "--json", "--out", str(out)], capsys)
    for key in ("dense", "moe", "unigram_loss", "flops_ratio", "val_loss_moe_minus_dense", "seconds", "sample"):
        assert key in s, f"summary lacks {key!r}: {sorted(s)}"
    assert s["steps"] == 40
    dense, moe = s["dense"], s["moe"]
    for name, r in (("dense", dense), ("moe", moe)):
        for key in ("train_loss", "val_loss", "initial_val_loss", "tokens_per_s", "train_seconds"):
            assert math.isfinite(r[key]), (name, key, r[key])
        # Both learn: from ~ln(vocab) at init to well below it, and below the frequency baseline.
        assert r["val_loss"] < r["initial_val_loss"] - 1.0, (name, r)
        assert r["val_loss"] < s["unigram_loss"], (name, r, s["unigram_loss"])
        assert [step for step, _ in r["val_curve"]] == [20, 40]
        assert (out / f"{name}.jsonl").is_file()
    # Matched active compute: the MoE's active parameters and FLOPs exceed the dense model's only
    # by its routers; it holds more parameters in all.
    assert dense["num_active_params"] == dense["num_params"]
    assert moe["num_active_params"] < moe["num_params"]
    assert 1.0 <= s["flops_ratio"] < 1.02, s["flops_ratio"]
    assert abs(s["val_loss_moe_minus_dense"] - (moe["val_loss"] - dense["val_loss"])) < 1e-12
    # Router statistics: a fraction dropped, a load balance of at least ~k (k is uniform; it is
    # at most num_experts), and every layer's assignment fractions summing to one.
    for key in ("moe_dropped", "val_moe_dropped"):
        assert 0.0 <= moe[key] < 1.0, (key, moe[key])
    for key in ("moe_load_balance", "val_moe_load_balance"):
        assert math.isfinite(moe[key]) and 0.95 * moe["experts_per_token"] <= moe[key] <= moe["num_experts"], (key, moe[key])
    assert moe["capacity"] == math.ceil(1.25 * 64 * moe["experts_per_token"] / moe["num_experts"])
    fractions = moe["expert_fractions"]
    assert len(fractions) == len(moe["experts_used"]) == len(moe["dropped_by_layer"]) == 2
    for row, used in zip(fractions, moe["experts_used"], strict=True):
        assert len(row) == moe["num_experts"] and abs(sum(row) - 1.0) < 1e-3
        assert used == sum(f > 0 for f in row) and 1 <= used <= moe["num_experts"]
    assert all(0.0 <= d < 1.0 for d in moe["dropped_by_layer"])
    assert isinstance(s["sample"], str) and s["sample"].startswith("def ")


def test_examples_docs_and_tests_check_types_with_one_checker():
    """Every example, the getting-started page and the tests' pytest options install the same
    typechecker: beartype with PEP 484's numeric tower (an int passes where a float is
    annotated, `rope_theta=500000`), so the examples check what the tests check."""
    root = EXAMPLES.parent
    checker = "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"
    for path in sorted(EXAMPLES.glob("*.py")):
        text = path.read_text()
        if "install_import_hook" in text:
            assert f'install_import_hook("eqzoo", "{checker}")' in text, path.name
    assert f"--jaxtyping-packages=eqzoo,{checker} " in (root / "pyproject.toml").read_text()
    assert f'TYPECHECKER = "{checker}"' in (root / "docs" / "getting-started.md").read_text()
    assert sum("install_import_hook" in p.read_text() for p in EXAMPLES.glob("*.py")) >= 13


def test_the_typechecking_hook_takes_an_int_where_a_float_is_annotated():
    # Under plain beartype (no numeric tower) `rope_theta=500000`, as Llama 3's config.json
    # writes it, was refused before eqzoo's own checks ran; shapes are still checked.
    from jaxtyping import TypeCheckError

    from eqzoo import models, nn

    assert models.LlamaConfig(rope_theta=500000).rope_theta == 500000
    with pytest.raises(TypeCheckError):
        nn.RMSNorm(8)(jax.numpy.ones((3,), jax.numpy.int32))
