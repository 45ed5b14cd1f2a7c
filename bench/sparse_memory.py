"""Peak extra memory of sparse scoring, forward + backward, at the vocabulary of XLM-R / BGE-M3.

B=64 queries x 64 tokens against N=512 passages x 512 tokens, V=250002, token ids drawn uniformly (the worst case
for any trick that relies on which ids occur). Peak = the process's peak resident memory during the step minus its
resident memory just before (Linux: /proc/self/clear_refs resets the peak), so allocator caching counts against us.
The naive figure is the reference's training tensor: passages x tokens x vocab in bf16 (SPEC 1.2).

    python bench/sparse_memory.py        # last line: sparse_peak_mb=<f> naive_tokens_x_vocab_mb=<f> ratio=<f>
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import reset_peak_rss, rss_mb  # noqa: E402  (puts the repository on sys.path)
from model import sparse_score  # noqa: E402

B, TQ, N, TP, V = 64, 64, 512, 512, 250002


def main():
    torch.manual_seed(0)
    q_ids, p_ids = torch.randint(0, V, (B, TQ)), torch.randint(0, V, (N, TP))
    q_w, p_w = torch.rand(B, TQ, requires_grad=True), torch.rand(N, TP, requires_grad=True)
    sparse_score(q_ids[:2], q_w[:2], p_ids[:2], p_w[:2]).sum().backward()  # warm up kernels and allocator paths
    q_w.grad = p_w.grad = None
    reset_peak_rss()
    base = rss_mb("VmRSS")
    s = sparse_score(q_ids, q_w, p_ids, p_w)  # (B, N)
    s.sum().backward()
    peak = rss_mb("VmHWM") - base
    naive = N * TP * V * 2 / 2 ** 20  # (passages, tokens, vocab) bf16
    print(f"scores {tuple(s.shape)}, distinct query ids {torch.unique(q_ids).numel()}, "
          f"grad norms {q_w.grad.norm():.3f} {p_w.grad.norm():.3f}")
    print(f"sparse_peak_mb={peak:.1f} naive_tokens_x_vocab_mb={naive:.1f} ratio={naive / max(peak, 1e-9):.1f}")


if __name__ == "__main__":
    main()
