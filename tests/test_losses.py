"""losses.py against hand-computed values, and 2-process cross-device negatives against 1 process."""
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from losses import gather, info_nce, kl_div_loss, m3_kd_loss, m3_loss, soft_ce
from model import colbert_score, dense_score, sparse_score
from runtime import end_distributed
from tiny import spawn
from train import Config


def ce_row(row, t):
    """-log softmax(row)[t] by hand."""
    return -row[t] + math.log(sum(math.exp(x) for x in row))


def test_info_nce_matches_hand_computed():
    s = torch.tensor([[2.0, 0.5, 1.0, -1.0], [0.0, 0.3, 1.5, 0.2]], dtype=torch.float64)  # B=2, G=2: pos at 0, 2
    ref = (ce_row([2.0, 0.5, 1.0, -1.0], 0) + ce_row([0.0, 0.3, 1.5, 0.2], 2)) / 2
    assert info_nce(s, G=2).item() == pytest.approx(ref, rel=1e-12)  # float64: exact up to rounding
    s4 = torch.cat([torch.zeros(2, 4, dtype=torch.float64), s], 1)  # the same rows as rank 1's gathered block
    ref4 = (ce_row([0.0] * 4 + [2.0, 0.5, 1.0, -1.0], 4) + ce_row([0.0] * 4 + [0.0, 0.3, 1.5, 0.2], 6)) / 2
    assert info_nce(s4, G=2, offset=4).item() == pytest.approx(ref4, rel=1e-12)


def test_m3_loss_matches_hand_computed_recipe():
    cfg = Config()
    torch.manual_seed(0)
    B, G = 2, 3
    d, sp, co = (torch.randn(B, B * G, dtype=torch.float64) for _ in range(3))  # float64: exact up to rounding
    loss, parts = m3_loss(d, sp, co, cfg, G)
    rows = lambda m: m.tolist()
    ce = lambda m: sum(ce_row(r, i * G) for i, r in enumerate(rows(m))) / B
    tau = 0.02
    ens = d / tau + 0.3 * sp / tau + co / tau
    L = (ce(d / tau) + ce(ens) + 0.1 * ce(sp / tau) + ce(co / tau)) / 4
    assert loss.item() == pytest.approx(L, rel=1e-12)
    assert parts["sparse"].item() == pytest.approx(ce(sp / tau), rel=1e-12)
    # self-distillation: soft CE against softmax(ens) over the full row, (d + 0.1 s + c)/3, final (L + L')/2
    p = torch.softmax(ens, -1)
    soft = lambda m: (-(p * torch.log_softmax(m, -1)).sum(-1).mean()).item()
    Lp = (soft(d / tau) + 0.1 * soft(sp / tau) + soft(co / tau)) / 3
    loss, parts = m3_loss(d, sp, co, cfg, G, self_distill=True)
    assert loss.item() == pytest.approx((L + Lp) / 2, rel=1e-12)
    assert parts["self_kd"].item() == pytest.approx(Lp, rel=1e-12)
    # heads switched off contribute nothing: dense alone is plain CE; without sparse the sparse terms vanish
    assert m3_loss(d, None, None, cfg, G)[0].item() == pytest.approx(ce(d / tau), rel=1e-12)
    L_dc = (ce(d / tau) + ce(d / tau + co / tau) + ce(co / tau)) / 4
    assert m3_loss(d, None, co, cfg, G)[0].item() == pytest.approx(L_dc, rel=1e-12)


def test_self_distillation_with_student_equal_to_teacher_has_zero_gradient():
    s = torch.randn(3, 12, requires_grad=True)
    soft_ce(s, torch.softmax(s.detach(), -1)).backward()
    assert s.grad.abs().max() < 1e-7
    s2 = torch.randn(3, 12, requires_grad=True)  # and a different student does get a gradient
    soft_ce(s2, torch.softmax(s.detach(), -1)).backward()
    assert s2.grad.abs().max() > 1e-3


def test_teacher_kd_losses():
    torch.manual_seed(1)
    B, G = 2, 3
    s, teacher = torch.randn(B, B * G, dtype=torch.float64), torch.randn(B, G, dtype=torch.float64)
    p = torch.softmax(teacher, -1)
    # m3_kd_loss by its definition: member k is the positive, members 0..k-1 removed from the row
    ref = 0.0
    for k in range(G):
        for i in range(B):
            row = [x for j, x in enumerate(s[i].tolist()) if not (i * G <= j < i * G + k)]
            ref += p[i, k].item() * ce_row(row, i * G) / B  # after removing k columns, member k sits at i*G
    assert m3_kd_loss(s, teacher, G).item() == pytest.approx(ref, rel=1e-12)
    one_hot = torch.tensor([[60.0, -60, -60], [60, -60, -60]], dtype=torch.float64)  # one-hot teacher: plain CE
    assert m3_kd_loss(s, one_hot, G).item() == pytest.approx(info_nce(s, G).item(), rel=1e-12)
    own = torch.stack([s[i, i * G:(i + 1) * G] for i in range(B)])
    ref_kl = (-(p * torch.log_softmax(own, -1)).sum(-1).mean() + info_nce(s, G)).item()
    assert kl_div_loss(s, teacher, G).item() == pytest.approx(ref_kl, rel=1e-12)
    cfg = Config(teacher_kd_loss="kl_div")
    loss = m3_loss(s * cfg.temperature, None, None, cfg, G, teacher=teacher)[0]
    assert loss.item() == pytest.approx(ref_kl, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# cross-device negatives: W processes (gloo) == 1 process on the global batch

W, B, G, T, H = 2, 2, 3, 6, 8


def reps(seed=0):
    """A tiny differentiable 'encoder' (one linear layer over random token features) and a global batch."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(H, H).double()  # float64: one process and two agree to rounding on any CPU
    q_x, p_x = torch.randn(W * B, T, H).double(), torch.randn(W * B * G, T, H).double()
    q_ids, p_ids = torch.randint(0, 20, (W * B, T)), torch.randint(0, 20, (W * B * G, T))
    return lin, q_x, p_x, q_ids, p_ids


def local_loss(lin, q_x, p_x, q_ids, p_ids, offset_fn, gathered):
    """The training loss on a block of queries: dense over (possibly gathered) columns, sparse/colbert local."""
    q_h, p_h = lin(q_x), lin(p_x)  # (b, T, H)
    q_d, p_d = torch.nn.functional.normalize(q_h[:, 0], dim=-1), torch.nn.functional.normalize(p_h[:, 0], dim=-1)
    q_w, p_w = torch.relu(q_h.sum(-1)), torch.relu(p_h.sum(-1))  # (b, T) stand-in token weights
    q_c, p_c = torch.nn.functional.normalize(q_h[:, 1:], dim=-1), torch.nn.functional.normalize(p_h[:, 1:], dim=-1)
    p_all = gathered(p_d)
    return m3_loss(dense_score(q_d, p_all), sparse_score(q_ids, q_w, p_ids, p_w), colbert_score(q_c, p_c),
                   Config(), G, offset=offset_fn(), self_distill=True)[0]


def reference_gather(x):
    """The reference implementation's gather: remote slices without gradient, the local one put back."""
    out = [torch.empty_like(x) for _ in range(W)]
    dist.all_gather(out, x.detach().contiguous())
    out[dist.get_rank()] = x
    return torch.cat(out, 0)


def _worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    grads = []
    for gather_fn in (gather, reference_gather):
        lin, q_x, p_x, q_ids, p_ids = reps()
        qs, ps = slice(rank * B, (rank + 1) * B), slice(rank * B * G, (rank + 1) * B * G)
        local_loss(lin, q_x[qs], p_x[ps], q_ids[qs], p_ids[ps], lambda: rank * B * G, gather_fn).backward()
        for prm in lin.parameters():  # what DDP does: average the gradients over ranks
            dist.all_reduce(prm.grad)
            prm.grad /= W
        grads.append([prm.grad for prm in lin.parameters()])
    if rank == 0:
        torch.save(grads, out_file)
    end_distributed()  # as train.py ends: both ranks done before either tears gloo down


def test_cross_device_negatives_match_one_process_on_the_global_batch():
    tmp = tempfile.mkdtemp()
    spawn(_worker, (os.path.join(tmp, "g.pt"),), nprocs=W)
    ddp, ref_ddp = torch.load(os.path.join(tmp, "g.pt"), weights_only=True)
    lin, q_x, p_x, q_ids, p_ids = reps()
    # one process, global batch: every query sees all W*B*G dense columns; sparse/colbert in-batch per rank block
    p_all = torch.nn.functional.normalize(lin(p_x)[:, 0], dim=-1)
    total = 0
    for r in range(W):
        qs, ps = slice(r * B, (r + 1) * B), slice(r * B * G, (r + 1) * B * G)
        total = total + local_loss(lin, q_x[qs], p_x[ps], q_ids[qs], p_ids[ps], lambda: r * B * G,
                                   lambda _: p_all) / W
    total.backward()
    for a, b in zip(ddp, [prm.grad for prm in lin.parameters()]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a - b).abs().max()
    # the reference's no-grad gather gives the dense term less gradient: this test would catch it
    assert max((a - b).abs().max() for a, b in zip(ref_ddp, ddp)) > 1e-4


def test_no_in_batch_neg_scores_each_query_against_its_own_group_only():
    cfg, tau = Config(), 0.02
    torch.manual_seed(2)
    B, G = 2, 3
    d, sp, co = (torch.randn(B, B * G, dtype=torch.float64) for _ in range(3))  # float64: exact up to rounding
    own = lambda m: torch.stack([m[i, i * G:(i + 1) * G] for i in range(B)])  # noqa: E731 (B, G) by hand
    ce0 = lambda m: sum(ce_row(r, 0) for r in m.tolist()) / B  # noqa: E731 positive in column 0 of each group
    od, osp, oco = own(d) / tau, own(sp) / tau, own(co) / tau
    ens = od + 0.3 * osp + oco  # the ensemble over the own group too (not the reference's #1410 in-batch columns)
    L = (ce0(od) + ce0(ens) + 0.1 * ce0(osp) + ce0(oco)) / 4
    p = torch.softmax(ens, -1)
    soft = lambda m: (-(p * torch.log_softmax(m, -1)).sum(-1).mean()).item()  # noqa: E731
    Lp = (soft(od) + 0.1 * soft(osp) + soft(oco)) / 3
    loss, parts = m3_loss(d, sp, co, cfg, G, self_distill=True, in_batch=False)
    assert loss.item() == pytest.approx((L + Lp) / 2, rel=1e-12)
    assert parts["dense"].item() == pytest.approx(ce0(od), rel=1e-12) and parts["acc"] == (ens.argmax(-1) == 0).mean(
        dtype=torch.float64)
    assert abs(loss.item() - m3_loss(d, sp, co, cfg, G, self_distill=True)[0].item()) > 1e-3  # in-batch differs
    ens_in_batch = sum(ce_row(r, i * G) for i, r in enumerate(((d + 0.3 * sp + co) / tau).tolist())) / B
    assert abs((ce0(od) + ens_in_batch + 0.1 * ce0(osp) + ce0(oco)) / 4 - L) > 1e-3  # an ensemble with in-batch
    # columns (the reference's #1410) would be caught
    # teacher distillation over the own group: each row alone, as a batch of one, is the same loss
    teacher = torch.randn(B, G, dtype=torch.float64)
    for kind, fn in (("m3_kd_loss", m3_kd_loss), ("kl_div", kl_div_loss)):
        c = Config(teacher_kd_loss=kind)
        got = m3_loss(d, None, None, c, G, teacher=teacher, in_batch=False)[0]
        ref = sum(fn(own(d)[i:i + 1] / tau, teacher[i:i + 1], G) for i in range(B)) / B
        assert got.item() == pytest.approx(ref.item(), rel=1e-12), kind


def test_no_in_batch_neg_batches_gather_nothing_across_ranks(monkeypatch):
    import train
    torch.manual_seed(3)
    B, G, T, D = 2, 2, 5, 8
    cfg = Config(train_group_size=5, cross_device_negatives=True)  # the batch's own group size (2) wins
    rep = lambda n: {"dense": torch.nn.functional.normalize(torch.randn(n, D), dim=-1), "sparse": torch.rand(n, T),
                     "colbert": torch.randn(n, T, D)}  # noqa: E731 (sparse, colbert: off, weight 0)
    q, p = rep(B), rep(B * G)
    batch = {"q_ids": torch.randint(5, 30, (B, T)), "p_ids": torch.randint(5, 30, (B * G, T)), "teacher": None,
             "group_size": G, "no_in_batch_neg": True}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # rank 1 of 2: cross-device negatives would gather
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(train, "gather", lambda x: pytest.fail("no_in_batch_neg batches must not gather"))
    loss, _ = train.compute_loss(q, p, batch, cfg, ["dense"], False)
    s = (q["dense"] @ p["dense"].T) / cfg.temperature  # (B, B*G)
    ref = sum(ce_row(s[i, i * G:(i + 1) * G].tolist(), 0) for i in range(B)) / B
    assert loss.item() == pytest.approx(ref, rel=1e-5)
