"""The training index and epoch plan at pre-training scale, extrapolated to the paper's 1.2B pairs (SPEC 5.1).

Memory: N synthetic examples (uint16 token lengths with bench/padding.py's length mix, the offset and line number of
every 16th: jsonl_index's layout, ~3 bytes per pair; no text, no tokenizer) in files of --per_file examples, each
written once as a cached index (jsonl_index.save_index). W processes (the local ranks of one node) each open every
index memory-mapped, plan one epoch at the paper's pre-training world size (96 ranks, SPEC 4.5's unsupervised batch
sizes; data.epoch_batches) and then read the block offsets and line numbers of their first 2,000 batches' examples,
as the loop does. Per rank: PSS growth from before opening the index to the end, with all W alive (pages shared by
the W ranks count 1/W each), plus the plan's transient numpy peak (tracemalloc) = the memory per rank that the index
and the plan take; also its anonymous part (what the kernel cannot drop: the plan), apart from the index's file pages
(page cache, shared, droppable).
Plan time: one process alone (the W ranks of a real node plan in parallel on their own cores).
Indexing throughput: jsonl_index.build_index with one worker on real text (SciFact titles -> abstracts, the bundled
all-MiniLM-L6-v2 tokenizer).
Extrapolation: a least-squares line through the measured N, evaluated at 1.2B (the per-file size held fixed).

    python bench/index_scale.py    # last line: index_rss_per_rank_mb_at_1p2b=<f> plan_s_at_1p2b=<f>
"""
import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT  # noqa: E402  (the repository on sys.path)
import jsonl_index  # noqa: E402
from data import epoch_batches  # noqa: E402

RANGES = [0, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8192]
PRETRAIN_BS = [700, 570, 388, 288, 224, 180, 157, 128, 104]  # SPEC 4.5, unsupervised, per GPU
WORLD = 96  # the paper's pre-training GPUs


def write_indexes(d, n, per_file):
    """Synthetic cached indexes of n examples in files of per_file -> their cache directories."""
    r, caches = np.random.default_rng(0), []
    for f, s in enumerate(range(0, n, per_file)):
        m = min(per_file, n - s)
        short = r.lognormal(np.log(120), 0.8, m)  # bench/padding.py's mix: 90% short, 10% a long tail
        tail = np.exp(r.uniform(np.log(500), np.log(8192), m))
        lengths = jsonl_index.clip_lengths(np.clip(np.where(r.random(m) < 0.9, short, tail), 8, 8192))  # (m,)
        first = np.arange(0, m, jsonl_index.INDEX_BLOCK, dtype=np.int64)  # (ceil(m / 16),) each block's first example
        ds = jsonl_index.JsonlDataset(f"part-{f}.jsonl", lengths, first * 300, first + 1, {})  # 300-byte lines
        caches.append(os.path.join(d, f"part-{f}.jsonl.idx"))
        jsonl_index.save_index(caches[-1], {}, ds)
    return caches


def plan(caches, rank):
    """Open every index memory-mapped and plan one epoch as `rank` of WORLD -> (datasets, batches, seconds,
    transient numpy peak in MB above what stays)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    dss = [jsonl_index.load_index(c[:-4], c) for c in caches]
    batches = epoch_batches(dss, epoch=0, seed=0, world_size=WORLD, rank=rank, length_ranges=RANGES,
                            batch_sizes=PRETRAIN_BS, group_by_length=True)
    dt = time.perf_counter() - t0
    now, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return dss, batches, dt, (peak - now) / 2 ** 20


def pss_mb():
    """(PSS, its anonymous part) of this process in MB: the rest is file pages (the mapped index, libraries), which
    the kernel can drop and read again; anonymous memory it cannot."""
    rollup = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in open("/proc/self/smaps_rollup")
              if line.split(":")[0] in ("Pss", "Pss_Anon")}
    return np.array([rollup["Pss"], rollup.get("Pss_Anon", rollup["Pss"])])


def rank_proc(caches, rank, barrier, out):
    base = pss_mb()  # the interpreter and its libraries: not the index's
    dss, batches, _, extra = plan(caches, rank)
    for b in range(min(2000, len(batches))):  # the loop reads each example's block offset and line (data._read)
        for d, i in batches[b]:
            block = i // jsonl_index.INDEX_BLOCK
            int(dss[d].block_offsets[block]), int(dss[d].block_lines[block])
    barrier.wait()  # every rank alive: shared pages are split between them
    out.put((rank, *(pss_mb() - base), extra))
    barrier.wait()


def memory_per_rank(caches, W):
    """W ranks at once -> max over ranks of (PSS + transient plan peak, PSS, its anonymous part + the peak), MB."""
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(W), ctx.Queue()
    procs = [ctx.Process(target=rank_proc, args=(caches, r, barrier, out)) for r in range(W)]
    for p in procs:
        p.start()
    res = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return (max(pss + extra for _, pss, _, extra in res), max(pss for _, pss, _, _ in res),
            max(anon + extra for _, _, anon, extra in res))


def index_throughput(d, n):
    """Examples/s and MB/s of build_index with one worker on SciFact title -> abstract pairs."""
    from transformers import AutoTokenizer

    from model import resolve
    tok = AutoTokenizer.from_pretrained(resolve("minilm"))
    docs = [json.loads(x) for x in open(os.path.join(ROOT, "data", "scifact", "corpus.jsonl"))]
    path = os.path.join(d, "pairs.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            doc = docs[i % len(docs)]
            f.write(json.dumps({"query": doc["title"], "pos": [doc["text"]]}) + "\n")
    t0 = time.perf_counter()
    jsonl_index.build_index(path, tok, 1)
    dt = time.perf_counter() - t0
    return n / dt, os.path.getsize(path) / dt / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="10000000,30000000,100000000", help="comma-separated example counts")
    ap.add_argument("--per_file", type=int, default=10_000_000, help="examples per file (per dataset)")
    ap.add_argument("--ranks", type=int, default=8, help="local ranks sharing the index")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 ranks (the tests)")
    args = ap.parse_args()
    ns = [200_000, 400_000] if args.quick else [int(x) for x in args.n.split(",")]
    per_file, W = (100_000, 2) if args.quick else (args.per_file, args.ranks)
    rows = []
    for n in ns:
        d = tempfile.mkdtemp(prefix="index_scale_")
        try:
            caches = write_indexes(d, n, per_file)
            per_pair = sum(os.path.getsize(os.path.join(c, f)) for c in caches for f in os.listdir(c)) / n
            _, batches, dt, extra = plan(caches, 0)
            mem, pss, private = memory_per_rank(caches, W)
            rows.append((n, mem, dt, private))
            print(f"N={n:,} in {len(caches)} files, index {per_pair:.2f} bytes per pair: plan {dt:.1f} s "
                  f"({len(batches):,} batches for rank 0 of {WORLD}), "
                  f"per rank with {W} sharing: PSS {pss:.0f} MB + plan transient {extra:.0f} MB -> {mem:.0f} MB, "
                  f"of which anonymous (not page cache) {private:.0f} MB", flush=True)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    d = tempfile.mkdtemp(prefix="index_scale_")
    try:
        ex_s, mb_s = index_throughput(d, 2_000 if args.quick else 50_000)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"indexing, one worker, real text (SciFact pairs, MiniLM tokenizer): {ex_s:,.0f} examples/s, "
          f"{mb_s:.1f} MB/s; 1.2B pairs at this rate: {1.2e9 / ex_s / 3600:,.0f} worker-hours", flush=True)
    n, mem, dt, private = (np.array(x, float) for x in zip(*rows))
    at = lambda y: np.polyval(np.polyfit(n, y, 1), 1.2e9)  # noqa: E731 (least-squares line at 1.2B)
    print(f"at 1.2B: anonymous memory per rank {at(private):.0f} MB; the rest is the shared, droppable page cache of "
          f"the index", flush=True)
    print(f"index_rss_per_rank_mb_at_1p2b={at(mem):.0f} plan_s_at_1p2b={at(dt):.1f}")


if __name__ == "__main__":
    main()
