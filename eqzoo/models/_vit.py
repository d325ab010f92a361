"""Vision Transformer (Dosovitskiy et al., 2021): patches as tokens, a pre-norm encoder, a linear head."""

import dataclasses
from typing import no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._errors import ConfigError, ShapeError, check_floating, check_positive, shape_str
from .._typing import PRNGKey
from ..nn import (
    MLP,
    REMAT_POLICIES,
    Attention,
    Embedding,
    LayerNorm,
    PatchEmbed,
    Stacked,
    TransformerBlock,
    apply_linear,
    init_linear,
)
from ..sharding._activation import constrain
from ._validate import IMAGE_FIX, check_integer_fields, check_scan_layers

_BACKENDS = ("xla", "cudnn", "auto")
_POOLS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyperparameters of an [`eqzoo.models.ViT`][]. Frozen and hashable; held by the model as a
    static field. The defaults are ViT-B/16 on 224x224 ImageNet (86.6M parameters).

    **Arguments:**

    - `image_size`: side of the square input images, in pixels.
    - `patch_size`: side of the square patches; must divide `image_size`.
    - `in_channels`: image channels (3 for RGB).
    - `num_classes`: outputs of the classifier head.
    - `num_layers`, `num_heads`, `embed_dim`: depth, heads, width.
    - `mlp_ratio`: MLP hidden width as a multiple of `embed_dim`.
    - `pool`: what the head sees: `"cls"`, a learned class token prepended to the patches (as
      in the paper and in Hugging Face's `ViTForImageClassification`), or `"mean"`, the average
      of the patch tokens (no class token).
    - `layer_norm_eps`: LayerNorm epsilon (1e-6 in the original ViT; Hugging Face's configs say 1e-12).
    - `remat`: rematerialisation policy of the layer stack (see `eqzoo.nn.REMAT_POLICIES`).
    - `scan_layers`: run the layers with `lax.scan` (`True`), unrolled (`False`), or
      `"auto"` (default): whichever [`eqzoo.nn.SCAN_DEFAULTS`][] records as faster on the backend.
    - `attention_backend`: `"auto"`, `"xla"` or `"cudnn"`.
    """

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    num_layers: int = 12
    num_heads: int = 12
    embed_dim: int = 768
    mlp_ratio: int = 4
    pool: str = "cls"
    layer_norm_eps: float = 1e-6
    remat: str = "none"
    scan_layers: bool | str = "auto"
    attention_backend: str = "auto"

    def __post_init__(self):
        check_integer_fields(self)
        check_positive(
            "ViTConfig", image_size=self.image_size, patch_size=self.patch_size,
            in_channels=self.in_channels, num_classes=self.num_classes, num_layers=self.num_layers,
            num_heads=self.num_heads, embed_dim=self.embed_dim, mlp_ratio=self.mlp_ratio,
            layer_norm_eps=self.layer_norm_eps,
        )
        if self.image_size % self.patch_size:
            fits = [p for p in range(1, min(self.image_size, 64) + 1) if self.image_size % p == 0]
            raise ConfigError(
                f"ViTConfig: patch_size={self.patch_size} must divide image_size={self.image_size} "
                f"(patches do not overlap or pad); try patch_size in {fits}, or resize the images."
            )
        if self.embed_dim % self.num_heads:
            divisors = [k for k in range(1, min(self.embed_dim, 64) + 1) if self.embed_dim % k == 0]
            raise ConfigError(
                f"ViTConfig: num_heads={self.num_heads} must divide embed_dim={self.embed_dim}; "
                f"try num_heads in {divisors}."
            )
        if self.pool not in _POOLS:
            raise ConfigError(f"ViTConfig: pool must be one of {_POOLS}, got {self.pool!r}.")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"ViTConfig: unknown remat {self.remat!r}; choose from {list(REMAT_POLICIES)}.")
        object.__setattr__(self, "scan_layers", check_scan_layers(self.scan_layers, "ViTConfig"))
        if self.attention_backend not in _BACKENDS:
            raise ConfigError(
                f"ViTConfig: attention_backend must be one of {_BACKENDS}, got {self.attention_backend!r}."
            )

    @property
    def num_patches(self) -> int:
        """Patches per image, `(image_size // patch_size) ** 2`."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        """Tokens the encoder sees: the patches, plus the class token when `pool="cls"`."""
        return self.num_patches + (1 if self.pool == "cls" else 0)

    @property
    def head_dim(self) -> int:
        """Width of each attention head."""
        return self.embed_dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        """Inner width of the MLP."""
        return self.mlp_ratio * self.embed_dim

    def num_params(self) -> int:
        """Number of parameters (ViT-B/16: 86,567,656)."""
        d, h, t = self.embed_dim, self.hidden_dim, self.seq_len
        patch = self.in_channels * self.patch_size**2 * d + d
        cls = d if self.pool == "cls" else 0
        per_layer = 4 * d * d + 4 * d + 2 * d * h + h + d + 4 * d  # attn, MLP, two LayerNorms
        head = d * self.num_classes + self.num_classes
        return patch + cls + t * d + self.num_layers * per_layer + 2 * d + head

    def flops_per_image(self) -> float:
        """Training FLOPs of one image (forward and backward, 3x the forward's matmuls).

        `6 (P k d + T L (4 d^2 + 2 d h) + d C) + 12 L d T^2`: the patch projection (`P` patches
        of `k = channels * patch^2` pixels), the projections of the `T` tokens in `L` layers,
        the head (`C` classes), and the attention scores and mixing. Norms, biases and the
        softmax are left out.
        """
        d, t, layers = self.embed_dim, self.seq_len, self.num_layers
        k = self.in_channels * self.patch_size**2
        weights = self.num_patches * k * d + t * layers * (4 * d * d + 2 * d * self.hidden_dim) + d * self.num_classes
        return 6.0 * weights + 12.0 * layers * d * t * t


class ViT(eqx.Module):
    """The Vision Transformer classifier: `logits = model(image)` for one image.

    The image is cut into patches ([`eqzoo.nn.PatchEmbed`][]), a class token is prepended
    (`pool="cls"`), learned position embeddings are added, and the tokens go through a stack of
    pre-norm transformer blocks with bidirectional attention (the same
    [`eqzoo.nn.TransformerBlock`][] as GPT-2, with `causal=False`, no RoPE and an exact GELU),
    run by `lax.scan` ([`eqzoo.nn.Stacked`][]). A final LayerNorm, the class token (or the mean
    of the patch tokens) and a linear head give the logits. Stateless: train it with
    [`eqzoo.train.classification_loss`][] on `{"x": images, "y": labels}` batches.
    """

    config: ViTConfig = eqx.field(static=True)
    patch_embed: PatchEmbed
    cls_token: Float[Array, " embed"] | None
    pos_embed: Embedding
    blocks: Stacked[TransformerBlock]
    final_norm: LayerNorm
    head: eqx.nn.Linear

    def __init__(self, config: ViTConfig, *, key: PRNGKey):
        """**Arguments:** `config`, a [`eqzoo.models.ViTConfig`][]; `key`, a PRNG key.

        The patch projection is drawn with LeCun-normal scale; the class token, the position
        embeddings and every linear layer from N(0, 0.02²), with zero biases.
        """
        c = config
        k_patch, k_cls, k_pos, k_blocks, k_head = jax.random.split(key, 5)

        def make_block(k):
            ka, km = jax.random.split(k)
            return TransformerBlock(
                LayerNorm(c.embed_dim, eps=c.layer_norm_eps),
                Attention(
                    c.embed_dim, c.num_heads, use_bias=True, use_rope=False, causal=False,
                    backend=c.attention_backend, key=ka,  # type: ignore[arg-type]
                ),
                LayerNorm(c.embed_dim, eps=c.layer_norm_eps),
                MLP(c.embed_dim, c.hidden_dim, use_bias=True, approximate_gelu=False, key=km),
            )

        self.config = c
        self.patch_embed = PatchEmbed(c.in_channels, c.embed_dim, c.patch_size, key=k_patch)
        self.cls_token = 0.02 * jax.random.normal(k_cls, (c.embed_dim,)) if c.pool == "cls" else None
        self.pos_embed = Embedding(c.seq_len, c.embed_dim, init_std=0.02, key=k_pos)
        self.blocks = Stacked(make_block, c.num_layers, remat=c.remat, scan=c.scan_layers, key=k_blocks)  # type: ignore[arg-type]
        self.final_norm = LayerNorm(c.embed_dim, eps=c.layer_norm_eps)
        self.head = init_linear(c.embed_dim, c.num_classes, use_bias=True, std=0.02, key=k_head)

    def tokens(self, x: Float[Array, "channels height width"]) -> Float[Array, "seq embed"]:
        """The encoder's input for one image: patch embeddings (after the class token, if any)
        plus position embeddings, in the parameters' dtype."""
        # Compute in the parameters' dtype (bf16 under a mixed-precision policy).
        h = self.patch_embed(x.astype(self.patch_embed.weight.dtype))  # (patches, embed)
        if self.cls_token is not None:
            h = jnp.concatenate([self.cls_token[None].astype(h.dtype), h])  # (1 + patches, embed)
        h = h + self.pos_embed.weight.astype(h.dtype)
        return constrain(h, "residual")

    def features(self, x: Float[Array, "channels height width"]) -> Float[Array, " embed"]:
        """The pooled, normalised representation of one image that the head classifies."""
        h = self.final_norm(self.blocks(self.tokens(x)))  # (seq, embed)
        if self.config.pool == "cls":
            return h[0]
        return jnp.mean(h, axis=0)

    @no_type_check  # our check below explains batching better than a generic type error
    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKey | None = None
    ) -> Float[Array, " classes"]:
        """Class logits of one image.

        **Arguments:**

        - `x`: one image of shape `(in_channels, image_size, image_size)`. For a batch,
          `jax.vmap(model)(images)`.
        - `key`: unused (no dropout); accepted for a uniform signature.

        **Returns:** `num_classes` logits in the parameters' dtype.
        """
        c = self.config
        want = (c.in_channels, c.image_size, c.image_size)
        shape = tuple(getattr(x, "shape", ()))
        if shape != want:
            if len(shape) == 4 and shape[1:] == want:
                hint = " eqzoo models take one image: for a batch, wrap the call in jax.vmap(model)."
            elif len(shape) == 3 and shape[0] == c.in_channels:
                hint = (
                    f" The position embeddings are learned for {c.image_size}x{c.image_size} "
                    f"images ({c.num_patches} patches of {c.patch_size}x{c.patch_size}); resize "
                    "the images, or build the model with a matching image_size."
                )
            elif len(shape) == 3 and shape[-1] == c.in_channels:
                hint = " The channels go first: transpose with x.transpose(2, 0, 1)."
            else:
                hint = " For a batch of images, wrap the call in jax.vmap(model)."
            raise ShapeError(
                f"ViT takes one image of shape (channels, height, width) = {shape_str(want)}; got "
                f"{shape_str(shape)}.{hint}"
            )
        check_floating("ViT", x, "images", IMAGE_FIX)
        # A NumPy image is accepted like a JAX one, with type checking on or off.
        return apply_linear(self.head, self.features(jnp.asarray(x))[None])[0]
