"""Mine hard negatives with an M3 checkpoint: per query, negatives drawn from the fused ranks lo-hi (SPEC.md 6).

python mine.py --ckpt DIR --data DIR --split train --range 10-100 --n_neg 7 --out mined.jsonl [--scores]
python mine.py --ckpt DIR --jsonl train.jsonl [--corpus corpus.jsonl] --range 10-100 --out mined.jsonl
Retrieval and fusion are eval.py's (every head retrieves on its own, the union gets exact scores); a head with weight 0
is not run. Output: FlagEmbedding JSONL {query, pos, neg[, pos_scores, neg_scores]}, --jsonl's other fields kept.
--query_prefix / --passage_prefix are encoded as training applies them (a --jsonl line's prompt wins); the records
keep the bare texts.
"""
import json
import os
import sys

import numpy as np

import eval as ev
import search
from beir import load_beir, passage_text, read_jsonl
from jsonl_index import check_example, query_text
from packed import encode_cached, model_loader
from runtime import output_error, run_command, write_atomic


def mine(model, queries, positives, passages, lo=10, hi=100, n_neg=7, weights="m3", seed=0, scores=False,
         query_max_len=64, passage_max_len=512, batch_size=32, index="Flat", index_params="", colbert_index="Flat",
         colbert_k=64, cache_dir=None, query_prefix="", passage_prefix="", prompts=None):
    """FlagEmbedding records {query, pos, neg[, pos_scores, neg_scores]}: n_neg negatives drawn uniformly from the fused
    ranks [lo, hi) (0-based, positives keep their ranks) minus positives, texts equal to a positive, and the query;
    None for a query without a positive or left without a negative (main reports and drops them).
    positives[i]: indices into passages; weights: a search.FUSION name (its all-three row) or 3 numbers. Encoded:
    prompts[i] (a line's prompt, if not None) or query_prefix + query i, passage_prefix + passage."""
    error = ev.option_error(weights, ranks=(lo, hi), n_neg=n_neg, colbert_k=colbert_k, batch_size=batch_size,
                            query_max_len=query_max_len, passage_max_len=passage_max_len)
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
    for i, (q, pos) in enumerate(zip(queries, positives)):
        pos = np.asarray(pos, np.int64)
        bad, bad_text = set(pos.tolist()), {passages[j] for j in pos} | {q}
        top, f = fused[i][0][lo:hi], fused[i][1][lo:hi]  # (<= hi - lo,) passages and fused scores at ranks lo..hi-1
        ok = np.array([j not in bad and passages[j] not in bad_text for j in top], bool)
        pick = np.sort(rng.choice(ok.sum(), min(n_neg, ok.sum()), replace=False))  # in rank order
        if len(pos) == 0 or len(pick) == 0:
            out.append(None)
            continue
        rec = {"query": q, "pos": [passages[j] for j in pos], "neg": [passages[j] for j in top[ok][pick]]}
        if scores:
            rec["pos_scores"] = [float(x) for x in w @ search.exact_scores(Q, i, P, pos, use)]  # (3,) @ (3, n_pos)
            rec["neg_scores"] = [float(x) for x in f[ok][pick]]
        out.append(rec)
    return out


def main(argv=None):
    p = ev.cli_parser(__doc__, split="train")
    p.add_argument("--jsonl", help="FlagEmbedding JSONL (query, pos[, neg]) instead of --data")
    p.add_argument("--corpus", help="passage pool for --jsonl: JSONL with text (+title); default: pos+neg texts")
    p.add_argument("--range", default="10-100", help="0-based fused ranks lo-hi (hi excluded) to sample from")
    p.add_argument("--n_neg", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scores", action="store_true", help="add pos_scores/neg_scores = the model's fused score")
    p.add_argument("--out", required=True, help="output JSONL; never an input, never a file of --data")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    model, kw = ev.cli_setup(p, a, None if a.jsonl else a.data, a.range, n_neg=a.n_neg)  # --jsonl wins over --data
    if not (a.data or a.jsonl):
        p.error("mine needs --data or --jsonl")
    if a.corpus and not a.jsonl:
        p.error("--corpus is the passage pool of --jsonl; with --data the pool is the data's corpus.jsonl")
    error = output_error(a.out, "--out", inputs=(a.jsonl, a.corpus), folders=() if a.jsonl else (a.data,),
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
    mined = mine(model, queries, positives, pool, lo, hi, a.n_neg, a.weights, a.seed, a.scores, **kw)
    no_neg = [i for i, m in enumerate(mined) if m is None and positives[i]]
    for why, bad in (("no positive in the corpus", [i for i, p in enumerate(positives) if not p]),
                     (f"no negative in ranks {lo}-{hi}", no_neg)):
        if bad:
            print(f"left out {len(bad)} of {len(queries)} queries with {why} (e.g. {queries[bad[0]][:60]!r})")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    keep = lambda r: {k: v for k, v in r.items() if k not in ("pos_scores", "neg_scores")}  # --jsonl's other fields
    out = [{**keep(r), **m} for r, m in zip(recs, mined) if m is not None]
    write_atomic(a.out, (json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    print(f"wrote {len(out)} records to {a.out}; ranks {lo}-{hi}, {a.n_neg} negatives each")
    return out


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
