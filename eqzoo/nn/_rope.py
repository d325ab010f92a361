"""Rotary position embeddings (Su et al., 2021, "RoFormer"), with Llama-3 style frequency scaling."""

import dataclasses
import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer

from .._errors import ConfigError, ShapeError, check_positive_numbers, check_sizes, shape_str


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling: the `rope_scaling` block of a HF config.

    - `rope_type="llama3"` (Llama 3.1): long wavelengths are divided by `factor`, short ones
      kept, and the band between is interpolated smoothly.
    - `rope_type="linear"` (position interpolation; Gemma 3's global layers): every frequency is
      divided by `factor`, i.e. positions are divided by it. Only `factor` is used.

    **Arguments:** `factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`, `rope_type`.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"

    def __post_init__(self):
        if self.rope_type not in ("llama3", "linear"):
            raise ConfigError(f"RopeScaling: rope_type must be 'llama3' or 'linear', got {self.rope_type!r}.")
        if self.rope_type == "linear":
            if not self.factor > 0:
                raise ConfigError(f"RopeScaling(rope_type='linear') needs factor > 0; got factor={self.factor}.")
            return
        if not (self.factor > 0 and 0 < self.low_freq_factor < self.high_freq_factor < math.inf):
            raise ConfigError(
                f"RopeScaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor; got "
                f"factor={self.factor}, low_freq_factor={self.low_freq_factor}, "
                f"high_freq_factor={self.high_freq_factor}."
            )
        length = self.original_max_position_embeddings
        if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 1:
            # 0 or a negative length put both wavelength bounds at or below 0: every frequency
            # would be divided by `factor`, linear scaling in disguise
            raise ConfigError(
                "RopeScaling: original_max_position_embeddings must be a positive integer (the "
                f"context length the model was pretrained at, 8192 for Llama 3.1); got {length!r}."
            )

    def apply(self, inv_freq: np.ndarray) -> np.ndarray:
        """Scale inverse frequencies (a numpy array) and return the new ones."""
        if self.rope_type == "linear":
            return inv_freq / self.factor
        low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        interpolated = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        out = np.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return np.where(middle, interpolated, out)


class RotaryEmbedding(eqx.Module):
    """Applies rotary position embeddings to queries or keys at given positions.

    Uses the "rotate half" layout (the first and second halves of `head_dim` form the pairs), as
    Hugging Face's Llama does. Holds no parameters: the frequencies are constants.
    """

    head_dim: int = eqx.field(static=True)
    theta: float = eqx.field(static=True)
    scaling: RopeScaling | None = eqx.field(static=True)

    def __init__(self, head_dim: int, *, theta: float = 10000.0, scaling: RopeScaling | None = None):
        """**Arguments:**

        - `head_dim`: size of each head; must be even.
        - `theta`: base of the geometric sequence of wavelengths.
        - `scaling`: optional [`eqzoo.nn.RopeScaling`][].
        """
        check_sizes("RotaryEmbedding", head_dim=head_dim)
        check_positive_numbers("RotaryEmbedding", theta=theta)
        if head_dim % 2:
            raise ConfigError(f"rotary embeddings need an even head_dim, got {head_dim}.")
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling

    def inv_freq(self) -> np.ndarray:
        """The `head_dim // 2` inverse frequencies, as a float32 numpy array."""
        inv = 1.0 / (self.theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
        if self.scaling is not None:
            inv = self.scaling.apply(inv)
        return inv.astype(np.float32)

    def __call__(
        self, x: Float[Array, "seq heads head_dim"], positions: Integer[Array, " seq"]
    ) -> Float[Array, "seq heads head_dim"]:
        """**Arguments:**

        - `x`: queries or keys of one sequence.
        - `positions`: the absolute position of each row of `x`.

        **Returns:** `x` rotated, same shape and dtype.
        """
        if x.ndim != 3 or x.shape[-1] != self.head_dim:
            raise ShapeError(
                f"RotaryEmbedding(head_dim={self.head_dim}) takes queries or keys of shape (seq, heads, "
                f"{self.head_dim}); got {shape_str(x.shape)}. Build it with the attention's head_dim."
            )
        return rotate(x, positions, jnp.asarray(self.inv_freq()))


def rotate(
    x: Float[Array, "seq heads head_dim"], positions: Integer[Array, " seq"], inv_freq: Float[Array, " half"]
) -> Float[Array, "seq heads head_dim"]:
    """Rotate `x` (rotate-half layout) by `positions * inv_freq`: what a
    [`eqzoo.nn.RotaryEmbedding`][] does with its own frequencies. Takes the frequencies as an
    array so that a layer can choose between several at run time (Gemma 3's local and global
    layers)."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq.astype(jnp.float32)[None, :]
    cos = jnp.cos(angles)[:, None, :]  # (seq, 1, head_dim/2)
    sin = jnp.sin(angles)[:, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
