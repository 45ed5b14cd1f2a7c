"""Evaluate an M3 checkpoint on BEIR-layout data with all three heads and their fusion; mine hard negatives (SPEC.md 6).

python eval.py --ckpt DIR --data DIR [--split test] [--weights 1,0.3,1] [--sweep] [--index Flat]
python eval.py mine --ckpt DIR --data DIR --split train --range 10-100 --n_neg 7 --out mined.jsonl [--scores]
python eval.py mine --ckpt DIR --jsonl train.jsonl [--corpus corpus.jsonl] --range 10-100 --out mined.jsonl
python eval.py --ckpt minilm --new_heads --pooling mean --data data/scifact     # a bare encoder, zero-shot (dense row)
Each head retrieves on its own (dense: FAISS; sparse: exact inverted index; multi-vector: FAISS over passage tokens,
then exact MaxSim). Every candidate of the union then gets the exact score of every head, so fusion never fills in 0
for a passage that one head missed. Ranking ties everywhere: score descending, then doc id ascending (string order).
"""
import argparse
import csv
import hashlib
import json
import os
import sys
import time

import faiss
import numpy as np
from tqdm import tqdm

HEADS = ("dense", "sparse", "colbert")
METRICS = ("nDCG@10", "MRR@10", "Recall@100", "Recall@1000")

# ----------------------------------------------------------------------------- data


def read_jsonl(path, fields=(), unique=None):
    """List of JSON objects, one per non-empty line, each with a string value for every key in fields and, for the key
    unique, a value no other line has. Errors name the file and the 1-based line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    recs, seen = [], {}  # seen: id -> line
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(r).__name__}")
            for k in fields:
                if not isinstance(r.get(k), str):
                    got = f"expected a string, got {json.dumps(r[k])[:40]}" if k in r else "missing"
                    raise ValueError(f"{path}, line {n}: field '{k}': {got}")
            if unique:  # a repeated corpus id scores its relevant doc twice (nDCG@10 above 1)
                if r[unique] in seen:
                    raise ValueError(f"{path}, line {n}: field '{unique}': duplicate id {r[unique]!r} "
                                     f"(first at line {seen[r[unique]]})")
                seen[r[unique]] = n
            recs.append(r)
    return recs


def read_qrels(path):
    """{query_id: {doc_id: rel}} from a BEIR qrels TSV (query-id, corpus-id, integer score); line 1 may be a header."""
    qrels = {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        for row in rows:
            if not "".join(row).strip():
                continue  # blank line
            try:
                rel = int(row[-1]) if len(row) >= 3 and row[0] and row[1] else None
            except ValueError:
                rel = None
            if rel is not None:
                qrels.setdefault(row[0], {})[row[1]] = rel
            elif rows.line_num > 1:  # only line 1 may be a header
                raise ValueError(f"{path}, line {rows.line_num}: expected query-id<TAB>corpus-id<TAB>integer score, "
                                 f"got {row}")
    return qrels


def passage_text(r):
    """title + " " + text when the title is non-empty (the convention of scifact/train_mined.jsonl)."""
    return f"{r['title']} {r['text']}" if r.get("title") else r["text"]


def data_error(data_dir, split):
    """Why data_dir is not a BEIR dir with this split, naming the missing files; None when it is."""
    if not os.path.isdir(data_dir):
        return f"{data_dir}: no such directory"
    files = ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv")
    gone = [f for f in files if not os.path.isfile(os.path.join(data_dir, f))]
    qdir = os.path.join(data_dir, "qrels")
    splits = f" (splits there: {sorted(os.listdir(qdir))})" if files[2] in gone and os.path.isdir(qdir) else ""
    return f"{data_dir}: no {', '.join(gone)}{splits}" if gone else None


def load_beir(data_dir, split, max_corpus=None):
    """corpus records, queries with a relevant doc, qrels {qid: {doc_id: rel}}, counts of ids missing from the files."""
    error = data_error(data_dir, split)
    if error:
        raise FileNotFoundError(error)
    qpath, path = os.path.join(data_dir, "queries.jsonl"), os.path.join(data_dir, "qrels", f"{split}.tsv")
    queries = {r["_id"]: r for r in read_jsonl(qpath, ("_id", "text"), "_id")}
    qrels = read_qrels(path)
    # queries without a relevant doc are skipped, as BEIR does; missing docs stay in qrels (they count as not found)
    usable = {q: rels for q, rels in qrels.items() if q in queries and max(rels.values()) > 0}
    if not usable:  # checked before the corpus is read and anything is encoded
        found = sum(q in queries for q in qrels)
        why = ("no rows" if not qrels else f"0 of {len(qrels)} query ids in qrels are in {qpath}" if not found else
               f"none of its {found} queries that are in {qpath} has a relevance > 0")
        raise ValueError(f"{path}: no query to evaluate: {why}")
    corpus = read_jsonl(os.path.join(data_dir, "corpus.jsonl"), ("_id", "text"), "_id")
    doc_ids = {r["_id"] for r in corpus}
    missing = {"queries": sum(q not in queries for q in qrels),
               "docs": sum(d not in doc_ids for rels in qrels.values() for d in rels)}
    if max_corpus is not None:  # quick runs: every relevant doc plus the first max_corpus others
        rel = {d for rels in usable.values() for d in rels}
        corpus = [r for i, r in enumerate(corpus) if r["_id"] in rel or i < max_corpus]
    return corpus, [queries[q] for q in usable], usable, missing

# ----------------------------------------------------------------------------- encoding + on-disk cache


def pack(out):
    """model.encode output -> flat arrays: dense (N, D); sparse CSR sp_ptr (N+1,), sp_ids, sp_w; colbert cb_ptr,
    cb_vecs (sum of L_i, D)."""
    sp = [sorted(d.items()) for d in out["sparse"]]
    sp_len = np.array([len(d) for d in sp], np.int64)
    cb_len = np.array([len(v) for v in out["colbert"]], np.int64)
    D = out["dense"].shape[1]
    return dict(dense=np.ascontiguousarray(out["dense"], np.float32),
                sp_ptr=np.concatenate([[0], np.cumsum(sp_len)]),
                sp_ids=np.fromiter((k for d in sp for k, _ in d), np.int64, sp_len.sum()),
                sp_w=np.fromiter((w for d in sp for _, w in d), np.float32, sp_len.sum()),
                cb_ptr=np.concatenate([[0], np.cumsum(cb_len)]),
                cb_vecs=np.concatenate([np.asarray(v, np.float32).reshape(-1, D) for v in out["colbert"]]))


def ckpt_key(path):
    """Identity of a checkpoint dir: content hash of files under 64 MB, (name, size, mtime) of larger ones."""
    if not os.path.isdir(path):
        if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") != 1:
            raise FileNotFoundError(f"{path}: no such checkpoint directory")
        return f"hub:{path}"  # a hub name: from_pretrained checks the heads; the cache assumes the repo does not change
    missing = [f for f in ("colbert_linear.pt", "sparse_linear.pt") if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"{path} has no {' / '.join(missing)}: a checkpoint without heads (e.g. dense-only "
                                "fine-tuning) cannot be evaluated on sparse/multi-vector retrieval (SPEC.md 2); "
                                "for a bare encoder's zero-shot dense row pass --new_heads")
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            st = os.stat(f)
            h.update(f"{name}|{st.st_size}|".encode())
            if st.st_size < 64 << 20:
                with open(f, "rb") as fh:
                    h.update(fh.read())
            else:
                h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()


def model_key(model):
    """Identity of an in-memory model: hash of its weights and pooling."""
    h = hashlib.sha256(str(getattr(model, "pooling", "")).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def model_loader(model, need_key):
    """(get_model, key, ckpt) for a checkpoint path (loaded lazily, only on a cache miss), an in-memory M3 or a function
    returning one (main's --new_heads/--pooling: loaded after the data checks); ckpt: what metrics.json records."""
    if not isinstance(model, str):
        model = model if hasattr(model, "encode") else model()
        key = model_key(model) if need_key else None
        return (lambda: model), key, {"ckpt": getattr(model, "source", "<in-memory model>"), "ckpt_abspath": None,
                                      "ckpt_key": key}
    key, box = ckpt_key(model), []
    ckpt = {"ckpt": model, "ckpt_abspath": os.path.abspath(model) if os.path.isdir(model) else None, "ckpt_key": key}

    def get():
        if not box:
            from model import M3
            import torch
            box.append(M3.from_pretrained(model).to("cuda" if torch.cuda.is_available() else "cpu").eval())
        return box[0]
    return get, key, ckpt


def encode(get_model, texts, max_length, batch_size=32, mcls=False, cache_dir=None, key=None):
    """pack(model.encode(texts)), cached as <cache_dir>/<sha256(checkpoint, texts, max_length, mcls)>.npz, no pickle."""
    if cache_dir:
        h = hashlib.sha256(f"{key}|{max_length}|{mcls}|{len(texts)}".encode())
        h.update("\0".join(texts).encode())
        path = os.path.join(cache_dir, h.hexdigest()[:40] + ".npz")
        if os.path.exists(path):
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    enc = pack(get_model().encode(texts, batch_size=batch_size, max_length=max_length, mcls=mcls))
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        np.savez(path + ".tmp.npz", **enc)
        os.replace(path + ".tmp.npz", path)  # never a half-written cache file
    return enc

# ----------------------------------------------------------------------------- indices and exact scores


def segments(ptr, rows):
    """Flat positions of CSR rows `rows` (in order) and, for each position, its index into rows."""
    lens = ptr[rows + 1] - ptr[rows]
    seg = np.repeat(np.arange(len(rows)), lens)
    return np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens - ptr[rows], lens), seg


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
    """Inverted index of the passages' sparse CSR: postings sorted by token id (toks, ptr, doc, w), and the frequent
    tokens (df >= head_df, default N/32; at most head_bytes) also as dense rows head (n_head, N) for one matmul."""
    n = len(P["sp_ptr"]) - 1
    order = np.argsort(P["sp_ids"], kind="stable")
    doc, w = np.repeat(np.arange(n), np.diff(P["sp_ptr"]))[order], P["sp_w"][order]
    toks, start = np.unique(P["sp_ids"][order], return_index=True)
    ptr = np.append(start, len(order))
    df = np.diff(ptr)
    heads = np.argsort(-df, kind="stable")[:head_bytes // (4 * max(n, 1))]  # positions in toks, most frequent first
    heads = np.sort(heads[df[heads] >= (max(1, n // 32) if head_df is None else head_df)])
    head_row = np.full(len(toks), -1)
    head_row[heads] = np.arange(len(heads))
    head = np.zeros((len(heads), n), np.float32)
    pos, seg = segments(ptr, heads)
    head[seg, doc[pos]] = w[pos]
    return dict(toks=toks, ptr=ptr, doc=doc, w=w, n=n, head=head, head_row=head_row)


def sparse_search(inv, Q, qrows, k):
    """Exact top-k of s_lex = sum_v q[v] p[v] (SPEC 1.2) for queries qrows: frequent tokens by one matmul, the others
    by one bincount over their postings (a stop-word piece's postings cover most of the corpus)."""
    n = inv["n"]
    pos, qseg = segments(Q["sp_ptr"], qrows)
    qi, qw = Q["sp_ids"][pos], Q["sp_w"][pos]
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


def dense_pairs(Q, i, P, cand):
    """Exact dense scores e_q . e_p of query i with passages cand; (n,)."""
    return P["dense"][cand] @ Q["dense"][i]


def sparse_pairs(Q, i, P, cand):
    """Exact lexical scores of query i with passages cand: sum over shared token ids of w_q w_p; (n,)."""
    qi, qw = Q["sp_ids"][Q["sp_ptr"][i]:Q["sp_ptr"][i + 1]], Q["sp_w"][Q["sp_ptr"][i]:Q["sp_ptr"][i + 1]]
    if len(qi) == 0:
        return np.zeros(len(cand), np.float32)
    pos, seg = segments(P["sp_ptr"], cand)
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
    nz = nz[np.argsort(cand[nz], kind="stable")]
    c = cand[nz]
    lens = ptr[c + 1] - ptr[c]
    end = np.cumsum(lens)
    a = 0
    while a < len(nz):
        b = max(a + 1, int(np.searchsorted(end, end[a] - lens[a] + max_tokens, "right")))
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


def exact_scores(Q, i, P, cand, use=(True, True, True)):
    """Exact (dense, sparse, colbert) scores of query i with passages cand; (3, n), zeros for heads not in use."""
    fns = (dense_pairs, sparse_pairs, maxsim)
    return np.stack([f(Q, i, P, cand) if u else np.zeros(len(cand), np.float32) for f, u in zip(fns, use)])


def retrieve(Q, P, depth=1000, index="Flat", index_params="", colbert_index="Flat", colbert_k=64,
             use=(True, True, True), qbatch=64):
    """Per query (cand (n,), s (3, n), src (3, n)): union of dense top-depth, sparse top-depth and colbert token hits
    (each query token's colbert_k nearest passage tokens; all passages if colbert_k <= 0); s = exact scores of all
    heads; src = which heads found it."""
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
            cand = np.unique(np.concatenate(lists))
            src = np.stack([np.isin(cand, l) for l in lists])
            results.append((cand, exact_scores(Q, i, P, cand, use), src))
    return results

# ----------------------------------------------------------------------------- fusion and metrics


def fuse(results, w, depth, tie):
    """Per query (top passages, fused scores): candidates of the heads with w_h != 0 ranked by sum_h w_h s_h, ties by
    doc id (tie = rank of each passage's id in string order)."""
    w = np.asarray(w, np.float32)
    out = []
    for cand, s, src in results:
        keep = src[w != 0].any(0)
        c, f = cand[keep], w @ s[:, keep]
        order = np.lexsort((tie[c], -f))[:depth]  # primary key last: score desc, then doc id asc
        out.append((c[order], f[order]))
    return out


def query_metrics(ranked, rels, depth):
    """nDCG@10 (gain = graded rel, 1/log2(rank+1) discount, ideal from all qrels), MRR@10, Recall@100/1000 of one query.
    rels: {doc_id: rel}; rel <= 0 counts as not relevant; relevant docs missing from the corpus still count."""
    g = np.array([max(rels.get(d, 0), 0) for d in ranked[:max(depth, 10)]], np.float64)
    disc = 1 / np.log2(np.arange(2, 12))
    rel = np.sort([r for r in rels.values() if r > 0])[::-1]  # (n_rel,) graded, best first
    ideal, hit = rel[:10], g > 0
    m = {"nDCG@10": (g[:10] * disc[:len(g[:10])]).sum() / (ideal * disc[:len(ideal)]).sum(),
         "MRR@10": 1 / (np.argmax(hit[:10]) + 1) if hit[:10].any() else 0.0,
         "Recall@100": hit[:100].sum() / len(rel)}
    if depth >= 1000:
        m["Recall@1000"] = hit[:1000].sum() / len(rel)
    return m


def run_metrics(ranked, qrels_list, langs, depth):
    """Mean of query_metrics over queries, plus a per-language mean when queries carry a lang field."""
    per_q = [query_metrics(r, rels, depth) for r, rels in zip(ranked, qrels_list)]
    mean = lambda ms: {k: round(float(np.mean([m[k] for m in ms])), 6) for k in ms[0]} if ms else {}
    by_lang = {l: mean([m for m, ql in zip(per_q, langs) if ql == l]) for l in sorted(set(langs) - {None})}
    return mean(per_q), by_lang


def print_table(rows):
    """One line per row name: the metrics in METRICS order."""
    keys = [k for k in METRICS if any(k in m for m in rows.values())]
    print(f"{'row':<14}" + "".join(f"{k:>13}" for k in keys))
    for name, m in rows.items():
        print(f"{name:<14}" + "".join(f"{m.get(k, float('nan')):>13.4f}" for k in keys))

# ----------------------------------------------------------------------------- evaluate and mine


def encode_both(get_model, key, passages, queries, query_max_len, passage_max_len, batch_size, mcls, cache_dir):
    """(P, Q) packed encodings; mcls applies to passages only (long documents, SPEC 5.3)."""
    P = encode(get_model, passages, passage_max_len, batch_size, mcls, cache_dir, key)
    Q = encode(get_model, queries, query_max_len, batch_size, False, cache_dir, key)
    return P, Q


MINIMUM = dict(depth=1, colbert_k=0, batch_size=1, query_max_len=2, passage_max_len=2, n_neg=1)


def option_error(weights, prefix="", ranks=None, **ints):
    """What is wrong with the options, naming the option (prefix "--" on the command line), or None: weights are 3
    finite numbers, not all 0 (a string: comma-separated); ints at least their MINIMUM; ranks "lo-hi", 0 <= lo < hi."""
    try:
        w = [float(x) for x in (weights.split(",") if isinstance(weights, str) else weights)]
    except (TypeError, ValueError):
        w = []
    if len(w) != 3 or not np.isfinite(w).all() or not any(w):
        return f"{prefix}weights: expected 3 numbers dense,sparse,colbert, not all 0; got {weights!r}"
    for k, v in ints.items():
        if not isinstance(v, (int, np.integer)) or v < MINIMUM[k]:
            return f"{prefix}{k}: expected an integer >= {MINIMUM[k]}; got {v!r}"
    lo_hi = ranks.split("-") if isinstance(ranks, str) else ranks
    if ranks is not None and not (len(lo_hi) == 2 and all(str(x).isdecimal() for x in lo_hi)
                                  and int(lo_hi[0]) < int(lo_hi[1])):
        return f"{prefix}range: expected fused ranks lo-hi, integers with 0 <= lo < hi (e.g. 10-100); got {ranks!r}"
    return None


def check_out(out_dir, ckpt):
    """Refuse to replace an out_dir/metrics.json that records another checkpoint (or none: an older eval.py's).
    The same checkpoint path is the same run (retrained in place, its metrics are replaced); in memory: the weights."""
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except ValueError:
        old = None
    old = old if isinstance(old, dict) else {}
    same_path = ckpt["ckpt_abspath"] is not None and old.get("ckpt_abspath") == ckpt["ckpt_abspath"]
    if not same_path and old.get("ckpt_key") != ckpt["ckpt_key"]:
        name = lambda c: f"{c.get('ckpt_abspath') or c.get('ckpt', '(none)')} (key {str(c.get('ckpt_key'))[:12]})"
        raise FileExistsError(f"{path} holds the metrics of {name(old)}, not of {name(ckpt)}: pass another --out "
                              "(out_dir), --overwrite, or remove that file")


def write_atomic(path, lines):
    """Write the strings lines to path through a temporary file: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def evaluate(model, data_dir, split="test", weights=(1, 0.3, 1), depth=1000, index="Flat", index_params="",
             colbert_index="Flat", colbert_k=64, query_max_len=64, passage_max_len=512, batch_size=32, mcls=False,
             cache_dir=None, max_corpus=None, sweep=False, out_dir=None, overwrite=False, verbose=True):
    """Rows dense / sparse / multi-vector / dense+sparse / all (SPEC 6.2) on a BEIR split; model: M3, checkpoint or a
    function returning an M3. out_dir/metrics.json records the checkpoint and replaces another's only on overwrite."""
    error = option_error(weights, depth=depth, colbert_k=colbert_k, batch_size=batch_size, query_max_len=query_max_len,
                         passage_max_len=passage_max_len)
    if error:
        raise ValueError(error)
    t0 = time.time()
    corpus, queries, qrels, missing = load_beir(data_dir, split, max_corpus)
    get_model, key, ckpt = model_loader(model, need_key=bool(cache_dir or out_dir))
    if out_dir and not overwrite:  # before encoding: never replace another checkpoint's metrics
        check_out(out_dir, ckpt)
    P, Q = encode_both(get_model, key, [passage_text(r) for r in corpus], [r["text"] for r in queries], query_max_len,
                       passage_max_len, batch_size, mcls, cache_dir)
    t1 = time.time()
    ids = np.array([r["_id"] for r in corpus])
    tie = np.argsort(np.argsort(ids, kind="stable"))  # rank of each doc id in string order
    results = retrieve(Q, P, depth, index, index_params, colbert_index, colbert_k)
    qrels_list, langs = [qrels[r["_id"]] for r in queries], [r.get("lang") for r in queries]
    wd, ws, wc = weights

    def score(w):
        return run_metrics([ids[c] for c, _ in fuse(results, w, depth, tie)], qrels_list, langs, depth)
    rows = {"dense": (1, 0, 0), "sparse": (0, 1, 0), "multi-vector": (0, 0, 1), "dense+sparse": (wd, ws, 0),
            "all": (wd, ws, wc)}
    scored = {name: score(w) for name, w in rows.items()}
    res = dict(rows={k: v[0] for k, v in scored.items()}, **ckpt, weights=list(weights), n_queries=len(queries),
               n_corpus=len(corpus), missing_qrels_ids=missing, split=split, data=os.path.abspath(data_dir),
               depth=depth, index=index, colbert_index=colbert_index, colbert_k=colbert_k, query_max_len=query_max_len,
               passage_max_len=passage_max_len, mcls=mcls)
    if any(l is not None for l in langs):
        res["per_lang"] = {l: {k: v[1][l] for k, v in scored.items()} for l in scored["all"][1]}
    if sweep:  # weights are scale-free, so a small grid around the paper's (1, 0.3, 1) covers the useful ratios
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


def mine(model, queries, positives, passages, lo=10, hi=100, n_neg=7, weights=(1, 0.3, 1), seed=0, scores=False,
         query_max_len=64, passage_max_len=512, batch_size=32, index="Flat", index_params="", colbert_index="Flat",
         colbert_k=64, cache_dir=None):
    """FlagEmbedding records {query, pos, neg[, pos_scores, neg_scores]}: n_neg negatives drawn uniformly from the fused
    ranks [lo, hi) (0-based, positives keep their ranks) minus positives, texts equal to a positive, and the query."""
    error = option_error(weights, ranks=(lo, hi), n_neg=n_neg, colbert_k=colbert_k, batch_size=batch_size,
                         query_max_len=query_max_len, passage_max_len=passage_max_len)
    if error:
        raise ValueError(error)
    get_model, key, _ = model_loader(model, need_key=bool(cache_dir))
    P, Q = encode_both(get_model, key, passages, queries, query_max_len, passage_max_len, batch_size, False, cache_dir)
    use = tuple(w != 0 for w in weights)
    tie = np.arange(len(passages))  # passages have no ids here: ties by position
    fused = fuse(retrieve(Q, P, hi, index, index_params, colbert_index, colbert_k, use), weights, hi, tie)
    rng, w, out = np.random.default_rng(seed), np.asarray(weights, np.float32), []
    for i, (q, pos) in enumerate(zip(queries, positives)):
        pos = np.asarray(pos, np.int64)
        bad, bad_text = set(pos.tolist()), {passages[j] for j in pos} | {q}
        top, f = fused[i][0][lo:hi], fused[i][1][lo:hi]
        ok = np.array([j not in bad and passages[j] not in bad_text for j in top], bool)
        pick = np.sort(rng.choice(ok.sum(), min(n_neg, ok.sum()), replace=False))
        rec = {"query": q, "pos": [passages[j] for j in pos], "neg": [passages[j] for j in top[ok][pick]]}
        if scores:
            rec["pos_scores"] = [float(x) for x in w @ exact_scores(Q, i, P, pos, use)]
            rec["neg_scores"] = [float(x) for x in f[ok][pick]]
        out.append(rec)
    return out

# ----------------------------------------------------------------------------- command line


def default_out(ckpt, data_dir, split):
    """runs/eval/<ckpt>-<data dir name>-<split>, <ckpt> from the last two components of a local checkpoint's absolute
    path (runs/a/final -> a_final: distinct checkpoints, distinct folders), else the name with '/' -> '_' (hub)."""
    parts = os.path.abspath(ckpt).split(os.sep)[-2:] if os.path.isdir(ckpt) else ckpt.split("/")
    name = "_".join(x for x in parts if x)
    return os.path.join("runs", "eval", f"{name}-{os.path.basename(os.path.abspath(data_dir))}-{split}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    mining = argv[:1] == ["mine"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint dir (release layout: encoder, tokenizer, head .pt files)")
    p.add_argument("--data", help="BEIR-layout dir: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--split", default="train" if mining else "test")
    p.add_argument("--weights", default="1,0.3,1", help="dense,sparse,colbert fusion weights (SPEC 6.2)")
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
    if mining:
        p.add_argument("--jsonl", help="FlagEmbedding JSONL (query, pos[, neg]) instead of --data")
        p.add_argument("--corpus", help="passage pool for --jsonl: JSONL with text (+title); default: pos+neg texts")
        p.add_argument("--range", default="10-100", help="0-based fused ranks lo-hi (hi excluded) to sample from")
        p.add_argument("--n_neg", type=int, default=7)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--scores", action="store_true", help="add pos_scores/neg_scores = the model's fused score")
        p.add_argument("--out", required=True, help="output JSONL")
    else:
        p.add_argument("--depth", type=int, default=1000, help="candidates per head and ranking depth")
        p.add_argument("--mcls", action="store_true", help="MCLS for long passages (SPEC 5.3)")
        p.add_argument("--sweep", action="store_true", help="also score a small grid of fusion weights")
        p.add_argument("--max_corpus", type=int, help="quick runs: relevant docs + the first N others")
        p.add_argument("--out", help="dir for metrics.json, never another checkpoint's (default runs/eval/<ckpt>-"
                                     "<data>-<split>, <ckpt>: the checkpoint path's last two folders, e.g. a_final)")
        p.add_argument("--overwrite", action="store_true", help="replace --out's metrics.json of another checkpoint")
    a = p.parse_args(argv[1:] if mining else argv)
    error = option_error(a.weights, "--", a.range if mining else None, colbert_k=a.colbert_k, batch_size=a.batch_size,
                         query_max_len=a.query_max_len, passage_max_len=a.passage_max_len,
                         **(dict(n_neg=a.n_neg) if mining else dict(depth=a.depth)))
    if error:
        p.error(error)
    if not (a.data or mining and a.jsonl):
        p.error("mine needs --data or --jsonl" if mining else "--data is required")
    error = data_error(a.data, a.split) if a.data and not (mining and a.jsonl) else None
    if error:
        p.error(f"--data: {error}")
    for opt in ("jsonl", "corpus") if mining else ():
        if getattr(a, opt) and os.path.abspath(getattr(a, opt)) == os.path.abspath(a.out):
            p.error(f"--out {a.out} is the --{opt} input: the mined records would replace it")
    model = a.ckpt
    if a.new_heads or a.pooling:  # in memory (the cache then keys on the weights), loaded after the data checks

        def load():
            import torch
            from model import M3
            torch.manual_seed(0)
            m = M3.from_pretrained(a.ckpt, new_heads=a.new_heads, pooling=a.pooling)
            m.source = f"{a.ckpt} (new_heads={a.new_heads}, pooling={a.pooling})"  # what metrics.json records
            return m
        model = load
    weights = tuple(float(x) for x in a.weights.split(","))
    enc = dict(query_max_len=a.query_max_len, passage_max_len=a.passage_max_len, batch_size=a.batch_size,
               index=a.index, index_params=a.index_params, colbert_index=a.colbert_index, colbert_k=a.colbert_k,
               cache_dir=a.cache_dir or None)
    if not mining:
        return evaluate(model, a.data, a.split, weights, a.depth, mcls=a.mcls, max_corpus=a.max_corpus, sweep=a.sweep,
                        out_dir=a.out or default_out(a.ckpt, a.data, a.split), overwrite=a.overwrite, **enc)
    lo, hi = (int(x) for x in a.range.split("-"))
    if a.jsonl:
        recs = read_jsonl(a.jsonl)
        pool = ([passage_text(r) for r in read_jsonl(a.corpus, ("text",))] if a.corpus else
                [t for r in recs for t in r["pos"] + r.get("neg", [])])
        pool = list(dict.fromkeys(pool + [t for r in recs for t in r["pos"]]))  # dedup, keep order; positives included
        at = {t: j for j, t in enumerate(pool)}
        queries, positives = [r["query"] for r in recs], [[at[t] for t in r["pos"]] for r in recs]
    else:
        corpus, qs, qrels, _ = load_beir(a.data, a.split)
        pool, at = [passage_text(r) for r in corpus], {r["_id"]: j for j, r in enumerate(corpus)}
        recs = [{} for _ in qs]
        queries = [r["text"] for r in qs]
        positives = [[at[d] for d, rel in qrels[r["_id"]].items() if rel > 0 and d in at] for r in qs]
    mined = mine(model, queries, positives, pool, lo, hi, a.n_neg, weights, a.seed, a.scores, **enc)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    write_atomic(a.out, (json.dumps({**{k: v for k, v in r.items() if k not in ("pos_scores", "neg_scores")}, **m},
                                    ensure_ascii=False) + "\n" for r, m in zip(recs, mined)))
    print(f"wrote {len(mined)} records to {a.out}; ranks {lo}-{hi}, {a.n_neg} negatives each")
    return mined


if __name__ == "__main__":
    main()
