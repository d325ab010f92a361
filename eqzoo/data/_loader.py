"""Deterministic, resumable, host-sharded loaders that yield numpy batches.

Every batch is a pure function of `(seed, step)` (plus the epoch derived from `step` for
`ArrayLoader`), so a loader's whole position is the small JSON-able dict `state_dict()` returns,
and resuming from it yields bitwise the same batches as never stopping. The batch size is the
*global* batch: process `i` of `P` materialises only rows `[i*B/P, (i+1)*B/P)`.
"""

import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, final

import numpy as np
from jaxtyping import Array, Int, Integer

from .._errors import ConfigError, ShapeError, int_hint, shape_str


def _check_int(name: str, value: Any, *, minimum: int, who: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"{who}({name}=...) must be an int >= {minimum}; got {value!r}.{int_hint(value)} {hint}")
    return int(value)


def _resolve_process(
    batch_size: int, process_index: int | None, process_count: int | None, who: str
) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    process_count = _check_int(
        "process_count", process_count, minimum=1, who=who, hint="Use jax.process_count()."
    )
    process_index = _check_int(
        "process_index", process_index, minimum=0, who=who, hint="Use jax.process_index()."
    )
    if process_index >= process_count:
        raise ConfigError(
            f"{who} needs 0 <= process_index < process_count; got process_index={process_index}"
            f", process_count={process_count}. Leave both as None to use jax.process_index() "
            "and jax.process_count()."
        )
    if batch_size % process_count:
        raise ConfigError(
            f"{who}: the global batch_size must be divisible by process_count so every process "
            f"gets the same number of rows; got batch_size={batch_size}, "
            f"process_count={process_count}. Use a batch_size that is a multiple of "
            f"{process_count}."
        )
    return process_index, process_count


def _load_state(
    who: str, state: Mapping[str, Any], expected: dict[str, Any], optional: frozenset[str] = frozenset(),
    why: Mapping[str, str] | None = None,
) -> int:
    """Validate a state dict against this loader's configuration and return its step. Keys in
    `optional` may be absent (states saved before eqzoo recorded them); then they are not checked.
    `why[key]`, where given, is what a mismatch of that key means, said instead of the advice to
    construct the loader with the saved value (a fingerprint is not a setting)."""
    if not isinstance(state, Mapping):
        raise ConfigError(f"{who}.load_state_dict takes a dict; got {type(state).__name__}.")
    keys = set(expected) | {"step"}
    if set(state) | (optional & keys) != keys:
        unknown = sorted(set(state) - keys)
        missing = sorted(keys - set(state) - optional)
        raise ConfigError(
            f"{who}.load_state_dict expects exactly the keys {sorted(keys)}; got unknown keys "
            f"{unknown} and missing keys {missing}. Pass the dict that {who}.state_dict() "
            "returned (a state from another kind of loader does not fit)."
        )
    for key, want in expected.items():
        if key not in state:  # an optional key the saved state predates
            continue
        got = state[key]
        if key in (why or {}) and got != want:
            raise ConfigError(f"{who}.load_state_dict: {why[key].format(got=got, want=want)}")
        if got != want or type(got) is not type(want):
            raise ConfigError(
                f"{who}.load_state_dict: the saved state has {key}={got!r} but this loader has "
                f"{key}={want!r}; resuming would yield different batches. Construct the loader "
                f"with {key}={got!r} (the settings of the run being resumed)."
            )
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(
            f"{who}.load_state_dict needs 'step' to be an int >= 0; got {step!r}. Pass the "
            f"dict that {who}.state_dict() returned."
        )
    return step


def _fingerprint(tokens: np.ndarray, *, legacy: bool = False) -> int:
    """CRC-32 of a token stream's length and a fixed sample of its values: the first, middle
    and last 65,536 tokens and 256 windows of 64 spread evenly over the whole (about 1 MiB read,
    whatever the stream's size). The values are hashed as int64, so the same ids stored in
    another dtype (int32 ids in a uint16 memmap) match. `legacy`: the first version, which
    hashed the dtype and the raw bytes (states saved with it still resume)."""
    n, block = tokens.shape[0], 65_536
    starts = {0, max(0, n // 2 - block // 2), max(0, n - block)}
    parts = [tokens[a : a + block] for a in sorted(starts)]
    parts += [tokens[a : a + 64] for a in np.linspace(0, max(0, n - 64), 256).astype(np.int64)]
    crc = zlib.crc32(f"{n}:{tokens.dtype.str}".encode() if legacy else f"{n}:ids".encode())
    for part in parts:
        crc = zlib.crc32(np.ascontiguousarray(part if legacy else part.astype(np.int64)).tobytes(), crc)
    return crc


@final
class TokenLoader:
    """Batches of random windows of a token stream, for language modelling.

    Batch `step` takes `batch_size` windows of `seq_len + 1` tokens at offsets drawn from
    `np.random.default_rng([seed, step])`, so `batch_at(step)` is a pure function and the loader
    is an infinite iterator whose only state is `step`. Each process computes the offsets for
    the whole global batch but gathers tokens only for its own rows.

    **Arguments:**

    - `tokens`: a 1-D integer token array (a `np.memmap` works; only windows are read); a
      list or a JAX array is copied into a NumPy array once.
    - `batch_size`: the GLOBAL batch size, across all processes.
    - `seq_len`: tokens per row.
    - `seed`: an int >= 0; with `step` it fixes every batch.
    - `process_index`, `process_count`: this process and how many there are; `None` means
      `jax.process_index()` / `jax.process_count()`.

    Each batch is `{"tokens": int32 (batch, seq), "targets": int32 (batch, seq)}` with
    `batch = batch_size // process_count` and `targets[:, t] == tokens[:, t + 1]` within the
    window (the next token).
    """

    def __init__(
        self,
        tokens: Integer[np.ndarray, " num_tokens"] | Integer[Array, " num_tokens"] | Sequence[int],
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        who = "TokenLoader"
        if not isinstance(tokens, np.ndarray):  # a list, or a JAX array (copied to the host once)
            tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ShapeError(
                "TokenLoader takes a 1-D integer token array; got shape "
                f"{shape_str(tokens.shape)} and dtype {tokens.dtype}. Encode text with a "
                "tokenizer and concatenate documents into one stream (tokens.reshape(-1))."
            )
        self._batch_size = _check_int(
            "batch_size", batch_size, minimum=1, who=who, hint="It is the global batch size."
        )
        self._seq_len = _check_int(
            "seq_len", seq_len, minimum=1, who=who, hint="It is the number of tokens per row."
        )
        self._seed = _check_int(
            "seed", seed, minimum=0, who=who, hint="numpy seeds must be non-negative."
        )
        if tokens.shape[0] < self._seq_len + 1:
            raise ShapeError(
                f"TokenLoader needs at least seq_len + 1 = {self._seq_len + 1} tokens (a window "
                f"plus its next-token target); got {tokens.shape[0]} tokens. Use a shorter "
                "seq_len or more text."
            )
        self._index, self._count = _resolve_process(
            self._batch_size, process_index, process_count, who
        )
        self._tokens = tokens
        self._fingerprint: int | None = None
        self._step = 0

    @property
    def step(self) -> int:
        """The step of the next batch `next()` returns."""
        return self._step

    @property
    def seed(self) -> int:
        """The seed the batches derive from."""
        return self._seed

    @property
    def batch_size(self) -> int:
        """The global batch size."""
        return self._batch_size

    @property
    def local_batch_size(self) -> int:
        """Rows this process materialises per batch: `batch_size // process_count`."""
        return self._batch_size // self._count

    @property
    def seq_len(self) -> int:
        """Tokens per row."""
        return self._seq_len

    def batch_at(self, step: int) -> dict[str, Int[np.ndarray, "batch seq"]]:
        """This process's rows of global batch `step`; does not change the loader's position.

        **Returns:** `{"tokens": int32 (batch, seq), "targets": int32 (batch, seq)}`.
        """
        step = _check_int("step", step, minimum=0, who="TokenLoader.batch_at", hint="")
        n, t = self._tokens.shape[0], self._seq_len
        rng = np.random.default_rng([self._seed, step])
        # Offsets for the whole global batch, so each row's window is the same whichever
        # process draws it; only this process's rows are gathered.
        offsets = rng.integers(0, n - t, size=self._batch_size)  # (global_batch,)
        rows = self.local_batch_size
        mine = offsets[self._index * rows : (self._index + 1) * rows]
        windows = self._tokens[mine[:, None] + np.arange(t + 1)]  # (batch, seq + 1)
        if windows.dtype.itemsize > 4 or windows.dtype == np.uint32:  # ids int32 cannot hold would wrap
            high = int(windows.max())
            if high > np.iinfo(np.int32).max:
                raise ConfigError(
                    f"TokenLoader.batch_at({step}): token id {high} does not fit the int32 ids the models take "
                    f"(at most {np.iinfo(np.int32).max}); the corpus ({self._tokens.dtype}) holds ids no vocabulary "
                    "reaches. Check the token stream's encoding."
                )
        windows = windows.astype(np.int32)
        return {"tokens": windows[:, :-1], "targets": windows[:, 1:]}

    def __iter__(self) -> Iterator[dict[str, Int[np.ndarray, "batch seq"]]]:
        return self

    def __next__(self) -> dict[str, Int[np.ndarray, "batch seq"]]:
        batch = self.batch_at(self._step)
        self._step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """The loader's position and the settings it must be resumed with, as a JSON-able dict.

        **Returns:** `{"step", "seed", "batch_size", "seq_len", "num_tokens",
        "tokens_fingerprint"}`. The fingerprint is a CRC-32 of the token stream's length and a
        fixed sample of its values (whatever their dtype) (its first, middle and last 64 Ki tokens and 256 windows spread
        over the rest), cheap even for a memory-mapped corpus of billions of tokens, that tells
        another corpus or tokenizer of the same length apart. It does not depend on the process,
        so one saved state resumes any process (or process count).
        """
        return {"step": self._step, **self._config()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict()`'s output: the next batch is the one that would have come.

        **Raises:** `ConfigError` for unknown or missing keys, a negative step, or a seed,
        batch size, sequence length, token count or token fingerprint that differs from this
        loader's (a state saved before the fingerprint was recorded is resumed without it).
        """
        config = self._config()
        saved = state.get("tokens_fingerprint") if isinstance(state, Mapping) else None
        if saved not in (None, config["tokens_fingerprint"]) and saved == _fingerprint(self._tokens, legacy=True):
            state = {**state, "tokens_fingerprint": config["tokens_fingerprint"]}  # the first version's
        self._step = _load_state(
            "TokenLoader", state, config, optional=frozenset({"tokens_fingerprint"}), why={"tokens_fingerprint": (
                "the saved state was taken over another token stream (fingerprint {got} against this loader's "
                "{want}, with the same number of tokens): another corpus, tokenizer or ordering would yield "
                "different batches. Build the loader from the tokens of the run being resumed."
            )},
        )

    def _config(self) -> dict[str, int]:
        if self._fingerprint is None:  # once: the tokens never change
            self._fingerprint = _fingerprint(self._tokens)
        return {
            "seed": self._seed,
            "batch_size": self._batch_size,
            "seq_len": self._seq_len,
            "num_tokens": int(self._tokens.shape[0]),
            "tokens_fingerprint": self._fingerprint,
        }

    def __repr__(self) -> str:
        return (
            f"TokenLoader(num_tokens={self._tokens.shape[0]}, batch_size={self._batch_size}, "
            f"seq_len={self._seq_len}, seed={self._seed}, step={self._step}, "
            f"process={self._index}/{self._count})"
        )


@final
class ArrayLoader:
    """Batches of a dataset of equal-length arrays (e.g. images and labels), epoch by epoch.

    Epoch `e` visits the examples in the order `np.random.default_rng([seed, e]).permutation`
    (or in order when `shuffle=False`); `step` counts batches across epochs, so
    `batch_at(step)` is a pure function and the loader is an infinite iterator whose only
    state is `step`. Take one epoch with `itertools.islice(loader, loader.steps_per_epoch)`.

    **Arguments:**

    - `arrays`: a dict of numpy arrays sharing their leading (example) axis length.
    - `batch_size`: the GLOBAL batch size, across all processes.
    - `seed`: an int >= 0; with the epoch it fixes the order.
    - `shuffle`: permute the examples each epoch.
    - `drop_last`: skip the final partial batch of each epoch. With `drop_last=False` the
      last batch of an epoch is smaller; that needs `process_count == 1` (processes must get
      equal rows), unless the dataset size divides evenly.
    - `process_index`, `process_count`: this process and how many there are; `None` means
      `jax.process_index()` / `jax.process_count()`.

    Each batch is a dict with the same keys as `arrays`, holding this process's
    `batch_size // process_count` rows (all processes' rows, concatenated in process order,
    make the global batch).
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        who = "ArrayLoader"
        if not arrays:
            raise ConfigError(
                "ArrayLoader needs at least one array; got an empty dict. Pass e.g. "
                '{"image": images, "label": labels}.'
            )
        lengths = {}
        for name, arr in arrays.items():
            if not isinstance(arr, np.ndarray) or arr.ndim == 0:
                raise ShapeError(
                    f"ArrayLoader needs numpy arrays with a leading example axis; {name!r} is "
                    f"{type(arr).__name__} of shape {getattr(arr, 'shape', None)}. Convert it "
                    "with np.asarray and give it shape (num_examples, ...)."
                )
            lengths[name] = arr.shape[0]
        if len(set(lengths.values())) != 1:
            raise ShapeError(
                "ArrayLoader needs every array to have the same number of examples (leading "
                f"axis); got {lengths}. Check the arrays belong to the same dataset split."
            )
        self._num_examples = next(iter(lengths.values()))
        self._batch_size = _check_int(
            "batch_size", batch_size, minimum=1, who=who, hint="It is the global batch size."
        )
        self._seed = _check_int(
            "seed", seed, minimum=0, who=who, hint="numpy seeds must be non-negative."
        )
        self._shuffle = bool(shuffle)
        self._drop_last = bool(drop_last)
        self._index, self._count = _resolve_process(
            self._batch_size, process_index, process_count, who
        )
        if self._num_examples == 0:
            raise ConfigError(
                f"ArrayLoader got no examples (the arrays' leading axis is 0: shapes "
                f"{ {name: arr.shape for name, arr in arrays.items()} }). Check the dataset split is not empty."
            )
        full, rest = divmod(self._num_examples, self._batch_size)
        self._steps_per_epoch = full + (0 if self._drop_last or rest == 0 else 1)
        if self._steps_per_epoch == 0:
            raise ConfigError(
                f"ArrayLoader with drop_last=True needs at least batch_size={self._batch_size} "
                f"examples; got {self._num_examples}. Use a smaller batch_size or "
                "drop_last=False."
            )
        if not self._drop_last and rest and self._count > 1:
            raise ConfigError(
                f"ArrayLoader(drop_last=False) with {self._num_examples} examples leaves a final "
                f"batch of {rest}, which cannot be split evenly over process_count="
                f"{self._count}. Use drop_last=True, or a dataset size divisible by batch_size="
                f"{self._batch_size}."
            )
        self._arrays = dict(arrays)
        self._step = 0
        self._perm_cache: tuple[int, np.ndarray] | None = None

    @property
    def step(self) -> int:
        """The step (counted across epochs) of the next batch `next()` returns."""
        return self._step

    @property
    def epoch(self) -> int:
        """The epoch of the next batch `next()` returns."""
        return self._step // self._steps_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (counting a final partial batch when `drop_last=False`)."""
        return self._steps_per_epoch

    @property
    def num_examples(self) -> int:
        """The dataset size."""
        return self._num_examples

    @property
    def seed(self) -> int:
        """The seed the epoch orders derive from."""
        return self._seed

    @property
    def batch_size(self) -> int:
        """The global batch size."""
        return self._batch_size

    @property
    def local_batch_size(self) -> int:
        """Rows this process materialises per full batch: `batch_size // process_count`."""
        return self._batch_size // self._count

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self._shuffle:
            return np.arange(self._num_examples)
        cached = self._perm_cache  # read once: another thread's batch_at may replace it meanwhile
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self._seed, epoch]).permutation(self._num_examples))
            self._perm_cache = cached
        return cached[1]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`; does not change the loader's position.

        **Returns:** a dict with the keys of `arrays`, each of shape `(batch, ...)`.
        """
        step = _check_int("step", step, minimum=0, who="ArrayLoader.batch_at", hint="")
        epoch, i = divmod(step, self._steps_per_epoch)
        perm = self._permutation(epoch)
        idx = perm[i * self._batch_size : (i + 1) * self._batch_size]  # (global_batch,)
        rows = idx.shape[0] // self._count
        mine = idx[self._index * rows : (self._index + 1) * rows]
        return {name: arr[mine] for name, arr in self._arrays.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self._step)
        self._step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The loader's position and the settings it must be resumed with, as a JSON-able dict.

        **Returns:** `{"step", "seed", "batch_size", "num_examples", "shuffle", "drop_last",
        "example_shapes"}`, where `example_shapes` maps each array's name to the shape of one
        example (e.g. `{"tokens": [1024], ...}` for packed rows of 1024). It does not depend on
        the process, so one saved state resumes any process.
        """
        return {"step": self._step, **self._config()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict()`'s output: the next batch is the one that would have come.

        **Raises:** `ConfigError` for unknown or missing keys, a negative step, or settings
        (array names and per-example shapes, seed, batch size, dataset size, shuffle,
        drop_last) that differ from this loader's (a state saved before the shapes were
        recorded is resumed without them).
        """
        self._step = _load_state(
            "ArrayLoader", state, self._config(), optional=frozenset({"example_shapes"}), why={"example_shapes": (
                "the saved state was taken over arrays whose examples have the names and shapes {got}, but "
                "this loader's are {want}: other data (another sequence length for packed rows, other "
                "features) would make other batches. Build the loader from the data of the run being "
                "resumed, or start a new run for the new data."
            )},
        )

    def _config(self) -> dict[str, Any]:
        return {
            "example_shapes": {name: list(arr.shape[1:]) for name, arr in self._arrays.items()},
            "seed": self._seed,
            "batch_size": self._batch_size,
            "num_examples": self._num_examples,
            "shuffle": self._shuffle,
            "drop_last": self._drop_last,
        }

    def __repr__(self) -> str:
        return (
            f"ArrayLoader(num_examples={self._num_examples}, batch_size={self._batch_size}, "
            f"seed={self._seed}, shuffle={self._shuffle}, drop_last={self._drop_last}, "
            f"step={self._step}, process={self._index}/{self._count})"
        )
