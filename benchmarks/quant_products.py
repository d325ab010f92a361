"""The linear products of a decoding step alone, float against int8 and int4, as one JSON line.

A GPT-2-shaped stack of `--layers` layers of width `--embed` (four products a layer: `qkv`
`embed -> 3 embed`, `proj` `embed -> embed`, `fc` `embed -> 4 embed`, `fc_proj` `4 embed ->
embed`), its weights stacked along the layer axis and scanned, as the decode loop runs them,
applied to `--rows` rows (1: a batch-1 decoding step). Each variant computes every product from
one weight format, the model and everything else left out:

- `float`: the float weight, `x @ w.T`;
- `int8`: per-channel int8 codes widened inside the product, the scale on its output
  (`eqzoo.quant.QuantizedLinear`'s int8 path);
- `int4-unpack`: packed int4 codes unpacked to their interleaved order and dequantized, then one
  product (other backends' path, and CPU's before the split product);
- `int4-split`: `eqzoo.quant._product.int4_product`, the low and the high nibbles contracted
  with the even and the odd inputs (the CPU path).

With `--stack moe` the stack is `--layers` `eqzoo.nn.MoE` layers instead (default 4, width 512,
`--experts` 8 SwiGLU experts of `--expert-hidden` 1024, top `--top-k` 2: the Mixtral-style
model of `docs/quantization.md`), applied to `--rows` tokens (default 16: a prefill, the
`"dense"` path over every expert; 1: `MoE.decode`'s gathered experts), the routers float:

- `float`: float experts;
- `int8`: `eqzoo.quant.QuantizedWeight` int8 experts, per column;
- `int4-unpack`: int4 experts unpacked to their interleaved order along the contracted axis of
  the transposed rows and dequantized (the MoE path before the stored-layout dequantization);
- `int4-split`: `QuantizedWeight` int4 experts as the layer uses them (dequantized by rows of
  the stored layout for a prefill; the split product when decoding on CPU).

Reports each variant's best of `--repeats` calls (ms; and its best CPU time, all threads) and the
weight bytes it reads; `--smoke`
runs both stacks, tiny.

    python benchmarks/quant_products.py --json   # gpt2-124m's 48 products, batch 1, int4 groups of 128
    python benchmarks/quant_products.py --rows 64 --json
    python benchmarks/quant_products.py --stack moe --json   # a 16-token Mixtral-style prefill's experts
    python benchmarks/quant_products.py --stack moe --expert-hidden 384 --experts 16 --top-k 4 --json
    python benchmarks/quant_products.py --smoke --json
"""

import argparse
import json
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqzoo
from eqzoo.quant import QuantizedWeight, dequantize_int4, quantize_int4, quantize_int8, unpack_int4
from eqzoo.quant._int8 import dequantize_groups
from eqzoo.quant._product import int4_product

VARIANTS = ("float", "int8", "int4-unpack", "int4-split")


def _shapes(embed: int) -> dict[str, tuple[int, int]]:
    """`(out, in)` of a GPT-2 layer's four linear layers."""
    return {"qkv": (3 * embed, embed), "proj": (embed, embed), "fc": (4 * embed, embed), "fc_proj": (embed, 4 * embed)}


def _weights(variant: str, layers: int, embed: int, group_size: int, dtype) -> dict:
    """Each product's stacked weight `(layers, out, in)` in `variant`'s format (seed 0)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, (o, i) in _shapes(embed).items():
        w = jnp.asarray(rng.normal(size=(layers, o, i)) * i**-0.5, dtype)
        if variant == "float":
            out[name] = w
        elif variant == "int8":
            out[name] = quantize_int8(w)
        else:
            out[name] = quantize_int4(w, group_size)
    return out


def _product(variant: str, x, weight):
    """`x @ W.T` from one layer's weight in `variant`'s format, in `x`'s dtype."""
    if variant == "float":
        return x @ weight.T
    if variant == "int8":
        codes, scale = weight
        y = jnp.matmul(x, codes.T.astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)
    packed, scale = weight
    if variant == "int4-unpack":
        w = dequantize_groups(unpack_int4(packed), scale, x.dtype)
        return jnp.matmul(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    return int4_product(x, packed, scale).astype(x.dtype)


def _step(variant: str, embed: int):
    @jax.jit
    def run(weights, x):  # x: (rows, embed)
        def layer(h, w):
            qkv = _product(variant, h, w["qkv"])  # (rows, 3 embed)
            h = jnp.tanh(_product(variant, qkv[:, :embed], w["proj"]))  # (rows, embed), bounded
            f = jnp.tanh(_product(variant, h, w["fc"]))  # (rows, 4 embed)
            return jnp.tanh(_product(variant, f, w["fc_proj"])), None

        return jax.lax.scan(layer, x, weights)[0]

    return run


EXPERTS = ("gate_proj", "up_proj", "down_proj")


def _moe_layers(variant: str, args) -> list:
    """`--layers` MoE layers (seed 0), their experts in `variant`'s stored format."""
    keys = jax.random.split(jax.random.key(0), args.layers)
    dtype = jnp.dtype(args.dtype)
    layers = []
    for k in keys:
        moe = eqzoo.nn.MoE(args.embed, args.expert_hidden, args.experts, args.top_k, dtype=dtype, key=k)
        if variant != "float":
            bits = 8 if variant == "int8" else 4
            group = None if bits == 8 else args.group_size
            moe = eqx.tree_at(lambda m: [getattr(m, n) for n in EXPERTS], moe,
                              [QuantizedWeight(getattr(moe, n), bits=bits, group_size=group) for n in EXPERTS])
        layers.append(moe)
    return layers


def _moe_step(variant: str, rows: int):
    @eqx.filter_jit
    def run(layers, x):  # x: (rows, embed)
        for moe in layers:  # unrolled: a few layers
            if variant == "int4-unpack":  # interleaved along the contracted axis of the (out, contract) rows
                moe = eqx.tree_at(lambda m: [getattr(m, n) for n in EXPERTS], moe, [
                    jnp.swapaxes(dequantize_int4(jnp.swapaxes(w.codes, -1, -2), w.scale), -1, -2).astype(x.dtype)
                    for w in (getattr(moe, n) for n in EXPERTS)])
            y = moe.decode(x, batch_size=1) if rows == 1 else moe(x)
            x = jnp.tanh(x + y)  # bounded
        return x

    return run


def measure(variant: str, args) -> dict:
    dtype = jnp.dtype(args.dtype)
    if args.stack == "moe":
        weights = _moe_layers(variant, args)
        run = _moe_step(variant, args.rows)
    else:
        weights = _weights(variant, args.layers, args.embed, args.group_size, dtype)
        run = _step(variant, args.embed)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(args.rows, args.embed)), dtype)
    t0 = time.perf_counter()
    jax.block_until_ready(run(weights, x))
    first = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(run(weights, x))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # all threads' CPU time: steadier than the wall on a shared machine
    if args.stack == "moe":  # the experts only
        weights = [[getattr(m, n) for n in EXPERTS] for m in weights]
    weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(weights))
    return {"variant": variant, "stack": args.stack, "best_ms": 1e3 * min(times),
            "median_ms": 1e3 * float(np.median(times)), "best_cpu_ms": 1e3 * min(cpu), "weight_mib": weight_bytes / 2**20, "first_call_s": first}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", choices=["linear", "moe"], default="linear",
                   help="linear: GPT-2's four products a layer; moe: eqzoo.nn.MoE layers' experts")
    p.add_argument("--layers", type=int, default=None, help="default 12 (linear), 4 (moe)")
    p.add_argument("--embed", type=int, default=None, help="default 768 (linear), 512 (moe)")
    p.add_argument("--rows", type=int, default=None,
                   help="rows of x: default 1 (linear: one decoding step at batch 1), 16 (moe: a prefill)")
    p.add_argument("--experts", type=int, default=8, help="--stack moe: experts a layer")
    p.add_argument("--expert-hidden", type=int, default=1024, help="--stack moe: each expert's SwiGLU width")
    p.add_argument("--top-k", type=int, default=2, help="--stack moe: experts a token")
    p.add_argument("--group-size", type=int, default=128, help="int4's inputs per scale (int8 is per channel)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, both stacks (CPU regression guard)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; the variants are {list(VARIANTS)}")
    stacks = ["linear", "moe"] if args.smoke else [args.stack]
    rows = []
    for stack in stacks:
        args.stack = stack
        moe = stack == "moe"
        if args.smoke:
            args.layers, args.embed, args.group_size, args.repeats = 2, 64, 32, 3
            args.experts, args.expert_hidden, args.top_k, args.rows = 4, 64, 2, 8 if moe else 1
        args.layers = args.layers or (4 if moe else 12)
        args.embed = args.embed or (512 if moe else 768)
        args.rows = args.rows or (16 if moe else 1)
        for variant in variants:
            row = measure(variant, args)
            rows.append(row)
            if not args.json:
                print(f"{stack:6s} {variant:12s} best {row['best_ms']:8.2f} ms  (median {row['median_ms']:.2f}; CPU {row['best_cpu_ms']:.2f}; "
                      f"weights {row['weight_mib']:.1f} MiB)", file=sys.stderr)
    result = {
        "benchmark": "quant_products", "stack": ",".join(stacks), "layers": args.layers, "embed": args.embed,
        "rows": args.rows, "products": (3 if args.stack == "moe" else 4) * args.layers, "group_size": args.group_size,
        "dtype": args.dtype, "repeats": args.repeats, "backend": jax.default_backend(), "results": rows,
    }
    if args.stack == "moe":
        result.update(experts=args.experts, expert_hidden=args.expert_hidden, top_k=args.top_k)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
