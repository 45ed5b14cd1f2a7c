"""Disk, peak memory and time per query of eval.py --protocol paper at benchmark scale, for each way a store can hold
passage token vectors, on synthetic stores whose every byte is written (no model, no sparse file).

python bench/eval_scale.py [--n 1000000] [--queries 256] [--dir /tmp]   # writes up to ~25 GB, deleted at the end
python bench/eval_scale.py --quick                                       # seconds: the tests run it
Options (eval.py): encode, the store of `--colbert_from encode` (dense and sparse only; each query batch's MaxSim
candidates encoded when evaluated: here a fake encoder hands out stored random blocks and its time is not counted, the
model's cost is the passages encoded per query printed, times the encoder's rate); pq64, int8 and float16, token vectors
stored as `--tokens` says (codec.py). Every store holds N passages of the real shapes: dense 1024-d unit vectors
(float16, as eval.py writes them); sparse: 200 Zipf(1.0) draws over a 250,002-token vocabulary per passage (about 155
distinct ids), weights U(0.01, 0.3); the stored kinds --tokens token vectors per passage (200), random (pq: random codes
and codebooks), written whole. Where the free disk (less --reserve_gb) cannot hold a kind's token files, it gets fewer
tokens per passage, and its disk per passage is extrapolated to --tokens linearly (said; its MaxSim then reads fewer
rows than it would). The dense and sparse files are written once and hard-linked into each option's store.
A fresh process per option opens the store as eval.py does (store.open_store, every array memory-mapped; compact
tokens decoded for the rows read) and runs search.paper_rows with task miracl (dense and sparse top-1000 from the FAISS
Flat index and the impact-quantised inverted index, MaxSim over the dense top-200, all three over the dense top-100) for
--queries queries of 32 tokens (encodings in memory, dense searched in one batch). It reports the peak resident memory
(VmHWM, the 4 GB FAISS index included), the time per query (indices built; the five rows), the disk per passage (every
file of the store) and the token vectors MaxSim read per query. The files were just written: they come from the page
cache, not the disk (a cold read adds the disk's time for the rows read). Encoding and reading the corpus are not part
of it. Last line: eval_disk_kb_per_passage=<f> eval_rss_mb_1m=<f> ms_per_query_1m=<f> of the encode option (suffix 1m,
100k or the number).
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
import codec  # noqa: E402
import search  # noqa: E402
import store  # noqa: E402

V, P_DRAWS, Q_DRAWS, Q_TOK, SEED, CHUNK = 250_002, 200, 20, 32, 0, 1 << 15
OPTIONS = ("encode", "pq64", "int8", "float16")  # encode: the default paper-protocol path (the last line)


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


def write_base(path, n, nq, dim):
    """Dense, sparse files of n passages and the queries' encodings (queries.npz) in path -> their meta.json records."""
    os.makedirs(path)
    rng = np.random.default_rng(SEED)
    qp, qi, qw = zipf_csr(rng, nq, Q_DRAWS)
    np.savez(os.path.join(path, "queries.npz"), dense=unit(rng.standard_normal((nq, dim), dtype=np.float32)),
             sp_ptr=qp, sp_ids=qi.astype(np.int64), sp_w=qw, cb_ptr=np.arange(nq + 1) * Q_TOK,
             cb_vecs=unit(rng.standard_normal((nq * Q_TOK, dim), dtype=np.float32)))
    dense = (unit(np.random.default_rng([SEED, 1, a]).standard_normal((min(CHUNK, n - a), dim), dtype=np.float32))
             for a in range(0, n, CHUNK))
    files = {"dense.npy": store.write_npy(os.path.join(path, "dense.npy"), (n, dim), store.DTYPES["dense"], dense)}
    parts = [zipf_csr(np.random.default_rng([SEED, 2, a]), min(CHUNK, n - a), P_DRAWS) for a in range(0, n, CHUNK)]
    base = np.cumsum([0] + [p[0][-1] for p in parts])
    files["sp_ptr.npy"] = store.write_npy(os.path.join(path, "sp_ptr.npy"), (n + 1,), np.int64,
                                          [np.zeros(1, np.int64)] + [p[0][1:] + b for p, b in zip(parts, base)])
    for k, name in ((1, "sp_ids.npy"), (2, "sp_w.npy")):
        files[name] = store.write_npy(os.path.join(path, name), (base[-1],), parts[0][k].dtype, [p[k] for p in parts])
    return files, int(base[-1])


def token_array(key, rows, width, seed):
    """Random values for one token array of a store (codec.ARRAYS' key) of `rows` token vectors; width: its columns
    (D, or M for pq's codes). Each array is drawn on its own: a synthetic store's arrays need not agree."""
    rng = np.random.default_rng([SEED, 3, seed])
    if key == "cb_vecs":
        return unit(rng.standard_normal((rows, width), dtype=np.float32)).astype(np.float16)
    if key in ("cb_q", "cb_codes"):
        return rng.integers(*((-127, 128) if key == "cb_q" else (0, codec.SUB)), (rows, width),
                            dtype=store.DTYPES[key])
    if key == "cb_scale":
        return rng.uniform(0.05, 0.15, rows).astype(np.float32)
    return rng.integers(0, codec.COARSE, rows, dtype=np.uint16)  # cb_coarse


def write_option(path, base, base_files, n, nnz, dim, tokens, t):
    """The store of option tokens in path: the dense and sparse files of folder base hard-linked (base_files: their
    records), t token vectors per passage written (codebooks for pq), meta.json as shards.merge writes it -> its
    bytes."""
    os.makedirs(path)
    files = dict(base_files)
    for f in base_files:
        os.link(os.path.join(base, f), os.path.join(path, f))
    meta = dict(format=store.FORMAT, model="synthetic", corpus=f"synthetic seed {SEED}", n=n, max_length=t + 1,
                mcls=False, hidden=dim, nnz=nnz, dense_vectors=np.dtype(store.DTYPES["dense"]).name,
                token_vectors="none" if tokens == "encode" else tokens)
    if tokens != "encode":
        files["offsets.npy"] = store.write_npy(os.path.join(path, "offsets.npy"), (n + 1,), np.int64,
                                               [np.arange(n + 1) * t])
        step = max(1, CHUNK // t)  # passages a chunk
        for key in codec.ARRAYS[codec.kind(tokens)]:
            width = int(tokens[2:]) if key == "cb_codes" else dim
            gen = (token_array(key, min(step, n - a) * t, width, a) for a in range(0, n, step))
            shape = (n * t, width) if key in ("cb_vecs", "cb_q", "cb_codes") else (n * t,)
            files[store.FILES[key]] = store.write_npy(os.path.join(path, store.FILES[key]), shape,
                                                      store.DTYPES[key], gen)
        if codec.kind(tokens) == "pq":
            M, rng = int(tokens[2:]), np.random.default_rng([SEED, 4])
            book = {"book_coarse": unit(rng.standard_normal((codec.COARSE, dim), dtype=np.float32)),
                    "book_sub": 0.05 * rng.standard_normal((M, codec.SUB, dim // M), dtype=np.float32)}
            for k, v in book.items():
                files[store.FILES[k]] = store.write_npy(os.path.join(path, store.FILES[k]), v.shape, np.float32, [v])
            meta["codebook"] = {k: list(v.shape) for k, v in book.items()}
        meta.update(dim=dim, tokens=n * t)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(dict(meta, files=files), f)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


class FakeEncoder:
    """--colbert_from encode without a model: a passage's token vectors are one of 64 stored random blocks of t x dim
    float16 (packed.TokenEncoder's output); counts the passages and the time spent, which the bench leaves out."""

    def __init__(self, t, dim):
        self.pool = unit(np.random.default_rng([SEED, 5]).standard_normal((64, t, dim), dtype=np.float32)).astype(
            np.float16)  # (64, t, dim)
        self.passages, self.seconds = 0, 0.0

    def __call__(self, ids):
        t0 = time.perf_counter()
        _, t, dim = self.pool.shape
        out = {"cb_ptr": np.arange(len(ids) + 1) * t, "cb_vecs": self.pool[np.asarray(ids) % 64].reshape(-1, dim)}
        self.passages += len(ids)
        self.seconds += time.perf_counter() - t0
        return out


def child(path, base, task, t):
    """In a fresh process: open the store, build the indices, run the paper protocol; one line of figures."""
    t0 = time.time()
    P = store.open_store(path)
    with np.load(os.path.join(base, "queries.npz")) as z:
        Q = {k: z[k] for k in z.files}
    indices = search.paper_indices(P)
    build_s, rss_built = time.time() - t0, rss_mb()
    encode = FakeEncoder(t, Q["cb_vecs"].shape[1]) if "cb_vecs" not in P else None
    t0 = time.perf_counter()
    search.paper_rows(Q, P, task, np.arange(len(P["sp_ptr"]) - 1), indices=indices, progress=False, encode=encode)
    ms = (time.perf_counter() - t0 - (encode.seconds if encode else 0)) * 1e3 / len(Q["dense"])
    print(json.dumps(dict(build_s=round(build_s, 1), rss_built_mb=round(rss_built), peak_rss_mb=round(rss_mb("VmHWM")),
                          ms_per_query=round(ms, 1),
                          encoded_per_query=encode.passages / len(Q["dense"]) if encode else 0)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="passages")
    p.add_argument("--queries", type=int, default=256, help="queries, searched as one batch as eval.py does")
    p.add_argument("--tokens", type=int, default=200, help="token vectors per passage")
    p.add_argument("--dim", type=int, default=1024, help="dense and token vector size")
    p.add_argument("--options", default=",".join(OPTIONS), help="comma-separated, of " + ", ".join(OPTIONS))
    p.add_argument("--task", default="miracl", choices=tuple(search.PAPER))
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the stores are written (and deleted)")
    p.add_argument("--reserve_gb", type=float, default=8, help="disk left free")
    p.add_argument("--quick", action="store_true", help="2,000 passages of 16 tokens x 64-d, 8 queries (tests)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.task, int(a.child[2]))
    if a.quick:
        a.n, a.queries, a.tokens, a.dim = 2000, 8, 16, 64
    options = [o.replace("pq64", "pq8") if a.quick else o for o in a.options.split(",")]  # 64 dims: pq8
    root = tempfile.mkdtemp(prefix="m3-eval-scale-", dir=a.dir)
    rows = {}
    try:
        t0, base = time.time(), os.path.join(root, "base")
        files, nnz = write_base(base, a.n, a.queries, a.dim)
        print(f"dense and sparse of {a.n} passages written in {time.time() - t0:.0f} s")
        for opt in options:
            per_token = {"encode": 0, "float16": 2 * a.dim, "int8": a.dim + 4}[opt] if opt[:2] != "pq" else \
                int(opt[2:]) + 2  # bytes a token vector costs
            free = shutil.disk_usage(root).free - a.reserve_gb * 2**30
            t = a.tokens if per_token == 0 else int(min(a.tokens, free // (a.n * per_token)))
            if per_token and t < 1:
                print(f"{opt}: skipped, the disk cannot hold one token vector per passage")
                continue
            path = os.path.join(root, opt)
            size = write_option(path, base, files, a.n, nnz, a.dim, opt, t)
            out = subprocess.run([sys.executable, __file__, "--child", path, base, str(t), "--task", a.task],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{opt}: the evaluation process failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            disk = size + (a.tokens - t) * a.n * per_token  # token files extrapolated to --tokens per passage
            rows[opt] = r | {"kb": disk / a.n / 1024}
            print(f"{opt:8s} disk {disk / a.n / 1024:9.3f} KB/passage ({per_token} B/token vector"
                  + (f"; {t} of {a.tokens} tokens written, the rest extrapolated" if t < a.tokens else "") + f"), "
                  f"indices {r['build_s']} s, {r['rss_built_mb']} MB; peak {r['peak_rss_mb']} MB; "
                  f"{r['ms_per_query']} ms/query" + (f", {r['encoded_per_query']:.0f} passages encoded per query "
                                                     "(not timed)" if opt == "encode" else ""))
            shutil.rmtree(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    suffix = {1_000_000: "1m", 100_000: "100k"}.get(a.n, str(a.n))
    d = rows["encode"] if "encode" in rows else next(iter(rows.values()))
    print(f"eval_disk_kb_per_passage={d['kb']:.3f} eval_rss_mb_{suffix}={d['peak_rss_mb']:.1f} "
          f"ms_per_query_{suffix}={d['ms_per_query']:.1f}")


if __name__ == "__main__":
    main()
