"""Token and learned position embeddings."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer

from .._errors import ConfigError, check_last_axis, check_sizes
from .._typing import PRNGKey


class Embedding(eqx.Module):
    """A lookup table of `num_embeddings` vectors; also usable as a tied output head.

    Used for tokens (`vocab` rows) and for learned absolute positions (`max_seq` rows).
    """

    weight: Float[Array, "vocab embed"]

    def __init__(self, num_embeddings: int, embed_dim: int, *, init_std: float = 0.02, dtype=None, key: PRNGKey):
        """**Arguments:** table size, `embed_dim`, normal init scale `init_std`, `dtype`, `key`."""
        check_sizes("Embedding", num_embeddings=num_embeddings, embed_dim=embed_dim)
        dtype = jnp.float32 if dtype is None else dtype
        self.weight = init_std * jax.random.normal(key, (num_embeddings, embed_dim), dtype=dtype)

    @property
    def num_embeddings(self) -> int:
        """Rows in the table."""
        return self.weight.shape[0]

    def __call__(self, ids: Integer[Array, " seq"]) -> Float[Array, "seq embed"]:
        """**Arguments:** `ids`, integer indices in `[0, num_embeddings)`. **Returns:** their
        vectors.

        **Raises:** `ConfigError` for concrete ids (an eager call) outside the table. Traced
        ids are not checked: one past the end gives a NaN row, a negative one counts from the
        end, as `jnp.take` does."""
        if not isinstance(ids, jax.core.Tracer) and getattr(ids, "size", 0):
            host = np.asarray(ids)  # one transfer
            low, high = int(host.min()), int(host.max())
            if low < 0 or high >= self.num_embeddings:
                raise ConfigError(
                    f"Embedding: ids must lie in [0, {self.num_embeddings}) (the table's rows); got ids from {low} to "
                    f"{high}. An id past the end would read a NaN row and a negative one a row from the end; "
                    "check the tokenizer's vocabulary against the model's, or the position range against max_seq."
                )
        return jnp.take(self.weight, ids, axis=0)

    def attend(self, x: Float[Array, "seq embed"]) -> Float[Array, "seq vocab"]:
        """Logits of `x` against every row (a tied output head): `x @ weight.T`."""
        check_last_axis("Embedding.attend", x, self.weight.shape[-1])
        return x @ self.weight.T.astype(x.dtype)
