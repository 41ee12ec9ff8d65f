"""MinHash signatures and LSH dedup: pyllm.data.dedup (vectorised NumPy) vs datasketch, same corpus.

    python -m benchmarks.bench_minhash                 # the built-in corpus (stdlib sources + topics)
    python -m benchmarks.bench_minhash --max-docs 200 --repeats 5 --out results.jsonl

Both sides hash the same shingles: lower-cased words (runs of ASCII letters, digits, '_' or non-ASCII
characters), ``--shingle-size`` words per shingle, ``--num-perm`` permutations. Timed, single process:

- ``pyllm``: text -> signature (word hashing, shingling, permutations: all of it);
- ``datasketch``: text -> signature (shingle strings built in Python, then ``MinHash.update_batch``);
- ``datasketch (hash only)``: shingle bytes prepared outside the timer, only ``update_batch`` timed;
- LSH: index + query every signature (pyllm ``Deduplicator`` vs datasketch ``MinHashLSH``).

Correctness first: on pairs of documents with known edits, each side's Jaccard estimate is compared
with the exact Jaccard; a side whose mean error is far above the sampling error fails the run.
Median and [min, max] over repeats are printed with MB/s and the speed-up in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import subprocess
import sys
import time

import numpy as np

from pyllm.data.dedup import DedupConfig, Deduplicator, MinHasher, content_hash, jaccard
from pyllm.data.stdlib import iter_stdlib_documents

_WORD = re.compile(r"[A-Za-z0-9_\u0080-\U0010ffff]+")  # the same words as dedup.word_hashes


def shingle_bytes(text: str, k: int) -> list[bytes]:
    words = _WORD.findall(text.lower())
    if not words:
        return []
    k = min(k, len(words))
    return [" ".join(words[i:i + k]).encode() for i in range(len(words) - k + 1)]


def datasketch_signature(text: str, k: int, num_perm: int):
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=1)
    m.update_batch(shingle_bytes(text, k))
    return m


def check_accuracy(texts: list[str], cfg: DedupConfig, pairs: int = 30) -> dict:
    """Mean |estimate - exact Jaccard| of each side over edited document pairs."""
    rng = random.Random(0)
    ours = MinHasher(cfg)
    err_ours, err_ds = [], []
    long_texts = [t for t in texts if len(t.split()) > 300]
    for a in rng.sample(long_texts, min(pairs, len(long_texts))):
        words = a.split()
        for i in rng.sample(range(len(words)), int(rng.uniform(0.01, 0.2) * len(words))):
            words[i] = f"edit{i}"
        b = " ".join(words)
        exact = jaccard(a, b, cfg.shingle_size)
        err_ours.append(abs(float(np.mean(ours(a) == ours(b))) - exact))
        ma, mb = (datasketch_signature(t, cfg.shingle_size, cfg.num_perm) for t in (a, b))
        err_ds.append(abs(ma.jaccard(mb) - exact))
    bound = 4 * (0.25 / cfg.num_perm) ** 0.5  # 4 standard deviations of the worst-case estimate
    result = {"mean_abs_error_pyllm": float(np.mean(err_ours)), "mean_abs_error_datasketch": float(np.mean(err_ds)),
              "pairs": len(err_ours), "bound": bound}
    if result["mean_abs_error_pyllm"] > bound or result["mean_abs_error_datasketch"] > bound:
        raise SystemExit(f"accuracy check failed: {result}")
    return result


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-docs", type=int, default=None, help="limit the corpus (default: all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--bands", type=int, default=16)
    p.add_argument("--shingle-size", type=int, default=5)
    p.add_argument("--out", help="append the results as one JSON line to this file")
    args = p.parse_args(argv)
    try:
        import datasketch
    except ImportError:
        print("bench_minhash: needs datasketch (pip install datasketch)", file=sys.stderr)
        return 2

    texts = [d.text for d in iter_stdlib_documents()][: args.max_docs]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    cfg = DedupConfig(num_perm=args.num_perm, bands=args.bands, shingle_size=args.shingle_size)
    accuracy = check_accuracy(texts, cfg)

    ours = MinHasher(cfg)
    k, n = cfg.shingle_size, cfg.num_perm
    prepared = [shingle_bytes(t, k) for t in texts]

    def ds_hash_only():
        from datasketch import MinHash

        for sh in prepared:
            MinHash(num_perm=n, seed=1).update_batch(sh)

    timings = {
        "pyllm": _time(lambda: [ours(t) for t in texts], args.repeats),
        "datasketch": _time(lambda: [datasketch_signature(t, k, n) for t in texts], args.repeats),
        "datasketch (hash only)": _time(ds_hash_only, args.repeats),
    }

    our_sigs = [ours(t) for t in texts]
    ds_sigs = [datasketch_signature(t, k, n) for t in texts]

    def our_lsh():
        d = Deduplicator(DedupConfig(num_perm=n, bands=args.bands, shingle_size=k, exact=False))
        return sum(d.check(None, s) is not None for s in our_sigs)

    def ds_lsh():
        from datasketch import MinHashLSH

        lsh = MinHashLSH(num_perm=n, params=(args.bands, n // args.bands))
        dups = 0
        for i, m in enumerate(ds_sigs):
            dups += bool(lsh.query(m))
            lsh.insert(i, m)
        return dups

    timings["pyllm LSH"] = _time(our_lsh, args.repeats)
    timings["datasketch LSH"] = _time(ds_lsh, args.repeats)
    dup_counts = {"pyllm": our_lsh(), "datasketch": ds_lsh(),
                  "exact": len(texts) - len({content_hash(t) for t in texts})}

    print(f"corpus: {len(texts)} stdlib documents, {mb:.2f} MB; num_perm={n}, bands={args.bands}, shingle={k} words; "
          f"python {platform.python_version()}, numpy {np.__version__}, datasketch {datasketch.__version__}; "
          f"{platform.processor() or platform.machine()}; commit {_commit()}")
    print(f"accuracy (mean |estimate - exact Jaccard| over {accuracy['pairs']} edited pairs): "
          f"pyllm {accuracy['mean_abs_error_pyllm']:.4f}, datasketch {accuracy['mean_abs_error_datasketch']:.4f}")
    base = statistics.median(timings["pyllm"])
    for name, ts in timings.items():
        med = statistics.median(ts)
        rate = f"{mb / med:7.2f} MB/s" if "LSH" not in name else f"{len(texts) / med:7.0f} docs/s"
        ratio = "" if "LSH" in name else f"  pyllm is {med / base:.2f}x faster" if name != "pyllm" else ""
        print(f"  {name:<24} median {med:8.3f} s [{min(ts):.3f}, {max(ts):.3f}]  {rate}{ratio}")
    print(f"  LSH speed-up: {statistics.median(timings['datasketch LSH']) / statistics.median(timings['pyllm LSH']):.2f}x;"
          f" near-duplicates flagged: {dup_counts}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"bench": "minhash", "commit": _commit(), "machine": platform.machine(),
                                "documents": len(texts), "mb": mb, "num_perm": n, "bands": args.bands,
                                "shingle_size": k, "timings_s": timings, "accuracy": accuracy,
                                "duplicates": dup_counts}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
