"""Attention with dropout that keeps a 1-byte dropout mask instead of the attention probabilities (CPU training).

On CPU, scaled_dot_product_attention has no fused kernel with dropout: it falls back to the math path, which
materialises the scores, the probabilities, the float dropout noise and the dropped probabilities of every layer and
keeps three of them for backward (4 bytes each per (head, query, key)). This kernel walks the batch in chunks of
~chunk_elems scores, so the big temporaries stay small and are reused, and keeps for backward only q, k, v and the
dropout mask as bool (1 byte per score). Backward recomputes the chunk's scores and softmax (one more matmul), as
flash attention does. Measured against SDPA's math path: README, "Speed and memory on CPU".
The mask draws 16 random bits per score from torch's generator (4 scores per 64-bit draw, ~3x faster than
bernoulli_): a score is dropped with probability round(p * 65536) / 65536 (0.1 -> 0.10000610) and the kept ones
are scaled by 1 / (1 - that), so the layer stays unbiased. Recomputations replay the same mask (gradient
checkpointing and the gradient cache restore torch's RNG state before they run the forward again).

Without dropout (eval, dropout 0) the encoder keeps torch's SDPA (its fused CPU kernel is then faster); on CUDA the
fused kernels handle dropout themselves, so use(encoder, "auto", device) picks this kernel only for CPU training.
"""
import math

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

CHUNK_ELEMS = 2 ** 21  # scores per chunk: 8 MB of fp32, a few of them live at a time


def drop_threshold(p):
    """Dropout probability p -> (int16 threshold t, keep scale): a score is kept when its random int16 is >= t."""
    q = round(p * 65536)
    return q - 32768, 65536 / (65536 - q)


def wide(dtype):
    """The dtype scores and softmax run in: fp32 for half types, else the input's own."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def additive(mask, dtype):
    """Bool mask (True = attend) -> additive float mask (0 or the dtype's lowest), None stays None."""
    if mask is None:
        return None
    low = torch.finfo(dtype).min
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask.logical_not(), low)


def scores(q, k, bias, scale):
    """Attention scores of one chunk: q (c, H, L, D), k (c, H, S, D), bias (c, 1 or H, L, S) additive or None
    -> (c, H, L, S) in at least fp32."""
    s = torch.matmul(q, k.transpose(-1, -2)).to(wide(q.dtype)).mul_(scale)
    return s if bias is None else s.add_(bias)


class DropoutAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, p, scale, chunk_elems):
        # q: (B, H, L, D), k, v: (B, H, S, D), mask: (B, 1 or H, L, S) bool (True = attend) or None
        B, H, L, S = *q.shape[:3], k.shape[2]
        thresh, keep_scale = drop_threshold(p)
        step = max(1, chunk_elems // (H * L * S))  # batch items per chunk
        if H * L * S % 4:
            step = (step + 3) // 4 * 4  # whole 64-bit draws per chunk: the mask does not depend on the chunking
        out = torch.empty_like(q)  # (B, H, L, D)
        keep = torch.empty(B, H, L, S, dtype=torch.bool, device=q.device)  # the dropout mask, True = kept
        bias = additive(mask, wide(q.dtype))  # (B, 1 or H, L, S)
        for a in range(0, B, step):
            b = min(a + step, B)
            prob = torch.softmax(scores(q[a:b], k[a:b], None if bias is None else bias[a:b], scale), -1)
            torch.ge(random_int16(prob.shape, q.device), thresh, out=keep[a:b])
            prob.mul_(as_float(keep[a:b], prob.dtype))  # (c, H, L, S) dropped probabilities
            torch.matmul(prob.to(v.dtype), v[a:b], out=out[a:b])
        out.mul_(keep_scale)
        ctx.save_for_backward(q, k, v, mask, keep)
        ctx.scale, ctx.keep_scale, ctx.step = scale, keep_scale, step
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mask, keep = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dout = dout * ctx.keep_scale  # (B, H, L, D), the keep scale folded in once
        bias = additive(mask, wide(q.dtype))
        for a in range(0, q.shape[0], ctx.step):
            b = min(a + ctx.step, q.shape[0])
            prob = torch.softmax(scores(q[a:b], k[a:b], None if bias is None else bias[a:b], ctx.scale), -1)
            kf = as_float(keep[a:b], prob.dtype)  # (c, H, L, S) 0 / 1
            torch.matmul((prob * kf).to(v.dtype).transpose(-1, -2), dout[a:b], out=dv[a:b])
            dprob = torch.matmul(dout[a:b], v[a:b].transpose(-1, -2)).to(prob.dtype).mul_(kf)  # (c, H, L, S)
            ds = torch._softmax_backward_data(dprob, prob, -1, prob.dtype).mul_(ctx.scale).to(q.dtype)  # (c,H,L,S)
            torch.matmul(ds, k[a:b], out=dq[a:b])
            torch.matmul(ds.transpose(-1, -2), q[a:b], out=dk[a:b])
        return dq, dk, dv, None, None, None, None


def as_float(keep, dtype):
    """Bool mask -> 0 / 1 in dtype (through uint8: torch's bool -> float copy is ~3x slower on CPU)."""
    return torch.empty(keep.shape, dtype=dtype, device=keep.device).copy_(keep.view(torch.uint8))


def random_int16(shape, device="cpu"):
    """Uniform random int16 of shape, 4 per 64-bit draw of the device's generator."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    return words.view(torch.int16)[:n].view(shape)


def dropout_attention(q, k, v, mask, p, scale, chunk_elems=CHUNK_ELEMS):
    """softmax(q k^T * scale, masked) with dropout p, @ v. q: (B, H, L, D), k, v: (B, H, S, D), mask: bool
    broadcastable to (B, H, L, S) (True = attend) or None -> (B, H, L, D)."""
    B, _, L, S = *q.shape[:3], k.shape[2]
    m = None if mask is None else mask.expand(B, mask.shape[1], L, S)
    return DropoutAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), m, p, scale, chunk_elems)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: dropout_attention when dropout is on, SDPA otherwise ->
    ((B, L, H, D), None)."""
    if dropout == 0.0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0  # an additive float mask: 0 = attend
    out = dropout_attention(query, key, value, attention_mask, dropout, scale)  # (B, H, L, D)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("m3_lean", attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register("m3_lean", sdpa_mask)
MODES = ("auto", "lean", "sdpa", "eager")


def use(encoder, mode, device_type):
    """Train the encoder with attention `mode`: lean (this file), sdpa or eager (transformers'), or auto (lean on CPU,
    sdpa elsewhere, where fused kernels handle dropout)."""
    impl = {"auto": "m3_lean" if device_type == "cpu" else "sdpa", "lean": "m3_lean"}.get(mode, mode)
    encoder.set_attn_implementation(impl)
