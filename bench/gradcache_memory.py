"""Peak memory of one training step, plain vs gradient cache, at 16 and 256 queries: does the cache stop the growth?

Model: random BertModel, 4 layers, hidden 128, 2 heads, FFN 512, vocab 1000 (parameters ~1M, so activations dominate),
colbert dim 4 (a reduced colbert_dim: the cached representations are the one part of the gradient cache that must grow
with the batch, and at D = H they would measure the cache, not the activations), dropout 0.1, fp32 on CPU.
Batch: B queries x 32 tokens, G=8 passages per query x 256 tokens (full length, random ids). All three heads +
self-distillation. Both settings: gradient checkpointing ON and sub_batch_size=64 (plain = the paper's split-batch:
chunks encoded with graph and checkpoints, all kept; cache: chunks encoded twice, one at a time), so grad_cache is the
only difference. Each setting runs in a fresh subprocess: build model + AdamW, one warm-up step at 2 queries
(optimizer states now exist), build the batch, then reset the peak (/proc/self/clear_refs <- 5) and read VmRSS as the
baseline; peak = VmHWM after one step (train.train_step + train.optimizer_step) - baseline. Linux only.

What the children run with, so that the ratio is the code's and not the machine's (the old figure moved with both):
- glibc malloc with a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=131072; LD_PRELOAD, GLIBC_TUNABLES and inherited
  MALLOC_* are not passed on). By default glibc raises that threshold (up to 32 MiB) each time a mapped block is freed;
  smaller blocks then come from the brk heap and per-thread arenas, which give memory back only from their top, so
  freed holes stay resident and VmHWM measured the allocation history, not the tensors: on one 2-core machine the
  grad-cache ratio read 1.15, 1.32, 1.16 from commit to commit, and 1.71 with 16 threads (1.25 on a many-core EPYC),
  while the live tensors (torch.profiler memory events) peak at 318 and 340 MB, 1.07. Pinned, every block >= 128 KiB
  is its own mapping, unmapped when freed, and the peak follows the tensors: 318 and 353 MB, 1.11.
- --threads intra-op threads (default 2; torch.set_num_threads, OMP/MKL_NUM_THREADS): torch's default is the core
  count, and per-thread buffers and arenas came with it. Pinned, 16 threads read 337 and 377 MB, 1.12.
- transparent huge pages off (prctl PR_SET_THP_DISABLE): where THP is "always" the kernel may back mappings and the
  heap with 2 MiB pages and RSS would count partly used ones (not measured: this machine runs THP "madvise").
What grows with the batch under the cache, at its peak (the re-encode backward of one chunk): the cached
representations and their gradients (column "reps + grads", 0.09 MB per query here). The loss phase (score matrices
B x B*G, the passages' (B*G, K) sparse vectors, the colbert blocks, their gradients) grows ~0.14 MB per query but peaks
lower here (248 -> 282 MB live at 16 -> 256 queries).

    python bench/gradcache_memory.py    # last line: plain_peak_ratio_256_vs_16=<f> gradcache_peak_ratio_256_vs_16=<f>
    python bench/gradcache_memory.py --threads 16 [--malloc default]   # the same figure with 16 threads / glibc's
                                                                       # default (history-dependent) thresholds
"""
import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys

import torch
from transformers import BertConfig, BertModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ALL_HEADS, random_batch, reset_peak_rss, rss_mb  # noqa: E402  (puts the repository on sys.path)
import train  # noqa: E402
from model import M3  # noqa: E402
from tiny import make_tokenizer  # noqa: E402

G, TQ, TP, V = 8, 32, 256, 1000
LAYERS, HIDDEN, N_HEADS, SUB, COLBERT_DIM = 4, 128, 2, 64, 4
MMAP_THRESHOLD = 128 * 1024  # glibc's own initial value, here fixed: blocks >= 128 KiB are mapped and unmapped on free
PR_SET_THP_DISABLE = 41  # linux/prctl.h; inherited by children, kept across execve


def cache_mb(B):
    """The gradient cache's own memory: every text's dense + sparse + colbert representations, fp32, and their grads."""
    per_text = lambda T: HIDDEN + T + (T - 1) * COLBERT_DIM  # noqa: E731
    return 2 * 4 * (B * per_text(TQ) + B * G * per_text(TP)) / 2 ** 20


def one_setting(B, grad_cache, threads):
    """Runs in a fresh process: peak MB above the baseline for one step at B queries -> dict."""
    torch.set_num_threads(threads)
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
        loss, _ = train.train_step(model, batch, cfg, ALL_HEADS, True, amp, scaler)
        train.optimizer_step(model, opt, sched, scaler, cfg, ALL_HEADS)
        return loss.item()

    step(random_batch(2, G, TQ, TP, tok, V, gen))  # warm-up: optimizer states exist from here on
    batch = random_batch(B, G, TQ, TP, tok, V, gen)
    gc.collect()
    reset_peak_rss()
    base = rss_mb("VmRSS")
    loss = step(batch)
    peak = rss_mb("VmHWM") - base
    return {"B": B, "grad_cache": grad_cache, "peak_mb": peak, "base_mb": base, "loss": loss,
            "tokens": B * TQ + B * G * TP, "params": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads()}


def child_env(threads, malloc):
    """The children's environment: fixed thread counts, glibc malloc with a fixed mmap threshold (or its defaults)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if malloc == "pinned":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # setting it also stops the dynamic trim threshold
    return env


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads in every setting (default 2)")
    ap.add_argument("--malloc", choices=("pinned", "default"), default="pinned",
                    help="glibc malloc with a fixed 128 KiB mmap threshold (the figure), or glibc's dynamic defaults")
    ap.add_argument("--one", default="", help="internal: 'B,grad_cache' runs one setting and prints its JSON")
    args = ap.parse_args()
    if args.one:
        B, gcache = args.one.split(",")
        print(json.dumps(one_setting(int(B), gcache == "1", args.threads)))
        return
    thp_off = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
    env = child_env(args.threads, args.malloc)
    print(f"model: BertModel {LAYERS} layers, hidden {HIDDEN}, {N_HEADS} heads, FFN {4 * HIDDEN}, vocab {V}, colbert "
          f"dim {COLBERT_DIM}; G={G}, {TQ}/{TP} tokens; gradient checkpointing on, sub_batch_size={SUB} in all "
          "settings")
    print(f"children: {args.threads} threads, malloc {args.malloc}"
          f"{f' (MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD})' if args.malloc == 'pinned' else ''}, "
          f"transparent huge pages {'off' if thp_off else 'as the system sets them (prctl failed)'}", flush=True)
    res = {}
    for gcache in (False, True):
        for B in (16, 256):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--one={B},{int(gcache)}",
                                  f"--threads={args.threads}"], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f"setting B={B} grad_cache={gcache} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res[B, gcache] = r
            print(f"B={B:3d} grad_cache={str(gcache):5s} | peak {r['peak_mb']:8.1f} MB above baseline "
                  f"{r['base_mb']:.0f} MB | {r['peak_mb'] * 2 ** 20 / r['tokens']:7.0f} B/token | reps + grads (what "
                  f"the cache holds) {cache_mb(B):5.1f} MB | loss {r['loss']:.4f} | "
                  f"params {r['params'] / 1e6:.2f}M | {r['threads']} threads", flush=True)
    plain = res[256, False]["peak_mb"] / res[16, False]["peak_mb"]
    cache = res[256, True]["peak_mb"] / res[16, True]["peak_mb"]
    print(f"plain_peak_ratio_256_vs_16={plain:.2f} gradcache_peak_ratio_256_vs_16={cache:.2f}")


if __name__ == "__main__":
    main()
