"""Mixtral (Jiang et al., 2024): Llama's attention and norms with sparse mixture-of-experts
feed-forward layers, each token routed to `experts_per_token` of `num_experts` SwiGLU experts."""

import dataclasses
import math

import equinox as eqx
import jax

from .._errors import ConfigError
from .._typing import PRNGKey
from ..nn import (
    REMAT_POLICIES,
    Attention,
    Embedding,
    MoE,
    RMSNorm,
    RopeScaling,
    Stacked,
    TransformerBlock,
)
from ._lm import AbstractLM
from ._validate import check_positive

_BACKENDS = ("xla", "cudnn", "auto")
_MOE_IMPLEMENTATIONS = ("dense", "capacity", "ragged")


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    """Hyperparameters of a Mixtral model. Frozen and hashable; held by the model as a static
    field. The defaults are the shape of Mixtral 8x7B.

    **Arguments:**

    - `vocab_size`, `max_seq`, `num_layers`, `num_heads`, `num_kv_heads`, `embed_dim`,
      `head_dim`, `rope_theta`, `rope_scaling`, `rms_norm_eps`, `tie_embeddings`: as in
      [`eqzoo.models.LlamaConfig`][].
    - `hidden_dim`: each expert's SwiGLU inner width.
    - `num_experts`: experts per layer; `experts_per_token`: how many each token uses.
    - `normalize_router_weights`: renormalise the chosen experts' router probabilities to sum
      to one (Mixtral); `False` weights each expert by its probability (Switch Transformers;
      what one expert per token needs for its router to learn from the loss).
    - `router_aux_loss_coef`: weight of the load-balancing loss in
      [`eqzoo.train.lm_loss`][] (Mixtral's released configs use 0.02).
    - `router_z_loss_coef`: weight of the router z-loss (ST-MoE uses 0.001).
    - `moe_implementation`: how the experts run, see [`eqzoo.nn.MoE`][]: `"dense"` (every
      expert on every token: exact, `num_experts / experts_per_token` times the expert FLOPs),
      `"capacity"` (a fixed number of slots per expert: `moe_capacity_factor` times the
      FLOPs, assignments past it dropped) or `"ragged"` (grouped matrix products: exact; fast
      only where XLA lowers `ragged_dot` to a grouped GEMM).
    - `moe_capacity_factor`: expert capacity relative to a balanced load, for `"capacity"`.
    - `remat`, `scan_layers`, `attention_backend`: as in [`eqzoo.models.GPT2Config`][].
    """

    vocab_size: int = 32000
    max_seq: int = 32768
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    embed_dim: int = 4096
    hidden_dim: int = 14336
    num_experts: int = 8
    experts_per_token: int = 2
    normalize_router_weights: bool = True
    head_dim: int | None = None
    rope_theta: float = 1e6
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    router_aux_loss_coef: float = 0.02
    router_z_loss_coef: float = 0.001
    moe_implementation: str = "dense"
    moe_capacity_factor: float = 1.25
    remat: str = "none"
    scan_layers: bool | str = "auto"
    attention_backend: str = "auto"

    def __post_init__(self):
        check_positive(
            "MixtralConfig", vocab_size=self.vocab_size, max_seq=self.max_seq,
            num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            embed_dim=self.embed_dim, hidden_dim=self.hidden_dim, num_experts=self.num_experts,
            experts_per_token=self.experts_per_token,
        )
        if self.experts_per_token > self.num_experts:
            raise ConfigError(
                f"MixtralConfig: experts_per_token={self.experts_per_token} exceeds "
                f"num_experts={self.num_experts}; a token can use at most every expert once."
            )
        if self.head_dim is None and self.embed_dim % self.num_heads:
            raise ConfigError(
                f"MixtralConfig: num_heads={self.num_heads} must divide embed_dim={self.embed_dim} "
                "(or set head_dim explicitly)."
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"MixtralConfig: num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} "
                "for grouped-query attention; pick a divisor of num_heads."
            )
        if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
            raise ConfigError(
                "MixtralConfig: router_aux_loss_coef and router_z_loss_coef must be >= 0, got "
                f"{self.router_aux_loss_coef} and {self.router_z_loss_coef}."
            )
        if not self.moe_capacity_factor > 0:
            raise ConfigError(f"MixtralConfig: moe_capacity_factor must be positive, got {self.moe_capacity_factor}.")
        if self.moe_implementation not in _MOE_IMPLEMENTATIONS:
            raise ConfigError(
                f"MixtralConfig: moe_implementation must be one of {_MOE_IMPLEMENTATIONS}, got "
                f"{self.moe_implementation!r}."
            )
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"MixtralConfig: unknown remat {self.remat!r}; choose from {list(REMAT_POLICIES)}.")
        if self.scan_layers not in (True, False, "auto"):
            raise ConfigError(f"MixtralConfig: scan_layers must be True, False or 'auto', got {self.scan_layers!r}.")
        if self.attention_backend not in _BACKENDS:
            raise ConfigError(f"MixtralConfig: attention_backend must be one of {_BACKENDS}, got {self.attention_backend!r}.")

    @property
    def resolved_head_dim(self) -> int:
        """`head_dim`, or `embed_dim // num_heads` when it is `None`."""
        return self.embed_dim // self.num_heads if self.head_dim is None else self.head_dim

    def _layer_params(self, experts: int) -> int:
        d, h, hd = self.embed_dim, self.hidden_dim, self.resolved_head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        return attn + d * self.num_experts + experts * 3 * d * h + 2 * d  # + router, two norms

    def num_params(self) -> int:
        """Number of parameters, every expert counted (a tied head counted once)."""
        head = 0 if self.tie_embeddings else self.vocab_size * self.embed_dim
        return self.vocab_size * self.embed_dim + head + self.num_layers * self._layer_params(self.num_experts) + self.embed_dim

    def num_active_params(self) -> int:
        """Parameters one token uses: `num_params()` with `experts_per_token` experts a layer."""
        head = 0 if self.tie_embeddings else self.vocab_size * self.embed_dim
        return self.vocab_size * self.embed_dim + head + self.num_layers * self._layer_params(self.experts_per_token) + self.embed_dim

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: `6 N + 12 L d T` with N the *active* parameters (the
        `experts_per_token` experts a token uses, the router, attention, the head; the input
        embedding table left out when the head is separate)."""
        t = self.max_seq if seq_len is None else seq_len
        n = self.num_active_params() - (0 if self.tie_embeddings else self.vocab_size * self.embed_dim)
        return 6.0 * n + 12.0 * self.num_layers * self.embed_dim * t


class Mixtral(AbstractLM):
    """The Mixtral decoder: `logits = model(tokens)` for one sequence of token ids.

    Training with [`eqzoo.train.lm_loss`][] adds the router losses of every layer
    (`aux_loss_weights()`), and reports them as metrics.
    """

    config: MixtralConfig = eqx.field(static=True)
    embed: Embedding
    blocks: Stacked[TransformerBlock]
    final_norm: RMSNorm
    lm_head: Embedding | None

    def __init__(self, config: MixtralConfig, *, key: PRNGKey):
        """**Arguments:** `config`, a [`eqzoo.models.MixtralConfig`][]; `key`, a PRNG key."""
        c = config
        k_tok, k_blocks, k_head = jax.random.split(key, 3)
        out_std = 0.02 / math.sqrt(2 * c.num_layers)

        def make_block(k):
            ka, km = jax.random.split(k)
            return TransformerBlock(
                RMSNorm(c.embed_dim, eps=c.rms_norm_eps),
                Attention(
                    c.embed_dim, c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.resolved_head_dim,
                    use_rope=True, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                    backend=c.attention_backend, out_init_std=out_std, key=ka,  # type: ignore[arg-type]
                ),
                RMSNorm(c.embed_dim, eps=c.rms_norm_eps),
                MoE(
                    c.embed_dim, c.hidden_dim, c.num_experts, c.experts_per_token,
                    normalize_weights=c.normalize_router_weights,
                    implementation=c.moe_implementation, capacity_factor=c.moe_capacity_factor,
                    out_init_std=out_std, key=km,
                ),
            )

        self.config = c
        self.embed = Embedding(c.vocab_size, c.embed_dim, key=k_tok)
        self.blocks = Stacked(make_block, c.num_layers, remat=c.remat, scan=c.scan_layers, key=k_blocks)  # type: ignore[arg-type]
        self.final_norm = RMSNorm(c.embed_dim, eps=c.rms_norm_eps)
        self.lm_head = None if c.tie_embeddings else Embedding(c.vocab_size, c.embed_dim, key=k_head)

    def aux_loss_weights(self) -> dict[str, float]:
        """`{"moe_load_balance": router_aux_loss_coef, "moe_z_loss": router_z_loss_coef}`."""
        return {
            "moe_load_balance": self.config.router_aux_loss_coef,
            "moe_z_loss": self.config.router_z_loss_coef,
        }
