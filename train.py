"""M3-Embedding training: torchrun DDP, staged configs, gradient checkpointing, gradient cache, exact resume.

    python train.py configs/tiny.yaml --out_dir=runs/x                       # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 train.py configs/warmup.yaml --train_data=... # one node, 8 GPUs

Read in this order: Config (every recipe number, SPEC.md), one training step (encode, score, m3_loss, backward;
the gradient cache: gradcache.py), the optimizer step, main (the loop); parsing the config comes last. Checkpoints,
resume and the log: checkpoints.py.
"""
import dataclasses
import difflib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import attention
import selection
from checkpoints import check_start, find_resume, put_back, restore, save_best, save_checkpoint, start_run_dir
from data import Sampling, epoch_batches, open_datasets, rank_batches
from gradcache import forward_chunks, grad_cache_step, texts_per_chunk
from logs import REPORT_TO, lexical_health, log_step, report_to_problem, tensorboard_writer
from losses import TEACHER_KD, gather, m3_loss
from model import HEAD_FILES, HEADS, M3, POOLINGS, at_least_fp32, colbert_score, dense_score, sparse_score
from reference_names import hint
from runtime import end_distributed, init_distributed, parse_config, print0, run_command, stop


@dataclass
class Config:
    # model
    model: str = "BAAI/bge-m3-unsupervised"  # hub name, local dir, or "minilm" (the bundled demo encoder)
    init_new_heads: bool = False  # start new heads (sparse: term matching, colbert: random) if the checkpoint has none
    pooling: str = ""  # dense pooling (model.POOLINGS): cls (M3, SPEC 1.1), mean (e.g. MiniLM); "" = the checkpoint's
    colbert_dim: int = -1  # multi-vector dim D; -1 = hidden size (SPEC 1.3)
    freeze: str = ""  # parameters not to train: comma-separated dotted name prefixes, e.g. encoder.embeddings
    # data (SPEC 4)
    train_data: str = ""  # a .jsonl file or a directory of them; each file is one dataset (SPEC 4.1)
    query_prefix: str = ""  # instruction before every query, e.g. "query: " (e5); a line's `prompt` wins (SPEC 4.1)
    passage_prefix: str = ""  # before every passage, e.g. "passage: "; eval.py and mine.py take the same options
    small_threshold: int = 0  # files of one folder with fewer examples train as one merged dataset (SPEC 4.4)
    drop_threshold: int = 0  # and that merged dataset is dropped if it has fewer examples than this (SPEC 4.4)
    query_max_len: int = 512  # SPEC 5.1
    passage_max_len: int = 8192  # SPEC 5.1
    train_group_size: int = 8  # G = 1 positive + 7 negatives (SPEC 3.1); 1 = pairs, in-batch negatives only
    length_ranges: list = field(default_factory=lambda: [0, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8192])
    batch_sizes: list = field(default_factory=lambda: [48, 32, 20, 18, 14, 14, 12, 10, 8])  # per GPU, SPEC 4.5
    group_by_length: bool = True  # inside a length range, batch similar lengths together (bench/padding.py)
    shuffle_ratio: float = 0.0  # text-chunk shuffle of positives (SPEC 4.2; paper 0.002)
    teacher_kd: bool = False  # distil from the teacher's pos_scores/neg_scores in the data (SPEC 3.5)
    teacher_kd_loss: str = "m3_kd_loss"  # losses.TEACHER_KD: m3_kd_loss (what bge-m3 used) or kl_div (SPEC 3.5)
    num_workers: int = 2  # processes preparing batches ahead of the step (read, sample, tokenize); 0 = in the loop
    prefetch: int = 4  # batches each of them prepares ahead
    # loss (SPEC 3.4; losses.m3_loss)
    temperature: float = 0.02  # tau for every score (SPEC 3.1)
    head_schedule: str = "dense,sparse,colbert"  # heads trained per epoch, ';' between epochs, last one repeats
    cross_device_negatives: bool = True  # dense negatives from all ranks, exact gradient (SPEC 0, 3.3)
    w_dense: float = 1.0  # lambda_1: dense loss weight (SPEC 3.4)
    w_sparse: float = 0.1  # lambda_2: sparse loss weight (SPEC 3.4)
    w_colbert: float = 1.0  # lambda_3: multi-vector loss weight (SPEC 3.4)
    w_ens: float = 1.0  # weight of the ensemble CE term (SPEC 3.4)
    ens_dense: float = 1.0  # s_ens = ens_dense s_dense + ens_sparse s_sparse + ens_colbert s_colbert (SPEC 1.4);
    ens_sparse: float = 0.3  # the same weights as eval.py's default fusion (search.FUSION["m3"])
    ens_colbert: float = 1.0
    loss_norm: float = 4.0  # L = (...)/4 (SPEC 3.4)
    self_distill_norm: float = 3.0  # L' = (...)/3 (SPEC 3.4)
    final_norm: float = 2.0  # (L + L')/2 (SPEC 3.4)
    self_distill: bool = False  # self-knowledge distillation from s_ens (SPEC 3.4)
    self_distill_start: int = 0  # self-KD from this optimizer step on (paper: ~6000 warm-up steps without it)
    # optimisation (SPEC 5)
    lr: float = 1e-5  # SPEC 5.2 (maintainers: 1e-5 or 5e-6)
    head_lr: float = 0.0  # learning rate of the sparse/colbert heads; 0 = lr (new heads may want more)
    weight_decay: float = 0.01  # not applied to biases and norms (SPEC 5.2)
    adam_beta1: float = 0.9  # AdamW betas and eps: torch's and HF Trainer's defaults, as the reference
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.1  # linear warm-up, then linear decay to 0 (SPEC 5.2)
    epochs: int = 1
    max_steps: int = -1  # stop after this many steps (-1: run all epochs); the schedule spans the shorter
    grad_clip: float = 1.0  # max global gradient norm (HF Trainer's default, as the reference)
    seed: int = 42
    # memory and speed
    dtype: str = "bf16"  # DTYPES, on GPU: bf16 autocast, fp16 (with a grad scaler) or fp32; CPU always runs fp32
    gradient_checkpointing: bool = True
    attention: str = "auto"  # auto: attention.py's lean dropout kernel on CPU, SDPA on GPU; or lean, sdpa, eager
    sub_batch_size: int = 0  # encode the batch in chunks of this many texts (0 = all at once), loss on the full batch
    sub_batch_tokens: int = 0  # or chunks of at most this many padded tokens (texts x length): short texts, big chunks
    grad_cache: bool = False  # gradient cache: memory does not grow with the batch (same gradients)
    # run
    out_dir: str = "runs/m3"
    init_from: str = ""  # start from this stage's checkpoint instead of `model` (e.g. runs/warmup/final)
    resume: str = ""  # "auto" = newest intact checkpoint in out_dir, or a checkpoint dir; the same run's config
    resume_changes: bool = False  # resume with a config that differs in what changes the run (checkpoints.same_run)
    overwrite: bool = False  # start over in an out_dir that holds a run: it is deleted once this one has a checkpoint
    save_every: int = 1000  # steps between checkpoints (and one at the end)
    keep_last: int = 2  # checkpoints kept in out_dir
    log_every: int = 10
    report_to: str = ""  # logs.REPORT_TO; tensorboard: log.jsonl's scalars also in out_dir/tb (pip install tensorboard)
    min_sparse_share: float = 0.05  # warn when fewer real tokens have a sparse weight (collapse: FlagEmbedding #982)
    dist_timeout_s: int = 7200  # collectives wait this long (NCCL's 10-minute default would kill an index build)
    # fine-tuning without regret (selection.py; README "Fine-tuning on your data")
    eval_every: int = 0  # evaluate eval_sets at step 0, every this many steps and at the end; 0 = off
    eval_sets: dict = field(default_factory=dict)  # name -> {data: BEIR_DIR, split: dev, max_corpus: N, max_queries: N}
    select_metric: str = ""  # e.g. dev/all/nDCG@10: the best evaluation's weights are kept in out_dir/best
    early_stop_patience: int = 0  # stop (final written) after this many evaluations without a better one; 0 = never
    retain_metric: str = ""  # e.g. retention/all/nDCG@10: never select weights whose value fell more than
    retain_tolerance: float = 0.0  # this below the starting model's (step 0)


# ----------------------------------------------------------------------------------------------------------------
# one training step: encode (whole, in sub-batches, or with the gradient cache), score, loss, backward

def off_heads(heads):
    """The optional heads switched off this step by head_schedule, and all that "off" means: the encoder does not
    compute them (M3.forward ties their parameters to dense with weight 0, so DDP still sees them used), they get no
    score, so m3_loss leaves them out (dense alone: plain CE); optimizer_step drops their zero gradients (no update,
    not even weight decay)."""
    return [x for x in HEADS[1:] if x not in heads]


def train_step(model, batch, cfg, heads, self_distill, amp, scaler):
    """Forward + backward of one batch (gradients accumulate in .grad) -> (loss, parts)."""
    special = getattr(model, "module", model).special_ids  # (the DDP wrapper's module)
    loss_fn = lambda q, p: compute_loss(q, p, batch, cfg, heads, self_distill, special)  # noqa: E731
    chunk = {k: texts_per_chunk(cfg, batch[f"{k}_ids"]) for k in ("q", "p")}
    on = tuple(x for x in heads if x != "dense")  # the optional heads the encoder computes this step
    if cfg.grad_cache:
        return grad_cache_step(model, batch, chunk, on, loss_fn, amp, scaler)
    with amp:
        q = forward_chunks(model, batch["q_ids"], batch["q_mask"], chunk["q"], on)
        p = forward_chunks(model, batch["p_ids"], batch["p_mask"], chunk["p"], on)
    loss, parts = loss_fn(q, p)
    scaler.scale(loss).backward()
    return loss.detach(), parts


def compute_loss(q, p, batch, cfg, heads, self_distill, special_ids=None):
    """Scores of the heads that are on -> m3_loss, + the sparse head's health (logs.lexical_health) given the model's
    special_ids. Dense columns come from every rank when cross_device_negatives, except in no_in_batch_neg batches
    (own group only). G: the batch's group size (data.file_group_size)."""
    G, world = batch.get("group_size", cfg.train_group_size), dist.get_world_size() if dist.is_initialized() else 1
    in_batch = not batch.get("no_in_batch_neg", False)
    cross = cfg.cross_device_negatives and world > 1 and in_batch
    p_dense = gather(p["dense"]) if cross else p["dense"]  # (W*B*G, H) or (B*G, H)
    offset = dist.get_rank() * p["dense"].shape[0] if cross else 0  # this rank's first column
    up = at_least_fp32  # bf16 representations (autocast) are scored in fp32: tau = 0.02 multiplies every error by 50
    s_dense = dense_score(up(q["dense"]), up(p_dense))  # (B, W*B*G); row i's positive at column offset + i*G
    s_sparse = s_colbert = None
    if "sparse" in heads:
        s_sparse = sparse_score(batch["q_ids"], up(q["sparse"]), batch["p_ids"], up(p["sparse"]))  # (B, B*G)
    if "colbert" in heads:  # fp32 inside its blocks
        s_colbert = colbert_score(q["colbert"], p["colbert"], q["colbert_mask"], p["colbert_mask"])  # (B, B*G)
    loss, parts = m3_loss(s_dense, s_sparse, s_colbert, cfg, G, offset, batch["teacher"], self_distill, in_batch)
    if special_ids is not None and "sparse" in q:
        parts.update(lexical_health(q, p, batch, special_ids))
    return loss, parts


# ----------------------------------------------------------------------------------------------------------------
# the optimizer and its step

def frozen(model, freeze):
    """The parameter names that freeze (comma-separated dotted prefixes, whole components: encoder.layer.1 is not
    encoder.layer.10) names; an empty prefix (a stray comma) or one that names no parameter stops, with the nearest
    names (a typo would freeze nothing; an empty prefix, everything)."""
    names = [n for n, _ in model.named_parameters()]
    found = []
    for prefix in freeze.split(",") if freeze else []:
        hits = [n for n in names if n == prefix.strip() or n.startswith(prefix.strip() + ".")]
        if not hits:
            near = difflib.get_close_matches(prefix.strip(), {n.rsplit(".", k)[0] for n in names for k in range(4)}, 3)
            stop(f"config: freeze={freeze!r}: " + (f"{prefix.strip()!r} names no parameter" if prefix.strip() else
                 "an empty prefix would freeze every parameter") + f" (nearest: {', '.join(near) or 'none'})")
        found += hits
    return found


def make_optimizer(model, cfg, total_steps):
    """AdamW, no decay on biases and norms, heads at head_lr; linear warm-up then linear decay to 0 (SPEC 5.2)."""
    groups = {}
    for name, prm in model.named_parameters():
        if not prm.requires_grad:
            continue
        head = name.startswith(tuple(HEAD_FILES))  # colbert_linear, sparse_linear
        decay = prm.ndim >= 2  # biases and LayerNorm weights are 1-D
        lr = (cfg.head_lr or cfg.lr) if head else cfg.lr
        groups.setdefault((lr, decay), []).append(prm)
    opt = torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0}
                             for (lr, decay), ps in groups.items()], betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_eps, fused=True)
    warm = int(cfg.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warm) if s < warm else max(0.0, (total_steps - s) / max(1, total_steps - warm)))
    return opt, sched


def optimizer_step(model, opt, sched, scaler, cfg, heads):
    """Unscale, drop the off heads' gradients, clip, step, update the scaler and the schedule, zero -> this step's lr.
    model: the bare M3 (not the DDP wrapper)."""
    scaler.unscale_(opt)
    for x in off_heads(heads):
        for prm in getattr(model, f"{x}_linear").parameters():
            prm.grad = None
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    lr = opt.param_groups[0]["lr"]
    scaler.step(opt)
    scaler.update()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return lr


# ----------------------------------------------------------------------------------------------------------------
# the run

def evaluate(raw, cfg, step, history, log, writer, ddp):
    """Evaluation during training (selection.py) of the weights after `step` steps -> why the run stops early, or "".
    Rank 0 (log not None) evaluates, logs and keeps out_dir/best: the sets are dev-sized and eval.py's search runs in
    one process. The others wait for it in the broadcast (under dist_timeout_s) that tells them whether to stop."""
    why = [selection.evaluation(raw, cfg, step, history, log, writer, lambda rec: save_best(raw, cfg, rec))
           if log is not None else ""]
    if ddp:
        dist.broadcast_object_list(why, src=0)
    return why[0]


def main(argv):
    """The run: config, resume point, start checks, process group, train, then the ordered end (runtime.py)."""
    cfg = load_config(argv)
    resume, state = find_resume(cfg)  # every rank checks the same files before any process group work
    check_start(cfg, resume)
    selection.check_data(cfg)
    if torch.cuda.is_available():  # the fp32 score matmuls on tensor cores: their bf16 inputs are exact in TF32
        torch.backends.cuda.matmul.allow_tf32 = True
    ddp, rank, world, device = init_distributed(cfg.dist_timeout_s)
    train(cfg, resume, state, ddp, rank, world, device)
    end_distributed()


def train(cfg, resume, state, ddp, rank, world, device):
    """Load the model and the data, then the loop; the batch stream, the log and the dashboard are closed on every
    way out (the stream's worker processes are joined)."""
    print0(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, width=120))
    torch.manual_seed(cfg.seed)  # new heads start the same on every rank and in every rerun
    raw = M3.from_pretrained(resume or cfg.init_from or cfg.model, new_heads=cfg.init_new_heads,
                             pooling=cfg.pooling or None, colbert_dim=cfg.colbert_dim)
    tok = raw.tokenizer
    share = (int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", world)), dist.barrier) if ddp \
        else None  # each node's ranks index a share of the files, then all of them trust those indexes
    datasets = open_datasets(cfg.train_data, tok, teacher_kd=cfg.teacher_kd, share=share,
                             small_threshold=cfg.small_threshold, drop_threshold=cfg.drop_threshold,
                             group_size=cfg.train_group_size)
    batch_kw = dict(epoch=0, seed=cfg.seed, world_size=world, rank=rank, length_ranges=cfg.length_ranges,
                    batch_sizes=cfg.batch_sizes, group_by_length=cfg.group_by_length)
    per_epoch = len(epoch_batches(datasets, **batch_kw))
    total = cfg.epochs * per_epoch if cfg.max_steps < 0 else min(cfg.max_steps, cfg.epochs * per_epoch)
    for name in frozen(raw, cfg.freeze):
        raw.get_parameter(name).requires_grad_(False)
    if cfg.gradient_checkpointing:
        raw.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    raw.to(device).train()
    attention.use(raw.encoder, cfg.attention, device.type)
    model = raw if not ddp else DDP(raw, device_ids=[device.index] if device.type == "cuda" else None,
                                    find_unused_parameters=False,  # off heads: M3.forward ties them in
                                    gradient_as_bucket_view=True)  # .grad views the all-reduce buckets: no 2nd copy
    opt, sched = make_optimizer(raw, cfg, total)
    half = DTYPES[cfg.dtype]
    amp = torch.autocast(device.type, dtype=half, enabled=device.type == "cuda" and half != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.dtype == "fp16")
    step, epoch, index, stopped = 0, 0, 0, ""
    if resume:
        restore(opt, sched, scaler, state)
        step, epoch, index, stopped = state["step"], state["epoch"], state["index"], state.get("stopped", "")
        done = f": nothing to do, the run has {total} steps (more: raise max_steps or epochs, --resume_changes=true)"
        print0(f"resumed from {resume} at step {step} (epoch {epoch}, batch {index})" + (done if step >= total else
               f": nothing to do, the run stopped early ({stopped})" if stopped else ""))
    schedule = parse_schedule(cfg.head_schedule)
    bar = tqdm(total=total, initial=step, disable=not (rank == 0 and sys.stderr.isatty()), desc="train")
    stream = rank_batches(datasets, tok, Sampling.of(cfg), batch_kw, epoch, index, num_workers=cfg.num_workers,
                          prefetch=cfg.prefetch, pin_memory=device.type == "cuda")
    log = writer = None
    history = []  # rank 0: this run's evaluations (selection.py), those before a resume from log.jsonl
    try:
        if rank == 0:  # model and data are good: only now is anything in out_dir changed
            selection.check_resume(cfg, step)
            start_run_dir(cfg, step)
            log, writer = open(os.path.join(cfg.out_dir, "log.jsonl"), "a"), tensorboard_writer(cfg, step)
            history = selection.logged_evaluations(cfg.out_dir)
        if ddp:
            dist.barrier()
        if cfg.eval_every and step == 0:  # the starting model (a resume's step was evaluated before it was saved)
            stopped = evaluate(raw, cfg, step, history, log, writer, ddp)
        while step < total and not stopped:
            t0 = time.time()
            torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)  # dropout: a function of (seed, step, rank)
            epoch, index, n_batches, batch = next(stream)
            heads = schedule[min(epoch, len(schedule) - 1)]
            source = batch.pop("source")
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            self_distill = cfg.self_distill and step >= cfg.self_distill_start
            loss, parts = train_step(model, batch, cfg, heads, self_distill, amp, scaler)
            finite = torch.isfinite(loss).float()
            if ddp:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() == 0:  # nothing is written: the last checkpoint on disk stays the last good one
                raise FloatingPointError(f"non-finite loss at step {step} (epoch {epoch}, batch {index}) on rank "
                                         f"{rank}; examples: " + ", ".join(f"{f}:{n}" for f, n in source))
            lr = optimizer_step(raw, opt, sched, scaler, cfg, heads)
            if step % cfg.log_every == 0 or step == total - 1:
                log_step(cfg, log, step, total, epoch, loss, parts, lr, time.time() - t0, batch, world, writer)
            step = step + 1
            bar.update(1)
            position = {"step": step, "epoch": epoch, "index": index + 1} if index + 1 < n_batches else \
                {"step": step, "epoch": epoch + 1, "index": 0}  # where the next step's batch comes from
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
                stopped = evaluate(raw, cfg, step, history, log, writer, ddp)
            if step % cfg.save_every == 0 or step == total or stopped:
                if rank == 0:
                    save_checkpoint(raw, opt, sched, scaler, cfg, {**position, **({"stopped": stopped} if stopped
                                    else {})}, "final" if step == total or stopped else f"step-{step:07d}")
                if ddp:  # the others wait for the checkpoint (no barrier on the other steps)
                    dist.barrier()
    finally:  # every way out: the stream's worker processes joined, the log and the dashboard closed
        stream.close()
        bar.close()
        for f in (log, writer):
            if f is not None:
                f.close()
        if rank == 0 and step < total and not stopped:  # failed: before its first checkpoint, the replaced run is back
            put_back(cfg.out_dir)


# ----------------------------------------------------------------------------------------------------------------
# the config: defaults <- YAML diffs <- --key=value, every value checked

def load_config(argv):
    """Config from defaults <- YAML files (flat diffs) <- --key=value overrides (runtime.load_config); unknown keys
    (answered with our name for a FlagEmbedding option), bad types and bad values stop naming the key and where it
    was set."""
    return parse_config(Config, argv, config_problems, hint)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # Config.dtype: autocast's on GPUs
CHOICES = {"pooling": ("", *POOLINGS), "teacher_kd_loss": tuple(TEACHER_KD), "dtype": tuple(DTYPES),
           "attention": attention.MODES, "report_to": REPORT_TO}  # Config key -> its choices, each next to its code


def config_problems(cfg):
    """(key, problem) for every value that would crash later or train something silently wrong."""
    floats = [f.name for f in dataclasses.fields(Config) if f.type in (float, "float")]
    positive = ("temperature", "lr", "grad_clip", "loss_norm", "self_distill_norm", "final_norm", "adam_eps")
    rules = [(k, math.isfinite(getattr(cfg, k)), "must be a finite number") for k in floats] + \
        [(k, getattr(cfg, k) > 0, "must be > 0") for k in positive] + \
        [(k, getattr(cfg, k) >= 1, "must be >= 1") for k in ("train_group_size", "epochs", "save_every", "log_every",
                                                            "keep_last", "dist_timeout_s", "prefetch")] + \
        [(k, getattr(cfg, k) >= 0, "must be >= 0") for k in ("head_lr", "weight_decay", "self_distill_start",
                                                            "sub_batch_size", "sub_batch_tokens", "num_workers",
                                                            "small_threshold", "drop_threshold", "w_dense", "w_sparse",
                                                            "w_colbert", "w_ens", "ens_dense", "ens_sparse",
                                                            "ens_colbert")] + \
        [(k, 0 <= getattr(cfg, k) <= 1, "must be in [0, 1]") for k in ("warmup_ratio", "shuffle_ratio",
                                                                        "min_sparse_share")] + \
        [(k, 0 <= getattr(cfg, k) < 1, "must be in [0, 1)") for k in ("adam_beta1", "adam_beta2")] + \
        [(k, getattr(cfg, k) >= 2, "must be >= 2 (CLS + end token)") for k in ("query_max_len", "passage_max_len")] + \
        [(k, getattr(cfg, k) in c, "must be one of " + ", ".join(repr(x) for x in c)) for k, c in CHOICES.items()]
    rules += [("max_steps", cfg.max_steps == -1 or cfg.max_steps >= 1, "must be >= 1, or -1 for all epochs"),
              ("colbert_dim", cfg.colbert_dim == -1 or cfg.colbert_dim >= 1, "must be >= 1, or -1 for the hidden size"),
              ("drop_threshold", cfg.drop_threshold == 0 or cfg.small_threshold > 0,
               "drops merged small files only: set small_threshold too (SPEC 4.4)"),
              ("batch_sizes", all(b >= 1 for b in cfg.batch_sizes), "every batch size must be >= 1"),
              ("length_ranges", len(cfg.length_ranges) >= 2 and cfg.length_ranges[0] >= 0 and
               all(a < b for a, b in zip(cfg.length_ranges, cfg.length_ranges[1:])),
               "must be >= 2 increasing token lengths starting at >= 0"),
              ("batch_sizes", len(cfg.batch_sizes) == len(cfg.length_ranges) - 1,
               f"{len(cfg.batch_sizes)} values but length_ranges {cfg.length_ranges} has "
               f"{len(cfg.length_ranges) - 1} ranges")]
    problems = [(key, why) for key, ok, why in rules if not ok] + selection.config_problems(cfg)
    if cfg.report_to in REPORT_TO and report_to_problem(cfg.report_to):
        problems.append(("report_to", report_to_problem(cfg.report_to)))
    try:
        schedule = parse_schedule(cfg.head_schedule)
        if len(schedule) > cfg.epochs:
            problems.append(("head_schedule", f"names {len(schedule)} epochs but the run has epochs={cfg.epochs}: "
                                              f"the last {len(schedule) - cfg.epochs} would never train"))
    except ValueError as e:
        problems.append(("head_schedule", str(e)))
    if cfg.sub_batch_size and cfg.sub_batch_tokens:
        problems.append(("sub_batch_size", f"and sub_batch_tokens={cfg.sub_batch_tokens} are both set: chunks count "
                                           "texts or tokens, set the other to 0"))
    if cfg.resume and cfg.overwrite:
        problems.append(("overwrite", "and resume exclude each other: continue the run or replace it"))
    return problems


def parse_schedule(text):
    """head_schedule "dense;dense,sparse,colbert" -> [["dense"], ["dense", "sparse", "colbert"]] (epoch by epoch,
    the last repeats); spaces are ignored, an unknown or missing head raises (a typo would switch a head off)."""
    epochs = [[h.strip() for h in part.split(",") if h.strip()] for part in text.split(";")]
    for heads in epochs:
        unknown = [h for h in heads if h not in HEADS]
        if unknown:
            raise ValueError(f"unknown head {unknown[0]!r}: heads are {', '.join(HEADS)}")
        if "dense" not in heads:
            raise ValueError(f"every epoch trains dense (the loss is built on it, SPEC 3.4): got {heads}")
        if len(set(heads)) != len(heads):
            raise ValueError(f"a head is listed twice in {heads}")
    return epochs


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
