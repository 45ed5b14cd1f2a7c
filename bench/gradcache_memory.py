"""Peak memory of one training step, plain vs gradient cache, at 16 and 256 queries: does the cache stop the growth?

Model: random BertModel, 4 layers, hidden 128, 2 heads, FFN 512, vocab 1000 (parameters ~1M, so activations dominate),
colbert dim 4 (a reduced colbert_dim: the cached representations are the one part of the gradient cache that must grow
with the batch, and at D = H they would measure the cache, not the activations), dropout 0.1, fp32 on CPU.
Batch: B queries x 32 tokens, G=8 passages per query x 256 tokens (full length, random ids). All three heads +
self-distillation. Both settings: gradient checkpointing ON and sub_batch_size=64 (plain = the paper's split-batch:
chunks encoded with graph and checkpoints, all kept; cache: chunks encoded twice, one at a time), so grad_cache is the
only difference. Checkpointing keeps the plain step at 256 queries (2048 x 256 passage tokens) near 2 GB.
Each setting runs in a fresh subprocess: build model + AdamW, one warm-up step at 2 queries (optimizer states now
exist), build the batch, then reset the peak (/proc/self/clear_refs <- 5) and read VmRSS as the baseline; peak =
VmHWM after one step (train_step + clip + AdamW step + zero_grad) - baseline. Linux only.

    python bench/gradcache_memory.py    # last line: plain_peak_ratio_256_vs_16=<f> gradcache_peak_ratio_256_vs_16=<f>
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch
from transformers import BertConfig, BertModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import train  # noqa: E402
from model import M3  # noqa: E402
from tiny import make_tokenizer  # noqa: E402

G, TQ, TP, V = 8, 32, 256, 1000
LAYERS, HIDDEN, N_HEADS, SUB, COLBERT_DIM = 4, 128, 2, 64, 4
HEADS = ["dense", "sparse", "colbert"]


def rss_mb(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024


def make_batch(B, tok, gen):
    """B queries x TQ tokens, B*G passages x TP tokens, random ids in [5, V), CLS first, SEP last, no padding."""
    out = {"teacher": None}
    for k, n, T in (("q", B, TQ), ("p", B * G, TP)):
        ids = torch.randint(5, V, (n, T), generator=gen)
        ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
        out[f"{k}_ids"], out[f"{k}_mask"] = ids, torch.ones(n, T, dtype=torch.long)
    return out


def one_setting(B, grad_cache):
    """Runs in a fresh process: peak MB above the baseline for one step at B queries -> dict."""
    torch.manual_seed(0)
    tok = make_tokenizer("xlmr")
    enc = BertModel(BertConfig(vocab_size=V, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=N_HEADS,
                               intermediate_size=4 * HIDDEN, max_position_embeddings=TP,
                               pad_token_id=tok.pad_token_id), add_pooling_layer=False)
    enc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = M3(enc, tok, colbert_dim=COLBERT_DIM).train()
    cfg = train.Config(train_group_size=G, query_max_len=TQ, passage_max_len=TP, self_distill=True,
                       sub_batch_size=SUB, grad_cache=grad_cache)
    opt, sched = train.make_optimizer(model, cfg, total_steps=100)
    amp, scaler = torch.autocast("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(0)

    def step(batch):
        loss, _ = train.train_step(model, batch, cfg, HEADS, True, amp, scaler)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step(make_batch(2, tok, gen))  # warm-up: optimizer states exist from here on
    batch = make_batch(B, tok, gen)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = rss_mb("VmRSS")
    t0 = time.perf_counter()
    loss = step(batch)
    dt = time.perf_counter() - t0
    peak = rss_mb("VmHWM") - base
    n_tok = B * TQ + B * G * TP
    return {"B": B, "grad_cache": grad_cache, "peak_mb": peak, "base_mb": base, "seconds": dt, "loss": loss,
            "tokens": n_tok, "params": sum(p.numel() for p in model.parameters())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", default="", help="internal: 'B,grad_cache' runs one setting and prints its JSON")
    args = ap.parse_args()
    if args.one:
        B, gcache = args.one.split(",")
        print(json.dumps(one_setting(int(B), gcache == "1")))
        return
    print(f"model: BertModel {LAYERS} layers, hidden {HIDDEN}, {N_HEADS} heads, FFN {4 * HIDDEN}, vocab {V}, colbert "
          f"dim {COLBERT_DIM}; G={G}, {TQ}/{TP} tokens; gradient checkpointing on, sub_batch_size={SUB} in all settings")
    res = {}
    for gcache in (False, True):
        for B in (16, 256):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--one={B},{int(gcache)}"],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"setting B={B} grad_cache={gcache} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res[B, gcache] = r
            rep_mb = B * G * (TP - 1) * (COLBERT_DIM + 1) * 4 / 2 ** 20  # one fp32 copy of the passages' colbert+sparse
            print(f"B={B:3d} grad_cache={str(gcache):5s} | peak {r['peak_mb']:8.1f} MB above baseline "
                  f"{r['base_mb']:.0f} MB | {r['peak_mb'] * 2 ** 20 / r['tokens']:7.0f} B/token | one copy of the "
                  f"passage colbert+sparse reps {rep_mb:6.1f} MB | step {r['seconds']:.1f} s | loss {r['loss']:.4f} | "
                  f"params {r['params'] / 1e6:.2f}M", flush=True)
    plain = res[256, False]["peak_mb"] / res[16, False]["peak_mb"]
    cache = res[256, True]["peak_mb"] / res[16, True]["peak_mb"]
    print(f"plain_peak_ratio_256_vs_16={plain:.2f} gradcache_peak_ratio_256_vs_16={cache:.2f}")


if __name__ == "__main__":
    main()
