"""Multi-host start-up arguments (resolved without connecting), per-host batch slicing, and a
real 2-process run on this machine through jax.distributed."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import eqzoo
from eqzoo import sharding as sh


def test_explicit_arguments_win():
    args = sh.resolve_distributed_args(
        {"COORDINATOR_ADDRESS": "a:1", "NUM_PROCESSES": "4", "PROCESS_ID": "3"},
        coordinator_address="head:1234", num_processes=2, process_id=1,
    )
    assert args == sh.DistributedArgs("head:1234", 2, 1, None, "arguments")
    assert args.multi_process


def test_standard_environment_variables():
    env = {"COORDINATOR_ADDRESS": "10.0.0.1:8476", "NUM_PROCESSES": "2", "PROCESS_ID": "1", "LOCAL_DEVICE_IDS": "0,1"}
    assert sh.resolve_distributed_args(env) == sh.DistributedArgs("10.0.0.1:8476", 2, 1, (0, 1), "env")
    jax_env = {"JAX_COORDINATOR_ADDRESS": "head:9", "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "0"}
    assert sh.resolve_distributed_args(jax_env) == sh.DistributedArgs("head:9", 8, 0, None, "env")
    mixed = sh.resolve_distributed_args(env, process_id=0)
    assert (mixed.process_id, mixed.num_processes, mixed.source) == (0, 2, "arguments+env")


def test_slurm():
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
        "SLURM_STEP_NODELIST": "gpu[017-018]",
    }
    args = sh.resolve_distributed_args(env)
    port = 4242 % 4096 + 61440  # what jax.distributed's own SLURM detection picks
    assert args == sh.DistributedArgs(f"gpu017:{port}", 2, 1, None, "slurm")
    assert sh.resolve_distributed_args({**env, "COORDINATOR_PORT": "1234"}).coordinator_address == "gpu017:1234"
    assert sh.slurm_first_host("node001") == "node001"
    assert sh.slurm_first_host("node[003,007-009],login1") == "node003"
    assert sh.slurm_first_host("a1,b2") == "a1"


def test_single_process_does_not_connect():
    args = sh.initialize(env={})
    assert args == sh.DistributedArgs(None, 1, 0, None, "single-process")
    assert not args.multi_process and not jax.distributed.is_initialized()
    assert sh.initialize(num_processes=1, env={}).num_processes == 1


@pytest.mark.parametrize(
    "env, kwargs, match",
    [
        ({"COORDINATOR_ADDRESS": "h:1"}, {}, r"sets COORDINATOR_ADDRESS but not NUM_PROCESSES, PROCESS_ID"),
        ({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "two", "PROCESS_ID": "0"}, {}, r"num_processes must be an integer; got 'two' from NUM_PROCESSES"),
        ({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "2"}, {}, r"0 <= process_id < num_processes; got num_processes=2, process_id=2"),
        ({}, {"coordinator_address": "head", "num_processes": 2, "process_id": 0}, r"must be 'host:port'.*got 'head'"),
        ({}, {"num_processes": 2}, r"\['coordinator_address', 'process_id'\] were neither passed nor found"),
        ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, {}, r"SLURM job detected but none of"),
    ],
)
def test_bad_distributed_arguments(env, kwargs, match):
    with pytest.raises(sh.ShardingError, match=match):
        sh.resolve_distributed_args(env, **kwargs)


def test_per_host_batch_slices_assemble_into_the_global_batch():
    tokens = (np.arange(5000) % 97).astype(np.int32)
    make = lambda i, n: eqzoo.data.TokenLoader(tokens, batch_size=16, seq_len=8, seed=3, process_index=i, process_count=n)  # noqa: E731
    whole = make(0, 1).batch_at(5)
    # Four "hosts", two devices each: every host loads a distinct quarter of the global batch...
    slices = [make(i, 4).batch_at(5) for i in range(4)]
    np.testing.assert_array_equal(np.concatenate([s["tokens"] for s in slices]), whole["tokens"])
    # ...and the mesh puts exactly those rows on that host's devices (data is the outermost
    # axis, so the devices of one process hold one contiguous block of the batch).
    mesh = sh.make_mesh("data=4,tensor=2")
    batch = sh.make_global_batch(whole, mesh)
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), whole["tokens"])
    assert batch["tokens"].sharding.spec == sh.BATCH_SPEC
    host_of = {d: i // 2 for i, d in enumerate(jax.devices())}
    for shard in batch["tokens"].addressable_shards:
        host = host_of[shard.device]
        np.testing.assert_array_equal(np.asarray(shard.data), slices[host]["tokens"][:, shard.index[1]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(lab):
    worker = Path(__file__).with_name("_multihost_worker.py")
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "COORDINATOR_ADDRESS": f"localhost:{port}",
            "NUM_PROCESSES": "2",
            "PROCESS_ID": str(pid),
        }
        procs.append(subprocess.Popen([sys.executable, str(worker)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))

    # The same program in this one process (8 devices, whole batches).
    import importlib.util

    spec = importlib.util.spec_from_file_location("_multihost_worker_ref", worker)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ref = module.run()

    for i, out in enumerate(outs):
        assert (out["process_index"], out["process_count"], out["source"]) == (i, 2, "env")
        assert (out["devices"], out["local_devices"], out["local_rows"]) == (8, 4, 8)
        np.testing.assert_allclose(out["losses"], ref["losses"], rtol=0, atol=1e-5)
    assert ref["local_rows"] == 16
