"""Positive-aware hard-negative mining against rank-window mining, on SciFact at the reference's budget.

Mined files (zero-shot all-MiniLM-L6-v2, mean pooling, dense only, queries 64 / passages 256 tokens, exact search, 7
negatives drawn from ranks 10-59, seed 0: the recipe of data/scifact/train_m3mined.jsonl, data/README.md):
  window   data/scifact/train_mined.jsonl, today's file (the demo's and bench/quality.py's `ours`)
  r0.95    + --max_pos_ratio 0.95: NV-Retriever's setting (drop a candidate whose cosine is >= 95% of the positive's)
  r0.90    + --max_pos_ratio 0.90: the filter at twice the distance from the positive (the counts printed): shows
           whether more filtering keeps helping or starts to remove useful negatives
  r0.95+kd r0.95's file with the same draws and the zero-shot model's own dense scores (mine.py --scores, the M3
           self-teacher), trained with teacher_kd=true (SPEC 3.5), one seed
Each file trains bench/quality.py's `ours` (20 dense-only + 40 all-heads + 40 unified steps, 4 x 8 at 64/256) with
--train_data=FILE over --seeds seeds (r0.95+kd: --one_seed, seed 0 only, after the others), evaluated by
eval.py's exact protocol with its defaults (all 5,183 documents; multi-vector candidates from each query token's 64
nearest passage tokens; fusion weights 1, 0.3, 1); the paired nDCG@10 differences to window have 95% intervals over
seeds (t) and over queries (bootstrap). The removed
negatives: --sample 20 of them drawn at random (seed 0) for a reader to judge, written to <out>/dropped_sample.md.
Every run writes its checkpoint and result under <out>/<file>/ (--quick: <out>/quick/<file>/): a rerun resumes.

    python bench/mining.py --seeds 3   # ~3 hours on 2 idle CPU cores; last line: mining_dense_r0.95_minus_window=..
    python bench/mining.py --quick        # 2 steps per stage, 300 documents: checks the script
    python bench/mining.py --table        # the table of the results written so far (a run still going: fewer seeds)
"""
import argparse
import functools
import json
import os

import numpy as np
import torch

from common import ROOT  # noqa: F401 (common puts the repository on sys.path)
import quality  # noqa: E402
import stats  # noqa: E402
from beir import load_beir, passage_text  # noqa: E402
from mine import mine  # noqa: E402
from model import M3  # noqa: E402
from search import ROWS  # noqa: E402

WINDOW = os.path.join(ROOT, "data", "scifact", "train_mined.jsonl")
RATIOS = (0.95, 0.90)
HEADLINE = ("dense", "sparse", "multi-vector", "all")


def zero_shot():
    torch.manual_seed(0)  # the new heads (unused: dense only) drawn the same every run
    return M3.from_pretrained("minilm", new_heads=True, pooling="mean")


def mine_file(path, data, ratio, scores, cache, dropped=None):
    """data's train queries mined as train_m3mined.jsonl with --max_pos_ratio ratio (and --scores) -> path, its
    counts in path.stats.json; written once. dropped: a list to receive (query, positives, passage, its cosine, the
    positive's) of each candidate the filter dropped (mined again from the cached encodings if the file exists)."""
    if os.path.exists(path) and dropped is None:
        return json.load(open(path + ".stats.json"))
    corpus, qs, qrels, _ = load_beir(data, "train")
    pool, at = [passage_text(r) for r in corpus], {r["_id"]: j for j, r in enumerate(corpus)}
    positives = [[at[d] for d, rel in qrels[r["_id"]].items() if rel > 0 and d in at] for r in qs]
    counts = {}
    recs = mine(zero_shot, [r["text"] for r in qs], positives, pool, 10, 60, 7, (1, 0, 0), 0, scores,
                passage_max_len=256, cache_dir=cache, max_pos_ratio=ratio, stats=counts, dropped=dropped)
    out = [r for r in recs if r is not None]
    counts.update(queries=len(qs), queries_written=len(out), queries_short=sum(len(r["neg"]) < 7 for r in out),
                  max_pos_ratio=ratio)
    counts["queries_no_neg"] = sum(not r["neg"] for r in out)  # training borrows other queries' negatives for them
    os.makedirs(os.path.dirname(path), exist_ok=True)
    written = [(path + ".stats.json", [json.dumps(counts, indent=1)]),
               (path, [json.dumps(r, ensure_ascii=False) + "\n" for r in out])]  # the data file last
    for p, lines in written if not os.path.exists(path) else []:
        with open(p + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(p + ".tmp", p)
    if dropped is not None:
        dropped[:] = [(qs[i]["text"], [pool[j] for j in positives[i]], pool[j], s, p) for i, j, s, p in dropped]
    return counts


def no_neg(path):
    """How many records of the JSONL file at path have no negative."""
    with open(path, encoding="utf-8") as f:
        return sum(not json.loads(line)["neg"] for line in f)


def sample_md(dropped, n, path):
    """n of the dropped (query, positives, passage, score, positive's score) drawn with seed 0 -> a markdown file."""
    rng = np.random.default_rng(0)
    above = sum(s >= p for *_, s, p in dropped)
    lines = [f"# {n} of the {len(dropped)} negatives that --max_pos_ratio dropped, drawn at random (seed 0)\n\n"
             f"{above} of the {len(dropped)} ({above / len(dropped):.0%}) score at or above their query's positive "
             f"(the positive ranks below them); {len({q for q, *_ in dropped})} queries lost at least one.\n"]
    for k, i in enumerate(sorted(rng.choice(len(dropped), min(n, len(dropped)), replace=False))):
        q, pos, text, s, p = dropped[i]
        lines.append(f"\n## {k + 1}. cosine {s:.3f}, positive {p:.3f} (ratio {s / p:.3f})\n\n**query** {q}\n\n"
                     f"**positive** {pos[0][:400]}\n\n**dropped** {text[:600]}\n\n**judgement** \n")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "mining"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sample", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--one_seed", default="r0.95+kd", help="files trained with seed 0 only (comma-separated)")
    p.add_argument("--table", action="store_true", help="train nothing: the table of the results written so far")
    a = p.parse_args()
    steps = (2, 2, 2) if a.quick else (20, 40, 40)
    data, cache = os.path.join(ROOT, "data", "scifact"), os.path.join(a.out, "cache")
    ev = dict(split="test", query_max_len=64, passage_max_len=256, weights=(1, 0.3, 1), depth=1000,
              max_corpus=300 if a.quick else None, cache_dir=cache, verbose=False)  # eval.py's defaults otherwise
    files, counts = {"window": WINDOW}, {}
    for r in RATIOS:
        files[f"r{r:.2f}"] = os.path.join(a.out, "data", f"r{r:.2f}.jsonl")
        dropped = [] if r == RATIOS[0] else None
        counts[f"r{r:.2f}"] = mine_file(files[f"r{r:.2f}"], data, r, False, cache, dropped)
        if dropped:
            sample_md(dropped, a.sample, os.path.join(a.out, "dropped_sample.md"))
    files["r0.95+kd"] = os.path.join(a.out, "data", "r0.95-scores.jsonl")
    mine_file(files["r0.95+kd"], data, RATIOS[0], True, cache)
    results, one = {}, a.one_seed.split(",") if a.one_seed else []
    order = [(s, n) for s in range(a.seeds) for n in files if n not in one] + [(0, n) for n in files if n in one]
    for seed, name in order:  # seed by seed, the one-seed files last: a run cut short has paired seeds
        extra = [f"--train_data={files[name]}"] + (["--teacher_kd=true"] if name.endswith("+kd") else [])
        train = None if a.table else functools.partial(quality.train_config, extra=extra)
        out = os.path.join(a.out, "quick" if a.quick else "", name)
        results[name] = quality.run_all(out, seed + 1, steps, ev, data, train, only="ours", rows=ROWS).get("ours", [])
    results = {name: results[name] for name in files if results.get(name)}  # the table in the files' order
    for name, c in counts.items():
        print(f"{name}: of {c['candidates_in_window']} candidates at ranks 10-59 of {c['queries_written']} queries, "
              f"dropped {c['dropped']} ({c['dropped'] / c['candidates_in_window']:.1%}); {c['queries_short']} queries "
              f"kept with fewer than 7 negatives, {no_neg(files[name])} with none (training borrows negatives)")
    print(f"{'file':10s} {'seeds':>5s} " + " ".join(f"{r:>21s}" for r in ROWS))
    for name, runs in results.items():
        print(f"{name:10s} {len(runs):5d} " + " ".join(f"{quality.cell(runs, r):>21s}" for r in ROWS))
    per = lambda runs, row: np.array([r["per_query_ndcg10"][row] for r in runs])  # noqa: E731 (seeds, queries)
    print("paired nDCG@10 differences to window, 95% intervals over seeds (t) and over queries (bootstrap):")
    last = {}
    for name, runs in results.items():
        base = results["window"][:len(runs)]
        if name == "window":
            continue
        for row in ROWS:
            d, lo, hi = stats.seed_interval(per(runs, row), per(base, row))
            _, blo, bhi = stats.query_bootstrap(per(runs, row), per(base, row))
            seeds = f"seeds [{lo:+.4f}, {hi:+.4f}]  " if len(runs) > 1 else ""
            print(f"  {name + ' - window':18s} {row:13s} {d:+.4f}  {seeds}queries [{blo:+.4f}, {bhi:+.4f}]")
            if row in HEADLINE:
                last[f"mining_{row.replace('-', '_')}_{name}_minus_window"] = d
    print(" ".join(f"{k}={v:+.4f}" for k, v in last.items() if "_r0.95_" in k))


if __name__ == "__main__":
    main()
