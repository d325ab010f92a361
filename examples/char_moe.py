"""At the same compute per token, does a mixture of experts learn faster than a dense model?

Two character-level language models are trained on the Python standard library's own source
(`eqzoo.data.stdlib_corpus`; nothing is downloaded) with the same data order, optimizer,
schedule, number of steps and initialisation seed, and scored on held-out modules (the last 10%
of the corpus) against a unigram baseline:

1. **dense**: an `eqzoo.models.Llama` (`tiny-llama`-style: RMSNorm, rotary positions,
   grouped-query attention) whose feed-forward layers are SwiGLUs of hidden size `H`;
2. **moe**: an `eqzoo.models.Mixtral` with the same attention, embeddings and depth, whose
   feed-forward layers are `E = 8` SwiGLU experts of hidden size `H / 2`, each token routed to
   `k = 2` of them (`moe_implementation="capacity"`, capacity factor 1.25).

**Why 8 experts of `H / 2`, top-2.** A token's feed-forward FLOPs are `k` experts times
`3 * embed * hidden`: `2 * 3 * d * (H / 2) = 3 * d * H`, exactly the dense SwiGLU's, plus the
router (`d * E` per layer, 0.6% of a layer's active parameters here). The MoE holds 4x the
feed-forward parameters at that compute. The other exact match, `E = 8, k = 1` with hidden
`H`, does not work with Mixtral's routing: its chosen weights are renormalised to sum to one,
so a single chosen expert always has weight 1 and the router gets no gradient from the
language-model loss (measured: 4e-13 against 2e-6 for `k = 2`); only the load-balancing and
z-losses would move it.
Both models' `flops_per_token` (the `6 N + 12 L d T` estimate, N the *active* parameters),
`num_params` and `num_active_params` are printed and reported.

**Capacity.** Under `"capacity"` each expert takes at most `ceil(1.25 * seq * k / E)` of a
sequence's assignments (40 of 256 here) and the rest are dropped (the token keeps its residual
for that expert); the fraction dropped is the `moe_dropped` metric, reported for the last
training steps and on the held-out set. The experts then run 1.25x the active FLOPs, as one
batched matrix product, plus the gather and scatter of the slots.

Reported per model: the final training loss (the next-token loss, averaged over the last
`log_every` steps; for the MoE without its router losses), the held-out validation loss in
nats/char at a few points of training, total and active parameters, training tokens/s (the
median over logging windows, so compilation and evaluations do not count), training wall
time; and for the MoE the final `moe_load_balance` (k = 2 is balanced), `moe_dropped`, and the
expert utilisation on the first held-out batch: the fraction of assignments each expert
receives in each layer, from `MoE.route` applied to the features each layer's router sees.
Finally the MoE continues a prompt with `eqzoo.generate` (temperature 0.8, top-k 20).

    python examples/char_moe.py                # about 3.5 minutes on 2 CPU cores
    python examples/char_moe.py --smoke --json

**What it measured** on the project's 2-core CPU (4 layers, width 128, 4 heads / 2 KV heads,
vocabulary 96; 450 steps of 16 x 128 characters, 0.92M training characters seen; 211 s in all):

| | dense (SwiGLU 352) | MoE (8 x SwiGLU 176, top-2) |
|---|---|---|
| parameters / active per token | 763,008 / 763,008 | 2,389,120 / 767,104 |
| training MFLOPs per token | 5.29 | 5.32 (x1.005: the routers) |
| validation loss at steps 75, 150, 225 | 2.417, 2.201, 2.089 | 2.547, 2.340, 2.186 |
| validation loss at steps 300, 375, 450 | 1.966, 1.875, **1.829** | 2.053, 1.928, **1.879** |
| final training loss (last 25 steps) | 1.494 | 1.583 |
| tokens/s, training wall time | 10,287, 94 s | 9,169, 106 s |

(nats/char; the unigram baseline is 3.120, an untrained model 4.68.) The MoE's router ended
balanced: `moe_load_balance` 2.05 on the last training steps, 2.05 held out (2 is uniform for
top-2); all 8 experts receive tokens in every layer, between 7.3% and 17.7% of a layer's
assignments (12.5% is uniform). Capacity dropped 4.5% of assignments at the end (on the first
held-out batch 5.8% in the first layer, 3.5% or less in the others), down from 9.7% at step 175.

**Conclusion: at this tiny scale the mixture of experts does not learn faster than the dense
model at the same compute per token.** It was behind at every one of the six evaluations, by
0.13 nats at step 75 narrowing to 0.05 at step 450: its 3.1x parameters did not show up as a
lower loss within 0.9M characters. Per second it is further behind: on this CPU a step takes
1.13x as long (the capacity path computes 1.25x the active FLOPs, plus the gather and scatter
of the slots). Whether the MoE pulls ahead with more training needs longer runs than this
example's 4-minute budget. This is a single run on a shared machine: speeds vary between runs.

Progress lines go to stderr; with `--json` the last stdout line is one JSON summary. Each
model's metrics are appended to `<out>/<model>.jsonl`.
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jaxtyping

with jaxtyping.install_import_hook("eqzoo", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"):
    import eqzoo
    from eqzoo import data, models, train

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

VAL_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Preset:
    """The two models' shared shape and the schedule (flags override the schedule)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    hidden_dim: int  # the dense SwiGLU's; each expert gets hidden_dim // experts_per_token
    num_experts: int
    experts_per_token: int
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    max_chars: int
    eval_every: int
    eval_batches: int
    log_every: int
    sample_tokens: int


# Sized for a 2-core CPU: both models together in 219 s measured there (figures in the docstring).
DEFAULT = Preset(
    num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=128, hidden_dim=352, num_experts=8,
    experts_per_token=2, steps=450, batch_size=16, seq_len=128, lr=5e-3, max_chars=2_000_000,
    eval_every=75, eval_batches=16, log_every=25, sample_tokens=200,
)
SMOKE = Preset(
    num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, hidden_dim=64, num_experts=4,
    experts_per_token=2, steps=40, batch_size=8, seq_len=64, lr=1e-2, max_chars=300_000,
    eval_every=20, eval_batches=4, log_every=10, sample_tokens=40,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; unset schedule flags take the value of the chosen preset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (each model)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (both models)")
    parser.add_argument("--capacity-factor", type=float, default=1.25, help="MoE expert capacity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="def ", help="text the MoE's sample continues")
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run (CI)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary line last")
    parser.add_argument("--out", type=Path, default=Path("runs/char_moe"))
    args = parser.parse_args(argv)
    args.preset = SMOKE if args.smoke else DEFAULT
    for name in ("steps", "lr"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(args.preset, name))
    if args.steps < 1 or args.lr <= 0 or args.capacity_factor <= 0:
        parser.error("--steps must be >= 1, --lr > 0 and --capacity-factor > 0")
    return args


def unigram_loss(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats per character) on `val_ids` of the training split's character
    frequencies (add-one smoothed, so a character unseen in training has a finite cost)."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    val_counts = np.bincount(val_ids, minlength=vocab_size).astype(np.float64)
    return float(-(val_counts * log_p).sum() / val_counts.sum())


def configs(p: Preset, vocab_size: int, capacity_factor: float) -> tuple[models.LlamaConfig, models.MixtralConfig]:
    """The dense model and its equal-active-compute mixture of experts."""
    shared = dict(
        vocab_size=vocab_size, max_seq=p.seq_len, num_layers=p.num_layers, num_heads=p.num_heads,
        num_kv_heads=p.num_kv_heads, embed_dim=p.embed_dim,
        rope_theta=10000.0,  # Llama's; MixtralConfig defaults to Mixtral's 1e6
    )
    dense = models.LlamaConfig(hidden_dim=p.hidden_dim, **shared)
    moe = models.MixtralConfig(
        hidden_dim=p.hidden_dim // p.experts_per_token, num_experts=p.num_experts,
        experts_per_token=p.experts_per_token, moe_implementation="capacity",
        moe_capacity_factor=capacity_factor, **shared,
    )
    return dense, moe


def make_optimizer(args: argparse.Namespace) -> optax.GradientTransformation:
    warmup = max(1, min(100, args.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=warmup, decay_steps=args.steps, end_value=args.lr / 10
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=0.1, mask=train.weight_decay_mask),
    )


def expert_load(model: models.Mixtral, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Route a batch through `model` and count, per layer, the assignments each expert gets.

    Walks the layers as `TransformerBlock.with_aux` does (attention, then the MoE on the
    normalised residual), calling `MoE.route` on exactly what each router sees.

    **Returns:** `(counts, features)`: `(batch, layers, experts)` assignment counts (before
    capacity drops) and the final features, to check the walk against `model.features`.
    """

    def one(seq):
        x = model.embed_tokens(seq, jnp.arange(seq.shape[0], dtype=jnp.int32))

        def layer(block, h, _):
            h = h + block.attn(block.attn_norm(h))
            z = block.mlp_norm(h)
            _, experts, _ = block.mlp.route(z)  # (seq, k) expert ids
            counts = jnp.zeros((block.mlp.num_experts,), jnp.float32).at[experts.reshape(-1)].add(1.0)
            return h + block.mlp(z), counts

        h, counts = model.blocks.apply(layer, x)
        return counts, model.final_norm(h)

    return jax.vmap(one)(tokens)


def utilisation(model: models.Mixtral, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Expert utilisation on one held-out batch: per layer, the fraction of assignments each
    expert receives (1 / num_experts when balanced), how many experts receive any, and the
    fraction the per-sequence capacity drops (each expert keeps its first `capacity` of a
    sequence's assignments)."""
    tokens = jnp.asarray(batch["tokens"])
    counts, feats = eqx.filter_jit(expert_load)(model, tokens)
    reference = eqx.filter_jit(lambda m, t: jax.vmap(m.features)(t))(model, tokens)
    walk_error = float(jnp.max(jnp.abs(feats - reference)))
    if walk_error > 1e-4:  # the walk above no longer matches TransformerBlock
        raise RuntimeError(f"expert_load's layer walk differs from model.features by {walk_error:.2e}")
    counts = np.asarray(counts, np.float64)  # (batch, layers, experts)
    capacity = model.blocks[0].mlp.capacity(tokens.shape[1])
    assignments = counts.sum(-1, keepdims=True)  # seq * k per sequence and layer
    dropped = np.maximum(counts - capacity, 0).sum(-1) / assignments[..., 0]  # (batch, layers)
    fractions = counts.sum(0) / assignments.sum(0)  # (layers, experts)
    return {
        "expert_fractions": np.round(fractions, 4).tolist(),
        "experts_used": (counts.sum(0) > 0).sum(-1).tolist(),
        "max_expert_fraction": float(fractions.max()),
        "min_expert_fraction": float(fractions.min()),
        "capacity": capacity,
        "dropped_by_layer": np.round(dropped.mean(0), 4).tolist(),
    }


def train_one(
    name: str, model: Any, args: argparse.Namespace, loader: data.TokenLoader, val_set: list, key: jax.Array
) -> tuple[Any, dict[str, Any]]:
    """Train `model` with the shared recipe; return the trained model and its figures."""
    p: Preset = args.preset
    optimizer = make_optimizer(args)
    state = train.TrainState.create(model, optimizer, key=key)
    train_step = train.make_train_step(train.lm_loss, optimizer)
    eval_step = train.make_eval_step(train.lm_loss)
    # lm_loss's "loss" adds a MoE's router losses; "nll" is the next-token loss alone. The dense
    # model has no router, so its "loss" is its nll.
    nll = "nll" if model.aux_loss_weights() else "loss"
    initial = train.evaluate(eval_step, state, iter(val_set))[nll]
    path = args.out / f"{name}.jsonl"
    path.unlink(missing_ok=True)
    loggers = [
        train.ConsoleLogger(args.steps, keys=(f"train/{nll}", f"eval/{nll}", "train/moe_dropped")),
        train.JSONLLogger(path),
    ]
    print(f"{name}: {args.steps} steps; initial validation loss {initial:.3f}", file=sys.stderr)
    start = time.perf_counter()
    result = train.fit(
        state, train_step, loader, num_steps=args.steps, eval_step=eval_step,
        eval_batches=lambda: iter(val_set), eval_every=p.eval_every, log_every=p.log_every,
        loggers=loggers,
    )
    seconds = time.perf_counter() - start
    # Steady-state speed: the median window, so the first (compilation) and the windows that
    # follow an evaluation (fit times them with it) do not count.
    rates = [r["train/steps_per_s"] for r in result.history[1:]] or [result.history[0]["train/steps_per_s"]]
    figures = {
        "initial_val_loss": initial,
        "train_loss": result.last(f"train/{nll}"),
        "val_loss": result.last(f"eval/{nll}"),
        "val_curve": [[int(r["step"]), round(r[f"eval/{nll}"], 4)] for r in result.history if f"eval/{nll}" in r],
        "tokens_per_s": round(float(np.median(rates)) * args.preset.batch_size * args.preset.seq_len, 1),
        "train_seconds": round(seconds, 2),
    }
    if nll == "nll":
        for metric in ("moe_load_balance", "moe_dropped", "moe_z_loss"):
            figures[metric] = result.last(f"train/{metric}")
            figures[f"val_{metric}"] = result.last(f"eval/{metric}")
    return result.state.model, figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    args = parse_args(argv)
    p: Preset = args.preset
    text = data.stdlib_corpus(max_chars=p.max_chars)
    tokenizer = data.CharTokenizer.from_text(text)  # every character of the corpus
    train_ids, val_ids = data.split_tokens(tokenizer.encode(text), VAL_FRACTION)
    baseline = unigram_loss(train_ids, val_ids, tokenizer.vocab_size)
    val_loader = data.TokenLoader(val_ids, batch_size=p.batch_size, seq_len=p.seq_len, seed=args.seed)
    val_set = [val_loader.batch_at(i) for i in range(p.eval_batches)]
    dense_config, moe_config = configs(p, tokenizer.vocab_size, args.capacity_factor)
    print(
        f"corpus: {train_ids.shape[0]:,} training / {val_ids.shape[0]:,} validation characters, "
        f"vocab {tokenizer.vocab_size}; unigram loss {baseline:.3f} nats/char",
        file=sys.stderr,
    )

    args.out.mkdir(parents=True, exist_ok=True)
    key_model, key_sample = jax.random.split(jax.random.key(args.seed))
    results: dict[str, dict[str, Any]] = {}
    trained: dict[str, Any] = {}
    for name, config, cls in (("dense", dense_config, models.Llama), ("moe", moe_config, models.Mixtral)):
        active = config.num_active_params() if isinstance(config, models.MixtralConfig) else config.num_params()
        sizes = {
            "num_params": config.num_params(),
            "num_active_params": active,
            "flops_per_token": config.flops_per_token(p.seq_len),
        }
        print(
            f"{name}: {sizes['num_params']:,} parameters, {active:,} active per token, "
            f"{sizes['flops_per_token'] / 1e6:.2f} MFLOPs per training token",
            file=sys.stderr,
        )
        model = eqx.filter_jit(cls)(config, key=key_model)  # initialised under one jit
        # A fresh loader with the same seed: both models see the same batches in the same order.
        loader = data.TokenLoader(train_ids, batch_size=p.batch_size, seq_len=p.seq_len, seed=args.seed)
        # The same (unused: no dropout) training key for both; made anew, as a step donates it.
        key_train = jax.random.key(args.seed + 1)
        trained[name], figures = train_one(name, model, args, loader, val_set, key_train)
        results[name] = {**sizes, **figures}

    moe = results["moe"]
    moe.update(
        num_experts=moe_config.num_experts, experts_per_token=moe_config.experts_per_token,
        expert_hidden_dim=moe_config.hidden_dim, capacity_factor=moe_config.moe_capacity_factor,
        **utilisation(trained["moe"], val_set[0]),
    )
    results["dense"]["hidden_dim"] = dense_config.hidden_dim

    prompt = tokenizer.encode(args.prompt)[-(p.seq_len - 1) :]
    new = min(p.sample_tokens, p.seq_len - prompt.shape[0])
    out = eqzoo.generate(
        trained["moe"], jnp.asarray(prompt), max_new_tokens=new, key=key_sample, temperature=0.8, top_k=20
    )
    sample = tokenizer.decode(np.asarray(out))

    summary = {
        "example": "char_moe",
        "smoke": args.smoke,
        "steps": args.steps,
        "batch_size": p.batch_size,
        "seq_len": p.seq_len,
        "unigram_loss": baseline,
        "dense": results["dense"],
        "moe": moe,
        "flops_ratio": moe["flops_per_token"] / results["dense"]["flops_per_token"],
        "val_loss_moe_minus_dense": moe["val_loss"] - results["dense"]["val_loss"],
        "seconds": round(time.perf_counter() - start, 2),
        "sample": sample,
    }
    if not all(math.isfinite(results[n][k]) for n in results for k in ("train_loss", "val_loss")):
        print("training diverged (non-finite loss); try a lower --lr", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"--- MoE sample ---\n{sample}\n------------------")
        for name, r in results.items():
            extra = ""
            if name == "moe":
                extra = (
                    f"; load balance {r['val_moe_load_balance']:.3f}, dropped {r['val_moe_dropped']:.1%}, "
                    f"experts used per layer {r['experts_used']}"
                )
            print(
                f"{name}: val {r['val_loss']:.3f} nats/char (unigram {baseline:.3f}), train "
                f"{r['train_loss']:.3f}; {r['num_params']:,} params ({r['num_active_params']:,} active); "
                f"{r['tokens_per_s']:,.0f} tokens/s, {r['train_seconds']:.0f}s{extra}"
            )
        print(f"{summary['seconds']:.0f}s in all; metrics in {args.out}")
    return summary


if __name__ == "__main__":
    main()
