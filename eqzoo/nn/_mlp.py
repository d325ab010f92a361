"""Position-wise feed-forward layers: a GELU MLP (GPT-2) and gated SwiGLU / GeGLU (Llama, Gemma)."""

import equinox as eqx
import jax
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float

from .._errors import ConfigError, check_last_axis, check_sizes
from .._typing import PRNGKey
from ._linear import AbstractLinear, apply_linear, init_linear


class MLP(eqx.Module):
    """`down(gelu(up(x)))`, applied to each position (the GPT-2 feed-forward block)."""

    up: eqx.nn.Linear | AbstractLinear
    down: eqx.nn.Linear | AbstractLinear
    approximate_gelu: bool = eqx.field(static=True)

    def __init__(
        self,
        embed_dim: int,
        hidden_dim: int,
        *,
        use_bias: bool = True,
        approximate_gelu: bool = True,
        init_std: float = 0.02,
        out_init_std: float | None = None,
        dtype=None,
        key: PRNGKey,
    ):
        """**Arguments:** `embed_dim`, `hidden_dim`, `use_bias`, `approximate_gelu` (the tanh
        form GPT-2 uses), init scales, parameter `dtype` and `key`."""
        check_sizes("MLP", embed_dim=embed_dim, hidden_dim=hidden_dim)
        k1, k2 = jax.random.split(key)
        out_std = init_std if out_init_std is None else out_init_std
        self.up = init_linear(embed_dim, hidden_dim, use_bias=use_bias, std=init_std, dtype=dtype, key=k1)
        self.down = init_linear(hidden_dim, embed_dim, use_bias=use_bias, std=out_std, dtype=dtype, key=k2)
        self.approximate_gelu = approximate_gelu

    def __call__(
        self, x: Float[Array, "seq embed"], *, key: PRNGKey | None = None
    ) -> Float[Array, "seq embed"]:
        """**Arguments:** `x`, one sequence. **Returns:** same shape and dtype."""
        check_last_axis("MLP", x, self.up.in_features)
        h = checkpoint_name(apply_linear(self.up, x), "mlp_up")  # (seq, hidden)
        h = jax.nn.gelu(h, approximate=self.approximate_gelu)
        return checkpoint_name(apply_linear(self.down, h), "mlp_out")


GLU_ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
"""The gate activations [`eqzoo.nn.SwiGLU`][] takes: `"silu"` (SwiGLU: Llama, Mistral, Qwen),
`"gelu_tanh"` (GeGLU with the tanh GELU: Gemma) and `"gelu"` (GeGLU with the exact GELU)."""


def _glu_activation(name: str, x):
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=name == "gelu_tanh")


class SwiGLU(eqx.Module):
    """`down(act(gate(x)) * up(x))` with `act` = silu (SwiGLU) or GELU (GeGLU) (Shazeer, 2020,
    "GLU Variants Improve Transformer")."""

    gate: eqx.nn.Linear | AbstractLinear
    up: eqx.nn.Linear | AbstractLinear
    down: eqx.nn.Linear | AbstractLinear
    activation: str = eqx.field(static=True, default="silu")

    def __init__(
        self,
        embed_dim: int,
        hidden_dim: int,
        *,
        use_bias: bool = False,
        activation: str = "silu",
        init_std: float = 0.02,
        out_init_std: float | None = None,
        dtype=None,
        key: PRNGKey,
    ):
        """**Arguments:** `embed_dim`, `hidden_dim`, `use_bias`, `activation` (one of
        `GLU_ACTIVATIONS`: `"silu"`, `"gelu_tanh"`, `"gelu"`), init scales, `dtype`, `key`."""
        if activation not in GLU_ACTIVATIONS:
            raise ConfigError(f"SwiGLU: activation must be one of {GLU_ACTIVATIONS}, got {activation!r}.")
        check_sizes("SwiGLU", embed_dim=embed_dim, hidden_dim=hidden_dim)
        self.activation = activation
        k1, k2, k3 = jax.random.split(key, 3)
        out_std = init_std if out_init_std is None else out_init_std
        lin = dict(use_bias=use_bias, dtype=dtype)
        self.gate = init_linear(embed_dim, hidden_dim, std=init_std, key=k1, **lin)
        self.up = init_linear(embed_dim, hidden_dim, std=init_std, key=k2, **lin)
        self.down = init_linear(hidden_dim, embed_dim, std=out_std, key=k3, **lin)

    def __call__(
        self, x: Float[Array, "seq embed"], *, key: PRNGKey | None = None
    ) -> Float[Array, "seq embed"]:
        """**Arguments:** `x`, one sequence. **Returns:** same shape and dtype."""
        check_last_axis("SwiGLU", x, self.gate.in_features)
        g = checkpoint_name(apply_linear(self.gate, x), "mlp_gate")
        u = checkpoint_name(apply_linear(self.up, x), "mlp_up")
        return checkpoint_name(apply_linear(self.down, _glu_activation(self.activation, g) * u), "mlp_out")
