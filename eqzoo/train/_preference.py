"""Preference tuning: the log-probability of whole sequences, and the DPO loss built on it."""

from typing import no_type_check

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Integer

from .._errors import ConfigError, ShapeError, shape_str
from .._typing import PRNGKey
from ._losses import _batch_vmap, _chunked_batch_nll, missing_batch_keys, packing_args


@no_type_check  # checked below: a generic type error would print the whole model
def sequence_logprobs(
    model,
    tokens: Integer[Array, "batch seq"],
    targets: Integer[Array, "batch seq"],
    mask: Bool[Array, "batch seq"] | Float[Array, "batch seq"] | None = None,
    *,
    segment_ids: Integer[Array, "batch seq"] | None = None,
    positions: Integer[Array, "batch seq"] | None = None,
    chunk_size: int | None = None,
) -> Float[Array, " batch"]:
    """`sum_t mask[t] * log p(targets[t] | tokens[:t + 1])` for each row: the log-probability
    an eqzoo language model gives each row's counted targets, in float32.

    The logits are formed `chunk_size` positions at a time and recomputed in the backward pass
    (as `lm_loss(implementation="chunked")`), so the batch's float32 logits never exist at once.

    **Arguments:** `model` (a [`eqzoo.models.GPT2`][], `Llama`, `Mixtral`, ...); `tokens` and
    `targets` of one shape `(batch, seq)`; `mask`, which positions count (for preference data:
    the response, not the prompt; default all); `segment_ids` / `positions` as for the model;
    `chunk_size` (default [`eqzoo.train.auto_chunk_size`][]).

    **Returns:** a `(batch,)` float32 array.
    """
    # NumPy arrays (what loaders return) are accepted like JAX ones, with type checking on or off.
    tokens, targets, mask, segment_ids, positions = (
        None if a is None else jnp.asarray(a) for a in (tokens, targets, mask, segment_ids, positions)
    )
    if tokens.ndim != 2 or tokens.shape != targets.shape:
        raise ShapeError(
            f"sequence_logprobs takes tokens and targets of one shape (batch, seq); got "
            f"{shape_str(tokens.shape)} and {shape_str(targets.shape)}."
        )
    ids = {"tokens": tokens, "targets": targets, "segment_ids": segment_ids, "positions": positions}
    for name, value in ids.items():
        if value is not None and not jnp.issubdtype(value.dtype, jnp.integer):
            raise ShapeError(
                f"sequence_logprobs takes integer {name}; got dtype {value.dtype.name}. Convert with "
                f"{name}.astype(jnp.int32)."
            )
    if mask is not None and not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.floating)):
        raise ShapeError(
            f"sequence_logprobs takes a bool or floating-point mask; got dtype {mask.dtype.name}. "
            "Convert with mask.astype(bool)."
        )
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    if not (hasattr(model, "features") and hasattr(model, "head_weight")):
        raise ConfigError(
            "sequence_logprobs needs a language model with `features` and `head_weight` (eqzoo's "
            f"language models have them); {type(model).__name__} has not."
        )
    packing_args(tokens, "sequence_logprobs: {name}", mask=mask)
    packing = packing_args(tokens, "sequence_logprobs: {name}", segment_ids=segment_ids, positions=positions)
    features = _batch_vmap(model.features)(tokens, **packing)
    nll = _chunked_batch_nll(features, model.head_weight(), targets, chunk_size, getattr(model, "logit_softcap", None))
    w = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return -jnp.sum(nll * w, axis=-1)


DPO_KEYS = (
    "chosen_tokens", "chosen_targets", "chosen_mask",
    "rejected_tokens", "rejected_targets", "rejected_mask",
    "ref_chosen_logprobs", "ref_rejected_logprobs",
)
"""The batch keys [`eqzoo.train.dpo_loss`][] reads."""


def dpo_loss(
    model,
    batch: dict[str, Array | np.ndarray],
    key: PRNGKey | None = None,
    *,
    beta: float | int = 0.1,
    label_smoothing: float | int = 0.0,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Direct preference optimisation (Rafailov et al., 2023): make the policy prefer each
    pair's chosen response over its rejected one by more than a frozen reference model does.

    With `r_c = log pi(chosen) - log ref(chosen)` and `r_r` alike for the rejected response
    (log-probabilities of the response tokens, [`eqzoo.train.sequence_logprobs`][]), the loss
    is `-(1 - eps) log sigmoid(beta (r_c - r_r)) - eps log sigmoid(-beta (r_c - r_r))`,
    averaged over the pairs (`eps = label_smoothing`: conservative DPO for noisy labels). At
    the start (policy = reference) it is `log 2`.

    The reference model's log-probabilities come in the batch, computed once beforehand with
    `sequence_logprobs(reference, ...)`, so the reference is never held beside the policy while
    training. A `loss_fn(model, batch, key)` for [`eqzoo.train.make_train_step`][]; pass
    `functools.partial(dpo_loss, beta=...)` for other settings.

    Each row holds one sequence (packed pairs are not supported), and a mixture-of-experts
    model's router losses are not added. Compute the reference at the precision the policy
    trains in (`precision.cast_to_compute(reference)`), or the loss does not start at `log 2`.

    **Arguments:**

    - `batch`: the keys of `DPO_KEYS`: for the chosen and the rejected response of each pair,
      `(pairs, seq)` `*_tokens` (prompt and response), `*_targets` (the next tokens) and
      `*_mask` (True on the response's targets), and `(pairs,)` `ref_*_logprobs`.
    - `beta`: the strength of the pull toward the reference (larger: stay closer).
    - `label_smoothing`: the assumed fraction of flipped preference labels, in `[0, 0.5)`.

    **Returns:** `(loss, metrics)` with `reward_accuracy` (the fraction of pairs whose chosen
    response has the larger reward `beta * r`), `reward_margin` (mean `beta (r_c - r_r)`),
    `chosen_reward`, `rejected_reward` (means of `beta * r`).
    """
    missing = missing_batch_keys(batch, DPO_KEYS, "dpo_loss")
    if missing:
        raise ConfigError(f"dpo_loss: the batch lacks {missing}; it needs {list(DPO_KEYS)}.")
    if not (isinstance(beta, int | float) and beta > 0):
        raise ConfigError(f"dpo_loss: beta must be a positive number, got {beta!r}.")
    if not (isinstance(label_smoothing, int | float) and 0 <= label_smoothing < 0.5):
        raise ConfigError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing!r}.")
    pairs = batch["chosen_tokens"].shape[0]
    for side in ("chosen", "rejected"):
        ref = batch[f"ref_{side}_logprobs"]
        if ref.shape != (pairs,) or batch[f"{side}_tokens"].shape[0] != pairs:
            raise ShapeError(
                f"dpo_loss: {pairs} chosen sequences, but {side}_tokens "
                f"{shape_str(batch[f'{side}_tokens'].shape)} and ref_{side}_logprobs "
                f"{shape_str(ref.shape)}; give one {side} sequence and one reference "
                "log-probability per pair."
            )
    # Chosen and rejected in one forward pass when they have one length.
    c_tok, r_tok = batch["chosen_tokens"], batch["rejected_tokens"]
    if c_tok.shape == r_tok.shape:
        logps = sequence_logprobs(
            model,
            jnp.concatenate([c_tok, r_tok]),
            jnp.concatenate([batch["chosen_targets"], batch["rejected_targets"]]),
            jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]]),
        )
        chosen, rejected = logps[:pairs], logps[pairs:]
    else:
        chosen = sequence_logprobs(model, c_tok, batch["chosen_targets"], batch["chosen_mask"])
        rejected = sequence_logprobs(model, r_tok, batch["rejected_targets"], batch["rejected_mask"])
    b = jnp.float32(beta)
    chosen_reward = b * (chosen - batch["ref_chosen_logprobs"].astype(jnp.float32))
    rejected_reward = b * (rejected - batch["ref_rejected_logprobs"].astype(jnp.float32))
    margin = chosen_reward - rejected_reward
    eps = jnp.float32(label_smoothing)
    losses = -(1 - eps) * jax.nn.log_sigmoid(margin) - eps * jax.nn.log_sigmoid(-margin)
    metrics = {
        "reward_accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
        "reward_margin": jnp.mean(margin),
        "chosen_reward": jnp.mean(chosen_reward),
        "rejected_reward": jnp.mean(rejected_reward),
    }
    return jnp.mean(losses), metrics
