"""Patch embedding: an image cut into non-overlapping square patches, each projected linearly."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._errors import ShapeError, check_sizes, shape_str
from .._typing import PRNGKey


class PatchEmbed(eqx.Module):
    """Split one image into `patch_size x patch_size` patches and project each to `embed_dim`.

    The same map as a convolution with kernel size and stride `patch_size` (Dosovitskiy et al.,
    2021, "An Image is Worth 16x16 Words"), and its weight has a convolution's
    `(embed, channels, patch, patch)` layout, so a PyTorch `Conv2d` patch projection loads as is.
    Computed as one matrix product over the patches, in the input's dtype.
    """

    weight: Float[Array, "embed channels patch patch"]
    bias: Float[Array, " embed"] | None
    patch_size: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        patch_size: int,
        *,
        use_bias: bool = True,
        init_std: float | None = None,
        dtype=None,
        key: PRNGKey,
    ):
        """**Arguments:**

        - `in_channels`: channels of the image.
        - `embed_dim`: width of each patch's embedding.
        - `patch_size`: side of the square patches (and the stride between them).
        - `use_bias`: learn an additive bias.
        - `init_std`: normal init scale; default `1 / sqrt(in_channels * patch_size**2)` (LeCun).
        - `dtype`: parameter dtype (`None`: the default float). `key`: a PRNG key.
        """
        check_sizes("PatchEmbed", in_channels=in_channels, embed_dim=embed_dim, patch_size=patch_size)
        dtype = jnp.float32 if dtype is None else dtype
        fan_in = in_channels * patch_size * patch_size
        std = 1.0 / math.sqrt(fan_in) if init_std is None else init_std
        shape = (embed_dim, in_channels, patch_size, patch_size)
        self.weight = std * jax.random.normal(key, shape, dtype=dtype)
        self.bias = jnp.zeros((embed_dim,), dtype=dtype) if use_bias else None
        self.patch_size = patch_size

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKey | None = None
    ) -> Float[Array, "patches embed"]:
        """**Arguments:** `x`, one image whose height and width are multiples of `patch_size`.

        **Returns:** one embedding per patch, in row-major order (left to right, then top to
        bottom, as a convolution's output flattened), in the dtype of `x`.
        """
        c, h, w = x.shape
        p = self.patch_size
        if c != self.weight.shape[1] or h % p or w % p:
            raise ShapeError(
                f"PatchEmbed takes one image of shape (channels={self.weight.shape[1]}, height, width) "
                f"with height and width multiples of patch_size={p}; got {shape_str(x.shape)}."
            )
        patches = x.reshape(c, h // p, p, w // p, p)
        # (rows, cols, embed): each patch's pixels contracted with the kernel.
        out = jnp.einsum("cipjq,ecpq->ije", patches, self.weight.astype(x.dtype))
        out = out.reshape((h // p) * (w // p), -1)  # (patches, embed)
        if self.bias is not None:
            out = out + self.bias.astype(x.dtype)
        return out
