"""Overhead of the M3 training step over the bare encoder: full step time / encoder forward+backward time.

MiniLM-sized random encoder (BertModel: 6 layers, hidden 384, 12 heads, FFN 1536, vocab 30522), B=4 queries x G=8
passages at 64 / 256 tokens (random lengths from half to full, padded), all three heads + self-distillation, fp32,
gradient checkpointing off, dropout on (both sides). Interleaved repetitions after warm-up, medians.
(a) step: train.train_step + train.optimizer_step (clip, AdamW, schedule, zero_grad), as train.main does it.
(b) encoder: model.encoder on the same padded q and p tensors, loss = sum(last_hidden_state * fixed random), backward.
Then a breakdown of where the extra time goes: the optimizer part of (a), and the heads + scores + loss (forward and
backward of compute_loss on detached representations; the rest of (a) - (b) is the heads inside M3.forward).

    python bench/train_step.py          # last line: step_over_encoder=<f>   (target <= 1.10)
"""
import argparse
import os
import statistics
import sys
import time

import torch
from transformers import BertConfig, BertModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ALL_HEADS, random_batch  # noqa: E402  (puts the repository on sys.path)
import train  # noqa: E402
from model import M3  # noqa: E402
from tiny import make_tokenizer  # noqa: E402

B, G, TQ, TP, V = 4, 8, 64, 256, 30522


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = make_tokenizer("xlmr")
    enc = BertModel(BertConfig(vocab_size=V, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                               intermediate_size=1536, max_position_embeddings=512,
                               pad_token_id=tok.pad_token_id), add_pooling_layer=False)
    model = M3(enc, tok).train()
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
