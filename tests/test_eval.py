"""eval.py and mine.py against brute force: FAISS vs numpy, inverted index vs dict overlap, token candidates + MaxSim vs
exhaustive MaxSim, metrics vs hand-computed values, fusion with exact scores, named fusion weights, mining ranks, the
encoding cache."""
import json
import os
import shutil
import zlib

import faiss
import numpy as np
import pytest
import torch

import eval as ev
import mine
import packed
import search
import store
from beir import load_beir, passage_text
from model import M3, colbert_score
from tiny import make_encoder, make_tokenizer, tiny_m3, unit


def rand_out(rng, n, D=16, V=40, max_nnz=8, max_len=7):
    """A random model.encode output: dense (n, D), sparse dicts (some empty), colbert (L_i, D), 1 <= L_i < max_len."""
    sparse = [dict(zip(rng.choice(V, k, replace=False).tolist(), rng.uniform(0.1, 1, k).tolist()))
              for k in rng.integers(0, max_nnz, n)]
    colbert = [unit(rng.standard_normal((L, D))) for L in rng.integers(1, max_len, n)]
    return {"dense": unit(rng.standard_normal((n, D))), "sparse": sparse, "colbert": colbert}


def brute(qo, po):
    """(3, nq, np) exact dense, sparse (dict overlap) and MaxSim scores, by the definitions."""
    d = qo["dense"] @ po["dense"].T
    s = np.array([[sum(w * p[t] for t, w in q.items() if t in p) for p in po["sparse"]] for q in qo["sparse"]])
    c = np.array([[(q @ p.T).max(1).mean() for p in po["colbert"]] for q in qo["colbert"]])
    return np.stack([d, s, c])


def test_dense_faiss_equals_numpy():
    rng = np.random.default_rng(0)
    P, Q = unit(rng.standard_normal((600, 24))), unit(rng.standard_normal((20, 24)))
    S = Q @ P.T
    ref = np.argsort(-S, axis=1)[:, :10]
    assert np.diff(np.sort(S, 1)[:, -11:]).min() > 1e-5  # no near-ties: the fp32 top-10 order is defined
    for spec, params in [("Flat", ""), ("IVF4,Flat", "nprobe=4")]:  # all 4 lists probed -> exact
        scores, idx = search.build_index(P, spec, params).search(Q, 10)
        np.testing.assert_array_equal(idx, ref)
        np.testing.assert_allclose(scores, np.take_along_axis(S, ref, 1), rtol=1e-5, atol=1e-5)


def test_an_index_from_float16_on_disk_in_chunks_equals_one_from_memory(tmp_path):
    rng = np.random.default_rng(5)
    x = unit(rng.standard_normal((2000, 32))).astype(np.float16)  # a store's dense.npy
    np.save(tmp_path / "dense.npy", x)
    mapped = np.load(tmp_path / "dense.npy", mmap_mode="r")
    Q = unit(rng.standard_normal((30, 32))).astype(np.float32)
    for spec, params in [("IVF8,PQ8x4fs", "nprobe=3"), ("IVF8,PQ8x4fs,RFlat", "nprobe=3,k_factor_rf=4")]:
        disk = search.build_index(mapped, spec, params, chunk=256)  # trained on a sample, filled 256 rows at a time
        mem = search.build_index(x.astype(np.float32), spec, params)  # the same rows, in memory, one add
        assert faiss.extract_index_ivf(disk).nprobe == 3  # the parameters reach the IVF inside a refine index
        assert "RFlat" not in spec or faiss.downcast_index(disk).k_factor == 4
        d, m = disk.search(Q, 50), mem.search(Q, 50)
        np.testing.assert_array_equal(d[1], m[1], err_msg=spec)
        np.testing.assert_array_equal(d[0], m[0], err_msg=spec)


def test_sparse_index_equals_dict_overlap():
    rng = np.random.default_rng(1)
    qo, po = rand_out(rng, 12), rand_out(rng, 90)
    Q, P = packed.pack(qo), packed.pack(po)
    S = brute(qo, po)[1]
    rows = np.arange(3, 12)  # a batch that does not start at query 0
    top = np.sort(S[rows], 1)[:, ::-1]
    assert ((top[:, 4] - top[:, 5] > 1e-4) | (top[:, 4] == 0)).all()  # no near-tie at k=5: top-5 sets are defined
    for head_df, n_head in ((None, 40), (10 ** 6, 0), (1, 40), (15, None)):  # default, postings, matmul only, mixed
        inv = search.sparse_index(P, head_df)
        assert n_head is None and 0 < len(inv["head"]) < 40 or len(inv["head"]) == n_head
        for k in (5, 200):
            for r, top in zip(rows, search.sparse_search(inv, Q, rows, k)):
                pos = np.flatnonzero(S[r] > 0)
                want = pos[np.argsort(-S[r, pos])][:k]
                assert set(top.tolist()) == set(want.tolist())
    for i in range(12):
        np.testing.assert_allclose(search.sparse_pairs(Q, i, P, np.arange(90)), S[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(search.sparse_pairs(Q, i, P, np.array([7, 3, 7])), S[i, [7, 3, 7]], rtol=1e-5,
                                   atol=1e-6)


def test_colbert_candidates_and_maxsim_equal_exhaustive(capsys):
    rng = np.random.default_rng(2)
    qo, po = rand_out(rng, 10), rand_out(rng, 50)
    Q, P = packed.pack(qo), packed.pack(po)
    C = brute(qo, po)[2]
    n_tok = len(P["cb_vecs"])
    for k in (n_tok, 0):  # candidate depth covers the corpus (0 = all passages) -> exhaustive MaxSim
        res = search.retrieve(Q, P, depth=50, colbert_k=k, use=(False, False, True), qbatch=4)
        for i, (cand, s, src) in enumerate(res):
            np.testing.assert_array_equal(cand, np.arange(50))
            np.testing.assert_allclose(s[2], C[i], rtol=1e-5, atol=1e-6)
    k = 3  # small k': candidates = passages owning one of each query token's 3 nearest passage tokens
    tok2doc = np.repeat(np.arange(50), np.diff(P["cb_ptr"]))
    for i, (cand, s, src) in enumerate(search.retrieve(Q, P, depth=50, colbert_k=k, use=(False, False, True),
                                                       qbatch=3)):
        sim = qo["colbert"][i] @ P["cb_vecs"].T
        near = np.argsort(-sim, axis=1)[:, :k]
        assert (-np.diff(np.sort(sim, 1)[:, ::-1][:, k - 1:k + 1])).min() > 1e-5  # no near-tie at the k boundary
        np.testing.assert_array_equal(cand, np.unique(tok2doc[near]))
        np.testing.assert_allclose(s[2], C[i, cand], rtol=1e-5, atol=1e-6)
    S = brute(qo, po)  # colbert_k None (--tune_on's rerank): dense and sparse candidates, all three scored exactly
    for i, (cand, s, src) in enumerate(search.retrieve(Q, P, depth=6, colbert_k=None, qbatch=4)):
        ranked = -np.sort(-S[:2, i], 1)  # (2, 50) dense and sparse scores, best first
        assert ((ranked[:, 5] - ranked[:, 6] > 1e-6) | (ranked[:, 5] == 0)).all()  # no near-tie at the depth
        sparse_top = np.argsort(-S[1, i])[:6]
        sparse_top = sparse_top[S[1, i, sparse_top] > 0]  # passages sharing no token are not sparse candidates
        np.testing.assert_array_equal(cand, np.union1d(np.argsort(-S[0, i])[:6], sparse_top))
        np.testing.assert_allclose(s, S[:, i, cand], rtol=1e-5, atol=1e-6)
        assert not src[2].any() and src[:2].any(0).all()
    assert "retrieve" in capsys.readouterr().err  # the progress bar past one batch of queries; none when told
    quiet = search.retrieve(Q, P, depth=6, colbert_k=None, qbatch=4, progress=False)
    assert "retrieve" not in capsys.readouterr().err
    loud = search.retrieve(Q, P, depth=6, colbert_k=None)
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(quiet, loud))
    for cand in (rng.permutation(50), np.array([40, 2, 2, 17]), np.arange(0, 50, 3), np.arange(1, 50, 4)):
        for mt in (5, 40, 1 << 16):  # chunking, order, duplicates, dense (span) and sparse (gather) chunks
            np.testing.assert_allclose(search.maxsim(Q, 0, P, cand, max_tokens=mt), C[0, cand], rtol=1e-5, atol=1e-6)


def test_metrics_hand_computed():
    rels = {"a": 2, "b": 1, "c": 0, "x": 1}  # graded; "x" is not in the corpus but still relevant
    m = search.query_metrics(["c", "b", "d", "a"], rels, depth=1000)
    dcg = 1 / np.log2(3) + 2 / np.log2(5)  # b at rank 2, a at rank 4
    idcg = 2 + 1 / np.log2(3) + 1 / np.log2(4)  # ideal order 2, 1, 1
    assert m["nDCG@10"] == pytest.approx(dcg / idcg)
    assert m["MRR@10"] == pytest.approx(0.5)
    assert m["Recall@100"] == pytest.approx(2 / 3) and m["Recall@1000"] == pytest.approx(2 / 3)
    assert "Recall@1000" not in search.query_metrics(["a"], rels, depth=100)
    late = search.query_metrics([f"n{i}" for i in range(10)] + ["a"], rels, depth=100)  # first hit at rank 11
    assert late["MRR@10"] == 0 and late["nDCG@10"] == 0 and late["Recall@100"] == pytest.approx(1 / 3)
    perfect = search.query_metrics(["a", "b", "x"], rels, depth=100)
    assert perfect["nDCG@10"] == pytest.approx(1.0) and perfect["MRR@10"] == 1.0


def test_ties_break_by_doc_id():
    ids = np.array(["d", "b", "c", "a", "10", "9"])
    tie = np.argsort(np.argsort(ids, kind="stable"))
    cand = np.arange(6)
    s = np.array([[1, 1, 2, 1, 1, 1], [0] * 6, [0] * 6], np.float32)
    src = np.ones((3, 6), bool)
    (top, f), = search.fuse([(cand, s, src)], (1, 0, 0), depth=6, tie=tie)
    assert ids[top].tolist() == ["c", "10", "9", "a", "b", "d"]  # score desc, then id in string order
    np.testing.assert_array_equal(f, [2, 1, 1, 1, 1, 1])


def test_fusion_uses_exact_scores_of_missed_passages():
    rng = np.random.default_rng(3)
    qo, po = rand_out(rng, 8), rand_out(rng, 60)
    Q, P = packed.pack(qo), packed.pack(po)
    S = brute(qo, po)
    w = np.array([1, 0.3, 1], np.float32)
    tie = np.arange(60)
    missed = 0
    for i, (cand, s, src) in enumerate(search.retrieve(Q, P, depth=3, colbert_k=2)):
        np.testing.assert_allclose(s, S[:, i, cand], rtol=1e-5, atol=1e-6)  # every head, every candidate
        missed += ((~src[1]) & (s[1] > 0)).sum()  # found by another head, sparse score still exact and non-zero
        assert src[0].sum() == 3 and src[1].sum() <= 3
    assert missed > 0
    full = search.retrieve(Q, P, depth=60, colbert_k=1000)  # lists cover the corpus -> fused = brute-force ranking
    for i, (top, f) in enumerate(search.fuse(full, w, 10, tie)):
        F = np.tensordot(w, S[:, i], 1)
        want = np.lexsort((tie, -F))[:10]
        assert -np.diff(F[np.lexsort((tie, -F))[:11]]).min() > 1e-5  # no near-ties: the fp32 top-10 order is defined
        np.testing.assert_array_equal(top, want)
        np.testing.assert_allclose(f, F[want], rtol=1e-5, atol=1e-5)


V, D = 97, 16
E = unit(np.random.default_rng(9).standard_normal((V, D)))


class FakeM3:
    """Deterministic bag-of-words stand-in for M3.encode: ids = crc32(word) % V, one fixed vector per id."""

    def __init__(self):
        self.calls = 0

    def state_dict(self):
        return {"E": torch.from_numpy(E)}

    def encode(self, texts, batch_size=32, max_length=512, mcls=False, progress=None):
        self.calls += 1
        toks = [[zlib.crc32(w.encode()) % V for w in t.lower().split()][:max_length] or [0] for t in texts]
        return {"dense": unit(np.stack([E[t].sum(0) + 0.1 for t in toks])),
                "sparse": [{int(i): 0.1 + 0.05 * (i % 7) for i in t} for t in toks],
                "colbert": [unit(E[t] + 0.05) for t in toks]}


WORDS = "cell protein gene cancer risk mice human data model query dense sparse vector study dose liver".split()


def write_beir(root, rng, n_docs=40, n_q=6):
    """Tiny BEIR dir with langs, graded qrels, one qrels query missing from queries and one doc missing from corpus."""
    os.makedirs(os.path.join(root, "qrels"))
    docs = [{"_id": f"d{j}", "title": "T" if j % 3 else "", "text": " ".join(rng.choice(WORDS, 6)),
             "lang": "en"} for j in range(n_docs)]
    qs = [{"_id": f"q{i}", "text": " ".join(rng.choice(WORDS, 3)), "lang": "en" if i % 2 else "de"} for i in range(n_q)]
    for name, recs in (("corpus", docs), ("queries", qs)):
        with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    rows = [(f"q{i}", f"d{j}", int(rng.integers(1, 3))) for i in range(n_q) for j in rng.choice(n_docs, 2, False)]
    rows += [("q0", "d_missing", 1), ("q_missing", "d1", 1)]
    with open(os.path.join(root, "qrels", "test.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{r}\n" for q, d, r in rows))
    return docs, qs, rows


def test_evaluate_matches_brute_force_and_caches(tmp_path):
    rng = np.random.default_rng(4)
    data = str(tmp_path / "data")
    docs, qs, rows = write_beir(data, rng)
    m = FakeM3()
    kw = dict(depth=1000, colbert_k=1000, cache_dir=str(tmp_path / "cache"), verbose=False)
    res = ev.evaluate(m, data, out_dir=str(tmp_path / "out"), **kw)
    assert m.calls == 2 and res["missing_qrels_ids"] == {"queries": 1, "docs": 1}
    assert json.load(open(tmp_path / "out" / "metrics.json"))["rows"] == res["rows"]
    again = ev.evaluate(m, data, weights=(1, 1, 0), **kw)  # other weights: nothing re-encoded
    assert m.calls == 2 and again["rows"]["dense"] == res["rows"]["dense"]
    ev.evaluate(m, data, passage_max_len=3, **kw)
    assert m.calls == 3  # another max length is another cache entry (passages only)
    with open(os.path.join(data, "corpus.jsonl"), "w") as f:  # same size, one text changed
        f.writelines(json.dumps({**r, "text": r["text"].upper()} if j == 5 else r) + "\n" for j, r in enumerate(docs))
    ev.evaluate(m, data, **kw)
    assert m.calls == 4
    m.pooling = "mean"  # same weights, other pooling: another model
    ev.evaluate(m, data, **kw)
    assert m.calls == 6
    qo, po = m.encode([q["text"] for q in qs]), m.encode([passage_text(r) for r in docs])
    S = brute(qo, po)
    ids = np.array([r["_id"] for r in docs])
    qrels = {}
    for q, d, r in rows:
        qrels.setdefault(q, {})[d] = r
    for name, w in (("dense", (1, 0, 0)), ("all", (1, 0.3, 1))):
        F = np.tensordot(np.array(w, np.float32), S, 1)
        assert np.diff(np.sort(F, 1)).min() > 1e-5  # no near-ties anywhere: the fp32 rankings are defined
        ranked = [ids[np.lexsort((ids, -F[i]))] for i in range(len(qs))]
        want = [search.query_metrics(r, qrels[q["_id"]], 1000) for r, q in zip(ranked, qs)]
        for k in search.METRICS:
            assert res["rows"][name][k] == pytest.approx(np.mean([x[k] for x in want]), abs=1e-6)
        de = [x["nDCG@10"] for x, q in zip(want, qs) if q["lang"] == "de"]
        assert res["per_lang"]["de"][name]["nDCG@10"] == pytest.approx(np.mean(de), abs=1e-6)
    fused = search.fuse(search.retrieve(packed.pack(qo), packed.pack(po)), (0, 1, 0), 1000, np.arange(40))
    sparse_only = [ids[c] for c, _ in fused]
    assert all(len(r) == (S[1, i] > 0).sum() for i, r in enumerate(sparse_only))  # sparse lists skip zero overlap


def reciprocal_rank(s, w, k=60):
    """Reciprocal rank fusion of the candidates: sum_h w_h / (k + rank by head h), ranks from 1; s (3, n) -> (n,)."""
    ranks = np.argsort(np.argsort(-s, axis=1, kind="stable"), axis=1, kind="stable") + 1  # (3, n)
    return (np.asarray(w, np.float64)[:, None] / (k + ranks)).sum(0)


def test_a_new_fusion_row_is_one_entry_in_search_rows(tmp_path, monkeypatch):
    monkeypatch.setitem(search.ROWS, "rrf", ((1, 1, 1), reciprocal_rank))  # the whole edit
    data = str(tmp_path / "data")
    write_beir(data, np.random.default_rng(12))
    m = FakeM3()
    res = ev.evaluate(m, data, depth=100, colbert_k=1000, verbose=False)
    corpus, queries, qrels, _ = load_beir(data, "test")  # brute force: every candidate ranked by its RRF score
    P = packed.pack(m.encode([passage_text(r) for r in corpus], max_length=512))
    Q = packed.pack(m.encode([r["text"] for r in queries], max_length=64))
    ids = np.array([r["_id"] for r in corpus])
    tie = np.argsort(np.argsort(ids, kind="stable"))
    ranked = []
    for cand, s, _ in search.retrieve(Q, P, depth=100, colbert_k=1000):
        f = reciprocal_rank(s, (1, 1, 1))
        ranked.append(ids[cand[np.lexsort((tie[cand], -f))][:100]])
    want = search.run_metrics(ranked, [qrels[r["_id"]] for r in queries], [r["lang"] for r in queries], 100)[0]
    assert res["rows"]["rrf"] == want and res["rows"]["rrf"] != res["rows"]["all"]
    assert set(res["per_lang"]["de"]) == set(search.ROWS)  # the per-language table has the new column too
    cfg = dict(first=20, mv=8, all=10)  # the paper protocol: the new row reranks the all row's candidates
    rows = search.paper_rows(Q, store.as_stored(P), dict(cfg, fusion=search.FUSION["m3"]), tie, progress=False)
    for (c, f), (c_all, _) in zip(rows["rrf"], rows["all"]):
        assert sorted(c) == sorted(c_all) and (np.diff(f) <= 0).all()
    assert ev.evaluate(m, data, protocol="paper", verbose=False)["rows"].keys() == search.ROWS.keys()


def test_named_fusion_weights_equal_explicit_weights(tmp_path):
    data = str(tmp_path / "data")
    write_beir(data, np.random.default_rng(12))
    m = FakeM3()
    kw = dict(depth=100, colbert_k=1000, verbose=False)
    res = ev.evaluate(m, data, weights="mldr", out_dir=str(tmp_path / "out"), **kw)
    corpus, queries, qrels, _ = load_beir(data, "test")  # expected: retrieve + fuse + run_metrics, SPEC 6.2's MLDR
    P = packed.pack(m.encode([passage_text(r) for r in corpus], max_length=512))
    Q = packed.pack(m.encode([r["text"] for r in queries], max_length=64))
    ids = np.array([r["_id"] for r in corpus])
    results = search.retrieve(Q, P, depth=100, colbert_k=1000)
    for row, w in (("dense+sparse", (0.2, 0.8, 0)), ("all", (0.15, 0.5, 0.35))):
        ranked = [ids[c] for c, _ in search.fuse(results, w, 100, np.argsort(np.argsort(ids, kind="stable")))]
        rels, langs = [qrels[r["_id"]] for r in queries], [r["lang"] for r in queries]
        mean, by_lang, per_q = search.run_metrics(ranked, rels, langs, 100)
        assert res["rows"][row] == mean and res["per_lang"]["de"][row] == by_lang["de"]
        assert res["per_query_ndcg10"][row] == per_q and res["per_query_ndcg10"]["query_ids"] == [r["_id"] for r in
                                                                                                   queries]
        assert np.mean(per_q) == pytest.approx(mean["nDCG@10"], abs=1e-5)  # the mean of the per-query figures
    saved = json.load(open(tmp_path / "out" / "metrics.json"))
    assert saved["weights"] == res["weights"] == [0.15, 0.5, 0.35] and saved["fusion"] == res["fusion"] == "mldr"
    m3 = ev.evaluate(m, data, **kw)  # the default: the training ensemble's weights (SPEC 1.4)
    assert m3["fusion"] == "m3" and m3["rows"]["dense+sparse"] != res["rows"]["dense+sparse"]
    numbers = ev.evaluate(m, data, weights=(1, 0.3, 1), **kw)  # 3 numbers: dense+sparse row (w_d, w_s, 0), no name
    assert numbers["rows"] == m3["rows"] and "fusion" not in numbers and numbers["weights"] == m3["weights"]
    from train import Config
    c = Config()
    assert search.FUSION["m3"] == {"dense+sparse": (c.ens_dense, c.ens_sparse, 0),
                                   "all": (c.ens_dense, c.ens_sparse, c.ens_colbert)}
    assert search.FUSION["miracl"] == search.FUSION["mkqa"] == search.FUSION["m3"]
    passages = [passage_text(r) for r in corpus]
    named, explicit = (mine.mine(m, [r["text"] for r in queries], [[0]] * len(queries), passages, lo=1, hi=30, n_neg=4,
                                 weights=w, scores=True, colbert_k=1000) for w in ("mldr", (0.15, 0.5, 0.35)))
    assert named == explicit


def add_split(root, rng, name, n_q, first=0, n_docs=40):
    """Queries t<first>..t<first+n_q-1> appended to root's queries.jsonl and their qrels as split name."""
    with open(os.path.join(root, "queries.jsonl"), "a") as f:
        f.writelines(json.dumps({"_id": f"t{i}", "text": " ".join(rng.choice(WORDS, 3))}) + "\n"
                     for i in range(first, first + n_q))
    with open(os.path.join(root, "qrels", f"{name}.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\n" + "".join(f"t{i}\td{j}\t1\n" for i in range(first, first + n_q)
                                                        for j in rng.choice(n_docs, 3, False)))


def test_tune_on_chooses_the_grid_weights_best_on_the_other_split(tmp_path):
    rng = np.random.default_rng(21)
    data = str(tmp_path / "data")
    docs, _, _ = write_beir(data, rng)
    add_split(data, rng, "train", 12)
    m, kw = FakeM3(), dict(depth=1000, colbert_k=1000, verbose=False, cache_dir=str(tmp_path / "cache"))
    res = ev.evaluate(m, data, tune_on="train", out_dir=str(tmp_path / "out"), **kw)
    assert res["tuned"]["split"] == "train" and m.calls == 3  # passages encoded once, queries once per split
    uncached = FakeM3()  # no cache: the passages are handed to the tuning pass
    again = ev.evaluate(uncached, data, tune_on="train", **{**kw, "cache_dir": None})
    assert (again["rows"], again["tuned"], uncached.calls) == (res["rows"], res["tuned"], 3)
    _, queries, qrels, _ = load_beir(data, "train")  # brute force on the train queries: every grid point's nDCG@10
    S = brute(m.encode([r["text"] for r in queries]), m.encode([passage_text(r) for r in docs]))
    ids = np.array([r["_id"] for r in docs])

    def ndcg(w):
        F = np.tensordot(np.array(w, np.float32), S, 1)  # (queries, docs)
        for f, q in zip(F, queries):  # no relevant doc of the top 11 within 1e-6 of another doc: fp32 sums in any
            rel = np.isin(ids, list(qrels[q["_id"]]))  # order (another CPU's) give this same nDCG@10
            top = rel & np.isin(np.arange(len(f)), np.lexsort((ids, -f))[:11])
            assert not top.any() or np.abs(f[top][:, None] - f[~rel][None]).min() > 1e-6
        return np.mean([search.query_metrics(ids[np.lexsort((ids, -f))], qrels[q["_id"]], 1000)["nDCG@10"]
                        for f, q in zip(F, queries)])
    for row, ok in (("dense+sparse", lambda w: w[0] and w[1] and not w[2]), ("all", lambda w: all(w))):
        grid = [w for w in ev.SWEEP if ok(w)]
        got, scores = res["tuned"][row], [ndcg(w) for w in grid]
        i = grid.index(tuple(got))
        assert scores[i] >= max(scores) - 1e-6 and all(x < scores[i] + 1e-6 for x in scores[:i])  # first best
        assert res["tuned"]["nDCG@10"][row] == pytest.approx(scores[i], abs=1e-6)
        fixed = ev.evaluate(m, data, weights=got, **kw)  # the test rows with those weights given by hand
        assert res["rows"]["tuned " + ("d+s" if row == "dense+sparse" else "all")] == fixed["rows"][row]
    assert len(set(map(tuple, (res["tuned"]["all"], (1, 0.3, 1))))) == 2  # this data chooses other weights than m3's
    assert {k: res["rows"][k] for k in ev.ROWS} == ev.evaluate(m, data, **kw)["rows"]  # the paper rows unchanged
    assert json.load(open(tmp_path / "out" / "metrics.json"))["tuned"] == res["tuned"]


def test_tune_on_never_tunes_on_the_evaluated_queries(tmp_path, capsys):
    rng = np.random.default_rng(22)
    data = str(tmp_path / "data")
    write_beir(data, rng)
    add_split(data, rng, "train", 4)
    m = FakeM3()
    for kw, msg in ((dict(tune_on="test"), "tune_on: test is the evaluated split"),
                    (dict(tune_on="dev"), r"tune_on: .*no qrels/dev.tsv \(splits there: \['test.tsv', 'train.tsv'\]\)"),
                    (dict(tune_on="train", protocol="paper"), "tune_on: the paper protocol")):
        with pytest.raises(ValueError, match=msg):
            ev.evaluate(m, data, verbose=False, **kw)
    with open(os.path.join(data, "qrels", "train.tsv"), "a") as f:
        f.write("q3\td5\t1\n")  # a test query among the tuning queries
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"tune_on: 1 queries of split train are also evaluated \(e.g. id 'q3'"):
        ev.evaluate(m, data, tune_on="train", out_dir=str(out), verbose=False)
    assert not out.exists() and m.calls == 0  # nothing written, nothing encoded
    with open(os.path.join(data, "qrels", "empty.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\nt0\td1\t0\n")  # a tuning split with no relevant passage
    with pytest.raises(ValueError, match=r"qrels/empty.tsv: no query to evaluate: none of its 1 queries"):
        ev.evaluate(m, data, tune_on="empty", out_dir=str(out), verbose=False)
    assert not out.exists() and m.calls == 0
    nope = str(tmp_path / "no_such_ckpt")  # the command line: before the checkpoint is looked at
    for extra, msg in ((["--tune_on", "test"], "--tune_on: test is the evaluated split"),
                       (["--tune_on", "train", "--split", "train"], "--tune_on: train is the evaluated split"),
                       (["--tune_on", "dev"], "--tune_on: " + data + ": no qrels/dev.tsv"),
                       (["--tune_on", "train", "--protocol", "paper"], "--tune_on: the paper protocol")):
        with pytest.raises(SystemExit):
            ev.main(["--ckpt", nope, "--data", data] + extra)
        assert msg in capsys.readouterr().err.splitlines()[-1]


def test_mine_range_positives_scores(tmp_path):
    rng = np.random.default_rng(5)
    passages = list(dict.fromkeys(" ".join(rng.choice(WORDS, 5)) for _ in range(80)))
    passages.append(passages[0])  # a duplicate of a positive's text must never be a negative
    queries = [" ".join(rng.choice(WORDS, 3)) for _ in range(6)]
    positives = [[0, 5], [1], [2, 3], [4], [6], [7]]
    w = (1, 0.3, 1)
    m = FakeM3()
    mined = mine.mine(m, queries, positives, passages, lo=3, hi=20, n_neg=5, weights=w, scores=True, colbert_k=10 ** 4)
    S = np.tensordot(np.array(w, np.float32), brute(m.encode(queries), m.encode(passages)), 1)
    for i, rec in enumerate(mined):
        ranking = np.lexsort((np.arange(len(passages)), -S[i]))
        assert S[i, ranking[2]] - S[i, ranking[3]] > 1e-4 and S[i, ranking[19]] - S[i, ranking[20]] > 1e-4  # lo, hi
        rank_of = {passages[j]: r for r, j in reversed(list(enumerate(ranking)))}  # best rank of each text
        pos_text = {passages[j] for j in positives[i]}
        assert len(rec["neg"]) == 5 and len(set(rec["neg"])) == 5
        assert not set(rec["neg"]) & pos_text and rec["pos"] == [passages[j] for j in positives[i]]
        assert all(3 <= rank_of[t] < 20 for t in rec["neg"])
        np.testing.assert_allclose(rec["neg_scores"], [S[i, passages.index(t)] for t in rec["neg"]], rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(rec["pos_scores"], S[i, positives[i]], rtol=1e-5, atol=1e-5)
    again = mine.mine(m, queries, positives, passages, lo=3, hi=20, n_neg=5, weights=w, colbert_k=10 ** 4)
    assert [r["neg"] for r in again] == [r["neg"] for r in mined]  # seeded
    every = mine.mine(m, queries, positives, passages, lo=0, hi=len(passages), n_neg=1000, weights=w, colbert_k=10 ** 4)
    for i, rec in enumerate(every):  # the whole ranking in range: all but positives, their duplicates and the query
        pos_text = {passages[j] for j in positives[i]}
        assert sorted(rec["neg"]) == sorted(t for t in passages if t not in pos_text and t != queries[i])


def test_missing_files_and_heads_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus.jsonl"):
        load_beir(str(tmp_path), "test")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "sparse_linear.pt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="colbert_linear.pt"):
        packed.ckpt_key(str(ckpt))


def test_cli_on_a_tiny_checkpoint_scores_like_model_py(tmp_path):
    m = tiny_m3()
    m.save_pretrained(str(tmp_path / "ck"))
    data = str(tmp_path / "data")
    docs, qs, _ = write_beir(data, np.random.default_rng(6), n_docs=25, n_q=4)
    out = str(tmp_path / "out")
    res = ev.main(["--ckpt", str(tmp_path / "ck"), "--data", data, "--out", out, "--depth", "100",
                   "--cache_dir", str(tmp_path / "cache"), "--weights", "1,0.3,1"])
    assert json.load(open(os.path.join(out, "metrics.json")))["rows"] == res["rows"]
    assert set(res["rows"]) == {"dense", "sparse", "multi-vector", "dense+sparse", "all"}
    assert "Recall@1000" not in res["rows"]["all"] and res["missing_qrels_ids"] == {"queries": 1, "docs": 1}
    qo = m.encode([q["text"] for q in qs], max_length=64)
    po = m.encode([passage_text(r) for r in docs], max_length=512)
    assert sum(len(d) for d in po["sparse"]) > 0
    Q, P = packed.pack(qo), packed.pack(po)
    for i, (cand, s, src) in enumerate(search.retrieve(Q, P, depth=25, colbert_k=1000)):
        assert len(cand) == 25
        np.testing.assert_allclose(s[0], po["dense"] @ qo["dense"][i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s[1], [sum(w * p.get(t, 0) for t, w in qo["sparse"][i].items())
                                          for p in po["sparse"]], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s[2], [colbert_score(qo["colbert"][i], p) for p in po["colbert"]], rtol=1e-5,
                                   atol=1e-5)
    add_split(data, np.random.default_rng(7), "train", 5, n_docs=25)  # --tune_on: the same as from Python
    argv = ["--ckpt", str(tmp_path / "ck"), "--data", data, "--depth", "100", "--cache_dir", str(tmp_path / "cache")]
    tuned = ev.main(argv + ["--tune_on", "train", "--out", str(tmp_path / "tuned")])
    assert tuned["tuned"] == ev.evaluate(str(tmp_path / "ck"), data, tune_on="train", depth=100, verbose=False)["tuned"]
    assert {k: v for k, v in tuned["rows"].items() if "tuned" not in k} == res["rows"] and "tuned all" in tuned["rows"]
    mined = str(tmp_path / "mined.jsonl")
    mine.main(["--ckpt", str(tmp_path / "ck"), "--data", data, "--split", "test", "--range", "2-10",
               "--n_neg", "3", "--out", mined, "--scores", "--cache_dir", ""])
    recs = [json.loads(line) for line in open(mined)]
    assert len(recs) == 4 and all(len(r["neg"]) == 3 and len(r["neg_scores"]) == 3 for r in recs)
    mine.main(["--ckpt", str(tmp_path / "ck"), "--jsonl", mined, "--range", "0-5", "--n_neg", "2",
               "--out", str(tmp_path / "again.jsonl"), "--cache_dir", ""])
    again = [json.loads(line) for line in open(tmp_path / "again.jsonl")]
    assert [r["pos"] for r in again] == [r["pos"] for r in recs] and "neg_scores" not in again[0]
    assert all(not set(r["neg"]) & set(r["pos"]) for r in again)
    os.remove(tmp_path / "ck" / "colbert_linear.pt")
    with pytest.raises(FileNotFoundError, match="colbert_linear.pt"):
        ev.main(["--ckpt", str(tmp_path / "ck"), "--data", data, "--cache_dir", ""])


def test_cli_zero_shot_bare_encoder_with_new_heads_and_pooling(tmp_path):
    tok = make_tokenizer("bert")
    enc = make_encoder(tok, "bert")
    enc.save_pretrained(tmp_path / "bare")
    tok.save_pretrained(tmp_path / "bare")
    data = str(tmp_path / "data")
    write_beir(data, np.random.default_rng(2), n_docs=20, n_q=5)
    with pytest.raises(FileNotFoundError, match="new_heads"):
        ev.main(["--ckpt", str(tmp_path / "bare"), "--data", data, "--cache_dir", ""])
    res = ev.main(["--ckpt", str(tmp_path / "bare"), "--new_heads", "--pooling", "mean", "--data", data,
                   "--cache_dir", "", "--out", str(tmp_path / "out"), "--depth", "100"])
    torch.manual_seed(0)
    loaded = M3.from_pretrained(str(tmp_path / "bare"), new_heads=True, pooling="mean")
    ref = ev.evaluate(loaded, data, depth=100, verbose=False)
    assert res["rows"] == ref["rows"]  # the CLI loads exactly the seeded mean-pooling model
    assert res["ckpt"].startswith(str(tmp_path / "bare"))  # and records it
    assert res["ckpt_key"] == packed.model_key(loaded)
    cls = ev.main(["--ckpt", str(tmp_path / "bare"), "--new_heads", "--data", data, "--cache_dir", "", "--depth", "100",
                   "--out", str(tmp_path / "out_cls")])
    assert cls["rows"]["dense"] != res["rows"]["dense"]  # pooling really changed


def variant(root, name, file, text):
    """A copy of the BEIR dir root/good with one file's content replaced by text."""
    d = os.path.join(root, name)
    shutil.copytree(os.path.join(root, "good"), d)
    with open(os.path.join(d, file), "w") as f:
        f.write(text)
    return d


def test_beir_input_errors_name_file_line_and_field(tmp_path):
    docs, qs, _ = write_beir(str(tmp_path / "good"), np.random.default_rng(7), n_docs=10, n_q=3)
    corpus, queries = ([json.dumps(r) + "\n" for r in recs] for recs in (docs, qs))
    qrels = open(tmp_path / "good" / "qrels" / "test.tsv").read().splitlines(keepends=True)
    line = lambda lines, i, text: "".join(lines[:i - 1] + [text + "\n"] + lines[i:])  # replace 1-based line i
    cases = [  # (file, content, error): line numbers are 1-based physical lines, blank ones included
        ("corpus.jsonl", "\n" + "".join(corpus) + json.dumps({**docs[3], "text": "x"}) + "\n",
         rf"corpus.jsonl, line {len(docs) + 2}: field '_id': duplicate id 'd3' \(first at line 5\)"),
        ("queries.jsonl", "".join(queries) + json.dumps({"_id": "q1", "text": "y"}) + "\n",
         rf"queries.jsonl, line {len(qs) + 1}: field '_id': duplicate id 'q1' \(first at line 2\)"),
        ("corpus.jsonl", line(corpus, 3, '{"_id": "d2", "text": '), "corpus.jsonl, line 3: invalid JSON"),
        ("corpus.jsonl", line(corpus, 2, '{"_id": "d1", "title": "T"}'), "corpus.jsonl, line 2: field 'text': missing"),
        ("corpus.jsonl", line(corpus, 1, '{"_id": 0, "text": "a"}'), "corpus.jsonl, line 1: field '_id': expected"),
        ("queries.jsonl", line(queries, 2, '{"text": "q"}'), "queries.jsonl, line 2: field '_id': missing"),
        ("queries.jsonl", line(queries, 3, '{"_id": "q2", "text": null}'), "queries.jsonl, line 3: field 'text'"),
        ("queries.jsonl", line(queries, 1, '["q0", "text"]'), "queries.jsonl, line 1: expected a JSON object"),
        ("qrels/test.tsv", line(qrels, 3, "q1\td2"), "test.tsv, line 3:"),
        ("qrels/test.tsv", line(qrels, 2, "q0\td1\t0.5"), "test.tsv, line 2:"),
        ("qrels/test.tsv", line(qrels, 4, "query-id\tcorpus-id\tscore"), "test.tsv, line 4:"),  # a 2nd header
        ("qrels/test.tsv", line(qrels, 5, "q1\t\t1"), "test.tsv, line 5:"),
    ]
    for n, (file, text, error) in enumerate(cases):
        with pytest.raises(ValueError, match=error):
            load_beir(variant(tmp_path, f"bad{n}", file, text), "test")
    # legal: no header, blank lines anywhere -> the same data as the good dir
    same = variant(tmp_path, "same", "qrels/test.tsv", "\n" + "".join(qrels[1:3]) + "\n" + "".join(qrels[3:]) + "\n\n")
    assert load_beir(same, "test") == load_beir(str(tmp_path / "good"), "test")


def test_qrels_without_a_usable_query_fail_before_model_and_encoding(tmp_path):
    write_beir(str(tmp_path / "good"), np.random.default_rng(8), n_docs=10, n_q=3)
    head = "query-id\tcorpus-id\tscore\n"
    cases = {"unknown": (head + "".join(f"x{i}\td{i}\t1\n" for i in range(4)), r"0 of 4 query ids in qrels are in "),
             "zero": (head + "q0\td1\t0\nq1\td2\t-1\nx\td3\t1\n", r"relevance > 0"),
             "empty": (head, r"no rows")}
    for name, (text, why) in cases.items():
        data = variant(tmp_path, name, "qrels/test.tsv", text)
        m = FakeM3()
        with pytest.raises(ValueError, match=r"test.tsv: .*" + why):
            ev.evaluate(m, data, verbose=False)
        assert m.calls == 0
    nope = str(tmp_path / "no_such_ckpt")  # the data are checked before any model is loaded
    for main, argv in ((ev.main, []), (mine.main, ["--split", "test", "--out", str(tmp_path / "m.jsonl")])):
        with pytest.raises(ValueError, match="0 of 4 query ids"):
            main(argv + ["--ckpt", nope, "--new_heads", "--data", str(tmp_path / "unknown"), "--cache_dir", ""])


def test_metrics_json_records_the_checkpoint_and_never_replaces_another(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_m3(seed=0).save_pretrained("runs/a/final")
    tiny_m3(seed=1).save_pretrained("runs/b/final")
    write_beir("data", np.random.default_rng(6), n_docs=12, n_q=3)
    cli = ["--data", "data", "--depth", "100", "--cache_dir", ""]
    for run in ("a", "b"):  # same folder name 'final': distinct default out dirs, each recording its checkpoint
        res = ev.main(["--ckpt", f"runs/{run}/final"] + cli)
        saved = json.load(open(f"runs/eval/{run}_final-data-test/metrics.json"))
        assert saved == json.loads(json.dumps(res))
        assert (saved["ckpt"], saved["ckpt_abspath"]) == (f"runs/{run}/final", str(tmp_path / "runs" / run / "final"))
        assert saved["ckpt_key"] == packed.ckpt_key(f"runs/{run}/final")
    assert ev.default_out("BAAI/bge-m3", "data/", "dev") == os.path.join("runs", "eval", "BAAI_bge-m3-data-dev")
    a_dir = "runs/eval/a_final-data-test"
    before = open(f"{a_dir}/metrics.json").read()
    monkeypatch.setattr(ev, "encode_cached", lambda *a, **k: pytest.fail("encoded before refusing"))
    with pytest.raises(FileExistsError, match=rf"{a_dir}.*runs/a/final.*runs/b/final.*--out"):
        ev.main(["--ckpt", "runs/b/final", "--out", a_dir] + cli)
    with pytest.raises(FileExistsError, match="runs/b/final"):
        ev.evaluate("runs/b/final", "data", out_dir=a_dir, verbose=False)
    assert open(f"{a_dir}/metrics.json").read() == before
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    again = ev.main(["--ckpt", "runs/a/final", "--weights", "1,1,1"] + cli)  # the same checkpoint replaces its own
    assert json.load(open(f"{a_dir}/metrics.json"))["weights"] == again["weights"] == [1, 1, 1]
    tiny_m3(seed=2).save_pretrained("runs/a/final")  # retrained in place: the same run, its metrics are replaced
    assert ev.main(["--ckpt", "runs/a/final"] + cli)["ckpt_key"] == packed.ckpt_key("runs/a/final") != again["ckpt_key"]
    ev.main(["--ckpt", "runs/b/final", "--out", a_dir, "--overwrite"] + cli)  # on purpose
    assert json.load(open(f"{a_dir}/metrics.json"))["ckpt_key"] == packed.ckpt_key("runs/b/final")
    m = FakeM3()  # in memory: the weights' hash is the identity
    res = ev.evaluate(m, "data", out_dir="mem", verbose=False)
    assert (res["ckpt"], res["ckpt_key"]) == ("<in-memory model>", packed.model_key(m))
    ev.evaluate(m, "data", out_dir="mem", verbose=False)
    m.pooling = "mean"
    with pytest.raises(FileExistsError, match="mem"):
        ev.evaluate(m, "data", out_dir="mem", verbose=False)
    before = open("mem/metrics.json").read()

    def crash(obj, fp=None, **kw):  # a crash while writing: half a file, then an error
        if fp is not None:
            fp.write('{"rows": ')
        raise OSError("disk full")
    monkeypatch.setattr(json, "dump", crash)
    monkeypatch.setattr(json, "dumps", crash)
    with pytest.raises(OSError, match="disk full"):
        ev.evaluate(FakeM3(), "data", out_dir="mem", verbose=False)
    monkeypatch.undo()
    assert open(tmp_path / "mem" / "metrics.json").read() == before and os.listdir(tmp_path / "mem") == ["metrics.json"]


class NoisyTokens(FakeM3):
    """FakeM3 whose token vectors also depend on the text: a word's tokens in two passages do not tie."""

    def encode(self, texts, **kw):
        out = super().encode(texts, **kw)
        rngs = [np.random.default_rng(zlib.crc32(t.encode())) for t in texts]
        out["colbert"] = [unit(v + 0.3 * g.standard_normal(v.shape)) for v, g in zip(out["colbert"], rngs)]
        return out


def test_mine_passes_index_options_and_exhaustive_ivf_equals_flat(tmp_path, monkeypatch):
    rng = np.random.default_rng(10)
    passages = list(dict.fromkeys(" ".join(rng.choice(WORDS, 6)) for _ in range(60)))
    queries = [" ".join(rng.choice(WORDS, 3)) for _ in range(5)]
    positives = [[i] for i in range(5)]
    m = NoisyTokens()
    P, Q = packed.pack(m.encode(passages)), packed.pack(m.encode(queries))
    kw = dict(lo=2, hi=12, n_neg=4, scores=True, colbert_k=3, weights=(1, 0.3, 1))
    # no near-ties at the dense top-hi and token top-colbert_k boundaries: IVF and Flat find the same candidates
    top = np.sort(Q["dense"] @ P["dense"].T, 1)[:, ::-1]
    assert (top[:, kw["hi"] - 1] - top[:, kw["hi"]]).min() > 1e-4
    tok = np.sort(Q["cb_vecs"] @ P["cb_vecs"].T, 1)[:, ::-1]
    assert (tok[:, kw["colbert_k"] - 1] - tok[:, kw["colbert_k"]]).min() > 1e-5
    flat = mine.mine(m, queries, positives, passages, **kw)
    calls, build = [], search.build_index
    monkeypatch.setattr(search, "build_index", lambda x, spec="Flat", params="": calls.append((spec, params)) or
                        build(x, spec, params))
    ivf = mine.mine(m, queries, positives, passages, index="IVF4,Flat", index_params="nprobe=4",
                  colbert_index="IVF4,Flat", **kw)  # all 4 lists probed: exact
    assert calls == [("IVF4,Flat", "nprobe=4")] * 2  # dense, then passage tokens
    assert [r["neg"] for r in ivf] == [r["neg"] for r in flat]
    for a, b in zip(ivf, flat):
        np.testing.assert_allclose(a["neg_scores"], b["neg_scores"], rtol=1e-5, atol=1e-6)
    tiny_m3().save_pretrained(str(tmp_path / "ck"))
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"query": q, "pos": [passages[p[0]]]}) + "\n" for q, p in zip(queries, positives))
    with open(tmp_path / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in passages)
    calls.clear()
    mine.main(["--ckpt", str(tmp_path / "ck"), "--jsonl", str(tmp_path / "train.jsonl"), "--corpus",
               str(tmp_path / "corpus.jsonl"), "--out", str(tmp_path / "mined.jsonl"), "--cache_dir", "", "--index",
               "IVF4,Flat", "--index_params", "nprobe=4", "--colbert_index", "IVF2,Flat", "--range", "0-4"])
    assert calls == [("IVF4,Flat", "nprobe=4"), ("IVF2,Flat", "nprobe=4")]


def test_bad_options_fail_early_naming_the_option(tmp_path, capsys):
    data = str(tmp_path / "data")
    write_beir(data, np.random.default_rng(11), n_docs=10, n_q=3)
    nope = str(tmp_path / "no_such_ckpt")  # option errors come before the checkpoint is even looked at
    M = mine.main, ["--ckpt", nope, "--data", data, "--split", "test", "--out", str(tmp_path / "m.jsonl")]
    E = ev.main, ["--ckpt", nope, "--data", data]
    cases = [(E, "--weights", "1,0.3"), (E, "--weights", "1,a,1"), (E, "--weights", "0,0,0"), (E, "--weights", "mlrd"),
             (M, "--weights", "1,nan,1"), (M, "--weights", "M3"), (E, "--depth", "0"), (E, "--colbert_k", "-1"),
             (M, "--batch_size", "0"), (E, "--query_max_len", "1"), (M, "--passage_max_len", "0"),
             (M, "--range", "10"), (M, "--range", "100-10"), (M, "--range", "a-b"), (M, "--n_neg", "0")]
    for (main, argv), opt, value in cases:
        with pytest.raises(SystemExit):
            main(argv + [opt, value])
        err = capsys.readouterr().err.splitlines()[-1]  # the error line, not the usage
        assert opt in err and (f"got {value}" in err or f"got {value!r}" in err), err
    os.remove(os.path.join(data, "queries.jsonl"))
    for main, argv in (E, M):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err.splitlines()[-1]
        assert "--data" in err and "queries.jsonl" in err and "corpus" not in err, err
    with pytest.raises(SystemExit):
        ev.main(["--ckpt", nope, "--data", str(tmp_path / "nowhere")])
    assert "--data" in (err := capsys.readouterr().err.splitlines()[-1]) and "nowhere: no such dir" in err
    a_file = str(tmp_path / "a_file")
    open(a_file, "w").close()
    for extra, msg in ((["--out", a_file], f"--out {a_file} is a file, not a folder"),
                       (["--out", "/proc/self/ev"], "--out /proc/self/ev: cannot write in /proc/self"),
                       (["--store", a_file], f"--store {a_file} is a file, not a folder"),
                       (["--index_params", "nprobe=8"], "--index_params nprobe=8: search parameters of a non-Flat"),
                       (["--langs", "ar,,bn"], "--langs 'ar,,bn': an empty language name")):
        with pytest.raises(SystemExit):  # outputs and meaningless options: before the checkpoint is looked at
            ev.main(E[1] + extra)
        assert msg in capsys.readouterr().err.splitlines()[-1]
    jsonl = str(tmp_path / "train.jsonl")
    with open(jsonl, "w") as f:
        f.write(json.dumps({"query": "q", "pos": ["p"]}) + "\n")
    corpus = str(tmp_path / "corpus.jsonl")
    with open(corpus, "w") as f:
        f.write(json.dumps({"text": "p"}) + "\n")
    for extra in (["--out", jsonl], ["--corpus", corpus, "--out", corpus]):  # mined output over its own input
        with pytest.raises(SystemExit):
            mine.main(["--ckpt", nope, "--jsonl", jsonl] + extra)
        assert "--out" in (err := capsys.readouterr().err.splitlines()[-1]) and extra[-1] in err, err
    with open(jsonl, "a") as f:  # a training record without its positives: named, not a KeyError
        f.write(json.dumps({"query": "q2", "neg": ["n"]}) + "\n")
    with pytest.raises(ValueError, match="train.jsonl, line 2: field 'pos': missing"):
        mine.main(["--ckpt", nope, "--jsonl", jsonl, "--corpus", corpus, "--out", str(tmp_path / "m.jsonl")])
    with open(jsonl, "w") as f:
        f.write(json.dumps({"query": "q", "pos": ["p"]}) + "\n")
    with open(corpus, "a") as f:
        f.write(json.dumps({"title": "t"}) + "\n")
    with pytest.raises(ValueError, match="corpus.jsonl, line 2: field 'text': missing"):
        mine.main(["--ckpt", nope, "--jsonl", jsonl, "--corpus", corpus, "--out", str(tmp_path / "m.jsonl")])
    write_beir(str(tmp_path / "d2"), np.random.default_rng(11), n_docs=10, n_q=3)
    m = FakeM3()  # from Python: ValueError before any encoding
    for kw, opt in ((dict(weights=(1, 0.3)), "weights"), (dict(weights=(1, "x", 1)), "weights"),
                    (dict(depth=0), "depth"), (dict(colbert_k=-2), "colbert_k"), (dict(batch_size=0), "batch_size")):
        with pytest.raises(ValueError, match=opt):
            ev.evaluate(m, str(tmp_path / "d2"), verbose=False, **kw)
    for kw, opt in ((dict(weights=(1, 1)), "weights"), (dict(lo=10, hi=5), "range"), (dict(lo=-1, hi=5), "range"),
                    (dict(n_neg=0), "n_neg"), (dict(query_max_len=1), "query_max_len")):
        with pytest.raises(ValueError, match=opt):
            mine.mine(m, ["q"], [[0]], ["p", "r"], **kw)
    assert m.calls == 0


def test_checkpoints_and_bare_encoders_are_encoded_on_the_gpu_when_there_is_one(tmp_path, monkeypatch):
    tiny_m3().save_pretrained(str(tmp_path / "ck"))
    moved = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the loaders can tell
    monkeypatch.setattr(M3, "to", lambda self, *a, **kw: moved.append(a) or self)
    get_model, _, _ = packed.model_loader(str(tmp_path / "ck"), need_key=False)
    get_model()
    p = ev.cli_parser("", split="test")  # --new_heads / --pooling: loaded in memory by cli_setup
    a = p.parse_args(["--ckpt", str(tmp_path / "ck"), "--pooling", "mean"])
    load, _ = ev.cli_setup(p, a, None)
    load()
    assert moved == [("cuda",), ("cuda",)]
