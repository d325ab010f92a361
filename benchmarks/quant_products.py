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

Reports each variant's best of `--repeats` calls (ms) and the weight bytes it reads.

    python benchmarks/quant_products.py --json   # gpt2-124m's 48 products, batch 1, int4 groups of 128
    python benchmarks/quant_products.py --rows 64 --json
    python benchmarks/quant_products.py --smoke --json
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from eqzoo.quant import quantize_int4, quantize_int8, unpack_int4
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


def measure(variant: str, args) -> dict:
    dtype = jnp.dtype(args.dtype)
    weights = _weights(variant, args.layers, args.embed, args.group_size, dtype)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(args.rows, args.embed)), dtype)
    run = _step(variant, args.embed)
    t0 = time.perf_counter()
    jax.block_until_ready(run(weights, x))
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(weights, x))
        times.append(time.perf_counter() - t0)
    weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(weights))
    return {"variant": variant, "best_ms": 1e3 * min(times), "median_ms": 1e3 * float(np.median(times)),
            "weight_mib": weight_bytes / 2**20, "first_call_s": first}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--embed", type=int, default=768)
    p.add_argument("--rows", type=int, default=1, help="rows of x (1: one decoding step at batch 1)")
    p.add_argument("--group-size", type=int, default=128, help="int4's inputs per scale (int8 is per channel)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU regression guard)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.embed, args.group_size, args.repeats = 2, 64, 32, 3
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; the variants are {list(VARIANTS)}")
    rows = []
    for variant in variants:
        row = measure(variant, args)
        rows.append(row)
        if not args.json:
            print(f"{variant:12s} best {row['best_ms']:8.2f} ms  (median {row['median_ms']:.2f}; "
                  f"weights {row['weight_mib']:.1f} MiB)", file=sys.stderr)
    result = {
        "benchmark": "quant_products", "layers": args.layers, "embed": args.embed, "rows": args.rows,
        "products": 4 * args.layers, "group_size": args.group_size, "dtype": args.dtype, "repeats": args.repeats,
        "backend": jax.default_backend(), "results": rows,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
