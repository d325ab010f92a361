"""Convolutional blocks with batch normalisation, its running statistics held the Equinox way
(`eqx.nn.State`; switch to inference with `eqx.nn.inference_mode`)."""

from collections.abc import Hashable

import equinox as eqx
import jax
from jaxtyping import Array, Float

from .._errors import ConfigError, ShapeError, check_sizes, shape_str
from .._typing import PRNGKey


class ConvBlock(eqx.Module):
    """`relu(batchnorm(conv(x)))` for one image of shape `(channels, height, width)`.

    Batch statistics are averaged over the named vmap axis `axis_name` (default `"batch"`): call
    it under `jax.vmap(..., axis_name="batch")`. Training normalises with the current batch's
    statistics; their running averages (in an `eqx.nn.State`) are used in inference mode.
    """

    conv: eqx.nn.Conv2d
    norm: eqx.nn.BatchNorm
    in_channels: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        axis_name: Hashable = "batch",
        momentum: float = 0.9,
        dtype=None,
        key: PRNGKey,
    ):
        """**Arguments:** channels, `kernel_size` (odd; "same" padding), `stride`, the vmap
        `axis_name` BatchNorm averages over, its `momentum`, `dtype` and `key`."""
        check_sizes("ConvBlock", in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride)
        if kernel_size % 2 == 0:
            # "same" padding of kernel_size // 2 on each side grows an even kernel's output by one
            raise ConfigError(
                f"ConvBlock: kernel_size must be odd (its padding keeps height and width at stride 1); "
                f"got kernel_size={kernel_size}. Use {kernel_size - 1} or {kernel_size + 1}."
            )
        self.conv = eqx.nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
            use_bias=False, dtype=dtype, key=key,
        )
        self.norm = eqx.nn.BatchNorm(out_channels, axis_name=axis_name, momentum=momentum, mode="batch", dtype=dtype)
        self.in_channels = in_channels

    def __call__(
        self, x: Float[Array, "channels height width"], state: eqx.nn.State, *, key: PRNGKey | None = None
    ) -> tuple[Float[Array, "out_channels out_height out_width"], eqx.nn.State]:
        """**Arguments:** one image and the model's `State`. **Returns:** `(output, new state)`."""
        if x.ndim != 3 or x.shape[0] != self.in_channels:
            raise ShapeError(
                f"ConvBlock takes one image of shape (channels={self.in_channels}, height, width); "
                f"got {shape_str(x.shape)}. Wrap the call in jax.vmap(..., axis_name='batch') "
                "for a batch."
            )
        h = self.conv(x)
        # BatchNorm runs in the dtype of its running statistics (float32 unless built otherwise):
        # under a bf16 compute policy the statistics stay float32 and only the output is bf16.
        stats_dtype = state.get(self.norm.batch_state_index)[0].dtype
        norm = jax.tree.map(lambda a: a.astype(stats_dtype) if eqx.is_inexact_array(a) else a, self.norm)
        # equinox's batch-mode BatchNorm mixes a Python float with its int32 step counter, which
        # strict dtype promotion rejects; allow standard promotion for that call only.
        with jax.numpy_dtype_promotion("standard"):
            y, state = norm(h.astype(stats_dtype), state)
        return jax.nn.relu(y).astype(h.dtype), state


class ResidualBlock(eqx.Module):
    """Two 3×3 `ConvBlock`s with a skip connection (He et al., 2016, "Deep Residual Learning").

    The skip is a strided 1×1 convolution when the channel count or resolution changes.
    """

    first: ConvBlock
    second: ConvBlock
    skip: eqx.nn.Conv2d | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        axis_name: Hashable = "batch",
        dtype=None,
        key: PRNGKey,
    ):
        """**Arguments:** channels, `stride` of the first convolution, BatchNorm `axis_name`,
        `dtype` and `key`."""
        k1, k2, k3 = jax.random.split(key, 3)
        self.first = ConvBlock(in_channels, out_channels, stride=stride, axis_name=axis_name, dtype=dtype, key=k1)
        self.second = ConvBlock(out_channels, out_channels, axis_name=axis_name, dtype=dtype, key=k2)
        if stride != 1 or in_channels != out_channels:
            self.skip = eqx.nn.Conv2d(in_channels, out_channels, 1, stride=stride, use_bias=False, dtype=dtype, key=k3)
        else:
            self.skip = None

    def __call__(
        self, x: Float[Array, "channels height width"], state: eqx.nn.State, *, key: PRNGKey | None = None
    ) -> tuple[Float[Array, "out_channels out_height out_width"], eqx.nn.State]:
        """**Arguments:** one image and the `State`. **Returns:** `(output, new state)`."""
        h, state = self.first(x, state)
        h, state = self.second(h, state)
        shortcut = x if self.skip is None else self.skip(x)
        return jax.nn.relu(h + shortcut), state
