"""Does int4 quantization-aware training pay? Held-out loss of a small character-level GPT-2
trained in float, then quantized post-training (PTQ) or fine-tuned with int4 QAT and quantized,
as one JSON line.

The corpus is the Python standard library's source (`eqzoo.data.stdlib_corpus`), character
tokens, the last 10% held out. A GPT-2 is trained `--steps` steps in float. Then, from that
same model:

- `ptq_int8`, `ptq_int4`, `ptq_int4_per_channel`: `eqzoo.quant.quantize` of it (int8 per
  channel; int4 with groups of `--group-size` inputs; int4 per channel);
- `float_more` / `float_more_ptq_int4`: `--qat-steps` more float steps (the same optimizer and
  batches QAT gets), then int4 PTQ: the fair baseline, so QAT is not credited for extra training;
- `qat_int4` / `qat_int4_quantized`: `prepare_qat(model, bits=4, group_size=...)`, `--qat-steps`
  steps, then `quantize(..., bits=4, group_size=...)` (which computes what the QAT model
  computed: `qat_convert_gap` is the difference of the two losses).

Each loss is the mean next-character cross-entropy (nats) over the same `--eval-batches`
held-out batches.

    python benchmarks/qat_int4.py --json            # under a minute on 2 CPU cores (figures in docs/quantization.md)
    python benchmarks/qat_int4.py --smoke --json    # seconds, for CI
"""

import argparse
import json
import sys
import time

import jaxtyping

with jaxtyping.install_import_hook("eqzoo", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"):
    from eqzoo import data, models, quant, train

import equinox as eqx
import jax
import optax


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500, help="float training steps")
    p.add_argument("--qat-steps", type=int, default=120, help="QAT (and float-continued) steps")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--qat-lr", type=float, default=1e-3)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--max-chars", type=int, default=2_000_000)
    p.add_argument("--eval-batches", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps of a tinier model (CPU regression guard)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.qat_steps, args.max_chars, args.eval_batches = 20, 10, 200_000, 2
        # one layer: each of the three fits compiles its own train step, and compiling is most
        # of a smoke run's time
        args.embed_dim, args.num_heads, args.group_size, args.num_layers = 32, 2, 16, 1
    t0 = time.perf_counter()

    text = data.stdlib_corpus(max_chars=args.max_chars)
    tokenizer = data.CharTokenizer.from_text(text)
    train_ids, val_ids = data.split_tokens(tokenizer.encode(text), 0.1)
    loader = data.TokenLoader(train_ids, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    val_loader = data.TokenLoader(val_ids, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    val_set = [val_loader.batch_at(i) for i in range(args.eval_batches)]
    config = models.GPT2Config(
        vocab_size=tokenizer.vocab_size, max_seq=args.seq_len, num_layers=args.num_layers,
        num_heads=args.num_heads, embed_dim=args.embed_dim,
    )
    model = eqx.filter_jit(models.GPT2)(config, key=jax.random.key(args.seed))

    loss_of = eqx.filter_jit(lambda m, b: train.lm_loss(m, b)[0])

    def held_out(m) -> float:
        return sum(float(loss_of(m, b)) for b in val_set) / len(val_set)

    def fit(m, steps: int, schedule, first: int):
        optimizer = optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=0.1, mask=train.weight_decay_mask),
        )
        state = train.TrainState.create(m, optimizer, key=jax.random.key(args.seed + 1))
        step = train.make_train_step(train.lm_loss, optimizer, donate=False)  # `base` is fitted twice
        for i in range(steps):
            state, _ = step(state, loader.batch_at(first + i))
        return state.model

    warmup = max(1, min(100, args.steps // 10))
    base = fit(model, args.steps, optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=warmup, decay_steps=args.steps, end_value=args.lr / 10), first=0)
    tune = optax.cosine_decay_schedule(args.qat_lr, args.qat_steps, alpha=0.1)
    g = args.group_size
    int4 = dict(bits=4, group_size=g)
    more = fit(base, args.qat_steps, tune, first=args.steps)
    qat = fit(quant.prepare_qat(base, **int4), args.qat_steps, tune, first=args.steps)
    losses = {
        "float": held_out(base),
        "ptq_int8": held_out(quant.quantize(base)),
        "ptq_int4": held_out(quant.quantize(base, **int4)),
        "ptq_int4_per_channel": held_out(quant.quantize(base, bits=4)),
        "float_more": held_out(more),
        "float_more_ptq_int4": held_out(quant.quantize(more, **int4)),
        "qat_int4": held_out(qat),
        "qat_int4_quantized": held_out(quant.quantize(qat, **int4)),
    }
    result = {
        "benchmark": "qat_int4",
        "model": f"gpt2 {args.num_layers}x{args.embed_dim}, {config.num_params():,} params, vocab {tokenizer.vocab_size}",
        "steps": args.steps, "qat_steps": args.qat_steps, "group_size": g, "held_out_tokens": args.eval_batches * args.batch_size * args.seq_len,
        "loss": {k: round(v, 4) for k, v in losses.items()},
        "int4_cost": {  # held-out loss over float, each after the same number of steps
            "ptq": round(losses["ptq_int4"] - losses["float"], 4),
            "ptq_after_more_float": round(losses["float_more_ptq_int4"] - losses["float_more"], 4),
            "qat_vs_float_more": round(losses["qat_int4_quantized"] - losses["float_more"], 4),
        },
        "qat_convert_gap": abs(losses["qat_int4_quantized"] - losses["qat_int4"]),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
