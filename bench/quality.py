"""Quality on SciFact test (nDCG@10, Recall@100): zero-shot MiniLM vs our M3 curriculum at the reference's budget.

The reference's run on data/scifact/train_mined.jsonl (data/README.md): 100 steps of 4 queries x 8 passages, max
lengths 64/256, lr 2e-5, tau 0.02, new random heads, unified fine-tuning with self-distillation. Ours, same budget:
configs/demo.yaml at G=8 and 256 passage tokens, 20 dense-only + 40 all-heads + 40 unified (self-KD) steps, each stage
with its own seed, and three ablations: the last 40 steps without self-distillation; stages 2-3 with the new heads at
the encoder's learning rate (head_lr 0 = lr, as the reference trains them) instead of demo.yaml's head_lr; stages 2-3
with the reference's random sparse head instead of ours (term matching at the start, model.SPARSE_INIT). Evaluation:
exact scores against all 5,183 documents, queries 64 / passages 256 tokens, multi-vector MaxSim over every document
(colbert_k=0), fusion weights 1, 0.3, 1.

    python bench/quality.py                # ~50 minutes on 2 idle CPU cores; last line: zs_dense=.. ft_dense=.. ...
    python bench/quality.py --quick        # 2 steps per stage, 300-document slice: checks the script
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from eval import evaluate  # noqa: E402
from model import M3  # noqa: E402

REFERENCE = {"dense": 0.6325, "sparse": 0.130, "multi-vector": 0.7164, "dense+sparse": 0.6285, "all": 0.7148}
ZERO_SHOT_BEST = 0.6451  # all-MiniLM-L6-v2, mean pooling (data/README.md)


def train(out, steps, stage, *extra):
    """One stage of the curriculum through train.py, as a user runs it; returns its wall time in seconds. Each stage
    has its own seed (42 + stage, as demo.sh) so that it draws new batches instead of replaying the first ones."""
    t = time.time()
    cmd = [sys.executable, "train.py", "configs/demo.yaml", "--train_group_size=8", "--passage_max_len=256",
           f"--max_steps={steps}", f"--out_dir={out}", f"--seed={42 + stage}", "--overwrite=true", *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.time() - t


def random_sparse_head(src, dst):
    """Copy of checkpoint src whose sparse head is re-drawn with nn.Linear's default random init, as the reference
    starts it (ours starts as term matching: model.SPARSE_INIT). Stage 1 is dense-only, so this is exactly stage 1
    run with the reference's head."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    H = torch.load(os.path.join(src, "sparse_linear.pt"), weights_only=True)["weight"].shape[1]
    torch.manual_seed(42)
    torch.save(torch.nn.Linear(H, 1).state_dict(), os.path.join(dst, "sparse_linear.pt"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "quality"))
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    steps = (2, 2, 2) if a.quick else (20, 40, 40)
    ev = dict(split="test", query_max_len=64, passage_max_len=256, weights=(1, 0.3, 1), depth=1000, colbert_k=0,
              max_corpus=300 if a.quick else None, cache_dir=os.path.join(a.out, "cache"), verbose=False)
    data = os.path.join(ROOT, "data", "scifact")
    rows, times = {}, {}
    t = time.time()
    zero = M3.from_pretrained("minilm", new_heads=True, pooling="mean")
    rows["zero-shot (mean pooling)"] = evaluate(zero, data, out_dir=os.path.join(a.out, "eval_zero"), **ev)
    times["eval zero-shot"] = time.time() - t
    out = lambda name: os.path.join(a.out, name)
    heads = "--head_schedule=dense,sparse,colbert"
    times["stage 1 dense"] = train(out("1_dense"), steps[0], 0)
    times["stage 2 all heads"] = train(out("2_all_heads"), steps[1], 1, heads, f"--init_from={out('1_dense')}/final")
    times["stage 3 unified"] = train(out("3_unified"), steps[2], 2, heads, "--self_distill=true",
                                     f"--init_from={out('2_all_heads')}/final")
    times["stage 3 without self-KD"] = train(out("3_no_self_kd"), steps[2], 2, heads, "--self_distill=false",
                                             f"--init_from={out('2_all_heads')}/final")
    times["stages 2-3, heads at lr"] = (
        train(out("2_heads_at_lr"), steps[1], 1, heads, "--head_lr=0", f"--init_from={out('1_dense')}/final") +
        train(out("3_heads_at_lr"), steps[2], 2, heads, "--head_lr=0", "--self_distill=true",
              f"--init_from={out('2_heads_at_lr')}/final"))
    random_sparse_head(out("1_dense/final"), out("1_random_sparse"))
    times["stages 2-3, random sparse head"] = (
        train(out("2_random_sparse"), steps[1], 1, heads, f"--init_from={out('1_random_sparse')}") +
        train(out("3_random_sparse"), steps[2], 2, heads, "--self_distill=true",
              f"--init_from={out('2_random_sparse')}/final"))
    for name, ck in (("fine-tuned", "3_unified"), ("without self-KD", "3_no_self_kd"),
                     ("heads at the encoder's lr", "3_heads_at_lr"), ("random sparse head", "3_random_sparse")):
        t = time.time()
        rows[name] = evaluate(out(f"{ck}/final"), data, out_dir=out(f"eval_{name}"), **ev)
        times[f"eval {name}"] = time.time() - t
    print(f"{'model':26s} {'row':14s} {'nDCG@10':>8s} {'R@100':>8s} {'reference nDCG@10':>18s}")
    for name, res in rows.items():
        for row, m in res['rows'].items():
            if name.startswith("zero") and row not in ("dense", "sparse"):
                continue  # zero-shot: the new sparse head is term matching; the colbert head is random
            ref = REFERENCE.get(row, float("nan")) if name == "fine-tuned" else float("nan")
            print(f"{name:26s} {row:14s} {m['nDCG@10']:8.4f} {m['Recall@100']:8.4f} {ref:18.4f}")
    print("wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    ft, ab, hl, rs = (rows[k]["rows"] for k in ("fine-tuned", "without self-KD", "heads at the encoder's lr",
                                                "random sparse head"))
    with open(os.path.join(a.out, "quality.json"), "w") as f:
        json.dump({"rows": {k: v["rows"] for k, v in rows.items()}, "times": times}, f, indent=1)
    nd = lambda rows, r: rows[r]["nDCG@10"]
    targets = {"every row beats the reference's": all(nd(ft, r) > REFERENCE[r] for r in REFERENCE),
               "dense beats the zero-shot model's best": nd(ft, "dense") > ZERO_SHOT_BEST,
               "all three >= the best single head": nd(ft, "all") >= max(nd(ft, r) for r in ("dense", "sparse",
                                                                                           "multi-vector")),
               "self-distillation helps every row": all(nd(ft, r) > nd(ab, r) for r in ft)}
    print("targets: " + "; ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in targets.items()))
    print(f"zs_dense={rows['zero-shot (mean pooling)']['rows']['dense']['nDCG@10']:.4f} "
          f"ft_dense={ft['dense']['nDCG@10']:.4f} ft_sparse={ft['sparse']['nDCG@10']:.4f} "
          f"ft_colbert={ft['multi-vector']['nDCG@10']:.4f} ft_dense_sparse={ft['dense+sparse']['nDCG@10']:.4f} "
          f"ft_all={ft['all']['nDCG@10']:.4f} noskd_all={ab['all']['nDCG@10']:.4f} "
          f"heads_at_lr_sparse={hl['sparse']['nDCG@10']:.4f} random_sparse={rs['sparse']['nDCG@10']:.4f}")


if __name__ == "__main__":
    main()
