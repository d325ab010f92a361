"""GPT-2 training throughput in PyTorch, nanoGPT style: a baseline on the same machine.

The architecture of `equinox_baseline.py` (fused qkv, biases, GELU-tanh MLP, learned positions,
head tied to the token table, N(0, 0.02²) init with residual projections scaled by
`1/sqrt(2 L)`), with `F.scaled_dot_product_attention(is_causal=True)` (flash on GPU), the model
wrapped in `torch.compile` (`--no-compile` to run eagerly), `torch.optim.AdamW` (fused on CUDA)
decaying every parameter as `optax.adamw` does, and on CUDA bf16 `torch.autocast` with TF32
allowed for what stays fp32 (XLA's default on GPU). On CPU it runs fp32 (`precision` says so)
and, in `--smoke`, eagerly, since Inductor's C++ compile takes longer than the smoke budget.

Prints the keys of `train_throughput.py`. `compile_s` is the wall time of the first step
(compile, when on, plus one step; the first warmup step). `peak_memory_gib` is
`torch.cuda.max_memory_allocated()`, null on CPU.

    python benchmarks/torch_baseline.py --batch 16 --seq 1024 --steps 30 --json
    python benchmarks/torch_baseline.py --smoke --json          # tiny, for CI on CPU

`--require-cuda` (as `gpu_suite.py` runs it) exits at once with status 2 where PyTorch has no
CUDA device: GPT-2 124M at batch 16 x 1024 would otherwise train on the CPU until the row's
timeout.
"""

import argparse
import contextlib
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from _throughput import PEAK_TFLOPS_HELP, report, report_compiled, throughput_figures, token_batches
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

_SDPA_BACKENDS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION,
                  "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


class CausalSelfAttention(nn.Module):
    def __init__(self, embed: int, num_heads: int):
        super().__init__()
        self.c_attn = nn.Linear(embed, 3 * embed)
        self.c_proj = nn.Linear(embed, embed)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, embed = x.shape
        q, k, v = self.c_attn(x).split(embed, dim=2)
        # (batch, heads, seq, head_dim), the layout SDPA takes
        q, k, v = (t.view(batch, seq, self.num_heads, embed // self.num_heads).transpose(1, 2)
                   for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(batch, seq, embed))


class MLP(nn.Module):
    def __init__(self, embed: int):
        super().__init__()
        self.c_fc = nn.Linear(embed, 4 * embed)
        self.c_proj = nn.Linear(4 * embed, embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, embed: int, num_heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(embed)
        self.attn = CausalSelfAttention(embed, num_heads)
        self.ln_2 = nn.LayerNorm(embed)
        self.mlp = MLP(embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, *, vocab: int, max_seq: int, embed: int, num_heads: int, num_layers: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, embed)
        self.wpe = nn.Embedding(max_seq, embed)
        self.blocks = nn.ModuleList(Block(embed, num_heads) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(embed)
        self.lm_head = nn.Linear(embed, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * num_layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)  # (batch, seq, embed)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (batch, seq, vocab)


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
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16",
                   help="bf16: autocast on CUDA (CPU always runs fp32)")
    p.add_argument("--attention", choices=list(_SDPA_BACKENDS), default="auto",
                   help="SDPA kernel (auto: PyTorch picks; flash on recent GPUs for bf16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on, except --smoke on CPU)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help=PEAK_TFLOPS_HELP)
    p.add_argument("--require-cuda", action="store_true",
                   help="exit at once (status 2) when PyTorch sees no CUDA device, rather than run on the CPU")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes (CPU regression guard)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.require_cuda and not torch.cuda.is_available():
        p.exit(2, f"torch_baseline: --require-cuda, but PyTorch {torch.__version__} sees no CUDA device "
                  f"(built for CUDA {torch.version.cuda}); not running GPT-2 on the CPU.\n")
    if args.smoke:
        # the sizes of eqzoo's tiny-gpt2 preset, as train_throughput.py --smoke runs it
        args.layers, args.embed, args.heads, args.vocab, args.max_seq = 2, 64, 4, 256, 128
        args.batch, args.seq, args.steps, args.warmup = 4, 64, 8, 2
    if args.embed % args.heads:
        p.error(f"--embed {args.embed} is not a multiple of --heads {args.heads}")
    warmup = max(args.warmup, 1)  # the first step compiles; it is never timed
    max_seq = max(args.max_seq, args.seq)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32, as XLA does by default on GPU
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    compile_model = args.compile if args.compile is not None else (cuda or not args.smoke)
    bf16 = cuda and args.precision == "bf16"
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
    backend = _SDPA_BACKENDS[args.attention]

    def attention():  # a fresh one each step: sdpa_kernel is single-use
        return sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()

    torch.manual_seed(0)
    model = GPT(vocab=args.vocab, max_seq=max_seq, embed=args.embed, num_heads=args.heads,
                num_layers=args.layers).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95),
                                  weight_decay=0.1, fused=cuda)
    forward = torch.compile(model) if compile_model else model

    def step(tokens, targets):
        with autocast, attention():
            logits = forward(tokens)
        loss = F.cross_entropy(logits.float().view(-1, args.vocab), targets.view(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # the same tokens as the JAX scripts train on
    batches = [(torch.from_numpy(np.ascontiguousarray(x)).long().to(device),
                torch.from_numpy(np.ascontiguousarray(y)).long().to(device))
               for x, y in token_batches(args.vocab, args.batch, args.seq)]

    losses = []
    sync()
    t0 = time.perf_counter()
    losses.append(step(*batches[0]))
    sync()
    compile_s = time.perf_counter() - t0
    report_compiled("torch_baseline", args.json, backend="gpu" if cuda else "cpu",
                    device=torch.cuda.get_device_name() if cuda else "cpu", compile_s=compile_s)
    for i in range(1, warmup):
        losses.append(step(*batches[i % 4]))
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):  # batch order as in train_throughput.py, so losses compare
        losses.append(step(*batches[i % 4]))
    sync()
    elapsed = time.perf_counter() - t0
    losses = [float(x) for x in losses]

    params = sum(t.numel() for t in model.parameters())  # the tied table counted once
    n = params - model.wpe.weight.numel()
    flops_per_token = 6.0 * n + 12.0 * args.layers * args.embed * args.seq
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    result = {
        "benchmark": "torch_baseline",
        "backend": "gpu" if cuda else "cpu",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "precision": "bf16" if bf16 else "fp32",
        "attention": args.attention,
        "compiled": compile_model,
        "torch": torch.__version__,
        "layers": args.layers,
        "embed": args.embed,
        "heads": args.heads,
        "vocab": args.vocab,
        "params": params,
        **throughput_figures(batch=args.batch, seq=args.seq, steps=args.steps, elapsed=elapsed,
                             flops_per_token=flops_per_token, peak_tflops=args.peak_tflops, losses=losses),
        "compile_s": compile_s,
        "compile_s_is": "first step: " + ("torch.compile + " if compile_model else "") + "one step",
        "peak_memory_gib": peak,
        "peak_memory_source": "allocator" if peak is not None else None,
    }
    return report(result, args.json)


if __name__ == "__main__":
    sys.exit(0 if main()["loss_fell"] else 1)
