"""Growing (or shrinking) a language model's vocabulary, for tokens added to its tokenizer."""

import equinox as eqx
import jax
import jax.numpy as jnp

from .._errors import ConfigError
from ._lm import AbstractLM
from ._registry import get_config, model_class


def resize_vocab(model: AbstractLM, vocab_size: int) -> AbstractLM:
    """`model` with a vocabulary of `vocab_size` tokens: its token embedding (and an untied
    output head) gain or lose rows at the end; every other parameter is kept as it is.

    For tokens added to a tokenizer (chat markers such as `<|im_start|>` before supervised
    fine-tuning on conversations): a token id at or beyond the model's vocabulary otherwise
    makes the loss NaN. Each new row is the mean of the existing rows, in the embedding and in
    the head alike, so a new token starts as an average token: its logit is the mean logit
    rather than one that dominates or vanishes, and training moves it from there. Rows for ids
    below the old size are unchanged, so the resized model computes exactly the old logits for
    them. Shrinking drops the last rows (the tokens `>= vocab_size`).

    Resize a plain model: before [`eqzoo.peft.lora`][] or [`eqzoo.quant.quantize`][] (neither
    touches the embedding, but they change the model's structure).

    **Arguments:**

    - `model`: an eqzoo language model ([`eqzoo.models.AbstractLM`][]).
    - `vocab_size`: the new number of tokens (`len(tokenizer)` after adding tokens; rounding
      it up to a multiple of 64 keeps the output projection fast on GPUs).

    **Returns:** the resized model, with `config.vocab_size == vocab_size`.

    **Raises:** `ConfigError` for a model that is not a plain eqzoo language model or a
    `vocab_size` below 1.
    """
    if not isinstance(model, AbstractLM):
        raise ConfigError(f"resize_vocab takes an eqzoo language model; got {type(model).__name__}.")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"resize_vocab: vocab_size must be a positive integer, got {vocab_size!r}.")
    old = model.config.vocab_size
    if vocab_size == old:
        return model
    config = get_config(model.config, vocab_size=vocab_size)
    skeleton = eqx.filter_eval_shape(model_class(config), config, key=jax.random.key(0))
    old_leaves = jax.tree_util.tree_leaves_with_path(model)
    new_leaves, treedef = jax.tree_util.tree_flatten(skeleton)
    if len(old_leaves) != len(new_leaves):
        raise ConfigError(
            f"resize_vocab: this {type(model).__name__} is not laid out as a plain one (adapters or "
            "quantized layers?); resize the plain model first, then adapt or quantize it."
        )
    leaves = []
    for (path, x), want in zip(old_leaves, new_leaves, strict=True):
        if not eqx.is_array(x):
            leaves.append(want)
        elif tuple(x.shape) == tuple(want.shape):
            leaves.append(x)
        elif x.shape[0] == old and want.shape[0] == vocab_size and x.shape[1:] == want.shape[1:]:
            if vocab_size < old:
                leaves.append(x[:vocab_size])
            else:  # new rows: the mean row, in float32, stored in the parameter's dtype
                mean = jnp.mean(x.astype(jnp.float32), axis=0, keepdims=True).astype(x.dtype)
                leaves.append(jnp.concatenate([x, jnp.broadcast_to(mean, (vocab_size - old, *x.shape[1:]))]))
        else:
            raise ConfigError(
                f"resize_vocab: {jax.tree_util.keystr(path)} has shape {tuple(x.shape)}, where a "
                f"{type(model).__name__} of vocabulary {vocab_size} has {tuple(want.shape)}; resize the "
                "plain model first, then adapt or quantize it."
            )
    return jax.tree_util.tree_unflatten(treedef, leaves)
