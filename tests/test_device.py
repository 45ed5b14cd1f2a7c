"""The same equivalences on M3_TEST_DEVICE (cpu by default; bench/gpu_check.py runs them on the GPU): scores against
their brute-force definitions, m3_loss against CPU float64, the gradient cache against the plain path, encode against
the CPU. fp32 comparisons use tolerances any hardware meets (TF32 is off by default); float64 ones are exact."""
import random

import numpy as np
import pytest
import torch

import train
from losses import m3_loss
from model import colbert_score, dense_score, sparse_score
from tiny import WORDS, tiny_m3

pytestmark = pytest.mark.device  # every test here: `pytest -m device` selects them
HEADS = ["dense", "sparse", "colbert"]


def close(x, ref, rtol):
    """x (any device, any float dtype) equals ref (CPU float64) up to rtol of ref's largest entry."""
    x, ref = x.detach().cpu().double(), ref.detach()
    return (x - ref).abs().max().item() <= rtol * ref.abs().max().item()


def leaves(*xs, device, dtype=torch.float32):
    """Copies of CPU float64 tensors on `device` in `dtype` that collect gradients."""
    return [x.detach().to(device, dtype).requires_grad_(True) for x in xs]


def brute_dense(q, p):
    return (q[:, None, :] * p[None, :, :]).sum(-1)  # (Bq, Np): s[i, j] = sum_h q_ih p_jh


def brute_sparse(q_ids, q_w, p_ids, p_w):
    """Per text {token id: max weight}; s[i, j] = sum over shared ids of the product (SPEC 1.2)."""
    def vecs(ids, w):
        out = []
        for row_ids, row_w in zip(ids.tolist(), w):
            d = {}
            for t, i in enumerate(row_ids):
                d[i] = torch.maximum(d[i], row_w[t]) if i in d else row_w[t]
            out.append(d)
        return out
    qv, pv = vecs(q_ids, q_w), vecs(p_ids, p_w)
    return torch.stack([torch.stack([sum((a[k] * b[k] for k in a if k in b), q_w.new_zeros(())) for b in pv])
                        for a in qv])


def brute_colbert(q, p, q_mask, p_mask):
    """s[i, j] = mean over real query tokens of the max over real passage tokens of q_ia . p_jb (SPEC 1.3)."""
    return torch.stack([torch.stack([(q[i][q_mask[i]] @ p[j][p_mask[j]].T).max(-1).values.mean()
                                     for j in range(len(p))]) for i in range(len(q))])


def test_scores_and_their_gradients_equal_brute_force(device):
    gen = torch.Generator().manual_seed(0)
    Bq, Np, T, D = 3, 7, 9, 16
    q = torch.nn.functional.normalize(torch.randn(Bq, D, generator=gen, dtype=torch.float64), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(Np, D, generator=gen, dtype=torch.float64), dim=-1)
    q_ids, p_ids = torch.randint(0, 12, (Bq, T), generator=gen), torch.randint(0, 12, (Np, T), generator=gen)
    q_w, p_w = torch.rand(Bq, T, generator=gen, dtype=torch.float64), torch.rand(Np, T, generator=gen,
                                                                                  dtype=torch.float64)
    qc, pc = torch.randn(Bq, T, D, generator=gen, dtype=torch.float64), torch.randn(Np, T, D, generator=gen,
                                                                                     dtype=torch.float64)
    q_mask = torch.arange(T)[None] < torch.randint(1, T + 1, (Bq, 1), generator=gen)  # (Bq, T) ragged lengths
    p_mask = torch.arange(T)[None] < torch.randint(1, T + 1, (Np, 1), generator=gen)
    g = torch.randn(Bq, Np, generator=gen, dtype=torch.float64)  # upstream gradient
    cases = {  # name: (score on the device, brute force, CPU float64 inputs that get gradients)
        "dense": (lambda a, b: dense_score(a, b), brute_dense, (q, p)),
        "sparse": (lambda a, b: sparse_score(q_ids.to(device), a, p_ids.to(device), b),
                   lambda a, b: brute_sparse(q_ids, a, p_ids, b), (q_w, p_w)),
        "colbert": (lambda a, b: colbert_score(a, b, q_mask.to(device), p_mask.to(device)),
                    lambda a, b: brute_colbert(a, b, q_mask, p_mask), (qc, pc)),
        "colbert in blocks": (lambda a, b: colbert_score(a, b, q_mask.to(device), p_mask.to(device), chunk_elems=50),
                              lambda a, b: brute_colbert(a, b, q_mask, p_mask), (qc, pc)),
    }
    for name, (score, brute, inputs) in cases.items():
        ref_in = [x.clone().requires_grad_(True) for x in inputs]
        ref = brute(*ref_in)
        ref_grads = torch.autograd.grad((ref * g).sum(), ref_in)
        dev_in = leaves(*inputs, device=device)
        s = score(*dev_in)
        assert s.device.type == device.type and s.shape == (Bq, Np), name
        grads = torch.autograd.grad((s * g.to(device, s.dtype)).sum(), dev_in)
        assert close(s, ref, 1e-5), (name, (s.detach().cpu().double() - ref).abs().max())
        for a, b in zip(grads, ref_grads):
            assert close(a, b, 1e-5), (name, (a.cpu().double() - b).abs().max())


@pytest.mark.parametrize("teacher_kd_loss", [None, "m3_kd_loss", "kl_div"])
def test_m3_loss_on_the_device_equals_cpu_float64(device, teacher_kd_loss):
    gen = torch.Generator().manual_seed(1)
    B, G = 4, 3
    cfg = train.Config(train_group_size=G, self_distill=True, teacher_kd_loss=teacher_kd_loss or "m3_kd_loss")
    scores = [torch.rand(B, B * G, generator=gen, dtype=torch.float64) * 2 - 1 for _ in HEADS]  # like cosines
    teacher = torch.randn(B, G, generator=gen, dtype=torch.float64) if teacher_kd_loss else None

    def run(xs, dev):
        loss, parts = m3_loss(*xs, cfg, G, 0, None if teacher is None else teacher.to(dev, xs[0].dtype), True)
        return loss, parts, torch.autograd.grad(loss, xs)

    ref_in = [s.clone().requires_grad_(True) for s in scores]
    ref_loss, ref_parts, ref_grads = run(ref_in, "cpu")
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):  # float64: the same sums, any order
        loss, parts, grads = run(leaves(*scores, device=device, dtype=dtype), device)
        assert loss.device.type == device.type and loss.dtype == dtype
        assert close(loss, ref_loss, rtol), (dtype, loss.item(), ref_loss.item())
        assert set(parts) == set(ref_parts) >= {"dense", "sparse", "colbert", "ens", "self_kd"}
        for k in ref_parts:
            assert close(parts[k], ref_parts[k], rtol), (dtype, k, parts[k], ref_parts[k])
        for a, b in zip(grads, ref_grads):
            assert close(a, b, rtol), (dtype, (a.cpu().double() - b).abs().max())


def texts(n, seed, lo=3, hi=18):
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(lo, hi))) for _ in range(n)]


def test_gradient_cache_equals_the_plain_path_on_the_device(device):
    """float64, dropout 0: the gradient cache (and sub-batches, and checkpointing) changes no gradient."""
    B, G = 4, 3
    tok = tiny_m3().tokenizer
    enc = lambda xs, n: tok(xs, padding=True, truncation=True, max_length=n, return_tensors="pt")  # noqa: E731
    q, p = enc(texts(B, 0, 3, 8), 16), enc(texts(B * G, 1), 32)
    batch = {"q_ids": q["input_ids"].to(device), "q_mask": q["attention_mask"].to(device),
             "p_ids": p["input_ids"].to(device), "p_mask": p["attention_mask"].to(device), "teacher": None}

    def grads(checkpointing=False, **over):
        model = tiny_m3().double().to(device).train()
        with torch.no_grad():  # clearly non-trivial sparse weights, so the sparse head's gradients are checked too
            model.sparse_linear.bias.fill_(0.5)
        if checkpointing:
            model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        cfg = train.Config(train_group_size=G, self_distill=True, **over)
        amp = torch.autocast(device.type, enabled=False)
        loss, _ = train.train_step(model, batch, cfg, HEADS, True, amp, torch.amp.GradScaler(device.type,
                                                                                           enabled=False))
        return loss, {n: x.grad for n, x in model.named_parameters() if x.grad is not None}

    loss, ref = grads()
    assert ref["sparse_linear.weight"].abs().max() > 0 and ref["colbert_linear.weight"].abs().max() > 0
    for over in (dict(sub_batch_size=5), dict(grad_cache=True), dict(grad_cache=True, sub_batch_size=5),
                 dict(grad_cache=True, sub_batch_size=5, checkpointing=True)):
        l2, g = grads(**over)
        assert l2.item() == pytest.approx(loss.item(), rel=1e-12), over
        assert set(g) == set(ref), over
        for n in ref:
            assert torch.allclose(g[n], ref[n], rtol=0, atol=1e-10), (over, n, (g[n] - ref[n]).abs().max())


def test_encode_on_the_device_equals_the_cpu(device):
    """M3.encode runs bf16 autocast on CUDA (fp32 on CPU): outputs agree to 3% of each output's largest entry there
    (bf16 keeps 8 bits; measured ~0.5%), far inside what a wrong mask, order or token id would change (O(1))."""
    docs = texts(11, 2, 1, 40)
    m = tiny_m3()
    ref = m.encode(docs, batch_size=4)
    out = m.to(device).encode(docs, batch_size=4)
    rtol = 3e-2 if device.type == "cuda" else 1e-6
    err = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max(initial=0.0))  # noqa: E731
    assert out["dense"].shape == ref["dense"].shape
    assert err(out["dense"], ref["dense"]) <= rtol * np.abs(ref["dense"]).max()
    top = max(w for d in ref["sparse"] for w in d.values())
    for d, r in zip(out["sparse"], ref["sparse"]):  # a weight at the ReLU's edge may be present on one side only
        keys = sorted(set(d) | set(r))
        assert err([d.get(k, 0.0) for k in keys], [r.get(k, 0.0) for k in keys]) <= rtol * top, (d, r)
    top = max(np.abs(c).max() for c in ref["colbert"])
    for c, r in zip(out["colbert"], ref["colbert"]):
        assert c.shape == r.shape and err(c, r) <= rtol * top
