"""Peak memory and time per query of eval.py --protocol paper at benchmark scale, on a synthetic store (no model).

python bench/eval_scale.py [--n 100000 1000000] [--queries 256] [--dir /tmp]    # ~8 GB written at 1M, then deleted
python bench/eval_scale.py --quick                                               # seconds: the tests run it
For each N, a store.py store of N synthetic passages with the real shapes is written to disk: dense 1024-d unit
vectors (float32, 4 GB at 1M); sparse: 200 Zipf(1.0) draws over a 250,002-token vocabulary per passage (about 155
distinct ids), weights U(0.01, 0.3); 200 token vectors of 1024-d per passage (float16, offsets every 200). A fresh
process then opens it as eval.py does (store.open_store: every array memory-mapped) and runs search.paper_rows with
task miracl (dense and sparse top-1000 from the FAISS Flat index and the impact-quantised inverted index, MaxSim over
the dense top-200, all three heads over the dense top-100) for --queries queries of 32 tokens (query encodings in
memory; dense searched in one batch, as eval.py does: FAISS Flat's time per query falls with the batch). It reports
its peak resident memory (VmHWM: everything it allocated or mapped, the 4 GB FAISS index included), the index build
time and the wall time per query (indices built; the five rows of every query).
Not measured: tokens.npy has its full size (N x 200 x 1024 x 2 bytes: 410 GB at 1M) but is a sparse file: only the
token rows of the passages the queries rerank are written, with random unit vectors; every other row is a hole, never
read. To keep that to ~2.6 GB, the queries' dense vectors are --distinct (32) vectors repeated (their top-210 found by
numpy before the run); each query still reads its own 200 x 400 KB of token rows and has its own sparse and token
vectors. The rows read were just written, so they come from the page cache, not the disk: a cold read adds the disk's
time for 80 MB per query. Encoding (the model) and reading the corpus are not part of it. What the bench writes is
deleted when it ends, also on an error. Last line: eval_rss_mb_1m=<f> ms_per_query_1m=<f>, for the largest N run
(suffix 1m, 100k or the number).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import ROOT, rss_mb  # noqa: F401 (common puts the repository on sys.path)
import search  # noqa: E402
import store  # noqa: E402

V, P_DRAWS, Q_DRAWS, Q_TOK, SEED = 250_002, 200, 20, 32, 0


def unit(x):
    """Rows of x scaled to unit length."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def zipf_csr(rng, n, draws):
    """sp_ptr, sp_ids (int32), sp_w of n rows, each `draws` Zipf(1.0) token ids (duplicates merged), weights
    U(0.01, 0.3)."""
    cdf = np.cumsum(1.0 / np.arange(1, V + 1))
    ids = np.searchsorted(cdf / cdf[-1], rng.random((n, draws)))  # (n, draws) frequency ranks as token ids
    key = np.unique(np.arange(n)[:, None] * V + ids)  # sorted by row, then id; duplicates in a row merged
    row, tok = key // V, key % V
    return (np.concatenate([[0], np.cumsum(np.bincount(row, minlength=n))]), tok.astype(np.int32),
            rng.uniform(0.01, 0.3, len(tok)).astype(np.float32))


def write_synthetic(path, n, nq, distinct, tokens, dim, depth, chunk=1 << 15):
    """A store of n synthetic passages in path (see the docstring) and the queries' encodings (queries.npz): nq queries
    whose dense vectors repeat `distinct` ones; token rows written only for their dense top-depth. Returns the bytes
    of token rows written."""
    os.makedirs(path)
    rng = np.random.default_rng(SEED)
    Qd = unit(rng.standard_normal((distinct, dim), dtype=np.float32))  # (distinct, dim); query i has Qd[i % distinct]
    qp, qi, qw = zipf_csr(rng, nq, Q_DRAWS)
    np.savez(os.path.join(path, "queries.npz"), dense=Qd[np.arange(nq) % distinct], sp_ptr=qp,
             sp_ids=qi.astype(np.int64), sp_w=qw, cb_ptr=np.arange(nq + 1) * Q_TOK,
             cb_vecs=unit(rng.standard_normal((nq * Q_TOK, dim), dtype=np.float32)))
    top_s, top_i = np.full((distinct, 0), -np.inf, np.float32), np.zeros((distinct, 0), np.int64)

    def dense_chunks():  # the passages' dense vectors, keeping each query's running top-depth
        nonlocal top_s, top_i
        for a in range(0, n, chunk):
            x = unit(np.random.default_rng([SEED, 1, a]).standard_normal((min(chunk, n - a), dim), dtype=np.float32))
            ids = np.broadcast_to(np.arange(a, a + len(x)), (distinct, len(x)))
            s, i = np.concatenate([top_s, Qd @ x.T], 1), np.concatenate([top_i, ids], 1)
            keep = np.argsort(-s, axis=1)[:, :depth]
            top_s, top_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
            yield x
    files = {"dense.npy": store.write_npy(os.path.join(path, "dense.npy"), (n, dim), np.float32, dense_chunks())}
    parts = [zipf_csr(np.random.default_rng([SEED, 2, a]), min(chunk, n - a), P_DRAWS) for a in range(0, n, chunk)]
    base = np.cumsum([0] + [p[0][-1] for p in parts])
    files["sp_ptr.npy"] = store.write_npy(os.path.join(path, "sp_ptr.npy"), (n + 1,), np.int64,
                                          [np.zeros(1, np.int64)] + [p[0][1:] + b for p, b in zip(parts, base)])
    for k, name in ((1, "sp_ids.npy"), (2, "sp_w.npy")):
        files[name] = store.write_npy(os.path.join(path, name), (base[-1],), parts[0][k].dtype, [p[k] for p in parts])
    del parts
    files["offsets.npy"] = store.write_npy(os.path.join(path, "offsets.npy"), (n + 1,), np.int64,
                                           [np.arange(n + 1) * tokens])
    tok = np.lib.format.open_memmap(os.path.join(path, "tokens.npy"), "w+", np.float16, (n * tokens, dim))
    header = tok.offset
    del tok  # a sparse file of the full size; now the rerank candidates' rows, by plain writes
    cand = np.unique(top_i)
    with open(os.path.join(path, "tokens.npy"), "r+b") as f:
        for j in cand:
            f.seek(header + int(j) * tokens * dim * 2)
            f.write(unit(np.random.default_rng([SEED, 3, j]).standard_normal((tokens, dim))).astype(np.float16).data)
    st = os.stat(os.path.join(path, "tokens.npy"))  # recorded unhashed: open_store checks size and mtime, and
    files["tokens.npy"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": None}  # hashing the holes is no cost
    meta = dict(format=store.FORMAT, model="synthetic", corpus=f"synthetic seed {SEED}", n=n, max_length=tokens + 1,
                mcls=False, hidden=dim, dim=dim, nnz=int(base[-1]), tokens=n * tokens, files=files)  # a real open has
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return len(cand) * tokens * dim * 2


def child(path, task):
    """In a fresh process: open the store, build the indices, run the paper protocol; one line of figures."""
    t0 = time.time()
    P = store.open_store(path)
    with np.load(os.path.join(path, "queries.npz")) as z:
        Q = {k: z[k] for k in z.files}
    indices = search.paper_indices(P)
    build_s, rss_built = time.time() - t0, rss_mb()
    t0 = time.perf_counter()
    rows = search.paper_rows(Q, P, task, np.arange(len(P["sp_ptr"]) - 1), indices=indices, progress=False)
    ms = (time.perf_counter() - t0) * 1e3 / len(Q["dense"])
    written = np.mean([(s != 0).mean() for _, s in rows["multi-vector"]])  # a hole would score 0
    print(json.dumps(dict(build_s=round(build_s, 1), rss_built_mb=round(rss_built), peak_rss_mb=round(rss_mb("VmHWM")),
                          ms_per_query=round(ms, 1), mv_rows_written=float(written),
                          n_sparse_head=len(indices[0]["head"]))))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000], help="corpus sizes")
    p.add_argument("--queries", type=int, default=256, help="queries, searched as one batch as eval.py does")
    p.add_argument("--distinct", type=int, default=32, help="distinct dense query vectors (token rows written for "
                                                            "their top-210 only)")
    p.add_argument("--tokens", type=int, default=200, help="token vectors per passage")
    p.add_argument("--dim", type=int, default=1024, help="dense and token vector size")
    p.add_argument("--task", default="miracl", choices=tuple(search.PAPER))
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the synthetic store is written (and deleted)")
    p.add_argument("--quick", action="store_true", help="2,000 passages of 16 tokens x 64-d, 8 queries (tests)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.task)
    if a.quick:
        a.n, a.queries, a.distinct, a.tokens, a.dim = [2000], 8, 4, 16, 64
    depth = search.PAPER[a.task]["mv"] + 10  # a margin for the FAISS order at the boundary
    for n in a.n:
        path = tempfile.mkdtemp(prefix="m3-eval-scale-", dir=a.dir)
        try:
            shutil.rmtree(path)
            t0 = time.time()
            written = write_synthetic(path, n, a.queries, min(a.distinct, a.queries), a.tokens, a.dim, depth)
            gen_s = time.time() - t0
            out = subprocess.run([sys.executable, __file__, "--child", path, "--task", a.task], capture_output=True,
                                 text=True)
            if out.returncode:
                raise SystemExit(f"n={n}: the evaluation process failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"n={n} passages x {a.tokens} tokens x {a.dim}-d, {a.queries} queries, task {a.task}: written "
                  f"{gen_s:.0f} s (token rows written: {written / 2**20:.0f} MB of "
                  f"{n * a.tokens * a.dim * 2 / 2**20:.0f} MB); indices built in {r['build_s']} s, "
                  f"{r['rss_built_mb']} MB resident; peak {r['peak_rss_mb']} MB; {r['ms_per_query']} ms/query; "
                  f"reranked rows written {r['mv_rows_written']:.3f}; {r['n_sparse_head']} sparse head tokens")
        finally:
            shutil.rmtree(path, ignore_errors=True)
    suffix = {1_000_000: "1m", 100_000: "100k"}.get(n, str(n))
    print(f"eval_rss_mb_{suffix}={r['peak_rss_mb']:.1f} ms_per_query_{suffix}={r['ms_per_query']:.1f}")


if __name__ == "__main__":
    main()
