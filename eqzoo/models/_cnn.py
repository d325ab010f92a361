"""A small residual CNN for image classification, with BatchNorm state held the Equinox way."""

import dataclasses
from typing import no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._errors import ConfigError, ShapeError, check_floating, check_positive, shape_str
from .._typing import PRNGKey
from ..nn import ConvBlock, ResidualBlock
from ._validate import IMAGE_FIX, check_integer_fields


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """Hyperparameters of an [`eqzoo.models.CNN`][].

    **Arguments:** `in_channels`, `num_classes`, `widths` (channels of each stage; every stage
    after the first halves the resolution), `blocks_per_stage` residual blocks per stage.
    """

    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64)
    blocks_per_stage: int = 1

    def __post_init__(self):
        check_integer_fields(self)
        check_positive("CNNConfig", in_channels=self.in_channels, num_classes=self.num_classes)
        if not self.widths or any(w <= 0 for w in self.widths):
            raise ConfigError(f"CNNConfig: widths must be a non-empty tuple of positive ints, got {self.widths}.")
        if self.blocks_per_stage < 1:
            raise ConfigError(f"CNNConfig: blocks_per_stage must be >= 1, got {self.blocks_per_stage}.")

    def num_params(self) -> int:
        """Number of parameters (BatchNorm running statistics are state, not parameters)."""
        conv_bn = lambda cin, cout, k: cin * cout * k * k + 2 * cout  # noqa: E731  bias-free conv + BN
        n = conv_bn(self.in_channels, self.widths[0], 3)
        in_ch = self.widths[0]
        for stage, width in enumerate(self.widths):
            for b in range(self.blocks_per_stage):
                strided = stage > 0 and b == 0
                n += conv_bn(in_ch, width, 3) + conv_bn(width, width, 3)
                n += in_ch * width if (strided or in_ch != width) else 0  # 1x1 skip
                in_ch = width
        return n + in_ch * self.num_classes + self.num_classes


class CNN(eqx.Module):
    """Stem convolution, residual stages, global average pooling, linear classifier.

    Stateful (BatchNorm): build with `model, state = eqx.nn.make_with_state(CNN)(config, key=key)`
    (or [`eqzoo.models.create`][]), call under `jax.vmap(..., axis_name="batch")` during
    training, and use `eqx.nn.inference_mode(model)` for evaluation.
    """

    config: CNNConfig = eqx.field(static=True)
    stem: ConvBlock
    blocks: tuple[ResidualBlock, ...]
    head: eqx.nn.Linear

    def __init__(self, config: CNNConfig, *, key: PRNGKey):
        """**Arguments:** `config`, a [`eqzoo.models.CNNConfig`][]; `key`, a PRNG key."""
        c = config
        n_blocks = len(c.widths) * c.blocks_per_stage
        k_stem, k_head, *k_blocks = jax.random.split(key, 2 + n_blocks)
        self.config = c
        self.stem = ConvBlock(c.in_channels, c.widths[0], key=k_stem)
        blocks = []
        in_ch = c.widths[0]
        for stage, width in enumerate(c.widths):
            for b in range(c.blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(ResidualBlock(in_ch, width, stride=stride, key=k_blocks[len(blocks)]))
                in_ch = width
        self.blocks = tuple(blocks)
        self.head = eqx.nn.Linear(in_ch, c.num_classes, key=k_head)

    def features(
        self, x: Float[Array, "channels height width"], state: eqx.nn.State
    ) -> tuple[Float[Array, " features"], eqx.nn.State]:
        """The pooled features of one image before the classifier. **Returns:** `(features, state)`."""
        h, state = self.stem(x.astype(self.stem.conv.weight.dtype), state)  # compute in the params' dtype
        for block in self.blocks:
            h, state = block(h, state)
        return jnp.mean(h, axis=(1, 2)), state

    @no_type_check  # our check below explains batching better than a generic type error
    def __call__(
        self, x: Float[Array, "channels height width"], state: eqx.nn.State, *, key: PRNGKey | None = None
    ) -> tuple[Float[Array, " classes"], eqx.nn.State]:
        """Class logits of one image. **Returns:** `(logits, new state)`."""
        c = self.config.in_channels
        if getattr(x, "ndim", None) != 3 or x.shape[0] != c:
            raise ShapeError(
                f"CNN takes one image of shape (channels={c}, height, width); got "
                f"{shape_str(getattr(x, 'shape', ()))}. For a batch, wrap the call in "
                "jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name='batch')."
            )
        check_floating("CNN", x, "images", IMAGE_FIX)
        feats, state = self.features(jnp.asarray(x), state)  # a NumPy image is accepted like a JAX one
        return self.head(feats), state
