"""Quality on SciFact test (nDCG@10, Recall@100) with error bars: our M3 curriculum at the reference's budget over
several seeds, its ablations, and the paired differences with 95% intervals (bench/stats.py).

The reference's run on data/scifact/train_mined.jsonl (data/README.md): 100 steps of 4 queries x 8 passages, max
lengths 64/256, lr 2e-5, tau 0.02, unified fine-tuning with self-distillation. Ours, same budget: configs/demo.yaml at
G=8 and 256 passage tokens, 20 dense-only + 40 all-heads + 40 unified (self-KD) steps. Seed s moves every stage's
seed (data order, head init, dropout) by 1000 s; s = 0 is the single-seed run of earlier rounds.
Configurations over --seeds seeds: ours; the last 40 steps without self-distillation; the encoder at lr 5e-5 (the
term-matching sparse head as in ours). One seed each (their effects are large): the new heads at the encoder's lr
(head_lr 0, as the reference); the reference's random sparse head, with and without self-distillation (the paper's
effect is on a weak head: does self-KD lift a sparse head that starts random?); CLS pooling; SDPA attention (the
kernel before attention.py's lean one: same dropout, other random draws); the zero-shot model.
Evaluation: exact scores against all 5,183 documents, queries 64 / passages 256 tokens, multi-vector MaxSim over
every document (colbert_k=0), fusion weights 1, 0.3, 1 (the paper's) and, rows "tuned d+s" / "tuned all", the weights
each checkpoint's own scores on the 809 train queries choose (eval.py --tune_on train: the dense and sparse top 100
reranked by all three heads, never the test queries); each query's nDCG@10 is kept for the paired intervals. A result
records the grid (eval.SWEEP) its weights came from: one from another grid is evaluated again.
--transfer: ours's checkpoints on XQuAD-R's English subset (1,190 questions, 1,180 sentences; another domain, 4x the
queries) with the paper's weights and the ones each seed's SciFact train queries chose: fusion against the best head.

Every finished run writes <out>/results/<config>-s<seed>.json and every stage its checkpoint: a rerun resumes where
the last one stopped (a session ends, a background job with it); a result without a row of ROWS (written before the
row existed) is evaluated again from its checkpoint.

    python bench/quality.py --seeds 3     # ~2.5 hours on 2 idle CPU cores; last line: ours_dense=<mean> ...
    python bench/quality.py --quick       # 2 steps per stage, 300-document slice: checks the script
    python bench/quality.py --transfer    # 2 minutes after the 3 seeds; last line: xquad_en multi-vector=<mean> ...
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
import stats  # noqa: E402
from eval import SWEEP, TUNED, evaluate  # noqa: E402
from model import M3  # noqa: E402
from search import ROWS as EVAL_ROWS  # noqa: E402

ROWS = (*EVAL_ROWS, *TUNED)  # the table's columns: every evaluation row, then the rows with tuned weights
REFERENCE = {  # the reference implementation at the same budget, one seed (data/README.md): nDCG@10, Recall@100
    "mean pooling": {"dense": (0.6671, 0.9383), "sparse": (0.1404, 0.5099), "multi-vector": (0.7164, 0.9410),
                     "dense+sparse": (0.6722, 0.9410), "all": (0.7099, 0.9593)},
    "CLS pooling": {"dense": (0.6325, 0.9250), "sparse": (0.1300, 0.4737), "multi-vector": (0.7164, 0.9343),
                    "dense+sparse": (0.6285, 0.9343), "all": (0.7148, 0.9593)}}
HEADS = "--head_schedule=dense,sparse,colbert"
# name -> (every seed?, train.py args of stage 1, of stages 2-3, of stage 3 only); equal args share a checkpoint
CONFIGS = {"ours": (True, [], [], []),
           "without self-KD": (True, [], [], ["--self_distill=false"]),
           "encoder lr 5e-5": (True, ["--lr=5e-5"], ["--lr=5e-5"], []),
           "attention sdpa": (False, ["--attention=sdpa"], ["--attention=sdpa"], []),  # the old CPU kernel
           "random sparse head": (False, [], [], []),  # stage 1's checkpoint with a random sparse head
           "random sparse head, without self-KD": (False, [], [], ["--self_distill=false"]),  # self-KD on a weak head
           "CLS pooling": (False, ["--pooling=cls"], ["--pooling=cls"], []),
           "heads at the encoder's lr": (False, [], ["--head_lr=0"], [])}  # one-seed runs in this order


def run_stage(out, name, steps, stage, seed, *extra):
    """One stage through train.py, as a user runs it -> its checkpoint; an existing one is reused (resume)."""
    final = os.path.join(out, "ckpt", name, "final")
    if not os.path.isdir(final):
        shutil.rmtree(os.path.dirname(final), ignore_errors=True)  # a stage cut short (this bench's own folder)
        cmd = [sys.executable, "train.py", "configs/demo.yaml", "--train_group_size=8", "--passage_max_len=256",
               f"--max_steps={steps}", f"--out_dir={os.path.dirname(final)}", f"--seed={42 + stage + 1000 * seed}",
               "--overwrite=true", *extra]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return final


def random_sparse_head(src, dst):
    """Copy of checkpoint src whose sparse head is re-drawn with nn.Linear's default random init, as the reference
    starts it (ours starts as term matching: model.SPARSE_INIT)."""
    if not os.path.isdir(dst):
        shutil.copytree(src, dst + ".tmp", dirs_exist_ok=True)
        H = torch.load(os.path.join(src, "sparse_linear.pt"), weights_only=True)["weight"].shape[1]
        torch.manual_seed(42)
        torch.save(torch.nn.Linear(H, 1).state_dict(), os.path.join(dst + ".tmp", "sparse_linear.pt"))
        os.replace(dst + ".tmp", dst)
    return dst


def train_config(out, config, seed, steps, extra=()):
    """The three stages of one configuration and seed -> the final checkpoint. A stage whose arguments equal another
    configuration's (stage 1 of ours and of without self-KD, say) is trained once. extra: train.py arguments of every
    stage (bench/mining.py's --train_data), not part of the stages' names: one out dir per extra."""
    _, first, later, last = CONFIGS[config]
    tag = lambda args: "-".join(a.strip("-").replace("=", "") for a in args) or "base"  # noqa: E731
    s1 = run_stage(out, f"1-{tag(first)}-s{seed}", steps[0], 0, seed, *first, *extra)
    mid = later
    if config.startswith("random sparse head"):
        s1 = random_sparse_head(s1, os.path.join(out, "ckpt", f"1-random-sparse-s{seed}"))
        mid = ["--random-sparse"]  # only names its stages
    s2 = run_stage(out, f"2-{tag(mid)}-s{seed}", steps[1], 1, seed, HEADS, f"--init_from={s1}", *later, *extra)
    return run_stage(out, f"3-{tag(mid + last)}-s{seed}", steps[2], 2, seed, HEADS, f"--init_from={s2}", *later,
                     "--self_distill=true", *last, *extra)


def runs(seeds):
    """(configuration, seed) in the order they run: the multi-seed ones first (the table's main rows)."""
    every = [c for c, (all_seeds, *_) in CONFIGS.items() if all_seeds]
    return [("zero-shot", 0)] + [(c, s) for s in range(seeds) for c in every] + \
        [(c, 0) for c in CONFIGS if c not in every]


def best_fused(res):
    """The all-three weights of res's sweep (every head > 0) with the best nDCG@10 on the evaluated queries themselves:
    an upper bound for any choice of weights, not a result -> {"weights", "nDCG@10"}."""
    best = next(r for r in res["sweep"] if all(r["weights"]))
    return {"weights": best["weights"], "nDCG@10": best["nDCG@10"]}


def current(path, rows=ROWS):
    """The result at path if it has every row of rows and its weights were chosen on eval.SWEEP as it is now, else
    None."""
    r = json.load(open(path)) if os.path.exists(path) else None
    return r if r and set(rows) <= set(r["rows"]) and r.get("grid") == [list(w) for w in SWEEP] else None


def run_all(out, seeds, steps, ev, data, train_fn=train_config, eval_fn=evaluate, only=None, rows=ROWS):
    """Every (configuration, seed) without a current result file (one with every row of rows): train, evaluate, write
    the result -> {config: [results]}. train_fn None: only read the results written so far. only: train that
    configuration alone."""
    os.makedirs(os.path.join(out, "results"), exist_ok=True)
    results = {}
    for config, seed in runs(seeds):
        path = os.path.join(out, "results", f"{config}-s{seed}.json")
        if current(path, rows) is None and train_fn is not None and (not only or config == only):
            torch.manual_seed(0)  # zero-shot: the same seeded random colbert head every run, as eval.py's
            model = M3.from_pretrained("minilm", new_heads=True, pooling="mean") if config == "zero-shot" else \
                train_fn(out, config, seed, steps)  # an existing checkpoint is not trained again
            res = eval_fn(model, data, **ev)
            with open(path + ".tmp", "w") as f:
                json.dump({**{k: res[k] for k in ("rows", "per_query_ndcg10", "tuned") if k in res},
                           **({"best on test": best_fused(res)} if "sweep" in res else {}),
                           "grid": [list(w) for w in SWEEP]}, f)
            os.replace(path + ".tmp", path)  # a result file is whole or absent
        if os.path.exists(path):  # else: only the results written so far (or only those of one configuration)
            results.setdefault(config, []).append(json.load(open(path)))
    return results


def xquad_english(dst, src=os.path.join(ROOT, "data", "xquad-r")):
    """XQuAD-R's English monolingual subset (data/README.md) as a BEIR folder: its 1,190 English questions against its
    1,180 English sentences, each question's one relevant sentence the English one -> dst (written once)."""
    if not os.path.isdir(dst):
        tmp = dst + ".tmp"
        os.makedirs(os.path.join(tmp, "qrels"), exist_ok=True)
        for name, keys in (("corpus.jsonl", ("_id", "title", "text")), ("queries.jsonl", ("_id", "text"))):
            with open(os.path.join(src, name), encoding="utf-8") as f, \
                    open(os.path.join(tmp, name), "w", encoding="utf-8") as g:
                for r in map(json.loads, f):
                    if r["lang"] == "en":
                        g.write(json.dumps({k: r[k] for k in keys}, ensure_ascii=False) + "\n")
        with open(os.path.join(src, "qrels", "test.tsv"), encoding="utf-8") as f, \
                open(os.path.join(tmp, "qrels", "test.tsv"), "w", encoding="utf-8") as g:
            g.writelines(line for n, line in enumerate(f) if n == 0 or line.startswith("en-") and
                         line.split("\t")[1].startswith("en-"))  # header; English question -> English sentence
        os.replace(tmp, dst)  # whole or absent
    return dst


def run_transfer(out, seeds, steps, ev, data, train_fn=train_config, eval_fn=evaluate):
    """Ours's checkpoints (trained on SciFact) evaluated on data (another test set) with the paper's weights and, row
    "tuned all", the all-three weights that checkpoint's SciFact train queries chose (its SciFact result's "tuned") ->
    [result per seed]; one JSON per seed in <out>/results/transfer/, a rerun resumes (and redoes a result of another
    grid or whose tuned weights the SciFact result no longer has)."""
    os.makedirs(os.path.join(out, "results", "transfer"), exist_ok=True)
    results = []
    for seed in range(seeds):
        path, scifact = (os.path.join(out, "results", *sub, f"ours-s{seed}.json") for sub in (["transfer"], []))
        sci = current(scifact)
        if sci is None:
            raise FileNotFoundError(f"{scifact}: no such file or written before eval.SWEEP's grid; the transfer rows "
                                    f"need its tuned weights: run bench/quality.py --seeds {seeds} first")
        w, r = sci["tuned"]["all"], current(path, ("all", "tuned all"))
        if r is None or r["tuned"]["all"] != w:
            ckpt = train_fn(out, "ours", seed, steps)  # the existing checkpoint
            res, tuned = eval_fn(ckpt, data, **ev), eval_fn(ckpt, data, **{**ev, "weights": w, "sweep": False})
            r = {"rows": {**res["rows"], "tuned all": tuned["rows"]["all"]},
                 "per_query_ndcg10": {**res["per_query_ndcg10"], "tuned all": tuned["per_query_ndcg10"]["all"]},
                 "tuned": {"all": w}, "best on test": best_fused(res), "grid": [list(g) for g in SWEEP]}
            with open(path + ".tmp", "w") as f:
                json.dump(r, f)
            os.replace(path + ".tmp", path)
        results.append(r)
    return results


def fused_vs_best(runs, name="ours"):
    """Lines: the fused rows "all" and "tuned all" minus the head with the best mean, paired, with 95% intervals over
    seeds and over queries."""
    per = lambda row: np.array([r["per_query_ndcg10"][row] for r in runs])  # noqa: E731 (seeds, queries)
    best = max(("dense", "sparse", "multi-vector"), key=lambda row: per(row).mean())
    lines = []
    for row in (row for row in ("all", "tuned all") if all(row in r["rows"] for r in runs)):
        d, lo, hi = stats.seed_interval(per(row), per(best))
        _, blo, bhi = stats.query_bootstrap(per(row), per(best))
        seeds = f"seeds [{lo:+.4f}, {hi:+.4f}]  " if len(runs) > 1 else ""
        lines.append(f"  {name}: {row} - {best} {d:+.4f}  {seeds}queries [{blo:+.4f}, {bhi:+.4f}]")
    if all("best on test" in r for r in runs):  # no interval: the weights were chosen on the same queries
        d = np.mean([r["best on test"]["nDCG@10"] for r in runs]) - per(best).mean()
        lines.append(f"  {name}: best on test - {best} {d:+.4f}  (each seed's best all-three weights of eval.SWEEP "
                     "on the test queries themselves: an upper bound for any choice, " +
                     "  ".join(str(r["best on test"]["weights"]) for r in runs) + ")")
    return lines


def cell(runs, row):
    """One table cell: nDCG@10 mean +- std over the runs / Recall@100 mean."""
    nd, rc = (stats.mean_std([r["rows"][row][k] for r in runs]) for k in ("nDCG@10", "Recall@100"))
    return f"{nd[0]:.4f}+-{nd[1]:.4f}/{rc[0]:.3f}"


def table(results):
    """Mean +- std per cell over seeds; for each ablation the paired nDCG@10 difference to ours (a one-seed one:
    to ours's seed 0, with the interval over queries only). A row some seed of a configuration lacks (a result written
    before the row existed) is left blank for that configuration."""
    has = lambda runs, row: all(row in r["rows"] for r in runs)  # noqa: E731
    rows = [row for row in ROWS if any(has(runs, row) for runs in results.values())]
    lines = [f"{'model':36s} {'seeds':>5s} " + " ".join(f"{r:>21s}" for r in rows)]
    for config, runs in results.items():
        cells = [cell(runs, row) if has(runs, row) else "-" for row in rows]
        lines.append(f"{config:36s} {len(runs):5d} " + " ".join(f"{c:>21s}" for c in cells))
    ours = results["ours"]
    per = lambda runs, row: np.array([r["per_query_ndcg10"][row] for r in runs])  # noqa: E731 (seeds, queries)
    lines.append("paired nDCG@10 differences, 95% intervals over seeds (t) and over queries (bootstrap):")
    for config, runs in results.items():
        if config in ("ours", "zero-shot") or len(runs) not in (1, len(ours)):
            continue
        base, name = (ours, "ours") if len(runs) == len(ours) else (ours[:1], "ours s0")  # one seed: against seed 0
        for row in (row for row in rows if has(base, row) and has(runs, row)):
            d, lo, hi = stats.seed_interval(per(base, row), per(runs, row))
            _, blo, bhi = stats.query_bootstrap(per(base, row), per(runs, row))
            seeds = f"seeds [{lo:+.4f}, {hi:+.4f}]  " if len(runs) > 1 else ""
            lines.append(f"  {name + ' - ' + config:51s} {row:13s} {d:+.4f}  {seeds}queries [{blo:+.4f}, {bhi:+.4f}]")
    weak = [results.get(c) for c in ("random sparse head", "random sparse head, without self-KD")]
    if all(weak):
        for row in (row for row in rows if has(weak[0], row) and has(weak[1], row)):  # self-KD on a weak head
            d, blo, bhi = stats.query_bootstrap(per(weak[0], row), per(weak[1], row))
            lines.append(f"  {'random sparse head: with - without self-KD':51s} {row:13s} {d:+.4f}  "
                         f"queries [{blo:+.4f}, {bhi:+.4f}]")
    lines += fused_vs_best(ours)
    for config, runs in results.items():  # the all-three weights the train queries chose
        if has(runs, "tuned all"):
            lines.append(f"  weights chosen on train (dense, sparse, colbert), {config}: " +
                         "  ".join(f"s{i} {r['tuned']['all']}" for i, r in enumerate(runs)))
    return "\n".join(lines)


def transfer_table(runs, name):
    """run_transfer's results: mean +- std per row over seeds (nDCG@10 / Recall@100), then fused_vs_best."""
    rows = ("dense", "sparse", "multi-vector", "dense+sparse", "all", "tuned all")
    return "\n".join([f"{name}, ours over {len(runs)} seeds (trained on SciFact): nDCG@10 mean+-std / Recall@100",
                      " ".join(f"{r:>21s}" for r in rows), " ".join(f"{cell(runs, r):>21s}" for r in rows),
                      "paired nDCG@10 differences, 95% intervals over seeds (t) and over queries (bootstrap):",
                      *fused_vs_best(runs)])


def beside(metrics_json):
    """An eval.py metrics.json (nDCG@10 / Recall@100 per row) printed above the reference's rows."""
    rows, names = json.load(open(metrics_json))["rows"], list(REFERENCE["mean pooling"])  # the reference's rows
    lines = [f"{'SciFact test, nDCG@10 / Recall@100':40s} " + " ".join(f"{r:>15s}" for r in names),
             f"{'ours (' + metrics_json + ')':40s} " +
             " ".join(f"{rows[r]['nDCG@10']:.4f} / {rows[r]['Recall@100']:.4f}" for r in names)]
    for pooling, ref in REFERENCE.items():
        lines.append(f"{'reference implementation, ' + pooling:40s} " +
                     " ".join(f"{ref[r][0]:.4f} / {ref[r][1]:.4f}" for r in names))
    return "\n".join(lines) + "\n(the reference: FlagEmbedding's M3 fine-tuning at the same budget, one seed, " \
        "data/README.md; ours over 3 seeds: README)"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "quality"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--beside", metavar="METRICS_JSON", help="only print an eval.py result beside the reference's rows")
    p.add_argument("--table", action="store_true", help="only print the table of the results written so far")
    p.add_argument("--only", metavar="CONFIG", choices=list(CONFIGS),
                   help="train only this configuration, e.g. 'attention sdpa'")
    p.add_argument("--transfer", action="store_true", help="only evaluate ours's seeds on XQuAD-R's English subset")
    a = p.parse_args()
    if a.beside:
        return print(beside(a.beside))
    steps = (2, 2, 2) if a.quick else (20, 40, 40)
    ev = dict(split="test", query_max_len=64, passage_max_len=256, weights=(1, 0.3, 1), depth=1000, colbert_k=0,
              tune_on="train", sweep=True, max_corpus=300 if a.quick else None, cache_dir=os.path.join(a.out, "cache"),
              verbose=False)
    if a.transfer:
        data = xquad_english(os.path.join(a.out, "xquad-r-en"))
        runs = run_transfer(a.out, a.seeds, steps, {**ev, "tune_on": None}, data)
        print(transfer_table(runs, "XQuAD-R English (1,190 questions, 1,180 sentences)"))
        return print("xquad_en " + " ".join(f"{row}={np.mean([r['rows'][row]['nDCG@10'] for r in runs]):.4f}"
                                             for row in ("multi-vector", "all", "tuned all")) + f" seeds={len(runs)}")
    data = os.path.join(ROOT, "data", "scifact")
    results = run_all(a.out, a.seeds, steps, ev, data, None if a.table else train_config, only=a.only)
    print(table(results))
    m = {row: np.mean([r["rows"].get(row, {"nDCG@10": np.nan})["nDCG@10"] for r in results["ours"]]) for row in ROWS}
    print("reference, mean pooling: " + " ".join(f"{r} {v[0]:.4f}" for r, v in REFERENCE["mean pooling"].items()))
    print(f"ours_dense={m['dense']:.4f} ours_sparse={m['sparse']:.4f} ours_colbert={m['multi-vector']:.4f} "
          f"ours_dense_sparse={m['dense+sparse']:.4f} ours_all={m['all']:.4f} seeds={len(results['ours'])} "
          f"ours_tuned_all={m['tuned all']:.4f}")


if __name__ == "__main__":
    main()
