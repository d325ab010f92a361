"""What the throughput benchmarks record, run in this process at tiny sizes: the options a run
was given (so `benchmarks/gpu_suite.py` rows that differ only in a `--set` override can be told
apart in its JSONL) and the partial line printed once the step has compiled (which the suite
keeps when a row is killed before its timed steps end)."""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # their `from _throughput import ...`
    spec = importlib.util.spec_from_file_location(f"_under_test_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes weak types, as the scripts run it
        yield


def _json_lines(text: str) -> list[dict]:
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]


def test_train_throughput_records_its_overrides_and_warmup(monkeypatch, capsys):
    bench = _load("train_throughput", monkeypatch)
    result = bench.main(["--preset", "tiny-gpt2", "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1",
                         "--precision", "fp32", "--set", "num_layers=1", "--set", "remat=full", "--json"])
    assert result["overrides"] == {"num_layers": 1, "remat": "full"}
    assert result["warmup"] == 1 and result["remat"] == "full"
    partial, last = _json_lines(capsys.readouterr().out)
    assert partial["partial"] == "compiled" and partial["compile_s"] > 0
    assert last["overrides"] == result["overrides"]


def test_image_throughput_records_its_overrides_and_prints_its_compile_time_first(monkeypatch, capsys):
    bench = _load("image_throughput", monkeypatch)
    result = bench.main(["--preset", "tiny-vit", "--batch", "2", "--steps", "1", "--warmup", "1",
                         "--precision", "fp32", "--set", "num_layers=1", "--json"])
    assert result["overrides"] == {"num_layers": 1} and result["warmup"] == 1
    partial, last = _json_lines(capsys.readouterr().out)
    assert partial == {"benchmark": "image_throughput", "partial": "compiled", "preset": "tiny-vit",
                       "backend": result["backend"], "device": result["device"], "compile_s": result["compile_s"]}
    assert last["images_per_s"] == result["images_per_s"]
