"""Speculative decoding on trained models, as JSON: tokens/s with and without a draft model.

Random weights say nothing about speculation (a random draft agrees with a random model on a
few percent of tokens), so this trains both models first, on the standard library's source as
bytes (nothing downloaded): a GPT-2-style model and a much smaller draft, for the same number of
steps. It then decodes the same prompts with `eqzoo.generation.generate_batch` (greedy) and
with `eqzoo.generation.generate_speculative`, checks that the tokens are equal, and reports
tokens/s, the draft's tokens per round, the speed-up, and each compiled program's scratch memory
(`scratch_mib`, XLA's temporaries: both models' KV caches and the loop's buffers). With `--temperature T` both sample
instead (the tokens are then equal in distribution only, so `same_tokens` is null).

    python benchmarks/speculative_decoding.py --json                 # about 6 minutes on 2 CPU cores
    python benchmarks/speculative_decoding.py --temperature 1.0 --json
    python benchmarks/speculative_decoding.py --smoke --json
"""

import argparse
import json
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eqzoo
from eqzoo import data, models, train


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6, help="the model's layers")
    p.add_argument("--width", type=int, default=256, help="the model's width")
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--draft-width", type=int, default=128)
    p.add_argument("--steps", type=int, default=400, help="training steps of each model")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4, help="prompts decoded one at a time")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=192)
    p.add_argument("--num-draft", default="2,4,6", help="comma-separated proposals per round")
    p.add_argument(
        "--temperature", type=float, default=0.0,
        help="0: greedy (the tokens must equal generate_batch's); > 0: sampling (equal in distribution only)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU regression guard)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.width, args.draft_width, args.steps = 2, 64, 32, 20
        args.seq, args.batch, args.prompts, args.prompt_len, args.new_tokens, args.num_draft = 64, 8, 2, 16, 24, "2"
    return args


def trained(layers: int, width: int, tokens: np.ndarray, args, log) -> tuple[eqx.Module, float]:
    heads = max(1, width // 64)
    config = models.GPT2Config(
        vocab_size=256, max_seq=max(args.seq, args.prompt_len + args.new_tokens + 16), num_layers=layers,
        num_heads=heads, embed_dim=width,
    )
    model = eqx.filter_jit(models.GPT2)(config, key=jax.random.key(layers * 1000 + width))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, max(1, args.steps // 10), args.steps, 2e-4)
    optimizer = optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=0.1, mask=train.weight_decay_mask)
    state = train.TrainState.create(model, optimizer, key=jax.random.key(1))
    step = train.make_train_step(train.lm_loss, optimizer)
    loader = data.TokenLoader(tokens, batch_size=args.batch, seq_len=args.seq, seed=0)
    loss = float("nan")
    t0 = time.perf_counter()
    for i in range(args.steps):
        state, metrics = step(state, next(loader))
        if (i + 1) % max(1, args.steps // 4) == 0 or i + 1 == args.steps:
            loss = float(metrics["loss"])
            log(f"{layers}x{width}: step {i + 1}/{args.steps} loss {loss:.3f} ({time.perf_counter() - t0:.0f} s)")
    return state.model, loss


def timed(fn, repeats: int = 3) -> tuple[object, float]:
    out = jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return out, best


def scratch_mib(fn, *args) -> float | None:
    """XLA's scratch memory (`temp_size_in_bytes`) of `fn(*args)` compiled whole, in MiB."""
    arrays, static = eqx.partition(args, eqx.is_array)
    memory = jax.jit(lambda a: fn(*eqx.combine(a, static))).lower(arrays).compile().memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
    return None if temp is None else temp / 2**20


def main(argv=None) -> dict:
    args = parse(argv)
    log = (lambda msg: print(msg, file=sys.stderr)) if not args.json or not args.smoke else (lambda msg: None)
    text = data.stdlib_corpus(max_chars=4_000_000 if not args.smoke else 200_000)
    tokens = data.ByteTokenizer().encode(text)
    model, loss = trained(args.layers, args.width, tokens, args, log)
    draft, draft_loss = trained(args.draft_layers, args.draft_width, tokens, args, log)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, tokens.shape[0] - args.prompt_len, args.prompts)
    prompts = [jnp.asarray(tokens[s : s + args.prompt_len][None]) for s in starts]

    sampling = dict(temperature=args.temperature, key=jax.random.key(1)) if args.temperature > 0 else {}

    def plain():
        return [eqzoo.generation.generate_batch(model, p, max_new_tokens=args.new_tokens, **sampling) for p in prompts]

    reference, base_s = timed(plain)
    rows = []
    for k in (int(x) for x in args.num_draft.split(",")):
        def speculative(k=k):
            return [eqzoo.generation.generate_speculative(
                model, draft, p, max_new_tokens=args.new_tokens, num_draft=k, return_stats=True, **sampling)
                for p in prompts]

        outs, spec_s = timed(speculative)
        rounds = np.asarray([int(o[1]["rounds"][0]) for o in outs])
        # Sampling draws other random numbers than generate_batch: equal in distribution only.
        same = all(bool(jnp.array_equal(o[0], r)) for o, r in zip(outs, reference, strict=True)) if not sampling else None
        scratch = scratch_mib(
            lambda m, d, p, k=k: eqzoo.generation.generate_speculative(
                m, d, p, max_new_tokens=args.new_tokens, num_draft=k, **sampling),
            model, draft, prompts[0],
        )
        rows.append({
            "num_draft": k, "tokens_per_s": args.prompts * args.new_tokens / spec_s, "scratch_mib": scratch,
            "tokens_per_round": float(args.new_tokens / rounds.mean()), "speedup": base_s / spec_s,
            "same_tokens": same,
        })
    result = {
        "benchmark": "speculative_decoding", "smoke": args.smoke, "backend": jax.default_backend(),
        "model": f"{args.layers}x{args.width}", "draft": f"{args.draft_layers}x{args.draft_width}",
        "params": model.config.num_params(), "draft_params": draft.config.num_params(),
        "train_steps": args.steps, "loss": loss, "draft_loss": draft_loss,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": 1, "temperature": args.temperature,
        # generate_batch's tokens/s: greedy, or sampling with --temperature
        "greedy_tokens_per_s" if not sampling else "sampling_tokens_per_s": args.prompts * args.new_tokens / base_s,
        "scratch_mib": scratch_mib(
            lambda m, p: eqzoo.generation.generate_batch(m, p, max_new_tokens=args.new_tokens, **sampling),
            model, prompts[0],
        ),  # generate_batch's; each row below holds its own
        "speculative": rows,
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
