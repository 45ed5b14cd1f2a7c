"""Evaluate an M3 checkpoint on BEIR-layout data with all three heads and their fusion (SPEC.md 6); mine.py mines.

python eval.py --ckpt DIR --data DIR [--split test] [--weights m3|mldr|1,0.3,1] [--sweep] [--index Flat]
python eval.py --ckpt minilm --new_heads --pooling mean --data data/scifact     # a bare encoder, zero-shot (dense row)
Each head retrieves on its own (dense: FAISS; sparse: exact inverted index; multi-vector: FAISS over passage tokens,
then exact MaxSim). Every candidate of the union then gets the exact score of every head, so fusion never fills in 0
for a passage that one head missed. Ranking ties everywhere: score descending, then doc id ascending (string order).
Packed encodings (see pack): dense (N, D), sparse as CSR rows (sp_ptr, sp_ids, sp_w), colbert as (cb_ptr, cb_vecs).
"""
import argparse
import json
import os
import sys
import time

import faiss
import numpy as np
from tqdm import tqdm

from checkpoints import check_out, default_out, write_atomic
from dashboard import eval_to_tensorboard
from data import data_error, load_beir, passage_text, read_jsonl  # noqa: F401 (read_jsonl: mine.py, bench)
from model import ckpt_key, encode_cached, inference_device, model_key, model_loader, pack  # noqa: F401 (tests)
from st_layout import prompts as st_prompts

METRICS = ("nDCG@10", "MRR@10", "Recall@100", "Recall@1000")
# --weights by name: (dense+sparse row, all-three row), each (w_dense, w_sparse, w_colbert), from SPEC 6.2 (the paper's
# footnotes and the reference's MKQA/MLDR scripts). "m3" equals train.Config's ens_dense/ens_sparse/ens_colbert:
# the ensemble that self-distillation trains towards (SPEC 1.4), also the MKQA and MIRACL weights.
FUSION = {"m3": ((1, 0.3, 0), (1, 0.3, 1)), "mldr": ((0.2, 0.8, 0), (0.15, 0.5, 0.35))}
FUSION["miracl"] = FUSION["mkqa"] = FUSION["m3"]

# ----------------------------------------------------------------------------- command line and evaluate


def main(argv=None):
    """The command line above; `python eval.py mine ...` is `python mine.py ...`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["mine"]:
        import mine
        return mine.main(argv[1:])
    p = cli_parser(__doc__, split="test")
    p.add_argument("--depth", type=int, default=1000, help="candidates per head and ranking depth")
    p.add_argument("--mcls", action="store_true", help="MCLS for long passages (SPEC 5.3)")
    p.add_argument("--sweep", action="store_true", help="also score a small grid of fusion weights")
    p.add_argument("--max_corpus", type=int, help="quick runs: relevant docs + the first N others")
    p.add_argument("--out", help="dir for metrics.json, never another checkpoint's (default runs/eval/<ckpt>-"
                                 "<data>-<split>, <ckpt>: the checkpoint path's last two folders, e.g. a_final)")
    p.add_argument("--overwrite", action="store_true", help="replace --out's metrics.json of another checkpoint")
    a = p.parse_args(argv)
    model, kw = cli_setup(p, a, a.data, depth=a.depth)
    if not a.data:
        p.error("--data is required")
    res = evaluate(model, a.data, a.split, a.weights, a.depth, mcls=a.mcls, max_corpus=a.max_corpus, sweep=a.sweep,
                   out_dir=a.out or default_out(a.ckpt, a.data, a.split), overwrite=a.overwrite, **kw)
    folder = eval_to_tensorboard(a.ckpt, res, a.data, a.split)  # the run's dashboard, if it reports to TensorBoard
    if folder:
        print(f"and its rows to TensorBoard in {folder}")
    return res


def evaluate(model, data_dir, split="test", weights="m3", depth=1000, index="Flat", index_params="",
             colbert_index="Flat", colbert_k=64, query_max_len=64, passage_max_len=512, batch_size=32, mcls=False,
             cache_dir=None, max_corpus=None, sweep=False, out_dir=None, overwrite=False, verbose=True,
             query_prefix="", passage_prefix=""):
    """Rows dense / sparse / multi-vector / dense+sparse / all (SPEC 6.2) on a BEIR split; model: M3, checkpoint or a
    function returning an M3; weights: a FUSION name or 3 numbers. out_dir/metrics.json records the checkpoint and
    replaces another's only on overwrite. mcls applies to passages only (long documents, SPEC 5.3). The prefixes go
    before every query / passage, as training's Config.query_prefix / passage_prefix."""
    error = option_error(weights, depth=depth, colbert_k=colbert_k, batch_size=batch_size, query_max_len=query_max_len,
                         passage_max_len=passage_max_len)
    if error:
        raise ValueError(error)
    t0 = time.time()
    corpus, queries, qrels, missing = load_beir(data_dir, split, max_corpus)
    get_model, key, ckpt = model_loader(model, need_key=bool(cache_dir or out_dir))
    if out_dir and not overwrite:  # before encoding: never replace another checkpoint's metrics
        check_out(out_dir, ckpt)
    P = encode_cached(get_model, [passage_prefix + passage_text(r) for r in corpus], passage_max_len, batch_size, mcls,
                      cache_dir, key)
    Q = encode_cached(get_model, [query_prefix + r["text"] for r in queries], query_max_len, batch_size, False,
                      cache_dir, key)
    t1 = time.time()
    ids = np.array([r["_id"] for r in corpus])
    tie = np.argsort(np.argsort(ids, kind="stable"))  # (N,) rank of each doc id in string order
    results = retrieve(Q, P, depth, index, index_params, colbert_index, colbert_k)
    qrels_list, langs = [qrels[r["_id"]] for r in queries], [r.get("lang") for r in queries]
    name, w_ds, w_all = fusion_weights(weights)

    def score(w):
        return run_metrics([ids[c] for c, _ in fuse(results, w, depth, tie)], qrels_list, langs, depth)
    rows = {"dense": (1, 0, 0), "sparse": (0, 1, 0), "multi-vector": (0, 0, 1), "dense+sparse": w_ds, "all": w_all}
    scored = {row: score(w) for row, w in rows.items()}  # row -> (mean metrics, {lang: mean metrics})
    res = dict(rows={k: v[0] for k, v in scored.items()}, **ckpt, weights=list(w_all), n_queries=len(queries),
               n_corpus=len(corpus), missing_qrels_ids=missing, split=split, data=os.path.abspath(data_dir),
               depth=depth, index=index, colbert_index=colbert_index, colbert_k=colbert_k, query_max_len=query_max_len,
               passage_max_len=passage_max_len, mcls=mcls, query_prefix=query_prefix, passage_prefix=passage_prefix)
    if name:
        res["fusion"] = name
    if any(l is not None for l in langs):
        res["per_lang"] = {l: {k: v[1][l] for k, v in scored.items()} for l in scored["all"][1]}
    if sweep:  # weights are scale-free, so a small grid around the m3 weights covers the useful ratios
        grid = [(d, s, c) for d in (0, 0.5, 1) for s in (0, 0.1, 0.3, 0.5, 1) for c in (0, 0.5, 1) if d or s or c]
        res["sweep"] = sorted(({"weights": list(w), **score(w)[0]} for w in tqdm(grid, desc="sweep")),
                              key=lambda r: -r["nDCG@10"])
    res["time_s"] = {"encode": round(t1 - t0, 1), "retrieve_and_score": round(time.time() - t1, 1)}
    if verbose:
        print(f"{data_dir} [{split}]: {len(queries)} queries, {len(corpus)} passages, depth {depth}; "
              f"qrels ids missing: {missing['queries']} queries, {missing['docs']} docs")
        print_table(res["rows"])
        for l, r in res.get("per_lang", {}).items():
            print(f"-- lang {l}: " + "  ".join(f"{k} {m['nDCG@10']:.4f}" for k, m in r.items()))
        for r in res.get("sweep", [])[:5]:
            print(f"sweep {r['weights']}: nDCG@10 {r['nDCG@10']:.4f} Recall@100 {r['Recall@100']:.4f}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        if not overwrite:
            check_out(out_dir, ckpt)  # again: another run may have written there meanwhile
        write_atomic(os.path.join(out_dir, "metrics.json"), [json.dumps(res, indent=1)])
        if verbose:
            print(f"wrote {os.path.join(out_dir, 'metrics.json')}")
    return res

# ----------------------------------------------------------------------------- retrieval: each head, then exact scores


def retrieve(Q, P, depth=1000, index="Flat", index_params="", colbert_index="Flat", colbert_k=64,
             use=(True, True, True), qbatch=64):
    """Per query (cand (n,), s (3, n), src (3, n)): union of dense top-depth, sparse top-depth and colbert token hits
    (each query token's colbert_k nearest passage tokens; all passages if colbert_k <= 0); s = exact scores of all
    heads; src = which heads found it. use: the heads to run (the others score 0 and find nothing)."""
    nq, n = len(Q["dense"]), len(P["dense"])
    params = lambda spec: "" if spec == "Flat" else index_params  # search parameters go to every non-Flat index
    dense_top = build_index(P["dense"], index, params(index)).search(Q["dense"], min(depth, n))[1] if use[0] else None
    inv = sparse_index(P) if use[1] else None
    if use[2] and colbert_k > 0:
        tok_index = build_index(P["cb_vecs"], colbert_index, params(colbert_index))
        tok2doc = np.repeat(np.arange(n), np.diff(P["cb_ptr"]))  # (total passage tokens,)
    qbatch = max(1, min(qbatch, (1 << 25) // max(n, 1)))  # bounds the (qbatch, N) sparse score block
    results, empty = [], np.zeros(0, np.int64)
    for a in tqdm(range(0, nq, qbatch), desc="retrieve", disable=nq <= qbatch):
        rows = np.arange(a, min(a + qbatch, nq))
        sparse_top = sparse_search(inv, Q, rows, depth) if use[1] else [empty] * len(rows)
        if use[2] and colbert_k <= 0:  # exhaustive: every passage is a candidate
            colbert_hits = [np.arange(n)] * len(rows)
        elif use[2]:
            ta, tb = Q["cb_ptr"][rows[0]], Q["cb_ptr"][rows[-1] + 1]
            hits = tok_index.search(Q["cb_vecs"][ta:tb], min(colbert_k, len(tok2doc)))[1]  # (batch tokens, k')
            colbert_hits = [np.unique(tok2doc[h[h >= 0]]) for h in np.split(hits, Q["cb_ptr"][rows[1:]] - ta)]
        else:
            colbert_hits = [empty] * len(rows)
        for r, i in enumerate(rows):
            lists = [dense_top[i][dense_top[i] >= 0] if use[0] else empty, sparse_top[r], colbert_hits[r]]
            cand = np.unique(np.concatenate(lists))  # (n,)
            src = np.stack([np.isin(cand, l) for l in lists])  # (3, n)
            results.append((cand, exact_scores(Q, i, P, cand, use), src))
    return results


def build_index(x, spec="Flat", params=""):
    """FAISS inner-product index over the rows of x (n, D) from an index_factory string; trained on <=256k rows."""
    x = np.ascontiguousarray(x, np.float32)
    index = faiss.index_factory(x.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(x[np.random.default_rng(0).permutation(len(x))[:1 << 18]])
    index.add(x)
    if params:  # e.g. "nprobe=64" for IVF, "efSearch=1024" for HNSW (must be >= depth)
        faiss.ParameterSpace().set_index_parameters(index, params)
    return index


def sparse_index(P, head_df=None, head_bytes=1 << 28):
    """Inverted index of the passages' sparse CSR: postings sorted by token id (toks, ptr, doc, w); the frequent
    tokens (df >= head_df, default N/32; at most head_bytes) also as dense rows head (n_head, N), for one matmul
    ("head": the head of the token frequency distribution, not a model head)."""
    n = len(P["sp_ptr"]) - 1
    order = np.argsort(P["sp_ids"], kind="stable")  # (nnz,) postings by token id, then passage
    doc, w = np.repeat(np.arange(n), np.diff(P["sp_ptr"]))[order], P["sp_w"][order]  # (nnz,) passage, weight
    toks, start = np.unique(P["sp_ids"][order], return_index=True)  # (n_tok,) distinct ids, first posting of each
    ptr = np.append(start, len(order))  # (n_tok + 1,) postings of toks[t]: ptr[t]:ptr[t + 1]
    df = np.diff(ptr)  # (n_tok,)
    freq = np.argsort(-df, kind="stable")[:head_bytes // (4 * max(n, 1))]  # positions in toks, most frequent first
    freq = np.sort(freq[df[freq] >= (max(1, n // 32) if head_df is None else head_df)])
    head_row = np.full(len(toks), -1)  # (n_tok,) row in head, -1 for a token scored through its postings
    head_row[freq] = np.arange(len(freq))
    head = np.zeros((len(freq), n), np.float32)  # (n_head, N)
    pos, seg = segments(ptr, freq)
    head[seg, doc[pos]] = w[pos]
    return dict(toks=toks, ptr=ptr, doc=doc, w=w, n=n, head=head, head_row=head_row)


def sparse_search(inv, Q, qrows, k):
    """Exact top-k of s_lex = sum_v q[v] p[v] (SPEC 1.2) for queries qrows: frequent tokens by one matmul, the others
    by one bincount over their postings (a stop-word piece's postings cover most of the corpus)."""
    n = inv["n"]
    pos, qseg = segments(Q["sp_ptr"], qrows)
    qi, qw = Q["sp_ids"][pos], Q["sp_w"][pos]  # (nnz of qrows,) token ids, weights; qseg: row in qrows
    t = np.searchsorted(inv["toks"], qi).clip(max=max(len(inv["toks"]) - 1, 0))
    hit = (inv["toks"][t] == qi) if len(inv["toks"]) else np.zeros(len(qi), bool)
    t, qw, qseg = t[hit], qw[hit], qseg[hit]  # query tokens that occur in the corpus
    h = inv["head_row"][t] >= 0
    q_head = np.zeros((len(qrows), len(inv["head"])), np.float32)
    q_head[qseg[h], inv["head_row"][t[h]]] = qw[h]  # (nq, n_head) query weights of the frequent tokens
    t, qw, qseg = t[~h], qw[~h], qseg[~h]
    ppos, tseg = segments(inv["ptr"], t)  # postings of the other query tokens
    s = np.bincount(qseg[tseg] * n + inv["doc"][ppos], weights=qw[tseg] * inv["w"][ppos],
                    minlength=len(qrows) * n).reshape(len(qrows), n) + q_head @ inv["head"]  # (nq, N) exact scores
    k = min(k, n)
    top = np.argpartition(-s, k - 1, axis=1)[:, :k] if 0 < k < n else np.tile(np.arange(n), (len(qrows), 1))
    return [t[s[r, t] > 0] for r, t in enumerate(top)]  # passages sharing no token are not candidates


def segments(ptr, rows):
    """Flat positions of CSR rows `rows` (in order) and, for each position, its index into rows.
    E.g. ptr [0, 2, 5], rows [1, 0] -> positions [2, 3, 4, 0, 1], index [0, 0, 0, 1, 1]."""
    lens = ptr[rows + 1] - ptr[rows]
    seg = np.repeat(np.arange(len(rows)), lens)
    return np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens - ptr[rows], lens), seg  # ptr[row] + offset


def exact_scores(Q, i, P, cand, use=(True, True, True)):
    """Exact (dense, sparse, colbert) scores of query i with passages cand; (3, n), zeros for heads not in use."""
    fns = (dense_pairs, sparse_pairs, maxsim)
    return np.stack([f(Q, i, P, cand) if u else np.zeros(len(cand), np.float32) for f, u in zip(fns, use)])


def dense_pairs(Q, i, P, cand):
    """Exact dense scores e_q . e_p of query i with passages cand; (n,)."""
    return P["dense"][cand] @ Q["dense"][i]  # (n, D) @ (D,)


def sparse_pairs(Q, i, P, cand):
    """Exact lexical scores of query i with passages cand: sum over shared token ids of w_q w_p; (n,)."""
    qi, qw = Q["sp_ids"][Q["sp_ptr"][i]:Q["sp_ptr"][i + 1]], Q["sp_w"][Q["sp_ptr"][i]:Q["sp_ptr"][i + 1]]
    if len(qi) == 0:
        return np.zeros(len(cand), np.float32)
    pos, seg = segments(P["sp_ptr"], cand)  # the candidates' (token, weight) entries; seg: index into cand
    pi = P["sp_ids"][pos]
    t = np.searchsorted(qi, pi).clip(max=len(qi) - 1)  # query ids are sorted (pack)
    hit = qi[t] == pi
    return np.bincount(seg[hit], weights=qw[t[hit]] * P["sp_w"][pos[hit]], minlength=len(cand)).astype(np.float32)


def maxsim(Q, i, P, cand, max_tokens=1 << 16):
    """Exact ColBERT scores mean_a max_b q_a . p_b (SPEC 1.3) of query i with passages cand; (n,). Chunks of at most
    max_tokens candidate tokens in passage order; a chunk covering >= 1/3 of its token span multiplies that span."""
    q = Q["cb_vecs"][Q["cb_ptr"][i]:Q["cb_ptr"][i + 1]]  # (Lq, D)
    ptr, out = P["cb_ptr"], np.zeros(len(cand), np.float32)
    nz = np.flatnonzero(ptr[cand + 1] > ptr[cand])  # an empty passage or query scores 0
    if len(q) == 0 or len(nz) == 0:
        return out
    nz = nz[np.argsort(cand[nz], kind="stable")]  # positions in cand, in passage order
    c = cand[nz]
    lens = ptr[c + 1] - ptr[c]
    end = np.cumsum(lens)
    a = 0
    while a < len(nz):
        b = max(a + 1, int(np.searchsorted(end, end[a] - lens[a] + max_tokens, "right")))  # chunk c[a:b]
        s0, s1 = ptr[c[a]], ptr[c[b - 1] + 1]
        if 3 * (end[b - 1] - end[a] + lens[a]) >= s1 - s0:  # dense chunk: no copy, segments interleaved with gaps
            sim = q @ P["cb_vecs"][s0:s1].T  # (Lq, span)
            starts = np.stack([ptr[c[a:b]], ptr[c[a:b] + 1]], 1).ravel()[:-1] - s0
            out[nz[a:b]] = np.maximum.reduceat(sim, starts, axis=1)[:, ::2].mean(0)
        else:  # sparse chunk: gather the candidates' tokens
            pos, _ = segments(ptr, c[a:b])
            sim = q @ P["cb_vecs"][pos].T  # (Lq, sum of the chunk's passage lengths)
            out[nz[a:b]] = np.maximum.reduceat(sim, np.cumsum(lens[a:b]) - lens[a:b], axis=1).mean(0)
        a = b
    return out

# ----------------------------------------------------------------------------- fusion and metrics


def fusion_weights(weights):
    """(name or None, dense+sparse weights, all-three weights) for a FUSION name (as floats, like the command line's
    numbers) or 3 numbers w_d, w_s, w_c (a string: comma-separated), whose dense+sparse row is (w_d, w_s, 0)."""
    if isinstance(weights, str) and weights in FUSION:
        ds, full = FUSION[weights]
        return weights, tuple(map(float, ds)), tuple(map(float, full))
    w = tuple(float(x) for x in weights.split(",")) if isinstance(weights, str) else tuple(weights)
    return None, w[:2] + (0,), w


def fuse(results, w, depth, tie):
    """Per query (top passages, fused scores): candidates of the heads with w_h != 0 ranked by sum_h w_h s_h, ties by
    doc id (tie = rank of each passage's id in string order)."""
    w = np.asarray(w, np.float32)
    out = []
    for cand, s, src in results:
        keep = src[w != 0].any(0)
        c, f = cand[keep], w @ s[:, keep]  # (3,) @ (3, n') -> (n',)
        order = np.lexsort((tie[c], -f))[:depth]  # primary key last: score desc, then doc id asc
        out.append((c[order], f[order]))
    return out


def run_metrics(ranked, qrels_list, langs, depth):
    """Mean of query_metrics over queries, plus a per-language mean when queries carry a lang field."""
    per_q = [query_metrics(r, rels, depth) for r, rels in zip(ranked, qrels_list)]
    mean = lambda ms: {k: round(float(np.mean([m[k] for m in ms])), 6) for k in ms[0]} if ms else {}
    by_lang = {l: mean([m for m, ql in zip(per_q, langs) if ql == l]) for l in sorted(set(langs) - {None})}
    return mean(per_q), by_lang


def query_metrics(ranked, rels, depth):
    """nDCG@10 (gain = graded rel, 1/log2(rank+1) discount, ideal from all qrels), MRR@10, Recall@100/1000 of one query.
    rels: {doc_id: rel}; rel <= 0 counts as not relevant; relevant docs missing from the corpus still count."""
    g = np.array([max(rels.get(d, 0), 0) for d in ranked[:max(depth, 10)]], np.float64)  # gain at each rank
    disc = 1 / np.log2(np.arange(2, 12))  # (10,)
    rel = np.sort([r for r in rels.values() if r > 0])[::-1]  # (n_rel,) graded, best first
    ideal, hit = rel[:10], g > 0
    m = {"nDCG@10": (g[:10] * disc[:len(g[:10])]).sum() / (ideal * disc[:len(ideal)]).sum(),
         "MRR@10": 1 / (np.argmax(hit[:10]) + 1) if hit[:10].any() else 0.0,
         "Recall@100": hit[:100].sum() / len(rel)}
    if depth >= 1000:
        m["Recall@1000"] = hit[:1000].sum() / len(rel)
    return m


def print_table(rows):
    """One line per row name: the metrics in METRICS order."""
    keys = [k for k in METRICS if any(k in m for m in rows.values())]
    print(f"{'row':<14}" + "".join(f"{k:>13}" for k in keys))
    for name, m in rows.items():
        print(f"{name:<14}" + "".join(f"{m.get(k, float('nan')):>13.4f}" for k in keys))

# ----------------------------------------------------------------------------- options (shared with mine.py), output


def cli_parser(doc, split):
    """An argparse parser with the options evaluation and mining share; each CLI adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint dir (release layout: encoder, tokenizer, head .pt files)")
    p.add_argument("--data", help="BEIR-layout dir: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--split", default=split)
    p.add_argument("--weights", default="m3", help=f"fusion weights (SPEC 6.2): one of {', '.join(FUSION)} or "
                                                   "dense,sparse,colbert numbers, e.g. 1,0.3,1")
    p.add_argument("--index", default="Flat", help="FAISS index_factory string for dense, e.g. HNSW32, IVF1024,PQ64")
    p.add_argument("--index_params", default="", help="FAISS search parameters, e.g. nprobe=64 or efSearch=1024")
    p.add_argument("--colbert_index", default="Flat", help="FAISS index_factory string over passage token vectors")
    p.add_argument("--colbert_k", type=int, default=64, help="passage tokens per query token (candidates); 0 = all")
    p.add_argument("--query_max_len", type=int, default=64)
    p.add_argument("--passage_max_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--cache_dir", default=".cache/eval", help="encodings cache ('' = off)")
    p.add_argument("--pooling", choices=("cls", "mean"), help="override the checkpoint's dense pooling")
    p.add_argument("--new_heads", action="store_true",
                   help="a bare encoder (e.g. zero-shot 'minilm'): new heads (sparse: term matching, colbert: "
                        "seeded random)")
    for side, e5 in (("query", "query: "), ("passage", "passage: ")):
        p.add_argument(f"--{side}_prefix", help=f"text before every {side}, e.g. {e5!r} (multilingual-e5); default: "
                                                f"the checkpoint's (its training config's {side}_prefix), else none")
        p.add_argument(f"--{side}_instruction_for_retrieval", dest=f"reference_{side}", help=argparse.SUPPRESS)
    return p


def cli_setup(p, a, data, ranks=None, **ints):
    """Exit through p.error on a bad shared option, then ints and ranks (see option_error), then the BEIR dir data
    (unless None); else (model, keyword options) for evaluate/mine: model is --ckpt, or with --new_heads/--pooling a
    function loading it in memory (the cache then keys on the weights), called after the data checks."""
    error = option_error(a.weights, "--", ranks, colbert_k=a.colbert_k, batch_size=a.batch_size,
                         query_max_len=a.query_max_len, passage_max_len=a.passage_max_len, **ints)
    if error:
        p.error(error)
    error = data and data_error(data, a.split)
    if error:
        p.error(f"--data: {error}")
    for side in ("query", "passage"):
        if getattr(a, f"reference_{side}") is not None:
            p.error(f"--{side}_instruction_for_retrieval is FlagEmbedding's option: here it is --{side}_prefix")
        if getattr(a, f"{side}_prefix") is None:  # what the checkpoint was trained with (st_layout.write)
            setattr(a, f"{side}_prefix", st_prompts(a.ckpt).get(side, "") if os.path.isdir(a.ckpt) else "")
            if getattr(a, f"{side}_prefix"):
                print(f"--{side}_prefix {getattr(a, f'{side}_prefix')!r}: the checkpoint's (it was trained with it)")

    def load():
        import torch
        from model import M3
        torch.manual_seed(0)  # new heads: the same seeded random colbert head every run
        m = M3.from_pretrained(a.ckpt, new_heads=a.new_heads, pooling=a.pooling).to(inference_device()).eval()
        m.source = f"{a.ckpt} (new_heads={a.new_heads}, pooling={a.pooling})"  # what metrics.json records
        return m
    model = load if a.new_heads or a.pooling else a.ckpt
    return model, dict(query_max_len=a.query_max_len, passage_max_len=a.passage_max_len, batch_size=a.batch_size,
                       index=a.index, index_params=a.index_params, colbert_index=a.colbert_index,
                       colbert_k=a.colbert_k, cache_dir=a.cache_dir or None, query_prefix=a.query_prefix,
                       passage_prefix=a.passage_prefix)


MINIMUM = dict(depth=1, colbert_k=0, batch_size=1, query_max_len=2, passage_max_len=2, n_neg=1)


def option_error(weights, prefix="", ranks=None, **ints):
    """What is wrong with the options, naming the option (prefix "--" on the command line), or None: weights a FUSION
    name or 3 finite numbers, not all 0 (a string: comma-separated); ints at least their MINIMUM; ranks "lo-hi" or
    (lo, hi), 0 <= lo < hi."""
    try:
        w = [float(x) for x in fusion_weights(weights)[2]]
    except (TypeError, ValueError):
        w = []
    if len(w) != 3 or not np.isfinite(w).all() or not any(w):
        return (f"{prefix}weights: expected one of {', '.join(FUSION)} or 3 numbers dense,sparse,colbert, not all 0; "
                f"got {weights!r}")
    for k, v in ints.items():
        if not isinstance(v, (int, np.integer)) or v < MINIMUM[k]:
            return f"{prefix}{k}: expected an integer >= {MINIMUM[k]}; got {v!r}"
    lo_hi = ranks.split("-") if isinstance(ranks, str) else ranks
    if ranks is not None and not (len(lo_hi) == 2 and all(str(x).isdecimal() for x in lo_hi)
                                  and int(lo_hi[0]) < int(lo_hi[1])):
        return f"{prefix}range: expected fused ranks lo-hi, integers with 0 <= lo < hi (e.g. 10-100); got {ranks!r}"
    return None


if __name__ == "__main__":
    main()
