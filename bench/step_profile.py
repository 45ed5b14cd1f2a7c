"""Where one CPU training step's time and memory go, by attention kernel: torch.profiler time per op category and
the bytes autograd saves for backward per kind of tensor.

One train.train_step + optimizer_step (unified loss + self-distillation, all three heads, fp32, gradient
checkpointing off, dropout as the checkpoint sets it: 0.1 attention and hidden), after one warm-up step:
  --shape minilm: the real all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads), 4 queries x 8 passages, 64/256 tokens
  --shape xlmr-large: XLM-R large's shape (24 layers, hidden 1024, 16 heads, FFN 4096, vocab 250002) with random
    weights, 1 query x 4 passages, 64/256 tokens (the model users train; a small batch so that it fits a CPU)
Saved tensors are counted once per storage (parameters excluded), by shape: (B, heads, T, head dim) q, k, v and
the attention output; (.., T, T) attention scores, probabilities and dropout masks; (.., 4H) FFN intermediate;
(.., H) hidden states. Times are self CPU time (the profiler's; its own overhead inflates them a little).

    python bench/step_profile.py --shape minilm        # a table per kernel (sdpa, lean)
    python bench/step_profile.py --shape xlmr-large
"""
import argparse
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ALL_HEADS, random_batch  # noqa: E402  (puts the repository on sys.path)
import attention  # noqa: E402
from gpu_check import random_m3  # noqa: E402
import train  # noqa: E402
from model import M3  # noqa: E402

SHAPES = {"minilm": (4, 8, 64, 256), "xlmr-large": (1, 4, 64, 256)}  # B queries, G passages each, TQ, TP
ATTENTION_OPS = ("bmm", "_softmax", "_softmax_backward_data", "random_", "ge", "bernoulli_", "masked_fill",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")


def build(shape):
    if shape == "minilm":
        return M3.from_pretrained("minilm", new_heads=True, pooling="cls")
    return random_m3("large", torch.device("cpu"), dropout=0.1)[0]  # gpu_check's XLM-R-large-shaped M3


def category(name, shapes, T, H):
    """An op (name, input shapes) -> the part of the step it belongs to."""
    op = name.removeprefix("aten::")
    square = any(len(s) >= 2 and s[-1] in T and s[-2] in T for s in shapes)  # touches (.., T, T) scores
    if op in ("mm", "addmm", "linear"):
        return "linear layers (mm, addmm)"
    if square or op in ATTENTION_OPS[-2:]:
        return "attention core (scores, softmax, dropout, x V)"
    if op in ("bernoulli_", "div_", "mul") and any(s and s[-1] == H for s in shapes):
        return "hidden dropout"
    if "adam" in op or "foreach" in op or "norm" == op:
        return "optimizer (AdamW, clip)"
    if "layer_norm" in op or "gelu" in op:
        return "LayerNorm, GELU"
    return "other (copies, adds, embeddings, heads, loss)"


def saved_kind(t, T, H, D):
    if t.dim() == 4 and t.shape[-1] == D:  # before the scores: XLM-R's head dim 64 is also the query length
        return "q, k, v, attention output (.., T, head dim)"
    if t.dim() >= 2 and t.shape[-1] in T and t.shape[-2] in T:
        return f"attention (.., T, T) {str(t.dtype).removeprefix('torch.')}"
    if t.shape and t.shape[-1] == 4 * H:
        return "FFN intermediate (.., 4H)"
    if t.shape and t.shape[-1] == H:
        return f"hidden states (.., H) {str(t.dtype).removeprefix('torch.')}"
    return "other"


def one_step(model, batch, cfg, opt, sched):
    amp, scaler = torch.autocast("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False)
    train.train_step(model, batch, cfg, ALL_HEADS, True, amp, scaler)
    train.optimizer_step(model, opt, sched, scaler, cfg, ALL_HEADS)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="minilm")
    a = ap.parse_args()
    B, G, TQ, TP = SHAPES[a.shape]
    model = build(a.shape).train()
    H = model.encoder.config.hidden_size
    D = H // model.encoder.config.num_attention_heads  # head dim
    gen = torch.Generator().manual_seed(0)
    batch = random_batch(B, G, TQ, TP, model.tokenizer, model.encoder.config.vocab_size, gen, ragged=True)
    cfg = train.Config(train_group_size=G, query_max_len=TQ, passage_max_len=TP, self_distill=True,
                       gradient_checkpointing=False)
    opt, sched = train.make_optimizer(model, cfg, total_steps=100)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    n = sum(p.numel() for p in model.parameters())
    print(f"{a.shape}: {n / 1e6:.0f}M parameters ({16 * n / 2 ** 30:.1f} GB with their gradients and AdamW's two "
          f"moments, fp32), {B} x {TQ} query and {B * G} x {TP} passage tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for mode in ("sdpa", "lean"):
        attention.use(model.encoder, mode, "cpu")
        one_step(model, batch, cfg, opt, sched)  # warm-up
        saved = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                saved[ptr] = (saved_kind(t, (TQ, TP), H, D), t.untyped_storage().nbytes())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                profile(record_shapes=True) as prof:
            one_step(model, batch, cfg, opt, sched)
        times = defaultdict(float)
        for ev in prof.key_averages(group_by_input_shape=True):
            times[category(ev.key, [tuple(s) for s in ev.input_shapes if s], (TQ, TP), H)] += ev.self_cpu_time_total
        total = sum(times.values())
        print(f"\nattention {mode}: step {total / 1e6:.2f} s of CPU time")
        for k, v in sorted(times.items(), key=lambda kv: -kv[1]):
            print(f"  time  {k:52s} {v / 1e6:6.2f} s {100 * v / total:5.1f}%")
        kinds = defaultdict(int)
        for kind, nbytes in saved.values():
            kinds[kind] += nbytes
        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"  saved {k:52s} {v / 2 ** 20:6.0f} MB")
        print(f"  saved for backward in all: {sum(kinds.values()) / 2 ** 20:.0f} MB")


if __name__ == "__main__":
    main()
