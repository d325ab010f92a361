"""A sparse mixture-of-experts feed-forward layer: a router sends each token to `k` SwiGLU experts."""

import math
from typing import Literal, get_args, no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Bool, Float, Int

from .._errors import ConfigError, ShapeError, check_last_axis, shape_str
from .._typing import PRNGKey
from ._expert_parallel import expert_parallel_size, from_experts, to_experts
from ._fields import with_fields
from ._grouped import expert_swiglu
from ._linear import AbstractLinear, apply_linear, init_linear
from ._weight import (
    AbstractWeight,
    computes_own_products,
    weight_einsum,
    weight_take_matmul,
    weight_value,
)

MoEImplementation = Literal["dense", "capacity", "ragged"]
_IMPLEMENTATIONS = get_args(MoEImplementation)


def _top_k_ids(probs, k):
    """The ids of the `k` largest entries of each row, largest first (lowest id on ties), as
    `k` rounds of argmax. `lax.top_k` gives the same ids, but XLA's partitioner gathered the
    whole batch's probabilities for it in every layer under data parallelism; argmax and a
    one-hot contraction (for the weights) partition along the batch like any elementwise op."""
    ids = []
    for _ in range(k):
        i = jnp.argmax(probs, axis=-1).astype(jnp.int32)
        ids.append(i)
        probs = jnp.where(jax.nn.one_hot(i, probs.shape[-1], dtype=jnp.bool_), -jnp.inf, probs)
    return jnp.stack(ids, axis=-1)


class MoE(eqx.Module):
    """Top-`k` routed SwiGLU experts (Shazeer et al., 2017; Mixtral, Jiang et al., 2024).

    For each token the router's softmax over `num_experts` picks the `experts_per_token`
    largest; their weights are renormalised to sum to one (`normalize_weights`, as Mixtral
    does), and the output is the weighted sum of those experts' SwiGLU outputs.

    Three implementations of the experts, chosen by `implementation`:

    - `"dense"` (default): every expert on every token, the chosen ones kept. Exact and
      dropless; `num_experts / experts_per_token` times the FLOPs a token needs (4x for
      Mixtral's 2 of 8 experts), all in plain matrix products.
    - `"capacity"`: each expert takes at most `C = ceil(capacity_factor * seq * k /
      num_experts)` of a sequence's assignments (GShard, Lepikhin et al., 2021; Switch,
      Fedus et al., 2022), gathered into an `(experts, C, embed)` block and run as one batched
      matrix product: `capacity_factor` times the FLOPs a token needs. Assignments past an
      expert's capacity are **dropped**; slots go to earlier positions first (a token's
      choices in order), so whether a position is dropped depends only on it and the
      positions before it, and a causal model stays causal. A dropped assignment adds nothing
      and the token keeps its residual. `with_aux` reports the dropped fraction. Capacity is
      per sequence, so a sequence's output never depends on the rest of the batch; one token
      (decoding) is never dropped, since its `k` experts are distinct.
    - `"ragged"`: the assignments sorted by expert and run as grouped matrix products
      (`jax.lax.ragged_dot`). Exact and dropless, and each expert computes only its own rows,
      if the backend lowers `ragged_dot` to a grouped GEMM. XLA:CPU (and, in jax 0.10, XLA:GPU
      by default) lowers it to a masked dense product over every group instead, which costs
      `num_experts` times the FLOPs: there `"dense"` is faster. Under `jax.vmap` the whole batch
      is routed at once, and under an eqzoo mesh each device routes its own tokens (see
      `eqzoo/nn/_grouped.py`). Its gradient is written out for reverse mode as training takes
      it (`jax.grad` of a batched or unbatched call; per-example gradients, `jax.vmap` of
      `jax.grad`, outside eqzoo's train step, which sums the weight gradients in one pass;
      `jax.jacrev`): forward mode raises JAX's `TypeError` for a `custom_vjp`
      function, higher-order derivatives a `ConfigError`.

    Under an eqzoo mesh with an `expert` axis (expert parallelism: the experts split over it by
    [`eqzoo.sharding.MIXTRAL_RULES`][]), `"capacity"` and `"dense"` send each sequence's expert
    slots to their experts' devices and back by `all_to_all`, inside a training step's
    [`eqzoo.sharding.activation_sharding`][] (same values; reverse-mode derivatives only
    there); `"ragged"` gathers the experts instead.

    `"dense"` and `"ragged"` agree to 1e-5, and `"capacity"` with `capacity_factor >=
    num_experts / experts_per_token` (nothing can be dropped) agrees with both (tested).

    `with_aux` also returns the two router regularisers that [`eqzoo.train.lm_loss`][] adds:
    the load-balancing loss of Switch Transformers (Fedus et al., 2022),
    `num_experts * sum_e f_e P_e` with `f_e` the fraction of tokens sending one of their `k`
    assignments to expert `e` and `P_e` its mean router probability (`k` when perfectly
    balanced, as Hugging Face's Mixtral counts it), and the router z-loss of ST-MoE (Zoph et
    al., 2022), the mean squared log-partition of the router logits.
    """

    router: eqx.nn.Linear | AbstractLinear
    gate_proj: Float[Array, "experts embed hidden"] | AbstractWeight
    up_proj: Float[Array, "experts embed hidden"] | AbstractWeight
    down_proj: Float[Array, "experts hidden embed"] | AbstractWeight
    num_experts: int = eqx.field(static=True)
    experts_per_token: int = eqx.field(static=True)
    normalize_weights: bool = eqx.field(static=True)
    implementation: str = eqx.field(static=True)
    capacity_factor: float = eqx.field(static=True)

    def __init__(
        self,
        embed_dim: int,
        hidden_dim: int,
        num_experts: int,
        experts_per_token: int,
        *,
        normalize_weights: bool = True,
        implementation: str = "dense",  # a MoEImplementation; checked below with a clearer message than beartype's
        capacity_factor: float = 1.25,
        init_std: float = 0.02,
        out_init_std: float | None = None,
        dtype=None,
        key: PRNGKey,
    ):
        """**Arguments:**

        - `embed_dim`: model width; `hidden_dim`: each expert's SwiGLU inner width.
        - `num_experts`: experts in the layer; `experts_per_token`: how many each token uses
          (`k`, at most `num_experts`).
        - `normalize_weights`: renormalise the chosen experts' router probabilities to sum
          to one (Mixtral); `False` keeps the raw softmax probabilities.
        - `implementation`: `"dense"` (every expert on every token), `"capacity"` (at most
          `capacity_factor * seq * k / num_experts` assignments an expert, the rest dropped)
          or `"ragged"` (grouped matrix products, dropless).
        - `capacity_factor`: the experts' capacity relative to a perfectly balanced load
          (`"capacity"` only).
        - `init_std`, `out_init_std`: normal init scales of the input / output projections.
        - `dtype`: parameter dtype. `key`: a PRNG key.
        """
        if not (isinstance(num_experts, int) and num_experts >= 1):
            raise ConfigError(f"MoE needs num_experts >= 1, got {num_experts!r}.")
        if not (isinstance(experts_per_token, int) and 1 <= experts_per_token <= num_experts):
            raise ConfigError(
                f"MoE: experts_per_token must be between 1 and num_experts={num_experts}, got "
                f"{experts_per_token!r}."
            )
        if implementation not in _IMPLEMENTATIONS:
            raise ConfigError(
                f"MoE implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}."
            )
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, int | float) or not capacity_factor > 0:
            raise ConfigError(f"MoE capacity_factor must be positive, got {capacity_factor!r}.")
        kr, kg, ku, kd = jax.random.split(key, 4)
        out_std = init_std if out_init_std is None else out_init_std
        dtype = jnp.float32 if dtype is None else dtype
        self.router = init_linear(embed_dim, num_experts, use_bias=False, std=init_std, dtype=dtype, key=kr)
        shape_in = (num_experts, embed_dim, hidden_dim)
        self.gate_proj = init_std * jax.random.normal(kg, shape_in, dtype)
        self.up_proj = init_std * jax.random.normal(ku, shape_in, dtype)
        self.down_proj = out_std * jax.random.normal(kd, (num_experts, hidden_dim, embed_dim), dtype)
        self.num_experts = num_experts
        self.experts_per_token = experts_per_token
        self.normalize_weights = normalize_weights
        self.implementation = implementation
        self.capacity_factor = float(capacity_factor)

    def route(
        self, x: Float[Array, "seq embed"]
    ) -> tuple[Float[Array, "seq k"], Int[Array, "seq k"], Float[Array, "seq experts"]]:
        """The router's choice for each position.

        **Returns:** `(weights, experts, logits)`: the float32 weights of the chosen experts
        (renormalised when `normalize_weights`), their int32 ids (largest probability first),
        and the float32 router logits.
        """
        logits = apply_linear(self.router, x).astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        experts = _top_k_ids(jax.lax.stop_gradient(probs), self.experts_per_token)
        choice = jax.nn.one_hot(experts, self.num_experts, dtype=probs.dtype)  # (seq, k, experts)
        weights = jnp.einsum("te,tke->tk", probs, choice)
        if self.normalize_weights:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return weights, experts.astype(jnp.int32), logits

    def capacity(self, seq: int) -> int:
        """How many of a `seq`-long sequence's assignments each expert takes under
        `"capacity"`: `ceil(capacity_factor * seq * k / num_experts)`, at least 1 and at most
        `seq` (a token never picks an expert twice)."""
        balanced = self.capacity_factor * seq * self.experts_per_token / self.num_experts
        return max(1, min(seq, math.ceil(balanced)))

    def _weights(self, dtype):
        return [weight_value(p, dtype) for p in (self.gate_proj, self.up_proj, self.down_proj)]

    def _dense(self, x, experts):
        from ..sharding._activation import active_mesh  # eqzoo.sharding imports eqzoo.nn

        if expert_parallel_size() > 1 or (active_mesh() is None and jax.default_backend() == "cpu"):
            # Every expert's slots hold the whole sequence, the products batched over the
            # experts: "td,edh->teh" made XLA:CPU copy each (experts, embed, hidden) weight into
            # one (embed, experts * hidden) operand first (measured: Mixtral-style 16-token
            # prefill 126 -> 75 ms CPU time, float experts; int4 experts alike). CPU only until
            # an accelerator measures it: there the broadcast tokens become the residual of the
            # weight gradients' products.
            y = self._expert_slots(jnp.broadcast_to(x, (self.num_experts, *x.shape)))  # (experts, seq, embed)
            y = jnp.swapaxes(y, 0, 1)  # (seq, experts, embed)
        else:
            # Under a mesh without expert parallelism the partitioner splits the broadcast
            # tokens over the experts (and gathers them under FSDP); contracting the shared
            # tokens with every expert's weights keeps tokens where they are.
            g = weight_einsum("td,edh->teh", x, self.gate_proj)
            u = weight_einsum("td,edh->teh", x, self.up_proj)
            y = weight_einsum("teh,ehd->ted", jax.nn.silu(g) * u, self.down_proj)  # (seq, experts, embed)
        return jnp.take_along_axis(y, experts[..., None], axis=1), None

    def _expert_slots(self, xs):
        """Each expert's SwiGLU on its own slots, `(experts, slots, embed)` in and out (in
        `xs`'s dtype), the
        products batched over the experts; with the experts split over the mesh's `expert`
        axis the slots go to their experts' devices and back."""
        parallel = expert_parallel_size() > 1
        if parallel:
            xs = to_experts(xs)
        g = weight_einsum("ecd,edh->ech", xs, self.gate_proj)
        u = weight_einsum("ecd,edh->ech", xs, self.up_proj)
        ys = weight_einsum("ech,ehd->ecd", jax.nn.silu(g) * u, self.down_proj)
        return from_experts(ys) if parallel else ys

    def _capacity(self, x, experts):
        seq, k = experts.shape
        e, c = self.num_experts, self.capacity(seq)
        # Assignments in priority order: token by token, each token's choices in order, so an
        # assignment is dropped only for lack of room left by earlier positions (and a position
        # never depends on later ones, as a causal model needs).
        flat = experts.reshape(-1)  # (seq * k,)
        token = jnp.repeat(jnp.arange(seq, dtype=jnp.int32), k)
        onehot = jax.nn.one_hot(flat, e, dtype=jnp.int32)  # (k * seq, experts)
        position = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)  # within its expert
        kept = position < c
        slot = jnp.where(kept, flat * c + position, e * c)  # e * c: the slot of dropped ones
        # Which token fills each of the e * c slots (seq: an empty slot, reading a zero row).
        slot_token = jnp.full((e * c + 1,), seq, jnp.int32).at[slot].set(token)[: e * c]
        xs = jnp.concatenate([x, jnp.zeros((1, x.shape[-1]), x.dtype)])[slot_token]
        ys = self._expert_slots(xs.reshape(e, c, -1)).reshape(e * c, -1)
        ys = jnp.concatenate([ys, jnp.zeros((1, ys.shape[-1]), ys.dtype)])
        out = ys[slot].reshape(seq, k, -1)  # dropped assignments read the zero row
        return out, kept.reshape(seq, k)

    def _experts(self, x, experts):
        """`(seq, k, embed)`: each chosen expert's output; and which assignments were kept
        (`(seq, k)` bool), or `None` when none can be dropped."""
        if self.implementation == "capacity":
            return self._capacity(x, experts)
        if self.implementation == "ragged":
            self._check_grouped_products()
            return expert_swiglu(x, experts, *self._weights(x.dtype)), None
        return self._dense(x, experts)

    @no_type_check  # our own shape check below says what to do; a generic type error would not
    def with_aux(
        self, x: Float[Array, "seq embed"], mask: Float[Array, " seq"] | Bool[Array, " seq"] | None = None
    ) -> tuple[Float[Array, "seq embed"], dict[str, Float[Array, ""]]]:
        """The layer's output and its router statistics for this sequence.

        **Arguments:** `x`, one sequence; `mask`, optional weights of the positions that count
        in the statistics (padding left out; every position is still routed and computed).

        **Returns:** `(output, aux)` with float32 scalars

        - `aux["moe_load_balance"]`: `num_experts * sum_e f_e * P_e`, with `f_e` the fraction
          of positions that chose expert `e` (among their `k`) and `P_e` its mean router
          probability: `k` when both are uniform, at most `num_experts` (Hugging Face's
          `load_balancing_loss_func` convention);
        - `aux["moe_z_loss"]`: the mean squared log-sum-exp of the router logits;
        - `aux["moe_dropped"]`: the fraction of assignments dropped for lack of capacity
          (always 0 but under `"capacity"`).
        """
        if x.ndim != 2:
            raise ShapeError(
                f"MoE takes one sequence of shape (seq, embed); got {shape_str(x.shape)}. "
                "Wrap the call in jax.vmap for a batch."
            )
        check_last_axis("MoE", x, self.router.in_features)
        self._check_context_parallel()
        weights, experts, logits = self.route(x)
        out, kept = self._experts(x, experts)  # (seq, k, embed)
        y = jnp.einsum("tk,tkd->td", weights.astype(x.dtype), out)
        y = checkpoint_name(y, "mlp_out")
        w = jnp.ones((x.shape[0],), jnp.float32) if mask is None else mask.astype(jnp.float32)
        total = jnp.maximum(jnp.sum(w), 1e-9)
        probs = jax.nn.softmax(logits, axis=-1)
        chose = jnp.sum(jax.nn.one_hot(experts, self.num_experts, dtype=jnp.float32), axis=1)  # (seq, experts)
        fraction = jnp.einsum("t,te->e", w, chose) / total
        balance = self.num_experts * jnp.sum(fraction * (jnp.einsum("t,te->e", w, probs) / total))
        z_loss = jnp.sum(w * jnp.square(jax.nn.logsumexp(logits, axis=-1))) / total
        dropped = jnp.zeros((), jnp.float32)
        if kept is not None:
            dropped = 1.0 - jnp.sum(w[:, None] * kept.astype(jnp.float32)) / (total * self.experts_per_token)
        return y, {"moe_load_balance": balance, "moe_z_loss": z_loss, "moe_dropped": dropped}

    def _check_grouped_products(self) -> None:
        # "ragged" multiplies float arrays in its own grouped products (and their hand-written
        # backward pass): a weight that computes its own products (fp8) would be bypassed.
        own = [f"{n} ({type(w).__name__})" for n in ("gate_proj", "up_proj", "down_proj") if computes_own_products(w := getattr(self, n))]
        if own:
            raise ConfigError(
                f"MoE(implementation='ragged') multiplies its experts in grouped products of float arrays, "
                f"but the experts' {', '.join(own)} compute their own products (fp8 training: "
                "eqzoo.quant.prepare_fp8), which those would bypass. Use implementation 'dense' or 'capacity' "
                "(model.with_moe_implementation('dense')), or leave the experts out (prepare_fp8(..., experts=False))."
            )

    def _check_context_parallel(self) -> None:
        # Under context parallelism (mesh context > 1) each device holds a slice of every
        # sequence. "dense" without expert parallelism is per position and runs on that slice;
        # the others need the whole sequence (or the batch's tokens) on a device: "capacity"
        # ranks every position of the sequence for its expert slots, "ragged" and the expert
        # exchange split tokens over the batch axes only. Refused rather than gathered.
        from ..sharding._activation import active_mesh  # eqzoo.sharding imports eqzoo.nn
        from ..sharding._mesh import context_size

        ctx = context_size(active_mesh())
        if ctx == 1:
            return
        if self.implementation != "dense" or expert_parallel_size() > 1:
            what = (
                f"moe_implementation={self.implementation!r}" if self.implementation != "dense"
                else f"expert parallelism (mesh expert={expert_parallel_size()})"
            )
            raise ConfigError(
                f"MoE: {what} cannot run under context parallelism (mesh context={ctx}): it needs "
                "each sequence's tokens whole on one device, and eqzoo refuses to gather them. Use "
                "moe_implementation='dense' on a mesh with expert=1 (model.with_moe_implementation"
                "('dense')), or a mesh with context=1."
            )

    def with_implementation(self, implementation: str) -> "MoE":
        """The same layer (same weights) running its experts with another `implementation`:
        e.g. `"dense"` where a computation must drop nothing."""
        if implementation not in _IMPLEMENTATIONS:
            raise ConfigError(f"MoE implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}.")
        return with_fields(self, implementation=implementation)

    def router_trains_from_loss(self) -> bool:
        """Whether the model's loss reaches the router: not when each token uses one expert
        whose weight is renormalised to 1 (`experts_per_token=1, normalize_weights=True`);
        then only the router losses train it."""
        return not (self.experts_per_token == 1 and self.normalize_weights and self.num_experts > 1)

    @no_type_check  # checked in with_aux
    def __call__(self, x: Float[Array, "seq embed"], *, key: PRNGKey | None = None) -> Float[Array, "seq embed"]:
        """**Arguments:** `x`, one sequence. **Returns:** same shape and dtype."""
        return self.with_aux(x)[0]

    def gathers(self, tokens: int) -> bool:
        """Whether [`eqzoo.nn.MoE.decode`][] reads only the chosen experts for a call on
        `tokens` positions in all (every sequence of the batch): when they choose fewer than
        `num_experts` experts in all. Plain arrays, quantized experts and LoRA-adapted experts
        are then multiplied expert by expert ([`eqzoo.nn.weight_take_matmul`][],
        [`eqzoo.nn.AbstractWeight.take_matmul`][]; int4 experts on CPU from their packed bytes)."""
        return tokens * self.experts_per_token < self.num_experts

    @no_type_check  # checked in with_aux / below
    def decode(self, x: Float[Array, "seq embed"], batch_size: int | None = None) -> Float[Array, "seq embed"]:
        """`__call__` for decoding. With `batch_size` (how many sequences the call is vmapped
        over, static) and few tokens in all (`gathers(batch_size * seq)`: at batch 1 a Mixtral
        step routes one token to 2 of 8 experts), each position's `k` experts' weights are
        gathered and only they are read: decoding is bound by the bytes of weights it reads, and
        the other implementations read every expert's weights for every token. The same
        products as `"dense"` on the chosen experts (equal to float rounding; tested within
        1e-5, int8 and LoRA experts too). Under
        `"capacity"` only single tokens are gathered (a longer prefill may drop assignments;
        the gather path never does)."""
        # Under "capacity" a prefill of several tokens may drop assignments, which the gather
        # path never does: there it gathers single tokens only (never dropped), so a sequence's
        # output does not depend on the batch size.
        several = self.implementation == "capacity" and x.ndim == 2 and x.shape[0] > 1
        if batch_size is None or x.ndim != 2 or several or not self.gathers(batch_size * x.shape[0]):
            return self(x)
        weights, experts, _ = self.route(x)  # (seq, k)

        # Each chosen expert's weight in its stored (contract, out) layout, the products batched
        # over (position, choice): "td,tkdh->tkh" made XLA:CPU transpose the gathered weights
        # into one (embed, k * hidden) operand, element by element (measured: 2-3x slower at
        # batch 1, float and int8 alike); int4 experts multiply from their packed bytes.
        xk = jnp.broadcast_to(x[:, None, :], (*experts.shape, x.shape[-1]))  # (seq, k, embed)
        g = weight_take_matmul(self.gate_proj, xk, experts)  # (seq, k, hidden)
        u = weight_take_matmul(self.up_proj, xk, experts)
        y = weight_take_matmul(self.down_proj, jax.nn.silu(g) * u, experts)  # (seq, k, embed)
        return jnp.einsum("tk,tkd->td", weights.astype(x.dtype), y)
