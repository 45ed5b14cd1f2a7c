"""The M3 loss as arithmetic over score matrices (SPEC.md section 3). This is the file to edit the recipe in.

Every weight is read from the config (train.py Config); scores come in raw (not yet divided by tau).
Layout: B local queries, G passages per query laid out group-major [pos, neg1..neg(G-1)], so on this rank the
positive of query i is column offset + i*G, where offset = rank*B*G when the dense columns were gathered.
Own-group scores (no_in_batch_neg data) are (B, G) with every positive in column 0: the functions below take them
with G = 0 (then G only says where the positives are; the group size is the teacher's width).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather(x):
    """all_gather with gradient: (B, ...) on each of W ranks -> (W*B, ...), rank-major.

    Backward sends every rank's gradient for a slice back to the rank that owns it (summed), so each rank's loss
    over its own B rows, averaged by DDP, is exactly the loss of one process on the global batch (SPEC 0, 3.3).
    The reference instead gathers without gradient, which leaves its dense term with 1/W of its gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _Gather.apply(x)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)  # (W*B, ...)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g)  # (W*B, ...) every rank's gradient for every slice, summed
        B = g.shape[0] // dist.get_world_size()
        return g[dist.get_rank() * B:(dist.get_rank() + 1) * B]  # (B, ...) the slice this rank owns


def targets(s, G, offset):
    """Column of each row's positive: offset + i*G -> (B,); 0 for own-group scores (G = 0)."""
    return offset + torch.arange(s.shape[0], device=s.device) * G


def info_nce(s, G, offset=0):
    """InfoNCE / CE over rows of s (B, M) already divided by tau; positives at offset + i*G (SPEC 3.2)."""
    return F.cross_entropy(s, targets(s, G, offset))


def soft_ce(s, p_t):
    """mean_i -sum_j p_t[i, j] * log softmax(s)[i, j]: the self-distillation term against fixed targets (SPEC 3.4)."""
    return -(p_t * F.log_softmax(s, dim=-1)).sum(-1).mean()


def m3_kd_loss(s, teacher, G, offset=0):
    """Teacher distillation, m3 variant (SPEC 3.5): each group member k in turn is the positive, weighted by the
    teacher's softmax, competing with all in-batch columns except the members 0..k-1 before it. teacher (B, G)."""
    p_t = torch.softmax(teacher.to(s.dtype), dim=-1)  # (B, G), in the scores' fp32 (or fp64)
    first = targets(s, G, offset)  # (B,) column of each row's group member 0
    loss, used = 0.0, torch.zeros_like(s, dtype=torch.bool)  # used: (B, M) members already taken as targets
    for k in range(teacher.shape[1]):
        ce = F.cross_entropy(s.masked_fill(used, torch.finfo(s.dtype).min), first + k, reduction="none")  # (B,)
        loss = loss + (p_t[:, k] * ce).mean()
        used = used.scatter(1, (first + k)[:, None], True)
    return loss


def kl_div_loss(s, teacher, G, offset=0):
    """Teacher distillation, kl_div variant (SPEC 3.5): soft CE over each row's own G columns + in-batch CE."""
    own = own_group(s, teacher.shape[1], G, offset)  # (B, G)
    return soft_ce(own, torch.softmax(teacher.to(s.dtype), dim=-1)) + info_nce(s, G, offset)


def own_group(s, width, G, offset=0):
    """Each row's own group, positive first: the `width` columns from row i's positive on -> (B, width)."""
    return s.gather(1, targets(s, G, offset)[:, None] + torch.arange(width, device=s.device))


# Config.teacher_kd_loss's choices: a new teacher-distillation loss is a function (s, teacher, G, offset) + a line
TEACHER_KD = {"m3_kd_loss": m3_kd_loss, "kl_div": kl_div_loss}


def contrastive(s, G, offset, teacher, teacher_kd_loss):
    """Plain InfoNCE without teacher scores, else the configured teacher-distillation loss (TEACHER_KD)."""
    if teacher is None:
        return info_nce(s, G, offset)
    return TEACHER_KD[teacher_kd_loss](s, teacher, G, offset)


def m3_loss(s_dense, s_sparse, s_colbert, cfg, G, offset=0, teacher=None, self_distill=False, in_batch=True):
    """The unified M3 loss (SPEC 3.4) -> (loss, parts for logging).

    s_dense (B, M): M = B*G local columns, or W*B*G gathered ones with this rank's block at `offset`.
    s_sparse, s_colbert (B, B*G) local, or None for a head that is switched off (it then contributes nothing).
    Dense alone: L = CE_dense. With more heads: L = (w_dense CE_dense + w_ens CE_ens + w_sparse CE_sparse
    + w_colbert CE_colbert) / loss_norm, s_ens = ens_dense s_dense + ens_sparse s_sparse + ens_colbert s_colbert.
    Self-distillation: L' = (sum_x w_x soft_ce(s_x, softmax(stop-grad s_ens))) / self_distill_norm;
    final (L + L') / final_norm.
    in_batch=False (no_in_batch_neg data, SPEC 3.5): every score, the ensemble and self-distillation included, over
    each row's own group (B, G) only (the reference's #1410 bug put in-batch columns into its ensemble).
    """
    tau, N = cfg.temperature, s_dense.shape[0] * G
    d = s_dense / tau  # (B, M)
    local = {"dense": d[:, offset:offset + N]}  # (B, B*G) this rank's block, used by the ensemble and self-KD
    if s_sparse is not None:
        local["sparse"] = s_sparse / tau
    if s_colbert is not None:
        local["colbert"] = s_colbert / tau
    if not in_batch:  # (B, G) each, positives in column 0
        local = {x: own_group(v, G, G) for x, v in local.items()}
        d, G, offset = local["dense"], 0, 0
    w = {"dense": cfg.w_dense, "sparse": cfg.w_sparse, "colbert": cfg.w_colbert}
    ce = {"dense": contrastive(d, G, offset, teacher, cfg.teacher_kd_loss)}
    ce.update({x: contrastive(local[x], G, 0, teacher, cfg.teacher_kd_loss) for x in local if x != "dense"})
    parts = {x: v.detach() for x, v in ce.items()}
    if len(local) == 1:  # dense only (the others off: train.off_heads): pre-training, the first warm-up epoch
        loss, s_ens = w["dense"] * ce["dense"], local["dense"]
    else:
        ens_w = {"dense": cfg.ens_dense, "sparse": cfg.ens_sparse, "colbert": cfg.ens_colbert}
        s_ens = sum(ens_w[x] * local[x] for x in local)  # (B, B*G)
        ce["ens"] = contrastive(s_ens, G, 0, teacher, cfg.teacher_kd_loss)
        parts["ens"] = ce["ens"].detach()
        loss = (sum(w[x] * ce[x] for x in local) + cfg.w_ens * ce["ens"]) / cfg.loss_norm
        if self_distill:
            p_t = torch.softmax(s_ens.detach(), dim=-1)  # (B, B*G) teacher over the full local row
            self_kd = sum(w[x] * soft_ce(local[x], p_t) for x in local) / cfg.self_distill_norm
            parts["self_kd"] = self_kd.detach()
            loss = (loss + self_kd) / cfg.final_norm
    parts["acc"] = (s_ens.argmax(-1) == targets(s_ens, G, 0)).float().mean()  # in-batch top-1 of the ensemble
    return loss, parts
