"""Evaluate an M3 checkpoint on BEIR-layout data with all three heads and their fusion (SPEC.md 6); mine.py mines.

python eval.py --ckpt DIR --data DIR [--split test] [--weights m3|mldr|1,0.3,1] [--sweep] [--index Flat]
python eval.py --ckpt DIR --data DIR --tune_on train   # + fusion rows whose weights the train queries chose
python eval.py --ckpt DIR --data DIR --protocol paper --task miracl|mkqa|mldr [--store DIR]   # the paper's rows
python eval.py ... --protocol paper --colbert_from encode   # a store without token vectors: candidates encoded now
python eval.py --ckpt minilm --new_heads --pooling mean --data data/scifact     # a bare encoder, zero-shot (dense row)
[torchrun --nproc_per_node 8] eval.py encode --ckpt DIR --data DIR --store DIR  # passages to a store (store.py)
python eval.py encode ... --tokens int8|pq32     # token vectors 2x / 22x smaller than float16 on disk (codec.py)
--protocol exact (the default): each head retrieves on its own (dense: FAISS; sparse: exact inverted index;
multi-vector: each query token's nearest passage tokens, then exact MaxSim). Every candidate of the union then gets the
exact score of every head, so fusion never fills in 0 for a passage that one head missed. Passages are encoded into a
store (store.py: in --cache_dir, or --store) and memory-mapped from it; passage token vectors are float16 there (and in
memory with --cache_dir ''), so a corpus's token vectors are never in RAM whole. --protocol paper: each row as the paper
built it (search.paper_rows, SPEC 6.2), passage token vectors read from a store on disk for the candidates only, or with
--colbert_from encode (the default for a store written with it) a store of dense and sparse only, the candidates' token
vectors encoded for each batch of queries (each passage once a batch; res["colbert_encoded_per_query"]).
Ranking ties everywhere: score descending, then doc id ascending (string order). --data may also be a folder of
per-language BEIR folders (MIRACL/MLDR layout): each is evaluated, rows are the macro average (--langs: a subset).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from beir import data_error, lang_dirs, load_beir, passage_text
from logs import check_out, default_out, eval_to_tensorboard
from model import M3, POOLINGS
from packed import TokenEncoder, encode_cached, inference_device, model_loader
from runtime import run_command, writable_error, write_atomic
from search import (FUSION, METRICS, PAPER, PAPER_DEPTH, ROWS, fuse, macro, paper_rows, retrieve, row_weights,
                    run_metrics)
from st_layout import prompts as st_prompts
from shards import encode_corpora, encode_store
from store import (COLBERT_FROM, as_stored, resolve_colbert_from, resolve_tokens, store_meta, store_name,
                   without_tokens)

PROTOCOLS = ("exact", "paper")  # --protocol: every head retrieves and the union is scored exactly; or SPEC 6.2's rows
TUNED = {"tuned d+s": "dense+sparse", "tuned all": "all"}  # --tune_on's rows: these fused rows with tuned weights
# --sweep's grid and --tune_on's choices (w_dense, w_sparse, w_colbert); weights are scale-free: the grid spans the
# ratios sparse/dense 0.1-10 and colbert/dense 0.5-10 (on SciFact the best lie at colbert/dense 3-10: RESULTS.md)
SWEEP = [(d, s, c) for d in (0, 0.1, 0.2, 0.3, 0.5, 1) for s in (0, 0.1, 0.2, 0.3, 0.5, 1) for c in (0, 0.5, 1)
         if d or s or c]
TUNE_DEPTH = 100  # --tune_on's candidates: each query's dense and sparse top 100
ENCODE_TOKENS = 1 << 19  # --colbert_from encode: passages per model call x passage_max_len at most (2 GB at D=1024)

# ----------------------------------------------------------------------------- command line and evaluate


def parser():
    """eval.py's options: cli_parser's (shared with mine.py) and these."""
    p = cli_parser(__doc__, split="test")
    p.add_argument("--depth", type=int, default=1000, help="candidates per head and ranking depth (exact protocol)")
    p.add_argument("--protocol", default="exact", choices=PROTOCOLS, help="exact: every head retrieves, "
                   "exact scores for the union; paper: SPEC 6.2's rows, with --task's depths and weights")
    p.add_argument("--task", choices=tuple(PAPER), help="the paper protocol's settings (SPEC 6.2; default miracl)")
    p.add_argument("--store", help="passage encodings on disk (store.py); the paper protocol's default: in --cache_dir")
    p.add_argument("--shard_size", type=int, default=4096, help="passages per shard of a store")
    p.add_argument("--colbert_from", choices=tuple(COLBERT_FROM), help="the paper protocol's multi-vector scores: "
                   "store (passage token vectors read from the store) or encode (a store of dense and sparse only; "
                   "each query batch's candidates encoded now). Default: encode for a store written with encode, "
                   "else store. With eval.py encode: the store to write")
    p.add_argument("--tokens", help="how a store holds passage token vectors (codec.py): float16, int8 (2x smaller) or "
                   "pq<M> (residual product quantisation, M + 2 bytes a vector, e.g. pq32). Default: as the store "
                   "holds them, else float16")
    p.add_argument("--langs", help="per-language folders to evaluate, comma-separated (default: all)")
    p.add_argument("--mcls", action="store_true", help="MCLS for long passages (SPEC 5.3)")
    p.add_argument("--sweep", action="store_true", help="also score a small grid of fusion weights")
    p.add_argument("--tune_on", metavar="SPLIT", help="another split (e.g. train) whose queries choose the fusion "
                   "weights from --sweep's grid: adds rows 'tuned d+s' and 'tuned all'")
    p.add_argument("--max_corpus", type=int, help="quick runs: relevant docs + the first N others")
    p.add_argument("--max_queries", type=int, help="quick runs: the first N queries of the qrels file")
    p.add_argument("--out", help="dir for metrics.json, never another checkpoint's (default runs/eval/<ckpt>-"
                                 "<data>-<split>, <ckpt>: the checkpoint path's last two folders, e.g. a_final)")
    p.add_argument("--overwrite", action="store_true", help="replace --out's metrics.json of another checkpoint")
    return p


def main(argv=None):
    """The command line above."""
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    encode = argv[:1] == ["encode"]
    a = p.parse_args(argv[encode:])
    error = option_error(a.weights or "m3", "--", protocol=a.protocol, task=a.task, sweep=a.sweep, tune_on=a.tune_on,
                         split=a.split)
    error = error or a.tune_on and a.data and data_error(a.data, a.tune_on)
    if error:
        p.error(error if error.startswith("--") else f"--tune_on: {error}")
    if encode and not (a.store and a.data):
        p.error("encode needs --data and --store")
    out_dir = a.out or (a.data and default_out(a.ckpt, a.data, a.split))
    for path, what in ((a.store, f"--store {a.store}"), (not encode and out_dir, f"--out {out_dir}")):
        error = path and (f"{what} is a file, not a folder" if os.path.isfile(path) else writable_error(path, what))
        if error:  # before anything is loaded or encoded
            p.error(error)
    if a.index_params and a.index == a.colbert_index == "Flat":
        p.error(f"--index_params {a.index_params}: search parameters of a non-Flat --index or --colbert_index")
    model, kw = cli_setup(p, a, None, depth=a.depth, shard_size=a.shard_size)
    kw["shard_size"] = a.shard_size
    langs = [x.strip() for x in a.langs.split(",")] if a.langs is not None else None
    if langs is not None and not all(langs):
        p.error(f"--langs {a.langs!r}: an empty language name (a stray comma?)")
    try:
        dirs = a.data and lang_dirs(a.data, a.split, langs)
    except (FileNotFoundError, ValueError) as e:
        p.error(f"--data: {e}")
    error = not dirs and a.data and data_error(a.data, a.split)
    if error or not a.data:
        p.error(f"--data: {error}" if error else "--data is required")
    try:  # each store there is, against --colbert_from: before anything is loaded or encoded
        for name in dirs or {"": a.data}:
            path = a.store and (os.path.join(a.store, name) if dirs else a.store)
            colbert_source(a.colbert_from, None if encode else a.protocol, path, "--")
            resolve_tokens(a.tokens, path, "--")
    except ValueError as e:
        p.error(str(e))
    if encode:
        return encode_corpora(model, dirs or {"": a.data}, a.store, a.split, a.max_corpus, a.passage_max_len,
                              a.batch_size, a.mcls, a.shard_size, passage_prefix=a.passage_prefix,
                              colbert_from=a.colbert_from, tokens=a.tokens)
    kw = dict(kw, weights=a.weights, mcls=a.mcls, max_corpus=a.max_corpus, max_queries=a.max_queries, sweep=a.sweep,
              tune_on=a.tune_on, protocol=a.protocol, task=a.task, store=a.store, overwrite=a.overwrite,
              out_dir=out_dir, colbert_from=a.colbert_from, tokens=a.tokens)
    if dirs:
        return evaluate_langs(model, a.data, dirs, a.split, **kw)
    res = evaluate(model, a.data, a.split, depth=a.depth, **kw)
    folder = eval_to_tensorboard(a.ckpt, res, a.data, a.split)  # the run's dashboard, if it reports to TensorBoard
    if folder:
        print(f"and its rows to TensorBoard in {folder}")
    return res


def evaluate(model, data_dir, split="test", weights="m3", depth=1000, index="Flat", index_params="",
             colbert_index="Flat", colbert_k=64, query_max_len=64, passage_max_len=512, batch_size=32, mcls=False,
             cache_dir=None, max_corpus=None, sweep=False, out_dir=None, overwrite=False, verbose=True,
             protocol="exact", task=None, store=None, shard_size=4096, query_prefix="", passage_prefix="",
             tune_on=None, passages=None, max_queries=None, colbert_from=None, tokens=None):
    """Every row of search.ROWS (SPEC 6.2) on a BEIR split; model: M3, checkpoint, a function returning an M3 or
    model_loader's triple; protocol "exact" (weights: a FUSION name or 3 numbers) or "paper" (task: a search.PAPER
    name, default miracl; the exact protocol takes none). store: a store.py folder for the passages (default: one in
    cache_dir, else in memory, with float16 token vectors as a store's). out_dir/metrics.json records the
    checkpoint and replaces another's only on overwrite. mcls applies to passages only (long documents, SPEC 5.3). The
    prefixes go before every query / passage, as training's Config.query_prefix / passage_prefix. tune_on: another
    split whose queries choose the fusion weights (tune_weights; the passages are encoded once unless max_corpus
    slices another corpus for it); adds the TUNED rows, and res["tuned"]. passages: (texts, encodings) of texts
    encoded already, reused if they are this corpus's (tune_weights hands its caller's over). max_queries: the first N
    queries of the qrels file.
    colbert_from (the paper protocol): "store", MaxSim over the store's token vectors; "encode", a store of dense and
    sparse only and the candidates' token vectors encoded per query batch (res["colbert_encoded_per_query"]); None:
    "encode" for a store without token vectors, else "store" (colbert_source). tokens: how the store holds token
    vectors (codec.py: float16, int8, pq<M>; default as a store there holds them, else float16); compact ones need a
    store (store or cache_dir)."""
    error = option_error(weights, protocol=protocol, task=task, sweep=sweep, tune_on=tune_on, split=split, depth=depth,
                         colbert_k=colbert_k, batch_size=batch_size, query_max_len=query_max_len,
                         passage_max_len=passage_max_len, shard_size=shard_size,
                         **{k: v for k, v in (("max_corpus", max_corpus), ("max_queries", max_queries))
                            if v is not None})
    if not error and tune_on:  # the tuning split's files and queries, checked before anything else is read
        try:
            _, tuning, tuning_qrels, _ = load_beir(data_dir, tune_on, corpus=False)
            tuning = {r["_id"] for r in tuning}
        except (FileNotFoundError, ValueError) as e:
            error = f"tune_on: {e}"
    if error:
        raise ValueError(error)
    colbert_from = colbert_source(colbert_from, protocol, store)  # a store of the other kind: before anything is read
    tokens = resolve_tokens(tokens, store)
    if tokens != "float16" and (colbert_from == "encode" or not (store or cache_dir)):
        raise ValueError(f"tokens {tokens}: " + ("a store for colbert_from encode holds no token vectors"
                                                 if colbert_from == "encode" else "compact token vectors are a "
                                                 "store's: pass store (--store) or cache_dir"))
    task = task or "miracl" if protocol == "paper" else None
    t0 = time.time()
    corpus, queries, qrels, missing = load_beir(data_dir, split, max_corpus, max_queries=max_queries)
    shared = sorted({r["_id"] for r in queries} & tuning) if tune_on else []
    if shared:  # before the long part: the weights are never chosen on the evaluated queries
        raise ValueError(f"tune_on: {len(shared)} queries of split {tune_on} are also evaluated (e.g. id "
                         f"{shared[0]!r} in {os.path.join(data_dir, 'qrels')}): the weights must be chosen on other "
                         "queries")
    named = {d for rels in tuning_qrels.values() for d in rels} if tune_on and max_corpus is None else None
    if named is not None and not named & {r["_id"] for r in corpus}:  # every tuning score would be 0: before encoding
        raise ValueError(f"tune_on: no document that split {tune_on}'s qrels name is in {data_dir}'s corpus")
    get_model, key, ckpt = model_loader(model, need_key=bool(cache_dir or out_dir or store or protocol == "paper"))
    if out_dir and not overwrite:  # before encoding: never replace another checkpoint's metrics
        check_out(out_dir, ckpt)
    texts = [passage_prefix + passage_text(r) for r in corpus]
    if passages is not None and passages[0] == texts:  # tune_weights: its caller's passages
        P = passages[1]
    elif store or cache_dir:  # passages on disk, memory-mapped: pages are read as used, token vectors float16
        meta = store_meta(key, texts, passage_max_len, mcls, "none" if colbert_from == "encode" else tokens)
        store = store or os.path.join(cache_dir, store_name(meta))
        P = encode_store(get_model, texts, store, meta, batch_size, shard_size, progress=verbose)
    else:  # in memory with a store's dtypes, so the scores do not depend on where P is
        P = as_stored(encode_cached(get_model, texts, passage_max_len, batch_size, mcls))
        P = without_tokens(P) if colbert_from == "encode" else P  # as a store without token vectors holds them
    Q = encode_cached(get_model, [query_prefix + r["text"] for r in queries], query_max_len, batch_size, False,
                      cache_dir, key)
    t1 = time.time()
    if tune_on:  # its time counts in retrieve_and_score
        tuned = tune_weights((get_model, key, ckpt), data_dir, tune_on, (texts, P), depth=depth, index=index,
                             index_params=index_params, query_max_len=query_max_len, passage_max_len=passage_max_len,
                             batch_size=batch_size, mcls=mcls, cache_dir=cache_dir, max_corpus=max_corpus,
                             query_prefix=query_prefix, passage_prefix=passage_prefix)
    ids = np.array([r["_id"] for r in corpus])
    tie = np.argsort(np.argsort(ids, kind="stable"))  # (N,) rank of each doc id in string order
    qrels_list, langs = [qrels[r["_id"]] for r in queries], [r.get("lang") for r in queries]
    res = dict(**ckpt, n_queries=len(queries), n_corpus=len(corpus), missing_qrels_ids=missing, split=split,
               data=os.path.abspath(data_dir), protocol=protocol, index=index, query_max_len=query_max_len,
               passage_max_len=passage_max_len, mcls=mcls, store=store and os.path.abspath(store),
               query_prefix=query_prefix, passage_prefix=passage_prefix,
               tokens="none" if colbert_from == "encode" else tokens)
    encoder = None  # colbert_from encode: the candidates' token vectors, encoded as the store's passages were
    if protocol == "paper" and colbert_from == "encode":
        encoder = TokenEncoder(get_model, texts, passage_max_len, mcls, batch_size)
    if protocol == "paper":
        lists = paper_rows(Q, P, task, tie, index, index_params, progress=verbose, encode=encoder,
                           encode_chunk=max(1, ENCODE_TOKENS // passage_max_len))
        scored = {row: run_metrics([ids[c] for c, _ in lists[row]], qrels_list, langs, PAPER_DEPTH) for row in ROWS}
        res.update(task=task, weights=list(FUSION[task]["all"]), paper=PAPER[task], colbert_from=colbert_from)
        if encoder:  # the cost of not storing token vectors: passages encoded per query, and the time it took
            res["colbert_encoded_per_query"] = round(encoder.passages / max(len(queries), 1), 2)
    else:
        results = retrieve(Q, P, depth, index, index_params, colbert_index, colbert_k, progress=verbose)

        def score(w, row="all"):  # row: how ROWS scores a candidate
            ranking = fuse(results, w, depth, tie, ROWS[row][1])
            return run_metrics([ids[c] for c, _ in ranking], qrels_list, langs, depth)
        weighted = row_weights(weights)
        scored = {row: score(weighted[row], row) for row in ROWS}  # row -> (mean metrics, {lang: ...}, per query)
        scored.update({name: score(tuned[row], row) for name, row in TUNED.items()} if tune_on else {})
        res.update(weights=list(weighted["all"]), depth=depth, colbert_index=colbert_index, colbert_k=colbert_k,
                   **({"fusion": weights} if isinstance(weights, str) and weights in FUSION else {}),
                   **({"tuned": tuned} if tune_on else {}))
    res["rows"] = {k: v[0] for k, v in scored.items()}
    res["per_query_ndcg10"] = {"query_ids": [r["_id"] for r in queries], **{k: v[2] for k, v in scored.items()}}
    if any(l is not None for l in langs):  # the lang field: per-language rows and their macro average
        res["per_lang"] = {l: {k: v[1][l] for k, v in scored.items()} for l in scored["all"][1]}
        res["macro"] = macro(res["per_lang"])
    if sweep:  # best first; equal nDCG@10 in grid order
        swept = [{"weights": list(w), **score(w)[0]} for w in tqdm(SWEEP, desc="sweep", disable=not verbose)]
        res["sweep"] = sorted(swept, key=lambda r: -r["nDCG@10"])
    res["time_s"] = {"encode": round(t1 - t0, 1), "retrieve_and_score": round(time.time() - t1, 1)}
    if encoder:
        res["time_s"]["colbert_encode"] = round(encoder.seconds, 1)  # within retrieve_and_score
    if verbose:
        print(f"{data_dir} [{split}]: {len(queries)} queries, {len(corpus)} passages, {protocol} protocol"
              + (f", task {task}" if protocol == "paper" else f", depth {depth}")
              + (f", {res['colbert_encoded_per_query']} passages encoded per query (--colbert_from encode)"
                 if "colbert_encoded_per_query" in res else "")
              + f"; qrels ids missing: {missing['queries']} queries, {missing['docs']} docs")
    return report(res, out_dir, overwrite, ckpt, verbose)


def tune_weights(model, data_dir, split, passages=None, depth=TUNE_DEPTH, **kw):
    """Fusion weights chosen on split's queries (evaluate checks they are not the evaluated ones): of the SWEEP grid,
    the dense+sparse weights (both > 0, colbert 0) and the all-three weights (all > 0) with the best nDCG@10 there
    (equal: the first in grid order) -> {"split", "dense+sparse", "all", "nDCG@10": {row: there}}. passages: as
    evaluate's. Candidates: the dense and sparse top-TUNE_DEPTH (at most depth), every one scored exactly by all three
    heads; no colbert candidates (a full MaxSim search costs ~50x more on CPU, and a passage that only colbert ranks in
    its top 100 seldom reaches a fused top 10)."""
    res = evaluate(model, data_dir, split, sweep=True, verbose=False, depth=min(depth, TUNE_DEPTH), **kw,
                   colbert_k=None, passages=passages)
    best = {"dense+sparse": next(r for r in res["sweep"] if all(r["weights"][:2]) and not r["weights"][2]),
            "all": next(r for r in res["sweep"] if all(r["weights"]))}
    return {"split": split, **{row: r["weights"] for row, r in best.items()},
            "nDCG@10": {row: r["nDCG@10"] for row, r in best.items()}}


def evaluate_langs(model, data_dir, dirs, split="test", store=None, out_dir=None, overwrite=False, verbose=True,
                   **kw):
    """evaluate on each per-language BEIR folder of data_dir (dirs: lang_dirs' {lang: folder}), with one model and one
    store per language (store/<lang>); rows: the macro average over languages (SPEC 6.3's averages), per_lang: each."""
    loaded = model_loader(model, need_key=True)
    if out_dir and not overwrite:
        check_out(out_dir, loaded[2])
    per = {}
    for lang, d in dirs.items():
        per[lang] = evaluate(loaded, d, split, store=store and os.path.join(store, lang), verbose=False, **kw)
        if verbose:
            print(f"{lang}: {per[lang]['n_queries']} queries, {per[lang]['n_corpus']} passages: "
                  + "  ".join(f"{k} {m['nDCG@10']:.4f}" for k, m in per[lang]["rows"].items()))
    res = dict(next(iter(per.values())), data=os.path.abspath(data_dir), store=store and os.path.abspath(store),
               per_lang={l: r["rows"] for l, r in per.items()}, macro=macro({l: r["rows"] for l, r in per.items()}))
    for k in ("n_queries", "n_corpus", "missing_qrels_ids", "time_s", "colbert_encoded_per_query"):
        if k in res:
            res[k] = {l: r[k] for l, r in per.items()}
    res["rows"] = res["macro"]
    return report(res, out_dir, overwrite, loaded[2], verbose)


def report(res, out_dir, overwrite, ckpt, verbose):
    """Print res's tables and write out_dir/metrics.json (through a temporary file, checked again first); res."""
    if verbose:
        print_table(res["rows"])
        for metric in ("nDCG@10", "Recall@100") if "per_lang" in res else ():
            print(f"-- {metric} per language, then the macro average")
            print_table({l: {row: m[metric] for row, m in r.items()} for l, r in res["per_lang"].items()}
                        | {"macro avg": {row: m[metric] for row, m in res["macro"].items()}}, list(res["rows"]), "lang")
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


def colbert_source(colbert_from, protocol, store=None, prefix=""):
    """Where the multi-vector scores come from, "store" or "encode": colbert_from, by default "encode" for a store
    without token vectors, else "store" (store.resolve_colbert_from, which refuses a store of the other kind). encode
    is for the paper protocol (protocol None: eval.py encode, which writes the store): the exact protocol searches
    every passage's token vectors. Errors: a ValueError naming the option (prefix "--" on the command line)."""
    source = resolve_colbert_from(colbert_from, store, prefix)
    if source == "encode" and protocol == "exact":
        held = (f"{store} holds no passage token vectors (written with {prefix}colbert_from encode); "
                if colbert_from is None else "")
        raise ValueError(f"{prefix}colbert_from encode: {held}the exact protocol searches every passage's token "
                         f"vectors ({prefix}colbert_k): use {prefix}protocol paper, or a store with token vectors")
    return source


# ----------------------------------------------------------------------------- tables


def print_table(rows, keys=None, label="row"):
    """One line per row name: the metrics in METRICS order (or the columns keys)."""
    keys = keys or [k for k in METRICS if any(k in m for m in rows.values())]
    print(f"{label:<14}" + "".join(f"{k:>13}" for k in keys))
    for name, m in rows.items():
        print(f"{name:<14}" + "".join(f"{m.get(k, float('nan')):>13.4f}" for k in keys))

# ----------------------------------------------------------------------------- options (shared with mine.py), output


def cli_parser(doc, split):
    """An argparse parser with the options evaluation and mining share; each CLI adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint dir (release layout: encoder, tokenizer, head .pt files)")
    p.add_argument("--data", help="BEIR-layout dir: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--split", default=split)
    p.add_argument("--weights", help=f"fusion weights (SPEC 6.2): one of {', '.join(FUSION)} (default m3) or "
                                     "dense,sparse,colbert numbers, e.g. 1,0.3,1")
    p.add_argument("--index", default="Flat", help="FAISS index_factory string for dense, e.g. HNSW32, IVF1024,PQ64")
    p.add_argument("--index_params", default="", help="FAISS search parameters, e.g. nprobe=64 or efSearch=1024")
    p.add_argument("--colbert_index", default="Flat", help="FAISS index_factory string over passage token vectors "
                   "(Flat: an exact search, one pass over them per batch of queries, no index in memory)")
    p.add_argument("--colbert_k", type=int, default=64, help="passage tokens per query token (candidates); 0 = all")
    p.add_argument("--query_max_len", type=int, default=64)
    p.add_argument("--passage_max_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--cache_dir", default=".cache/eval", help="encodings cache ('' = off)")
    p.add_argument("--pooling", choices=tuple(POOLINGS), help="override the checkpoint's dense pooling")
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
    a.weights = a.weights or "m3"
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
        torch.manual_seed(0)  # new heads: the same seeded random colbert head every run
        m = M3.from_pretrained(a.ckpt, new_heads=a.new_heads, pooling=a.pooling).to(inference_device()).eval()
        m.source = f"{a.ckpt} (new_heads={a.new_heads}, pooling={a.pooling})"  # what metrics.json records
        return m
    model = load if a.new_heads or a.pooling else a.ckpt
    return model, dict(query_max_len=a.query_max_len, passage_max_len=a.passage_max_len, batch_size=a.batch_size,
                       index=a.index, index_params=a.index_params, colbert_index=a.colbert_index,
                       colbert_k=a.colbert_k, cache_dir=a.cache_dir or None, query_prefix=a.query_prefix,
                       passage_prefix=a.passage_prefix)


MINIMUM = dict(depth=1, colbert_k=0, batch_size=1, query_max_len=2, passage_max_len=2, n_neg=1, shard_size=1,
               max_corpus=0, max_queries=1)


def option_error(weights, prefix="", ranks=None, protocol="exact", task=None, sweep=False, tune_on=None,
                 split=None, **ints):
    """What is wrong with the options, naming the option (prefix "--" on the command line), or None: weights a FUSION
    name or 3 finite numbers, not all 0 (a string: comma-separated); ints at least their MINIMUM; ranks "lo-hi" or
    (lo, hi), 0 <= lo < hi; protocol one of PROTOCOLS; task a PAPER name, with the paper protocol only; the paper
    protocol: no weights, no sweep, no tune_on; tune_on not the evaluated split."""
    if protocol not in PROTOCOLS or task not in (None, *PAPER):
        name, value, want = (("protocol", protocol, ", ".join(PROTOCOLS)) if protocol not in PROTOCOLS else
                             ("task", task, ", ".join(PAPER)))
        return f"{prefix}{name}: expected one of {want}; got {value!r}"
    if task is not None and protocol != "paper":
        return f"{prefix}task: sets the paper protocol's depths and weights: add {prefix}protocol paper, or drop it"
    if protocol == "paper" and (sweep or not (isinstance(weights, str) and weights == "m3")):
        return (f"{prefix}{'sweep' if sweep else 'weights'}: the paper protocol takes its weights from {prefix}task"
                + ("" if sweep else f"; got {weights!r}"))
    if tune_on and (protocol == "paper" or tune_on == split):
        why = (f"the paper protocol takes its weights from {prefix}task" if protocol == "paper" else
               f"{split} is the evaluated split; the weights must be chosen on other queries")
        return f"{prefix}tune_on: {why}"
    try:
        w = list(row_weights(weights)["all"])
    except (TypeError, ValueError):
        w = []
    if len(w) != 3 or not np.isfinite(w).all() or not any(w):
        return (f"{prefix}weights: expected one of {', '.join(FUSION)} or 3 numbers dense,sparse,colbert, not all 0; "
                f"got {weights!r}")
    for k, v in ints.items():
        if (not isinstance(v, (int, np.integer)) or v < MINIMUM[k]) and not (k == "colbert_k" and v is None):
            return f"{prefix}{k}: expected an integer >= {MINIMUM[k]}; got {v!r}"
    lo_hi = ranks.split("-") if isinstance(ranks, str) else ranks
    if ranks is not None and not (len(lo_hi) == 2 and all(str(x).isdecimal() for x in lo_hi)
                                  and int(lo_hi[0]) < int(lo_hi[1])):
        return f"{prefix}range: expected fused ranks lo-hi, integers with 0 <= lo < hi (e.g. 10-100); got {ranks!r}"
    return None


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
