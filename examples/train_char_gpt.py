"""Train a character-level GPT on the Python standard library's own source code.

The corpus is the `.py` files of the running Python's standard library
(`eqzoo.data.stdlib_corpus`), so nothing is downloaded. The last 10% of it (whole modules, in
sorted path order) is held out for evaluation. The script reports the held-out loss next to
the loss of a unigram model of the same text (the training split's character frequencies,
scored on the validation split), then samples a continuation of a prompt.

    python examples/train_char_gpt.py               # the main job: ~3.5 minutes on 2 CPU cores
    python examples/train_char_gpt.py --smoke --json

Progress lines go to stderr; with `--json` the last stdout line is one JSON summary. Metrics
are appended to `<out>/metrics.jsonl`. The summary's `final_loss` (the final parameters' loss on
the last training batch, at full precision) and `params_sha256` (a hash of every parameter's
bytes) tell whether two runs ended bitwise identical.

With `--checkpoint-dir DIR` the run saves its whole state every `--checkpoint-every` steps and,
started again with the same command, resumes from the newest committed step there, ending with
the model it would have reached without stopping. SIGTERM or Ctrl-C (SIGINT) saves the current
step and exits with code 0:

    python examples/train_char_gpt.py --smoke --json --checkpoint-dir runs/ckpt &
    sleep 60; kill -TERM %1; wait                     # stops cleanly at the current step
    python examples/train_char_gpt.py --smoke --json --checkpoint-dir runs/ckpt   # resumes
"""

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jaxtyping

with jaxtyping.install_import_hook("eqzoo", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"):
    import eqzoo
    from eqzoo import checkpoint, data, models, train

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

VAL_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Preset:
    """The model and schedule behind a mode (the command-line flags override the schedule)."""

    num_layers: int
    num_heads: int
    embed_dim: int
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    max_chars: int | None  # corpus size; None is the whole standard library (~9M characters)
    eval_every: int
    eval_batches: int
    log_every: int
    sample_tokens: int


# Sized for a 2-core CPU: the default run takes about 3.5 minutes there (205 s measured), with a
# validation loss under half the unigram loss (0.48 of it).
DEFAULT = Preset(
    num_layers=4, num_heads=4, embed_dim=128, steps=1200, batch_size=16, seq_len=128, lr=5e-3,
    max_chars=None, eval_every=400, eval_batches=32, log_every=50, sample_tokens=200,
)
SMOKE = Preset(
    num_layers=2, num_heads=2, embed_dim=32, steps=40, batch_size=16, seq_len=64, lr=1e-2,
    max_chars=400_000, eval_every=20, eval_batches=4, log_every=10, sample_tokens=40,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; unset schedule flags take the value of the chosen preset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=None, help="characters per sequence")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="def ", help="text the sample continues")
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run (CI)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary line last")
    parser.add_argument("--out", type=Path, default=Path("runs/train_char_gpt"))
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument(
        "--checkpoint-every", type=int, default=None,
        help="steps between checkpoints (default: a sixth of --steps)",
    )
    parser.add_argument(
        "--profile", type=Path, default=None, metavar="DIR",
        help="trace 5 steps (after the first 3) with jax.profiler into DIR (open it with TensorBoard or XProf)",
    )
    args = parser.parse_args(argv)
    preset = SMOKE if args.smoke else DEFAULT
    for name in ("steps", "batch_size", "seq_len", "lr"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 2 or args.lr <= 0:
        parser.error("--steps and --batch-size must be >= 1, --seq-len >= 2 and --lr > 0")
    if args.checkpoint_every is not None and (args.checkpoint_dir is None or args.checkpoint_every < 1):
        parser.error("--checkpoint-every needs --checkpoint-dir and must be >= 1")
    if args.checkpoint_every is None:
        args.checkpoint_every = max(1, args.steps // 6)
    args.preset = preset
    return args


def unigram_loss(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats per character) on `val_ids` of the training split's character
    frequencies (add-one smoothed, so a character unseen in training has a finite cost)."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    val_counts = np.bincount(val_ids, minlength=vocab_size).astype(np.float64)
    return float(-(val_counts * log_p).sum() / val_counts.sum())


@dataclasses.dataclass
class Setup:
    """Everything `main` runs: what a checkpointer saves and restores is `state` and `loader`."""

    args: argparse.Namespace
    tokenizer: data.CharTokenizer
    config: models.GPT2Config
    state: train.TrainState
    loader: data.TokenLoader
    train_step: train.TrainStep
    eval_step: train.EvalStep
    eval_batches: Callable[[], Iterator[dict[str, np.ndarray]]]
    unigram_loss: float
    num_train_tokens: int
    num_val_tokens: int


def build(args: argparse.Namespace) -> Setup:
    """Corpus, tokenizer, model, optimizer, loaders and the compiled steps for `args`."""
    p: Preset = args.preset
    text = data.stdlib_corpus(max_chars=p.max_chars)
    # The alphabet is every character of the corpus (about 200), so validation text encodes.
    tokenizer = data.CharTokenizer.from_text(text)
    train_ids, val_ids = data.split_tokens(tokenizer.encode(text), VAL_FRACTION)

    config = models.GPT2Config(
        vocab_size=tokenizer.vocab_size, max_seq=args.seq_len, num_layers=p.num_layers,
        num_heads=p.num_heads, embed_dim=p.embed_dim,
    )
    key_model, key_train = jax.random.split(jax.random.key(args.seed))
    # Initialised under one jit: run eagerly, each initialiser op would be compiled on its own.
    model = eqx.filter_jit(models.GPT2)(config, key=key_model)

    warmup = max(1, min(100, args.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=warmup, decay_steps=args.steps, end_value=args.lr / 10
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=0.1, mask=train.weight_decay_mask),
    )
    state = train.TrainState.create(model, optimizer, key=key_train)
    train_step = train.make_train_step(train.lm_loss, optimizer)
    eval_step = train.make_eval_step(train.lm_loss)

    loader = data.TokenLoader(train_ids, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    # A fixed held-out set: the same windows of the validation split at every evaluation.
    val_loader = data.TokenLoader(val_ids, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    val_set = [val_loader.batch_at(i) for i in range(p.eval_batches)]

    return Setup(
        args=args, tokenizer=tokenizer, config=config, state=state, loader=loader,
        train_step=train_step, eval_step=eval_step, eval_batches=lambda: iter(val_set),
        unigram_loss=unigram_loss(train_ids, val_ids, tokenizer.vocab_size),
        num_train_tokens=int(train_ids.shape[0]), num_val_tokens=int(val_ids.shape[0]),
    )


def sample(setup: Setup, model: Any, *, key: jax.Array) -> str:
    """A continuation of `--prompt` (temperature 0.8, top-k 20), decoded to text."""
    args = setup.args
    prompt = setup.tokenizer.encode(args.prompt)[-(args.seq_len - 1) :]
    new = min(args.preset.sample_tokens, args.seq_len - prompt.shape[0])
    out = eqzoo.generate(
        model, jnp.asarray(prompt), max_new_tokens=new, key=key, temperature=0.8, top_k=20
    )
    return setup.tokenizer.decode(np.asarray(out))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    args = parse_args(argv)
    checkpointer = None
    if args.checkpoint_dir is not None:
        # Made first, so SIGTERM/SIGINT during setup already stop cleanly (after one step). It
        # saves the whole TrainState, the loader's position and the model config every
        # --checkpoint-every steps (asynchronously) and at the last step, and says so on stderr.
        checkpointer = checkpoint.Checkpointer(args.checkpoint_dir, save_every=args.checkpoint_every, progress=sys.stderr)
    setup = build(args)
    p: Preset = args.preset
    print(
        f"corpus: {setup.num_train_tokens:,} training / {setup.num_val_tokens:,} validation "
        f"characters, vocab {setup.tokenizer.vocab_size}; model: {setup.config.num_params():,} "
        f"parameters; unigram loss {setup.unigram_loss:.3f} nats",
        file=sys.stderr,
    )

    if checkpointer is not None and checkpointer.latest_step() is not None:
        restored = checkpointer.restore(setup.state)
        setup.state = restored.state
        setup.loader.load_state_dict(restored.data_state)
        print(f"resumed from step {restored.meta.step} in {args.checkpoint_dir}", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    metrics_path = args.out / "metrics.jsonl"
    if int(setup.state.step) == 0:  # a fresh run starts a fresh log; a resumed one appends
        metrics_path.unlink(missing_ok=True)
    loggers = [
        train.ConsoleLogger(args.steps, keys=("train/loss", "eval/loss")),
        train.JSONLLogger(metrics_path),
    ]
    steps_before = int(setup.state.step)
    train_start = time.perf_counter()
    result = train.fit(
        setup.state, setup.train_step, setup.loader, num_steps=args.steps,
        eval_step=setup.eval_step, eval_batches=setup.eval_batches,
        eval_every=p.eval_every, log_every=p.log_every, loggers=loggers,
        checkpointer=checkpointer, profile=None if args.profile is None else train.Profile(args.profile),
        run_config={"lr": args.lr, "seed": args.seed},  # recorded in each checkpoint; a resume that changes it warns
    )
    train_seconds = time.perf_counter() - train_start
    steps_done = int(result.state.step) - steps_before
    final = result.state
    # The final parameters' loss on the last training batch: a pure function of the parameters,
    # so it is bitwise the same for a resumed run and one that never stopped.
    last_batch = setup.loader.batch_at(max(int(final.step) - 1, 0))
    final_loss = float(setup.eval_step(final, last_batch)["loss"])
    fingerprint = {"final_loss": final_loss, "params_sha256": checkpoint.params_sha256(final.model)}

    if checkpointer is not None:
        checkpointer.close()  # waits until the last save is committed
        if checkpointer.stop_signal is not None:
            name = signal.Signals(checkpointer.stop_signal).name
            print(
                f"stopped by {name} at step {int(final.step)}; its checkpoint is committed in "
                f"{args.checkpoint_dir}. Run the same command again to resume.",
                file=sys.stderr,
            )
            summary = {
                "example": "train_char_gpt", "smoke": args.smoke, "interrupted": name,
                "steps": int(final.step), **fingerprint,
            }
            if args.json:
                print(json.dumps(summary))
            return summary

    text = sample(setup, final.model, key=jax.random.key(args.seed + 1))
    logged = {k for record in result.history for k in record}
    if "eval/loss" in logged:
        val_loss = result.last("eval/loss")
    else:  # resumed from a run that had already finished: nothing was trained or evaluated
        val_loss = train.evaluate(setup.eval_step, final, setup.eval_batches())["loss"]
    summary = {
        "example": "train_char_gpt",
        "smoke": args.smoke,
        "steps": int(final.step),
        "train_loss": result.last("train/loss") if "train/loss" in logged else None,
        **fingerprint,
        "val_loss": val_loss,
        "unigram_loss": setup.unigram_loss,
        "val_to_unigram": val_loss / setup.unigram_loss,
        "seconds": round(time.perf_counter() - start, 2),
        "train_seconds": round(train_seconds, 2),
        "tokens_per_s": round(steps_done * args.batch_size * args.seq_len / train_seconds, 1),
        "num_params": setup.config.num_params(),
        "sample": text,
    }
    if not all(summary[k] is None or math.isfinite(summary[k]) for k in ("train_loss", "val_loss")):
        print("training diverged (non-finite loss); try a lower --lr", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"--- sample ---\n{text}\n--------------")
        print(
            f"val loss {val_loss:.3f} nats/char vs unigram {setup.unigram_loss:.3f} "
            f"(ratio {summary['val_to_unigram']:.2f}); {summary['seconds']:.0f}s, "
            f"{summary['tokens_per_s']:,.0f} tokens/s; metrics in {metrics_path}"
        )
    return summary


if __name__ == "__main__":
    main()
