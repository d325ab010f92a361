"""DiT, the diffusion transformer (Peebles & Xie, 2023, "Scalable Diffusion Models with Transformers"):
patchify, fixed 2-D sin-cos positions, adaLN-Zero blocks conditioned on timestep and class, unpatchify."""

import dataclasses
from typing import no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer, Real

from .._errors import ConfigError, check_positive
from .._typing import PRNGKey
from ..nn import MLP, REMAT_POLICIES, Attention, Embedding, Stacked, apply_linear, linear_dtype
from ._denoiser import AbstractDenoiser, TimestepEmbedding, check_denoiser_inputs
from ._validate import check_integer_fields, check_scan_layers

_BACKENDS = ("xla", "cudnn", "auto")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Hyperparameters of a [`eqzoo.models.DiT`][]. Frozen and hashable.

    **Arguments:**

    - `image_size`: height and width of the (square) input, e.g. 32 for the 32x32x4 latents of
      256x256 images.
    - `in_channels`: image (or latent) channels; the output has as many.
    - `patch_size`: side of the square patches that become tokens (`(image_size/patch_size)^2`
      tokens).
    - `num_classes`: class labels for conditioning (one more, the null class, is learned for
      classifier-free guidance); `0` builds an unconditional model.
    - `num_layers`, `num_heads`, `embed_dim`, `mlp_ratio`: the transformer's depth, heads, width
      and MLP width multiple.
    - `frequency_dim`: width of the sinusoidal timestep features fed to the timestep MLP.
    - `layer_norm_eps`: epsilon of the (affine-free) LayerNorms.
    - `remat`, `scan_layers`, `attention_backend`: as in [`eqzoo.models.GPT2Config`][].
    """

    image_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    num_classes: int = 1000
    num_layers: int = 28
    num_heads: int = 16
    embed_dim: int = 1152
    mlp_ratio: int = 4
    frequency_dim: int = 256
    layer_norm_eps: float = 1e-6
    remat: str = "none"
    scan_layers: bool | str = "auto"
    attention_backend: str = "auto"

    def __post_init__(self):
        check_integer_fields(self)
        check_positive(
            "DiTConfig", image_size=self.image_size, in_channels=self.in_channels,
            patch_size=self.patch_size, num_layers=self.num_layers, num_heads=self.num_heads,
            embed_dim=self.embed_dim, mlp_ratio=self.mlp_ratio, frequency_dim=self.frequency_dim,
            layer_norm_eps=self.layer_norm_eps,
        )
        if self.num_classes < 0:
            raise ConfigError(f"DiTConfig: num_classes must be >= 0 (0 = unconditional), got {self.num_classes}.")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"DiTConfig: patch_size={self.patch_size} must divide image_size={self.image_size}; "
                f"try patch_size in {[p for p in range(1, self.image_size + 1) if self.image_size % p == 0]}."
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"DiTConfig: num_heads={self.num_heads} must divide embed_dim={self.embed_dim}.")
        if self.embed_dim % 4:
            raise ConfigError(
                f"DiTConfig: embed_dim={self.embed_dim} must be a multiple of 4 (the 2-D sin-cos "
                "position embedding gives each axis half the width, as sines and cosines)."
            )
        if self.frequency_dim % 2:
            raise ConfigError(f"DiTConfig: frequency_dim={self.frequency_dim} must be even (cosines and sines).")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"DiTConfig: unknown remat {self.remat!r}; choose from {list(REMAT_POLICIES)}.")
        object.__setattr__(self, "scan_layers", check_scan_layers(self.scan_layers, "DiTConfig"))
        if self.attention_backend not in _BACKENDS:
            raise ConfigError(f"DiTConfig: attention_backend must be one of {_BACKENDS}, got {self.attention_backend!r}.")

    @property
    def grid_size(self) -> int:
        """Patches along each side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image, `grid_size**2`."""
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """Values in one patch, `in_channels * patch_size**2`."""
        return self.in_channels * self.patch_size**2

    @property
    def hidden_dim(self) -> int:
        """Inner width of the MLP."""
        return self.mlp_ratio * self.embed_dim

    def num_params(self) -> int:
        """Number of parameters (the fixed sin-cos position table is not one)."""
        d, h, p = self.embed_dim, self.hidden_dim, self.patch_dim
        per_layer = 4 * d * d + 4 * d + 2 * d * h + h + d + d * 6 * d + 6 * d  # attn, MLP, adaLN
        embed = p * d + d + self.frequency_dim * d + d + d * d + d
        labels = (self.num_classes + 1) * d if self.num_classes else 0
        final = d * 2 * d + 2 * d + d * p + p
        return embed + labels + self.num_layers * per_layer + final

    def flops_per_image(self) -> float:
        """Training FLOPs for one image: 6 x the multiply-adds of the forward pass (per token: patch
        embedding, attention and MLP projections, output layer; per image: the timestep MLP and
        the adaLN projections; plus the attention scores, `2 T^2 d` per layer)."""
        d, h, p, t = self.embed_dim, self.hidden_dim, self.patch_dim, self.num_tokens
        per_token = p * d + self.num_layers * (4 * d * d + 2 * d * h) + d * p
        per_image = self.frequency_dim * d + d * d + self.num_layers * 6 * d * d + 2 * d * d
        return 6.0 * (t * per_token + per_image + self.num_layers * 2 * t * t * d)


def _layer_norm(x: Float[Array, "seq embed"], eps: float) -> Float[Array, "seq embed"]:
    """LayerNorm without scale or bias (adaLN supplies them), in float32, returned in `x`'s dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


def _zero_linear(in_features: int, out_features: int, key: PRNGKey) -> eqx.nn.Linear:
    layer = eqx.nn.Linear(in_features, out_features, key=key)
    return eqx.tree_at(lambda lin: (lin.weight, lin.bias), layer, (jnp.zeros_like(layer.weight), jnp.zeros_like(layer.bias)))


def sincos_position_embedding(grid_size: int, dim: int) -> np.ndarray:
    """The fixed 2-D sin-cos position table of a `grid_size x grid_size` patch grid, `(grid**2, dim)`:
    the first half of each vector encodes the row, the second the column (float64 numpy)."""
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij")

    def one_axis(pos):
        angles = pos.reshape(-1, 1) * omega  # (tokens, dim/4)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(rows), one_axis(cols)], axis=1)


class DiTBlock(eqx.Module):
    """A transformer block with adaLN-Zero conditioning.

    From the conditioning vector `c` a linear layer makes a shift, a scale and a gate for each
    branch: `x + gate * attn(norm(x) * (1 + scale) + shift)`, the same for the MLP. The layer
    starts at zero, so every gate is zero and the block is the identity at initialisation.
    """

    attn: Attention
    mlp: MLP
    modulation: eqx.nn.Linear
    eps: float = eqx.field(static=True)

    def __init__(self, embed_dim: int, num_heads: int, hidden_dim: int, *, eps: float, backend: str, key: PRNGKey):
        """**Arguments:** width, heads, MLP `hidden_dim`, LayerNorm `eps`, attention `backend`, `key`."""
        ka, km, kc = jax.random.split(key, 3)
        self.attn = Attention(
            embed_dim, num_heads, use_bias=True, use_rope=False, causal=False,
            backend=backend, key=ka,  # type: ignore[arg-type]
        )
        self.mlp = MLP(embed_dim, hidden_dim, use_bias=True, key=km)
        self.modulation = _zero_linear(embed_dim, 6 * embed_dim, kc)
        self.eps = eps

    def __call__(self, x: Float[Array, "seq embed"], c: Float[Array, " embed"]) -> Float[Array, "seq embed"]:
        """**Arguments:** the tokens of one image and its conditioning vector. **Returns:** new tokens."""
        mod = apply_linear(self.modulation, jax.nn.silu(c))  # (6 embed,)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6)
        x = x + gate_a * self.attn(_modulate(_layer_norm(x, self.eps), shift_a, scale_a))
        return x + gate_m * self.mlp(_modulate(_layer_norm(x, self.eps), shift_m, scale_m))


class DiT(AbstractDenoiser):
    """The diffusion transformer on one image: `prediction = model(x, t, label)`.

    The image is cut into `patch_size x patch_size` patches, each linearly embedded and given a
    fixed 2-D sin-cos position; the timestep (sinusoid + MLP) and class embeddings are summed
    into one conditioning vector that modulates every block (adaLN-Zero); a final modulated
    LayerNorm and linear layer turn each token back into a patch. The modulation layers and the
    final layer start at zero, so the untrained model predicts exactly zero and each block starts
    as the identity (Peebles & Xie, 2023).
    """

    config: DiTConfig = eqx.field(static=True)
    patch_embed: eqx.nn.Linear
    time_embed: TimestepEmbedding
    label_embed: Embedding | None
    blocks: Stacked[DiTBlock]
    final_modulation: eqx.nn.Linear
    final_linear: eqx.nn.Linear

    def __init__(self, config: DiTConfig, *, key: PRNGKey):
        """**Arguments:** `config`, a [`eqzoo.models.DiTConfig`][]; `key`, a PRNG key."""
        c = config
        k_patch, k_time, k_label, k_blocks, k_mod, k_out = jax.random.split(key, 6)
        self.config = c
        self.patch_embed = eqx.nn.Linear(c.patch_dim, c.embed_dim, key=k_patch)
        self.time_embed = TimestepEmbedding(c.frequency_dim, c.embed_dim, c.embed_dim, key=k_time)
        self.label_embed = Embedding(c.num_classes + 1, c.embed_dim, key=k_label) if c.num_classes else None

        def make_block(k):
            return DiTBlock(c.embed_dim, c.num_heads, c.hidden_dim, eps=c.layer_norm_eps, backend=c.attention_backend, key=k)

        self.blocks = Stacked(make_block, c.num_layers, remat=c.remat, scan=c.scan_layers, key=k_blocks)  # type: ignore[arg-type]
        self.final_modulation = _zero_linear(c.embed_dim, 2 * c.embed_dim, k_mod)
        self.final_linear = _zero_linear(c.embed_dim, c.patch_dim, k_out)

    @property
    def null_label(self) -> int | None:
        """The null class index (`num_classes`), or `None` when unconditional."""
        return self.config.num_classes if self.config.num_classes else None

    def patchify(self, x: Float[Array, "channels height width"]) -> Float[Array, "tokens patch"]:
        """One image as a sequence of flattened patches, in row-major patch order."""
        c, g, p = self.config.in_channels, self.config.grid_size, self.config.patch_size
        x = x.reshape(c, g, p, g, p).transpose(1, 3, 0, 2, 4)  # (rows, cols, channels, p, p)
        return x.reshape(g * g, c * p * p)

    def unpatchify(self, patches: Float[Array, "tokens patch"]) -> Float[Array, "channels height width"]:
        """The inverse of `patchify`."""
        c, g, p = self.config.in_channels, self.config.grid_size, self.config.patch_size
        x = patches.reshape(g, g, c, p, p).transpose(2, 0, 3, 1, 4)  # (channels, rows, p, cols, p)
        return x.reshape(c, g * p, g * p)

    def condition(self, t: Real[Array, ""], label: Integer[Array, ""] | None) -> Float[Array, " embed"]:
        """The conditioning vector: timestep embedding plus class embedding."""
        cond = self.time_embed(t.astype(jnp.float32))
        if self.label_embed is not None and label is not None:
            cond = cond + self.label_embed.weight[label].astype(cond.dtype)
        return cond

    @no_type_check  # check_denoiser_inputs explains batching better than a generic type error
    def __call__(
        self,
        x: Float[Array, "channels height width"],
        t: Real[Array, ""] | float | int,
        label: Integer[Array, ""] | int | None = None,
        *,
        key: PRNGKey | None = None,
    ) -> Float[Array, "channels height width"]:
        """**Arguments:**

        - `x`: one noisy image `(in_channels, image_size, image_size)` (vmap for a batch).
        - `t`: its timestep, a scalar.
        - `label`: its class, an int32 scalar in `[0, num_classes)`; `num_classes` or `None`
          means the null class (unconditional); others raise `ConfigError` when concrete (see
          [`AbstractDenoiser`][eqzoo.models.AbstractDenoiser] for traced labels). A model built
          with `num_classes=0` takes no label.
        - `key`: unused (no dropout).

        **Returns:** the prediction, same shape as `x`, in the parameters' dtype.
        """
        c = self.config
        x, t, label = check_denoiser_inputs(
            "DiT", x, t, label, channels=c.in_channels, image_size=c.image_size, num_classes=c.num_classes
        )
        dtype = linear_dtype(self.patch_embed)  # compute in the params' dtype (bf16 under a policy)
        h = apply_linear(self.patch_embed, self.patchify(x.astype(dtype)))  # (tokens, embed)
        h = h + jnp.asarray(sincos_position_embedding(c.grid_size, c.embed_dim), dtype)
        cond = self.condition(t, label)
        h, _ = self.blocks.apply(lambda block, h, _: (block(h, cond), None), h)
        shift, scale = jnp.split(apply_linear(self.final_modulation, jax.nn.silu(cond)), 2)
        h = _modulate(_layer_norm(h, c.layer_norm_eps), shift, scale)
        return self.unpatchify(apply_linear(self.final_linear, h))  # (channels, height, width)
