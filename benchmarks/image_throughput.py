"""Training throughput of an image-model preset (ViT, DiT, UNet) through `make_train_step`, as one
JSON line.

Trains the real model on a fixed set of random images: a ViT classifies them into random labels
(`eqzoo.train.classification_loss`); a DiT or UNet learns to denoise them
(`eqzoo.diffusion.make_diffusion_loss` on a linear 1000-step schedule, class-conditional when
the preset has classes). The loss must fall. Reports images/s, step time, model FLOPs
utilisation (MFU: the config's `flops_per_image()` x images/s against the peak; `null` for a
family without a FLOP count), compile time and peak memory.

    python benchmarks/image_throughput.py --preset vit-b16 --batch 256 --steps 20 --json
    python benchmarks/image_throughput.py --preset dit-xl2 --batch 256 --steps 20 --json
    python benchmarks/image_throughput.py --smoke --json       # tiny-vit and tiny-dit, for CI on CPU
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _throughput import PEAK_TFLOPS_HELP, parse_set, report, report_compiled
from train_throughput import peak_memory_gib

import eqzoo
import eqzoo.diffusion
from eqzoo import models, train

NUM_BATCHES = 4  # distinct batches cycled through: few enough that the loss must fall


def image_batches(config, batch: int) -> list[dict[str, jax.Array]]:
    """`NUM_BATCHES` fixed batches `{"x": (batch, channels, size, size) float32, "y": int32}`,
    drawn with seed 0."""
    rng = np.random.default_rng(0)
    c, s = config.in_channels, config.image_size
    classes = max(config.num_classes, 1)
    return [
        {"x": jnp.asarray(rng.standard_normal((batch, c, s, s), dtype=np.float32)),
         "y": jnp.asarray(rng.integers(0, classes, (batch,), dtype=np.int32))}
        for _ in range(NUM_BATCHES)
    ]


def loss_for(config):
    """The training loss of the preset's family, and its name."""
    if isinstance(config, models.ViTConfig):
        return train.classification_loss, "classification"
    if isinstance(config, (models.DiTConfig, models.UNetConfig)):
        return eqzoo.diffusion.make_diffusion_loss(eqzoo.diffusion.NoiseSchedule.linear()), "diffusion"
    raise SystemExit(
        f"image_throughput: {type(config).__name__} is not an image model (ViT, DiT, UNet); "
        "language models have benchmarks/train_throughput.py."
    )


def run(args, preset: str) -> dict:
    overrides = parse_set(args.set)
    if args.remat is not None:
        overrides["remat"] = args.remat
    if args.scan != "auto":
        overrides["scan_layers"] = args.scan == "true"
    config = models.get_config(preset, **overrides)
    loss_fn, objective = loss_for(config)
    model = models.create(config, key=jax.random.key(0))
    optimizer = optax.adamw(1e-3 if args.smoke else 3e-4, weight_decay=0.05)
    precision = train.Precision.bf16() if args.precision == "bf16" else train.Precision()
    state = train.TrainState.create(model, optimizer, key=jax.random.key(1))
    del model
    step = train.make_train_step(loss_fn, optimizer, precision=precision)
    batches = image_batches(config, args.batch)

    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    report_compiled("image_throughput", args.json, preset=preset, backend=jax.default_backend(),
                    device=jax.devices()[0].device_kind, compile_s=compile_s)
    losses = []
    for i in range(args.warmup):
        state, m = step(state, batches[i % NUM_BATCHES])
        losses.append(m["loss"])
    jax.block_until_ready(state.arrays)
    t0 = time.perf_counter()
    for i in range(args.steps):
        state, m = step(state, batches[i % NUM_BATCHES])
        losses.append(m["loss"])
    jax.block_until_ready(state.arrays)
    elapsed = time.perf_counter() - t0
    losses = [float(x) for x in losses]
    # The diffusion loss draws fresh timesteps each step, so single steps are noisy: compare
    # the means of the first and last quarter of the run.
    q = max(1, len(losses) // 4)
    first, last = sum(losses[:q]) / q, sum(losses[-q:]) / q

    images_per_s = args.batch * args.steps / elapsed
    flops = getattr(config, "flops_per_image", None)
    peak, peak_source = peak_memory_gib(compiled)
    return {
        "benchmark": "image_throughput",
        "preset": preset,
        "objective": objective,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "batch": args.batch,
        "image_size": config.image_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "precision": args.precision,
        "overrides": parse_set(args.set),
        "remat": getattr(config, "remat", None),
        "scan_layers": eqzoo.nn.resolve_scan(config.scan_layers) if hasattr(config, "scan_layers") else None,
        "params": config.num_params(),
        "images_per_s": images_per_s,
        "step_ms": 1e3 * elapsed / args.steps,
        "mfu": None if flops is None else flops() * images_per_s / (args.peak_tflops * 1e12),
        "loss_first": first,
        "loss_last": last,
        "loss_fell": last < first,
        "compile_s": compile_s,
        "peak_memory_gib": peak,
        "peak_memory_source": peak_source,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit-b16")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--remat", default=None, help="override the preset's remat policy")
    p.add_argument("--scan", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--peak-tflops", type=float, default=989.0, help=PEAK_TFLOPS_HELP)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set num_layers=4 (repeatable)")
    p.add_argument("--smoke", action="store_true", help="tiny-vit then tiny-dit at tiny sizes (CPU regression guard)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.warmup = 16, 12, 2
        results = [run(args, preset) for preset in ("tiny-vit", "tiny-dit")]
        result = {"benchmark": "image_throughput", "smoke": True, "runs": results,
                  "loss_fell": all(r["loss_fell"] for r in results)}
    else:
        result = run(args, args.preset)
    return report(result, args.json)


if __name__ == "__main__":
    sys.exit(0 if main()["loss_fell"] else 1)
