"""Per-query retrieval latency of eval.py's heads on synthetic vectors (no encoder), 100k passages.

dense: 1024-d normalised vectors, FAISS IndexFlatIP, all queries in one search call (as search.retrieve), top-100.
sparse: ~100 non-zeros per passage, ~20 per query, token ids Zipf(1.0)-distributed over a 250k vocabulary (the common
  ids are in almost every passage, as stop-word pieces are), search.sparse_search in query batches of 64, top-100.
colbert_rerank100: exact MaxSim (search.maxsim) of a 32-token query against 100 candidates of 64 tokens x 128-d
  (a reduced colbert_dim: 1024-d token vectors for 100k passages would not fit in 24 GB).
fuse: what fusion adds on top of the three lists: exact dense and sparse scores of every candidate in the union of the
  dense and sparse top-100 (MaxSim of those candidates costs what colbert_rerank100 costs per 100), then search.fuse's
  weighted sum and ranking.
Last line: dense_ms=<f> sparse_ms=<f> colbert_rerank100_ms=<f> fuse_ms=<f> (per query, wall clock).
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import search  # noqa: E402

N, NQ, D, V = 100_000, 256, 1024, 250_002  # passages, queries, dense dim, vocab
P_NNZ, Q_NNZ, P_TOK, Q_TOK, CD, K = 125, 20, 64, 32, 128, 100  # sparse draws, colbert tokens/dim, depth
rng = np.random.default_rng(0)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def zipf_csr(n, draws):
    """CSR of n rows with `draws` Zipf(1.0) token ids each (duplicates merged), weights U(0.01, 0.3)."""
    cdf = np.cumsum(1.0 / np.arange(1, V + 1))
    ids = np.searchsorted(cdf / cdf[-1], rng.random((n, draws)))  # (n, draws) ranks as token ids
    key = np.unique(np.arange(n)[:, None] * V + ids)  # sorted by row, then id; duplicates in a row merged
    row, tok = key // V, key % V
    return dict(sp_ptr=np.concatenate([[0], np.cumsum(np.bincount(row, minlength=n))]), sp_ids=tok,
                sp_w=rng.uniform(0.01, 0.3, len(tok)).astype(np.float32))


def vectors(n, d):
    """(n, d) float32 unit vectors, generated in chunks to keep the peak memory at the output size."""
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 1 << 18):
        out[s:s + (1 << 18)] = unit(rng.standard_normal((min(1 << 18, n - s), d), dtype=np.float32))
    return out


t0 = time.time()
P = dict(dense=vectors(N, D), **zipf_csr(N, P_NNZ), cb_ptr=np.arange(N + 1) * P_TOK, cb_vecs=vectors(N * P_TOK, CD))
Q = dict(dense=vectors(NQ, D), **zipf_csr(NQ, Q_NNZ), cb_ptr=np.arange(NQ + 1) * Q_TOK, cb_vecs=vectors(NQ * Q_TOK, CD))
print(f"data: {N} passages, sparse nnz/passage {np.diff(P['sp_ptr']).mean():.1f}, nnz/query "
      f"{np.diff(Q['sp_ptr']).mean():.1f}, colbert {P['cb_vecs'].shape} ({P['cb_vecs'].nbytes / 2**30:.1f} GiB), "
      f"{time.time() - t0:.0f} s")

t0 = time.time()
index, inv = search.build_index(P["dense"]), search.sparse_index(P)
print(f"build: flat index + inverted index {time.time() - t0:.1f} s")
index.search(Q["dense"][:8], K)  # warm-up
t0 = time.perf_counter()
dense_top = index.search(Q["dense"], K)[1]  # (NQ, K)
dense_ms = (time.perf_counter() - t0) * 1e3 / NQ

sparse_top = []
search.sparse_search(inv, Q, np.arange(8), K)
t0 = time.perf_counter()
for a in range(0, NQ, 64):
    sparse_top += search.sparse_search(inv, Q, np.arange(a, min(a + 64, NQ)), K)
sparse_ms = (time.perf_counter() - t0) * 1e3 / NQ

search.maxsim(Q, 0, P, dense_top[0])
t0 = time.perf_counter()
for i in range(NQ):
    search.maxsim(Q, i, P, dense_top[i])  # 100 candidates x 64 tokens
colbert_ms = (time.perf_counter() - t0) * 1e3 / NQ

t0 = time.perf_counter()
results = []
for i in range(NQ):
    lists = [dense_top[i], sparse_top[i]]
    cand = np.unique(np.concatenate(lists))
    s = np.stack([search.dense_pairs(Q, i, P, cand), search.sparse_pairs(Q, i, P, cand),
                  np.zeros(len(cand), np.float32)])
    results.append((cand, s, np.stack([np.isin(cand, l) for l in lists] + [np.zeros(len(cand), bool)])))
search.fuse(results, (1, 0.3, 1), K, np.arange(N))
fuse_ms = (time.perf_counter() - t0) * 1e3 / NQ
print(f"union of dense+sparse top-{K}: {np.mean([len(r[0]) for r in results]):.0f} candidates per query; "
      f"targets dense <= 10, sparse <= 10, colbert_rerank100 <= 20 ms")
print(f"dense_ms={dense_ms:.2f} sparse_ms={sparse_ms:.2f} colbert_rerank100_ms={colbert_ms:.2f} fuse_ms={fuse_ms:.2f}")
