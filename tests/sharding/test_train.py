"""Training features composed with sharding: gradient accumulation and mixed precision."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqzoo import sharding as sh
from eqzoo.train import Precision, TrainState, lm_loss, make_train_step

MESH = "data=2,fsdp=2,tensor=2"


def test_grad_accumulation_equals_one_large_batch_under_sharding(lab):
    k = 4
    mesh = sh.make_mesh(MESH)
    optimizer = optax.sgd(1.0)  # new params = params - grads: compares gradients exactly
    state = sh.sharded_init(
        lambda key: TrainState.create(lab.build_model("gpt2", key), optimizer, key=key),
        jax.random.key(3),
        mesh=mesh,
    )
    batch = sh.shard_batch(lab.make_batch(batch=4 * k, seed=1), mesh)  # 4 rows per micro-batch

    whole, m1 = make_train_step(lm_loss, optimizer, mesh=mesh, donate=False)(state, batch)
    accum, mk = make_train_step(lm_loss, optimizer, mesh=mesh, donate=False, grad_accum_steps=k)(state, batch)

    assert abs(float(m1["loss"]) - float(mk["loss"])) < 1e-6
    assert abs(float(m1["grad_norm"]) - float(mk["grad_norm"])) < 1e-6
    assert lab.max_abs_diff(whole.arrays, accum.arrays) < 1e-6
    assert [a.sharding for a in accum.arrays] == [a.sharding for a in state.arrays]
    # Micro-batches that do not fill the batch axes (here 2 rows on data=2 x fsdp=2) are refused when
    # the step is traced: XLA:CPU's collectives deadlocked on this mesh and aborted the process.
    with pytest.raises(sh.ShardingError, match=r"grad_accum_steps=8 cuts the batch of 16 rows into micro-batches of 2 "
                       r"rows.*\{'data': 2, 'fsdp': 2\} \(4 ways\).*multiple of 32 rows, or grad_accum_steps=4 for this batch\."):
        make_train_step(lm_loss, optimizer, mesh=mesh, donate=False, grad_accum_steps=8).lower(state, batch)


def test_mixed_precision_composes_with_sharding(lab):
    mesh = sh.make_mesh(MESH)
    optimizer = optax.sgd(0.1)
    batch = lab.make_batch()
    fp32_loss = float(lab.loss_and_grads("llama", None)[0])

    # bf16 compute, fp32 master weights: the same on one device and sharded, within bf16 noise.
    bf16 = Precision.bf16()
    make = lambda key: TrainState.create(lab.build_model("llama", key), optimizer, key=key)  # noqa: E731
    ref_state = make(jax.random.key(0))
    _, ref = make_train_step(lm_loss, optimizer, precision=bf16, donate=False)(ref_state, batch)
    state = sh.shard_state(ref_state, mesh)
    layout = [a.sharding for a in state.arrays]
    new, metrics = make_train_step(lm_loss, optimizer, precision=bf16, mesh=mesh, donate=False)(
        state, sh.shard_batch(batch, mesh)
    )
    assert abs(float(metrics["loss"]) - float(ref["loss"])) < 2e-2  # bf16 has ~3 significant digits
    assert abs(float(metrics["loss"]) - fp32_loss) < 5e-2
    assert [a.sharding for a in new.arrays] == layout
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new.model))  # master weights stay fp32

    # fp16 compute with dynamic loss scaling: the scale is replicated and the step is finite.
    fp16 = Precision.fp16()
    model = lab.build_model("llama", jax.random.key(0))
    state = sh.shard_state(TrainState.create(model, optimizer, key=jax.random.key(0), precision=fp16), mesh)
    step = make_train_step(lm_loss, optimizer, precision=fp16, mesh=mesh)
    losses = []
    for _ in range(2):
        state, metrics = step(state, sh.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    scale = state.opt_state[1]
    assert scale.scale.sharding.is_fully_replicated and scale.good_steps.sharding.is_fully_replicated
    assert float(metrics["loss_scale"]) == 2.0**15 and int(scale.good_steps) == 2
    assert np.all(np.isfinite(losses)) and abs(losses[0] - fp32_loss) < 5e-2 and losses[1] < losses[0]


def _step_all_gathers(lab, mesh_spec: str, seq: int, vmap) -> float:
    """MiB all-gathered inside the layer loops of a compiled sharded train step."""
    import equinox as eqx

    from eqzoo import perf, train

    mesh = sh.make_mesh(mesh_spec)
    optimizer = optax.sgd(1e-3)
    state = sh.abstract_sharded(
        eqx.filter_eval_shape(lambda: TrainState.create(lab.build_model("gpt2", jax.random.key(0), max_seq=seq), optimizer, key=jax.random.key(1))),
        mesh,
    )

    def loss(model, batch, key):
        feats = vmap(model.features)(batch["tokens"])
        return train.fused_cross_entropy(feats, model.head_weight(), batch["targets"]) / float(batch["tokens"].size), {}

    tok = jax.ShapeDtypeStruct((8, seq), jnp.int32, sharding=jax.NamedSharding(mesh, sh.BATCH_SPEC))
    compiled = make_train_step(loss, optimizer, mesh=mesh).lower(state, {"tokens": tok, "targets": tok}).compile()
    gathers = [c for c in perf.collectives(compiled) if c.kind == "all-gather" and c.in_loop]
    return sum(c.bytes * c.count for c in gathers) / 2**20


def test_fsdp_layers_gather_weights_not_activations(lab):
    # Under FSDP each layer should gather its weights (a size independent of the sequence) and
    # keep the batch split. With eqzoo.sharding.batch_vmap (as eqzoo's losses use) the layer
    # loops all-gather the same bytes at seq 64 and 128. (With plain jax.vmap, XLA 0.10's
    # partitioner un-sharded the batch and gathered activations, which doubled with the sequence.)
    pinned = [_step_all_gathers(lab, "fsdp=8", seq, sh.batch_vmap) for seq in (64, 128)]
    assert pinned[0] > 0 and pinned[0] == pinned[1], pinned


def test_bf16_step_moves_weights_and_gradients_in_bf16(lab, tmp_path):
    # fp32 master weights sharded over fsdp, bf16 compute: every weight all-gather should carry
    # the bf16 copy, and every weight-gradient all-reduce the bf16 gradient. Read from the HLO
    # right after SPMD partitioning (XLA:CPU later runs bf16 arithmetic, and so these
    # collectives, in fp32). Without the layout constraint on the cast copy, sharding
    # propagation put the tied embedding's gather before the cast (f32[256,64]); the fused
    # loss's head gradient was reduced across shards with jnp.sum, in fp32.
    import equinox as eqx

    mesh = sh.make_mesh("fsdp=8")
    optimizer = optax.sgd(1e-3)
    state = sh.abstract_sharded(
        eqx.filter_eval_shape(lambda: TrainState.create(lab.build_model("gpt2", jax.random.key(0)), optimizer, key=jax.random.key(1))),
        mesh,
    )
    tok = jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=jax.NamedSharding(mesh, sh.BATCH_SPEC))
    step = make_train_step(lm_loss, optimizer, mesh=mesh, precision=Precision.bf16())
    step.lower(state, {"tokens": tok, "targets": tok}).compile(
        compiler_options={"xla_dump_to": str(tmp_path), "xla_dump_hlo_pass_re": "spmd-partitioning"}
    )
    (dump,) = tmp_path.glob("*after_spmd-partitioning*.txt")
    hlo = dump.read_text()
    gathered = re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather\(", hlo)
    assert gathered, "expected FSDP weight gathers"
    assert {dtype for dtype, _ in gathered if dtype.startswith(("f", "bf"))} == {"bf16"}, gathered
    assert ("bf16", "256,64") in gathered  # the tied embedding (vocab 256, width 64) among them
    matrices = [(d, shape) for d, shape in re.findall(r"= (\w+)\[([\d,]*)\]\S* all-reduce\(", hlo) if "," in shape]
    assert matrices and {d for d, _ in matrices} == {"bf16"}, matrices  # weight-matrix gradients
    assert ("bf16", "256,64") in matrices


def test_token_lookup_gathers_the_table_not_activations(lab):
    # On a mesh with all three axes, the forward pass reads the token table under the
    # "vocab_table" rule (gathered over fsdp, vocab-parallel over tensor): no activations of the
    # whole batch are gathered for the lookup. Left to XLA, it replicated the lookup's output
    # ("involuntary full rematerialization") and gathered (batch, seq, embed).
    from eqzoo import perf

    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    model = sh.shard(lab.make_model("gpt2"), mesh)
    batch = sh.shard_batch(lab.make_batch(), mesh)

    @jax.jit
    def loss(model, batch):
        with sh.activation_sharding(mesh):
            return lm_loss(model, batch)[0]

    found = perf.collectives(loss.lower(model, batch).compile())
    assert found  # the step does communicate (vocab-parallel lookup, tensor-parallel layers)
    whole_batch = [c for c in found if c.kind == "all-gather" and re.match(r"\w+\[8,16,", c.shape)]
    assert whole_batch == []


def test_a_host_batch_is_split_over_the_mesh_like_shard_batch(lab):
    # A loader's numpy batch (what fit passes on) is placed as shard_batch places it: the same
    # numbers and the same compiled program as a batch placed by hand, not a replicated copy
    # resharded inside the step (a second program).
    mesh = sh.make_mesh(MESH)
    optimizer = optax.sgd(0.1)
    state = sh.sharded_init(
        lambda key: TrainState.create(lab.build_model("llama", key), optimizer, key=key), jax.random.key(3), mesh=mesh
    )
    host = {k: np.asarray(v) for k, v in lab.make_batch(batch=8, seed=2).items()}
    step = make_train_step(lm_loss, optimizer, mesh=mesh, donate=False)
    from_host, m_host = step(state, host)
    placed, m_placed = step(state, sh.shard_batch(host, mesh))
    assert step.num_compilations == 1
    assert float(m_host["loss"]) == float(m_placed["loss"])
    assert lab.max_abs_diff(from_host.arrays, placed.arrays) == 0.0
    # A short last batch (6 rows over data x fsdp = 4) is not split but copied to every device,
    # as jit places it: the same numbers as the same rows as JAX arrays.
    short = {k: v[:6] for k, v in host.items()}
    _, m_short = step(state, short)
    _, m_jnp = step(state, {k: jnp.asarray(v) for k, v in short.items()})
    assert float(m_short["loss"]) == float(m_jnp["loss"])


def test_an_equal_state_reuses_the_mesh_step_only_in_the_same_layout(lab):
    # shard_state / replace make a new structure object: the same layout reuses the compiled
    # step; another layout (the step pins the state's) compiles its own.
    mesh = sh.make_mesh(MESH)
    optimizer = optax.sgd(0.1)
    step = make_train_step(lm_loss, optimizer, mesh=mesh, donate=False)
    fresh = lambda: TrainState.create(lab.build_model("gpt2", jax.random.key(0)), optimizer, key=jax.random.key(1))  # noqa: E731
    batch = lab.make_batch()
    state, _ = step(sh.shard_state(fresh(), mesh), batch)
    state, _ = step(state.replace(model=state.model), batch)
    # By the third call jax.jit's dispatch cache holds a second entry for the returned typed
    # key, without a trace or compile: num_compilations counts compilations, not entries.
    state, _ = step(state, batch)
    assert step.num_compilations == 1
    replicated = sh.shard_state(fresh(), mesh, rules=())
    out, _ = step(replicated, batch)
    assert step.num_compilations == 2
    weight = out.model.embed.weight
    assert weight.sharding.spec == replicated.model.embed.weight.sharding.spec  # kept its own layout


def test_fit_reads_a_sharded_runs_metrics_back_in_one_transfer(monkeypatch):
    # A mesh step's metrics are replicated scalars (here with per-layer ones, as lm_loss's
    # per_layer=True adds): a log window's means are one replicated vector, read back from one
    # device.
    from eqzoo import models
    from eqzoo.train import classification_loss, fit

    def loss_fn(model, batch, key):
        loss, metrics = classification_loss(model, batch, key)
        return loss, metrics | {f"moe_dropped/layer_{i}": loss * (i + 1) for i in range(3)}

    mesh = sh.make_mesh("data=8")
    optimizer = optax.sgd(0.1)
    config = models.get_config("mlp-small", in_features=8, width=16, depth=1, out_features=3)
    state = lambda: sh.shard_state(  # noqa: E731
        TrainState.create(models.create(config, key=jax.random.key(0)), optimizer, key=jax.random.key(0)), mesh
    )
    step = make_train_step(loss_fn, optimizer, mesh=mesh, donate=False)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(8, 8)).astype(np.float32), "y": rng.integers(0, 3, 8).astype(np.int32)} for _ in range(3)]
    s, per_step = state(), []
    for batch in batches:
        s, metrics = step(s, batch)
        assert all(v.sharding.is_fully_replicated and len(v.sharding.device_set) == 8 for v in metrics.values())
        per_step.append({k: np.float64(v) for k, v in metrics.items()})
    reads = []
    device_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: reads.append(jax.tree.leaves(x)) or device_get(x))
    history = fit(state(), step, batches, num_steps=3, log_every=2).history
    assert [len(leaves) for leaves in reads] == [1, 1]
    assert all(leaves[0].sharding.is_fully_replicated for leaves in reads)
    assert "train/moe_dropped/layer_2" in history[0] and len(history[0]) == len(per_step[0]) + 2
    for record, window in zip(history, [per_step[:2], per_step[2:]], strict=True):
        for k in window[0]:  # float32 means against float64 ones
            np.testing.assert_allclose(record[f"train/{k}"], np.mean([m[k] for m in window]), rtol=1e-6, atol=0)
