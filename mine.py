"""Mine hard negatives with an M3 checkpoint: per query, negatives drawn from the fused ranks lo-hi (SPEC.md 6).

python mine.py --ckpt DIR --data DIR --split train --range 10-100 --n_neg 7 --out mined.jsonl [--scores]
python mine.py --ckpt DIR --jsonl train.jsonl [--corpus corpus.jsonl] --range 10-100 --out mined.jsonl
python mine.py ... --max_pos_ratio 0.95 [--min_margin 0.05] [--drop_short]   # positive-aware: no false negatives
python mine.py --teacher CROSS_ENCODER --jsonl in.jsonl --out out.jsonl      # + pos_scores/neg_scores for teacher_kd
Retrieval and fusion are eval.py's (every head retrieves on its own, the union gets exact scores); a head with weight 0
is not run. Output: FlagEmbedding JSONL {query, pos, neg[, pos_scores, neg_scores]}, --jsonl's other fields kept, and
<out>.stats.json: what was mined and filtered (a training folder's file list leaves it out).
--query_prefix / --passage_prefix are encoded as training applies them (a --jsonl line's prompt wins); the records
keep the bare texts.
Positive-aware mining (NV-Retriever, 2024): before the draw, a candidate at ranks lo-hi is dropped when its dense score
is >= R x the positive's (--max_pos_ratio R) or within M of it (--min_margin M); p = the lowest positive's score, exact
whether the positive was retrieved or not. The dense score (the cosine of the normalized embeddings), not the fused one:
a ratio needs a fixed scale on which 0 means unrelated. The cosine lies in [-1, 1] whatever --weights are, and it is
the score NV-Retriever's ratios were tuned on (its teacher's embedding cosine); the fused score adds the sparse score,
which is unbounded and grows with the query's length (0.95 of it would mean another thing per query), and its scale
changes with --weights. A positive of dense score p <= 0 (the model finds it unrelated) gets the threshold p: R x p
would lie above p and keep candidates that outscore the positive.
--teacher: every pair's logit from a Hugging Face sequence-classification cross-encoder with one label (a reranker such
as BAAI/bge-reranker-v2-m3), resumable; the M3 checkpoint's own fused scores stay --scores.
"""
import json
import math
import os
import sys

import numpy as np

import eval as ev
import search
import teacher
from beir import load_beir, passage_text, read_jsonl
from jsonl_index import MINE_STATS, check_example, query_text
from packed import encode_cached, model_loader
from runtime import output_error, run_command, write_atomic

STATS = MINE_STATS  # <out>.stats.json beside the output


def positive_aware(cand, pos, max_pos_ratio=None, min_margin=None):
    """(ratio, margin): boolean masks (n,) of the candidates each rule drops, from the dense scores of the candidates
    cand (n,) and of the query's positives pos (>= 1), compared in float64; p = min(pos). ratio: cand >= min(R p, p)
    (R p for p > 0); margin: cand > p - M. A rule that is None drops nothing."""
    s, p = np.asarray(cand, np.float64), float(np.min(pos))
    ratio = s >= min(max_pos_ratio * p, p) if max_pos_ratio is not None else np.zeros(len(s), bool)
    margin = s > p - min_margin if min_margin is not None else np.zeros(len(s), bool)
    return ratio, margin


def filter_error(max_pos_ratio, min_margin, prefix=""):
    """What is wrong with the positive-aware options (None: off), naming the option, or None."""
    if max_pos_ratio is not None and not (math.isfinite(max_pos_ratio) and 0 < max_pos_ratio <= 1):
        return f"{prefix}max_pos_ratio: expected a number R with 0 < R <= 1 (e.g. 0.95); got {max_pos_ratio!r}"
    if min_margin is not None and not (math.isfinite(min_margin) and min_margin >= 0):
        return f"{prefix}min_margin: expected a number M >= 0 (e.g. 0.05); got {min_margin!r}"
    return None


def mine(model, queries, positives, passages, lo=10, hi=100, n_neg=7, weights="m3", seed=0, scores=False,
         query_max_len=64, passage_max_len=512, batch_size=32, index="Flat", index_params="", colbert_index="Flat",
         colbert_k=64, cache_dir=None, query_prefix="", passage_prefix="", prompts=None, max_pos_ratio=None,
         min_margin=None, stats=None, dropped=None):
    """FlagEmbedding records {query, pos, neg[, pos_scores, neg_scores]}: n_neg negatives drawn uniformly from the fused
    ranks [lo, hi) (0-based, positives keep their ranks) minus positives, texts equal to a positive, the query and the
    candidates positive_aware drops (dense scores; off by default), fewer where fewer are left (none: training borrows
    other examples' negatives for it); None for a query without a positive, or, with scores, left without a negative
    (teacher_kd has no score for a borrowed one): main reports and leaves them out. positives[i]: indices into
    passages; weights: a search.FUSION name (its all-three row) or 3 numbers. Encoded: prompts[i] (a line's prompt, if
    not None) or query_prefix + query i, passage_prefix + passage. stats: a dict to receive the candidates at ranks
    lo-hi of the queries with a positive and how many each rule dropped (a candidate both drop counts in each, once in
    dropped). dropped: a list to receive (query index, passage index, its dense score, the lowest positive's) for
    every candidate the filter drops."""
    error = ev.option_error(weights, ranks=(lo, hi), n_neg=n_neg, colbert_k=colbert_k, batch_size=batch_size,
                            query_max_len=query_max_len, passage_max_len=passage_max_len)
    error = error or filter_error(max_pos_ratio, min_margin)
    if not error and lo >= len(passages):
        error = f"range: {lo}-{hi} starts past the passage pool's end ({len(passages)} passages): no negative to draw"
    if error:
        raise ValueError(error)
    weights = search.row_weights(weights)["all"]
    get_model, key, _ = model_loader(model, need_key=bool(cache_dir))
    P = encode_cached(get_model, [passage_prefix + t for t in passages], passage_max_len, batch_size, False,
                         cache_dir, key)
    q_texts = [query_text({"query": q, "prompt": prompts[i] if prompts else None}, query_prefix)
               for i, q in enumerate(queries)]
    Q = encode_cached(get_model, q_texts, query_max_len, batch_size, False, cache_dir, key)
    use = tuple(w != 0 for w in weights)
    tie = np.arange(len(passages))  # passages have no ids here: ties by position
    fused = search.fuse(search.retrieve(Q, P, hi, index, index_params, colbert_index, colbert_k, use), weights, hi, tie)
    rng, w, out = np.random.default_rng(seed), np.asarray(weights, np.float32), []
    counts = dict(candidates_in_window=0, dropped_by_ratio=0, dropped_by_margin=0, dropped=0)
    for i, (q, pos) in enumerate(zip(queries, positives)):
        pos = np.asarray(pos, np.int64)
        bad, bad_text = set(pos.tolist()), {passages[j] for j in pos} | {q}
        top, f = fused[i][0][lo:hi], fused[i][1][lo:hi]  # (<= hi - lo,) passages and fused scores at ranks lo..hi-1
        ok = np.array([j not in bad and passages[j] not in bad_text for j in top], bool)
        if len(pos):
            counts["candidates_in_window"] += int(ok.sum())
        if len(pos) and (max_pos_ratio is not None or min_margin is not None):  # the positives' exact dense scores
            s, p = search.dense_pairs(Q, i, P, top[ok]), search.dense_pairs(Q, i, P, pos)
            ratio, margin = positive_aware(s, p, max_pos_ratio, min_margin)
            if dropped is not None:
                drop = ratio | margin
                dropped += [(i, int(j), float(x), float(np.min(p))) for j, x in zip(top[ok][drop], s[drop])]
            for k, n in (("dropped_by_ratio", ratio), ("dropped_by_margin", margin), ("dropped", ratio | margin)):
                counts[k] += int(n.sum())
            ok[ok] = ~(ratio | margin)
        pick = np.sort(rng.choice(ok.sum(), min(n_neg, ok.sum()), replace=False))  # in rank order
        if len(pos) == 0 or scores and len(pick) == 0:
            out.append(None)
            continue
        rec = {"query": q, "pos": [passages[j] for j in pos], "neg": [passages[j] for j in top[ok][pick]]}
        if scores:
            rec["pos_scores"] = [float(x) for x in w @ search.exact_scores(Q, i, P, pos, use)]  # (3,) @ (3, n_pos)
            rec["neg_scores"] = [float(x) for x in f[ok][pick]]
        out.append(rec)
    if stats is not None:
        stats.update(counts)
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(x == "--teacher" or x.startswith("--teacher=") for x in argv):
        return teacher.main(argv)  # teacher.py
    p = ev.cli_parser(__doc__, split="train")
    p.add_argument("--jsonl", help="FlagEmbedding JSONL (query, pos[, neg]) instead of --data")
    p.add_argument("--corpus", help="passage pool for --jsonl: JSONL with text (+title); default: pos+neg texts")
    p.add_argument("--range", default="10-100", help="0-based fused ranks lo-hi (hi excluded) to sample from")
    p.add_argument("--n_neg", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scores", action="store_true", help="add pos_scores/neg_scores = the model's fused score")
    p.add_argument("--max_pos_ratio", type=float, metavar="R", help="drop a candidate whose dense score is >= R x the "
                   "positive's (several: the lowest); 0 < R <= 1, e.g. 0.95 (default: off)")
    p.add_argument("--min_margin", type=float, metavar="M", help="drop a candidate whose dense score is > the "
                   "positive's - M; M >= 0 (default: off)")
    p.add_argument("--drop_short", action="store_true", help="drop a query left with fewer than --n_neg negatives "
                   "(default: kept with fewer)")
    p.add_argument("--out", required=True, help="output JSONL; never an input, never a file of --data")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a = p.parse_args(argv)
    error = filter_error(a.max_pos_ratio, a.min_margin, "--")
    if error:
        p.error(error)
    model, kw = ev.cli_setup(p, a, None if a.jsonl else a.data, a.range, n_neg=a.n_neg)  # --jsonl wins over --data
    if not (a.data or a.jsonl):
        p.error("mine needs --data or --jsonl")
    if a.corpus and not a.jsonl:
        p.error("--corpus is the passage pool of --jsonl; with --data the pool is the data's corpus.jsonl")
    for path, what in ((a.out, "--out"), (a.out + STATS, "--out's stats file")):
        error = output_error(path, what, inputs=(a.jsonl, a.corpus), folders=() if a.jsonl else (a.data,),
                             overwrite=a.overwrite)
        if error:
            p.error(error)
    lo, hi = (int(x) for x in a.range.split("-"))
    if a.jsonl:
        recs = read_jsonl(a.jsonl, check=check_example)  # the training format (SPEC 4.1), as train.py checks it
        pool = ([passage_text(r) for r in read_jsonl(a.corpus, ("text",))] if a.corpus else
                [t for r in recs for t in r["pos"] + r.get("neg", [])])
        pool = list(dict.fromkeys(pool + [t for r in recs for t in r["pos"]]))  # dedup, keep order; positives included
        at = {t: j for j, t in enumerate(pool)}
        queries, positives = [r["query"] for r in recs], [[at[t] for t in r["pos"]] for r in recs]
        kw["prompts"] = [r.get("prompt") for r in recs]
    else:
        corpus, qs, qrels, _ = load_beir(a.data, a.split)
        pool, at = [passage_text(r) for r in corpus], {r["_id"]: j for j, r in enumerate(corpus)}
        recs = [{} for _ in qs]
        queries = [r["text"] for r in qs]
        positives = [[at[d] for d, rel in qrels[r["_id"]].items() if rel > 0 and d in at] for r in qs]
    counts = {}
    mined = mine(model, queries, positives, pool, lo, hi, a.n_neg, a.weights, a.seed, a.scores, **kw,
                 max_pos_ratio=a.max_pos_ratio, min_margin=a.min_margin, stats=counts)
    no_neg = [i for i, m in enumerate(mined) if m is None and positives[i]]  # --scores only
    short = [i for i, m in enumerate(mined) if m is not None and len(m["neg"]) < a.n_neg]
    empty = sum(not mined[i]["neg"] for i in short)
    if a.drop_short:
        mined = [m if m is None or len(m["neg"]) == a.n_neg else None for m in mined]
    elif short:
        print(f"kept {len(short)} of {len(queries)} queries with fewer than {a.n_neg} negatives, {empty} with none "
              f"(training borrows other examples' negatives for those) (e.g. {queries[short[0]][:60]!r}); "
              "--drop_short leaves them out")
    for why, bad in (("no positive in the corpus", [i for i, p in enumerate(positives) if not p]),
                     (f"no negative in ranks {lo}-{hi} (--scores: a borrowed one has no teacher score)", no_neg),
                     (f"fewer than {a.n_neg} negatives (--drop_short)", short if a.drop_short else [])):
        if bad:
            print(f"left out {len(bad)} of {len(queries)} queries with {why} (e.g. {queries[bad[0]][:60]!r})")
    if a.max_pos_ratio is not None or a.min_margin is not None:
        print(f"positive-aware: of {counts['candidates_in_window']} candidates in ranks {lo}-{hi}, dropped "
              f"{counts['dropped_by_ratio']} by --max_pos_ratio, {counts['dropped_by_margin']} by --min_margin "
              f"({counts['dropped']} in all)")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    out = [{**teacher.without_scores(r), **m} for r, m in zip(recs, mined) if m is not None]  # --jsonl's other fields
    stats = dict(queries=len(queries), queries_written=len(out), queries_dropped=len(queries) - len(out), **counts,
                 queries_short=len(no_neg) + len(short), range=[lo, hi], n_neg=a.n_neg, score="dense",
                 max_pos_ratio=a.max_pos_ratio, min_margin=a.min_margin, drop_short=a.drop_short)
    write_atomic(a.out, (json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    write_atomic(a.out + STATS, [json.dumps(stats, indent=1) + "\n"])
    print(f"wrote {len(out)} records to {a.out}; ranks {lo}-{hi}, {a.n_neg} negatives each; counts in {a.out + STATS}")
    return out


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
