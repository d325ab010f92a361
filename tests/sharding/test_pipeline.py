"""Pipeline parallelism (a mesh with `stage > 1`): the layer stack split by depth over `stage`
and run as a GPipe schedule of micro-batches gives one device's loss, gradients, per-layer
auxiliary losses and training trajectory (fp32, within 1e-5: only the batching of the products
differs); the stack's parameters are split over `stage` and activations cross stages by
collective-permute, the only communication inside the schedule's loop on a stage x data mesh
(the weight gradients are reduced over `data` once, after it); bad sizes and unsupported
combinations raise clear errors. The same for the circular schedule (`pipeline_repeats=2`),
whose checkpoints keep the natural layer order."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqzoo import perf, sharding as sh
from eqzoo.nn import Stacked
from eqzoo.train import TrainState, lm_loss, make_eval_step, make_train_step

TOL = 1e-5  # fp32: the same per-example arithmetic, batched in micro-batches


def test_stage_splits_the_stacks_parameters(lab):
    # Catches: the rules leaving the layer axis whole (no memory saved).
    def stack_bytes_on_device0(mesh_spec):
        model = sh.shard(lab.make_model("llama"), sh.make_mesh(mesh_spec))
        dev0 = jax.devices()[0]
        return sum(
            s.data.nbytes for x in jax.tree.leaves(eqx.filter(model.blocks, eqx.is_array))
            for s in x.addressable_shards if s.device == dev0
        )

    assert stack_bytes_on_device0("stage=2,data=4") * 2 == stack_bytes_on_device0("data=8")


def test_per_layer_outputs_inputs_and_closures_reach_the_right_layer():
    # A stack of 8 layers whose step reads a per-layer input (xs), a per-example value it
    # closes over, and returns a per-layer output (as Mixtral's router losses come out):
    # micro-batch m's outputs from stage s are read at step m + s. Catches an off-by-one there,
    # per-layer inputs given to the wrong stage, closed-over values of the wrong micro-batch,
    # and the schedule not running (the plain scan needs no collective-permute).
    stack = Stacked(lambda k: eqx.nn.Linear(8, 8, key=k), 8, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 8))
    scale = jnp.arange(1.0, 9.0) / 8
    mesh = sh.make_mesh("stage=4,data=2")  # two layers a stage; on 2 stages a roll either way is the same

    def run(x, scale, mesh=None):
        def one(x, s):
            def step(layer, h, i):
                h = jnp.tanh(layer(h)) * s + 0.1 * i.astype(h.dtype)  # |h| < 2
                return h, jnp.mean(h) + i.astype(h.dtype)  # which layer wrote it, and what it saw

            return stack.apply(step, x, jnp.arange(8, dtype=jnp.int32))

        with sh.activation_sharding(mesh):
            return sh.batch_vmap(one)(x, scale)

    ref = jax.jit(run)(x, scale)
    compiled = jax.jit(run, static_argnums=2).lower(x, scale, mesh).compile()
    assert "collective-permute" in {c.kind for c in perf.collectives(compiled)}  # stage to stage
    got = compiled(x, scale)
    assert ref[1].shape == got[1].shape == (8, 8)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(ref[0]), rtol=0, atol=TOL)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(ref[1]), rtol=0, atol=TOL)


def test_pipelined_train_steps_follow_one_device(lab):
    # Three SGD steps on a mixed mesh (pipeline x FSDP x tensor parallelism) against one
    # device's trajectory, computed with the single-device loss-and-gradient program the other
    # sharding tests compile too (reused: one compile here). Catches the roll reversed (stage s
    # would read stage s+1's output), the output collected one step early or late,
    # micro-batches fed or reassembled in the wrong order, `pipeline_microbatches` not reaching
    # the stack (3 does not divide the batch of 8: the step raises).
    lr = 0.1
    reference = lab.compiled_loss_and_grads("llama", None)
    batch = lab.make_batch()
    model = lab.make_model("llama")
    mesh = sh.make_mesh("stage=2,fsdp=2,tensor=2")
    optimizer = optax.sgd(lr)
    state = sh.shard_state(TrainState.create(model, optimizer, key=jax.random.key(1)), mesh)
    with pytest.raises(sh.ShardingError, match=r"batch of 8 cannot be cut into pipeline_microbatches=3"):
        make_train_step(lm_loss, optimizer, mesh=mesh, pipeline_microbatches=3, donate=False)(state, batch)
    # Four micro-batches of 2 rows, each split over fsdp=2 (the default would pick 4 too).
    step = make_train_step(lm_loss, optimizer, mesh=mesh, pipeline_microbatches=4, donate=False)
    for i in range(3):
        ref_loss, grads = reference(model, batch)
        model = eqx.apply_updates(model, jax.tree.map(lambda g: -lr * g, grads))
        state, metrics = step(state, batch)
        assert abs(float(metrics["loss"]) - float(ref_loss)) < TOL
        if i == 0:  # the parameters moved by lr x the gradient: the gradients agree within TOL
            assert lab.max_abs_diff(state.model, model) < lr * TOL
    assert lab.max_abs_diff(state.model, model) < TOL
    # The stack is split by depth: each stage's devices hold their own layer only.
    q = state.model.blocks.layers.attn.q_proj.weight
    assert q.sharding.spec[0] == "stage" and q.addressable_shards[0].data.shape[0] == 1


def test_only_the_roll_communicates_inside_the_schedule(lab):
    # Pipeline x data parallelism, against one device (loss and gradients within TOL). Inside
    # the schedule's loops only the roll's collective-permutes run. Catches the stage's weight
    # gradients all-reduced over `data` in every step of the backward schedule (weights shared
    # by the data shards rather than a copy each: M + stage - 1 all-reduces of the stage's
    # gradients instead of one), and the last stage's output (or stage 0's input cotangent)
    # moved between stages in every step rather than once after the loop.
    spec = "stage=2,data=4"
    ref_loss, ref_grads, _ = lab.loss_and_grads("llama", None)
    loss, grads, _ = lab.loss_and_grads("llama", spec)
    assert abs(float(loss) - float(ref_loss)) < TOL
    assert lab.max_abs_diff(grads, ref_grads) < TOL
    found = perf.collectives(lab.compiled_loss_and_grads("llama", spec))
    in_loop = sorted({(c.kind, c.shape) for c in found if c.in_loop})
    assert in_loop and {kind for kind, _ in in_loop} == {"collective-permute"}, in_loop


def test_layers_whose_ops_see_the_whole_batch_pipeline(lab):
    # Grouped ("ragged") experts run a shard_map over the whole batch from their batching rule:
    # their layers keep the batch in one vmap, their weights shared by the batch shards.
    # Catches the per-shard weight copies applied to them (JAX: "vmap spmd_axis_name cannot
    # appear in shard_map in_specs").
    model = lab.make_model("mixtral-ragged")
    batch = jax.tree.map(jnp.asarray, lab.make_batch())

    def loss_and_grads(model, batch):
        with sh.activation_sharding(sh.make_mesh("stage=2,data=4")):
            return eqx.filter_value_and_grad(lambda m: lm_loss(m, batch)[0])(model)

    loss, grads = eqx.filter_eval_shape(loss_and_grads, model, batch)
    assert loss.shape == () and grads.blocks.layers.mlp.gate_proj.shape == model.blocks.layers.mlp.gate_proj.shape


def test_decoding_on_a_stage_mesh_gives_the_same_logits(lab):
    # The KV cache rides in the carry through every layer: decoding runs the plain scan.
    # Catches decoding pipelined (correct values, but the cache shipped between stages).
    model = lab.make_model("llama")
    tokens = jnp.asarray(lab.make_batch()["tokens"][:, :6])
    mesh = sh.make_mesh("stage=2,data=4")

    def prefill(model, tokens, mesh=None):
        with sh.activation_sharding(mesh):
            return jax.vmap(lambda t: model.prefill(t, model.init_cache(8))[0])(tokens)

    ref = jax.jit(prefill)(model, tokens)
    sharded = sh.shard(model, mesh)
    compiled = jax.jit(prefill, static_argnums=2).lower(sharded, tokens, mesh).compile()
    assert lab.max_abs_diff(compiled(sharded, tokens), ref) < TOL
    # The plain scan: no micro-batch (nor the whole cache with it) moves from stage to stage.
    assert "collective-permute" not in {c.kind for c in perf.collectives(compiled)}


def test_pipeline_errors(lab):
    model = lab.make_model("llama")
    tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32)

    def features(mesh, **options):
        def f(tokens):
            with sh.activation_sharding(mesh, **options):
                return sh.batch_vmap(model.features)(tokens)

        return jax.eval_shape(f, tokens)

    with pytest.raises(sh.ShardingError, match=r"stack of 2 layers cannot be split over mesh axis stage=4"):
        sh.shard(model, sh.make_mesh("stage=4,data=2"))
    with pytest.raises(sh.ShardingError, match=r"stage=8 does not divide the stack's 2 layers"):
        features(sh.make_mesh("stage=8"))
    with pytest.raises(sh.ShardingError, match=r"batch of 8 cannot be cut into pipeline_microbatches=3 .* .*e\.g\. 2"):
        features(sh.make_mesh("stage=2,data=4"), pipeline_microbatches=3)
    with pytest.raises(sh.ShardingError, match=r"pipeline_microbatches must be a positive integer"):
        make_train_step(lm_loss, optax.sgd(0.1), pipeline_microbatches=0)
    with pytest.raises(sh.ShardingError, match=r"does not run ring attention"):
        features(sh.make_mesh("stage=2,context=4"), context_attention="ring")
    assert features(sh.make_mesh("stage=2,data=4")).shape == (8, 16, 64)  # a batch of 8: 2 micro-batches


# The circular (interleaved) schedule, `pipeline_repeats > 1`: each stage holds `repeats`
# non-contiguous chunks of the stack and a micro-batch goes round the stages that many times.
_REFERENCES: dict = {}


def _loss_and_grads(lab, name, layers, mesh=None, **options):
    """`(loss, grads, compiled)` of `lm_loss` on lab's batch for the tiny `name` with `layers`
    layers: on one device (no `mesh`; cached), or sharded on `mesh`, pipelined with `options`."""
    key = (name, layers)
    if mesh is None and key in _REFERENCES:
        return _REFERENCES[key]
    model, batch = lab.make_model(name, num_layers=layers), lab.make_batch()
    if mesh is not None:
        model, batch = sh.shard(model, mesh), sh.shard_batch(batch, mesh)

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def f(model, batch):
        with sh.activation_sharding(mesh, **options):
            return eqx.filter_value_and_grad(lambda m: lm_loss(m, batch)[0])(model)

    compiled = f.lower(model, batch).compile()
    out = (*compiled(model, batch), compiled)
    if mesh is None:
        _REFERENCES[key] = out
    return out


@pytest.mark.parametrize(
    ("name", "layers", "mesh_spec", "micro"),
    [
        # Two stages on 4 devices, 4 micro-batches of 2 rows (each split over data=2): a
        # micro-batch back from the last stage waits 2 steps in the buffer for stage 0.
        ("llama", 4, "stage=2,data=2", 4),
        # The default 2 micro-batches of 4 rows (each split over data=4): each comes back from
        # the last stage just as stage 0 is free.
        ("gpt2", 4, "stage=2,data=4", None),
    ],
)
def test_circular_schedule_gives_one_devices_loss_and_gradients(lab, name, layers, mesh_spec, micro):
    # Two repeats, against one device (loss and gradients within TOL). Catches a chunk given to
    # the wrong stage (the contiguous GPipe split read as the circular one), the roll or the
    # repeat index off, a micro-batch taken from the wrong buffer slot or its output collected
    # from the wrong step; inside the loop only the roll's collective-permutes run (the buffer
    # is split over `stage`, weight gradients reduced over `data` after it), and the stack is
    # re-laid out for the schedule and back without gathering it onto each device.
    devices = 4 if mesh_spec == "stage=2,data=2" else 8
    mesh = sh.make_mesh(mesh_spec, devices=jax.devices()[:devices])
    ref_loss, ref_grads, _ = _loss_and_grads(lab, name, layers)
    loss, grads, compiled = _loss_and_grads(lab, name, layers, mesh, pipeline_repeats=2, pipeline_microbatches=micro)
    assert abs(float(loss) - float(ref_loss)) < TOL
    assert lab.max_abs_diff(grads, ref_grads) < TOL
    found = perf.collectives(compiled)
    assert {c.kind for c in found if c.in_loop} == {"collective-permute"}, found
    assert "all-gather" not in {c.kind for c in found}, found


def test_circular_per_layer_outputs_inputs_closures_and_gradients_reach_the_right_layer():
    # As test_per_layer_outputs_inputs_and_closures_reach_the_right_layer, on the circular
    # schedule, with gradients: 8 layers on stage=4 with 2 repeats (chunk r of stage s: layer
    # 4 r + s), 8 micro-batches (each waits 4 steps in the buffer between its repeats). Catches
    # per-layer inputs (shared or per example) read from the wrong chunk, per-layer outputs
    # collected from the wrong step, stage or chunk, closed-over values of the wrong
    # micro-batch, the roll reversed (on 4 stages), and gradients sent to the wrong layer.
    stack = Stacked(lambda k: eqx.nn.Linear(8, 8, key=k), 8, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 8))
    scale = jnp.arange(1.0, 9.0) / 8
    per_example = jnp.arange(64.0).reshape(8, 8) / 64  # (batch, layers)
    mesh = sh.make_mesh("stage=4,data=2")

    def run(stack, x, scale, per_example, mesh=None):
        def one(x, s, e):
            def step(layer, h, inputs):
                i, e = inputs
                h = jnp.tanh(layer(h)) * s + 0.1 * i.astype(h.dtype) + e  # |h| < 3
                return h, jnp.mean(h) + i.astype(h.dtype)  # which layer wrote it, and what it saw

            return stack.apply(step, x, (jnp.arange(8, dtype=jnp.int32), e))

        def loss(stack, x):
            with sh.activation_sharding(mesh, pipeline_repeats=2, pipeline_microbatches=8):
                h, ys = sh.batch_vmap(one)(x, scale, per_example)
            return jnp.sum(jnp.sin(h)) + jnp.sum(jnp.cos(ys)), (h, ys)

        return eqx.filter_value_and_grad(loss, has_aux=True)(stack, x)

    ref = jax.jit(run)(stack, x, scale, per_example)
    compiled = jax.jit(run, static_argnums=4).lower(stack, x, scale, per_example, mesh).compile()
    assert "collective-permute" in {c.kind for c in perf.collectives(compiled)}
    got = compiled(stack, x, scale, per_example)
    (_, (h, ys)), grads = got
    assert ys.shape == (8, 8)
    np.testing.assert_allclose(np.asarray(h), np.asarray(ref[0][1][0]), rtol=0, atol=TOL)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(ref[0][1][1]), rtol=0, atol=TOL)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref[1]), strict=True)) < TOL


def test_circular_train_steps_follow_one_device_and_checkpoint_in_natural_order(lab, tmp_path):
    # Two SGD steps with make_train_step(pipeline_repeats=2) on pipeline x FSDP x tensor
    # parallelism against one device's trajectory. The stack stays stored in its natural layer
    # order, split over `stage` in contiguous blocks (the schedule re-lays it out inside the
    # step): the updated parameters match one device's in place, and a checkpoint of the run
    # restores onto one device as the same model.
    from eqzoo import checkpoint

    lr, layers = 0.1, 4
    model, batch = lab.make_model("llama", num_layers=layers), lab.make_batch()
    mesh = sh.make_mesh("stage=2,fsdp=2,tensor=2")
    optimizer = optax.sgd(lr)
    state = sh.shard_state(TrainState.create(model, optimizer, key=jax.random.key(1)), mesh)
    step = make_train_step(lm_loss, optimizer, mesh=mesh, pipeline_repeats=2, pipeline_microbatches=4, donate=False)
    reference = _loss_and_grads(lab, "llama", layers)[2]
    for _ in range(2):
        ref_loss, grads = reference(model, batch)
        model = eqx.apply_updates(model, jax.tree.map(lambda g: -lr * g, grads))
        state, metrics = step(state, batch)
        assert abs(float(metrics["loss"]) - float(ref_loss)) < TOL
    assert lab.max_abs_diff(state.model, model) < TOL
    q = state.model.blocks.layers.attn.q_proj.weight
    assert q.sharding.spec[0] == "stage" and q.addressable_shards[0].data.shape[0] == layers // 2

    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False, handle_signals=False)
    ckpt.save(state, step=2)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = ckpt.restore(checkpoint.abstract_state(model, optimizer), shardings=one).state
    ckpt.close()
    assert lab.max_abs_diff(restored.model, model) < TOL


def test_pipeline_repeats_errors(lab, unchecked):
    tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32)

    def features(model, mesh, tokens=tokens, **options):
        def f(tokens):
            with sh.activation_sharding(mesh, **options):
                return sh.batch_vmap(model.features)(tokens)

        return jax.eval_shape(f, tokens)

    with pytest.raises(sh.ShardingError, match=r"make_train_step: pipeline_repeats must be an integer >= 1 .*got 0\."):
        make_train_step(lm_loss, optax.sgd(0.1), pipeline_repeats=0)
    with unchecked():  # what the annotations already refuse under the type checker
        for bad in (True, 2.0, "2"):
            with pytest.raises(sh.ShardingError, match=rf"make_train_step: pipeline_repeats .*got {bad!r}\.$"):
                make_train_step(lm_loss, optax.sgd(0.1), pipeline_repeats=bad)
        with pytest.raises(sh.ShardingError, match=r"make_eval_step: pipeline_repeats .* got Array\(2.*JAX array, not a Python int: pass int\(x\)"):
            make_eval_step(lm_loss, pipeline_repeats=jnp.int32(2))
    with pytest.raises(sh.ShardingError, match=r"activation_sharding: pipeline_repeats must be an integer >= 1"):
        features(lab.make_model("llama"), None, pipeline_repeats=-1)

    # Two layers cannot be cut into stage=2 x 2 chunks; make_train_step and make_eval_step pass
    # the setting on to the stack.
    two_layers, mesh = lab.make_model("llama"), sh.make_mesh("stage=2,data=4")
    chunks = r"stage=2 x pipeline_repeats=2 = 4 chunks do not divide the stack's 2 layers .* Use pipeline_repeats in \[1\], or a depth divisible by 4"
    with pytest.raises(sh.ShardingError, match=chunks):
        features(two_layers, mesh, pipeline_repeats=2)
    state = sh.shard_state(TrainState.create(two_layers, optax.sgd(0.1), key=jax.random.key(1)), mesh)
    batch = {"tokens": tokens, "targets": tokens}
    with pytest.raises(sh.ShardingError, match=chunks):
        make_train_step(lm_loss, optax.sgd(0.1), mesh=mesh, pipeline_repeats=2).lower(state, batch)
    with pytest.raises(sh.ShardingError, match=chunks):
        make_eval_step(lm_loss, mesh=mesh, pipeline_repeats=2).lower(state, batch)

    # Fewer micro-batches than stages: the first would come back before stage 0 is free.
    four_layers, eight_layers = lab.make_model("llama", num_layers=4), lab.make_model("llama", num_layers=8)
    with pytest.raises(sh.ShardingError, match=r"pipeline_repeats=2\) needs at least stage=2 micro-batches.* got 1 for a batch of 8\. Use pipeline_microbatches=2, or pipeline_repeats=1"):
        features(four_layers, mesh, pipeline_repeats=2, pipeline_microbatches=1)
    with pytest.raises(sh.ShardingError, match=r"needs at least stage=4 micro-batches.* got 1 \(the default choice\) for a batch of 2\. Use a batch of at least 4, or pipeline_repeats=1"):
        features(eight_layers, sh.make_mesh("stage=4,data=2"), jax.ShapeDtypeStruct((2, 16), jnp.int32), pipeline_repeats=2)
    assert features(four_layers, mesh, pipeline_repeats=2).shape == (8, 16, 64)  # the default: 2 micro-batches


@pytest.mark.parametrize("name", ["mixtral", "mixtral-capacity"])
def test_pipeline_with_expert_parallelism_gives_one_devices_loss_and_gradients(lab, name):
    # docs/scaling.md: `stage` composes with `expert` (and `fsdp`): Mixtral's dense and capacity
    # experts, split over expert=2 inside each stage, against one device (within TOL).
    mesh = sh.make_mesh("stage=2,expert=2,fsdp=2")
    ref_loss, ref_grads, _ = _loss_and_grads(lab, name, 2)
    loss, grads, _ = _loss_and_grads(lab, name, 2, mesh, pipeline_microbatches=2)
    assert abs(float(loss) - float(ref_loss)) < TOL
    assert lab.max_abs_diff(grads, ref_grads) < TOL
