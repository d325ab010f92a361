"""Mixtral (Jiang et al., 2024): Llama's attention and norms with sparse mixture-of-experts
feed-forward layers, each token routed to `experts_per_token` of `num_experts` SwiGLU experts."""

import dataclasses
import math
from typing import get_args

import equinox as eqx
import jax

from .._errors import ConfigError, as_flag, check_positive
from .._typing import PRNGKey
from ..nn import (
    Embedding,
    MoE,
    MoEImplementation,
    RMSNorm,
    RopeScaling,
    Stacked,
    TransformerBlock,
)
from ..nn._fields import with_fields
from ._llama import check_decoder, decoder_layers
from ._lm import AbstractLM
from ._validate import check_integer_fields

_MOE_IMPLEMENTATIONS = get_args(MoEImplementation)


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    """Hyperparameters of a Mixtral model. Frozen and hashable; held by the model as a static
    field. The defaults are the shape of Mixtral 8x7B.

    **Arguments:**

    - `vocab_size`, `max_seq`, `num_layers`, `num_heads`, `num_kv_heads`, `embed_dim`,
      `head_dim`, `rope_theta`, `rope_scaling`, `rms_norm_eps`, `tie_embeddings`,
      `sliding_window`, `qk_norm`: as in [`eqzoo.models.LlamaConfig`][] (with `qk_norm`,
      Hugging Face `Qwen3MoeForCausalLM` checkpoints load as a Mixtral).
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
    sliding_window: int | None = None
    qk_norm: bool = False
    router_aux_loss_coef: float = 0.02
    router_z_loss_coef: float = 0.001
    moe_implementation: str = "dense"
    moe_capacity_factor: float = 1.25
    remat: str = "none"
    scan_layers: bool | str = "auto"
    attention_backend: str = "auto"

    def __post_init__(self):
        check_integer_fields(self)
        check_positive(
            "MixtralConfig", vocab_size=self.vocab_size, max_seq=self.max_seq,
            num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            embed_dim=self.embed_dim, hidden_dim=self.hidden_dim, num_experts=self.num_experts,
            experts_per_token=self.experts_per_token, rms_norm_eps=self.rms_norm_eps,
        )
        if self.experts_per_token > self.num_experts:
            raise ConfigError(
                f"MixtralConfig: experts_per_token={self.experts_per_token} exceeds "
                f"num_experts={self.num_experts}; a token can use at most every expert once."
            )
        check_decoder("MixtralConfig", self)
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "moe_capacity_factor"):
            value = getattr(self, name)
            least = ">" if name == "moe_capacity_factor" else ">="
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not (ok and (value > 0 if least == ">" else value >= 0)):
                raise ConfigError(f"MixtralConfig: {name} must be a finite number {least} 0, got {value!r}.")
        if (normalize := as_flag(self.normalize_router_weights)) is None:
            raise ConfigError(
                f"MixtralConfig: normalize_router_weights must be True or False, got {self.normalize_router_weights!r}."
            )
        object.__setattr__(self, "normalize_router_weights", normalize)
        if self.moe_implementation not in _MOE_IMPLEMENTATIONS:
            raise ConfigError(
                f"MixtralConfig: moe_implementation must be one of {_MOE_IMPLEMENTATIONS}, got "
                f"{self.moe_implementation!r}."
            )

    @property
    def resolved_head_dim(self) -> int:
        """`head_dim`, or `embed_dim // num_heads` when it is `None`."""
        return self.embed_dim // self.num_heads if self.head_dim is None else self.head_dim

    def _layer_params(self, experts: int) -> int:
        d, h, hd = self.embed_dim, self.hidden_dim, self.resolved_head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads) + (2 * hd if self.qk_norm else 0)
        return attn + d * self.num_experts + experts * 3 * d * h + 2 * d  # + router, two norms

    def _params(self, experts: int) -> int:
        """Parameters with `experts` experts a layer (a tied head counted once)."""
        tables = (1 if self.tie_embeddings else 2) * self.vocab_size * self.embed_dim
        return tables + self.num_layers * self._layer_params(experts) + self.embed_dim  # + final norm

    def num_params(self) -> int:
        """Number of parameters, every expert counted (a tied head counted once)."""
        return self._params(self.num_experts)

    def num_active_params(self) -> int:
        """Parameters one token uses: `num_params()` with `experts_per_token` experts a layer."""
        return self._params(self.experts_per_token)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: `6 N + 12 L d_attn T` with N the *active* parameters (the
        `experts_per_token` experts a token uses, the router, attention, the head; the input
        embedding table left out when the head is separate), `d_attn = num_heads * head_dim`
        and T at most `sliding_window`."""
        t = self.max_seq if seq_len is None else seq_len
        t = t if self.sliding_window is None else min(t, self.sliding_window)
        n = self.num_active_params() - (0 if self.tie_embeddings else self.vocab_size * self.embed_dim)
        return 6.0 * n + 12.0 * self.num_layers * self.num_heads * self.resolved_head_dim * t


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

        def mlp(out_std, key):
            return MoE(
                c.embed_dim, c.hidden_dim, c.num_experts, c.experts_per_token,
                normalize_weights=c.normalize_router_weights,
                implementation=c.moe_implementation, capacity_factor=c.moe_capacity_factor,
                out_init_std=out_std, key=key,
            )

        self.config = c
        self.embed, self.blocks, self.final_norm, self.lm_head = decoder_layers(c, mlp, key)

    def aux_loss_weights(self) -> dict[str, float]:
        """`{"moe_load_balance": router_aux_loss_coef, "moe_z_loss": router_z_loss_coef}`."""
        return {
            "moe_load_balance": self.config.router_aux_loss_coef,
            "moe_z_loss": self.config.router_z_loss_coef,
        }

    def with_moe_implementation(self, implementation: str) -> "Mixtral":
        """The same model, its parameters shared (not copied), with every mixture-of-experts
        layer running its experts by `implementation` and `config.moe_implementation` set to it.

        Typical use: a model trained with `"capacity"`, which drops assignments past an expert's
        capacity, evaluated with `"dense"` (or `"ragged"`), which drop none, as decoding never
        does (single tokens are never dropped): `model.with_moe_implementation("dense")`.

        **Arguments:** `implementation`, one of `"dense"`, `"capacity"`, `"ragged"` (see
        [`eqzoo.nn.MoE`][]).

        **Returns:** a [`eqzoo.models.Mixtral`][] whose arrays are this model's own.
        """
        if implementation not in _MOE_IMPLEMENTATIONS:
            raise ConfigError(
                f"Mixtral.with_moe_implementation: implementation must be one of {_MOE_IMPLEMENTATIONS}, "
                f"got {implementation!r}."
            )
        model = jax.tree.map(
            lambda m: m.with_implementation(implementation) if isinstance(m, MoE) else m,
            self, is_leaf=lambda m: isinstance(m, MoE),
        )
        config = dataclasses.replace(self.config, moe_implementation=implementation)
        return with_fields(model, config=config)  # config is static: not a tree leaf
