"""The dense first stage at benchmark size: eval.py --index choices (FAISS index_factory strings) against exact search
(Flat) on the same queries: recall@k of the exact top-k, dense nDCG@10, the index's bytes per passage (FAISS's
serialized size; at 33M passages, MIRACL's English Wikipedia, that is what RAM holds), build and search time.

Real encodings: the demo checkpoint's SciFact test queries (300) against the dense vectors of a store of its 5,183
passages (by default the store without token vectors that bench/token_fidelity.py keeps, else encoded here). The corpus
is small, so IVF256 stands for ~4 sqrt(N) lists (272 here; 65,536 would suit 33M) and nprobe=64 scans ~1,200 passages,
about the depth of 1,000 asked for: recall@1000 then measures the probe, not the codes. Recall at 33M is not measured
here. Bytes per passage: the codes and ids do not depend on N (IVF's centroids, spread over N, shrink with it) and grow
with the dimension (XLM-R large: 1,024 dims, 2.7x the demo's 384).

    python bench/dense_index.py [--ckpt runs/demo/3_unified/final] [--store DIR]   # ~3 min after bash demo.sh
Last line: dense_index_recall100=<spec>:<f>,... (recall@100 of each spec against Flat, in --specs order).
"""
import argparse
import os
import time

import faiss
import numpy as np

from common import ROOT  # noqa: F401 (common puts the repository on sys.path)
from beir import load_beir, passage_text  # noqa: E402
from packed import encode_cached, model_loader  # noqa: E402
from search import build_index, run_metrics  # noqa: E402
from shards import encode_store  # noqa: E402
from store import open_store, store_meta  # noqa: E402

SPECS = ("Flat|", "HNSW32|efSearch=1024", "HNSW32,SQ8|efSearch=1024", "IVF256,SQ8|nprobe=64",
         "IVF256,PQ32|nprobe=64", "IVF256,PQ48x4fs,Refine(SQ8)|nprobe=64,k_factor_rf=4")  # spec|search parameters
KS, N33M = (10, 100, 1000), 33_000_000


def recall(top, exact, k):
    """Mean over queries of |top-k ∩ exact top-k| / k; (nq, >= k) ids each."""
    return float(np.mean([len(np.intersect1d(a[:k], b[:k])) / k for a, b in zip(top, exact)]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", default=os.path.join(ROOT, "runs", "demo", "3_unified", "final"))
    p.add_argument("--store", default=os.path.join(ROOT, "runs", "token_fidelity", "none"),
                   help="a store of SciFact test's passages at 256 tokens by --ckpt, any --tokens (else encoded "
                   "there)")
    p.add_argument("--specs", default=";".join(SPECS), help="';'-separated index_factory|search parameters")
    a = p.parse_args()
    data = os.path.join(ROOT, "data", "scifact")
    corpus, queries, qrels, _ = load_beir(data, "test")
    get_model, key, _ = model_loader(a.ckpt, need_key=True)
    texts = [passage_text(r) for r in corpus]
    meta = store_meta(key, texts, 256, False, "none")
    if os.path.exists(os.path.join(a.store, "meta.json")):  # any store of these passages by this model: its dense
        P = open_store(a.store, {k: meta[k] for k in ("model", "corpus", "max_length", "mcls")})
    else:
        P = encode_store(get_model, texts, a.store, meta, progress=True)
    Q = encode_cached(get_model, [r["text"] for r in queries], 64, 32, False,
                      os.path.join(os.path.dirname(a.store), "cache"), key)
    n, ids = len(texts), np.array([r["_id"] for r in corpus])
    k = min(max(KS), n)
    rels = [qrels[r["_id"]] for r in queries]
    print(f"{n} passages ({P['dense'].shape[1]}-d, {P['dense'].dtype}), {len(queries)} queries; bytes per passage "
          "from FAISS's serialized index; GB at 33M passages = that x 33M")
    w = max(len(x) for x in a.specs.split(";")) + 2  # the index column's width
    print(f"{'index':{w}s} {'B/passage':>9s} {'GB@33M':>7s} {'build s':>7s} {'ms/query':>8s} "
          + " ".join(f"{'R@' + str(x):>7s}" for x in KS) + f" {'nDCG@10':>8s}")
    exact, out = None, []
    for entry in a.specs.split(";"):
        spec, params = (entry.split("|") + [""])[:2]
        spec = spec.replace("IVF256", f"IVF{max(16, int(4 * np.sqrt(n)) // 16 * 16)}")  # ~4 sqrt(N) lists
        t0 = time.perf_counter()
        index = build_index(P["dense"], spec, params)
        t1 = time.perf_counter()
        top = index.search(np.ascontiguousarray(Q["dense"], np.float32), k)[1]  # (nq, k)
        t2 = time.perf_counter()
        exact = top if exact is None else exact  # the first spec is Flat: exact inner product
        size = faiss.serialize_index(index).nbytes / n
        ndcg = run_metrics([ids[t[t >= 0]] for t in top], rels, [None] * len(rels), k)[0]["nDCG@10"]
        rec = [recall(top, exact, x) for x in KS]
        out.append((entry.split("|")[0], rec[1]))
        print(f"{spec + ('|' + params if params else ''):{w}s} {size:9.0f} {size * N33M / 1e9:7.1f} {t1 - t0:7.1f} "
              f"{(t2 - t1) * 1e3 / len(queries):8.2f} " + " ".join(f"{r:7.4f}" for r in rec) + f" {ndcg:8.4f}")
    print("dense_index_recall100=" + ",".join(f"{s}:{r:.4f}" for s, r in out))


if __name__ == "__main__":
    main()
