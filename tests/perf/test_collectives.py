"""eqzoo.perf.collectives: the collectives of compiled programs on 8 CPU devices, with their
loop trip counts, and the HLO forms a GPU build prints (async starts, unknown trip counts)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from eqzoo import perf, sharding as sh
from eqzoo._errors import ConfigError


def _rows():
    mesh = sh.make_mesh("data=8")
    return jax.device_put(jnp.ones((8, 64)), NamedSharding(mesh, P("data")))


def _scan_program(x, trips=5, inner=None):
    def f(x):
        def body(c, _):
            if inner is not None:  # a loop inside the loop: its collective runs trips * inner times
                c = jax.lax.fori_loop(0, inner, lambda i, c: c + jnp.tanh(x * c).sum(0), c)
            return c + jnp.tanh(x * c).sum(0), None  # a sum over the sharded rows, every trip

        c, _ = jax.lax.scan(body, jnp.ones((64,)), None, length=trips)
        return c + x.sum(0)  # and one outside any loop

    return jax.jit(f).lower(x).compile()


def test_counts_collectives_with_their_loop_trips():
    found = perf.collectives(_scan_program(_rows()))
    assert sorted((c.kind, c.count, c.in_loop, c.bytes) for c in found) == [
        ("all-reduce", 1, False, 64 * 4),
        ("all-reduce", 5, True, 64 * 4),
    ]
    assert all(c.exact for c in found)
    summary = perf.collective_summary(found)
    assert summary["all-reduce"]["ops"] == 6 and summary["all-reduce"]["in_loop_ops"] == 5
    assert summary["total"]["mib"] == round(6 * 256 / 2**20, 3)
    assert perf.collective_summary(_scan_program(_rows())) == summary  # from the program itself


def test_nested_loops_multiply_their_trip_counts():
    found = perf.collectives(_scan_program(_rows(), trips=3, inner=4))
    assert sorted(c.count for c in found) == [1, 3, 3 * 4]


def test_a_single_device_program_has_none():
    assert perf.collectives(jax.jit(lambda x: x.sum(0)).lower(jnp.ones((8, 64))).compile()) == []
    assert perf.collective_summary([]) == {}


_GPU_STYLE = """HloModule jit_step, entry_computation_layout={(f32[64]{0})->f32[512]{0}}

%body (p: (s32[], f32[512])) -> (s32[], f32[512]) {
  %p = (s32[], f32[512]{0}) parameter(0)
  %x = f32[512]{0} get-tuple-element(%p), index=1
  %ars = f32[512]{0} all-reduce-start(%x), replica_groups={{0,1}}, to_apply=%add
  %ard = f32[512]{0} all-reduce-done(%ars)
  ROOT %t = (s32[], f32[512]{0}) tuple(%i, %ard)
}

%cond (p: (s32[], f32[512])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main (a: f32[64]) -> f32[512] {
  %a = f32[64]{0} parameter(0)
  %ags = (f32[64]{0}, bf16[512]{0}) all-gather-start(%a), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %agd = bf16[512]{0} all-gather-done(%ags)
  %w = (s32[], f32[512]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[512]{0} get-tuple-element(%w), index=1
}
"""


def test_async_starts_and_unknown_trip_counts():
    # An async all-gather start returns (operand, result): only the gathered bf16[512] counts.
    # The loop has no known trip count: counted once, and marked inexact.
    found = {c.kind: c for c in perf.collectives(_GPU_STYLE)}
    assert set(found) == {"all-gather", "all-reduce"}
    assert found["all-gather"].bytes == 512 * 2 and not found["all-gather"].in_loop
    assert found["all-reduce"].bytes == 512 * 4
    assert found["all-reduce"].in_loop and found["all-reduce"].count == 1 and not found["all-reduce"].exact


def test_errors_name_the_fix():
    lowered = jax.jit(lambda x: x.sum()).lower(jnp.ones(4))
    with pytest.raises(ConfigError, match=r"needs the compiled \(optimised\) HLO.*\.compile\(\)"):
        perf.collectives(lowered)
    with pytest.raises(ConfigError, match="takes a compiled program .* got int"):
        perf.collectives(3)
    with pytest.raises(ConfigError, match="no ENTRY computation"):
        perf.collectives("HloModule m\n")


_ASYNC_AND_BRANCHES = """HloModule m

%on_true (a: f32[16]) -> f32[16] {
  %a = f32[16]{0} parameter(0)
  ROOT %ar = f32[16]{0} all-reduce(%a), replica_groups={{0,1}}, to_apply=%add
}

%on_false (a: f32[16]) -> f32[16] {
  ROOT %a = f32[16]{0} parameter(0)
}

ENTRY %main (x: f32[16], p: pred[]) -> f32[2] {
  %x = f32[16]{0} parameter(0)
  %rss = (f32[16]{0}, f32[2]{0}) reduce-scatter-start(%x), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
  %rsd = f32[2]{0} reduce-scatter-done(%rss)
  %a2a = ((f32[16]{0}, f32[16]{0}), (f32[16]{0}, f32[16]{0})) all-to-all-start(%x, %x), replica_groups={{0,1}}
  %c = f32[16]{0} conditional(%p, %x, %x), true_computation=%on_true, false_computation=%on_false
  ROOT %r = f32[2]{0} get-tuple-element(%rss), index=1
}
"""


def test_async_results_not_operands_and_branches_marked_inexact():
    found = {c.kind: c for c in perf.collectives(_ASYNC_AND_BRANCHES)}
    assert found["reduce-scatter"].bytes == 2 * 4 and found["reduce-scatter"].shape.startswith("f32[2]")
    assert found["all-to-all"].bytes == 2 * 16 * 4  # the two results, not operands + results
    branch = found["all-reduce"]  # inside one branch of a conditional: it may not run
    assert branch.count == 1 and not branch.exact and not branch.in_loop
    assert found["reduce-scatter"].exact
