"""Quality on SciFact test (nDCG@10, Recall@100): zero-shot MiniLM vs our M3 curriculum at the reference's budget.

The reference's run on data/scifact/train_mined.jsonl (data/README.md): 100 steps of 4 queries x 8 passages, max
lengths 64/256, lr 2e-5, tau 0.02, new random heads, unified fine-tuning with self-distillation. Ours, same budget:
configs/demo.yaml at G=8 and 256 passage tokens, 20 dense-only + 40 all-heads + 40 unified (self-KD) steps, and two
ablations: the last 40 steps without self-distillation; stages 2-3 with the new heads at the encoder's learning rate
(head_lr 0 = lr, as the reference trains them) instead of demo.yaml's head_lr. Evaluation: exact scores against all 5,183 documents,
queries 64 / passages 256 tokens, multi-vector MaxSim over every document (colbert_k=0), fusion weights 1, 0.3, 1.

    python bench/quality.py                # ~1 hour on 2 CPU cores; last line: zs_dense=.. ft_dense=.. ...
    python bench/quality.py --quick        # 2 steps per stage, 300-document slice: checks the script
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from eval import evaluate  # noqa: E402
from model import M3  # noqa: E402

REFERENCE = {"dense": 0.6325, "sparse": 0.130, "multi-vector": 0.7164, "dense+sparse": 0.6285, "all": 0.7148}
ZERO_SHOT_BEST = 0.6451  # all-MiniLM-L6-v2, mean pooling (data/README.md)


def train(out, steps, *extra):
    """One stage of the curriculum through train.py, as a user runs it; returns its wall time in seconds."""
    t = time.time()
    cmd = [sys.executable, "train.py", "configs/demo.yaml", "--train_group_size=8", "--passage_max_len=256",
           f"--max_steps={steps}", f"--out_dir={out}", *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.time() - t


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
    s1, s2, s3, s4, s5, s6 = (os.path.join(a.out, n) for n in ("1_dense", "2_all_heads", "3_unified", "3_no_self_kd",
                                                                "2_heads_at_lr", "3_heads_at_lr"))
    times["stage 1 dense"] = train(s1, steps[0])
    times["stage 2 all heads"] = train(s2, steps[1], "--head_schedule=dense,sparse,colbert", f"--init_from={s1}/final")
    times["stage 3 unified"] = train(s3, steps[2], "--head_schedule=dense,sparse,colbert", "--self_distill=true",
                                     f"--init_from={s2}/final")
    times["stage 3 ablation"] = train(s4, steps[2], "--head_schedule=dense,sparse,colbert", "--self_distill=false",
                                      f"--init_from={s2}/final")
    times["stages 2-3, heads at lr"] = (
        train(s5, steps[1], "--head_schedule=dense,sparse,colbert", "--head_lr=0", f"--init_from={s1}/final") +
        train(s6, steps[2], "--head_schedule=dense,sparse,colbert", "--head_lr=0", "--self_distill=true",
              f"--init_from={s5}/final"))
    for name, ck in (("fine-tuned", s3), ("without self-KD", s4), ("heads at the encoder's lr", s6)):
        t = time.time()
        rows[name] = evaluate(os.path.join(ck, "final"), data, out_dir=os.path.join(a.out, f"eval_{name}"), **ev)
        times[f"eval {name}"] = time.time() - t
    print(f"{'model':26s} {'row':14s} {'nDCG@10':>8s} {'R@100':>8s} {'reference nDCG@10':>18s}")
    for name, res in rows.items():
        for row, m in res['rows'].items():
            if name.startswith("zero") and row != "dense":
                continue  # the zero-shot model's heads are untrained: only its dense row means anything
            ref = REFERENCE.get(row, float("nan")) if name == "fine-tuned" else float("nan")
            print(f"{name:26s} {row:14s} {m['nDCG@10']:8.4f} {m['Recall@100']:8.4f} {ref:18.4f}")
    print("wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    ft, ab, hl = (rows[k]["rows"] for k in ("fine-tuned", "without self-KD", "heads at the encoder's lr"))
    with open(os.path.join(a.out, "quality.json"), "w") as f:
        json.dump({"rows": {k: v["rows"] for k, v in rows.items()}, "times": times}, f, indent=1)
    print(f"zs_dense={rows['zero-shot (mean pooling)']['rows']['dense']['nDCG@10']:.4f} "
          f"ft_dense={ft['dense']['nDCG@10']:.4f} ft_sparse={ft['sparse']['nDCG@10']:.4f} "
          f"ft_colbert={ft['multi-vector']['nDCG@10']:.4f} ft_dense_sparse={ft['dense+sparse']['nDCG@10']:.4f} "
          f"ft_all={ft['all']['nDCG@10']:.4f} noskd_all={ab['all']['nDCG@10']:.4f} "
          f"heads_at_lr_sparse={hl['sparse']['nDCG@10']:.4f}")


if __name__ == "__main__":
    main()
