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
from transformers import AutoTokenizer

from logs import TB_DIR
from model import HEAD_FILES, TOKENIZER_FILES, check_weights, is_local_path, load_head
from runtime import print0, stop, writable_error

ROOT = os.path.dirname(os.path.abspath(__file__))
RUN_FILES = ("config.yaml", "log.jsonl", "log.superseded.jsonl", "final", "best", "best.superseded",
             TB_DIR)  # + step-*, .tmp-*: a run's own files
REPLACED = ".replaced"  # under out_dir: an --overwrite's earlier run, kept until the new run saves its first checkpoint
SAME_RUN = ("out_dir", "resume", "overwrite", "resume_changes", "log_every", "save_every", "keep_last", "report_to",
            "num_workers", "prefetch", "dist_timeout_s", "min_sparse_share", "gradient_checkpointing", "sub_batch_size",
            "sub_batch_tokens", "grad_cache")  # Config keys a resume may change: the same run (same gradients)


def save_checkpoint(model, opt, sched, scaler, cfg, position, name):
    """Release layout + train_state.pt (+ its position as train_state.json) + config.yaml, written under a
    temporary name and renamed: a failure (a full disk) leaves no half checkpoint and every earlier one intact. The
    oldest step checkpoints beyond keep_last are deleted, and so is a run this one replaces (REPLACED), now that this
    run has a checkpoint of its own."""
    final, tmp = os.path.join(cfg.out_dir, name), os.path.join(cfg.out_dir, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, prompts={"query": cfg.query_prefix, "passage": cfg.passage_prefix})
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                    **position}, os.path.join(tmp, "train_state.pt"))
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump(position, f)  # the step, readable without loading the optimizer state
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"{final}: checkpoint not written ({str(e).splitlines()[0]}): disk full or not writable; the "
                      f"earlier checkpoints in {cfg.out_dir} are intact (--resume=auto continues from them)") from e
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    steps = sorted(d for d in os.listdir(cfg.out_dir) if d.startswith("step-"))
    for old in steps[:max(0, len(steps) - cfg.keep_last)]:
        shutil.rmtree(os.path.join(cfg.out_dir, old))
    if os.path.isdir(os.path.join(cfg.out_dir, REPLACED)):
        shutil.rmtree(os.path.join(cfg.out_dir, REPLACED))
        print0(f"the run this one replaces ({cfg.out_dir}) is deleted now that this one saved {name}")


def save_best(model, cfg, rec):
    """out_dir/best: the release layout of the weights evaluated in rec (selection.evaluation), + best.json (its step,
    select_metric and value, the whole evaluation record); written under a temporary name and swapped in, so a
    failure leaves the earlier best whole."""
    best, tmp = os.path.join(cfg.out_dir, "best"), os.path.join(cfg.out_dir, ".tmp-best")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, prompts={"query": cfg.query_prefix, "passage": cfg.passage_prefix})
        with open(os.path.join(tmp, "best.json"), "w") as f:
            json.dump({"step": rec["step"], "select_metric": cfg.select_metric, "value": rec[cfg.select_metric],
                       "retain_metric": cfg.retain_metric, "retain_tolerance": cfg.retain_tolerance, "eval": rec}, f)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"{best}: not written ({str(e).splitlines()[0]}): disk full or not writable") from e
    if os.path.isdir(best):
        os.rename(best, tmp + "-old")
    os.rename(tmp, best)
    shutil.rmtree(tmp + "-old", ignore_errors=True)


def best_step(out_dir):
    """The step out_dir/best was evaluated at (best.json), or None."""
    try:
        with open(os.path.join(out_dir, "best", "best.json")) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def restore(opt, sched, scaler, state):
    """A checkpoint's optimizer, scheduler and scaler states loaded into those built from this run's config: the moments
    and the step count from the checkpoint, every setting (each group's lr, weight decay, betas, eps; the schedule)
    from the config, which equals the checkpoint's unless resume_changes (same_run)."""
    built = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        opt.load_state_dict(state["optimizer"])
    except ValueError as e:
        stop(f"config: resume: the checkpoint's optimizer state does not fit this run's trainable parameters ({e}): "
             "freeze or head_lr changed; start a new run from its weights with --init_from=CHECKPOINT")
    for group, settings in zip(opt.param_groups, built):
        group.update(settings)
    sched.load_state_dict(state["scheduler"])
    sched.base_lrs = [g["initial_lr"] for g in built]
    for group, base, f in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * f(sched.last_epoch)  # LambdaLR's own formula: bit for bit what the saved lr was
    scaler.load_state_dict(state["scaler"])


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
        for fname in ("config.json", "m3.json", "tokenizer.json", "tokenizer_config.json"):  # JSON that loading reads
            try:
                if have(fname):
                    with open(os.path.join(path, fname), encoding="utf-8") as f:
                        json.load(f)
            except ValueError as e:
                return None, f"{fname}: not valid JSON ({e})"
        AutoTokenizer.from_pretrained(path)  # every tokenizer file, as loading reads them
        state = torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=True)
        if not {"optimizer", "scheduler", "scaler", "step", "epoch", "index"} <= set(state):
            return None, "train_state.pt lacks the optimizer/scheduler state or the data position"
        return state, None
    except Exception as e:  # truncated or foreign files; weights_only refuses pickled code
        return None, f"{e.__class__.__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


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
    newest intact checkpoint in out_dir and says which broken ones it skipped (none yet: a fresh start, said so; no
    out_dir: a typo, refused); --resume=DIR must be intact. The checkpoint's run must be this one (same_run)."""
    if not cfg.resume:
        return None, None
    if cfg.resume != "auto":
        if not os.path.isdir(cfg.resume):
            stop(f"config: resume={cfg.resume!r}: no such checkpoint directory (--resume=auto picks the newest in "
                 f"out_dir {cfg.out_dir})")
        state, why = checkpoint_state(cfg.resume)
        if state is None:
            stop(f"config: resume={cfg.resume!r}: not a usable checkpoint: {why}")
        same_run(cfg, cfg.resume)
        return cfg.resume, state
    if not os.path.isdir(cfg.out_dir):
        stop(f"config: resume=auto: out_dir={cfg.out_dir!r} does not exist, so there is no run to continue (a typo?); "
             "drop --resume to start a new run there")
    names = os.listdir(cfg.out_dir)
    found = [os.path.join(cfg.out_dir, d) for d in names if d == "final" or d.startswith("step-")]
    broken = []
    for path in sorted(found, key=checkpoint_step, reverse=True):
        state, why = checkpoint_state(path)
        if state is not None:
            for bad, why in broken:
                print0(f"resume: skipped {bad}, newer but broken ({why})")
            same_run(cfg, path)
            return path, state
        broken.append((path, why))
    if broken:
        stop(f"resume=auto: no intact checkpoint in {cfg.out_dir}: " + "; ".join(f"{p}: {w}" for p, w in broken))
    print0(f"resume=auto: no checkpoint in {cfg.out_dir} yet: the run starts at step 0")
    return None, None


def same_run(cfg, path):
    """Stop unless the checkpoint at path was saved by this run's config, up to SAME_RUN's keys (log and memory
    settings): another lr, schedule, batch size, data, model, group size, freeze or head schedule would mix two runs.
    resume_changes=true accepts the differences, listed: the weights, the data position and the optimizer's moments
    come from the checkpoint, every setting from this config (restore)."""
    try:
        with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
            saved = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        stop(f"config: resume: {path}/config.yaml unreadable ({e}): the checkpoint's run is unknown")
    now = dataclasses.asdict(cfg)
    diff = [f"{k} {saved.get(k, '(unset)')!r} -> {v!r}" for k, v in now.items() if k not in SAME_RUN and
            saved.get(k, v) != v]
    if diff and not cfg.resume_changes:
        stop(f"config: resume: {path} was saved by another config: {'; '.join(diff)}. A resume continues the same "
             "run: drop these changes, or pass --resume_changes=true to continue with them, or start a new run from "
             f"those weights with --init_from={path}")
    if diff:
        print0(f"resume with changes ({'; '.join(diff)}): the weights, the data position and the optimizer's moments "
               "come from the checkpoint, every setting (the learning-rate schedule too) from this config")


def check_start(cfg, resume):
    """Before any process does work: never mix two runs in one out_dir, never lose one, out_dir writable, and the
    checkpoint to start from exists."""
    out = cfg.out_dir
    if not cfg.train_data:
        stop("config: train_data is empty: pass --train_data=FILE_OR_DIR")
    if os.path.exists(out) and not os.path.isdir(out):
        stop(f"config: out_dir={out!r} is a file, not a directory")
    if os.path.isdir(os.path.join(out, REPLACED)):
        stop(f"config: out_dir={out!r} holds {os.path.join(out, REPLACED)}: the run an --overwrite moved aside, whose "
             f"replacement stopped before its first checkpoint. Keep it: move its files back into {out} (replacing "
             f"the others there); or drop it: delete {os.path.join(out, REPLACED)}")
    within = lambda p: p and os.path.abspath(p).startswith(os.path.abspath(out) + os.sep)  # noqa: E731
    if cfg.overwrite and (within(cfg.init_from) or within(cfg.resume)):
        stop(f"config: overwrite=True would replace {out!r}, which holds the checkpoint this run starts from "
             f"({cfg.init_from or cfg.resume}): copy it elsewhere first, or choose another --out_dir")
    held = sorted(f for f in os.listdir(out) if not f.startswith(".m3-write-check")) if os.path.isdir(out) else []
    if held and not cfg.overwrite and not (cfg.resume == "auto" or within(cfg.resume)):
        stop(f"config: out_dir={out!r} already holds {', '.join(held[:6])}{' ...' if len(held) > 6 else ''}: "
             f"--resume=auto continues that run, --overwrite=true replaces it (once the new run saves its first "
             f"checkpoint), or choose another --out_dir")
    error = writable_error(out, f"config: out_dir={out!r}")
    if error:
        stop(error)
    key = "init_from" if cfg.init_from else "model"
    path = getattr(cfg, key)
    if resume is None and is_local_path(path) and not os.path.isdir(os.path.expanduser(path)):
        made_by = [f"configs/{f}" for f in sorted(os.listdir(os.path.join(ROOT, "configs"))) if f.endswith(".yaml")
                   and (yaml.safe_load(open(os.path.join(ROOT, "configs", f))) or {}).get("out_dir") ==
                   os.path.normpath(os.path.dirname(os.path.normpath(path)))]
        hint = f" It is written by {made_by[0]}: run that stage first." if made_by else ""
        stop(f"config: {key}={path!r}: no such checkpoint directory.{hint}" +
             (f" Or start from `model` ({cfg.model}) with --init_from=" if key == "init_from" else ""))


def run_files(out_dir):
    """The files of the run in out_dir (RUN_FILES, step-*, .tmp-*); anything else the user keeps there is not."""
    return [f for f in os.listdir(out_dir) if f in RUN_FILES or f.startswith(("step-", ".tmp-"))]


def start_run_dir(cfg, step):
    """Rank 0, once the model and the data loaded: move a run being overwritten aside (REPLACED: save_checkpoint
    deletes it after the new run's first checkpoint, put_back restores it if the new run fails before), keep log.jsonl
    to the steps before `step` and the evaluations up to it (a resume re-runs the others: their records move to
    log.superseded.jsonl, and a best checkpoint of a later step to best.superseded), write config.yaml."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.overwrite and run_files(cfg.out_dir):
        aside = os.path.join(cfg.out_dir, REPLACED)
        os.makedirs(aside)
        for f in run_files(cfg.out_dir):
            os.rename(os.path.join(cfg.out_dir, f), os.path.join(aside, f))
    log = os.path.join(cfg.out_dir, "log.jsonl")
    if os.path.exists(log):
        keep, drop = [], []
        for line in open(log):
            try:
                rec = json.loads(line)  # an evaluation (early stop) at `step` came before checkpoint `step`
                (keep if rec["step"] < step or 0 < rec["step"] == step and rec.get("event") else
                 drop).append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                drop.append(line if line.endswith("\n") else line + "\n")
        if drop:
            with open(os.path.join(cfg.out_dir, "log.superseded.jsonl"), "a") as f:
                f.writelines(drop)
            print0(f"log.jsonl: {len(drop)} records from step {step} on moved to log.superseded.jsonl (re-run now)")
        with open(log + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(log + ".tmp", log)
    kept = best_step(cfg.out_dir)
    if (kept or 0) > step:
        shutil.rmtree(os.path.join(cfg.out_dir, "best.superseded"), ignore_errors=True)
        os.rename(os.path.join(cfg.out_dir, "best"), os.path.join(cfg.out_dir, "best.superseded"))
        print0(f"best: step {kept} is re-run now; its best checkpoint moved to best.superseded")
    with open(os.path.join(cfg.out_dir, "config.yaml.tmp"), "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    os.replace(os.path.join(cfg.out_dir, "config.yaml.tmp"), os.path.join(cfg.out_dir, "config.yaml"))


def put_back(out_dir):
    """A run that fails before its first checkpoint: its files go, and the run it was to replace (REPLACED) comes
    back as it was. Rank 0, on the way out of train.py."""
    aside = os.path.join(out_dir, REPLACED)
    if not os.path.isdir(aside):
        return
    for f in run_files(out_dir):
        path = os.path.join(out_dir, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for f in os.listdir(aside):
        os.rename(os.path.join(aside, f), os.path.join(out_dir, f))
    os.rmdir(aside)
    print0(f"{out_dir}: the run --overwrite was to replace is back (this run stopped before its first checkpoint)")
