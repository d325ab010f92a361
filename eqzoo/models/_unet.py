"""The DDPM UNet (Ho et al., 2020, "Denoising Diffusion Probabilistic Models"): residual blocks with
GroupNorm and the timestep (+ class) embedding, self-attention at chosen resolutions, skip
connections between the down and up paths."""

import dataclasses
from typing import no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Integer, Real

from .._errors import ConfigError, check_positive
from .._typing import PRNGKey
from ..nn import Attention, Embedding, apply_linear
from ._denoiser import AbstractDenoiser, TimestepEmbedding, check_denoiser_inputs
from ._validate import check_integer_fields

_BACKENDS = ("xla", "cudnn", "auto")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters of a [`eqzoo.models.UNet`][]. Frozen and hashable. The defaults are the
    DDPM CIFAR-10 model (35.7 M parameters).

    **Arguments:**

    - `image_size`: height and width of the (square) input; divisible by
      `2**(len(channel_mults) - 1)`.
    - `in_channels`: image channels; the output has as many.
    - `num_classes`: class labels for conditioning (one more, the null class, is learned for
      classifier-free guidance); `0` builds an unconditional model.
    - `base_channels`: channels of the first level; level `i` has `base_channels *
      channel_mults[i]`, and the resolution halves from one level to the next.
    - `num_res_blocks`: residual blocks per level on the way down (one more on the way up).
    - `attention_resolutions`: the resolutions (image sides, e.g. `(16,)`) whose blocks are
      followed by self-attention over the pixels. The middle of the network always has one.
    - `num_heads`: attention heads (each of width `channels / num_heads`).
    - `num_groups`: GroupNorm groups; must divide every level's channels.
    - `attention_backend`: `"auto"`, `"xla"` or `"cudnn"`.
    """

    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 0
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    num_groups: int = 32
    attention_backend: str = "auto"

    def __post_init__(self):
        check_integer_fields(self)
        check_positive(
            "UNetConfig", image_size=self.image_size, in_channels=self.in_channels,
            base_channels=self.base_channels, num_res_blocks=self.num_res_blocks,
            num_heads=self.num_heads, num_groups=self.num_groups,
        )
        if self.num_classes < 0:
            raise ConfigError(f"UNetConfig: num_classes must be >= 0 (0 = unconditional), got {self.num_classes}.")
        if not self.channel_mults or any(m <= 0 for m in self.channel_mults):
            raise ConfigError(f"UNetConfig: channel_mults must be a non-empty tuple of positive ints, got {self.channel_mults}.")
        factor = 2 ** (len(self.channel_mults) - 1)
        if self.image_size % factor:
            raise ConfigError(
                f"UNetConfig: image_size={self.image_size} must be divisible by 2**(levels-1)={factor} "
                f"for {len(self.channel_mults)} channel_mults; use fewer levels or a larger image."
            )
        bad = [w for w in self.widths if w % self.num_groups]
        if bad:
            raise ConfigError(
                f"UNetConfig: num_groups={self.num_groups} must divide every level's channels "
                f"{self.widths}; pick a common divisor."
            )
        unknown = sorted(set(self.attention_resolutions) - set(self.resolutions))
        if unknown:
            raise ConfigError(
                f"UNetConfig: attention_resolutions {unknown} are not resolutions of this network; "
                f"its levels have resolutions {self.resolutions}."
            )
        heads_bad = [w for w in self.widths if w % self.num_heads]
        if heads_bad:
            raise ConfigError(f"UNetConfig: num_heads={self.num_heads} must divide every level's channels {self.widths}.")
        if self.attention_backend not in _BACKENDS:
            raise ConfigError(f"UNetConfig: attention_backend must be one of {_BACKENDS}, got {self.attention_backend!r}.")

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of each level."""
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Image side at each level."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mults)))

    @property
    def embed_dim(self) -> int:
        """Width of the timestep (and class) embedding, `4 * base_channels`."""
        return 4 * self.base_channels

    def _plan(self):
        """The blocks in order: `("res", in, out) | ("attn", ch) | ("down", ch) | ("up", ch)`,
        grouped as (down path, middle, up path)."""
        down, mid, up = [], [], []
        skips = [self.base_channels]
        ch = self.base_channels
        for level, width in enumerate(self.widths):
            for _ in range(self.num_res_blocks):
                down.append(("res", ch, width))
                ch = width
                if self.resolutions[level] in self.attention_resolutions:
                    down.append(("attn", ch))
                skips.append(ch)
            if level < len(self.widths) - 1:
                down.append(("down", ch))
                skips.append(ch)
        mid += [("res", ch, ch), ("attn", ch), ("res", ch, ch)]
        for level in reversed(range(len(self.widths))):
            width = self.widths[level]
            for _ in range(self.num_res_blocks + 1):
                up.append(("res", ch + skips.pop(), width))
                ch = width
                if self.resolutions[level] in self.attention_resolutions:
                    up.append(("attn", ch))
            if level > 0:
                up.append(("up", ch))
        return down, mid, up

    def num_params(self) -> int:
        """Number of parameters."""
        e, b = self.embed_dim, self.base_channels
        conv = lambda cin, cout, k=3: cin * cout * k * k + cout  # noqa: E731
        n = b * e + e + e * e + e  # timestep MLP
        n += (self.num_classes + 1) * e if self.num_classes else 0
        n += conv(self.in_channels, b) + 2 * b + conv(b, self.in_channels)  # stem, out norm, out conv
        down, mid, up = self._plan()
        for kind, *ch in down + mid + up:
            if kind == "res":
                cin, cout = ch
                n += 2 * cin + conv(cin, cout) + e * cout + cout + 2 * cout + conv(cout, cout)
                n += conv(cin, cout, 1) if cin != cout else 0
            elif kind == "attn":
                n += 2 * ch[0] + 4 * (ch[0] * ch[0] + ch[0])
            else:  # a 3x3 convolution that down- or up-samples
                n += conv(ch[0], ch[0])
        return n


class GroupNorm(eqx.Module):
    """Group normalisation of one image `(channels, height, width)` with a learned affine map,
    computed in float32 and returned in the input's dtype (Wu & He, 2018)."""

    weight: Float[Array, " channels"]
    bias: Float[Array, " channels"]
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, groups: int, channels: int, *, eps: float = 1e-5):
        """**Arguments:** number of `groups` (dividing `channels`), `channels`, `eps`."""
        self.weight = jnp.ones((channels,))
        self.bias = jnp.zeros((channels,))
        self.groups = groups
        self.eps = eps

    def __call__(self, x: Float[Array, "channels height width"]) -> Float[Array, "channels height width"]:
        """**Returns:** the normalised image, same shape and dtype."""
        c = x.shape[0]
        g = x.astype(jnp.float32).reshape(self.groups, -1)
        g = (g - jnp.mean(g, axis=1, keepdims=True)) * jax.lax.rsqrt(jnp.var(g, axis=1, keepdims=True) + self.eps)
        y = g.reshape(x.shape) * self.weight.astype(jnp.float32).reshape(c, 1, 1) + self.bias.astype(jnp.float32).reshape(c, 1, 1)
        return y.astype(x.dtype)


def _conv(cin: int, cout: int, key: PRNGKey, *, kernel: int = 3, stride: int = 1, zero: bool = False) -> eqx.nn.Conv2d:
    layer = eqx.nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, key=key)
    if zero:
        layer = eqx.tree_at(lambda c: (c.weight, c.bias), layer, (jnp.zeros_like(layer.weight), jnp.zeros_like(layer.bias)))
    return layer


class UNetResBlock(eqx.Module):
    """`skip(x) + conv(silu(norm(conv(silu(norm(x))) + proj(silu(emb)))))`, the second convolution
    zero-initialised so the block starts as its skip path (as in DDPM)."""

    norm1: GroupNorm
    conv1: eqx.nn.Conv2d
    emb_proj: eqx.nn.Linear
    norm2: GroupNorm
    conv2: eqx.nn.Conv2d
    skip: eqx.nn.Conv2d | None

    def __init__(self, cin: int, cout: int, embed_dim: int, groups: int, *, key: PRNGKey):
        """**Arguments:** input and output channels, embedding width, GroupNorm `groups`, `key`."""
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm1 = GroupNorm(groups, cin)
        self.conv1 = _conv(cin, cout, k1)
        self.emb_proj = eqx.nn.Linear(embed_dim, cout, key=k2)
        self.norm2 = GroupNorm(groups, cout)
        self.conv2 = _conv(cout, cout, k3, zero=True)
        self.skip = _conv(cin, cout, k4, kernel=1) if cin != cout else None

    def __call__(
        self, x: Float[Array, "channels height width"], emb: Float[Array, " embed"]
    ) -> Float[Array, "out_channels height width"]:
        """**Arguments:** one feature map and the conditioning embedding. **Returns:** new features."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + apply_linear(self.emb_proj, jax.nn.silu(emb))[:, None, None]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class UNetAttention(eqx.Module):
    """`x + attn(norm(x))` with every pixel a token ([`eqzoo.nn.Attention`][], bidirectional);
    the output projection starts at zero."""

    norm: GroupNorm
    attn: Attention

    def __init__(self, channels: int, num_heads: int, groups: int, *, backend: str, key: PRNGKey):
        """**Arguments:** `channels`, `num_heads`, GroupNorm `groups`, attention `backend`, `key`."""
        self.norm = GroupNorm(groups, channels)
        self.attn = Attention(
            channels, num_heads, use_bias=True, use_rope=False, causal=False, backend=backend,  # type: ignore[arg-type]
            init_std=channels**-0.5, out_init_std=0.0, key=key,
        )

    def __call__(self, x: Float[Array, "channels height width"]) -> Float[Array, "channels height width"]:
        """**Returns:** the feature map with attention over its pixels added."""
        c, hgt, wid = x.shape
        tokens = self.norm(x).reshape(c, hgt * wid).T  # (pixels, channels)
        return x + self.attn(tokens).T.reshape(c, hgt, wid)


class UNet(AbstractDenoiser):
    """A DDPM-style UNet on one image: `prediction = model(x, t, label)`.

    A 3x3 stem, then levels of residual blocks (self-attention after each at the
    `attention_resolutions`) joined by stride-2 convolutions; a middle of residual block,
    attention, residual block; the mirror-image up path, whose blocks also take the down path's
    activations (skip connections) and whose levels are joined by nearest-neighbour upsampling
    and a 3x3 convolution; GroupNorm, SiLU and a zero-initialised 3x3 output convolution, so the
    untrained model predicts exactly zero. Every residual block receives the timestep embedding
    (plus the class embedding of conditional models).
    """

    config: UNetConfig = eqx.field(static=True)
    time_embed: TimestepEmbedding
    label_embed: Embedding | None
    stem: eqx.nn.Conv2d
    down: tuple[UNetResBlock | UNetAttention | eqx.nn.Conv2d, ...]
    mid: tuple[UNetResBlock | UNetAttention, ...]
    up: tuple[UNetResBlock | UNetAttention | eqx.nn.Conv2d, ...]
    out_norm: GroupNorm
    out_conv: eqx.nn.Conv2d

    def __init__(self, config: UNetConfig, *, key: PRNGKey):
        """**Arguments:** `config`, a [`eqzoo.models.UNetConfig`][]; `key`, a PRNG key."""
        c = config
        down, mid, up = c._plan()
        k_time, k_label, k_stem, k_out, *keys = jax.random.split(key, 4 + len(down) + len(mid) + len(up))
        keys = iter(keys)

        def build(kind, *ch):
            k = next(keys)
            if kind == "res":
                return UNetResBlock(ch[0], ch[1], c.embed_dim, c.num_groups, key=k)
            if kind == "attn":
                return UNetAttention(ch[0], c.num_heads, c.num_groups, backend=c.attention_backend, key=k)
            return _conv(ch[0], ch[0], k, stride=2 if kind == "down" else 1)

        self.config = c
        self.time_embed = TimestepEmbedding(c.base_channels, c.embed_dim, c.embed_dim, key=k_time)
        self.label_embed = Embedding(c.num_classes + 1, c.embed_dim, key=k_label) if c.num_classes else None
        self.stem = _conv(c.in_channels, c.base_channels, k_stem)
        self.down = tuple(build(*b) for b in down)
        self.mid = tuple(build(*b) for b in mid)
        self.up = tuple(build(*b) for b in up)
        self.out_norm = GroupNorm(c.num_groups, c.base_channels)
        self.out_conv = _conv(c.base_channels, c.in_channels, k_out, zero=True)

    @property
    def null_label(self) -> int | None:
        """The null class index (`num_classes`), or `None` when unconditional."""
        return self.config.num_classes if self.config.num_classes else None

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
            "UNet", x, t, label, channels=c.in_channels, image_size=c.image_size, num_classes=c.num_classes
        )
        emb = self.time_embed(t.astype(jnp.float32))
        if self.label_embed is not None:
            emb = emb + self.label_embed.weight[label].astype(emb.dtype)
        h = self.stem(x.astype(self.stem.weight.dtype))  # compute in the params' dtype
        skips = [h]
        for layer in self.down:
            if isinstance(layer, UNetResBlock):
                h = layer(h, emb)
                skips.append(h)
            elif isinstance(layer, UNetAttention):
                h = skips[-1] = layer(h)  # the skip is the block's output after its attention
            else:
                h = layer(h)  # stride-2 convolution
                skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, UNetResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, UNetResBlock):
                h = layer(jnp.concatenate([h, skips.pop()], axis=0), emb)
            elif isinstance(layer, UNetAttention):
                h = layer(h)
            else:
                h = layer(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))  # nearest x2, then conv
        return self.out_conv(jax.nn.silu(self.out_norm(h)))
