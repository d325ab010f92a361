"""Text sources: a corpus built from the Python standard library, and train/validation splits."""

import numbers
import os
import sysconfig
from pathlib import Path

import numpy as np
from jaxtyping import Integer

from .._errors import ConfigError, EqzooError, ShapeError

# Folders of the stdlib skipped when building the corpus: third-party packages, the (huge and
# repetitive) test suites, bundled apps, and folders that are data tables rather than code.
_EXCLUDED_DIRS = frozenset(
    {
        "__pycache__",
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "pydoc_data",
        "encodings",
    }
)


class CorpusError(EqzooError, FileNotFoundError):
    """The Python standard library's source files could not be found to build a corpus."""


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place (and sorting) keeps the walk deterministic and skips excluded trees.
        dirnames[:] = sorted(
            d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-")
        )
        for name in filenames:
            if name.endswith(".py"):
                files.append(Path(dirpath, name))
    # Sort on the path relative to the root, as POSIX text, so the order does not depend on
    # where Python is installed or on the filesystem's listing order.
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(*, max_chars: int | None = None) -> str:
    """Text made of the Python standard library's own `.py` source files.

    Files are read in sorted relative-path order and joined with a newline, so the corpus is
    identical on every machine with the same Python version. Nothing is downloaded. Files that
    are not valid UTF-8 are skipped, as are `site-packages`, the `test`/`tests` suites,
    `idlelib`, `lib2to3`, `turtledemo`, `ensurepip`, `pydoc_data` and `encodings` (codec
    tables rather than code).

    **Arguments:**

    - `max_chars`: if given, the corpus is truncated to its first `max_chars` characters
      (files past that point are not read). `None` returns the whole corpus (tens of MB).

    **Returns:** the corpus as one string.

    **Raises:** `ConfigError` for a non-positive `max_chars`; `CorpusError` when the standard
    library folder (`sysconfig.get_paths()["stdlib"]`) is missing or holds no `.py` files.
    """
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, numbers.Integral) or max_chars <= 0):
        raise ConfigError(
            f"stdlib_corpus(max_chars=...) must be a positive int or None; got {max_chars!r}. "
            "Pass e.g. max_chars=1_000_000, or None for the whole corpus."
        )
    stdlib = sysconfig.get_paths().get("stdlib")
    root = Path(stdlib) if stdlib else None
    if root is None or not root.is_dir():
        raise CorpusError(
            "stdlib_corpus needs the Python standard library's source folder, but "
            f'sysconfig.get_paths()["stdlib"] is {stdlib!r}, which is not a directory. '
            "Use a Python installation that ships its .py sources (some minimal or frozen "
            "builds do not), or build the corpus from your own text."
        )
    files = _stdlib_files(root)
    if not files:
        raise CorpusError(
            f"stdlib_corpus found no .py files under the standard library folder {str(root)!r}. "
            "Use a Python installation that ships its .py sources, or build the corpus from "
            "your own text."
        )
    parts: list[str] = []
    total = 0
    for path in files:
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text + "\n")
        total += len(text) + 1
        if max_chars is not None and total >= max_chars:
            break
    corpus = "".join(parts)
    return corpus if max_chars is None else corpus[:max_chars]


def split_tokens(
    tokens: Integer[np.ndarray, " num_tokens"], val_fraction: float
) -> tuple[Integer[np.ndarray, " num_train"], Integer[np.ndarray, " num_val"]]:
    """Split a token array into a contiguous training part and a validation part after it.

    **Arguments:**

    - `tokens`: a 1-D integer token array.
    - `val_fraction`: the fraction of tokens (strictly between 0 and 1) that go to validation;
      the validation part is the last `int(len(tokens) * val_fraction)` tokens.

    **Returns:** `(train, val)`, views of `tokens` with `len(train) + len(val) == len(tokens)`.

    **Raises:** `ConfigError` if `val_fraction` is outside (0, 1) or either part would be empty;
    `ShapeError` if `tokens` is not 1-D.
    """
    if not isinstance(tokens, np.ndarray):  # a list, or a JAX array
        tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ShapeError(
            f"split_tokens takes a 1-D integer token array; got shape {tokens.shape} and dtype "
            f"{tokens.dtype}. Flatten it first (tokens.reshape(-1))."
        )
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(
            f"split_tokens needs 0 < val_fraction < 1; got {val_fraction!r}. "
            "Pass e.g. val_fraction=0.1 for a 90/10 split."
        )
    n = tokens.shape[0]
    num_val = int(n * val_fraction)
    if num_val == 0 or num_val == n:
        raise ConfigError(
            f"split_tokens(val_fraction={val_fraction!r}) on {n} tokens gives "
            f"{n - num_val} training and {num_val} validation tokens; both parts must be "
            "non-empty. Use more tokens or a val_fraction nearer 0.5."
        )
    return tokens[: n - num_val], tokens[n - num_val :]
