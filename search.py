"""First stages and exact scores over packed encodings, and the paper's evaluation protocol (SPEC.md 6.2).

Packed encodings (packed.pack in memory, store.open_store memory-mapped from disk): dense (N, D); sparse CSR sp_ptr
(N+1,), sp_ids, sp_w (ids sorted within a row); colbert cb_ptr (N+1,), cb_vecs (sum of L_i, D), float32 in memory or
float16 on disk. Row i's entries: ptr[i]:ptr[i + 1]. A mapped array is read only where a score needs it, and its pages
leave this process's resident set after each use (release): a store of any size costs the rows being scored.
eval.py --protocol exact (the default) is retrieve (build_index, sparse_index/sparse_search and maxsim per query) and
fuse; --protocol paper is paper_rows: every row built the way the paper built it, with the per-task settings in PAPER.
Its multi-vector scores read the candidates' token vectors from P, or (eval.py --colbert_from encode, a store without
token vectors) have them encoded for each batch of queries, every candidate of the batch once (encoded_maxsim).
"""
import mmap

import faiss
import numpy as np
from tqdm import tqdm

# ------------------------------------------------------------------------------ the evaluation rows: edit here


def weighted_sum(s, w):
    """A row's score of each candidate: sum_h w_h s_h over the heads' exact scores; s (3, n), w (3,) -> (n,)."""
    return w @ s


# Every evaluation row: the heads' weights (fixed, or the name of a fused row's weights in FUSION) and how it scores a
# candidate from its exact head scores s (3, n) = (dense, sparse, colbert). Both protocols, the per-language tables and
# the bench scripts read this; a new row (e.g. reciprocal rank fusion) is one entry and its function.
ROWS = {"dense": ((1, 0, 0), weighted_sum), "sparse": ((0, 1, 0), weighted_sum),
        "multi-vector": ((0, 0, 1), weighted_sum), "dense+sparse": ("dense+sparse", weighted_sum),
        "all": ("all", weighted_sum)}
# The fused rows' weights (w_dense, w_sparse, w_colbert) by name (eval.py --weights), SPEC 6.2: the paper's footnotes
# and the reference's MKQA/MLDR scripts. "m3" equals train.Config's ens_dense/ens_sparse/ens_colbert, the ensemble that
# self-distillation trains towards (SPEC 1.4), also the MKQA and MIRACL weights.
FUSION = {"m3": {"dense+sparse": (1, 0.3, 0), "all": (1, 0.3, 1)},
          "mldr": {"dense+sparse": (0.2, 0.8, 0), "all": (0.15, 0.5, 0.35)}}
FUSION["miracl"] = FUSION["mkqa"] = FUSION["m3"]
# SPEC 6.2, the paper protocol per task: dense and sparse first-stage depth (first); dense candidates reranked by MaxSim
# (mv) and by all three heads (all, also the candidates of a row the paper did not have); its fused rows' weights are
# FUSION[task]. MIRACL's all depth is not in SPEC: we take MKQA's 100 (README).
PAPER = {"miracl": dict(first=1000, mv=200, all=100), "mkqa": dict(first=1000, mv=200, all=100),
         "mldr": dict(first=1000, mv=200, all=200)}


def row_weights(weights):
    """{row: (w_dense, w_sparse, w_colbert) floats} of every row of ROWS for a fusion setting: a FUSION name, or 3
    numbers w_d, w_s, w_c (a string: comma-separated), the all row's, whose dense+sparse row is (w_d, w_s, 0)."""
    if isinstance(weights, str) and weights in FUSION:
        fused = FUSION[weights]
    else:
        w = tuple(float(x) for x in (weights.split(",") if isinstance(weights, str) else weights))
        fused = {"dense+sparse": w[:2] + (0.0,), "all": w}
    return {row: tuple(float(x) for x in (fused[w] if isinstance(w, str) else w)) for row, (w, _) in ROWS.items()}


METRICS = ("nDCG@10", "MRR@10", "Recall@100", "Recall@1000")  # query_metrics's, in table order
PAPER_DEPTH = 100  # metrics of the paper protocol: nDCG@10, MRR@10, Recall@100 (the paper reports @10, @20, @100)
PAPER_ROWS = ("dense", "sparse", "multi-vector", "dense+sparse", "all")  # the rows paper_rows builds by the paper
IMPACT = 100  # SPEC 6.2: the Lucene impact index stores a weight w as int(ceil(100 w)); score = sum of products / 100^2


def release(x):
    """Drop the pages of the file mapping behind x (np.load(..., mmap_mode="r")) from this process's resident set; they
    stay in the page cache. A no-op for an array in memory."""
    while isinstance(x, np.ndarray):
        x = x.base
    if isinstance(x, mmap.mmap):
        x.madvise(mmap.MADV_DONTNEED)


def build_index(x, spec="Flat", params="", chunk=1 << 16):
    """FAISS inner-product index over the rows of x (n, D) from an index_factory string; trained on <=256k rows, filled
    chunk rows at a time as float32 (x may be float16 mapped from disk: it is never copied whole)."""
    index = faiss.index_factory(x.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = np.sort(np.random.default_rng(0).choice(len(x), min(len(x), 1 << 18), replace=False))  # O(sample)
        index.train(np.ascontiguousarray(x[sample], np.float32))
        release(x)
    for a in range(0, len(x), chunk):
        index.add(np.ascontiguousarray(x[a:a + chunk], np.float32))
        release(x)
    if params:  # e.g. "nprobe=64" for IVF, "efSearch=1024" for HNSW (must be >= depth)
        faiss.ParameterSpace().set_index_parameters(index, params)
    return index


def colbert_pass(Q, qrows, P, k, block_tokens=1 << 15, row_chunk=512):
    """One pass over every passage token vector for the queries qrows, read as float32 a block of whole passages at a
    time (they may be float16 or codec.Decoded, mapped from disk): from each similarity block, each query token's k
    nearest passage tokens (exact inner product, merged in a FAISS heap: what a Flat index finds; k 0: none) and every
    passage's MaxSim with each query (SPEC 1.3, as maxsim) -> (hits (the queries' tokens, k) token ids or None,
    S (len(qrows), N) float32; 0 for an empty passage or query). The float16 conversion is paid once per batch of
    queries, not once per query, and no token index is held."""
    ptr, vecs, n = P["cb_ptr"], P["cb_vecs"], len(P["cb_ptr"]) - 1
    qptr = Q["cb_ptr"][qrows[0]:qrows[-1] + 2]  # (nq+1,)
    q = np.ascontiguousarray(Q["cb_vecs"][qptr[0]:qptr[-1]], np.float32)  # (Tq, D) the batch's query tokens
    qlen = np.diff(qptr)
    qi = np.flatnonzero(qlen)  # queries with tokens; their first token's row in q: qptr[qi] - qptr[0]
    S = np.zeros((len(qrows), n), np.float32)
    heap = faiss.ResultHeap(len(q), k, keep_max=True) if k > 0 else None
    a = 0
    while a < n:
        b = max(a + 1, int(np.searchsorted(ptr, ptr[a] + block_tokens, "right")) - 1)  # passages a..b-1
        s0, s1 = ptr[a], ptr[b]
        if s1 > s0 and len(q):
            sim = q @ np.asarray(vecs[s0:s1], np.float32).T  # (Tq, s1 - s0)
            release(vecs)
            if heap:
                kk = min(k, s1 - s0)
                top = np.concatenate([np.argpartition(-sim[r:r + row_chunk], kk - 1, axis=1)[:, :kk]
                                      for r in range(0, len(q), row_chunk)])  # (Tq, kk) positions in the block
                heap.add_result(np.take_along_axis(sim, top, 1), top + s0)
            nz = a + np.flatnonzero(ptr[a + 1:b + 1] > ptr[a:b])  # the block's passages with tokens
            best = np.maximum.reduceat(sim, ptr[nz] - s0, axis=1)  # (Tq, len(nz)) each query token's best token
            S[np.ix_(qi, nz)] = np.add.reduceat(best, qptr[qi] - qptr[0], axis=0) / qlen[qi, None]  # mean over q
        a = b
    if heap:
        heap.finalize()
    return (heap.I if heap else None), S


def sparse_index(P, head_df=None, head_bytes=1 << 28):
    """Inverted index of the passages' sparse CSR: postings sorted by token id (toks, ptr, doc, w); the frequent
    tokens (df >= head_df, default N/32; at most head_bytes) also as dense rows head (n_head, N), for one matmul
    ("head": the head of the token frequency distribution, not a model head). Passage ids are int32 below 2^31."""
    n = len(P["sp_ptr"]) - 1
    order = np.argsort(P["sp_ids"], kind="stable")  # (nnz,) postings by token id, then passage
    sid = P["sp_ids"][order]  # (nnz,) token id of each posting
    release(P["sp_ids"])
    doc = np.repeat(np.arange(n, dtype=np.int32 if n < 1 << 31 else np.int64), np.diff(P["sp_ptr"]))[order]
    w = P["sp_w"][order]  # (nnz,) passage, weight
    release(P["sp_w"])
    del order
    start = np.flatnonzero(np.concatenate([[True], sid[1:] != sid[:-1]])) if len(sid) else np.zeros(0, np.int64)
    toks, ptr = sid[start], np.append(start, len(sid))  # (n_tok,) distinct ids; postings of toks[t]: ptr[t]:ptr[t + 1]
    del sid
    df = np.diff(ptr)  # (n_tok,)
    freq = np.argsort(-df, kind="stable")[:head_bytes // (4 * max(n, 1))]  # positions in toks, most frequent first
    freq = np.sort(freq[df[freq] >= (max(1, n // 32) if head_df is None else head_df)])
    head_row = np.full(len(toks), -1)  # (n_tok,) row in head, -1 for a token scored through its postings
    head_row[freq] = np.arange(len(freq))
    head = np.zeros((len(freq), n), np.float32)  # (n_head, N)
    for r, t in enumerate(freq):
        head[r, doc[ptr[t]:ptr[t + 1]]] = w[ptr[t]:ptr[t + 1]]
    return dict(toks=toks, ptr=ptr, doc=doc, w=w, n=n, head=head, head_row=head_row)


def sparse_search(inv, Q, qrows, k, tie=None, scores=False):
    """Exact top-k of s_lex = sum_v q[v] p[v] (SPEC 1.2) for queries qrows: frequent tokens by one matmul, the others
    by one bincount over their postings (a stop-word piece's postings cover most of the corpus). Per query the passages
    (with scores: (passages, float64 scores)); passages sharing no token are left out. Ties at the k-th score: the
    lowest tie ranks (tie: a rank per passage) when given, else any."""
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
    if not 0 < k < n:
        top = np.tile(np.arange(n), (len(qrows), 1))
    elif tie is None:
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    else:  # every passage above the k-th score, then the k-th score's passages by tie rank
        kth = -np.partition(-s, k - 1, axis=1)[:, k - 1]  # (nq,)
        top = []
        for r in range(len(qrows)):
            above, at = np.flatnonzero(s[r] > kth[r]), np.flatnonzero(s[r] == kth[r])
            top.append(np.concatenate([above, at[np.argsort(tie[at], kind="stable")[:k - len(above)]]]))
    top = [t[s[r, t] > 0] for r, t in enumerate(top)]  # passages sharing no token are not candidates
    return [(t, s[r, t]) for r, t in enumerate(top)] if scores else top


def segments(ptr, rows):
    """Flat positions of CSR rows `rows` (in order) and, for each position, its index into rows.
    E.g. ptr [0, 2, 5], rows [1, 0] -> positions [2, 3, 4, 0, 1], index [0, 0, 0, 1, 1]."""
    lens = ptr[rows + 1] - ptr[rows]
    seg = np.repeat(np.arange(len(rows)), lens)
    return np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens - ptr[rows], lens), seg  # ptr[row] + offset


def sparse_pairs(Q, i, P, cand):
    """Exact lexical scores of query i with passages cand: sum over shared token ids of w_q w_p; (n,)."""
    qi, qw = Q["sp_ids"][Q["sp_ptr"][i]:Q["sp_ptr"][i + 1]], Q["sp_w"][Q["sp_ptr"][i]:Q["sp_ptr"][i + 1]]
    if len(qi) == 0:
        return np.zeros(len(cand), np.float32)
    pos, seg = segments(P["sp_ptr"], cand)  # the candidates' (token, weight) entries; seg: index into cand
    pi = P["sp_ids"][pos]
    t = np.searchsorted(qi, pi).clip(max=len(qi) - 1)  # query ids are sorted (pack)
    hit = qi[t] == pi
    out = np.bincount(seg[hit], weights=qw[t[hit]] * P["sp_w"][pos[hit]], minlength=len(cand)).astype(np.float32)
    release(P["sp_ids"])
    release(P["sp_w"])
    return out


def maxsim(Q, i, P, cand, max_tokens=1 << 16):
    """Exact ColBERT scores mean_a max_b q_a . p_b (SPEC 1.3) of query i with passages cand; (n,). Chunks of at most
    max_tokens candidate tokens in passage order; a chunk covering >= 1/3 of its token span multiplies that span.
    Passage tokens are read as float32 (a float16 store: exactly its values), then released."""
    q = Q["cb_vecs"][Q["cb_ptr"][i]:Q["cb_ptr"][i + 1]]  # (Lq, D)
    ptr, vecs, out = P["cb_ptr"], P["cb_vecs"], np.zeros(len(cand), np.float32)
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
        if 3 * (end[b - 1] - end[a] + lens[a]) >= s1 - s0:  # dense chunk: no gather, segments interleaved with gaps
            sim = q @ np.asarray(vecs[s0:s1], np.float32).T  # (Lq, span)
            starts = np.stack([ptr[c[a:b]], ptr[c[a:b] + 1]], 1).ravel()[:-1] - s0
            out[nz[a:b]] = np.maximum.reduceat(sim, starts, axis=1)[:, ::2].mean(0)
        else:  # sparse chunk: gather the candidates' tokens
            pos, _ = segments(ptr, c[a:b])
            sim = q @ np.asarray(vecs[pos], np.float32).T  # (Lq, sum of the chunk's passage lengths)
            out[nz[a:b]] = np.maximum.reduceat(sim, np.cumsum(lens[a:b]) - lens[a:b], axis=1).mean(0)
        release(vecs)
        a = b
    return out

# ----------------------------------------------------------------- the exact protocol: candidates, scores, fusion


def retrieve(Q, P, depth=1000, index="Flat", index_params="", colbert_index="Flat", colbert_k=64,
             use=(True, True, True), qbatch=64, progress=True):
    """Per query (cand (n,), s (3, n), src (3, n)): union of dense top-depth, sparse top-depth and colbert token hits
    (each query token's colbert_k nearest passage tokens; all passages if colbert_k <= 0; none if None: colbert then
    only scores the others' candidates, a rerank); s = exact scores of all heads; src = which heads found it. use: the
    heads to run (the others score 0 and find nothing). progress: a progress bar past one batch of queries."""
    nq, n = len(Q["dense"]), len(P["dense"])
    params = lambda spec: "" if spec == "Flat" else index_params  # search parameters go to every non-Flat index
    dense_top = build_index(P["dense"], index, params(index)).search(Q["dense"], min(depth, n))[1] if use[0] else None
    inv = sparse_index(P) if use[1] else None
    tok_index = None  # Flat (and exhaustive): no index, each batch of queries streams the tokens (colbert_pass)
    if use[2] and colbert_k is not None and colbert_k > 0 and colbert_index != "Flat":
        tok_index = build_index(P["cb_vecs"], colbert_index, params(colbert_index))
    tok2doc = np.repeat(np.arange(n), np.diff(P["cb_ptr"])) if use[2] else None  # (total passage tokens,)
    qbatch = max(1, min(qbatch, (1 << 25) // max(n, 1)))  # bounds the (qbatch, N) sparse score block
    results, empty = [], np.zeros(0, np.int64)
    for a in tqdm(range(0, nq, qbatch), desc="retrieve", disable=not progress or nq <= qbatch):
        rows = np.arange(a, min(a + qbatch, nq))
        sparse_top = sparse_search(inv, Q, rows, depth) if use[1] else [empty] * len(rows)
        hits, S = None, None  # S: (len(rows), N) every passage's MaxSim, from one pass over the tokens
        if use[2] and colbert_k is not None and tok_index is None:
            hits, S = colbert_pass(Q, rows, P, min(max(colbert_k, 0), len(tok2doc)))
        elif tok_index is not None:
            ta, tb = Q["cb_ptr"][rows[0]], Q["cb_ptr"][rows[-1] + 1]
            hits = tok_index.search(Q["cb_vecs"][ta:tb], min(colbert_k, len(tok2doc)))[1]  # (batch tokens, k)
        if not use[2] or colbert_k is None:
            colbert_hits = [empty] * len(rows)
        elif colbert_k <= 0:  # exhaustive: every passage is a candidate
            colbert_hits = [np.arange(n)] * len(rows)
        else:
            split = np.split(hits, Q["cb_ptr"][rows[1:]] - Q["cb_ptr"][rows[0]])  # per query: its tokens' hits
            colbert_hits = [np.unique(tok2doc[h[h >= 0]]) for h in split]
        for r, i in enumerate(rows):
            lists = [dense_top[i][dense_top[i] >= 0] if use[0] else empty, sparse_top[r], colbert_hits[r]]
            cand = np.unique(np.concatenate(lists))  # (n,)
            src = np.stack([np.isin(cand, l) for l in lists])  # (3, n)
            results.append((cand, exact_scores(Q, i, P, cand, use, None if S is None else S[r, cand]), src))
    return results


def exact_scores(Q, i, P, cand, use=(True, True, True), colbert=None):
    """Exact (dense, sparse, colbert) scores of query i with passages cand; (3, n), zeros for heads not in use.
    colbert: the candidates' MaxSim scores when already computed (colbert_pass)."""
    fns = (dense_pairs, sparse_pairs, maxsim if colbert is None else lambda *_: colbert)
    return np.stack([f(Q, i, P, cand) if u else np.zeros(len(cand), np.float32) for f, u in zip(fns, use)])


def dense_pairs(Q, i, P, cand):
    """Exact dense scores e_q . e_p of query i with passages cand; (n,)."""
    s = P["dense"][cand] @ Q["dense"][i]  # (n, D) @ (D,)
    release(P["dense"])
    return s


def fuse(results, w, depth, tie, score=weighted_sum):
    """Per query (top passages, fused scores): candidates of the heads with w_h != 0 ranked by score(s, w) (a row of
    ROWS: by default sum_h w_h s_h), ties by doc id (tie = rank of each passage's id in string order)."""
    w = np.asarray(w, np.float32)
    out = []
    for cand, s, src in results:
        keep = src[w != 0].any(0)
        c, f = cand[keep], score(s[:, keep], w)  # (3, n') -> (n',)
        order = np.lexsort((tie[c], -f))[:depth]  # primary key last: score desc, then doc id asc
        out.append((c[order], f[order]))
    return out


# ----------------------------------------------------------------------------- the paper's protocol (SPEC 6.2)


def impact(w):
    """Lucene impact weights: int(ceil(100 w)) as float32 (exact integers, so equal sums tie exactly)."""
    return np.ceil(np.asarray(w, np.float64) * IMPACT).astype(np.float32)


def ranked(cand, score, tie, depth=None):
    """(passages, scores) by score descending, then tie rank ascending, the first depth."""
    order = np.lexsort((tie[cand], -score))[:depth]  # primary key last
    return cand[order], score[order]


def fuse_lists(lists, w, tie, depth):
    """Weighted sum over (passages, scores) lists in float64; a passage missing from a list gets 0 for it (SPEC 6.2)."""
    cand = np.unique(np.concatenate([c for c, _ in lists]))  # (n,)
    f = np.zeros(len(cand), np.float64)
    for (c, s), wi in zip(lists, w):
        f[np.searchsorted(cand, c)] += np.float64(wi) * np.asarray(s, np.float64)
    return ranked(cand, f, tie, depth)


def paper_indices(P, index="Flat", index_params=""):
    """The paper protocol's first stages: the sparse inverted index of impact weights, then the dense FAISS index (in
    this order, so their build peaks do not add up)."""
    inv = sparse_index(dict(P, sp_w=impact(P["sp_w"])))
    release(P["sp_w"])
    return inv, build_index(P["dense"], index, index_params)


def paper_rows(Q, P, task, tie, index="Flat", index_params="", qbatch=32, progress=True, indices=None, encode=None,
               encode_chunk=1024):
    """Every row of ROWS, the paper's five as SPEC 6.2 built them; task: a PAPER name or a dict like its entries (with
    "fusion": the fused rows' weights, else FUSION[task]). Per row, per query (passages, scores), ranked by score, then
    tie (a rank per passage). dense: FAISS top-first; sparse: impact-quantised top-first (score / 100^2); multi-vector:
    MaxSim reranks the dense top-mv; dense+sparse: the two top-first lists fused, 0 for a passage missing from one;
    all: the dense top-all reranked by the weighted average of exact dense, sparse and MaxSim scores; a row the paper
    did not have: the dense top-all reranked by its own score of the exact scores.
    indices: paper_indices(P, ...) when already built. encode: None, MaxSim over P's token vectors; else a function
    passage ids -> their token vectors {"cb_ptr", "cb_vecs"} (packed.TokenEncoder), called for the union of a query
    batch's reranked candidates (the dense top-max(mv, all)), encode_chunk passages a call (encoded_maxsim)."""
    cfg = PAPER[task] if isinstance(task, str) else task
    fused = cfg.get("fusion") or FUSION[task]
    n, nq = len(P["sp_ptr"]) - 1, len(Q["dense"])
    inv, dense = indices or paper_indices(P, index, index_params)
    Qi = dict(Q, sp_w=impact(Q["sp_w"]))
    k, k_mv = min(max(cfg["first"], cfg["mv"], cfg["all"]), n), max(cfg["mv"], cfg["all"])
    w_all = np.asarray(fused["all"], np.float64)
    others = {row: (np.asarray(fused[w] if isinstance(w, str) else w, np.float64), f) for row, (w, f) in ROWS.items()
              if row not in PAPER_ROWS}
    out = {row: [] for row in ROWS}
    d_s, d_i = np.zeros((nq, k), np.float32), np.zeros((nq, k), np.int64)  # (nq, k) dense top-k of every query
    for a in range(0, nq, 4096):  # all at once: FAISS Flat is 10x faster per query at 1,024 queries than at 32
        d_s[a:a + 4096], d_i[a:a + 4096] = dense.search(np.ascontiguousarray(Q["dense"][a:a + 4096], np.float32), k)
    for a in tqdm(range(0, nq, qbatch), desc="paper protocol", disable=not progress or nq <= qbatch):
        qrows = np.arange(a, min(a + qbatch, nq))
        sparse = sparse_search(inv, Qi, qrows, cfg["first"], tie, scores=True)
        first = [ranked(d_i[i][d_i[i] >= 0], d_s[i][d_i[i] >= 0], tie) for i in qrows]  # FAISS order, ties by tie rank
        if encode is None:  # per query: (<= k_mv,) MaxSim of the dense top candidates
            mv = [maxsim(Q, i, P, dc[:k_mv]) for i, (dc, _) in zip(qrows, first)]
        else:
            mv = encoded_maxsim(Q, qrows, [dc[:k_mv] for dc, _ in first], encode, encode_chunk)
        for r, i in enumerate(qrows):
            (dc, ds), c = first[r], mv[r]
            sc, ss = ranked(sparse[r][0], sparse[r][1] / IMPACT ** 2, tie)
            out["dense"].append((dc[:cfg["first"]], ds[:cfg["first"]]))
            out["sparse"].append((sc, ss))
            out["multi-vector"].append(ranked(dc[:cfg["mv"]], c[:cfg["mv"]], tie))
            out["dense+sparse"].append(fuse_lists([(dc[:cfg["first"]], ds[:cfg["first"]]), (sc, ss)],
                                                  fused["dense+sparse"][:2], tie, cfg["first"]))
            ca = dc[:cfg["all"]]
            s3 = np.stack([ds[:cfg["all"]], sparse_pairs(Q, i, P, ca), c[:cfg["all"]]]).astype(np.float64)  # (3, n)
            out["all"].append(ranked(ca, w_all @ s3 / w_all.sum(), tie))  # compute_score's weighted average
            for row, (w, score) in others.items():
                out[row].append(ranked(ca, score(s3, w), tie))
    return out


def encoded_maxsim(Q, qrows, cands, encode, chunk=1024):
    """MaxSim of query qrows[r] with passages cands[r], for each r, over token vectors encoded now: encode(ids) gives
    {"cb_ptr", "cb_vecs"} of passages ids (ascending), called for the union of cands, each passage once, chunk
    passages a call (what bounds the token vectors held at once); scored by maxsim as stored ones are. Per r: (n_r,)."""
    union = np.unique(np.concatenate(cands)) if cands else np.zeros(0, np.int64)  # (u,) ascending, each passage once
    out = [np.zeros(len(c), np.float32) for c in cands]
    for a in range(0, len(union), chunk):
        part = union[a:a + chunk]  # a range of the sorted union: a candidate is in it iff part[0] <= it <= part[-1]
        T = encode(part)  # cb_ptr (len(part) + 1,), cb_vecs (tokens of part, D)
        for r, i in enumerate(qrows):
            at = np.flatnonzero((cands[r] >= part[0]) & (cands[r] <= part[-1]))  # positions in cands[r]
            out[r][at] = maxsim(Q, i, T, np.searchsorted(part, cands[r][at]))
    return out


# ----------------------------------------------------------------------------- metrics of a ranking


def run_metrics(ranked, qrels_list, langs, depth):
    """Mean of query_metrics over queries, a per-language mean when queries carry a lang field, and each query's
    nDCG@10 (bench/quality.py's paired intervals)."""
    per_q = [query_metrics(r, rels, depth) for r, rels in zip(ranked, qrels_list)]
    mean = lambda ms: {k: round(float(np.mean([m[k] for m in ms])), 6) for k in ms[0]} if ms else {}
    by_lang = {l: mean([m for m, ql in zip(per_q, langs) if ql == l]) for l in sorted(set(langs) - {None})}
    return mean(per_q), by_lang, [round(float(m["nDCG@10"]), 6) for m in per_q]


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


def macro(per_lang):
    """{row: {metric: mean over languages}} of {lang: {row: {metric: value}}}: every language weighs the same."""
    rows = next(iter(per_lang.values()))
    return {row: {k: round(float(np.mean([r[row][k] for r in per_lang.values()])), 6) for k in m}
            for row, m in rows.items()}
