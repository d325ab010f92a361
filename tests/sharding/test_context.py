"""Context parallelism: a `context` mesh axis splits every sequence along its length. A train
step on it computes what one device computes (packed documents too); attention gathers keys and
values over `context` while the residual stream stays split; per-device activation memory falls;
and what cannot run split is refused with an error that names the fix."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqzoo
from eqzoo import perf, sharding as sh
from eqzoo._errors import ConfigError
from eqzoo.train import TrainState, lm_loss, make_eval_step, make_train_step

TOL = 1e-5  # fp32: the split program sums in another order, nothing more


def _packed_batch(lab):
    # Three documents per row, then padding (segment 0): each document's positions restart at 0,
    # and a document that starts inside one context piece ends in another.
    batch = lab.make_batch()
    seg = np.zeros((lab.BATCH, lab.SEQ), np.int32)
    seg[:, :5], seg[:, 5:11], seg[:, 11:14] = 1, 2, 3
    return {**batch, "segment_ids": seg}


def test_train_step_on_a_context_mesh_equals_one_device(lab):
    # Losses and gradients of every model on data=2,context=4 and fsdp=2,context=2,tensor=2 are
    # checked in test_equivalence.py; here a whole step, on packed documents.
    optimizer = optax.sgd(0.5)
    batch, mesh_spec = _packed_batch(lab), "fsdp=2,context=2,tensor=2"
    state = TrainState.create(lab.make_model("llama"), optimizer, key=jax.random.key(1))
    ref_state, ref_metrics = make_train_step(lm_loss, optimizer, donate=False)(state, batch)

    mesh = sh.make_mesh(mesh_spec)
    step = make_train_step(lm_loss, optimizer, mesh=mesh, donate=False)
    new_state, metrics = step(sh.shard_state(state, mesh), batch)  # a host batch, split by the step
    assert abs(float(metrics["loss"]) - float(ref_metrics["loss"])) < TOL
    assert float(metrics["tokens"]) == float(ref_metrics["tokens"])
    assert lab.max_abs_diff(new_state.model, ref_state.model) < TOL  # lr 0.5: gradients within 2e-5


def test_host_batches_split_the_sequence_over_context(lab):
    mesh = sh.make_mesh("data=2,context=4")
    placed = sh.shard_batch({**lab.make_batch(), "row": np.zeros((lab.BATCH,), np.int32)}, mesh)
    assert placed["tokens"].sharding.spec == jax.P(("data", "fsdp", "expert"), "context")
    assert placed["row"].sharding.spec == jax.P(("data", "fsdp", "expert"))  # no sequence axis
    assert placed["tokens"].addressable_shards[0].data.shape == (lab.BATCH // 2, lab.SEQ // 4)
    assert sh.batch_spec(sh.make_mesh("data=8")) == jax.P(("data", "fsdp", "expert"))


@pytest.mark.parametrize("implementation", ["full", "chunked"])
def test_every_loss_implementation_matches_one_device(lab, implementation):
    # "fused" is the default, checked by the train-step test; the others fold the sequence too.
    mesh = sh.make_mesh("data=2,context=4")
    model, batch = lab.make_model("gpt2"), lab.make_batch()
    ref = lm_loss(model, jax.tree.map(jnp.asarray, batch), implementation=implementation)[0]
    evaluate = make_eval_step(lambda m, b, k: lm_loss(m, b, implementation=implementation), mesh=mesh)
    got = evaluate(sh.shard_state(TrainState.create(model, optax.sgd(0.1), key=jax.random.key(0)), mesh), batch)
    assert abs(float(got["loss"]) - float(ref)) < TOL


def _llama_step(lab, mesh, seq, context_attention="gather"):
    mesh = sh.make_mesh(mesh) if isinstance(mesh, str) else mesh
    optimizer = optax.sgd(0.1)
    state = sh.abstract_sharded(
        eqx.filter_eval_shape(lambda: TrainState.create(lab.build_model("llama", jax.random.key(0), max_seq=max(seq, 128)), optimizer, key=jax.random.key(1))),
        mesh,
    )
    tok = jax.ShapeDtypeStruct((2, seq), jnp.int32, sharding=jax.NamedSharding(mesh, sh.batch_spec(mesh)))
    step = make_train_step(lm_loss, optimizer, mesh=mesh, donate=False, context_attention=context_attention)
    return step.lower(state, {"tokens": tok, "targets": tok}).compile()


def test_attention_gathers_keys_and_values_not_the_residual_stream(lab):
    # Inside the scanned layers the only activations gathered are each layer's keys and values
    # (batch 1 per data shard, the whole sequence of 64, 4 kv heads of 8): two all-gathers in
    # the forward pass and two in the rematerialised/backward pass. The residual stream (.., 64
    # embed) is never gathered, in or out of the layer loop.
    compiled = _llama_step(lab, "data=2,context=4", 64)
    found = perf.collectives(compiled)
    gathers = [c for c in found if c.kind == "all-gather" and c.in_loop]
    assert gathers and {re.match(r"\w+\[([\d,]*)\]", c.shape).group(1) for c in gathers} == {"1,64,4,8"}
    assert sum(c.count for c in gathers) >= 2 * 2  # K and V of both layers
    residual = [c for c in found if c.kind == "all-gather" and re.search(r"\[\d+,64,64\]", c.shape)]
    assert residual == []
    summary = perf.collective_summary(found)
    assert summary["all-gather"]["in_loop_mib"] > 0


def test_context_parallelism_cuts_activation_memory(lab):
    # Same sequences (2 of 512 positions), same data split: with context=4 each device holds a
    # quarter of each sequence's activations (plus the gathered keys/values of one layer). Ring
    # attention holds neither the gathered keys/values nor a (heads, 128, 512) score block:
    # 66.3, 17.3 and 8.0 MiB measured (241 and 97 MiB at 2,048 positions, docs/scaling.md).
    pairs = sh.make_mesh("data=2", devices=jax.devices()[:2])
    whole = _llama_step(lab, pairs, 512).memory_analysis().temp_size_in_bytes
    split = _llama_step(lab, "data=2,context=4", 512).memory_analysis().temp_size_in_bytes
    assert split < 0.5 * whole, (split, whole)
    compiled = _llama_step(lab, "data=2,context=4", 512, context_attention="ring")
    assert compiled.memory_analysis().temp_size_in_bytes < 0.7 * split
    # The ring path runs: key/value blocks (1 sequence, 128 positions, 4 kv heads of 8) are
    # passed round the ring inside the layer loop, and nothing is all-gathered.
    found = perf.collectives(compiled)
    permutes = [c for c in found if c.kind == "collective-permute" and c.in_loop]
    assert {re.match(r"\w+\[([\d,]*)\]", c.shape).group(1) for c in permutes} == {"1,128,4,8"}
    assert [c for c in found if c.kind == "all-gather"] == []


def test_ring_attention_refusals(lab, unchecked):
    mesh = sh.make_mesh("data=2,context=4")
    with unchecked(), pytest.raises(sh.ShardingError, match=r"context_attention must be one of \('gather', 'ring', 'ring_balanced'\).*got 'rings'"):
        make_train_step(lm_loss, optax.sgd(0.1), mesh=mesh, context_attention="rings")
    attn = eqzoo.nn.Attention(64, 4, backend="cudnn", key=jax.random.key(0))
    with sh.activation_sharding(mesh, context_attention="ring"), pytest.raises(ConfigError, match=r"'cudnn' cannot run ring attention.*backend='auto' or 'xla'"):
        jax.eval_shape(attn, jnp.zeros((8, 64)))
    auto = eqzoo.nn.Attention(64, 4, backend="auto", key=jax.random.key(0))
    with sh.activation_sharding(mesh, context_attention="ring"):
        jax.eval_shape(auto, jnp.zeros((8, 64)))  # XLA's attention on each block
        with pytest.raises(sh.ShardingError, match=r"Attention: a sequence of 10 positions cannot be split over mesh axis context=4"):
            jax.eval_shape(auto, jnp.zeros((10, 64)))
    with sh.activation_sharding(mesh, context_attention="ring_balanced"):
        with pytest.raises(sh.ShardingError, match=r"'ring_balanced' cuts a sequence into 2 \* context = 8 chunks.*12 positions.*8 or 16 positions"):
            jax.eval_shape(auto, jnp.zeros((12, 64)))
        # Without the causal mask there is nothing to balance: the contiguous ring, 4 blocks of 3.
        jax.eval_shape(eqzoo.nn.Attention(64, 4, causal=False, key=jax.random.key(0)), jnp.zeros((12, 64)))
    # Gradient accumulation's micro-batches must split over the batch axes as ring attention's
    # shard_map splits them (2 rows in 2 micro-batches of 1 on data=2: once a shape error deep in
    # the backward pass); refused when the step is traced.
    state = sh.abstract_sharded(eqx.filter_eval_shape(
        lambda: TrainState.create(lab.build_model("llama", jax.random.key(0)), optax.sgd(0.1), key=jax.random.key(1))), mesh)
    tok = jax.ShapeDtypeStruct((2, 16), jnp.int32, sharding=jax.NamedSharding(mesh, sh.batch_spec(mesh)))
    step = make_train_step(lm_loss, optax.sgd(0.1), mesh=mesh, donate=False, grad_accum_steps=2, context_attention="ring")
    with pytest.raises(sh.ShardingError, match=r"micro-batches of 1 rows.*\{'data': 2\}.*multiple of 4 rows, or grad_accum_steps=1 for this batch\."):
        step.lower(state, {"tokens": tok, "targets": tok})


def test_a_sequence_context_does_not_divide_is_refused(lab):
    mesh = sh.make_mesh("data=2,context=4")
    with pytest.raises(sh.ShardingError, match=r"sequence length 10 is split over mesh axis context=4.*divisible by 4 \(e\.g\. 8 or 12"):
        sh.shard_batch(lab.make_batch(seq=10), mesh)
    model = lab.make_model("gpt2")
    with sh.activation_sharding(mesh), pytest.raises(sh.ShardingError, match=r"GPT2: a sequence of 10 positions cannot be split over mesh axis context=4"):
        jax.eval_shape(model, jnp.zeros((10,), jnp.int32))


def test_features_that_need_the_whole_sequence_are_refused(lab):
    mesh = sh.make_mesh("data=2,context=4")
    x = jnp.zeros((8, 64))
    attn = eqzoo.nn.Attention(64, 4, backend="cudnn", key=jax.random.key(0))
    with sh.activation_sharding(mesh), pytest.raises(ConfigError, match=r"'cudnn' cannot run under context parallelism.*backend='auto' or 'xla'"):
        jax.eval_shape(attn, x)
    auto = eqzoo.nn.Attention(64, 4, backend="auto", key=jax.random.key(0))
    with sh.activation_sharding(mesh):
        jax.eval_shape(auto, x)  # "auto" takes XLA's attention
    moe = lab.make_model("mixtral-capacity")
    with sh.activation_sharding(mesh), pytest.raises(ConfigError, match=r"moe_implementation='capacity' cannot run under context parallelism.*'dense'"):
        jax.eval_shape(moe, jnp.zeros((8,), jnp.int32))
    expert_mesh = sh.make_mesh("context=2,expert=4")
    with sh.activation_sharding(expert_mesh), pytest.raises(ConfigError, match=r"expert parallelism \(mesh expert=4\) cannot run"):
        jax.eval_shape(jax.vmap(lab.make_model("mixtral")), jnp.zeros((4, 8), jnp.int32))


def test_entries_that_are_not_sequences_keep_their_second_axis_whole(lab):
    # Class labels (batch, 3): 3 is no multiple of context=4, and it is no sequence. Named
    # entries are sequences by key (eqzoo.sharding.SEQUENCE_KEYS), so only tokens/targets split.
    mesh = sh.make_mesh("data=2,context=4")
    batch = {**lab.make_batch(), "labels": np.ones((lab.BATCH, 3), np.float32)}
    placed = sh.shard_batch(batch, mesh)
    assert placed["labels"].sharding.spec == jax.P(("data", "fsdp", "expert"))
    assert placed["tokens"].sharding.spec == jax.P(("data", "fsdp", "expert"), "context")
    assert sh.batch_spec(mesh, 2, sequence=False) == jax.P(("data", "fsdp", "expert"))
    own = sh.shard_batch(batch, mesh, sequence_keys=("tokens",))  # targets not split either
    assert own["targets"].sharding.spec == jax.P(("data", "fsdp", "expert"))
    assert sh.shard_batch((batch["tokens"],), mesh)[0].sharding.spec[1] == "context"  # unnamed: by shape
    with pytest.raises(sh.ShardingError, match=r"labels'\] of shape \(8, 3\).*leave its key out of sequence_keys"):
        sh.shard_batch(batch, mesh, sequence_keys=None)  # None: every 2-D leaf is a sequence
    with pytest.raises(sh.ShardingError, match=r"sequence_keys must be a collection.*written \('tokens',\)"):
        make_train_step(lm_loss, optax.sgd(0.1), mesh=mesh, sequence_keys="tokens")


def test_a_step_with_a_non_sequence_entry_on_a_context_mesh_equals_one_device(lab):
    # A loss that also reads per-example labels (batch, 3): the host batch is placed by the step.
    def loss_fn(model, batch, key):
        loss, aux = lm_loss(model, batch, key)
        return loss + 1e-2 * jnp.mean(batch["labels"] * jnp.arange(3.0)), aux

    model = lab.make_model("gpt2")
    batch = {**lab.make_batch(), "labels": np.arange(lab.BATCH * 3, dtype=np.float32).reshape(lab.BATCH, 3)}
    ref = loss_fn(model, jax.tree.map(jnp.asarray, batch), None)[0]
    mesh = sh.make_mesh("data=2,context=4")
    state = sh.shard_state(TrainState.create(model, optax.sgd(0.1), key=jax.random.key(0)), mesh)
    got = make_eval_step(loss_fn, mesh=mesh)(state, batch)
    assert abs(float(got["loss"]) - float(ref)) < TOL


@pytest.mark.parametrize(
    ("model_name", "mesh_spec", "packed", "strategy"),
    [
        ("llama", "data=2,context=4", True, "ring"),
        ("gemma", "fsdp=2,context=2,tensor=2", False, "ring"),
        ("llama", "data=2,context=4", True, "ring_balanced"),
    ],
    ids=["llama-packed-data-context", "gemma-fsdp-context-tensor", "balanced-llama-packed-data-context"],
)
def test_ring_attention_equals_one_device(lab, model_name, mesh_spec, packed, strategy):
    # Llama: GQA (8 heads / 4 kv heads), packed documents crossing the pieces, causal blocks
    # skipped. Gemma 2: soft caps, windows of 8 on alternate layers (a traced flag in the layer
    # scan), 2 pieces of 8, heads split over tensor and the batch over fsdp. Balanced: 8 chunks
    # of 2 positions, device i holding chunks i and 7 - i, so that documents cross chunks.
    ref_loss, ref_grads, _ = lab.loss_and_grads(model_name, None, packed=packed)
    loss, grads, _ = lab.loss_and_grads(model_name, mesh_spec, context_attention=strategy, packed=packed)
    assert abs(float(loss) - float(ref_loss)) < TOL
    assert lab.max_abs_diff(grads, ref_grads) < TOL
    if model_name == "llama":
        # The balanced order ran: besides the ring's key/value blocks (4 sequences a device, 4
        # positions, 4 kv heads of 8), the layer loop permutes half-blocks of 2 positions, of
        # the queries and the output (8 heads) and of the keys and values (4 kv heads).
        compiled = lab.compiled_loss_and_grads(model_name, mesh_spec, context_attention=strategy, packed=packed)
        permuted = {
            re.match(r"\w+\[([\d,]*)\]", c.shape).group(1)
            for c in perf.collectives(compiled) if c.kind == "collective-permute" and c.in_loop
        }
        halves = {"4,2,8,8", "4,2,4,8"} if strategy == "ring_balanced" else set()
        assert permuted == {"4,4,4,8"} | halves
    else:  # the ring ran (the gather strategy would match one device too)
        compiled = lab.compiled_loss_and_grads(model_name, mesh_spec, context_attention=strategy, packed=packed)
        assert any(c.kind == "collective-permute" and c.in_loop for c in perf.collectives(compiled))


def _values(jaxpr):
    """Every value a jaxpr computes, its sub-jaxprs' (scans, conds, shard_maps) too."""
    for eqn in jaxpr.eqns:
        yield from eqn.outvars
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _values(sub)


def _shapes(jaxpr):
    """The shapes of every value a jaxpr computes, its sub-jaxprs' too."""
    return (var.aval.shape for var in _values(jaxpr))


@pytest.mark.parametrize(("balanced", "seq"), [(False, 40), (True, 32)], ids=["contiguous-padded-tiles", "balanced"])
def test_ring_attention_and_its_gradients_mask_like_one_device_with_a_window_shorter_than_a_block(balanced, seq, monkeypatch):
    # The models' windows are as long as a ring block, so no block is ever wholly before a
    # window there; here a window of 2 on blocks of 10 (contiguous, 40 positions) or chunks of
    # 4 (balanced, 32) skips such blocks, with documents crossing blocks, a static and a traced
    # window flag (on and off), GQA (4 heads, 2 kv heads, head_dim 7) and a soft cap of 1.5.
    # Window 2: the previous block's last key is exactly at the edge of a block's first query's
    # window, so a skip test off by one fails (checked). The gradients of q, k and v come from
    # the ring's own backward pass. Tiles of 4 query rows and 4 keys (512 outside tests), in
    # the forward and the backward pass, with the causal diagonal, documents and the window
    # crossing tile edges, and a row tile wholly before the window skipped. Balanced, a step's
    # 8 rows or keys are 2 tiles of 4. Contiguous, no size from 3 to 4 divides a block's 10, so
    # its rows and its keys are padded to 3 tiles of 4 (padded rows dropped from the output and
    # given no gradient, padded keys masked out). A tile offset off by one row fails (checked).
    from eqzoo.nn import _ring
    from eqzoo.nn._attention import _xla_attention
    from eqzoo.nn._ring import ring_attention

    monkeypatch.setattr(_ring, "_TILE", 4)
    mesh = sh.make_mesh("context=4", devices=jax.devices()[:4])
    window, cap = 2, 1.5
    kq, kk, kv, kd = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (seq, 4, 7))
    k, v = jax.random.normal(kk, (seq, 2, 7)), jax.random.normal(kv, (seq, 2, 7))
    cotangent = jax.random.normal(kd, (seq, 4, 7))
    seg = jnp.asarray(np.repeat(np.arange(1, 5, dtype=np.int32), [7, 11, 9, seq - 27]))
    pos = jnp.arange(seq)
    causal_docs = (pos[None, :] <= pos[:, None]) & (seg[:, None] == seg[None, :])
    band = pos[None, :] > pos[:, None] - window

    def with_grads(attend):  # the output and the gradients of sum(cotangent * output)
        def run(q, k, v, *rest):  # rest: the segment ids or mask, the traced flag
            out, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, *rest), q, k, v)
            return out, pullback(cotangent)

        return run

    def ring(windowed):
        return lambda q, k, v, seg, *flag: ring_attention(
            q, k, v, mesh=mesh, causal=True, window=window, windowed=flag[0] if flag else windowed,
            segment_ids=seg, scale=None, cap=cap, balanced=balanced,
        )

    one_device = jax.jit(with_grads(lambda q, k, v, mask: _xla_attention(q, k, v, mask, None, cap)))

    def check(got, mask):
        want = one_device(q, k, v, mask)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):  # out, dq, dk, dv
            assert jnp.max(jnp.abs(x - y)) < TOL

    static = jax.jit(with_grads(ring(True)))
    check(static(q, k, v, seg), causal_docs & band)
    traced = jax.jit(with_grads(ring(None)))
    check(traced(q, k, v, seg, jnp.asarray(True)), causal_docs & band)
    check(traced(q, k, v, seg, jnp.asarray(False)), causal_docs)
    # No scores, probabilities or masks ((kv 2, group 2, rows, keys) or (rows, keys)) of more
    # than a tile's 4 query rows or 4 keys, forward or backward: keys are tiled too (head_dim
    # 7, and (kv, g, rows, 1) is a row statistic broadcast). Fails with whole blocks, with
    # query tiles only, and on 40 positions without the padding (checked).
    program = static.trace(q, k, v, seg).jaxpr.jaxpr  # the program `static` ran (its cached trace)
    scores = [s for s in _shapes(program) if len(s) == 2 or (len(s) == 4 and s[:2] == (2, 2) and s[-1] not in (1, 7))]
    assert scores and max(max(s[-2:]) for s in scores) == 4
    # The backward pass keeps q, this device's own k and v blocks, the output and a float32
    # log-sum-exp per query row, not the key/value blocks each ring step received (nor each
    # step's running softmax): 5 float arrays of 2,432 elements, where autodiff through the
    # ring kept 31 contiguous and 55 balanced.
    pullback = jax.eval_shape(lambda *a: jax.vjp(ring(None), *a)[1], q, k, v, seg, jnp.asarray(True))
    saved = [x.size for x in jax.tree.leaves(pullback) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert sorted(saved) == sorted([q.size, q.size, k.size, v.size, seq * 4])
    # Differentiated in a scan over 2 layers, the masks are built inside the loop, one
    # (kv, g, rows, keys) tile at a time: no boolean array of more than 4 dimensions. Without
    # the barrier tying the device index to q (`_Ring.device`), the scan's partial evaluation
    # hoisted them out of the loop, stacked over the row and key tiles (checked).
    def two_layers(q, k, v, seg):
        return jnp.sum(jax.lax.scan(lambda x, _: (ring(True)(x, k, v, seg), None), q, None, length=2)[0])

    layered = jax.make_jaxpr(jax.grad(two_layers))(q, k, v, seg).jaxpr
    masks = [x.aval.shape for x in _values(layered) if x.aval.dtype == jnp.bool_]
    assert masks and max(len(s) for s in masks) == 4
