"""KV-cache decoding throughput of an eqzoo preset, as one JSON line.

The whole decode loop (prefill + one token per step) runs inside one compiled program
(`eqzoo.generation.generate_batch`). Reports tokens/s and ms per token at each batch size.

    python benchmarks/generate_throughput.py --preset gpt2-124m --batches 1,64 --new-tokens 256 --json
    python benchmarks/generate_throughput.py --smoke --json
    python benchmarks/generate_throughput.py --quantize int8 --json   # int8 linear weights (eqzoo.quant)
    python benchmarks/generate_throughput.py --quantize int4 --group-size 128 --json   # packed int4, group-wise scales
    python benchmarks/generate_throughput.py --preset tiny-mixtral --set num_experts=8 --batches 1 \
        --read-all-experts --json   # the baseline of MoE decoding's gather path (eqzoo.nn.MoE.decode)
    python benchmarks/generate_throughput.py --preset tiny-llama --set sliding_window=64 --set max_seq=2048 \
        --prompt-len 1536 --new-tokens 256 --batches 8 --full-length-cache --json   # the baseline of
        # the sliding-window ring caches (eqzoo.nn.KVCache)
    python benchmarks/generate_throughput.py --cache-dtype int8 --json   # int8 KV cache (eqzoo.nn.QuantizedKV)
    python benchmarks/generate_throughput.py --prompt-len 768 --prefill-via-decode --json   # the baseline of
        # AbstractLM.prefill: the prompt through decode at index 0, logits for every position
    python benchmarks/generate_throughput.py --preset tiny-gpt2 --batches 1 --new-tokens 64 --stream-chunk 8 \
        --repeats 7 --json   # eqzoo.generation.generate_stream: time to the first chunk and in all, against
        # generate_batch's (medians), and the cost of each chunk's host round trip, pipelined
        # (the default) and with pipeline=False
    python benchmarks/generate_throughput.py --preset tiny-gpt2 --batches 4 --new-tokens 256 --dtype float32 \
        --repeats 7 --processors none,no_repeat_ngram=3,banned=32x4 --json   # what logits processors cost
        # in the decode loop: NoRepeatNGram(3), BannedSequences of 32 random 4-token sequences

`--processors` takes comma-separated settings, each timed on its own: `none`, `no_repeat_ngram=N`
(`NoRepeatNGram(N)`), `banned=CxL` (`BannedSequences` of C random sequences of L tokens, seed 0),
`sequence_bias=CxL` (`SequenceBias`, the same sequences with random biases), or several joined
with `+` (`no_repeat_ngram=3+banned=32x4`, in that order).

Each row without a draft model also times the prefill alone (`prefill_ms`: the batch's
prompts through `model.prefill`, jitted and vmapped as the decode loop runs it) and reports
the compiled prefill's scratch memory where the backend says (`prefill_temp_mib`).
"""

import argparse
import json
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _throughput import parse_set

import eqzoo
import eqzoo.quant
from eqzoo.generation._generate import decoding_model  # how the decode loops run the model
from eqzoo.train import cast_floating


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", choices=["auto", "unrolled", "scan"], default="auto",
                   help="layer loop inside the decode loop (generate_batch(unroll_layers=...))")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="int8 or int4 weight-only linear layers (eqzoo.quant.quantize) after the dtype cast")
    p.add_argument("--group-size", type=int, default=None,
                   help="inputs per scale for --quantize (eqzoo.quant.quantize(group_size=...)); default: "
                        "per channel for int8, 128 for int4 (or the largest power of two dividing every layer's inputs)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field of the preset (repeatable)")
    p.add_argument("--read-all-experts", action="store_true",
                   help="MoE layers read every expert's weights for every token (turns off the "
                        "gather path of eqzoo.nn.MoE.decode: the baseline it is measured against)")
    p.add_argument("--full-length-cache", action="store_true",
                   help="sliding-window layers keep every position (init_cache(lookahead=max_seq)) "
                        "rather than a ring of sliding_window slots: the baseline the rings are measured against")
    p.add_argument("--draft-layers", type=int, default=0,
                   help="speculative decoding with the model's first N layers as the draft (0: off)")
    p.add_argument("--num-draft", type=int, default=4, help="tokens the draft proposes a round")
    p.add_argument("--cache-dtype", choices=["model", "float32", "bfloat16", "int8"], default="model",
                   help="the KV cache's dtype (generate_batch(cache_dtype=...)); model: the parameters'")
    p.add_argument("--prefill-via-decode", action="store_true",
                   help="start each sequence with decode at index 0 (attention over every cache slot, logits "
                        "for every prompt position) rather than AbstractLM.prefill: the baseline it is measured against")
    p.add_argument("--stream-chunk", type=int, default=0, metavar="N",
                   help="also time eqzoo.generation.generate_stream with chunk_size=N (0: off): its first chunk "
                        "and the whole stream, pipelined and not, against generate_batch, medians of --repeats calls")
    p.add_argument("--processors", default="none", metavar="SETTING,...",
                   help="logits processors to time, comma-separated settings each timed on its own: none, "
                        "no_repeat_ngram=N, banned=CxL, sequence_bias=CxL, or several joined with + (see above)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.batches, args.new_tokens, args.repeats = "tiny-gpt2", "1,4", 16, 2
        args.stream_chunk = args.stream_chunk or 8  # the streaming path runs in CI too
        if args.processors == "none":  # the processors' path too, at the last batch only
            args.processors = "none,no_repeat_ngram=2+banned=4x3"

    gathers = eqzoo.nn.MoE.gathers
    init_cache = eqzoo.models.AbstractLM.init_cache
    prefill = eqzoo.models.AbstractLM.prefill
    if args.prefill_via_decode:  # undone at the end of main
        eqzoo.models.AbstractLM.prefill = _prefill_via_decode
    if args.read_all_experts:
        eqzoo.nn.MoE.gathers = lambda self, tokens: False  # undone at the end of main
    if args.full_length_cache:  # a lookahead of max_seq makes every ring full length; undone below
        eqzoo.models.AbstractLM.init_cache = lambda self, max_seq=None, **kw: init_cache(
            self, max_seq, **{**kw, "lookahead": self.max_seq})
    try:
        return _run(args)
    finally:
        eqzoo.nn.MoE.gathers = gathers
        eqzoo.models.AbstractLM.init_cache = init_cache
        eqzoo.models.AbstractLM.prefill = prefill


def _prefill_via_decode(self, tokens, cache, *, batch_size=None, valid_length=None):
    logits, cache = self.decode(tokens, cache, jnp.zeros((), jnp.int32), batch_size=batch_size, valid_length=valid_length)
    last = tokens.shape[0] - 1 if valid_length is None else valid_length - 1
    return logits[last], cache


def _prefill_timing(model, prompts, total, cache_dtype, unroll, repeats) -> dict:
    """The prompts alone through `model.prefill`, as the decode loop runs it."""
    batch = prompts.shape[0]

    @jax.jit
    def prefill(model, prompts):
        # as generate_batch runs the layers: unrolled or not, and without remat
        model = decoding_model(model, eqzoo.generation.resolve_unroll(unroll))
        return jax.vmap(lambda p: model.prefill(p, model.init_cache(total, dtype=cache_dtype), batch_size=batch))(prompts)

    compiled = prefill.lower(model, prompts).compile()
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(model, prompts))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(model, prompts))
        times.append(time.perf_counter() - t0)
    temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
    return {"prefill_ms": 1e3 * min(times), "prefill_temp_mib": None if temp is None else temp / 2**20}


def _stream_timing(model, prompts, args, unroll, cache_dtype, run) -> dict:
    """`generate_stream` with `chunk_size=args.stream_chunk`, pipelined (the default) and not
    (`pipeline=False`: each chunk read back before the next is dispatched): the median time to
    its first chunk and to its end, `generate_batch`'s median (`run`) timed alternately with
    both, and what each chunk costs beyond that (the whole stream's extra time over the number
    of chunks)."""
    def stream(pipeline):
        return eqzoo.generation.generate_stream(
            model, prompts, max_new_tokens=args.new_tokens, chunk_size=args.stream_chunk, unroll_layers=unroll,
            cache_dtype=cache_dtype, pipeline=pipeline)

    for _ in stream(True):  # compiles the prefill and the chunk programs (one for both ways)
        pass
    times = {"first": [], "whole": [], "first_unpipelined": [], "whole_unpipelined": [], "batch": []}
    for _ in range(max(args.repeats, 1)):
        for pipeline, suffix in ((True, ""), (False, "_unpipelined")):
            t0 = time.perf_counter()
            chunks = stream(pipeline)
            next(chunks)  # its tokens are on the host: the chunk is done
            times["first" + suffix].append(time.perf_counter() - t0)
            for _ in chunks:
                pass
            times["whole" + suffix].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times["batch"].append(time.perf_counter() - t0)
    n_chunks = -(-args.new_tokens // args.stream_chunk)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "stream_chunk": args.stream_chunk,
        "stream_chunks": n_chunks,
        "stream_first_chunk_s": med["first"],
        "stream_total_s": med["whole"],
        "stream_unpipelined_first_chunk_s": med["first_unpipelined"],
        "stream_unpipelined_total_s": med["whole_unpipelined"],
        "batch_total_median_s": med["batch"],
        "stream_overhead_ms_per_chunk": 1e3 * (med["whole"] - med["batch"]) / n_chunks,
        "stream_unpipelined_overhead_ms_per_chunk": 1e3 * (med["whole_unpipelined"] - med["batch"]) / n_chunks,
    }


def _processors(spec: str, vocab: int) -> list:
    """The logits processors one `--processors` setting names (see the module docstring)."""
    from eqzoo.generation import BannedSequences, NoRepeatNGram, SequenceBias

    out = []
    for part in spec.split("+"):
        name, _, value = part.partition("=")
        try:
            if name == "none" and not value:
                continue
            if name == "no_repeat_ngram":
                out.append(NoRepeatNGram(int(value)))
                continue
            if name in ("banned", "sequence_bias"):
                count, length = (int(v) for v in value.split("x"))
                rng = np.random.default_rng(0)
                seqs = rng.integers(0, vocab, (count, length)).tolist()
                if name == "banned":
                    out.append(BannedSequences(seqs))
                else:
                    biases = rng.normal(size=count).tolist()
                    out.append(SequenceBias([(s, b) for s, b in zip(seqs, biases, strict=True)]))
                continue
        except ValueError:
            pass
        raise SystemExit(f"--processors: cannot read {part!r}; the settings are none, no_repeat_ngram=N, "
                         "banned=CxL and sequence_bias=CxL (C sequences of L tokens), joined with + to combine")
    return out


def _int4_group(model) -> int:
    # 128 (the usual int4 group), or the largest power of two below it dividing every linear
    # layer's inputs (the tiny presets have 64 and 176).
    sizes = [x.in_features for x in jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, eqx.nn.Linear))
             if isinstance(x, eqx.nn.Linear)]
    group = 128
    while group > 2 and any(n % group for n in sizes):
        group //= 2
    return group


def _model(args):
    """The preset in `--dtype`, quantized as `--quantize` asks (filling in an int4 group size)."""
    model = eqzoo.models.create(args.preset, key=jax.random.key(0), **parse_set(args.set))
    model = cast_floating(model, jnp.dtype(args.dtype))
    if args.quantize != "none":
        if args.quantize == "int4" and args.group_size is None:
            args.group_size = _int4_group(model)
        model = eqzoo.quant.quantize(model, bits=int(args.quantize[3:]), group_size=args.group_size)
    return model


def _runner(model, prompts, processors, args, unroll, cache_dtype):
    """A no-argument call of what one row times: speculative decoding with `--draft-layers`,
    else `generate_batch` with `processors`."""
    if args.draft_layers:
        draft = eqx.tree_at(lambda m: m.blocks, model, model.blocks.first(args.draft_layers))
        return lambda: eqzoo.generation.generate_speculative(
            model, draft, prompts, max_new_tokens=args.new_tokens, num_draft=args.num_draft, return_stats=True,
            unroll_layers=unroll, cache_dtype=cache_dtype)
    return lambda: eqzoo.generation.generate_batch(
        model, prompts, max_new_tokens=args.new_tokens, unroll_layers=unroll, cache_dtype=cache_dtype,
        logits_processors=processors)


def _run(args) -> dict:
    model = _model(args)
    unroll = {"auto": "auto", "unrolled": True, "scan": False}[args.layers]
    cache_dtype = None if args.cache_dtype == "model" else jnp.dtype(args.cache_dtype)
    total = args.prompt_len + args.new_tokens
    cache = jax.eval_shape(lambda: model.init_cache(total, dtype=cache_dtype))
    cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    rng = np.random.default_rng(0)
    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    settings = args.processors.split(",")
    for spec in settings:  # parsed before any timing: a typo fails at once
        if _processors(spec, model.config.vocab_size) and args.draft_layers:
            raise SystemExit("--processors: generate_speculative takes no logits processors; drop --draft-layers")
    runs = [(batch, spec) for batch in batches for spec in settings]
    if args.smoke:  # processors other than none at the last batch only: CI's time
        runs = [(b, spec) for b, spec in runs if spec == "none" or b == batches[-1]]
    batch_prompts = {batch: jnp.asarray(rng.integers(0, model.config.vocab_size, (batch, args.prompt_len), dtype=np.int32))
                     for batch in batches}  # the same prompts for every processors setting
    for batch, spec in runs:
        prompts = batch_prompts[batch]
        processors = _processors(spec, model.config.vocab_size) or None
        run = _runner(model, prompts, processors, args, unroll, cache_dtype)
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        compile_and_first_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times.append(time.perf_counter() - t0)
        best = min(times)
        extra = {}
        if args.draft_layers:
            rounds = np.asarray(run()[1]["rounds"])
            extra = {"tokens_per_round": float(args.new_tokens / rounds.mean())}
        elif processors is None:  # the prefill and the stream run without processors: timed once per batch
            extra.update(_prefill_timing(model, prompts, total, cache_dtype, unroll, args.repeats))
            if args.stream_chunk:
                extra.update(_stream_timing(model, prompts, args, unroll, cache_dtype, run))
        rows.append({**extra,
            "batch": batch,
            "processors": spec,
            "tokens_per_s": batch * args.new_tokens / best,
            "ms_per_token": 1e3 * best / args.new_tokens,
            "seconds": best,
            "first_call_s": compile_and_first_s,
        })
        if args.json and len(rows) < len(runs):  # the rows so far, should a later one not finish
            print(json.dumps({"benchmark": "generate_throughput", "partial": f"{len(rows)} of {len(runs)} rows",
                              "preset": args.preset, "backend": jax.default_backend(),
                              "device": jax.devices()[0].device_kind, "results": rows}), flush=True)
    result = {
        "benchmark": "generate_throughput",
        "preset": args.preset,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "group_size": args.group_size if args.quantize != "none" else None,
        "overrides": args.set,
        "read_all_experts": args.read_all_experts,
        "full_length_cache": args.full_length_cache,
        "cache_dtype": args.cache_dtype,
        "prefill": "decode at index 0" if args.prefill_via_decode else "prefill",
        "cache_mib_per_sequence": cache_bytes / 2**20,
        "draft_layers": args.draft_layers,
        "num_draft": args.num_draft if args.draft_layers else None,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "layers": "unrolled" if eqzoo.generation.resolve_unroll(unroll) else "scan",
        "stream_chunk": args.stream_chunk or None,
        "results": rows,
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
