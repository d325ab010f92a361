"""Gemma, Gemma 2 and Gemma 3 (text): Llama's decoder with Gemma's norms, GeGLU, scaled
embeddings, sandwich norms, soft-capped logits and windowed layers alternating with full ones."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Integer

from .._errors import ConfigError, check_positive
from .._typing import PRNGKey
from ..nn import (
    GLU_ACTIVATIONS,
    Attention,
    Embedding,
    RMSNorm,
    RopeScaling,
    Stacked,
    SwiGLU,
    TransformerBlock,
)
from ._llama import check_decoder, check_layer_types
from ._lm import AbstractLM
from ._validate import check_integer_fields


def _pattern(num_layers: int, every: int | None) -> tuple[str, ...]:
    """The layer kinds of `sliding_window_pattern=every`: layer `i` full when `(i + 1) % every == 0`."""
    return tuple(
        "full_attention" if every is not None and (i + 1) % every == 0 else "sliding_attention"
        for i in range(num_layers)
    )


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Hyperparameters of a Gemma-family decoder. Frozen and hashable; held by the model as a
    static field. The defaults are the shape of Gemma 2 2B.

    What the three generations set (Hugging Face `GemmaForCausalLM`, `Gemma2ForCausalLM` and
    `Gemma3ForCausalLM` load into this one config):

    | | Gemma | Gemma 2 | Gemma 3 |
    |---|---|---|---|
    | `post_norms` | False | True | True |
    | `sliding_window` | None | 4096 (every 2nd layer full) | 512 or 1024 (every 6th layer full) |
    | `attn_logit_softcap`, `final_logit_softcap` | None | 50, 30 | None |
    | `qk_norm` | False | False | True |
    | `local_rope_theta` | None | None | 10,000 (full layers: `rope_theta` 1,000,000) |

    **Arguments:**

    - `vocab_size`, `max_seq`, `num_layers`, `num_heads`, `num_kv_heads`, `embed_dim`.
    - `hidden_dim`: the gated MLP's inner width.
    - `head_dim`: per-head width (Gemma's is not `embed_dim // num_heads`).
    - `query_pre_attn_scalar`: the attention logits are scaled by its inverse square root
      (256 in Gemma 2 and 3, whatever `head_dim`); `None` is stored as `float(head_dim)`
      (Gemma's scaling).
    - `rope_theta`, `rope_scaling`: the rotary base and optional scaling (Gemma 3 4B and up:
      linear, factor 8) of every layer, or of the full-attention layers only when
      `local_rope_theta` is given.
    - `local_rope_theta`: the rotary base of the sliding-window layers, unscaled (Gemma 3:
      10,000); `None`: they use `rope_theta` and `rope_scaling` as the full layers do (a value
      equal to an unscaled `rope_theta` is stored as `None`). Needs `sliding_window`.
    - `rms_norm_eps`: epsilon of every RMSNorm. The norms scale by `1 + weight`, as Gemma's do.
    - `sliding_window`: the window of the sliding layers (itself and the `sliding_window - 1`
      positions before); `None`: every layer attends to every earlier position.
    - `layer_types`: `"sliding_attention"` or `"full_attention"` for each layer; `None` means
      the pattern `sliding_window_pattern` gives.
    - `sliding_window_pattern`: with `layer_types=None`, every `sliding_window_pattern`-th
      layer is a full one and the others slide (layer `i` is full when `(i + 1) %
      sliding_window_pattern == 0`): 2 for Gemma 2, 6 for Gemma 3; `None`: every layer slides.

    Explicit `layer_types` that a pattern gives are stored as that pattern (the smallest;
    `layer_types=None`), so that a loaded config equals the preset it is; other kinds stay
    explicit, with `sliding_window_pattern=None`. Read the kinds from `resolved_layer_types`.
    - `post_norms`: normalise each attention and MLP output before its residual addition
      (Gemma 2 and 3).
    - `qk_norm`: an RMSNorm over each head's queries and keys (Gemma 3).
    - `attn_logit_softcap`, `final_logit_softcap`: `cap * tanh(x / cap)` on the attention
      logits and on the output logits (Gemma 2); `None`: no cap. With an attention cap,
      `attention_backend="auto"` runs XLA's attention (cuDNN has no cap).
    - `activation`: the gate activation of the MLP, one of `eqzoo.nn.GLU_ACTIVATIONS`
      (Gemma: `"gelu_tanh"`).
    - `tie_embeddings`: use the token embedding table as the output head (the table itself:
      the `sqrt(embed_dim)` factor is applied to the input embeddings only).
    - `remat`, `scan_layers`, `attention_backend`: as in [`eqzoo.models.GPT2Config`][].
    """

    vocab_size: int = 256000
    max_seq: int = 8192
    num_layers: int = 26
    num_heads: int = 8
    num_kv_heads: int = 4
    embed_dim: int = 2304
    hidden_dim: int = 9216
    head_dim: int = 256
    query_pre_attn_scalar: float | None = 256.0
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    local_rope_theta: float | None = None
    rms_norm_eps: float = 1e-6
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None
    sliding_window_pattern: int | None = 2
    post_norms: bool = True
    qk_norm: bool = False
    attn_logit_softcap: float | None = 50.0
    final_logit_softcap: float | None = 30.0
    activation: str = "gelu_tanh"
    tie_embeddings: bool = True
    remat: str = "none"
    scan_layers: bool | str = "auto"
    attention_backend: str = "auto"

    def __post_init__(self):
        check_integer_fields(self)
        check_positive(
            "GemmaConfig", vocab_size=self.vocab_size, max_seq=self.max_seq,
            num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            embed_dim=self.embed_dim, hidden_dim=self.hidden_dim, head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
        )
        check_decoder("GemmaConfig", self)
        if self.activation not in GLU_ACTIVATIONS:
            raise ConfigError(f"GemmaConfig: activation must be one of {GLU_ACTIVATIONS}, got {self.activation!r}.")
        for name in ("query_pre_attn_scalar", "local_rope_theta", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0):
                raise ConfigError(f"GemmaConfig: {name} must be a positive number or None, got {value!r}.")
        pattern = self.sliding_window_pattern
        if pattern is not None and (isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1):
            raise ConfigError(f"GemmaConfig: sliding_window_pattern must be a positive integer or None, got {pattern!r}.")
        if self.layer_types is not None:
            check_layer_types("GemmaConfig", self.layer_types, self.num_layers, self.sliding_window)
            # Kinds that a pattern gives are kept as that pattern (the smallest), so that a
            # loaded config equals the preset it is; other kinds stay explicit.
            types = self.layer_types
            found = [p for p in [None, *range(1, self.num_layers + 1)] if _pattern(self.num_layers, p) == types]
            object.__setattr__(self, "layer_types", None if found else types)
            object.__setattr__(self, "sliding_window_pattern", found[0] if found else None)
        # One spelling for these, so that a config reads back from Hugging Face equal: a scalar
        # of None means head_dim as it is now (it then stays put if head_dim changes, as
        # transformers' does), and a local base equal to the unscaled global one is no separate base.
        if self.query_pre_attn_scalar is None:
            object.__setattr__(self, "query_pre_attn_scalar", float(self.head_dim))
        if self.local_rope_theta == self.rope_theta and self.rope_scaling is None:
            object.__setattr__(self, "local_rope_theta", None)
        if self.local_rope_theta is not None and self.sliding_window is None:
            raise ConfigError(
                "GemmaConfig: local_rope_theta is the rotary base of the sliding layers, and with "
                "sliding_window=None there are none; drop it or give the window."
            )
        if self.attn_logit_softcap is not None and self.attention_backend == "cudnn":
            raise ConfigError(
                "GemmaConfig: attn_logit_softcap has no cuDNN implementation; use "
                "attention_backend='auto' (XLA's attention then) or 'xla', or attn_logit_softcap=None."
            )

    @property
    def resolved_head_dim(self) -> int:
        """`head_dim` (for code shared with Llama-style configs)."""
        return self.head_dim

    @property
    def resolved_layer_types(self) -> tuple[str, ...]:
        """The attention kind of every layer: `layer_types`, or the kinds
        `sliding_window_pattern` gives, or all `"full_attention"` without a window."""
        if self.sliding_window is None:
            return ("full_attention",) * self.num_layers
        if self.layer_types is not None:
            return self.layer_types
        return _pattern(self.num_layers, self.sliding_window_pattern)

    def num_params(self) -> int:
        """Number of parameters (a tied head counted once)."""
        d, h, hd = self.embed_dim, self.hidden_dim, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads) + (2 * hd if self.qk_norm else 0)
        norms = (4 if self.post_norms else 2) * d
        per_layer = attn + 3 * d * h + norms
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + head + self.num_layers * per_layer + d

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: `6 N + 12 d_attn sum_l T_l`, N without the input embedding
        table when the head is separate, `d_attn = num_heads * head_dim` (the width attention
        runs at), and `T_l` the positions layer `l` attends over: `seq_len`, at most
        `sliding_window` on the sliding layers."""
        t = self.max_seq if seq_len is None else seq_len
        spans = [
            min(t, self.sliding_window) if kind == "sliding_attention" and self.sliding_window else t
            for kind in self.resolved_layer_types
        ]
        n = self.num_params() - (0 if self.tie_embeddings else self.vocab_size * self.embed_dim)
        return 6.0 * n + 12.0 * self.num_heads * self.head_dim * sum(spans)


class Gemma(AbstractLM):
    """The Gemma decoder (Gemma, Gemma 2, Gemma 3 text): `logits = model(tokens)` for one
    sequence of token ids.

    Differs from [`eqzoo.models.Llama`][] in: the token embeddings are multiplied by
    `sqrt(embed_dim)` (rounded to the parameters' dtype, as Gemma does); every RMSNorm scales by
    `1 + weight`; the MLP is GeGLU; and, per the config, sandwich norms, soft-capped attention
    and output logits, per-head query/key norms, and sliding-window layers alternating with
    full ones (one stack of identical layers; each layer's kind is looked up from its index).
    """

    config: GemmaConfig = eqx.field(static=True)
    embed: Embedding
    blocks: Stacked[TransformerBlock]
    final_norm: RMSNorm
    lm_head: Embedding | None

    def __init__(self, config: GemmaConfig, *, key: PRNGKey):
        """**Arguments:** `config`, a [`eqzoo.models.GemmaConfig`][]; `key`, a PRNG key."""
        c = config
        k_tok, k_blocks, k_head = jax.random.split(key, 3)
        out_std = 0.02 / math.sqrt(2 * c.num_layers)
        kinds = c.resolved_layer_types
        sliding = [kind == "sliding_attention" for kind in kinds]
        window = c.sliding_window if any(sliding) else None
        window_layers = tuple(sliding) if any(sliding) and not all(sliding) else None
        rope_theta, rope_scaling, local_theta = c.rope_theta, c.rope_scaling, None
        if all(sliding) and c.local_rope_theta is not None:
            rope_theta, rope_scaling = c.local_rope_theta, None  # every layer is a local one
        elif window_layers is not None and c.local_rope_theta is not None:
            local_theta = c.local_rope_theta
        scalar = c.query_pre_attn_scalar  # never None: GemmaConfig stores head_dim there
        eps = c.rms_norm_eps

        def norm():
            return RMSNorm(c.embed_dim, eps=eps, offset=1.0)

        def make_block(k):
            ka, km = jax.random.split(k)
            return TransformerBlock(
                norm(),
                Attention(
                    c.embed_dim, c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                    use_rope=True, rope_theta=rope_theta, rope_scaling=rope_scaling,
                    local_rope_theta=local_theta, use_bias=False, backend=c.attention_backend,  # type: ignore[arg-type]
                    sliding_window=window, window_layers=window_layers,
                    qk_norm=c.qk_norm, qk_norm_eps=eps, qk_norm_offset=1.0,
                    scale=float(scalar) ** -0.5, logit_softcap=c.attn_logit_softcap,
                    out_init_std=out_std, key=ka,
                ),
                norm(),
                SwiGLU(c.embed_dim, c.hidden_dim, activation=c.activation, out_init_std=out_std, key=km),
                post_attn_norm=norm() if c.post_norms else None,
                post_mlp_norm=norm() if c.post_norms else None,
            )

        self.config = c
        self.embed = Embedding(c.vocab_size, c.embed_dim, key=k_tok)
        self.blocks = Stacked(make_block, c.num_layers, remat=c.remat, scan=c.scan_layers, key=k_blocks)  # type: ignore[arg-type]
        self.final_norm = norm()
        self.lm_head = None if c.tie_embeddings else Embedding(c.vocab_size, c.embed_dim, key=k_head)

    def embed_tokens(
        self, tokens: Integer[Array, " seq"], positions: Integer[Array, " seq"]
    ) -> Float[Array, "seq embed"]:
        """The token embeddings times `sqrt(embed_dim)`, the factor rounded to their dtype."""
        rows = self.token_embeddings(tokens)
        return rows * jnp.asarray(math.sqrt(self.config.embed_dim), jnp.float32).astype(rows.dtype)

    @property
    def logit_softcap(self) -> float | None:
        """`config.final_logit_softcap`: the output logits are `cap * tanh(raw / cap)`."""
        return self.config.final_logit_softcap
