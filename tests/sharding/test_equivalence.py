"""Sharded training computes what one device computes: losses and gradients under data, FSDP,
tensor, context and combined sharding within 1e-5 (fp32) of a single device, for GPT-2, Llama, Mixtral
and Gemma; remat
policies change nothing; a sharded train step keeps the state's layout and donates it."""

import equinox as eqx
import jax
import numpy as np
import optax
import pytest

from eqzoo import sharding as sh
from eqzoo.train import TrainState, lm_loss, make_train_step

MESHES = {
    "data": "data=8",
    "fsdp": "fsdp=8",
    "tensor": "data=2,tensor=4",
    "fsdp_tensor": "data=2,fsdp=2,tensor=2",
    # context parallelism: each sequence of 16 split in 4 (2) pieces along its length
    "context": "data=2,context=4",
    "context_fsdp_tensor": "fsdp=2,context=2,tensor=2",
}
TOL = 1e-5  # fp32: the sharded program sums in a different order, nothing more


# Every model on every mesh but the context ones, where each model's own position handling is
# covered once: GPT-2 (learned positions) and Mixtral (dense experts per position) on
# data x context, Gemma (sliding windows, soft caps) on context with FSDP and tensor
# parallelism, Llama (RoPE, packed documents) in test_context.py's train step (CI time: each
# case compiles two steps).
CONTEXT_CASES = {("gpt2", "context"), ("mixtral", "context"), ("gemma", "context_fsdp_tensor")}
CASES = [
    (model, mesh)
    for mesh in MESHES
    for model in ("gpt2", "llama", "mixtral", "gemma")
    if not mesh.startswith("context") or (model, mesh) in CONTEXT_CASES
]


@pytest.mark.parametrize(("model_name", "mesh_name"), CASES, ids=[f"{m}-{n}" for m, n in CASES])
def test_loss_and_grads_match_single_device(lab, model_name, mesh_name):
    ref_loss, ref_grads, _ = lab.loss_and_grads(model_name, None)
    loss, grads, model = lab.loss_and_grads(model_name, MESHES[mesh_name])
    assert abs(float(loss) - float(ref_loss)) < TOL
    assert lab.max_abs_diff(grads, ref_grads) < TOL
    assert not all(p.sharding.is_fully_replicated for p in jax.tree.leaves(eqx.filter(model, eqx.is_array))) or mesh_name in ("data", "context")  # weights replicated


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch", "minimal"])
def test_remat_policies_change_nothing_under_sharding(lab, remat):
    mesh = MESHES["fsdp_tensor"]
    ref_loss, ref_grads, _ = lab.loss_and_grads("gpt2", mesh)
    loss, grads, _ = lab.loss_and_grads("gpt2", mesh, remat=remat)
    assert abs(float(loss) - float(ref_loss)) < 1e-6
    assert lab.max_abs_diff(grads, ref_grads) < 1e-6


def _run(step, state, batch, n):
    losses = []
    for _ in range(n):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_sharded_train_step_matches_and_keeps_layout(lab):
    optimizer = optax.sgd(0.1, momentum=0.9)
    make_state = lambda k: TrainState.create(lab.build_model("llama", k), optimizer, key=k)  # noqa: E731
    batch = lab.make_batch()

    ref_state, ref_losses = _run(
        make_train_step(lm_loss, optimizer, donate=False), make_state(jax.random.key(1)), batch, 3
    )

    mesh = sh.make_mesh(MESHES["fsdp_tensor"])
    state = sh.sharded_init(make_state, jax.random.key(1), mesh=mesh)
    layout = [a.sharding for a in state.arrays]
    step = make_train_step(lm_loss, optimizer, mesh=mesh)
    first = state.arrays[0]
    sharded_batch = sh.shard_batch(batch, mesh)
    state, losses = _run(step, state, sharded_batch, 1)

    compiles = []

    def listener(event, secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        state, more = _run(step, state, sharded_batch, 2)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []  # the pinned layout is a fixed point: no recompilation

    np.testing.assert_allclose(losses + more, ref_losses, rtol=0, atol=TOL)
    assert lab.max_abs_diff(state.arrays, ref_state.arrays) < TOL
    assert [a.sharding for a in state.arrays] == layout  # pinned: stays sharded step after step
    assert first.is_deleted()  # the input state was donated


def test_train_step_with_mesh_needs_a_placed_state(lab):
    optimizer = optax.sgd(0.1)
    state = TrainState.create(lab.make_model("gpt2"), optimizer, key=jax.random.key(1))
    mesh = sh.make_mesh("data=8")
    step = make_train_step(lm_loss, optimizer, mesh=mesh, donate=False)
    with pytest.raises(Exception, match=r"needs a state whose arrays are all placed on that mesh.*shard_state"):
        step(state, sh.shard_batch(lab.make_batch(), mesh))
