"""Generate text with eqzoo from a local Hugging Face checkpoint (GPT-2 or Llama, safetensors).

    python examples/hf_generate.py PATH --prompt "Once upon a time" --max-new-tokens 40
    python examples/hf_generate.py --smoke --json     # no checkpoint needed (what CI runs)
    python examples/hf_generate.py PATH --cache-dtype int8   # an int8 KV cache (eqzoo.nn.QuantizedKV)

PATH is a folder with config.json, model.safetensors (or shards + index) and tokenizer.json;
nothing is downloaded. `--smoke` without PATH builds a tiny random GPT-2 with transformers
(seeded) and trains a tiny byte-level BPE tokenizer on a few standard-library lines, saves both
into a temporary folder, then loads that folder with eqzoo and generates; it also checks the
logits and the greedy tokens against transformers' own and fails if they differ.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jaxtyping

with jaxtyping.install_import_hook("eqzoo", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"):
    import eqzoo
    import eqzoo.hf

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SMOKE_PROMPT = "def copy(src, dst):"
LOGIT_TOL = 1e-4  # fp32, whole model


def _stdlib_lines(n: int = 300) -> list[str]:
    import shutil
    import textwrap

    lines = []
    for module in (textwrap, shutil):
        lines += [ln for ln in Path(module.__file__).read_text().splitlines() if ln.strip()]
    return lines[:n]


def build_smoke_checkpoint(folder: Path, seed: int) -> None:
    """Write a tiny random GPT-2 (transformers) and a tiny BPE tokenizer (tokenizers) to `folder`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_stdlib_lines(), trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=tokenizer.get_vocab_size(), n_positions=128, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=eos, eos_token_id=eos, initializer_range=0.1,
    )
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder)


def check_against_transformers(folder: Path, model, tokens: np.ndarray, new_tokens: int) -> dict:
    """Max |logit| difference and whether greedy decoding agrees, eqzoo vs transformers."""
    import torch
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.as_tensor(tokens[None], dtype=torch.long)
    with torch.no_grad():
        ref = hf_model(ids).logits[0].numpy()
        hf_out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None,
        )[0].numpy()
    ours = np.asarray(model(jnp.asarray(tokens)))
    eq_out = np.asarray(eqzoo.generate(model, jnp.asarray(tokens), max_new_tokens=new_tokens))
    return {
        "max_abs_logit_diff": float(np.abs(ours - ref).max()),
        "greedy_matches_transformers": bool(np.array_equal(eq_out, hf_out)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", help="checkpoint folder (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--prompt", default=None, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default 40; 16 with --smoke)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="parameter dtype")
    parser.add_argument("--no-cache", action="store_true", help="recompute the prefix each step (slower)")
    parser.add_argument("--cache-dtype", choices=["model", "bfloat16", "int8"], default="model",
                        help="KV cache storage: the parameters' dtype (default), bfloat16, or int8 codes with scales")
    parser.add_argument("--smoke", action="store_true", help="tiny self-made checkpoint when PATH is omitted; checks parity")
    parser.add_argument("--json", action="store_true", help="print one JSON summary line last")
    args = parser.parse_args(argv)
    if args.path is None and not args.smoke:
        parser.error("give a checkpoint folder PATH, or --smoke to build a tiny one")
    max_new = args.max_new_tokens if args.max_new_tokens is not None else (16 if args.smoke else 40)
    prompt_text = args.prompt if args.prompt is not None else (SMOKE_PROMPT if args.smoke else "Hello")

    with tempfile.TemporaryDirectory(prefix="eqzoo-hf-") as tmp:
        folder = Path(args.path) if args.path else Path(tmp)
        if args.path is None:
            build_smoke_checkpoint(folder, args.seed)

        start = time.perf_counter()
        model = eqzoo.hf.load_pretrained(folder, dtype=jnp.dtype(args.dtype))
        tokenizer = eqzoo.hf.load_tokenizer(folder)
        load_s = time.perf_counter() - start

        prompt = tokenizer.encode(prompt_text)
        room = model.max_seq - len(prompt)
        if room < 1:
            print(f"the prompt has {len(prompt)} tokens but the model takes at most {model.max_seq}.", file=sys.stderr)
            return 2
        max_new = min(max_new, room)
        run = lambda: eqzoo.generate(  # noqa: E731
            model, jnp.asarray(prompt), max_new_tokens=max_new, key=jax.random.key(args.seed),
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            eos_token=tokenizer.eos_token_id, pad_token=tokenizer.pad_token_id or 0,
            use_cache=not args.no_cache, cache_dtype=None if args.cache_dtype == "model" else jnp.dtype(args.cache_dtype),
        )
        start = time.perf_counter()
        out = np.asarray(run())  # includes compilation
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        out = np.asarray(run())
        generate_s = time.perf_counter() - start
        new = out[len(prompt):]
        decoded = len(new)  # the loop stops at eos: the tokens it decoded, eos included
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new.tolist():
            new = new[: new.tolist().index(tokenizer.eos_token_id)]
            decoded = len(new) + 1
        text = tokenizer.decode(new)

        summary = {
            "example": "hf_generate",
            "smoke": args.smoke,
            "checkpoint": "tiny random GPT-2 (smoke)" if args.path is None else str(folder),
            "model": type(model).__name__,
            "params": int(sum(x.size for x in jax.tree.leaves(model))),
            "dtype": args.dtype,
            "cache_dtype": args.cache_dtype,
            "prompt_tokens": int(len(prompt)),
            "new_tokens": int(len(new)),
            "load_s": round(load_s, 3),
            "first_call_s": round(first_s, 3),
            "tokens_per_s": round(decoded / generate_s, 1),
            "text": text,
        }
        ok = True
        if args.smoke and args.path is None:
            summary |= check_against_transformers(folder, model, prompt, max_new)
            ok = summary["max_abs_logit_diff"] < LOGIT_TOL and summary["greedy_matches_transformers"]
            summary["ok"] = ok

    if args.json:
        print(json.dumps(summary))
    else:
        print(prompt_text + text)
        print({k: v for k, v in summary.items() if k != "text"}, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
