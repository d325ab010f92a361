"""GPT-2 training throughput in plain Equinox, written the way users usually write it: a baseline.

No eqzoo: a `Block` of `eqx.nn.LayerNorm` / `eqx.nn.Linear` (fused qkv, biases, GELU-tanh MLP),
a Python list of blocks (unrolled, no `lax.scan`), learned token and position `eqx.nn.Embedding`s,
the head tied to the token table, N(0, 0.02²) init with the residual projections scaled by
`1/sqrt(2 L)`. The model takes one sequence and the loss calls it under `jax.vmap` (the Equinox
convention); attention is `jax.nn.dot_product_attention(..., is_causal=True)` (cuDNN on GPU for
bf16 with `--attention auto`). One `eqx.filter_jit` step with `eqx.filter_value_and_grad` and
`optax.adamw`, no buffer donation; bf16 mixed precision the common way: fp32 parameters cast to
bf16 inside the loss, logits cast to fp32 for the cross-entropy.

Prints the keys of `train_throughput.py`, so the two compare row for row. Differences:
`compile_s` is the wall time of the first call (trace, compile and one step, the first warmup
step), as `eqx.filter_jit` compiles on first call; `peak_memory_gib` is the allocator's peak on
GPU/TPU and null on CPU (no XLA estimate, which would need a second compile).

    python benchmarks/equinox_baseline.py --batch 16 --seq 1024 --steps 30 --json
    python benchmarks/equinox_baseline.py --smoke --json          # tiny, for CI on CPU
"""

import argparse
import math
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from _throughput import PEAK_TFLOPS_HELP, report, report_compiled, throughput_figures, token_batches
from jaxtyping import Array, Float, Int, PRNGKeyArray

_IMPLEMENTATIONS = {"auto": None, "xla": "xla", "cudnn": "cudnn"}


def _linear(in_features: int, out_features: int, std: float, *, key: PRNGKeyArray) -> eqx.nn.Linear:
    """`eqx.nn.Linear` re-initialised GPT-2 style: weight N(0, std²), bias zero."""
    linear = eqx.nn.Linear(in_features, out_features, key=key)
    weight = std * jax.random.normal(key, (out_features, in_features))
    return eqx.tree_at(lambda m: (m.weight, m.bias), linear, (weight, jnp.zeros(out_features)))


class Block(eqx.Module):
    """Pre-norm transformer block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`."""

    ln_1: eqx.nn.LayerNorm
    c_attn: eqx.nn.Linear
    attn_proj: eqx.nn.Linear
    ln_2: eqx.nn.LayerNorm
    c_fc: eqx.nn.Linear
    mlp_proj: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)
    implementation: str | None = eqx.field(static=True)

    def __init__(self, embed: int, num_heads: int, num_layers: int, implementation: str | None,
                 *, key: PRNGKeyArray):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        residual_std = 0.02 / math.sqrt(2 * num_layers)
        self.ln_1 = eqx.nn.LayerNorm(embed)
        self.c_attn = _linear(embed, 3 * embed, 0.02, key=k1)
        self.attn_proj = _linear(embed, embed, residual_std, key=k2)
        self.ln_2 = eqx.nn.LayerNorm(embed)
        self.c_fc = _linear(embed, 4 * embed, 0.02, key=k3)
        self.mlp_proj = _linear(4 * embed, embed, residual_std, key=k4)
        self.num_heads = num_heads
        self.implementation = implementation

    def __call__(self, x: Float[Array, "seq embed"]) -> Float[Array, "seq embed"]:
        seq, embed = x.shape
        head_dim = embed // self.num_heads
        qkv = jax.vmap(self.c_attn)(jax.vmap(self.ln_1)(x))  # (seq, 3 embed)
        q, k, v = (t.reshape(seq, self.num_heads, head_dim) for t in jnp.split(qkv, 3, axis=-1))
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                         implementation=self.implementation)  # (seq, heads, head_dim)
        x = x + jax.vmap(self.attn_proj)(y.reshape(seq, embed))
        h = jax.nn.gelu(jax.vmap(self.c_fc)(jax.vmap(self.ln_2)(x)), approximate=True)  # (seq, 4 embed)
        return x + jax.vmap(self.mlp_proj)(h)


class GPT(eqx.Module):
    """GPT-2 on one sequence of token ids: `logits = model(tokens)`."""

    wte: eqx.nn.Embedding
    wpe: eqx.nn.Embedding
    blocks: list[Block]
    ln_f: eqx.nn.LayerNorm

    def __init__(self, *, vocab: int, max_seq: int, embed: int, num_heads: int, num_layers: int,
                 implementation: str | None, key: PRNGKeyArray):
        k_wte, k_wpe, *k_blocks = jax.random.split(key, 2 + num_layers)
        self.wte = eqx.nn.Embedding(weight=0.02 * jax.random.normal(k_wte, (vocab, embed)))
        self.wpe = eqx.nn.Embedding(weight=0.02 * jax.random.normal(k_wpe, (max_seq, embed)))
        self.blocks = [Block(embed, num_heads, num_layers, implementation, key=k) for k in k_blocks]
        self.ln_f = eqx.nn.LayerNorm(embed)

    def __call__(self, tokens: Int[Array, " seq"]) -> Float[Array, "seq vocab"]:
        x = self.wte.weight[tokens] + self.wpe.weight[: tokens.shape[0]]  # (seq, embed)
        for block in self.blocks:
            x = block(x)
        x = jax.vmap(self.ln_f)(x)
        return x @ self.wte.weight.T  # tied head


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps, the first one compiling")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--embed", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--max-seq", type=int, default=1024,
                   help="rows of the position table (raised to --seq if smaller)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--attention", choices=list(_IMPLEMENTATIONS), default="auto",
                   help="jax.nn.dot_product_attention implementation (auto: JAX picks)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help=PEAK_TFLOPS_HELP)
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes (CPU regression guard)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        # the sizes of eqzoo's tiny-gpt2 preset, as train_throughput.py --smoke runs it
        args.layers, args.embed, args.heads, args.vocab, args.max_seq = 2, 64, 4, 256, 128
        args.batch, args.seq, args.steps, args.warmup = 4, 64, 8, 2
    if args.embed % args.heads:
        p.error(f"--embed {args.embed} is not a multiple of --heads {args.heads}")
    warmup = max(args.warmup, 1)  # the first call compiles; it is never timed
    max_seq = max(args.max_seq, args.seq)

    model = GPT(vocab=args.vocab, max_seq=max_seq, embed=args.embed, num_heads=args.heads,
                num_layers=args.layers, implementation=_IMPLEMENTATIONS[args.attention],
                key=jax.random.key(0))
    optimizer = optax.adamw(3e-4, b2=0.95, weight_decay=0.1)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    compute_dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32

    def loss_fn(model, tokens, targets):
        model = _cast(model, compute_dtype)
        logits = jax.vmap(model)(tokens).astype(jnp.float32)  # (batch, seq, vocab)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @eqx.filter_jit
    def step(model, opt_state, tokens, targets):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, tokens, targets)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    batches = [(jnp.asarray(x), jnp.asarray(y)) for x, y in token_batches(args.vocab, args.batch, args.seq)]

    losses = []
    t0 = time.perf_counter()
    model, opt_state, loss = step(model, opt_state, *batches[0])
    jax.block_until_ready((model, opt_state, loss))
    compile_s = time.perf_counter() - t0
    report_compiled("equinox_baseline", args.json, backend=jax.default_backend(),
                    device=jax.devices()[0].device_kind, compile_s=compile_s)
    losses.append(loss)
    for i in range(1, warmup):
        model, opt_state, loss = step(model, opt_state, *batches[i % 4])
        losses.append(loss)
    jax.block_until_ready((model, opt_state))
    t0 = time.perf_counter()
    for i in range(args.steps):  # batch order as in train_throughput.py, so losses compare
        model, opt_state, loss = step(model, opt_state, *batches[i % 4])
        losses.append(loss)
    jax.block_until_ready((model, opt_state))
    elapsed = time.perf_counter() - t0
    losses = [float(x) for x in losses]

    params = sum(a.size for a in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    n = params - model.wpe.weight.size
    flops_per_token = 6.0 * n + 12.0 * args.layers * args.embed * args.seq
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None
    result = {
        "benchmark": "equinox_baseline",
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "precision": args.precision,
        "scan_layers": False,
        "attention": args.attention,
        "layers": args.layers,
        "embed": args.embed,
        "heads": args.heads,
        "vocab": args.vocab,
        "params": params,
        **throughput_figures(batch=args.batch, seq=args.seq, steps=args.steps, elapsed=elapsed,
                             flops_per_token=flops_per_token, peak_tflops=args.peak_tflops, losses=losses),
        "compile_s": compile_s,
        "compile_s_is": "first call: trace + compile + one step",
        "peak_memory_gib": peak,
        "peak_memory_source": "allocator" if peak is not None else None,
    }
    return report(result, args.json)


if __name__ == "__main__":
    sys.exit(0 if main()["loss_fell"] else 1)
