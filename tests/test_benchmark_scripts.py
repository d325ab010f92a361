"""The CI drivers' own logic, which `make test` only ever sees succeed: `benchmarks/gpu_suite.py`
(row order, `--only`, budget skipping, failure and timeout records, the table) and
`scripts/_run_scripts.py` (what counts as a failed script). No JAX runs here; the rows are
tiny `python -c` programs."""

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_under_test_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


suite = _load(ROOT / "benchmarks" / "gpu_suite.py")
runner = _load(ROOT / "scripts" / "_run_scripts.py")

GPU_ROWS = [
    "gpt2-124m",
    "gpt2-124m-fp8",
    "equinox-baseline",
    "generate",
    "llama-1b",
    "torch-baseline",
    "gpt2-124m-unrolled",
    "gpt2-124m-xla-attention",
    "gpt2-124m-full-logits",
    "gpt2-124m-no-eqzoo-flags",
    "gpt2-124m-cublas-gemm",
    "gpt2-124m-remat-dots",
    "llama-1b-b4-no-remat",
    "gpt2-124m-loss-chunk-512",
    "generate-scan-layers",
    "generate-int8",
    "generate-int4",
    "generate-long",
    "generate-long-int8-cache",
    "generate-long-prefill-via-decode",
    "vit-b16",
    "dit-xl2",
    "mixtral-1l-capacity",
    "mixtral-1l-dense",
    "mixtral-1l-ragged",
    "gpt2-124m-packed-8",
    "generate-mixtral-2l",
    "generate-mixtral-2l-all-experts",
    "speculative",
    "continuous-batching",
    "gemma3-1b",
    "gemma2-2b",
]


def _row(name, code, timeout_s=30.0):
    return suite.Row(name, ("-c", code), timeout_s)


def test_list_prints_the_rows_in_priority_order(capsys):
    assert suite.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == GPU_ROWS
    first = lines[0].split("\t")
    assert first[1] == "150s"
    assert first[2].endswith(
        "benchmarks/train_throughput.py --preset gpt2-124m --batch 16 --seq 1024 --steps 20 "
        "--warmup 3 --json"
    )
    assert lines[GPU_ROWS.index("generate")].split("\t")[1] == "200s"
    for name, script, extra in (("equinox-baseline", "equinox_baseline", ""),
                                ("torch-baseline", "torch_baseline", " --require-cuda")):
        cells = lines[GPU_ROWS.index(name)].split("\t")
        assert cells[1] == "150s"
        assert cells[2].endswith(
            f"benchmarks/{script}.py --batch 16 --seq 1024 --steps 20 --warmup 3{extra} --json"
        )


def test_rows_differ_from_the_default_row_only_as_named():
    rows = {r.name: r for r in suite.ROWS}
    base = rows["gpt2-124m"].argv
    assert rows["gpt2-124m-fp8"].argv == (*base, "--fp8")
    assert rows["gpt2-124m-unrolled"].argv == (*base, "--scan", "false")
    assert rows["gpt2-124m-xla-attention"].argv == (*base, "--attention", "xla")
    assert rows["gpt2-124m-full-logits"].argv == (*base, "--loss", "full")
    assert rows["gpt2-124m-remat-dots"].argv == (*base, "--remat", "dots_no_batch")
    assert rows["gpt2-124m-no-eqzoo-flags"].argv == base
    assert rows["gpt2-124m-cublas-gemm"].argv == base
    assert rows["generate-int8"].argv == (*rows["generate"].argv, "--quantize", "int8")
    assert rows["generate-int4"].argv == (*rows["generate"].argv, "--quantize", "int4", "--group-size", "128")
    assert rows["generate-long-int8-cache"].argv == (*rows["generate-long"].argv, "--cache-dtype", "int8")
    assert rows["generate-long-prefill-via-decode"].argv == (*rows["generate-long"].argv, "--prefill-via-decode")
    assert suite.row_env(rows["gpt2-124m-no-eqzoo-flags"], {}) == {"EQZOO_XLA_FLAGS": "0"}


def test_xla_flags_are_appended_to_the_callers():
    row = {r.name: r for r in suite.ROWS}["gpt2-124m-cublas-gemm"]
    flag = "--xla_gpu_enable_triton_gemm=false"
    assert suite.row_env(row, {}) == {"XLA_FLAGS": flag}
    assert suite.row_env(row, {"XLA_FLAGS": "--xla_dump_to=/tmp/d "}) == {
        "XLA_FLAGS": f"--xla_dump_to=/tmp/d {flag}"
    }
    assert suite.command_line(row, {}).startswith(f"XLA_FLAGS={flag} ")


def test_only_keeps_priority_order_and_names_the_rows_on_a_typo():
    picked = suite.select(suite.ROWS, "generate,gpt2-124m")
    assert [r.name for r in picked] == ["gpt2-124m", "generate"]
    with pytest.raises(SystemExit, match=r"unknown row\(s\) \['gpt2'\]; the rows are \['gpt2-124m'"):
        suite.select(suite.ROWS, "gpt2")


def test_budget_skips_rows_that_do_not_fit_and_runs_later_ones_that_do(tmp_path):
    ran = []

    def fake_runner(row, timeout_s):
        ran.append((row.name, timeout_s))
        return {"status": "ok", "row": row.name, "wall_s": 0.0}

    rows = [_row("a", "", 10.0), _row("too-long", "", 100.0), _row("b", "", 10.0)]
    out = tmp_path / "suite.jsonl"
    records = suite.run_suite(rows, out=out, total_budget_s=50.0, timeout_scale=2.0,
                              runner=fake_runner, log=lambda s: None)
    assert ran == [("a", 20.0), ("b", 20.0)]
    assert [r["status"] for r in records] == ["ok", "skipped", "ok"]
    assert "timeout 200s > total budget 50s" in records[1]["reason"]
    written = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert written == records and len({r["run_id"] for r in written}) == 1


def test_rows_keep_going_past_a_failure_and_a_timeout(tmp_path):
    rows = [
        _row("ok", "import json; print('log line'); print(json.dumps({'tokens_per_s': 5.0}))"),
        _row("crash", "import sys; print('boom', file=sys.stderr); sys.exit(3)"),
        _row("no-json", "print('not json')"),
        _row("hang", "import time; time.sleep(60)", timeout_s=1.0),
        _row("loss-rose", "import json, sys; print(json.dumps({'step_ms': 1.0})); sys.exit(1)"),
    ]
    out = tmp_path / "suite.jsonl"
    records = suite.run_suite(rows, out=out, log=lambda s: None)
    by_name = {r["row"]: r for r in records}
    assert [r["status"] for r in records] == ["ok", "failed", "failed", "timeout", "failed"]
    assert by_name["ok"]["tokens_per_s"] == 5.0 and by_name["ok"]["rc"] == 0
    assert "stderr_tail" not in by_name["ok"]
    assert by_name["crash"]["rc"] == 3 and "boom" in by_name["crash"]["stderr_tail"]
    assert by_name["hang"]["wall_s"] < 10
    assert by_name["loss-rose"]["step_ms"] == 1.0  # figures of a failed row are kept
    assert len(out.read_text().splitlines()) == 5


def test_a_row_interrupted_by_a_signal_is_recorded_with_what_it_printed(tmp_path, monkeypatch):
    # SIGTERM from an outer `timeout` (here SIGALRM, handled the same way): the row is killed,
    # its JSON printed so far is kept (the driver runs rows unbuffered, whatever the caller's
    # environment says), and no later row starts.
    import signal

    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)

    rows = [
        _row("first", "import json; print(json.dumps({'tokens_per_s': 1.0}))"),
        _row("slow", "import json, time; print(json.dumps({'compile_s': 2.5})); time.sleep(60)"),
        _row("never", "print('{}')"),
    ]
    out = tmp_path / "suite.jsonl"
    previous = signal.signal(signal.SIGALRM, suite._raise_interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 3.0)
        records = suite.run_suite(rows, out=out, log=lambda s: None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert [r["status"] for r in records] == ["ok", "interrupted"]
    assert records[1]["compile_s"] == 2.5 and records[1]["wall_s"] < 30
    assert len(out.read_text().splitlines()) == 2


def test_preflight_retries_without_eqzoo_xla_flags():
    calls = []

    def fake_runner(row, timeout_s):
        calls.append(dict(row.env))
        if row.env:  # EQZOO_XLA_FLAGS=0: JAX starts
            return {"row": row.name, "status": "ok", "backend": "gpu"}
        return {"row": row.name, "status": "failed", "rc": -6, "stderr_tail": "Unknown flags in XLA_FLAGS"}

    record = suite.preflight(fake_runner)
    assert calls == [{}, {"EQZOO_XLA_FLAGS": "0"}]
    assert record["status"] == "ok" and record["eqzoo_xla_flags_dropped"]
    assert "Unknown flags" in record["with_eqzoo_xla_flags"]["stderr_tail"]
    calls.clear()
    assert "eqzoo_xla_flags_dropped" not in suite.preflight(lambda row, t: calls.append(1) or {"status": "ok"})
    assert calls == [1]
    calls.clear()  # a start that timed out is not tried again: it would spend another 120 s of the budget
    assert suite.preflight(lambda row, t: calls.append(1) or {"status": "timeout"})["status"] == "timeout"
    assert calls == [1]


@pytest.mark.parametrize("found, code", [
    ({"status": "ok", "backend": "cpu"}, 2),
    ({"status": "failed", "rc": 1}, 2),
    ({"status": "ok", "backend": "gpu", "eqzoo_xla_flags_dropped": True}, 0),
])
def test_the_preflight_stops_the_suite_before_rows_that_cannot_run(tmp_path, monkeypatch, capsys, found, code):
    ran = []
    monkeypatch.setattr(suite, "preflight", lambda: {"row": "preflight", **found})
    monkeypatch.setattr(suite, "run_row", lambda row, t: ran.append(row.name) or {"row": row.name, "status": "ok"})
    monkeypatch.setenv("EQZOO_XLA_FLAGS", "1")  # restored after the test
    out = tmp_path / "suite.jsonl"
    monkeypatch.setattr(suite, "run_suite", lambda rows, **kw: [
        {"run_id": "x", **suite.run_row(r, 1.0)} for r in rows[:1]])
    assert suite.main(["--out", str(out), "--json"]) == code
    first = json.loads(out.read_text().splitlines()[0])
    assert first["row"] == "preflight"
    if code == 2:
        assert ran == [] and "error" in json.loads(capsys.readouterr().out.splitlines()[-1])
    else:
        assert ran == ["gpt2-124m"] and suite.os.environ["EQZOO_XLA_FLAGS"] == "0"
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["preflight"]["eqzoo_xla_flags_dropped"]


def test_table_has_a_line_per_generation_batch():
    records = [
        {"row": "gpt2-124m", "status": "ok", "tokens_per_s": 123456.7, "step_ms": 132.7,
         "mfu": 0.4567, "peak_memory_gib": 21.5, "compile_s": 31.25},
        {"row": "generate", "status": "ok", "results": [
            {"batch": 1, "tokens_per_s": 400.0, "ms_per_token": 2.5, "first_call_s": 9.0},
            {"batch": 64, "tokens_per_s": 20000.0, "ms_per_token": 3.2, "first_call_s": 11.0}]},
        {"row": "llama-1b", "status": "skipped"},
        {"row": "vit-b16", "status": "ok", "images_per_s": 3210.4, "step_ms": 79.7, "mfu": 0.5,
         "peak_memory_gib": 30.0, "compile_s": 20.0},
        {"row": "speculative", "status": "ok", "greedy_tokens_per_s": 1000.0, "speculative": [
            {"num_draft": 4, "tokens_per_s": 1800.0, "speedup": 1.8, "same_tokens": True}]},
        {"row": "continuous-batching", "status": "ok", "static": {"tokens_per_s": 500.0}, "continuous": {
            "steps_per_call=8": {"tokens_per_s": 900.0, "speedup": 1.8, "same_tokens": True}}},
    ]
    lines = suite.markdown_table(records).splitlines()
    assert lines[7] == "| speculative (greedy, no draft) | 1,000 | - | - | - | - | ok |"
    assert lines[8] == "| speculative (num_draft 4, x1.80) | 1,800 | - | - | - | - | ok |"
    assert lines[9] == "| continuous-batching (static batches) | 500 | - | - | - | - | ok |"
    assert lines[10] == "| continuous-batching (steps_per_call=8, x1.80) | 900 | - | - | - | - | ok |"
    assert lines[2] == "| gpt2-124m | 123,457 | 132.7 | 45.7% | 21.50 | 31.2 | ok |"
    assert lines[3] == "| generate (batch 1) | 400 | 2.50 | - | - | 9.0 | ok |"
    assert lines[4].startswith("| generate (batch 64) | 20,000 |")
    assert lines[5] == "| llama-1b | - | - | - | - | - | skipped |"
    assert lines[6] == "| vit-b16 (images/s) | 3,210 | 79.7 | 50.0% | 30.00 | 20.0 | ok |"


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_scripts_fails_on_a_bad_exit_a_missing_json_line_or_a_timeout(tmp_path, capsys, jobs):
    scripts = {
        "good": "import json; print('x'); print(json.dumps({'a': 1}))\n",
        "bad_exit": "import json, sys; print(json.dumps({})); sys.exit(2)\n",
        "no_json": "print('done')\n",
        "slow": "import time; time.sleep(60)\n",
    }
    paths = []
    for name, code in scripts.items():
        (tmp_path / f"{name}.py").write_text(code)
        paths.append(tmp_path / f"{name}.py")
    assert runner.run_scripts(paths[:1], [], noun="things") == 0
    assert runner.run_scripts(paths, ["--smoke"], noun="things", timeout=2.0, jobs=jobs) == 1
    out = capsys.readouterr().out
    assert "ok   good.py" in out
    assert "FAIL bad_exit.py" in out and "FAIL no_json.py" in out and "FAIL slow.py" in out
    assert "no_json.py: last stdout line is not a JSON summary" in out
    assert "slow.py: timed out after 2s" in out
    assert out.splitlines()[-1] == "1 passed, 3 failed"
    assert runner.run_scripts([], [], noun="things") == 1
    assert "no things found" in capsys.readouterr().err


def test_run_scripts_starts_the_costliest_first_in_the_given_environment(tmp_path, capsys):
    # One at a time, each script appends its name and $RUN_MARK to a file: the start order is
    # the costs' descending order, a script missing from `costs` counting as DEFAULT_COST, ties
    # by name; every script sees `env`.
    log = tmp_path / "order.txt"
    names = ["a_cheap", "b_unknown", "c_dear", "d_unknown", "e_dearest"]
    for name in names:
        (tmp_path / f"{name}.py").write_text(
            f"import json, os\nwith open({str(log)!r}, 'a') as f: f.write({name!r} + os.environ['RUN_MARK'] + '\\n')\n"
            "print(json.dumps({}))\n"
        )
    costs = {"a_cheap": 1.0, "c_dear": 30.0, "e_dearest": 90.0}
    env = {**os.environ, "RUN_MARK": "-m"}
    assert runner.run_scripts([tmp_path / f"{n}.py" for n in names], [], noun="things", costs=costs, env=env) == 0
    assert log.read_text().split() == ["e_dearest-m", "c_dear-m", "b_unknown-m", "d_unknown-m", "a_cheap-m"]
    assert capsys.readouterr().out.splitlines()[-1] == "5 passed, 0 failed"


def test_scripts_compile_like_the_suite_unless_the_caller_chose_a_setting():
    level, emitters = "--xla_backend_optimization_level", "--xla_cpu_use_fusion_emitters"
    both = f"{level}=0 {emitters}=false"
    assert runner.fast_compile_env({"A": "1"}) == {"A": "1", "XLA_FLAGS": both}
    assert runner.fast_compile_env({"XLA_FLAGS": "--xla_dump_to=/tmp/d"})["XLA_FLAGS"] == f"--xla_dump_to=/tmp/d {both}"
    assert runner.fast_compile_env({"XLA_FLAGS": f"{level}=2"}) == {"XLA_FLAGS": f"{level}=2 {emitters}=false"}
    assert runner.fast_compile_env({"XLA_FLAGS": f"{emitters}=true"}) == {"XLA_FLAGS": f"{emitters}=true {level}=0"}
    # this pytest process got them too (tests/conftest.py)
    assert f"{level}=" in os.environ["XLA_FLAGS"] and f"{emitters}=" in os.environ["XLA_FLAGS"]


def test_examples_left_to_the_test_suite_are_run_by_it():
    # `make test` skips these in scripts/run_examples.py: a test must run each one's main with
    # --smoke (a name dropped from the tests would otherwise never run at all).
    import ast  # run_examples.py imports its neighbour _run_scripts by name: read, not imported

    tree = ast.parse((ROOT / "scripts" / "run_examples.py").read_text())
    names = next(
        {elt.value for elt in node.value.args[0].elts}
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "RUN_IN_TESTS"
    )
    assert names and all((ROOT / "examples" / f"{n}.py").exists() for n in names)
    sources = [p.read_text() for p in (ROOT / "tests").rglob("test_*.py")]
    for name in names:
        # a test file that loads the example by name and calls main with --smoke (the loaders
        # in tests/examples and tests/sciml, tests/bayes take the name and call .main([...]))
        called = re.compile(rf'(_run|_load_example)\("{name}"')
        assert any(called.search(src) and "main(" in src and '"--smoke"' in src for src in sources), (
            f"no test runs examples/{name}.py"
        )


def test_memory_estimate_refuses_a_mesh_it_cannot_lay_out(monkeypatch):
    # Checked before JAX starts (the fake devices are set up only after): a mesh larger than
    # --devices, and an axis without its size.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its `from _throughput import ...`
    estimate = _load(ROOT / "benchmarks" / "memory_estimate.py")
    with pytest.raises(SystemExit, match=r"--mesh data=2,context=8 takes 16 devices; --devices is 8: raise it"):
        estimate.main(["--mesh", "data=2", "--mesh", "data=2,context=8"])
    with pytest.raises(SystemExit, match=r"--mesh 'context': write each axis with its size, e.g. --mesh data=2,context=4"):
        estimate.main(["--mesh", "context"])


def test_tiny_rows_are_the_gpu_rows_own_commands_at_tiny_sizes(capsys):
    # --tiny: each GPU row's arguments in order, then the sizes (argparse keeps the last value),
    # for every row: a new script or preset in ROWS without tiny sizes fails here, not on a GPU.
    for row in suite.ROWS:
        tiny = suite.tiny_row(row)
        kept = tuple(a for a in row.argv if a != "--require-cuda")
        assert tiny.argv[: len(kept)] == kept and len(tiny.argv) > len(kept), row.name
        assert (tiny.name, tiny.env, tiny.env_append, tiny.timeout_s) == (
            row.name, row.env, row.env_append, suite.SMOKE_TIMEOUT_S)
        sizes = suite.TINY_ARGS[Path(row.argv[0]).stem]
        if "--preset" in row.argv:
            sizes += suite.TINY_SETS[row.argv[row.argv.index("--preset") + 1]]
        assert tiny.argv[len(kept): len(kept) + len(sizes)] == sizes, row.name
    rows = {r.name: suite.tiny_row(r) for r in suite.ROWS}
    assert "--require-cuda" not in rows["torch-baseline"].argv
    assert rows["generate"].argv[-2:] == ("--layers", "unrolled")  # "auto" on a GPU
    assert "unrolled" not in rows["generate-scan-layers"].argv
    assert rows["generate-long"].argv[-4:-2] == ("--prompt-len", "24")
    with pytest.raises(KeyError, match=r"no --tiny config overrides for preset 'gpt2-1.5b' \(row 'x'\): add them to TINY_SETS"):
        suite.tiny_row(suite.Row("x", ("benchmarks/train_throughput.py", "--preset", "gpt2-1.5b"), 1.0))
    with pytest.raises(KeyError, match=r"no --tiny sizes for benchmarks/new\.py \(row 'x'\): add them to TINY_ARGS"):
        suite.tiny_row(suite.Row("x", ("benchmarks/new.py",), 1.0))
    assert suite.main(["--tiny", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == GPU_ROWS
    assert lines[0].split("\t")[1] == "120s" and "--seq 1024 --steps 20 --warmup 3 --batch 2 --seq 64" in lines[0]
    with pytest.raises(SystemExit):
        suite.main(["--tiny", "--smoke", "--list"])


def test_the_preflight_record_shares_the_rows_run_id(tmp_path, monkeypatch):
    # Runs appended to one file are told apart by run_id: the preflight line (the first of each
    # run) carries its run's.
    monkeypatch.setattr(suite, "preflight", lambda: {"row": "preflight", "status": "ok", "backend": "gpu"})
    real_run_suite = suite.run_suite
    monkeypatch.setattr(suite, "run_suite", lambda rows, **kw: real_run_suite(
        rows, **kw, runner=lambda row, t: {"row": row.name, "status": "ok", "wall_s": 0.0}))
    out = tmp_path / "suite.jsonl"
    for _ in range(2):
        assert suite.main(["--out", str(out), "--only", "gpt2-124m,generate", "--json"]) == 0
    written = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["row"] for r in written] == ["preflight", "gpt2-124m", "generate"] * 2
    assert all(r["run_id"] == written[0]["run_id"] for r in written[:3])
    assert all(r["run_id"] == written[3]["run_id"] for r in written[3:])


def test_the_summary_keeps_every_rows_figures():
    import argparse

    records = [
        {"run_id": "r", "row": "continuous-batching", "status": "ok", "static": {"tokens_per_s": 500.0},
         "continuous": {"steps_per_call=8": {"tokens_per_s": 900.0, "speedup": 1.8, "same_tokens": True, "wall_s": 1.0}}},
        {"run_id": "r", "row": "gpt2-124m", "status": "ok", "tokens_per_s": 1.0, "mfu": 0.5, "compile_s": 2.0},
    ]
    args = argparse.Namespace(smoke=False, tiny=False, total_budget=None, timeout_scale=1.0)
    rows = suite.summary(records, out=Path("x.jsonl"), elapsed_s=1.0, args=args)["rows"]
    assert rows[0]["static_tokens_per_s"] == 500.0
    assert rows[0]["continuous"] == {"steps_per_call=8": {"tokens_per_s": 900.0, "speedup": 1.8, "same_tokens": True}}
    assert rows[1] == {"row": "gpt2-124m", "status": "ok", "wall_s": None, "tokens_per_s": 1.0, "mfu": 0.5,
                       "compile_s": 2.0}
