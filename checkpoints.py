"""Checkpoints and run directories (SPEC 2): save, pick and check checkpoints, keep one run per out_dir, and the log
after a resume.
A checkpoint is the BGE-M3 release layout (model.save_pretrained) + train_state.pt
(optimizer, scheduler, scaler, data position) + train_state.json (the position alone) + config.yaml.
"""
import dataclasses
import json
import os
import shutil

import torch
import yaml

from logs import TB_DIR
from model import HEAD_FILES, TOKENIZER_FILES, check_weights, is_local_path, load_head
from runtime import print0, stop

ROOT = os.path.dirname(os.path.abspath(__file__))


def save_checkpoint(model, opt, sched, scaler, cfg, position, name):
    """Release layout + train_state.pt (+ its position as train_state.json) + config.yaml, written under a
    temporary name and renamed; the oldest step checkpoints beyond keep_last are deleted."""
    final, tmp = os.path.join(cfg.out_dir, name), os.path.join(cfg.out_dir, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, prompts={"query": cfg.query_prefix, "passage": cfg.passage_prefix})
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
        missing = [f for f in ("train_state.pt", "config.json", *HEAD_FILES.values()) if not have(f)]
        if missing or not any(have(f) for f in TOKENIZER_FILES):
            return None, f"missing {', '.join(missing) or 'tokenizer files'}"
        check_weights(path)
        for fname in HEAD_FILES.values():
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
    if resume is None and is_local_path(path) and not os.path.isdir(os.path.expanduser(path)):
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
            if f in ("config.yaml", "log.jsonl", "log.superseded.jsonl", "final", TB_DIR) or \
                    f.startswith(("step-", ".tmp-")):
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
