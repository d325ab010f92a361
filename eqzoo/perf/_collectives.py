"""The collectives of a compiled program, read from its optimised HLO, weighted by loop trips.

What a sharded step communicates is decided by XLA's partitioner; the compiled HLO says what it
chose. Compiling for fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`)
gives the same partitioning decisions as on GPUs, so the communication volume of a step can be
checked, and regressions caught, on a laptop.
"""

import re
from typing import Any, NamedTuple

from .._errors import ConfigError

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
"""The HLO collective operations [`eqzoo.perf.collectives`][] reports."""

_HEADER = re.compile(r"^(?:ENTRY\s+)?(%?[\w.\-]+)\s.*\{\s*$")
_OP = re.compile(
    r"=\s*(?P<shape>.*?)\s(?P<kind>" + "|".join(COLLECTIVE_KINDS) + r")(?P<start>-start)?\("
)
_WHILE = re.compile(r"\swhile\(.*?body=(%?[\w.\-]+)")
_TRIPS = re.compile(r"known_trip_count\W+n\W+(\d+)")
_CALLEES = re.compile(r"(?:condition|calls|to_apply)=(%?[\w.\-]+)|called_computations=\{([^}]*)\}")
# A conditional runs one of its branches: they are counted as if each ran, marked inexact.
_BRANCHES = re.compile(r"(?:true_computation|false_computation)=(%?[\w.\-]+)|branch_computations=\{([^}]*)\}")
_ARRAY = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64|c64|c128)\[([\d,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32,
         "s64": 64, "u64": 64, "f8e4m3fn": 8, "f8e5m2": 8, "bf16": 16, "f16": 16, "f32": 32,
         "f64": 64, "c64": 64, "c128": 128}


class Collective(NamedTuple):
    """One collective operation of a compiled program.

    - `kind`: one of [`eqzoo.perf.COLLECTIVE_KINDS`][].
    - `shape`: its result shape as HLO prints it, e.g. `f32[512,64]{1,0}`.
    - `bytes`: bytes of that result on one device (for an all-gather the gathered array, for a
      reduce-scatter one device's piece).
    - `count`: how many times one run of the program executes it: the product of the trip
      counts of the loops around it (1 outside any loop).
    - `computation`: the HLO computation holding it.
    - `in_loop`: whether it sits inside a `while` loop (a `lax.scan`, `fori_loop`, ...).
    - `exact`: `False` when a loop around it has no trip count known to XLA (then that loop
      counts once), or when it sits in a branch of a conditional (each branch is counted as if
      it ran).
    """

    kind: str
    shape: str
    bytes: int
    count: int
    computation: str
    in_loop: bool
    exact: bool


def _split_top(shape: str) -> list[str]:
    # "(a, (b, c))" -> ["a", "(b, c)"]; a non-tuple shape -> [shape]
    shape = shape.strip()
    if not shape.startswith("("):
        return [shape]
    parts, depth, cur = [], 0, ""
    for ch in shape[1:-1]:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _nbytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BITS[dtype] // 8
    return total


def _result_shape(kind: str, start: bool, shape: str) -> str:
    # An async start of an all-gather, reduce-scatter, all-to-all or collective-permute returns
    # (operands, results, ...): the results are the second element. An async all-reduce start
    # returns the reduced arrays themselves (a tuple when it reduces several).
    if start and kind != "all-reduce":
        parts = _split_top(shape)
        if len(parts) >= 2:
            return parts[1]
    return shape


def _hlo_text(program: Any) -> str:
    if isinstance(program, str):
        return program
    as_text = getattr(program, "as_text", None)
    if as_text is None:
        raise ConfigError(
            f"collectives() takes a compiled program (`jax.jit(f).lower(...).compile()`) or its "
            f"HLO text; got {type(program).__name__}."
        )
    text = as_text()
    if "HloModule" not in text:
        raise ConfigError(
            "collectives() needs the compiled (optimised) HLO, where XLA has placed the "
            "collectives: call `.compile()` on the lowered program first."
        )
    return text


def collectives(program: Any) -> list[Collective]:
    """Every collective of a compiled program, with how often one run executes it.

    **Arguments:**

    - `program`: a `jax.stages.Compiled` (`jax.jit(f).lower(*args).compile()`, or
      `eqzoo.train.make_train_step(...).lower(state, batch).compile()`) or its HLO text.

    **Returns:** a list of [`eqzoo.perf.Collective`][], in program order.

    **Raises:** `ConfigError` (a `ValueError`) for a lowered but uncompiled program (its StableHLO has
    no collectives yet) or another object.
    """
    bodies, entry = _computations(_hlo_text(program))
    calls = {n: [call for line in lines for call in _calls(line)] for n, lines in bodies.items()}
    found: list[Collective] = []
    _visit(entry, bodies, calls, found, count=1, in_loop=False, exact=True)
    return found


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
    """Each computation's body lines, by name, and the ENTRY computation's name."""
    bodies: dict[str, list[str]] = {}
    entry, name = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            name = header.group(1)
            bodies[name] = []
            if line.startswith("ENTRY"):
                entry = name
        elif name is not None:
            bodies[name].append(line)
    if entry is None:
        raise ConfigError("collectives(): no ENTRY computation found in the HLO text.")
    return bodies, entry


_Call = tuple[str, int, bool, bool]  # (callee, trips, is a loop body, count known)


def _calls(line: str) -> list[_Call]:
    """The computations one HLO instruction calls: a `while`'s body with its trip count (1 and
    not known when XLA knows none), then its other callees, a conditional's branches not known."""
    out: list[_Call] = []
    w = _WHILE.search(line)
    if w:
        trips = _TRIPS.search(line)
        out.append((w.group(1), int(trips.group(1)) if trips else 1, True, trips is not None))
    for pattern, known in ((_CALLEES, True), (_BRANCHES, False)):
        for single, many in pattern.findall(line):
            for callee in [single] if single else [c.strip() for c in many.split(",")]:
                if callee:
                    out.append((callee, 1, False, known))
    return out


def _visit(
    name: str, bodies: dict[str, list[str]], calls: dict[str, list[_Call]], found: list[Collective], *,
    count: int, in_loop: bool, exact: bool,
) -> None:
    """Append the collectives of computation `name` to `found`, then its callees', depth first.
    The call graph of an HLO module is acyclic; a computation called from two places is visited
    (and counted) once per call site."""
    if name not in bodies:
        return
    for line in bodies[name]:
        m = _OP.search(line)
        if m:
            kind, start = m.group("kind"), bool(m.group("start"))
            shape = _result_shape(kind, start, m.group("shape").strip())
            found.append(Collective(kind, shape, _nbytes(shape), count, name, in_loop, exact))
    for callee, trips, is_loop, known in calls[name]:
        _visit(callee, bodies, calls, found, count=count * trips, in_loop=in_loop or is_loop, exact=exact and known)


def collective_summary(program: Any | list[Collective]) -> dict[str, dict[str, int | float]]:
    """Per collective kind: operations and MiB per run of the program, in and outside loops.

    **Arguments:**

    - `program`: as for [`eqzoo.perf.collectives`][], or the list it returned.

    **Returns:** `{kind: {"ops", "mib", "in_loop_ops", "in_loop_mib"}}` for each kind present,
    plus `"total"`; `ops` counts executions (an op in a loop of 8 trips counts 8), `mib` is
    `bytes * count / 2**20` summed (result bytes on one device).
    """
    items = list(program) if isinstance(program, (list, tuple)) else collectives(program)
    out: dict[str, dict[str, int | float]] = {}
    for c in items:
        for key in (c.kind, "total"):
            row = out.setdefault(key, {"ops": 0, "mib": 0.0, "in_loop_ops": 0, "in_loop_mib": 0.0})
            row["ops"] += c.count
            row["mib"] += c.bytes * c.count / 2**20
            if c.in_loop:
                row["in_loop_ops"] += c.count
                row["in_loop_mib"] += c.bytes * c.count / 2**20
    for row in out.values():
        row["mib"] = round(row["mib"], 3)
        row["in_loop_mib"] = round(row["in_loop_mib"], 3)
    return out
