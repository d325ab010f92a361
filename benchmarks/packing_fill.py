"""How full `eqzoo.data.pack_documents` packs rows, and how long it takes, as one JSON line.

The documents are the Python standard library's source (`eqzoo.data.stdlib_corpus`), cut at
every pair of blank lines (top-level definitions, mostly), as bytes. For each sequence length:
the fraction of positions that hold a counted target when each document gets rows of its own
(`one_doc_per_row`: the padding a loader without packing pays), and with packing at 1 open row
(next-fit, document order kept), 8 and 64 (best-fit), with the rows made and the seconds taken.

    python benchmarks/packing_fill.py --json            # 10 MB of source
    python benchmarks/packing_fill.py --smoke --json    # 200 kB, for CI
"""

import argparse
import json
import sys
import time

import numpy as np

from eqzoo import data


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-chars", type=int, default=10_000_000)
    p.add_argument("--seq", default="1024,2048", help="comma-separated sequence lengths")
    p.add_argument("--smoke", action="store_true", help="200 kB of source (CPU regression guard)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.max_chars, args.seq = 200_000, "256"
    tokenizer = data.ByteTokenizer()
    text = data.stdlib_corpus(max_chars=args.max_chars)
    docs = [np.asarray(tokenizer.encode(part), np.int32) for part in text.split("\n\n\n") if part.strip()]
    pairs = np.array([len(d) for d in docs])  # each document's pairs, with its end token appended
    result = {
        "benchmark": "packing_fill",
        "documents": len(docs),
        "tokens": int(pairs.sum()),
        "median_length": float(np.median(pairs)),
        "p90_length": float(np.percentile(pairs, 90)),
        "rows": [],
    }
    for seq in (int(s) for s in args.seq.split(",")):
        row = {"seq": seq, "one_doc_per_row_fill": float(pairs.sum() / (np.ceil(pairs / seq).sum() * seq))}
        for bins in (1, 8, 64):
            t0 = time.perf_counter()
            packed = data.pack_documents(docs, seq, eos_id=0, num_bins=bins)
            row[f"bins_{bins}"] = {
                "fill": float(packed["mask"].mean()),
                "rows": int(packed["tokens"].shape[0]),
                "seconds": time.perf_counter() - t0,
            }
        result["rows"].append(row)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
