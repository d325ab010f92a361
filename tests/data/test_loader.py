import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo._errors import ConfigError, ShapeError
from eqzoo.data import ArrayLoader, TokenLoader

TOKENS = np.arange(10_000, dtype=np.int32) % 997


def _token_loader(**kw):
    args = dict(batch_size=8, seq_len=16, seed=0, process_index=0, process_count=1)
    args.update(kw)
    return TokenLoader(args.pop("tokens", TOKENS), **args)


def _array_loader(n=50, **kw):
    data = {
        "x": np.arange(n * 3, dtype=np.float32).reshape(n, 3),
        "y": np.arange(n, dtype=np.int32),
    }
    args = dict(batch_size=8, seed=0, process_index=0, process_count=1)
    args.update(kw)
    return ArrayLoader(data, **args)


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------- TokenLoader


def test_token_batch_shapes_and_targets():
    batch = next(_token_loader())
    assert batch["tokens"].shape == (8, 16) and batch["targets"].shape == (8, 16)
    assert batch["tokens"].dtype == np.int32 and batch["targets"].dtype == np.int32
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
    # Every row is a window of the stream: its targets are the next tokens.
    for row_t, row_y in zip(batch["tokens"], batch["targets"], strict=True):
        start = int(np.flatnonzero(TOKENS == row_t[0])[0])  # TOKENS is 0..996 repeated
        window = TOKENS[start : start + 17]
        np.testing.assert_array_equal(row_t, window[:-1])
        np.testing.assert_array_equal(row_y, window[1:])


def test_token_determinism():
    a = list(itertools.islice(_token_loader(seed=3), 4))
    b = list(itertools.islice(_token_loader(seed=3), 4))
    c = list(itertools.islice(_token_loader(seed=4), 4))
    assert all(_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(_equal(x, y) for x, y in zip(a, c, strict=True))
    assert not _equal(a[0], a[1])  # different steps differ


def test_token_batch_at_is_pure():
    loader = _token_loader()
    first = loader.batch_at(5)
    for _ in range(3):
        next(loader)
    assert loader.step == 3
    assert _equal(loader.batch_at(5), first)
    assert _equal(list(itertools.islice(loader, 3))[-1], first)


def test_token_resume_is_bitwise():
    uninterrupted = list(itertools.islice(_token_loader(seed=7), 10))
    loader = _token_loader(seed=7)
    for _ in range(6):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["step"] == 6 and state["seed"] == 7
    resumed = _token_loader(seed=7)
    resumed.load_state_dict(state)
    assert resumed.step == 6
    for expected in uninterrupted[6:]:
        assert _equal(next(resumed), expected)


@pytest.mark.parametrize("count", [2, 4])
def test_token_process_slices_make_the_global_batch(count):
    glob = _token_loader(batch_size=8).batch_at(3)
    parts = [_token_loader(process_index=i, process_count=count).batch_at(3) for i in range(count)]
    assert all(p["tokens"].shape == (8 // count, 16) for p in parts)
    for key in ("tokens", "targets"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), glob[key])


def test_token_defaults_to_jax_process():
    loader = TokenLoader(TOKENS, batch_size=4, seq_len=8, seed=0)
    assert loader.local_batch_size == 4  # one process in tests


def test_token_errors(unchecked):
    with pytest.raises(ShapeError, match=r"at least seq_len \+ 1 = 17 tokens.*got 16 tokens"):
        _token_loader(tokens=TOKENS[:16])
    with pytest.raises(ConfigError, match="batch_size=6, process_count=4"):
        _token_loader(batch_size=6, process_count=4)
    with pytest.raises(ConfigError, match="process_index=2, process_count=2"):
        _token_loader(process_index=2, process_count=2)
    with pytest.raises(ConfigError, match=r"seed=...\) must be an int >= 0; got -1"):
        _token_loader(seed=-1)
    with pytest.raises(ConfigError, match=r"seq_len=...\) must be an int >= 1; got 0"):
        _token_loader(seq_len=0)
    with unchecked(), pytest.raises(ConfigError, match=r"batch_size=...\) must be an int >= 1; got Array\(4, dtype=int32\)\. That is a JAX array, not a Python int: pass int\(x\)\."):
        _token_loader(batch_size=jnp.int32(4))  # (checking on, beartype refuses it first)


def test_token_load_state_errors():
    state = _token_loader(seed=1).state_dict()
    with pytest.raises(ConfigError, match="saved state has seed=1 but this loader has seed=2"):
        _token_loader(seed=2).load_state_dict(state)
    with pytest.raises(ConfigError, match="batch_size=8 but this loader has batch_size=4"):
        _token_loader(seed=1, batch_size=4).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"got unknown keys \['epoch'\] and missing keys \[\]"):
        _token_loader(seed=1).load_state_dict({**state, "epoch": 0})
    with pytest.raises(ConfigError, match=r"missing keys \['step'\]"):
        _token_loader(seed=1).load_state_dict({k: v for k, v in state.items() if k != "step"})
    with pytest.raises(ConfigError, match="'step' to be an int >= 0; got -3"):
        _token_loader(seed=1).load_state_dict({**state, "step": -3})



def test_a_state_from_another_token_stream_of_the_same_length_is_refused():
    # Another corpus or tokenizer with the same token count (here the stream reversed, and one
    # token changed in the middle) gave other batches after a "successful" resume.
    state = _token_loader().state_dict()
    assert isinstance(state["tokens_fingerprint"], int)
    changed = TOKENS.copy()
    changed[len(changed) // 2] += 1
    for other in (TOKENS[::-1].copy(), changed):
        with pytest.raises(ConfigError, match=r"saved state was taken over another token stream .* same number of tokens"):
            _token_loader(tokens=other).load_state_dict(state)
    _token_loader(tokens=TOKENS.copy()).load_state_dict(state)  # equal tokens in another array resume
    # ... and in another dtype (the batches are the same int32 windows), or as a list
    for same in (TOKENS.astype(np.uint16), TOKENS.astype(np.int64), TOKENS.tolist()):
        resumed = _token_loader(tokens=same)
        resumed.load_state_dict(state)
        np.testing.assert_array_equal(next(resumed)["tokens"], next(_token_loader(tokens=TOKENS))["tokens"])
    # a state saved by the first fingerprint (dtype and raw bytes hashed) still resumes
    from eqzoo.data._loader import _fingerprint

    first = {**state, "tokens_fingerprint": _fingerprint(TOKENS, legacy=True)}
    assert first["tokens_fingerprint"] != state["tokens_fingerprint"]
    _token_loader().load_state_dict(first)
    older = {k: v for k, v in state.items() if k != "tokens_fingerprint"}  # saved before fingerprints
    loader = _token_loader()
    loader.load_state_dict(older)
    assert loader.step == state["step"]


# ---------------------------------------------------------------------------------- ArrayLoader


def test_array_epoch_is_a_permutation():
    loader = _array_loader(n=48, batch_size=8)
    assert loader.steps_per_epoch == 6
    ys = np.concatenate([b["y"] for b in itertools.islice(loader, 6)])
    assert sorted(ys.tolist()) == list(range(48))
    assert ys.tolist() != list(range(48))  # shuffled
    assert loader.epoch == 1 and loader.step == 6
    batch = next(loader)
    np.testing.assert_array_equal(batch["x"][:, 0], batch["y"] * 3)  # rows stay aligned
    ys2 = np.concatenate([batch["y"]] + [b["y"] for b in itertools.islice(loader, 5)])
    assert sorted(ys2.tolist()) == list(range(48)) and ys2.tolist() != ys.tolist()


def test_array_drop_last_and_no_shuffle():
    drop = _array_loader(n=50, batch_size=8)
    assert drop.steps_per_epoch == 6
    keep = _array_loader(n=50, batch_size=8, drop_last=False, shuffle=False)
    assert keep.steps_per_epoch == 7
    batches = list(itertools.islice(keep, 8))
    assert batches[6]["y"].tolist() == [48, 49]
    assert batches[0]["y"].tolist() == list(range(8)) == batches[7]["y"].tolist()


def test_array_determinism_and_resume():
    a = list(itertools.islice(_array_loader(seed=5), 15))
    b = list(itertools.islice(_array_loader(seed=5), 15))
    c = list(itertools.islice(_array_loader(seed=6), 15))
    assert all(_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(_equal(x, y) for x, y in zip(a, c, strict=True))
    loader = _array_loader(seed=5)
    for _ in range(9):  # into the second epoch
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = _array_loader(seed=5)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    for expected in a[9:]:
        assert _equal(next(resumed), expected)
    assert _equal(resumed.batch_at(2), a[2])


@pytest.mark.parametrize("count", [2, 4])
def test_array_process_slices_make_the_global_batch(count):
    glob = _array_loader(seed=2).batch_at(8)
    parts = [
        _array_loader(seed=2, process_index=i, process_count=count).batch_at(8)
        for i in range(count)
    ]
    for key in ("x", "y"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), glob[key])


def test_array_errors():
    with pytest.raises(ShapeError, match=r"same number of examples.*'x': 4, 'y': 5"):
        ArrayLoader(
            {"x": np.zeros((4, 2)), "y": np.zeros(5)}, batch_size=2, seed=0, process_count=1
        )
    with pytest.raises(ConfigError, match="needs at least one array"):
        ArrayLoader({}, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match=r"got no examples.*'x': \(0, 3\).*split is not empty"):
        ArrayLoader({"x": np.zeros((0, 3))}, batch_size=2, seed=0, drop_last=False)
    with pytest.raises(ConfigError, match="needs at least batch_size=64 examples; got 50"):
        _array_loader(batch_size=64)
    with pytest.raises(ConfigError, match="final batch of 2, which cannot be split evenly"):
        _array_loader(n=50, drop_last=False, process_count=2)
    with pytest.raises(ConfigError, match="batch_size=8, process_count=3"):
        _array_loader(process_count=3)
    state = _array_loader().state_dict()
    with pytest.raises(ConfigError, match="shuffle=True but this loader has shuffle=False"):
        _array_loader(shuffle=False).load_state_dict(state)
    with pytest.raises(ConfigError, match="num_examples=50 but this loader has num_examples=40"):
        _array_loader(n=40).load_state_dict(state)
    token_state = _token_loader().state_dict()
    with pytest.raises(ConfigError, match=r"unknown keys \['num_tokens', 'seq_len', 'tokens_fingerprint'\]"):
        _array_loader().load_state_dict(token_state)


def test_array_state_from_rows_of_another_shape_is_refused():
    # Packed rows of another seq_len: the state names the per-example shapes that differ,
    # rather than only the dataset size (which changes with them, and is not a setting).
    n = 50
    state = json.loads(json.dumps(_array_loader(n).state_dict()))
    assert state["example_shapes"] == {"x": [3], "y": []}
    wider = ArrayLoader({"x": np.zeros((n, 4), np.float32), "y": np.zeros(n, np.int32)}, batch_size=8, seed=0,
                        process_index=0, process_count=1)
    with pytest.raises(ConfigError, match=r"examples have the names and shapes \{'x': \[3\], 'y': \[\]\}, but this loader's are \{'x': \[4\]"):
        wider.load_state_dict(state)
    renamed = ArrayLoader({"z": np.zeros((n, 3), np.float32), "y": np.zeros(n, np.int32)}, batch_size=8, seed=0,
                          process_index=0, process_count=1)
    with pytest.raises(ConfigError, match="names and shapes"):
        renamed.load_state_dict(state)
    # A state saved before the shapes were recorded still resumes.
    loader = _array_loader(n)
    loader.load_state_dict({k: v for k, v in {**state, "step": 7}.items() if k != "example_shapes"})
    assert loader.step == 7


def test_token_accepts_unsigned_tokens():
    # Token files on disk are often uint16; windows still come out int32.
    small = _token_loader(tokens=TOKENS.astype(np.uint16)).batch_at(2)
    assert small["tokens"].dtype == np.int32
    assert _equal(small, _token_loader().batch_at(2))


@pytest.mark.parametrize("bad", [np.zeros(100, np.float32), np.zeros((10, 10), np.int32)])
def test_token_needs_1d_integer_tokens(bad):
    # Under jaxtyping checking (as in this suite) the annotation rejects these first; without
    # it, the loader's own ShapeError does.
    with pytest.raises((ShapeError, TypeError), match="1-D integer token array|Type-check"):
        _token_loader(tokens=bad)


def test_a_key_for_a_seed_is_named(unchecked):
    # int_hint read a typed key's dtype as NumPy's and raised TypeError, hiding this message
    with unchecked(), pytest.raises(ConfigError, match=r"TokenLoader\(seed=...\) must be an int >= 0; got Array\(\(\), dtype=key<fry>\)"):
        TokenLoader(TOKENS, batch_size=4, seq_len=8, seed=jax.random.key(0))


def test_token_ids_int32_cannot_hold_are_refused():
    wide = TOKENS.astype(np.int64)
    wide[5000:] += 2**31  # ids past int32: astype(int32) wrapped them into negatives
    loader = TokenLoader(wide, batch_size=4, seq_len=8, seed=0)
    with pytest.raises(ConfigError, match=r"token id 21474\d+ does not fit the int32 ids the models take \(at most 2147483647\)"):
        for step in range(50):
            loader.batch_at(step)
    ok = TokenLoader(TOKENS.astype(np.uint32), batch_size=4, seq_len=8, seed=0).batch_at(0)
    assert ok["tokens"].dtype == np.int32
