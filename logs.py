"""What a run reports: every logged training step (one printed line, one log.jsonl record, TensorBoard scalars) with
every term the loss returned, the sparse head's health; eval.py's results (one metrics.json folder per checkpoint,
never another's) and its rows in TensorBoard at the evaluated checkpoint's step.
log.jsonl is the record; TensorBoard is a view of it (bench/plot_logs.py draws it without). TensorBoard is optional:
torch.utils.tensorboard is imported only when asked for. Shared by training and evaluation; imports neither.
"""
import json
import os

import torch
import torch.distributed as dist
import yaml

REPORT_TO = ("", "none", "tensorboard")  # Config.report_to's choices; "none": HF Trainer's spelling of off
TB_DIR = "tb"  # under out_dir: the run's event files
LOSS_ORDER = ("dense", "sparse", "colbert", "ens", "self_kd")  # m3_loss's terms, printed first in this order
HEALTH = ("sparse_share", "sparse_q_terms", "sparse_p_terms")  # lexical_health's keys, printed last


# ----------------------------------------------------------------------------------------------------------------
# one training step

def log_step(cfg, log, step, total, epoch, loss, parts, lr, dt, batch, world, writer=None):
    """One printed line, one log.jsonl record and TensorBoard scalars with the loss and every key of parts (m3_loss's
    terms, its accuracy, lexical_health's keys, any term an edit adds), averaged over ranks (every rank has the same
    keys); a head switched off returns no term, so it is absent from the record, not 0. Printed: the known terms in
    LOSS_ORDER, then the others, then acc, speed and the sparse head's health; a warning when the sparse head is
    trained and its share of non-zero token weights falls below cfg.min_sparse_share. log None: not rank 0."""
    keys = sorted(parts)
    vals = torch.stack([loss.float()] + [parts[k].float().to(loss.device) for k in keys])  # (1 + len(keys),)
    if dist.is_initialized():
        dist.all_reduce(vals)
        vals /= world
    tokens = (batch["q_mask"].sum() + batch["p_mask"].sum()).item() * world
    rec = {"step": step, "epoch": epoch, "loss": vals[0].item(), **{k: v.item() for k, v in zip(keys, vals[1:])},
           "lr": lr, "ms": 1000 * dt, "tok_s": tokens / dt, "samples_s": len(batch["q_ids"]) * world / dt}
    if log is None:
        return rec
    terms = [k for k in LOSS_ORDER if k in parts] + [k for k in keys if k not in LOSS_ORDER + HEALTH + ("acc",)]
    line = f"step {step}/{total} | loss {rec['loss']:.4f} | " + " ".join(f"{k} {rec[k]:.3f}" for k in terms)
    line += f" | acc {rec['acc']:.2f}" if "acc" in rec else ""
    line += (f" | lr {lr:.2e} | {rec['ms']:.0f} ms | {rec['tok_s'] / 1000:.1f}k tok/s | "
             f"{rec['samples_s']:.1f} q/s")
    if all(k in rec for k in HEALTH):
        line += (f" | sparse nz {rec['sparse_share']:.2f} q {rec['sparse_q_terms']:.1f} "
                 f"p {rec['sparse_p_terms']:.1f} terms")
    print(line, flush=True)
    if "sparse" in parts and "sparse_share" in rec and rec["sparse_share"] < cfg.min_sparse_share:
        print(f"warning: step {step}: only {rec['sparse_share']:.1%} of real tokens have a non-zero sparse weight "
              f"(min_sparse_share {cfg.min_sparse_share}): the sparse head is collapsing (FlagEmbedding #982); "
              f"stop and lower lr or w_sparse, or start self_distill earlier", flush=True)
    log.write(json.dumps(rec) + "\n")
    log.flush()
    if writer is not None:
        write_scalars(writer, rec)
    return rec


# ----------------------------------------------------------------------------------------------------------------
# TensorBoard, for training and evaluation


def tensorboard_class(missing_ok=False):
    """torch.utils.tensorboard.SummaryWriter; if the tensorboard package is missing, None with missing_ok, else
    SystemExit naming the package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch.utils.tensorboard imports the tensorboard package
        if missing_ok:
            return None
        raise SystemExit(f"report_to=tensorboard needs the tensorboard package: pip install tensorboard ({e})")
    return SummaryWriter


def report_to_problem(value):
    """What is wrong with Config.report_to, one of REPORT_TO (W&B is not built in: bench/plot_logs.py draws log.jsonl),
    or None (load_config: before anything is loaded or written)."""
    if value == "tensorboard" and tensorboard_class(missing_ok=True) is None:
        return "needs the tensorboard package: pip install tensorboard"
    return None


def tensorboard_writer(cfg, step):
    """A SummaryWriter on <out_dir>/tb for report_to=tensorboard (else None); a resume at `step` hides the events of
    the steps it re-runs (TensorBoard's purge_step), as log.jsonl moves their records aside."""
    if cfg.report_to != "tensorboard":
        return None
    return tensorboard_class()(os.path.join(cfg.out_dir, TB_DIR), purge_step=step or None)


def write_scalars(writer, rec, section="train"):
    """One log.jsonl record's numbers as <section>/<key> scalars at its step."""
    for k, v in rec.items():
        if k not in ("step", "best_step") and isinstance(v, (int, float)) and not isinstance(v, bool):
            writer.add_scalar(f"{section}/{k}", v, rec["step"])
    writer.flush()


def log_record(log, writer, rec, line):
    """A record that is not a training step (selection.py: an evaluation, an early stop): printed as line, appended to
    log.jsonl, its numbers to TensorBoard as eval/<set>/<row>/<metric>."""
    print(line, flush=True)
    log.write(json.dumps(rec) + "\n")
    log.flush()
    if writer is not None:
        write_scalars(writer, rec, "eval")


def eval_to_tensorboard(ckpt, res, data_dir, split):
    """eval.py's rows as eval/<data>-<split>/<row>/<metric> at the checkpoint's step, when the checkpoint belongs to a
    run that reports to TensorBoard (its config.yaml); returns the event folder or None."""
    cfg_file, state = os.path.join(ckpt, "config.yaml"), os.path.join(ckpt, "train_state.json")
    if not (os.path.isfile(cfg_file) and os.path.isfile(state)):
        return None
    if (yaml.safe_load(open(cfg_file)) or {}).get("report_to") != "tensorboard":
        return None
    step, writer_class = int(yaml.safe_load(open(state))["step"]), tensorboard_class(missing_ok=True)
    if writer_class is None:  # metrics.json has the rows anyway
        print("the run reports to TensorBoard, but tensorboard is not installed here: pip install tensorboard")
        return None
    folder = os.path.join(os.path.dirname(os.path.abspath(ckpt)), TB_DIR)
    writer = writer_class(folder)
    name = f"{os.path.basename(os.path.abspath(data_dir))}-{split}"
    for row, metrics in res["rows"].items():
        for metric, v in metrics.items():
            writer.add_scalar(f"eval/{name}/{row}/{metric}", v, step)
    writer.close()
    return folder


# ----------------------------------------------------------------------------------------------------------------
# evaluation results: one folder (metrics.json) per checkpoint

def default_out(ckpt, data_dir, split):
    """runs/eval/<ckpt>-<data dir name>-<split>, <ckpt> from the last two components of a local checkpoint's absolute
    path (runs/a/final -> a_final: distinct checkpoints, distinct folders), else the name with '/' -> '_' (hub)."""
    parts = os.path.abspath(ckpt).split(os.sep)[-2:] if os.path.isdir(ckpt) else ckpt.split("/")
    name = "_".join(x for x in parts if x)
    return os.path.join("runs", "eval", f"{name}-{os.path.basename(os.path.abspath(data_dir))}-{split}")


def check_out(out_dir, ckpt):
    """Refuse to replace an out_dir/metrics.json that records another checkpoint (or none: an older eval.py's).
    The same checkpoint path is the same run (retrained in place, its metrics are replaced); in memory: the weights."""
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except ValueError:  # unreadable: not a record of this checkpoint
        old = {}
    old = old if isinstance(old, dict) else {}
    same_path = ckpt["ckpt_abspath"] is not None and old.get("ckpt_abspath") == ckpt["ckpt_abspath"]
    if not same_path and old.get("ckpt_key") != ckpt["ckpt_key"]:
        name = lambda c: f"{c.get('ckpt_abspath') or c.get('ckpt', '(none)')} (key {str(c.get('ckpt_key'))[:12]})"
        raise FileExistsError(f"{path} holds the metrics of {name(old)}, not of {name(ckpt)}: pass another --out "
                              "(out_dir), --overwrite, or remove that file")


@torch.no_grad()
def lexical_health(q, p, batch, special_ids):
    """The sparse head's health (FlagEmbedding issue #982: sparse weights collapsing to 0 unnoticed): the share of
    real tokens (not padding, not the special ids the head never weighs) with a non-zero weight, and the mean
    number of distinct token ids with a non-zero weight per query and per passage (the lexical-weights dict size).
    special_ids: the model's (M3.special_ids)."""
    out, real, nonzero = {}, 0, 0
    for side, reps in (("q", q), ("p", p)):
        ids, w = batch[f"{side}_ids"], reps["sparse"]  # (N, T) each
        ok = batch[f"{side}_mask"].bool() & ~torch.isin(ids, special_ids.to(ids.device))  # (N, T)
        hit = ok & (w > 0)
        real, nonzero = real + ok.sum(), nonzero + hit.sum()
        x = torch.where(hit, ids, -1).sort(dim=1).values  # (N, T) weighted ids ascending, -1 first
        distinct = ((x[:, 1:] != x[:, :-1]) & (x[:, 1:] >= 0)).sum(1) + (x[:, 0] >= 0)  # (N,)
        out[f"sparse_{side}_terms"] = distinct.float().mean()
    out["sparse_share"] = nonzero.float() / real.clamp(min=1)
    return out
