"""One process of a 2-process CPU run that saves and restores (run by test_multihost_restore.py,
not collected).

    COORDINATOR_ADDRESS=localhost:PORT NUM_PROCESSES=2 PROCESS_ID=i python _multihost_restore.py DIR

Joins with eqzoo.sharding.initialize() (one CPU device per process) and runs each scenario of
`SCENARIOS` in its own directory under DIR, both processes together. Every array whose first
dimension is even is split in two along it, one half on each process, so each process reads
only its own half of such an array's files; the others are replicated. A scenario's result, or
the error it raised, goes into the JSON summary on the last stdout line; after each scenario
the processes meet at a barrier named for it, so processes that have drifted apart (one still
restoring while the other went on) fail or hang there.
"""

import io
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eqzoo import checkpoint, models, sharding as sh, train
from eqzoo.checkpoint._integrity import write_manifest

CONFIG = models.MLPConfig(in_features=4, out_features=2, width=8, depth=1)
WEIGHT = "model.net.layers.0.weight"  # (8, 4): rows 0-3 on process 0, rows 4-7 on process 1


def optimizer(learning_rate: float, step_size: tuple[float, float] = (1.0, 1.0)):
    """SGD with an injected learning rate (a scalar, replicated) after a scaling by an injected
    vector (one entry per process, split over them), chained."""
    return optax.chain(
        optax.inject_hyperparams(optax.scale)(step_size=np.asarray(step_size, np.float32)),
        optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate),
    )


def host_state(seed: int, learning_rate: float = 0.1, step_size=(1.0, 1.0)) -> train.TrainState:
    """A state whose float arrays of two dimensions or more hold random values drawn on the host
    (the same in every process), each array on this process's one device."""
    state = train.TrainState.create(models.create(CONFIG, key=jax.random.key(seed)), optimizer(learning_rate, step_size), key=jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jax.numpy.asarray(rng.standard_normal(x.shape).astype(np.float32))
        if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) and x.ndim > 1 else x,
        state,
    )


def placement(mesh: Mesh):
    """`shardings=` for `restore`: the first dimension split over both processes where it is
    even, else replicated."""
    def where(name, leaf):
        even = leaf.ndim and leaf.shape[0] % 2 == 0 and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        return NamedSharding(mesh, P("x") if even else P())
    return where


def spread(state: train.TrainState, mesh: Mesh) -> train.TrainState:
    """`state` (the same on every process) as global arrays placed by `placement`."""
    where = placement(mesh)

    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(x))
            data = jax.make_array_from_callback(data.shape, NamedSharding(mesh, P()), lambda i: data[i])
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, where("", x), lambda i: host[i])

    return jax.tree.map(one, state)


def matches(restored: train.TrainState, expected: train.TrainState) -> bool:
    """Whether every shard this process holds equals that part of `expected` (host arrays)."""
    arrays = lambda tree: jax.tree.leaves(eqx.filter(tree, eqx.is_array))  # noqa: E731
    for got, want in zip(arrays(restored), arrays(expected), strict=True):
        if jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key):
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        want = np.asarray(want)
        for shard in got.addressable_shards:
            if not np.array_equal(np.asarray(shard.data), want[shard.index]):
                return False
    return True


def local(x) -> float:
    """One local copy of a replicated scalar, as a float."""
    return float(np.asarray(x.addressable_data(0)))


def both_at(name: str) -> None:
    multihost_utils.sync_global_devices(f"eqzoo test: {name}")


def save(directory: Path, mesh: Mesh, states: dict[int, train.TrainState], **kwargs) -> None:
    with checkpoint.Checkpointer(directory, handle_signals=False, **kwargs) as ckpt:
        for step, state in states.items():
            ckpt.save(spread(state, mesh), step=step)


def restore(directory: Path, mesh: Mesh, target, **kwargs) -> dict:
    """Restore with `kwargs` (`Checkpointer`'s and `restore`'s), placed by `placement`; the
    outcome: the step and the warnings, or the error."""
    restore_keys = {"step", "hyperparams"}
    opts = {k: v for k, v in kwargs.items() if k not in restore_keys}
    with warnings.catch_warnings(record=True) as caught, checkpoint.Checkpointer(directory, handle_signals=False, **opts) as ckpt:
        warnings.simplefilter("always")
        try:
            restored = ckpt.restore(target, shardings=placement(mesh), **{k: v for k, v in kwargs.items() if k in restore_keys})
        except Exception as err:
            return {"error": type(err).__name__, "message": str(err), "steps": ckpt.all_steps()}
        return {"step": restored.meta.step, "restored": restored, "warnings": [str(w.message) for w in caught], "steps": ckpt.all_steps()}


def hyperparams(directory: Path, mesh: Mesh) -> dict:
    """A resumed run whose `inject_hyperparams` values changed (and one where they did not): the
    learning rate is replicated over both processes and the step sizes split over them, so no
    process holds either whole."""
    saved = host_state(0, learning_rate=0.1)
    save(directory, mesh, {2: saved})
    changed = host_state(1, learning_rate=0.05, step_size=(1.0, 0.5))
    cases = {
        "same": restore(directory, mesh, host_state(1, learning_rate=0.1)),
        "changed": restore(directory, mesh, changed),
        "target": restore(directory, mesh, changed, hyperparams="target"),
        "named": restore(directory, mesh, checkpoint.abstract_state(CONFIG, optimizer(0.1)), hyperparams={"learning_rate": 0.02}),
    }
    out = {}
    for name, got in cases.items():
        if "error" in got:
            out[name] = got
            continue
        scale, sgd = got["restored"].state.opt_state[:2]
        lr, step_size = sgd.hyperparams["learning_rate"], scale.hyperparams["step_size"]
        params = got["restored"].state.model.net.layers[0].weight
        out[name] = {
            "learning_rate": local(lr), "step_size": multihost_utils.process_allgather(step_size, tiled=True).tolist(),
            "split": not lr.is_fully_addressable and {s.data.shape for s in step_size.addressable_shards} == {(1,)}
            and {s.data.shape for s in params.addressable_shards} == {(4, 4)},
            "matches": matches(got["restored"].state.model, saved.model),
            "warnings": got["warnings"],
        }
    return out


def damage_first_half(directory: Path, step: int) -> None:
    """Truncate the file of `WEIGHT`'s first half (rows 0-3, which only process 0 reads) in
    `step`, then take the checksums again: damage done before they were taken."""
    chunk = directory / str(step) / "state" / WEIGHT / "0.0"
    chunk.write_bytes(chunk.read_bytes()[:-5])
    write_manifest(directory / str(step) / "state")


def damage(directory: Path, mesh: Mesh) -> dict:
    """Step 10's first half of `WEIGHT` (the rows only process 0 reads) is damaged after its
    checksum was taken, so only process 0's read of the step fails."""
    states = {5: host_state(5), 10: host_state(10)}
    save(directory, mesh, states)
    if jax.process_index() == 0:
        damage_first_half(directory, 10)
    both_at("damaged")
    target = checkpoint.abstract_state(CONFIG, optimizer(0.1))
    plain = restore(directory, mesh, target)
    both_at("restored without fallback")
    fallback = restore(directory, mesh, target, fallback_to_intact=True)
    out = {"plain": {k: v for k, v in plain.items() if k != "restored"}}
    if "error" in fallback:
        return {**out, "fallback": fallback}
    out["fallback"] = {
        "step": fallback["step"], "matches": matches(fallback["restored"].state, states[fallback["step"]]),
        "warnings": fallback["warnings"], "steps": fallback["steps"],
        "moved": sorted(p.name for p in directory.glob("corrupt-*")),
    }
    both_at("restored with fallback")
    # Training goes on from step 5 and saves step 10 again, in every process.
    save(directory, mesh, {10: states[10]})
    with checkpoint.Checkpointer(directory, handle_signals=False) as ckpt:
        again = ckpt.restore(target, shardings=placement(mesh))
        out["saved_again"] = {"steps": ckpt.all_steps(), "matches": matches(again.state, states[10])}
    return out


def not_damage(directory: Path, mesh: Mesh) -> dict:
    """A restore that fails on process 0 only, for a reason that is not damage: its target is of
    another model (a wider MLP), or reading runs out of memory there."""
    save(directory, mesh, {5: host_state(5), 10: host_state(10)})
    good = checkpoint.abstract_state(CONFIG, optimizer(0.1))
    wider = checkpoint.abstract_state(models.MLPConfig(in_features=4, out_features=2, width=16, depth=1), optimizer(0.1))
    out = {"wrong_target": restore(directory, mesh, wider if jax.process_index() == 0 else good, fallback_to_intact=True)}
    both_at("wrong target")
    # Running out of device memory (XLA's RESOURCE_EXHAUSTED, which a CPU run cannot provoke)
    # in process 0 only: its reads raise it here.
    from eqzoo.checkpoint import _restore

    read = _restore._read_arrays

    def exhausted(*args, **kwargs):
        if jax.process_index() == 0:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB.")
        return read(*args, **kwargs)

    _restore._read_arrays = exhausted
    try:
        out["out_of_memory"] = restore(directory, mesh, good, fallback_to_intact=True)
    finally:
        _restore._read_arrays = read
    both_at("out of memory")
    # Step 10 damaged where process 0 reads, and its move aside fails there: every name it could
    # be moved to in the next minute is taken by a directory that is not empty.
    if jax.process_index() == 0:
        damage_first_half(directory, 10)
        for stamp in range(int(time.time()) - 5, int(time.time()) + 60):
            (directory / f"corrupt-10-{stamp}" / "taken").mkdir(parents=True)
    both_at("moves blocked")
    out["move_fails"] = restore(directory, mesh, good, fallback_to_intact=True)
    for got in out.values():
        got.pop("restored", None)
    return out


def process_zero_only(directory: Path, mesh: Mesh) -> dict:
    """What only process 0 does: report saves (`progress=`), and delete the leftovers of saves
    that never committed, at the first save."""
    if jax.process_index() == 0:
        (directory / "7.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    both_at("leftover made")
    stream = io.StringIO()
    save(directory, mesh, {10: host_state(10)}, progress=stream)
    both_at("saved")
    with checkpoint.Checkpointer(directory, handle_signals=False) as ckpt:
        restored = ckpt.restore(checkpoint.abstract_state(CONFIG, optimizer(0.1)), shardings=placement(mesh))
        steps = ckpt.all_steps()
    return {
        "progress": stream.getvalue().splitlines(), "steps": steps,
        "left": sorted(p.name for p in directory.iterdir()), "matches": matches(restored.state, host_state(10)),
    }


SCENARIOS = {"hyperparams": hyperparams, "damage": damage, "not_damage": not_damage, "process_zero_only": process_zero_only}


def main() -> None:
    root = Path(sys.argv[1])
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(SCENARIOS)
    jax.config.update("jax_num_cpu_devices", 1)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sh.initialize(initialization_timeout=60)
    mesh = Mesh(np.array(jax.devices()), ("x",))
    out: dict = {"process": jax.process_index()}
    for name in only:
        began = time.perf_counter()
        try:
            out[name] = SCENARIOS[name](root / name, mesh)
        except Exception as err:
            out[name] = {"error": type(err).__name__, "message": str(err), "traceback": traceback.format_exc()[-2000:]}
        out[name]["seconds"] = round(time.perf_counter() - began, 2)
        print(f"process {jax.process_index()}: {name} done in {out[name]['seconds']} s", file=sys.stderr, flush=True)
        both_at(f"after {name}")
    print(json.dumps(out, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
