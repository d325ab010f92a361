"""Packed documents: with segment ids, every document in a row gets the logits it gets alone,
and `lm_loss` on a packed batch is the loss of the documents taken one by one."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqzoo import data, models, train
from eqzoo._errors import ShapeError
from eqzoo.models._lm import segment_positions

TOL = 1e-5  # fp32; the packed and separate programs differ only in masking and summation order
LENGTHS = (7, 5, 9)  # three documents of one row of 24: 21 positions used, 3 of padding
SEQ = 24


def _docs(seed=0):
    keys = jax.random.split(jax.random.key(seed), len(LENGTHS))
    return [jax.random.randint(k, (n,), 1, 250, dtype=jnp.int32) for k, n in zip(keys, LENGTHS, strict=True)]


def _row(docs):
    tokens = jnp.concatenate([*docs, jnp.zeros(SEQ - sum(LENGTHS), jnp.int32)])
    seg = jnp.concatenate([jnp.full(n, i + 1, jnp.int32) for i, n in enumerate(LENGTHS)] + [jnp.zeros(SEQ - sum(LENGTHS), jnp.int32)])
    return tokens, seg


def _starts():
    return np.cumsum((0, *LENGTHS))


@pytest.mark.parametrize(
    "preset, scan",
    [("tiny-gpt2", True), ("tiny-llama", True), ("tiny-llama", False), ("tiny-mixtral", True)],
)
def test_packed_logits_equal_each_document_alone(preset, scan):
    model = models.create(models.get_config(preset, scan_layers=scan), key=jax.random.key(0))
    docs = _docs()
    tokens, seg = _row(docs)
    packed = eqx.filter_jit(lambda m, t, s: m(t, segment_ids=s))(model, tokens, seg)
    starts = _starts()
    alone_fn = eqx.filter_jit(lambda m, t: m(t))
    for i, doc in enumerate(docs):
        alone = alone_fn(model, doc)
        np.testing.assert_allclose(packed[starts[i] : starts[i + 1]], alone, atol=TOL, rtol=TOL)
    # Positions restart per segment; passing them explicitly gives the same logits.
    explicit = eqx.filter_jit(lambda m, t, s, p: m(t, segment_ids=s, positions=p))(model, tokens, seg, segment_positions(seg))
    np.testing.assert_allclose(explicit, packed, atol=TOL, rtol=TOL)
    np.testing.assert_array_equal(
        segment_positions(seg)[: starts[2] + 2], [*range(7), *range(5), 0, 1]
    )


def _packed_batch():
    docs_a, docs_b = _docs(0), _docs(1)
    rows = [_row(docs_a), _row(docs_b)]
    tokens = jnp.stack([r[0] for r in rows])
    seg = jnp.stack([r[1] for r in rows])
    # Targets: the next token within the document; the last position of each document (no next
    # token in it) and the padding do not count.
    targets = jnp.roll(tokens, -1, axis=1)
    mask = (seg != 0) & (jnp.roll(seg, -1, axis=1) == seg)
    return {"tokens": tokens, "targets": targets, "segment_ids": seg, "mask": mask}, [docs_a, docs_b]


def test_lm_loss_on_a_packed_batch_is_the_documents_loss_alone():
    model = models.create("tiny-llama", key=jax.random.key(0))
    batch, docs = _packed_batch()
    # Reference: each document alone, its n-1 next-token pairs, averaged over all pairs.
    total, count = 0.0, 0
    forward = eqx.filter_jit(model)  # one program per length (eagerly, one per operation and length)
    for row in docs:
        for doc in row:
            logits = forward(doc)[:-1]
            total += float(train.cross_entropy(logits, doc[1:])) * (len(doc) - 1)
            count += len(doc) - 1
    reference = total / count
    losses, grads = {}, {}
    for impl in train.LM_LOSS_IMPLEMENTATIONS:
        fn = eqx.filter_jit(eqx.filter_value_and_grad(lambda m, b, impl=impl: train.lm_loss(m, b, implementation=impl)[0]))
        losses[impl], grads[impl] = fn(model, batch)
    for impl, loss in losses.items():
        assert abs(float(loss) - reference) < TOL, (impl, float(loss), reference)
    for impl in ("chunked", "full"):
        for a, b in zip(jax.tree.leaves(grads["fused"]), jax.tree.leaves(grads[impl]), strict=True):
            np.testing.assert_allclose(a, b, atol=TOL, rtol=1e-4)


def test_padding_never_counts_without_a_mask():
    model = models.create("tiny-llama", key=jax.random.key(0))
    batch, _ = _packed_batch()
    no_mask = {k: v for k, v in batch.items() if k != "mask"}
    _, metrics = train.lm_loss(model, no_mask)
    assert int(metrics["tokens"]) == int(jnp.sum(batch["segment_ids"] != 0))


def test_mixtral_router_losses_with_segments():
    model = models.create("tiny-mixtral", key=jax.random.key(0))
    batch, _ = _packed_batch()
    loss, metrics = eqx.filter_jit(train.lm_loss)(model, batch)
    assert np.isfinite(float(loss)) and float(metrics["moe_load_balance"]) > 0
    assert float(loss) > float(metrics["nll"])


def test_training_on_packed_documents_lowers_the_loss():
    rng = np.random.default_rng(0)
    # Documents that count up from a random start: easy to learn only within a document.
    docs = [np.arange(s, s + n) % 200 + 1 for s, n in zip(rng.integers(0, 200, 64), rng.integers(3, 20, 64), strict=True)]
    packed = data.pack_documents(docs, 32, eos_id=0)
    loader = data.ArrayLoader(packed, batch_size=8, seed=0)
    model = models.create(models.get_config("tiny-llama", max_seq=32), key=jax.random.key(0))
    optimizer = optax.adam(3e-3)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes weak types
        state = train.TrainState.create(model, optimizer, key=jax.random.key(1))
        step = train.make_train_step(train.lm_loss, optimizer)
        losses = []
        for _ in range(30):
            state, metrics = step(state, next(loader))
            losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_packing_argument_errors():
    model = models.create("tiny-llama", key=jax.random.key(0))
    tokens = jnp.arange(6, dtype=jnp.int32)
    with pytest.raises(ShapeError, match=r"Llama: segment_ids must have one entry per position, shape \(6,\); got \(1, 6\)"):
        model(tokens, segment_ids=jnp.ones((1, 6), jnp.int32))
    with pytest.raises(ShapeError, match=r"Llama: positions must be integers; got dtype float32"):
        model(tokens, positions=jnp.zeros(6))
    batch = {"tokens": tokens[None], "targets": tokens[None], "segment_ids": jnp.ones((1, 5), jnp.int32)}
    with pytest.raises(ShapeError, match=r"batch\['segment_ids'\] must have the tokens' shape \(1, 6\); got \(1, 5\)"):
        train.lm_loss(model, batch)
