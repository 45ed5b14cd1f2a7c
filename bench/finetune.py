"""Fine-tuning without regret, measured: configs/finetune.yaml (all-MiniLM-L6-v2 on SciFact, 300 steps, evaluated every
50 on a dev split and a retention set, out_dir/best), merge.py --alpha auto, and the start, best, final and merged
models on data none of them was chosen on.

    python bench/finetune.py             # ~75 minutes on 2 idle CPU cores; a rerun continues where it stopped
    python bench/finetune.py --prepare   # only the data configs/finetune.yaml reads

1. Data (runs/finetune/data): SciFact with a dev split of 100 of the 809 train queries (seed 0), whose lines are
   removed from the training file (train_nodev.jsonl); XQuAD-R's English subset (1,190 questions, 1,180 sentences,
   bench/quality.py's) with its 240 paragraphs split in two halves (seed 0): qrels/retention.tsv (591 questions), the
   retention set the run selects with, and qrels/report.tsv (599), reported only (a paragraph's questions in one half).
2. train.py configs/finetune.yaml (resumed if stopped), its curves to bench/figures/finetune_curves.png (plot_logs.py).
3. merge.py between the start (minilm, its heads from the fine-tune) and the final checkpoint, alpha chosen on the grid
   by dev and retention with the run's select rule.
4. Start, best, final and merged on SciFact test (300 queries, 5,183 passages, 256 tokens) and XQuAD-R en's report half:
   every row, and paired bootstrap intervals over queries (bench/stats.py) against the start and the final checkpoint.
Last line: finetune_gain_kept_best=<f> finetune_gain_kept_merged=<f> retention_best_minus_start=<f>
retention_merged_minus_start=<f> (gain kept: the smallest over the rows of (x - start) / (final - start) on SciFact
test; retention: dense nDCG@10 on the report half).
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
import stats  # noqa: E402
from eval import evaluate  # noqa: E402
from quality import xquad_english  # noqa: E402
from search import ROWS  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "finetune.yaml")
CURVES = os.path.join(ROOT, "bench", "figures", "finetune_curves.png")  # RESULTS.md shows it
N_DEV = 100
MODELS = ("start", "best", "final", "merged")
REPORT = {"scifact test": ("scifact", "test", {"passage_max_len": 256}), "xquad-en report": ("xquad-en", "report", {})}


def prepare(data):
    """The data of step 1 under data (written once, whole or absent)."""
    sci, src = os.path.join(data, "scifact"), os.path.join(ROOT, "data", "scifact")
    if not os.path.isdir(sci):
        tmp = sci + ".tmp"
        os.makedirs(os.path.join(tmp, "qrels"), exist_ok=True)
        for f in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
            os.symlink(os.path.join(src, f), os.path.join(tmp, f))
        rows = open(os.path.join(src, "qrels", "train.tsv")).read().splitlines()
        qids = sorted({r.split("\t")[0] for r in rows[1:]})
        dev = set(np.random.default_rng(0).choice(qids, N_DEV, replace=False).tolist())
        with open(os.path.join(tmp, "qrels", "dev.tsv"), "w") as f:
            f.write("\n".join([rows[0]] + [r for r in rows[1:] if r.split("\t")[0] in dev]) + "\n")
        texts = {r["_id"]: r["text"] for r in map(json.loads, open(os.path.join(src, "queries.jsonl")))}
        dev_texts = {texts[q] for q in dev}
        lines = open(os.path.join(src, "train_mined.jsonl")).readlines()
        kept = [line for line in lines if json.loads(line)["query"] not in dev_texts]
        assert len(lines) - len(kept) == N_DEV, (len(lines), len(kept))  # every dev query had exactly one line
        with open(os.path.join(data, "train_nodev.jsonl"), "w") as f:
            f.writelines(kept)
        os.replace(tmp, sci)
    xq = os.path.join(data, "xquad-en")
    if not os.path.isdir(xq):
        tmp = xquad_english(xq + ".tmp")
        rows = open(os.path.join(tmp, "qrels", "test.tsv")).read().splitlines()
        paragraph = lambda r: r.split("\t")[1].split("-")[1]  # noqa: E731 en-p012-s03 -> p012
        ps = sorted({paragraph(r) for r in rows[1:]})
        half = set(np.random.default_rng(0).permutation(ps)[:len(ps) // 2].tolist())
        for split, keep in (("retention", lambda p: p in half), ("report", lambda p: p not in half)):
            with open(os.path.join(tmp, "qrels", f"{split}.tsv"), "w") as f:
                f.write("\n".join([rows[0]] + [r for r in rows[1:] if keep(paragraph(r))]) + "\n")
        os.replace(tmp, xq)


def run(cmd):
    """A step as a user runs it, from the repository root; its output goes to this script's."""
    print("+", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)


def evaluated(out, name, ckpt, data):
    """Every REPORT set's result for one model (cached in out/results/<name>.json): rows and per-query nDCG@10."""
    path = os.path.join(out, "results", f"{name}.json")
    if not os.path.exists(path):
        res = {}
        for label, (folder, split, kw) in REPORT.items():
            r = evaluate(ckpt, os.path.join(data, folder), split, cache_dir=os.path.join(ROOT, ".cache", "eval"),
                         verbose=False, **kw)
            res[label] = {"rows": r["rows"], "per_query_ndcg10": r["per_query_ndcg10"]}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(res, f)
        os.replace(path + ".tmp", path)
    return json.load(open(path))


def report(res, cfg, best, merged):
    """The tables and the last line."""
    lines = [f"best: step {best['step']} ({cfg['select_metric']} {best['value']:.4f}); merged: alpha "
             f"{merged['alpha']}", ""]
    for label in REPORT:
        lines.append(f"{label:16s} " + " ".join(f"{row:>13s}" for row in ROWS))
        for m in MODELS:
            lines.append(f"  {m:14s} " + " ".join(f"{res[m][label]['rows'][row]['nDCG@10']:13.4f}" for row in ROWS))
    lines.append("paired nDCG@10 differences, 95% bootstrap intervals over queries:")
    per = lambda m, label, row: np.array([res[m][label]["per_query_ndcg10"][row]])  # noqa: E731 (1, queries)
    for a, b in (("best", "start"), ("merged", "start"), ("final", "start"), ("best", "final"), ("merged", "final")):
        for label in REPORT:
            cells = []
            for row in ROWS:
                d, lo, hi = stats.query_bootstrap(per(a, label, row), per(b, label, row))
                cells.append(f"{row} {d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
            lines.append(f"  {a + ' - ' + b:15s} {label:16s} " + "  ".join(cells))
    nd = lambda m, label, row: res[m][label]["rows"][row]["nDCG@10"]  # noqa: E731
    kept = {m: min((nd(m, "scifact test", r) - nd("start", "scifact test", r)) /
                   (nd("final", "scifact test", r) - nd("start", "scifact test", r)) for r in ROWS) for m in MODELS}
    lines.append("gain kept on SciFact test (x - start) / (final - start), per row: " + "; ".join(
        f"{m}: " + " ".join(f"{r} {(nd(m, 'scifact test', r) - nd('start', 'scifact test', r)) / (nd('final', 'scifact test', r) - nd('start', 'scifact test', r)):.2f}"  # noqa: E501
                            for r in ROWS) for m in ("best", "merged")))
    ret = {m: nd(m, "xquad-en report", "dense") - nd("start", "xquad-en report", "dense") for m in MODELS}
    lines.append(f"finetune_gain_kept_best={kept['best']:.3f} finetune_gain_kept_merged={kept['merged']:.3f} "
                 f"retention_best_minus_start={ret['best']:+.4f} retention_merged_minus_start={ret['merged']:+.4f}")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="only write the data")
    p.add_argument("--grid", default="0,0.2,0.4,0.6,0.8,1", help="merge.py's alpha grid (its default: 0.1 apart)")
    a = p.parse_args()
    cfg = yaml.safe_load(open(CONFIG))
    out, data = os.path.join(ROOT, os.path.dirname(cfg["out_dir"])), os.path.join(ROOT, "runs", "finetune", "data")
    prepare(data)
    if a.prepare:
        return
    run_dir = os.path.join(ROOT, cfg["out_dir"])
    if not os.path.isfile(os.path.join(run_dir, "final", "train_state.json")):
        run(["train.py", CONFIG] + (["--resume=auto"] if os.path.isdir(run_dir) else []))
    os.makedirs(os.path.dirname(CURVES), exist_ok=True)
    run(["bench/plot_logs.py", os.path.join(run_dir, "log.jsonl"), "--out", CURVES, "--keys",
         ",".join(["loss"] + [f"{s}/{r}/nDCG@10" for s in cfg["eval_sets"] for r in ("dense", "multi-vector", "all")])])
    merged_dir = os.path.join(out, "merged")
    if not os.path.isdir(merged_dir):
        run(["merge.py", "--base", cfg["model"], "--tuned", os.path.join(run_dir, "final"), "--alpha", "auto",
             "--grid", a.grid, "--eval_sets", CONFIG, "--select_metric", cfg["select_metric"], "--retain_metric",
             cfg["retain_metric"], "--retain_tolerance", str(cfg["retain_tolerance"]), "--out", merged_dir])
    import torch
    from model import M3
    torch.manual_seed(cfg.get("seed", 42))  # the start: the run's step 0, its new heads drawn as train.py draws them
    start = M3.from_pretrained(cfg["model"], new_heads=True, pooling=cfg["pooling"])
    start.source = f"{cfg['model']} (new heads, {cfg['pooling']} pooling)"
    ckpts = {"start": start, "best": os.path.join(run_dir, "best"), "final": os.path.join(run_dir, "final"),
             "merged": merged_dir}
    res = {m: evaluated(out, m, ckpt, data) for m, ckpt in ckpts.items()}
    best = json.load(open(os.path.join(run_dir, "best", "best.json")))
    merged = json.load(open(os.path.join(merged_dir, "merge.json")))
    print("\n".join(report(res, cfg, best, merged)))


if __name__ == "__main__":
    main()
