"""GPT-2 (Radford et al., 2019): learned positions, LayerNorm, GELU MLP, tied embeddings."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Integer

from .._errors import ConfigError, check_positive
from .._typing import PRNGKey
from ..nn import (
    MLP,
    REMAT_POLICIES,
    Attention,
    Embedding,
    LayerNorm,
    Stacked,
    TransformerBlock,
)
from ..sharding._activation import constrain, constrain_forward
from ._lm import AbstractLM
from ._validate import check_integer_fields, check_positions, check_scan_layers

_BACKENDS = ("xla", "cudnn", "auto")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyperparameters of a GPT-2 model. Frozen and hashable; held by the model as a static field.

    **Arguments:**

    - `vocab_size`: token vocabulary (GPT-2's 50257 is often padded to 50304 for speed).
    - `max_seq`: longest sequence (number of learned positions).
    - `num_layers`, `num_heads`, `embed_dim`: depth, heads, width.
    - `mlp_ratio`: MLP hidden width as a multiple of `embed_dim`.
    - `layer_norm_eps`: LayerNorm epsilon.
    - `remat`: rematerialisation policy of the layer stack (see `eqzoo.nn.REMAT_POLICIES`).
    - `scan_layers`: run the layers with `lax.scan` (`True`), unrolled (`False`), or
      `"auto"` (default): whichever [`eqzoo.nn.SCAN_DEFAULTS`][] records as faster on the backend.
    - `attention_backend`: `"auto"`, `"xla"` or `"cudnn"`.
    """

    vocab_size: int = 50304
    max_seq: int = 1024
    num_layers: int = 12
    num_heads: int = 12
    embed_dim: int = 768
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-5
    remat: str = "none"
    scan_layers: bool | str = "auto"
    attention_backend: str = "auto"

    def __post_init__(self):
        check_integer_fields(self)
        check_positive(
            "GPT2Config", vocab_size=self.vocab_size, max_seq=self.max_seq,
            num_layers=self.num_layers, num_heads=self.num_heads, embed_dim=self.embed_dim,
            mlp_ratio=self.mlp_ratio, layer_norm_eps=self.layer_norm_eps,
        )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"GPT2Config: num_heads={self.num_heads} must divide embed_dim={self.embed_dim}; "
                f"try num_heads in {_divisors(self.embed_dim)}."
            )
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"GPT2Config: unknown remat {self.remat!r}; choose from {list(REMAT_POLICIES)}.")
        object.__setattr__(self, "scan_layers", check_scan_layers(self.scan_layers, "GPT2Config"))
        if self.attention_backend not in _BACKENDS:
            raise ConfigError(f"GPT2Config: attention_backend must be one of {_BACKENDS}, got {self.attention_backend!r}.")

    @property
    def head_dim(self) -> int:
        """Width of each attention head."""
        return self.embed_dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        """Inner width of the MLP."""
        return self.mlp_ratio * self.embed_dim

    def num_params(self, *, include_position_embeddings: bool = True) -> int:
        """Number of parameters (the tied head counted once)."""
        d, h = self.embed_dim, self.hidden_dim
        per_layer = 4 * d * d + 4 * d + 2 * d * h + h + d + 4 * d  # attn, MLP, two LayerNorms
        n = self.vocab_size * d + self.num_layers * per_layer + 2 * d
        return n + (self.max_seq * d if include_position_embeddings else 0)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: `6 N + 12 L d T` (N without position embeddings)."""
        t = self.max_seq if seq_len is None else seq_len
        n = self.num_params(include_position_embeddings=False)
        return 6.0 * n + 12.0 * self.num_layers * self.embed_dim * t


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, min(n, 64) + 1) if n % k == 0]


class GPT2(AbstractLM):
    """The GPT-2 decoder: `logits = model(tokens)` for one sequence of token ids."""

    config: GPT2Config = eqx.field(static=True)
    embed: Embedding
    pos_embed: Embedding
    blocks: Stacked[TransformerBlock]
    final_norm: LayerNorm
    lm_head: None

    def __init__(self, config: GPT2Config, *, key: PRNGKey):
        """**Arguments:** `config`, a [`eqzoo.models.GPT2Config`][]; `key`, a PRNG key.

        Weights are drawn from N(0, 0.02²), the residual output projections scaled by
        `1/sqrt(2 num_layers)` as in GPT-2.
        """
        c = config
        k_tok, k_pos, k_blocks = jax.random.split(key, 3)
        out_std = 0.02 / math.sqrt(2 * c.num_layers)

        def make_block(k):
            ka, km = jax.random.split(k)
            return TransformerBlock(
                LayerNorm(c.embed_dim, eps=c.layer_norm_eps),
                Attention(
                    c.embed_dim, c.num_heads, use_bias=True, use_rope=False,
                    backend=c.attention_backend, out_init_std=out_std, key=ka,  # type: ignore[arg-type]
                ),
                LayerNorm(c.embed_dim, eps=c.layer_norm_eps),
                MLP(c.embed_dim, c.hidden_dim, use_bias=True, out_init_std=out_std, key=km),
            )

        self.config = c
        self.embed = Embedding(c.vocab_size, c.embed_dim, key=k_tok)
        self.pos_embed = Embedding(c.max_seq, c.embed_dim, init_std=0.01, key=k_pos)
        self.blocks = Stacked(make_block, c.num_layers, remat=c.remat, scan=c.scan_layers, key=k_blocks)  # type: ignore[arg-type]
        self.final_norm = LayerNorm(c.embed_dim, eps=c.layer_norm_eps)
        self.lm_head = None

    def _check_given_positions(self, positions) -> None:
        check_positions(positions, self.config.max_seq, type(self).__name__)

    def embed_tokens(
        self, tokens: Integer[Array, " seq"], positions: Integer[Array, " seq"]
    ) -> Float[Array, "seq embed"]:
        """Token embeddings plus learned position embeddings. Under a mesh the position table
        is read whole (the `"position_table"` activation rule): with packed documents the
        positions are data, and a lookup into a table split over `fsdp` made XLA's
        partitioner rematerialise it.

        Positions outside `[0, max_seq)` have no row: concrete ones given to `__call__`,
        `features` or `features_and_aux` raise `ShapeError`; traced ones (under `jit`) are data
        and are not checked: those `>= max_seq` give NaN rows, and negative ones index from the
        end, as in NumPy (a padding position of `-1` reads the last row)."""
        table = constrain_forward(self.pos_embed.weight, "position_table")
        rows = jnp.take(table, positions, axis=0)
        return self.token_embeddings(tokens) + constrain(rows, "residual")
