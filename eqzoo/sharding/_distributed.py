"""Multi-host start-up: `jax.distributed.initialize` with arguments resolved from the environment."""

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from ._errors import ShardingError

# eqzoo's own names first, then JAX's spelling of the same variables.
_STANDARD = {
    "coordinator_address": ("COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("PROCESS_ID", "JAX_PROCESS_ID"),
}
_LOCAL_DEVICES = ("LOCAL_DEVICE_IDS", "JAX_LOCAL_DEVICE_IDS")
_SLURM_REQUIRED = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")
_SLURM_NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
    """What [`eqzoo.sharding.initialize`][] used (or would use) to join a multi-process run.

    **Fields:**

    - `coordinator_address`: `"host:port"` of process 0's coordinator, `None` for one process.
    - `num_processes`, `process_id`: how many processes, and this one's index.
    - `local_device_ids`: the local devices this process drives, or `None` for all of them.
    - `source`: where the values came from: `"arguments"`, `"env"` (`COORDINATOR_ADDRESS`,
      `NUM_PROCESSES`, `PROCESS_ID`, or their `JAX_` forms), `"slurm"`, a `+`-joined mix when
      arguments override part of the environment, or `"single-process"` when nothing was found.
    """

    coordinator_address: str | None
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None
    source: str = "arguments"

    @property
    def multi_process(self) -> bool:
        """Whether there is more than one process (so `jax.distributed` must be initialised)."""
        return self.num_processes > 1


def _first(env: Mapping[str, str], names: Sequence[str]) -> tuple[str, str] | None:
    for name in names:
        value = env.get(name)
        if value is not None and value.strip() != "":
            return name, value.strip()
    return None


def _as_int(value: Any, what: str, source: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ShardingError(f"{what} must be an integer; got {value!r} from {source}.") from None


def _device_ids(value: Any, source: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, int):
        value = [value]
    return tuple(_as_int(v, "local_device_ids", source) for v in value)


def slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `"node[001-004,007],gpu9"` -> `"node001"`."""
    match = re.match(r"^([^,\[]*)(\[([^\]]*)\])?", nodelist.strip())
    if match is None or not (match.group(1) or match.group(3)):
        raise ShardingError(f"cannot read the SLURM node list {nodelist!r}.")
    prefix, ranges = match.group(1), match.group(3)
    if ranges is None:
        return prefix
    first = re.split(r"[,-]", ranges)[0]
    return prefix + first


def _from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], str | None]:
    found = {k: _first(env, names) for k, names in _STANDARD.items()}
    present = {k: v for k, v in found.items() if v is not None}
    if present:
        missing = [_STANDARD[k][0] for k in _STANDARD if k not in present]
        if missing:
            have = ", ".join(v[0] for v in present.values())
            raise ShardingError(
                f"the environment sets {have} but not {', '.join(missing)}; set all of "
                "COORDINATOR_ADDRESS, NUM_PROCESSES and PROCESS_ID (or pass them to "
                "eqzoo.sharding.initialize)."
            )
        values: dict[str, Any] = {
            "coordinator_address": present["coordinator_address"][1],
            "num_processes": _as_int(present["num_processes"][1], "num_processes", present["num_processes"][0]),
            "process_id": _as_int(present["process_id"][1], "process_id", present["process_id"][0]),
        }
        local = _first(env, _LOCAL_DEVICES)
        if local is not None:
            values["local_device_ids"] = _device_ids(local[1], local[0])
        return values, "env"
    if all(name in env for name in _SLURM_REQUIRED):
        nodelist = _first(env, _SLURM_NODELISTS)
        if nodelist is None:
            raise ShardingError(
                f"SLURM job detected but none of {list(_SLURM_NODELISTS)} is set; pass "
                "coordinator_address explicitly."
            )
        if "COORDINATOR_PORT" in env:
            port = _as_int(env["COORDINATOR_PORT"], "COORDINATOR_PORT", "COORDINATOR_PORT")
        else:  # the same port jax.distributed's own SLURM detection derives from the job id
            port = _as_int(env["SLURM_JOB_ID"], "SLURM_JOB_ID", "SLURM_JOB_ID") % 2**12 + (65535 - 2**12 + 1)
        values = {
            "coordinator_address": f"{slurm_first_host(nodelist[1])}:{port}",
            "num_processes": _as_int(env["SLURM_NTASKS"], "num_processes", "SLURM_NTASKS"),
            "process_id": _as_int(env["SLURM_PROCID"], "process_id", "SLURM_PROCID"),
        }
        return values, "slurm"
    return {}, None


def resolve_distributed_args(
    env: Mapping[str, str] | None = None,
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
) -> DistributedArgs:
    """Work out the arguments of `jax.distributed.initialize` without connecting to anything.

    Explicit arguments win; the rest come from the environment: `COORDINATOR_ADDRESS`,
    `NUM_PROCESSES`, `PROCESS_ID` (optionally `LOCAL_DEVICE_IDS`; each also accepted with a
    `JAX_` prefix), else a SLURM job (`SLURM_JOB_ID`, `SLURM_NTASKS`, `SLURM_PROCID` and the
    node list: the coordinator is the first node, on `COORDINATOR_PORT` or a port derived from
    the job id as JAX does). With none of these it is a single process.

    **Arguments:**

    - `env`: the environment to read (default `os.environ`); pass a dict to test.
    - `coordinator_address`, `num_processes`, `process_id`, `local_device_ids`: as for
      `jax.distributed.initialize`.

    **Returns:** a [`eqzoo.sharding.DistributedArgs`][].

    **Raises:** [`eqzoo.sharding.ShardingError`][] for a partial environment, non-integer
    values, a malformed `host:port`, or `process_id` outside `[0, num_processes)`.
    """
    env = os.environ if env is None else env
    values, source = _from_env(env)
    explicit = {
        k: v
        for k, v in {
            "coordinator_address": coordinator_address,
            "num_processes": num_processes,
            "process_id": process_id,
            "local_device_ids": _device_ids(local_device_ids, "arguments"),
        }.items()
        if v is not None
    }
    if explicit:
        source = "arguments" if source is None or set(explicit) >= set(values) else f"arguments+{source}"
    values.update(explicit)
    if source is None:
        return DistributedArgs(None, 1, 0, values.get("local_device_ids"), "single-process")
    n = values.get("num_processes")
    pid = values.get("process_id", 0 if n == 1 else None)
    address = values.get("coordinator_address")
    if n is None or pid is None or (address is None and n > 1):
        missing = [k for k in ("coordinator_address", "num_processes", "process_id") if values.get(k) is None]
        raise ShardingError(
            f"initialize needs coordinator_address, num_processes and process_id; {missing} "
            "were neither passed nor found in the environment (COORDINATOR_ADDRESS, "
            "NUM_PROCESSES, PROCESS_ID, or a SLURM job)."
        )
    if n < 1 or not 0 <= pid < n:
        raise ShardingError(
            f"need num_processes >= 1 and 0 <= process_id < num_processes; got num_processes={n}, "
            f"process_id={pid} (from {source})."
        )
    if address is not None and not re.fullmatch(r"\[?[\w.\-:]+\]?:\d+", address):
        raise ShardingError(
            f"coordinator_address must be 'host:port' (e.g. 'node001:1234'); got {address!r} "
            f"(from {source})."
        )
    return DistributedArgs(address, n, pid, values.get("local_device_ids"), source)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    env: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> DistributedArgs:
    """Join a multi-process (multi-host) JAX run with `jax.distributed.initialize`.

    Call it once per process, before anything else touches JAX devices. Arguments not given
    are read from the environment (see [`eqzoo.sharding.resolve_distributed_args`][]). With one
    process (nothing set) it does nothing, so the same script runs on a laptop. Afterwards
    `jax.devices()` lists every process's devices: build the mesh over all of them with
    [`eqzoo.sharding.make_mesh`][], load each process's slice of the data (eqzoo loaders do this
    by `jax.process_index()`), and assemble global batches with
    [`eqzoo.sharding.make_global_batch`][].

    **Arguments:**

    - `coordinator_address`: `host:port` of process 0.
    - `num_processes`: how many processes take part.
    - `process_id`: this process's index, in `[0, num_processes)`.
    - `local_device_ids`: the local devices this process uses (an id or a sequence of ids;
      default: every local device).
    - `env`: the environment to read what is not given (default `os.environ`); pass a dict to
      test.
    - `**kwargs`: passed on to `jax.distributed.initialize` (e.g. `initialization_timeout`).

    **Returns:** the [`eqzoo.sharding.DistributedArgs`][] used.
    """
    args = resolve_distributed_args(
        env,
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    if args.multi_process and not jax.distributed.is_initialized():
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
            local_device_ids=list(args.local_device_ids) if args.local_device_ids is not None else None,
            **kwargs,
        )
    return args
