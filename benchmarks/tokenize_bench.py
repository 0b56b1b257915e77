# SPDX-License-Identifier: MIT
"""Tokenizing a corpus larger than memory: throughput (MB/s) and peak RSS of ``prepare_text_data``.

Generates a corpus of ``--size-mb`` MB under ``--dir`` (default /tmp/stackwise-tokenize-bench; never inside the
repository), made of Zipf-distributed pseudo-words in lines and paragraphs, as plain text, JSONL or gzip'd
text. A byte-level BPE of ``--vocab`` ids is trained on the first ``--train-mb`` MB (timed apart), then the
whole corpus is tokenized into train/val shards by ``prepare_text_data`` in a fresh process, so the peak RSS
(``VmHWM`` of that process) belongs to the build alone. Target: peak RSS under 1 GB at any corpus size.

    python benchmarks/tokenize_bench.py --size-mb 100
    nice python benchmarks/tokenize_bench.py --size-mb 1000 --format jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK_MB = 8


def _block(seed: int) -> str:
    """About BLOCK_MB MB of text: lines of Zipf-distributed pseudo-words, a blank line every ~12 lines."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab_rng = np.random.default_rng(12345)  # one vocabulary for the whole corpus
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = 1.0 / np.arange(1, 27) ** 0.9
    words = ["".join(vocab_rng.choice(letters, size=int(n), p=freq / freq.sum()))
             for n in vocab_rng.integers(1, 11, size=30000)]
    words = np.array(words + [w.capitalize() for w in words[:3000]] + [",", ".", ";", "1", "42", "1999"])
    n_words = BLOCK_MB * 2**20 // 6
    ranks = np.minimum(rng.zipf(1.15, size=n_words) - 1, len(words) - 1)
    toks = words[ranks]
    lines, i = [], 0
    lens = rng.integers(4, 18, size=n_words // 4)
    for k, n in enumerate(lens):
        if i >= n_words:
            break
        lines.append(" ".join(toks[i:i + n]))
        if k % 12 == 11:
            lines.append("")
        i += n
    return "\n".join(lines) + "\n"


def make_corpus(path: str, size_mb: int, fmt: str) -> int:
    """Write the corpus (skipped when a file of that size and format exists); returns its uncompressed bytes."""
    stamp = path + ".size"
    if os.path.exists(path) and os.path.exists(stamp):
        return int(open(stamp).read())
    blocks = [_block(s) for s in range(min(16, max(1, size_mb // BLOCK_MB)))]
    opener = (lambda p: gzip.open(p, "wt", encoding="utf-8", compresslevel=1)) if fmt == "gz" else \
        (lambda p: open(p, "w", encoding="utf-8"))
    written = 0
    with opener(path + ".tmp") as f:
        k = 0
        while written < size_mb * 2**20:
            text = blocks[k % len(blocks)]
            if fmt == "jsonl":
                for para in text.split("\n\n"):
                    line = json.dumps({"id": k, "text": para}) + "\n"
                    f.write(line)
                    written += len(para) + 1
            else:
                f.write(text)
                written += len(text)
            k += 1
    os.replace(path + ".tmp", path)
    open(stamp, "w").write(str(written))
    return written


def _worker(args) -> None:
    """Runs in a fresh process: the build alone, then its own peak RSS."""
    from stackwise.config import DataConfig
    from stackwise.data import prepare_text_data

    cfg = DataConfig(dummy=False, text_files=[args.corpus], data_dir=args.data_dir, tokenizer=args.tokenizer)
    t0 = time.perf_counter()
    td = prepare_text_data(cfg, args.vocab)
    secs = time.perf_counter() - t0
    print("RESULT " + json.dumps({"seconds": secs, "peak_rss": _peak_rss(), "tokens": td.n_train_tokens + td.n_val_tokens}))


def _peak_rss() -> int:
    """Peak RSS of this process in bytes: VmHWM (ru_maxrss would also count the parent's peak, which Linux
    carries across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=100, help="corpus size in MB (uncompressed text)")
    ap.add_argument("--format", choices=["txt", "jsonl", "gz"], default="txt")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--train-mb", type=int, default=16, help="MB of the corpus the BPE is trained on")
    ap.add_argument("--dir", default="/tmp/stackwise-tokenize-bench", help="where the corpus and shards go")
    ap.add_argument("--keep", action="store_true", help="keep the token shards (the corpus is always kept)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--data_dir", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args)
    if os.path.abspath(args.dir).startswith(ROOT + os.sep):
        sys.exit(f"error: --dir {args.dir} is inside the repository; generated corpora must not be committed, "
                 f"use a directory such as /tmp/stackwise-tokenize-bench")
    os.makedirs(args.dir, exist_ok=True)
    ext = {"txt": "txt", "jsonl": "jsonl", "gz": "txt.gz"}[args.format]
    corpus = os.path.join(args.dir, f"corpus-{args.size_mb}mb.{ext}")
    t0 = time.perf_counter()
    nbytes = make_corpus(corpus, args.size_mb, args.format)
    print(f"corpus {corpus}: {nbytes / 2**20:.0f} MB of text ({os.path.getsize(corpus) / 2**20:.0f} MB on disk), "
          f"ready in {time.perf_counter() - t0:.1f} s")

    sys.path.insert(0, ROOT)
    from stackwise.data.tokenizer import train_tokenizer

    tok_path = os.path.join(args.dir, f"tokenizer-v{args.vocab}.json")
    t0 = time.perf_counter()
    t_bpe = None  # a tokenizer trained by an earlier run is reused
    if not os.path.exists(tok_path):
        train_tokenizer([_block(s) for s in range(max(1, args.train_mb // BLOCK_MB))], args.vocab, tok_path)
        t_bpe = round(time.perf_counter() - t0, 2)

    data_dir = os.path.join(args.dir, "data")
    import shutil

    shutil.rmtree(data_dir, ignore_errors=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--corpus", corpus, "--data_dir", data_dir,
           "--tokenizer", tok_path, "--vocab", str(args.vocab)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"error: the tokenizing worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(line[0][7:])
    if not args.keep:
        shutil.rmtree(data_dir, ignore_errors=True)
    mbps = nbytes / 2**20 / r["seconds"]
    threads = int(os.environ.get("RAYON_NUM_THREADS") or 0) or os.cpu_count()
    print(f"tokenized {nbytes / 2**20:.0f} MB ({args.format}) into {r['tokens']:,} tokens in {r['seconds']:.1f} s: "
          f"{mbps:.2f} MB/s on {threads} threads; peak RSS {r['peak_rss'] / 2**20:.0f} MB "
          f"(BPE trained on {args.train_mb} MB {'in %.1f s' % t_bpe if t_bpe else 'by an earlier run'}, not counted)")
    print("JSON " + json.dumps({"bench": "tokenize", "size_mb": round(nbytes / 2**20, 1), "format": args.format,
                                "vocab": args.vocab, "tokens": r["tokens"], "seconds": round(r["seconds"], 2),
                                "MBps": round(mbps, 3), "peak_rss_MB": round(r["peak_rss"] / 2**20, 1),
                                "threads": threads, "bpe_train_seconds": t_bpe}))


if __name__ == "__main__":
    main()
