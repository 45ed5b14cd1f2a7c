"""What a run reports besides its loss: the sparse head's health (every logged step, in log.jsonl) and, with
`report_to: tensorboard`, the same scalars as log.jsonl in <out_dir>/tb, plus eval.py's metrics at the step of the
checkpoint it evaluated. log.jsonl stays the record; TensorBoard is a view of it (bench/plot_logs.py draws it without).
TensorBoard is optional: torch.utils.tensorboard is imported only when asked for.
"""
import os

import torch
import yaml

REPORT_TO = ("", "none", "tensorboard")  # "none": HF Trainer's spelling of off
TB_DIR = "tb"  # under out_dir: the run's event files


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
    """What is wrong with Config.report_to, or None (load_config: before anything is loaded or written)."""
    if value not in REPORT_TO:
        return "must be tensorboard, or empty/none (W&B is not built in: bench/plot_logs.py draws log.jsonl)"
    if value == "tensorboard" and tensorboard_class(missing_ok=True) is None:
        return "needs the tensorboard package: pip install tensorboard"
    return None


def tensorboard_writer(cfg, step):
    """A SummaryWriter on <out_dir>/tb for report_to=tensorboard (else None); a resume at `step` hides the events of
    the steps it re-runs (TensorBoard's purge_step), as log.jsonl moves their records aside."""
    if cfg.report_to != "tensorboard":
        return None
    return tensorboard_class()(os.path.join(cfg.out_dir, TB_DIR), purge_step=step or None)


def write_scalars(writer, rec):
    """One log.jsonl record as train/<key> scalars at its step."""
    for k, v in rec.items():
        if k != "step":
            writer.add_scalar(f"train/{k}", v, rec["step"])
    writer.flush()


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


@torch.no_grad()
def lexical_health(q, p, batch):
    """The sparse head's health (FlagEmbedding issue #982: sparse weights collapsing to 0 unnoticed): the share of
    real tokens (not padding, not the special ids the head never weighs) with a non-zero weight, and the mean
    number of distinct token ids with a non-zero weight per query and per passage (the lexical-weights dict size)."""
    out, real, nonzero = {}, 0, 0
    for side, reps in (("q", q), ("p", p)):
        ids, w = batch[f"{side}_ids"], reps["sparse"]  # (N, T) each
        ok = batch[f"{side}_mask"].bool() & ~torch.isin(ids, batch["special_ids"].to(ids.device))  # (N, T)
        hit = ok & (w > 0)
        real, nonzero = real + ok.sum(), nonzero + hit.sum()
        x = torch.where(hit, ids, -1).sort(dim=1).values  # (N, T) weighted ids ascending, -1 first
        distinct = ((x[:, 1:] != x[:, :-1]) & (x[:, 1:] >= 0)).sum(1) + (x[:, 0] >= 0)  # (N,)
        out[f"sparse_{side}_terms"] = distinct.float().mean()
    out["sparse_share"] = nonzero.float() / real.clamp(min=1)
    return out
