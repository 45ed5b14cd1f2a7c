"""M3-Embedding training: torchrun DDP, staged configs, gradient checkpointing, gradient cache, exact resume.

    python train.py configs/tiny.yaml --out_dir=runs/x                       # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 train.py configs/warmup.yaml --train_data=... # one node, 8 GPUs
"""
import dataclasses
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import epoch_batches, make_batch, open_datasets
from losses import gather, m3_loss
from model import HEADS, M3, TOKENIZER_FILES, check_weights, colbert_score, dense_score, load_head, sparse_score

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Config:
    # model
    model: str = "BAAI/bge-m3-unsupervised"  # hub name, local dir, or "minilm" (the bundled demo encoder)
    init_new_heads: bool = False  # start new heads (sparse: term matching, colbert: random) if the checkpoint has none
    pooling: str = ""  # dense pooling: cls (M3, SPEC 1.1) or mean (e.g. MiniLM); "" = the checkpoint's (else cls)
    colbert_dim: int = -1  # multi-vector dim D; -1 = hidden size (SPEC 1.3)
    freeze: str = ""  # comma-separated parameter-name prefixes not to train, e.g. encoder.embeddings.word_embeddings
    # data (SPEC 4)
    train_data: str = ""  # a .jsonl file or a directory of them; each file is one dataset
    query_max_len: int = 512  # SPEC 5.1
    passage_max_len: int = 8192  # SPEC 5.1
    train_group_size: int = 8  # 1 positive + 7 negatives (SPEC 3.1); 1 = pairs, in-batch negatives only
    length_ranges: list = field(default_factory=lambda: [0, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8192])
    batch_sizes: list = field(default_factory=lambda: [48, 32, 20, 18, 14, 14, 12, 10, 8])  # per GPU, SPEC 4.5
    group_by_length: bool = True  # inside a length range, batch similar lengths together (bench/padding.py)
    shuffle_ratio: float = 0.0  # text-chunk shuffle of positives (SPEC 4.2; paper 0.002)
    kd: bool = False  # distil from teacher pos_scores/neg_scores in the data (SPEC 3.5)
    kd_loss_type: str = "m3_kd_loss"  # m3_kd_loss (what bge-m3 used) or kl_div (SPEC 3.5)
    # loss (SPEC 3.4; losses.m3_loss)
    temperature: float = 0.02  # tau for every score (SPEC 3.1)
    head_schedule: str = "dense,sparse,colbert"  # heads trained per epoch, ';' between epochs, last one repeats
    cross_device_negatives: bool = True  # dense negatives from all ranks, exact gradient (SPEC 0, 3.3)
    w_dense: float = 1.0  # lambda_1: dense loss weight
    w_sparse: float = 0.1  # lambda_2: sparse loss weight (SPEC 3.4)
    w_colbert: float = 1.0  # lambda_3: multi-vector loss weight
    w_ens: float = 1.0  # weight of the ensemble CE term
    ens_dense: float = 1.0  # s_ens = ens_dense s_dense + ens_sparse s_sparse + ens_colbert s_colbert
    ens_sparse: float = 0.3  # SPEC 1.4
    ens_colbert: float = 1.0
    loss_norm: float = 4.0  # L = (...)/4 (SPEC 3.4)
    kd_norm: float = 3.0  # L' = (...)/3
    final_norm: float = 2.0  # (L + L')/2
    self_distill: bool = False  # self-knowledge distillation from s_ens (SPEC 3.4)
    self_distill_start: int = 0  # self-KD from this optimizer step on (paper: ~6000 warm-up steps without it)
    # optimisation (SPEC 5)
    lr: float = 1e-5
    head_lr: float = 0.0  # learning rate of the sparse/colbert heads; 0 = lr (new heads may want more)
    weight_decay: float = 0.01  # not applied to biases and norms
    warmup_ratio: float = 0.1  # linear warm-up, then linear decay to 0
    epochs: int = 1
    max_steps: int = -1  # stop after this many steps (-1: run all epochs); the schedule spans the shorter
    grad_clip: float = 1.0
    seed: int = 42
    # memory and speed
    dtype: str = "bf16"  # on GPU: bf16 autocast, fp16 (with a grad scaler) or fp32; CPU always runs fp32
    gradient_checkpointing: bool = True
    sub_batch_size: int = 0  # encode the batch in chunks of this many texts (0 = all at once), loss on the full batch
    grad_cache: bool = False  # gradient cache: memory does not grow with the batch (same gradients)
    # run
    out_dir: str = "runs/m3"
    init_from: str = ""  # start from this stage's checkpoint instead of `model` (e.g. runs/warmup/final)
    resume: str = ""  # "auto" = newest intact checkpoint in out_dir, or a checkpoint dir
    overwrite: bool = False  # start over in an out_dir that holds a run: its checkpoints, log and config are deleted
    save_every: int = 1000  # steps between checkpoints (and one at the end)
    keep_last: int = 2  # checkpoints kept in out_dir
    log_every: int = 10


def load_config(argv):
    """Config from defaults <- YAML files (flat diffs) <- --key=value overrides; unknown keys, bad types and bad
    values stop with the key and where it was set."""
    cfg, types, where = Config(), {f.name: f.type for f in dataclasses.fields(Config)}, {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, val = arg[2:].partition("=")
            if not eq:
                stop(f"config: {arg!r} must be --key=value")
            items, src = {key: yaml.safe_load(val)}, "command line"
        else:
            if not os.path.isfile(arg):
                stop(f"config: no such file {arg!r}")
            try:
                items, src = yaml.safe_load(open(arg)) or {}, arg
            except yaml.YAMLError as e:
                stop(f"config: {arg}: not valid YAML: {e}")
            if not isinstance(items, dict):
                stop(f"config: {arg}: expected key: value lines, got {type(items).__name__}")
        for key, val in items.items():
            if key not in types:
                stop(f"config: unknown key {key!r} ({src})")
            setattr(cfg, key, _coerce(key, val, types[key], src))
            where[key] = src
    for key, problem in config_problems(cfg):
        stop(f"config: {key}={getattr(cfg, key)!r} ({where.get(key, 'default')}): {problem}")
    return cfg


def config_problems(cfg):
    """(key, problem) for every value that would crash later or train something silently wrong."""
    rules = [("temperature", cfg.temperature > 0, "must be > 0 (tau divides every score)"),
             ("train_group_size", cfg.train_group_size >= 1, "must be >= 1 (1 positive + G-1 negatives)"),
             ("kd_loss_type", cfg.kd_loss_type in ("m3_kd_loss", "kl_div"), "must be m3_kd_loss or kl_div"),
             ("max_steps", cfg.max_steps == -1 or cfg.max_steps >= 1, "must be >= 1, or -1 for all epochs"),
             ("epochs", cfg.epochs >= 1, "must be >= 1"),
             ("keep_last", cfg.keep_last >= 1, "must be >= 1 (checkpoints kept in out_dir)"),
             ("save_every", cfg.save_every >= 1, "must be >= 1"), ("log_every", cfg.log_every >= 1, "must be >= 1"),
             ("lr", cfg.lr > 0, "must be > 0"), ("head_lr", cfg.head_lr >= 0, "must be >= 0 (0 = lr)"),
             ("weight_decay", cfg.weight_decay >= 0, "must be >= 0"), ("grad_clip", cfg.grad_clip > 0, "must be > 0"),
             ("warmup_ratio", 0 <= cfg.warmup_ratio <= 1, "must be in [0, 1]"),
             ("shuffle_ratio", 0 <= cfg.shuffle_ratio <= 1, "must be in [0, 1]"),
             ("query_max_len", cfg.query_max_len >= 2, "must be >= 2 (CLS + end token)"),
             ("passage_max_len", cfg.passage_max_len >= 2, "must be >= 2 (CLS + end token)"),
             ("sub_batch_size", cfg.sub_batch_size >= 0, "must be >= 0 (0 = the whole batch at once)"),
             ("self_distill_start", cfg.self_distill_start >= 0, "must be >= 0"),
             ("colbert_dim", cfg.colbert_dim == -1 or cfg.colbert_dim >= 1, "must be >= 1, or -1 for the hidden size"),
             ("dtype", cfg.dtype in ("bf16", "fp16", "fp32"), "must be bf16, fp16 or fp32"),
             ("pooling", cfg.pooling in ("", "cls", "mean"), "must be cls, mean, or empty for the checkpoint's"),
             ("batch_sizes", all(b >= 1 for b in cfg.batch_sizes), "every batch size must be >= 1"),
             ("length_ranges", len(cfg.length_ranges) >= 2 and cfg.length_ranges[0] >= 0 and
              all(a < b for a, b in zip(cfg.length_ranges, cfg.length_ranges[1:])),
              "must be >= 2 increasing token lengths starting at >= 0"),
             ("batch_sizes", len(cfg.batch_sizes) == len(cfg.length_ranges) - 1,
              f"{len(cfg.batch_sizes)} values but length_ranges {cfg.length_ranges} has "
              f"{len(cfg.length_ranges) - 1} ranges"),
             ("loss_norm", cfg.loss_norm > 0, "must be > 0"), ("kd_norm", cfg.kd_norm > 0, "must be > 0"),
             ("final_norm", cfg.final_norm > 0, "must be > 0")]
    problems = [(key, why) for key, ok, why in rules if not ok]
    try:
        parse_schedule(cfg.head_schedule)
    except ValueError as e:
        problems.append(("head_schedule", str(e)))
    if cfg.resume and cfg.overwrite:
        problems.append(("overwrite", "and resume exclude each other: continue the run or replace it"))
    return problems


def parse_schedule(text):
    """head_schedule "dense;dense,sparse,colbert" -> [["dense"], ["dense", "sparse", "colbert"]] (epoch by epoch,
    the last repeats); spaces are ignored, an unknown or missing head raises (a typo would switch a head off)."""
    epochs = [[h.strip() for h in part.split(",") if h.strip()] for part in text.split(";")]
    for heads in epochs:
        unknown = [h for h in heads if h not in ("dense", "sparse", "colbert")]
        if unknown:
            raise ValueError(f"unknown head {unknown[0]!r}: heads are dense, sparse, colbert")
        if "dense" not in heads:
            raise ValueError(f"every epoch trains dense (the loss is built on it, SPEC 3.4): got {heads}")
        if len(set(heads)) != len(heads):
            raise ValueError(f"a head is listed twice in {heads}")
    return epochs


def stop(msg):
    """Exit with msg, printed once (by rank 0) however many processes torchrun started."""
    raise SystemExit(msg if int(os.environ.get("RANK", "0")) == 0 else 1)


def _coerce(key, val, typ, where):
    """Coerce a YAML/CLI value to the field's type: "1e-5" -> float, "48,32" -> [48, 32]."""
    typ = {"bool": bool, "int": int, "float": float, "str": str, "list": list}.get(getattr(typ, "__name__", typ), typ)
    try:
        if typ is list:
            return [int(x) for x in (val.split(",") if isinstance(val, str) else val if isinstance(val, list) else [val])]
        if typ is bool and not isinstance(val, bool):
            raise ValueError("expected true/false")
        if typ is int and isinstance(val, float) and not val.is_integer():
            raise ValueError("expected an integer")
        return typ(val) if val is not None or typ is str else ""
    except (TypeError, ValueError) as e:
        stop(f"config: {key}={val!r} ({where}) is not a {typ.__name__}: {e}")


# ----------------------------------------------------------------------------------------------------------------
# one training step: encode (whole, in sub-batches, or with the gradient cache), score, loss, backward

def encode(model, ids, mask, chunk):
    """Forward in chunks of `chunk` texts (0: at once); slices of one padded tensor, so they concatenate."""
    if chunk <= 0 or chunk >= len(ids):
        return model(ids, mask)
    outs = [model(ids[s:s + chunk], mask[s:s + chunk]) for s in range(0, len(ids), chunk)]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def compute_loss(q, p, batch, cfg, heads, self_distill):
    """Scores of the three heads -> m3_loss. Dense columns come from every rank when cross_device_negatives."""
    G, world = cfg.train_group_size, dist.get_world_size() if dist.is_initialized() else 1
    cross = cfg.cross_device_negatives and world > 1
    p_dense = gather(p["dense"]) if cross else p["dense"]  # (W*B*G, H) or (B*G, H)
    offset = dist.get_rank() * p["dense"].shape[0] if cross else 0  # this rank's first column
    fp32 = lambda s: s.to(torch.promote_types(s.dtype, torch.float32))  # losses in fp32 (or fp64) under autocast
    s_dense = fp32(dense_score(q["dense"], p_dense))  # (B, W*B*G); row i's positive at column offset + i*G
    s_sparse = s_colbert = None
    if "sparse" in heads:
        s_sparse = fp32(sparse_score(batch["q_ids"], q["sparse"], batch["p_ids"], p["sparse"]))  # (B, B*G)
    if "colbert" in heads:
        s_colbert = fp32(colbert_score(q["colbert"], p["colbert"], q["colbert_mask"], p["colbert_mask"]))
    loss, parts = m3_loss(s_dense, s_sparse, s_colbert, cfg, G, offset, batch["teacher"], self_distill)
    for x in {"sparse", "colbert"} - set(heads):  # a head that is off: weight 0, so DDP still sees its parameters
        loss = loss + 0.0 * (q[x].sum() + p[x].sum())
    return loss, parts


def train_step(model, batch, cfg, heads, self_distill, amp, scaler):
    """Forward + backward of one batch (gradients accumulate in .grad) -> (loss, parts)."""
    chunk = cfg.sub_batch_size
    if not cfg.grad_cache:
        with amp:
            q = encode(model, batch["q_ids"], batch["q_mask"], chunk)
            p = encode(model, batch["p_ids"], batch["p_mask"], chunk)
        loss, parts = compute_loss(q, p, batch, cfg, heads, self_distill)
        scaler.scale(loss).backward()
        return loss.detach(), parts
    # gradient cache: 1) encode every chunk without graph, 2) loss + gradients w.r.t. the representations,
    # 3) re-encode each chunk with graph (same dropout: RNG replayed) and back-propagate the cached gradients
    chunk = chunk if chunk > 0 else len(batch["p_ids"])
    pieces = [(k, s) for k in ("q", "p") for s in range(0, len(batch[f"{k}_ids"]), chunk)]
    reps, rng = {"q": [], "p": []}, []
    with torch.no_grad(), amp:
        for k, s in pieces:
            rng.append(rng_state())
            reps[k].append(model(batch[f"{k}_ids"][s:s + chunk], batch[f"{k}_mask"][s:s + chunk]))
    cached = {k: {n: torch.cat([o[n] for o in outs]) for n in outs[0]} for k, outs in reps.items()}
    del reps  # one copy of the representations (+ their gradients) is all the cache holds
    for outs in cached.values():
        for n, t in outs.items():
            if t.is_floating_point():
                t.requires_grad_(True)
    loss, parts = compute_loss(cached["q"], cached["p"], batch, cfg, heads, self_distill)
    scaler.scale(loss).backward()  # gradients now sit on the cached representations
    for j, ((k, s), state) in enumerate(zip(pieces, rng)):
        sync = j == len(pieces) - 1 or not isinstance(model, DDP)  # DDP all-reduces once, after the last chunk
        with (nullcontext() if sync else model.no_sync()):
            set_rng_state(state)
            with amp:
                out = model(batch[f"{k}_ids"][s:s + chunk], batch[f"{k}_mask"][s:s + chunk])
            names = [n for n in out if out[n].is_floating_point()]  # colbert_mask carries no gradient
            torch.autograd.backward([out[n] for n in names], [cached[k][n].grad[s:s + chunk] for n in names])
    return loss.detach(), parts


def rng_state():
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def set_rng_state(state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


# ----------------------------------------------------------------------------------------------------------------
# optimizer, schedule, checkpoints

def make_optimizer(model, cfg, total_steps):
    """AdamW, no decay on biases and norms, heads at head_lr; linear warm-up then linear decay to 0 (SPEC 5.2)."""
    groups = {}
    for name, prm in model.named_parameters():
        if not prm.requires_grad:
            continue
        head = name.startswith(tuple(HEADS))  # colbert_linear, sparse_linear
        decay = prm.ndim >= 2  # biases and LayerNorm weights are 1-D
        lr = (cfg.head_lr or cfg.lr) if head else cfg.lr
        groups.setdefault((lr, decay), []).append(prm)
    opt = torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0}
                             for (lr, decay), ps in groups.items()], betas=(0.9, 0.999), eps=1e-8, fused=True)
    warm = int(cfg.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warm) if s < warm else max(0.0, (total_steps - s) / max(1, total_steps - warm)))
    return opt, sched


def save_checkpoint(model, opt, sched, scaler, cfg, position, name):
    """Release layout + train_state.pt (+ its position as train_state.json) + config.yaml, written under a
    temporary name and renamed; the oldest step checkpoints beyond keep_last are deleted."""
    final, tmp = os.path.join(cfg.out_dir, name), os.path.join(cfg.out_dir, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                **position}, os.path.join(tmp, "train_state.pt"))
    with open(os.path.join(tmp, "train_state.json"), "w") as f:
        json.dump(position, f)  # the step, readable without loading the optimizer state
    with open(os.path.join(tmp, "config.yaml"), "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    steps = sorted(d for d in os.listdir(cfg.out_dir) if d.startswith("step-"))
    for old in steps[:max(0, len(steps) - cfg.keep_last)]:
        shutil.rmtree(os.path.join(cfg.out_dir, old))


def checkpoint_state(path):
    """(train_state, None) if every file a resume reads is there and readable, else (None, why)."""
    try:
        have = lambda f: os.path.isfile(os.path.join(path, f))
        missing = [f for f in ("train_state.pt", "config.json", *HEADS.values()) if not have(f)]
        if missing or not any(have(f) for f in TOKENIZER_FILES):
            return None, f"missing {', '.join(missing) or 'tokenizer files'}"
        check_weights(path)
        for fname in HEADS.values():
            load_head(os.path.join(path, fname))
        state = torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=True)
        if not {"optimizer", "scheduler", "scaler", "step", "epoch", "index"} <= set(state):
            return None, "train_state.pt lacks the optimizer/scheduler state or the data position"
        return state, None
    except Exception as e:  # truncated or foreign files; weights_only refuses pickled code
        return None, f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def checkpoint_step(path):
    """The step a checkpoint was saved at, for ordering: train_state.json, else the step-N name, else train_state.pt."""
    try:
        with open(os.path.join(path, "train_state.json")) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    name = os.path.basename(path)
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    try:  # a final checkpoint written before train_state.json existed
        return int(torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=True)["step"])
    except Exception:
        return -1


def find_resume(cfg):
    """(checkpoint dir, its train_state) to resume from, or (None, None) for a fresh start. --resume=auto takes the
    newest intact checkpoint in out_dir and says which broken ones it skipped; --resume=DIR must be intact."""
    if not cfg.resume:
        return None, None
    if cfg.resume != "auto":
        if not os.path.isdir(cfg.resume):
            stop(f"config: resume={cfg.resume!r}: no such checkpoint directory (--resume=auto picks the newest in "
                 f"out_dir {cfg.out_dir})")
        state, why = checkpoint_state(cfg.resume)
        if state is None:
            stop(f"config: resume={cfg.resume!r}: not a usable checkpoint: {why}")
        return cfg.resume, state
    names = os.listdir(cfg.out_dir) if os.path.isdir(cfg.out_dir) else []
    found = [os.path.join(cfg.out_dir, d) for d in names if d == "final" or d.startswith("step-")]
    broken = []
    for path in sorted(found, key=checkpoint_step, reverse=True):
        state, why = checkpoint_state(path)
        if state is not None:
            for bad, why in broken:
                print0(f"resume: skipped {bad}, newer but broken ({why})")
            return path, state
        broken.append((path, why))
    if broken:
        stop(f"resume=auto: no intact checkpoint in {cfg.out_dir}: " + "; ".join(f"{p}: {w}" for p, w in broken))
    return None, None


def check_start(cfg, resume):
    """Before any process does work: never mix two runs in one out_dir, and the checkpoint to start from exists."""
    out = cfg.out_dir
    if not cfg.train_data:
        stop("config: train_data is empty: pass --train_data=FILE_OR_DIR")
    if os.path.exists(out) and not os.path.isdir(out):
        stop(f"config: out_dir={out!r} is a file, not a directory")
    inside = cfg.resume == "auto" or os.path.abspath(cfg.resume).startswith(os.path.abspath(out) + os.sep)
    held = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if held and not cfg.overwrite and not (cfg.resume and inside):
        stop(f"config: out_dir={out!r} already holds {', '.join(held[:6])}{' ...' if len(held) > 6 else ''}: "
             f"--resume=auto continues that run, --overwrite=true replaces it (deletes its checkpoints and log), "
             f"or choose another --out_dir")
    key = "init_from" if cfg.init_from else "model"
    path = getattr(cfg, key)
    local = path.startswith(("/", ".", "~")) or path.count("/") >= 2 or \
        (path.count("/") == 1 and os.path.isdir(path.split("/")[0]))  # else a hub name "org/name" or a bundled one
    if resume is None and local and not os.path.isdir(os.path.expanduser(path)):
        made_by = [f"configs/{f}" for f in sorted(os.listdir(os.path.join(ROOT, "configs"))) if f.endswith(".yaml")
                   and (yaml.safe_load(open(os.path.join(ROOT, "configs", f))) or {}).get("out_dir") ==
                   os.path.normpath(os.path.dirname(os.path.normpath(path)))]
        hint = f" It is written by {made_by[0]}: run that stage first." if made_by else ""
        stop(f"config: {key}={path!r}: no such checkpoint directory.{hint}" +
             (f" Or start from `model` ({cfg.model}) with --init_from=" if key == "init_from" else ""))


def start_run_dir(cfg, step):
    """Rank 0, once the model and the data loaded: clear a run being overwritten, keep log.jsonl to the steps
    before `step` (a resume re-runs the others; their records move to log.superseded.jsonl), write config.yaml."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.overwrite:  # the earlier run's files only; anything else the user keeps there stays
        for f in os.listdir(cfg.out_dir):
            path = os.path.join(cfg.out_dir, f)
            if f in ("config.yaml", "log.jsonl", "log.superseded.jsonl", "final") or f.startswith(("step-", ".tmp-")):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    log = os.path.join(cfg.out_dir, "log.jsonl")
    if os.path.exists(log):
        keep, drop = [], []
        for line in open(log):
            try:
                (keep if json.loads(line)["step"] < step else drop).append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                drop.append(line if line.endswith("\n") else line + "\n")
        if drop:
            with open(os.path.join(cfg.out_dir, "log.superseded.jsonl"), "a") as f:
                f.writelines(drop)
            print0(f"log.jsonl: {len(drop)} records from step {step} on moved to log.superseded.jsonl (re-run now)")
        with open(log + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(log + ".tmp", log)
    with open(os.path.join(cfg.out_dir, "config.yaml.tmp"), "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    os.replace(os.path.join(cfg.out_dir, "config.yaml.tmp"), os.path.join(cfg.out_dir, "config.yaml"))


def print0(*args):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# the run

def main(argv):
    cfg = load_config(argv)
    resume, state = find_resume(cfg)  # every rank checks the same files before any process group work
    check_start(cfg, resume)
    ddp = "RANK" in os.environ  # launched by torchrun
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f"cuda:{local_rank}" if ddp else "cuda") if torch.cuda.is_available() else torch.device("cpu")
    master = rank == 0
    print0(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, width=120))

    torch.manual_seed(cfg.seed)  # new heads start the same on every rank and in every rerun
    model = M3.from_pretrained(resume or cfg.init_from or cfg.model, new_heads=cfg.init_new_heads,
                               pooling=cfg.pooling or None, colbert_dim=cfg.colbert_dim)
    tok = model.tokenizer
    local_first = ddp and int(os.environ.get("LOCAL_RANK", 0)) != 0
    if local_first:
        dist.barrier()  # each node's local rank 0 checks (and builds) the index, the others then trust its cache
    datasets = open_datasets(cfg.train_data, tok, kd=cfg.kd, verify=not local_first)
    if ddp and not local_first:
        dist.barrier()
    batch_kw = dict(epoch=0, seed=cfg.seed, world_size=world, rank=rank, length_ranges=cfg.length_ranges,
                    batch_sizes=cfg.batch_sizes, group_by_length=cfg.group_by_length)
    per_epoch = len(epoch_batches(datasets, **batch_kw))
    total = cfg.epochs * per_epoch if cfg.max_steps < 0 else min(cfg.max_steps, cfg.epochs * per_epoch)
    for name, prm in model.named_parameters():
        if cfg.freeze and name.startswith(tuple(cfg.freeze.split(","))):
            prm.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    raw = model
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None, find_unused_parameters=False)
    opt, sched = make_optimizer(raw, cfg, total)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype)
    amp = torch.autocast(device.type, dtype=half or torch.float32, enabled=device.type == "cuda" and half is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.dtype == "fp16")
    step, epoch, index = 0, 0, 0
    if resume:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, index = state["step"], state["epoch"], state["index"]
        done = f": nothing to do, the run has {total} steps (raise max_steps or epochs to go on)"
        print0(f"resumed from {resume} at step {step} (epoch {epoch}, batch {index})" + (done if step >= total else ""))
    if master:  # model and data are good: only now is anything in out_dir changed
        start_run_dir(cfg, step)
    if ddp:
        dist.barrier()
    schedule = parse_schedule(cfg.head_schedule)
    log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if master else None
    bar = tqdm(total=total, initial=step, disable=not (master and sys.stderr.isatty()), desc="train")
    while step < total:
        batches = epoch_batches(datasets, **{**batch_kw, "epoch": epoch})
        heads = schedule[min(epoch, len(schedule) - 1)]
        while index < len(batches) and step < total:
            t0 = time.time()
            torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)  # dropout: a function of (seed, step, rank)
            batch = make_batch(datasets, batches[index], tok, epoch=epoch, step=index, seed=cfg.seed, rank=rank,
                               group_size=cfg.train_group_size, query_max_len=cfg.query_max_len,
                               passage_max_len=cfg.passage_max_len, kd=cfg.kd, shuffle_ratio=cfg.shuffle_ratio)
            source = batch.pop("source")
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            self_distill = cfg.self_distill and step >= cfg.self_distill_start
            loss, parts = train_step(model, batch, cfg, heads, self_distill, amp, scaler)
            finite = torch.isfinite(loss).float()
            if ddp:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() == 0:  # nothing is written: the last checkpoint on disk stays the last good one
                raise FloatingPointError(f"non-finite loss at step {step} (epoch {epoch}, batch {index}) on rank "
                                         f"{rank}; examples: " + ", ".join(f"{f}:{n}" for f, n in source))
            scaler.unscale_(opt)
            for x in ("sparse", "colbert"):  # heads that are off get no update (not even weight decay)
                if x not in heads:
                    for prm in getattr(raw, f"{x}_linear").parameters():
                        prm.grad = None
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            lr = sched.get_last_lr()[0]
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % cfg.log_every == 0 or step == total - 1:
                log_step(cfg, log, step, total, epoch, loss, parts, lr, time.time() - t0, batch, world, ddp)
            step, index = step + 1, index + 1
            bar.update(1)
            position = {"step": step, "epoch": epoch, "index": index} if index < len(batches) else \
                {"step": step, "epoch": epoch + 1, "index": 0}  # where the next step's batch comes from
            if master and (step % cfg.save_every == 0 or step == total):
                save_checkpoint(raw, opt, sched, scaler, cfg, position, "final" if step == total else f"step-{step:07d}")
            if ddp:
                dist.barrier()
        if index >= len(batches):
            epoch, index = epoch + 1, 0
    bar.close()
    if ddp:
        dist.destroy_process_group()


def log_step(cfg, log, step, total, epoch, loss, parts, lr, dt, batch, world, ddp):
    """One line with fixed keys + a JSON record in log.jsonl; loss and parts averaged over ranks."""
    keys = ("dense", "sparse", "colbert", "ens", "kd", "acc")
    vals = torch.stack([loss.float()] + [parts.get(k, torch.tensor(0.0)).float().to(loss.device) for k in keys])
    if ddp:
        dist.all_reduce(vals)
        vals /= world
    tokens = (batch["q_mask"].sum() + batch["p_mask"].sum()).item() * world
    rec = {"step": step, "epoch": epoch, "loss": vals[0].item(), **{k: v.item() for k, v in zip(keys, vals[1:])},
           "lr": lr, "ms": 1000 * dt, "tok_s": tokens / dt, "samples_s": len(batch["q_ids"]) * world / dt}
    if log is not None:
        print(f"step {step}/{total} | loss {rec['loss']:.4f} | dense {rec['dense']:.3f} sparse {rec['sparse']:.3f} "
              f"colbert {rec['colbert']:.3f} ens {rec['ens']:.3f} kd {rec['kd']:.3f} | acc {rec['acc']:.2f} | "
              f"lr {lr:.2e} | {rec['ms']:.0f} ms | {rec['tok_s'] / 1000:.1f}k tok/s | {rec['samples_s']:.1f} q/s",
              flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
