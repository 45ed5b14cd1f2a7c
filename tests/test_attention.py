"""attention.py's lean dropout attention: the kernel against a brute-force softmax with the same dropout mask (float64),
its drop rate, the encoder with it against SDPA, and the recomputations that must replay its mask (gradient
checkpointing, gradient cache) against the plain path."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import attention  # noqa: E402
import train  # noqa: E402
from common import random_batch  # noqa: E402
from tiny import make_tokenizer, tiny_m3  # noqa: E402


def brute_force(q, k, v, mask, p, scale, keep):
    """softmax(q k^T scale, masked) * keep / (1 - p'), @ v, by autograd on the full tensors."""
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, L, S)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) * keep * attention.drop_threshold(p)[1]) @ v


@pytest.mark.parametrize("shape", [(3, 4, 7, 9, 5), (5, 3, 5, 7, 4)])  # H*L*S = 252 (a multiple of 4) and 105
@pytest.mark.parametrize("masked", [True, False])
def test_kernel_equals_brute_force_for_every_chunking(shape, masked):
    B, H, L, S, D = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64, requires_grad=True) for n in (L, S, S))
    mask = None
    if masked:  # key padding, as sdpa_mask gives it: (B, 1, L, S), True = attend
        lens = torch.tensor([S, 3, S - 2, 1, S][:B])
        mask = (torch.arange(S)[None, :] < lens[:, None])[:, None, None, :].expand(B, 1, L, S)
    dout = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    p, scale = 0.3, 0.7
    torch.manual_seed(5)
    keep = attention.random_int16((B, H, L, S)) >= attention.drop_threshold(p)[0]  # the mask the kernel must draw
    assert 0.6 < keep.double().mean() < 0.8
    ref = brute_force(q, k, v, mask, p, scale, keep)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for chunk in (10 ** 9, 2 * H * L * S, 1):  # one chunk, two batch items, one item (rounded up to 4: 105 is odd)
        torch.manual_seed(5)
        out = attention.dropout_attention(q, k, v, mask, p, scale, chunk)
        assert torch.allclose(out, ref, rtol=0, atol=1e-12), (chunk, (out - ref).abs().max())
        for got, w in zip(torch.autograd.grad(out, (q, k, v), dout), want):
            assert torch.allclose(got, w, rtol=0, atol=1e-12), (chunk, (got - w).abs().max())


def test_drop_rate_and_scale():
    assert attention.drop_threshold(0.1) == (6554 - 32768, 65536 / (65536 - 6554))  # p' = 0.10000610
    torch.manual_seed(0)
    n = 4_000_000
    dropped = (attention.random_int16((n,)) < attention.drop_threshold(0.1)[0]).double().mean().item()
    p = 6554 / 65536
    assert abs(dropped - p) < 6 * (p * (1 - p) / n) ** 0.5, dropped  # 6 sigma: the 16-bit draws are uniform
    # unbiased: with equal scores and v = 1, each output is keep_scale x (kept share), whose mean is 1
    q, k, v = torch.zeros(1, 1, 512, 4), torch.zeros(1, 1, 2048, 4), torch.ones(1, 1, 2048, 4)
    out = attention.dropout_attention(q, k, v, None, 0.1, 1.0)
    assert abs(out.mean().item() - 1) < 6 * (p / (1 - p) / (512 * 2048)) ** 0.5


def set_dropout(model, attn, hidden):
    for name, mod in model.encoder.named_modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = attn if name.endswith("attention.self.dropout") else hidden
    return model


def batch(tok, B=2, G=3, TQ=9, TP=14):
    """Random ids, CLS first, SEP last, padded to ragged lengths (the first text full) -> a train_step batch."""
    return random_batch(B, G, TQ, TP, tok, len(tok), torch.Generator().manual_seed(1), ragged=True)


@pytest.mark.parametrize("style", ["xlmr", "bert"])
def test_encoder_with_lean_attention_equals_sdpa_when_nothing_is_dropped(style):
    """p = 1e-9 rounds to a threshold that keeps every score (and scale 1): the lean path must then be SDPA without
    dropout (masks, head layout, scale), forward and gradients."""
    b = batch(make_tokenizer(style))
    outs = {}
    for mode in ("lean", "sdpa"):
        model = set_dropout(tiny_m3(style).double().train(), 1e-9 if mode == "lean" else 0.0, 0.0)
        attention.use(model.encoder, mode, "cpu")
        h = model.encoder(input_ids=b["p_ids"], attention_mask=b["p_mask"]).last_hidden_state  # (N, T, H)
        (h * torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)).sum().backward()
        outs[mode] = [h.detach()] + [prm.grad for prm in model.encoder.parameters()]
    assert model.encoder.config._attn_implementation == "sdpa"
    for a, s in zip(outs["lean"], outs["sdpa"]):
        assert torch.allclose(a, s, rtol=0, atol=1e-12), (a - s).abs().max()


def losses_and_grads(steps, **over):
    """`steps` training steps of a tiny float64 M3 with dropout on (attention 0.3, hidden 0.1) and the lean kernel ->
    (losses, gradients of the last step)."""
    cfg = train.Config(**{**dict(train_group_size=3, self_distill=True, gradient_checkpointing=False, lr=1e-3), **over})
    model = set_dropout(tiny_m3().double().train(), 0.3, 0.1)
    attention.use(model.encoder, "lean", "cpu")
    if cfg.gradient_checkpointing:
        model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    amp, scaler = torch.autocast("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False)
    b, losses = batch(model.tokenizer), []
    for step in range(steps):
        torch.manual_seed(100 + step)  # as train.main: dropout is a function of the step
        opt.zero_grad()
        loss, _ = train.train_step(model, b, cfg, ["dense", "sparse", "colbert"], True, amp, scaler)
        losses.append(loss.item())
        grads = {n: prm.grad.clone() for n, prm in model.named_parameters() if prm.grad is not None}
        opt.step()
    return losses, grads


def test_checkpointing_and_gradient_cache_replay_the_dropout_mask():
    """Selective recomputation (the kernel's backward), gradient checkpointing and the gradient cache recompute the
    forward: each must draw the same dropout mask, so losses and gradients equal the plain run's (float64). Chunks
    of texts draw their masks chunk by chunk, so the gradient cache is compared with the same chunks without it."""
    for base, over in ((dict(), dict(gradient_checkpointing=True)),
                       (dict(sub_batch_size=4), dict(grad_cache=True)),
                       (dict(sub_batch_size=4), dict(grad_cache=True, gradient_checkpointing=True))):
        ref_losses, ref = losses_and_grads(3, **base)
        losses, g = losses_and_grads(3, **base, **over)
        assert losses == pytest.approx(ref_losses, rel=1e-10, abs=0), over
        for n in ref:
            assert torch.allclose(g[n], ref[n], rtol=1e-10, atol=1e-13), (over, n, (g[n] - ref[n]).abs().max())


def test_dropout_is_really_on_in_the_replay_test():
    """The test above would pass with dropout silently off: the same steps without attention dropout differ."""
    model = set_dropout(tiny_m3().double().train(), 0.3, 0.0)
    attention.use(model.encoder, "lean", "cpu")
    b = batch(model.tokenizer)
    h = [model.encoder(input_ids=b["p_ids"], attention_mask=b["p_mask"]).last_hidden_state for _ in range(2)]
    set_dropout(model, 0.0, 0.0)
    h0 = model.encoder(input_ids=b["p_ids"], attention_mask=b["p_mask"]).last_hidden_state
    assert (h[0] - h[1]).abs().max() > 1e-2 and (h[0] - h0).abs().max() > 1e-2


def test_attention_mode_is_checked_with_the_key():
    problems = dict(train.config_problems(train.Config(attention="flash")))
    assert "attention" in problems and "lean" in problems["attention"]
    assert "attention" not in dict(train.config_problems(train.Config(attention="sdpa")))
