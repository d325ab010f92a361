"""Mixed precision: parameter, compute and output dtypes, and dynamic loss scaling for fp16."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import PyTree

from .._errors import ConfigError

_FLOATS = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class Precision:
    """Which dtypes a train step uses.

    Parameters (and the optimizer's arithmetic) stay in `param_dtype`: `TrainState.create(...,
    precision=...)` casts the trainable ones to it. The forward and backward passes run on a
    copy cast to `compute_dtype`; the loss is taken in `output_dtype`. The LLM default
    `Precision.bf16()` keeps float32 master weights and computes in bfloat16.

    **Arguments:** `param_dtype`, `compute_dtype`, `output_dtype` as dtype names or dtypes
    (`"bfloat16"` or `jnp.bfloat16`; stored as names), and
    `loss_scale`: `None`, or `"dynamic"` (needed for float16 compute) to multiply the loss before
    the backward pass and skip steps whose gradients overflow.
    """

    param_dtype: DTypeLike = "float32"  # a name once built
    compute_dtype: DTypeLike = "float32"
    output_dtype: DTypeLike = "float32"
    loss_scale: str | None = None

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype", "output_dtype"):
            value = getattr(self, name)
            if not isinstance(value, str):  # jnp.bfloat16, np.dtype("float32"), ...
                try:
                    value = jnp.dtype(value).name
                except TypeError:
                    pass
                else:
                    object.__setattr__(self, name, value)
            if value not in _FLOATS:
                raise ConfigError(f"Precision.{name} must be one of {_FLOATS}, got {value!r}.")
        if self.loss_scale not in (None, "dynamic"):
            raise ConfigError(f"Precision.loss_scale must be None or 'dynamic', got {self.loss_scale!r}.")
        if self.compute_dtype == "float16" and self.loss_scale is None:
            raise ConfigError(
                "float16 compute needs loss scaling to avoid underflowing gradients: use "
                "Precision.fp16() (loss_scale='dynamic') or bfloat16 compute."
            )

    @classmethod
    def fp32(cls) -> "Precision":
        """Everything in float32."""
        return cls()

    @classmethod
    def bf16(cls) -> "Precision":
        """float32 parameters, bfloat16 compute, float32 loss."""
        return cls(compute_dtype="bfloat16")

    @classmethod
    def fp16(cls) -> "Precision":
        """float32 parameters, float16 compute with dynamic loss scaling."""
        return cls(compute_dtype="float16", loss_scale="dynamic")

    def cast_to_compute(self, tree: PyTree) -> PyTree:
        """Cast every floating-point array leaf of `tree` to `compute_dtype`."""
        return cast_floating(tree, jnp.dtype(self.compute_dtype))

    def cast_to_param(self, tree: PyTree) -> PyTree:
        """Cast every floating-point array leaf of `tree` to `param_dtype`."""
        return cast_floating(tree, jnp.dtype(self.param_dtype))


def check_precision(precision, who: str) -> None:
    """Raise `ConfigError` unless `precision` is a `Precision` (a string such as "bf16" is not)."""
    if not isinstance(precision, Precision):
        raise ConfigError(
            f"{who}: precision must be an eqzoo.train.Precision, e.g. Precision.bf16(); got {precision!r}."
        )


def cast_floating(tree: PyTree, dtype) -> PyTree:
    """Cast the floating-point array leaves of `tree` to `dtype`, leaving everything else alone."""

    def cast(x):
        if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)


class DynamicLossScale(eqx.Module):
    """A loss scale that halves on overflow and doubles after `period` finite steps.

    Kept in the optimizer state by [`eqzoo.train.make_train_step`][] when the precision policy
    asks for it.
    """

    scale: jax.Array
    good_steps: jax.Array
    period: int = eqx.field(static=True, default=2000)

    @classmethod
    def init(cls, initial: float = 2.0**15, period: int = 2000) -> "DynamicLossScale":
        """A scale starting at `initial`."""
        return cls(jnp.asarray(initial, jnp.float32), jnp.zeros((), jnp.int32), period)

    def adjust(self, grads_finite: jax.Array) -> "DynamicLossScale":
        """The next scale, given whether this step's gradients were all finite."""
        grow = self.good_steps + 1 >= self.period
        scale = jnp.where(
            grads_finite,
            jnp.where(grow, self.scale * 2.0, self.scale),
            jnp.maximum(self.scale / 2.0, 1.0),
        )
        good = jnp.where(grads_finite & ~grow, self.good_steps + 1, 0)
        return DynamicLossScale(scale, good.astype(jnp.int32), self.period)
