"""Overhead of the M3 training step over the bare encoder: full step time / encoder forward+backward time.

MiniLM-sized random encoder (BertModel: 6 layers, hidden 384, 12 heads, FFN 1536, vocab 30522), B=4 queries x G=8
passages at 64 / 256 tokens (random lengths from half to full, padded), all three heads + self-distillation, fp32,
gradient checkpointing off, dropout on (both sides). Interleaved repetitions after warm-up, medians.
(a) step: train.train_step + train.optimizer_step (clip, AdamW, schedule, zero_grad), as train.main does it.
(b) encoder: model.encoder on the same padded q and p tensors, loss = sum(last_hidden_state * fixed random), backward.
Then a breakdown of where the extra time goes: the optimizer part of (a), and the heads + scores + loss (forward and
backward of compute_loss on detached representations; the rest of (a) - (b) is the heads inside M3.forward).

    python bench/train_step.py          # last line: step_over_encoder=<f>   (target <= 1.10)

--vs_reference: whole training runs against the reference trainer, each its own process: train.py on the
real all-MiniLM-L6-v2 (CLS pooling, new heads), data/scifact/train_mined.jsonl, 4 queries x 8 passages, 64/256
tokens, unified loss + self-distillation from step 0, lr 1e-5, 12 steps, data in the training process (num_workers
0, as the reference's dataloader_num_workers 0); steady rate over steps 2..12, peak RSS of the process (wait4). With
--reference_python (a throwaway venv with FlagEmbedding 1.4.2: bench/reference_step.py) the reference runs first.

    python bench/train_step.py --vs_reference --reference_python REFVENV/bin/python   # REFVENV: reference_step.py
        # last line: samples_s=<f> peak_rss_mb=<f>   (ours, lean attention, no checkpointing; targets: >= 1.5x the
        # reference's samples/s and <= 0.5x its peak RSS)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import BertConfig, BertModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ALL_HEADS, random_batch  # noqa: E402  (puts the repository on sys.path)
import attention  # noqa: E402
import train  # noqa: E402
from model import M3  # noqa: E402
from tiny import make_tokenizer  # noqa: E402

B, G, TQ, TP, V = 4, 8, 64, 256, 30522
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTING = ["--model=minilm", "--init_new_heads=true", "--pooling=cls", "--train_data=data/scifact/train_mined.jsonl",
           f"--train_group_size={G}", f"--query_max_len={TQ}", f"--passage_max_len={TP}", f"--batch_sizes=[{B}]",
           "--length_ranges=[0,8192]", "--lr=1e-5", "--head_schedule=dense,sparse,colbert", "--self_distill=true",
           "--self_distill_start=0", "--max_steps=12", "--log_every=1", "--num_workers=0", "--seed=42"]
RUNS = {"ours, SDPA attention, no checkpointing": ["--attention=sdpa", "--gradient_checkpointing=false"],
        "ours, SDPA attention, checkpointing": ["--attention=sdpa", "--gradient_checkpointing=true"],
        "ours, lean attention, checkpointing": ["--attention=lean", "--gradient_checkpointing=true"],
        "ours, lean attention, no checkpointing": ["--attention=lean", "--gradient_checkpointing=false"]}


def train_run(args):
    """train.py SETTING + args in its own process -> (steady samples/s over steps 2..12, peak RSS MB)."""
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.Popen([sys.executable, "train.py", *SETTING, *args, f"--out_dir={out}"], cwd=ROOT,
                                stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        assert status == 0, f"train.py {' '.join(args)} failed"
        ms = [json.loads(line)["ms"] for line in open(os.path.join(out, "log.jsonl"))]
    return B * (len(ms) - 1) / (sum(ms[1:]) / 1000), usage.ru_maxrss / 1024


def vs_reference(reference_python):
    """The table of whole runs, ratios against the reference (or against the first row without it)."""
    rows = {}
    if reference_python:
        out = subprocess.run([reference_python, "bench/reference_step.py", "--steps", "12"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
        rows["reference (FlagEmbedding 1.4.2, no checkpointing)"] = tuple(float(w.split("=")[1]) for w in out[-2:])
    for name, args in RUNS.items():
        rows[name] = train_run(args)
        print(f"{name}: {rows[name][0]:.3f} samples/s, {rows[name][1]:.0f} MB", flush=True)
    base_s, base_m = next(iter(rows.values()))
    print(f"{'run':52s} {'samples/s':>9s} {'ratio':>6s} {'peak RSS MB':>11s} {'ratio':>6s}")
    for name, (s, m) in rows.items():
        print(f"{name:52s} {s:9.3f} {s / base_s:6.2f} {m:11.0f} {m / base_m:6.2f}")
    s, m = rows["ours, lean attention, no checkpointing"]
    print(f"samples_s={s:.3f} peak_rss_mb={m:.0f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--vs_reference", action="store_true")
    ap.add_argument("--reference_python", default="", help="python of a venv with FlagEmbedding==1.4.2")
    args = ap.parse_args()
    if args.vs_reference:
        return vs_reference(args.reference_python)
    torch.manual_seed(0)
    tok = make_tokenizer("xlmr")
    enc = BertModel(BertConfig(vocab_size=V, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                               intermediate_size=1536, max_position_embeddings=512,
                               pad_token_id=tok.pad_token_id), add_pooling_layer=False)
    model = M3(enc, tok).train()
    attention.use(enc, "auto", "cpu")  # train.py's default on CPU: the lean attention kernel
    cfg = train.Config(train_group_size=G, query_max_len=TQ, passage_max_len=TP, self_distill=True,
                       gradient_checkpointing=False, sub_batch_size=0, grad_cache=False)
    opt, sched = train.make_optimizer(model, cfg, total_steps=1000)
    amp = torch.autocast("cpu", enabled=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(0)
    batch = random_batch(B, G, TQ, TP, tok, V, gen, ragged=True)
    q_ids, q_mask, p_ids, p_mask = batch["q_ids"], batch["q_mask"], batch["p_ids"], batch["p_mask"]
    r_q, r_p = torch.randn(B, TQ, 384, generator=gen), torch.randn(B * G, TP, 384, generator=gen)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"encoder: 6 layers, hidden 384, vocab {V}, {n_params / 1e6:.1f}M parameters (M3 total); "
          f"attn_implementation={enc.config._attn_implementation}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"batch: {B} queries x {TQ} tokens, {B * G} passages x {TP} tokens; real tokens "
          f"{int(q_mask.sum() + p_mask.sum())} of {B * TQ + B * G * TP} padded")

    def step():
        """One training step as in train.main -> (seconds for train_step, seconds for clip + AdamW + zero_grad)."""
        t0 = time.perf_counter()
        loss, parts = train.train_step(model, batch, cfg, ALL_HEADS, True, amp, scaler)
        t1 = time.perf_counter()
        train.optimizer_step(model, opt, sched, scaler, cfg, ALL_HEADS)
        return t1 - t0, time.perf_counter() - t1

    def encoder_only():
        """The encoder's own forward + backward on the same padded tensors -> seconds."""
        t0 = time.perf_counter()
        h_q = model.encoder(input_ids=q_ids, attention_mask=q_mask).last_hidden_state  # (B, TQ, H)
        h_p = model.encoder(input_ids=p_ids, attention_mask=p_mask).last_hidden_state  # (B*G, TP, H)
        ((h_q * r_q).sum() + (h_p * r_p).sum()).backward()
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return dt

    def loss_only():
        """Scores + loss forward and backward on detached representations -> seconds (the non-encoder compute)."""
        with torch.no_grad():
            q, p = model(q_ids, q_mask), model(p_ids, p_mask)
        q = {k: v.requires_grad_(v.is_floating_point()) for k, v in q.items()}
        p = {k: v.requires_grad_(v.is_floating_point()) for k, v in p.items()}
        t0 = time.perf_counter()
        loss, _ = train.compute_loss(q, p, batch, cfg, ALL_HEADS, True)
        loss.backward()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step(), encoder_only()
    steps, opts, encs, ratios = [], [], [], []
    for r in range(args.reps):  # interleaved, so machine noise hits both sides alike
        fb, o = step()
        e = encoder_only()
        steps.append(fb + o), opts.append(o), encs.append(e), ratios.append((fb + o) / e)
        print(f"rep {r}: step {1000 * (fb + o):.0f} ms (train_step {1000 * fb:.0f} + optimizer {1000 * o:.0f}) | "
              f"encoder fwd+bwd {1000 * e:.0f} ms | ratio {(fb + o) / e:.3f}", flush=True)
    losses = [loss_only() for _ in range(3)]
    med = statistics.median
    s, e, o, lo = med(steps), med(encs), med(opts), med(losses)
    print(f"median: step {1000 * s:.0f} ms, encoder {1000 * e:.0f} ms; median of per-rep ratios {med(ratios):.3f}")
    print(f"breakdown of step - encoder = {1000 * (s - e):.0f} ms: optimizer (clip + AdamW + zero_grad) "
          f"{1000 * o:.0f} ms, scores + loss fwd+bwd {1000 * lo:.0f} ms, rest (heads in M3.forward, noise) "
          f"{1000 * (s - e - o - lo):.0f} ms")
    print(f"step_over_encoder={s / e:.3f}")


if __name__ == "__main__":
    main()
