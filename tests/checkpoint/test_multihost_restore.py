"""Restores on a real 2-process run (jax.distributed on localhost, CPU, one device per process),
with arrays split over both processes so that each reads only its own half of their files
(tests/checkpoint/_multihost_restore.py runs every scenario in one pair of processes):
changed `inject_hyperparams` values, a step damaged in a part only process 0 reads, a restore
that fails in process 0 only for a reason that is not damage, and what only process 0 does.
Processes that took different ways (one restoring a step the other found damaged) would drift
apart and hang or fail at the worker's next barrier; here the run is then killed at the
deadline, and every test fails."""

import importlib.util
import re
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_multihost_restore.py")
DEADLINE_S = 90  # a hang fails here; the run takes ~20 s on 2 loaded cores
WEIGHT = "model.net.layers.0.weight"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    """Both processes' summaries, `[process 0's, process 1's]`."""
    spec = importlib.util.spec_from_file_location("_two_processes", WORKER.with_name("_two_processes.py"))
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    outs = harness.finish({"restore": harness.start(WORKER, str(tmp_path_factory.mktemp("multihost")))}, DEADLINE_S)["restore"]
    assert [out["process"] for out in outs] == [0, 1]
    return outs


@pytest.mark.slow
def test_hyperparams_reconciled_on_every_process(runs):
    # The learning rate is replicated over both processes and the step sizes split over them:
    # neither process holds either whole, and comparing or printing them reads the whole.
    for out in runs:
        got = out["hyperparams"]
        for case in ("same", "changed", "target", "named"):
            assert "error" not in got[case], got[case]
            assert got[case]["split"] and got[case]["matches"], (case, got[case])
        assert (got["same"]["learning_rate"], got["same"]["step_size"], got["same"]["warnings"]) == (pytest.approx(0.1, rel=1e-7), [1, 1], [])
        assert (got["changed"]["learning_rate"], got["changed"]["step_size"]) == (pytest.approx(0.1, rel=1e-7), [1, 1])
        [warning] = got["changed"]["warnings"]
        assert "values differ from the saved ones in 2 hyperparameter(s):" in warning
        assert "opt_state.0.hyperparams.step_size: saved [1. 1.], target [1.  0.5]" in warning
        assert re.search(r"opt_state.1.hyperparams.learning_rate: saved 0.1\d*, target 0.05\d*", warning), warning
        assert (got["target"]["learning_rate"], got["target"]["step_size"], got["target"]["warnings"]) == (pytest.approx(0.05, rel=1e-7), [1, 0.5], [])
        assert (got["named"]["learning_rate"], got["named"]["step_size"], got["named"]["warnings"]) == (pytest.approx(0.02, rel=1e-7), [1, 1], [])


@pytest.mark.slow
def test_damage_in_one_process_shards_is_damage_for_every_process(runs):
    first, second = (out["damage"] for out in runs)
    # Without fallback: both raise, process 0 naming the parameter, process 1 naming process 0.
    for got in (first, second):
        assert got["plain"]["error"] == "CheckpointCorruptError" and got["plain"]["steps"] == [5, 10], got["plain"]
        assert "Earlier committed steps: [5]" in got["plain"]["message"]
    assert f"reading the arrays failed for parameter(s) ['{WEIGHT}']" in first["plain"]["message"]
    assert "process(es) [0] found it damaged in the parts of its arrays they read" in second["plain"]["message"]
    # With fallback_to_intact: both move step 10 aside (to one place) and restore step 5.
    for got in (first, second):
        assert "error" not in got["fallback"], got["fallback"]
        assert got["fallback"]["step"] == 5 and got["fallback"]["matches"] and got["fallback"]["steps"] == [5]
        [moved] = got["fallback"]["moved"]
        [warning] = got["fallback"]["warnings"]
        assert "restored step 5, the newest intact step, because step(s) [10] are damaged (moved aside to ['" in warning
        assert warning.split("moved aside to ['")[1].split("'")[0].endswith(f"/{moved}"), warning
        # and train on from step 5, saving step 10 again.
        assert got["saved_again"] == {"steps": [5, 10], "matches": True}


@pytest.mark.slow
def test_a_failure_in_one_process_that_is_not_damage_raises_in_every_process(runs):
    first, second = (out["not_damage"] for out in runs)
    # Process 0 restores into a wider model; process 1 into the saved one.
    assert first["wrong_target"]["error"] == "CheckpointMismatchError"
    assert "model.net.layers.0.weight: expected float32(16, 4), found float32(8, 4)" in first["wrong_target"]["message"]
    # Process 0 runs out of memory reading.
    assert first["out_of_memory"]["error"] == "CheckpointError"
    assert "so the step is intact (it was not moved aside): RESOURCE_EXHAUSTED" in first["out_of_memory"]["message"]
    for case in ("wrong_target", "out_of_memory"):
        assert second[case]["error"] == "CheckpointError", second[case]
        assert re.match(r"step 10 in .*: restoring it failed in process\(es\) \[0\] \(their errors say why: it is not "
                        r"damage, so the step was not moved aside\)\. .* so none goes on", second[case]["message"])
        assert first[case]["steps"] == second[case]["steps"] == [5, 10]  # with fallback_to_intact: nothing moved


@pytest.mark.slow
def test_a_damaged_step_that_process_zero_cannot_move_aside_raises_in_every_process(runs):
    first, second = (out["not_damage"]["move_fails"] for out in runs)
    assert first["error"] == "OSError", first
    assert second["error"] == "CheckpointError", second
    assert re.match(r"process 0 could not move the damaged step 10 aside in .* \(its error says why\); move .*/10 out of "
                    r".* by hand, then restore again\.", second["message"]), second
    assert first["steps"] == second["steps"] == [5, 10]


@pytest.mark.slow
def test_what_only_process_zero_does(runs):
    first, second = (out["process_zero_only"] for out in runs)
    # Save reports (progress=) come from process 0 only.
    assert [re.sub(r"[\d.]+s", "Ns", line.split(" to /")[0]) for line in first["progress"]] == [
        "checkpoint: saving step 10", "checkpoint: step 10 committed, Ns after its save began"]
    assert second["progress"] == []
    # The leftover of an unfinished save is deleted at the first save (by process 0), and the
    # step saved restores.
    for got in (first, second):
        assert got["steps"] == [10] and got["left"] == ["10"] and got["matches"], got
