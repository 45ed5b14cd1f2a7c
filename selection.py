"""Fine-tuning without regret (README "Fine-tuning on your data"): evaluation sets, every row eval.py computes on
each of them, and the select rule that train.py (out_dir/best, early stopping) and merge.py (--alpha auto) share.

An evaluation set: name -> {data: BEIR_DIR, split: dev, max_corpus: N, max_queries: N, ...} (SET_KEYS; what is not
given is eval.py's default). Its metrics are keyed "<set>/<row>/<metric>", e.g. dev/all/nDCG@10: the key in
log.jsonl, in select_metric and retain_metric, and (as eval/<key>) in TensorBoard.
The select rule over evaluations in order (the first: the starting model, or merge.py's alpha 0): the best is the
one with the highest select_metric (a tie: the earlier one) among those whose retain_metric is at least the first's
minus retain_tolerance (the retention guard; the first always qualifies).
"""
import json
import os
import time

import yaml

import eval as ev
from beir import data_error
from logs import log_record
from runtime import stop
from search import METRICS, ROWS

SET_KEYS = {"data": str, "split": str, "max_corpus": int, "max_queries": int, "query_max_len": int,
            "passage_max_len": int, "batch_size": int, "depth": int}  # an evaluation set's keys: eval.evaluate's
DEFAULT_SPLIT = "dev"


def set_problems(sets, where="eval_sets", data=True):
    """[(key, why)] for an eval_sets mapping: names, keys, values, and (data) each set's data folder with its split
    (checked before a run writes anything: a typo must not cost the training before the first evaluation)."""
    if not isinstance(sets, dict):
        return [(where, f"expected a mapping name -> {{data: BEIR_DIR, split: ...}}, got {type(sets).__name__}")]
    problems = []
    for name, spec in sets.items():
        key = f"{where}.{name}"
        if not isinstance(name, str) or not name or "/" in name:
            problems.append((key, "a set name is non-empty text without '/' (metric keys are <set>/<row>/<metric>)"))
            continue
        if not isinstance(spec, dict) or "data" not in spec:
            problems.append((key, "expected {data: BEIR_DIR, split: ..., max_corpus: N, max_queries: N}"))
            continue
        for k, v in spec.items():
            typ = SET_KEYS.get(k)
            if typ is None:
                problems.append((f"{key}.{k}", f"unknown key; the keys are {', '.join(SET_KEYS)}"))
            elif typ is int and (isinstance(v, bool) or not isinstance(v, int) or v < ev.MINIMUM.get(k, 1)):
                problems.append((f"{key}.{k}", f"expected an integer >= {ev.MINIMUM.get(k, 1)}, got {v!r}"))
            elif typ is str and not (isinstance(v, str) and v):
                problems.append((f"{key}.{k}", f"expected non-empty text, got {v!r}"))
        if data and not any(k.startswith(key + ".") for k, _ in problems):
            error = data_error(os.path.expanduser(spec["data"]), spec.get("split", DEFAULT_SPLIT))
            if error:
                problems.append((f"{key}.data", error))
    return problems


def read_sets(path):
    """merge.py --eval_sets: a YAML file holding a mapping of evaluation sets, or a training config with an eval_sets
    key (the one the fine-tune used) -> the mapping; stops naming the file and the key."""
    try:
        with open(path, encoding="utf-8") as f:
            items = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        stop(f"--eval_sets {path}: {e}")
    sets = items.get("eval_sets") if isinstance(items, dict) and "eval_sets" in items else items
    problems = set_problems(sets, "eval_sets" if sets is not items else os.path.basename(path))
    if problems:
        stop(f"--eval_sets {path}: " + "; ".join(f"{k}: {why}" for k, why in problems))
    return sets


def metric_problem(metric, sets):
    """Why metric is not a key "<set>/<row>/<metric>" of these evaluation sets, or None."""
    parts = metric.split("/")
    if len(parts) != 3:
        return f"expected <set>/<row>/<metric>, e.g. {next(iter(sets), 'dev')}/all/nDCG@10"
    name, row, m = parts
    for value, have, what in ((name, sets, "eval_sets"), (row, ROWS, "rows"), (m, METRICS, "metrics")):
        if value not in have:
            return f"{value!r} is not one of the {what}: {', '.join(have) or '(none: set eval_sets)'}"
    return None


def evaluate_sets(model, sets, query_prefix="", passage_prefix=""):
    """eval.evaluate on every set (no cache: the weights change between calls; nothing written) -> {"<set>/<row>/
    <metric>": value} and "eval_s", the seconds it took. model: an M3 (evaluated where it is, in eval mode, its
    training mode restored after), or a checkpoint path."""
    t0, out = time.time(), {}
    for name, spec in sets.items():
        kw = {k: v for k, v in spec.items() if k not in ("data", "split")}
        res = ev.evaluate(model, os.path.expanduser(spec["data"]), spec.get("split", DEFAULT_SPLIT), cache_dir=None,
                          verbose=False, query_prefix=query_prefix, passage_prefix=passage_prefix, **kw)
        out.update({f"{name}/{row}/{m}": v for row, metrics in res["rows"].items() for m, v in metrics.items()})
    return {**out, "eval_s": round(time.time() - t0, 1)}


def choose(records, select_metric, retain_metric="", retain_tolerance=0.0):
    """The select rule (module docstring) -> (index of the best record, [why record i may not be chosen, or ""]).
    records: evaluations in order, records[0] the starting model's."""
    floor = records[0][retain_metric] - retain_tolerance if retain_metric else None
    barred = ["" if floor is None or i == 0 or r[retain_metric] >= floor else
              f"{retain_metric} {r[retain_metric]:.4f} < start {records[0][retain_metric]:.4f} - {retain_tolerance}"
              for i, r in enumerate(records)]
    best = 0
    for i, r in enumerate(records):
        if not barred[i] and r[select_metric] > records[best][select_metric]:
            best = i
    return best, barred


def summary(rec, sets):
    """One printed line: every set's nDCG@10 per row."""
    return " | ".join(f"{name}: " + " ".join(f"{row} {rec[f'{name}/{row}/nDCG@10']:.4f}" for row in ROWS
                                             if f"{name}/{row}/nDCG@10" in rec) for name in sets)


# ----------------------------------------------------------------------------------------------------------------
# during training (train.py): the config's options, one evaluation, the log's evaluations after a resume

def config_problems(cfg):
    """[(key, why)] for train.py's evaluation options (Config: eval_every ... retain_tolerance)."""
    on = cfg.eval_every > 0
    rules = [("eval_every", cfg.eval_every >= 0, "must be >= 0 (0: no evaluation during training)"),
             ("early_stop_patience", cfg.early_stop_patience >= 0, "must be >= 0 (0: never stop early)"),
             ("retain_tolerance", cfg.retain_tolerance >= 0, "must be >= 0"),
             ("eval_sets", on or not cfg.eval_sets, "are evaluated every eval_every steps: set eval_every too"),
             ("eval_sets", not on or cfg.eval_sets, "is empty: eval_every needs at least one set to evaluate"),
             ("select_metric", on or not cfg.select_metric, "needs evaluations: set eval_every and eval_sets"),
             ("early_stop_patience", not cfg.early_stop_patience or cfg.select_metric,
              "counts evaluations without a better select_metric: set select_metric"),
             ("retain_metric", not cfg.retain_metric or cfg.select_metric,
              "guards the choice of the best checkpoint: set select_metric")]
    problems = [(key, why) for key, ok, why in rules if not ok]
    if on and cfg.eval_sets:
        problems += set_problems(cfg.eval_sets, data=False)  # the folders: check_data, when the run starts
    if not problems:
        problems += [(k, metric_problem(getattr(cfg, k), cfg.eval_sets)) for k in ("select_metric", "retain_metric")
                     if getattr(cfg, k) and metric_problem(getattr(cfg, k), cfg.eval_sets)]
    return problems


def check_data(cfg):
    """Before a run loads anything: every evaluation set's folder and split (a config names data it may not have yet,
    as train_data)."""
    for key, why in set_problems(cfg.eval_sets) if cfg.eval_every else []:
        stop(f"config: {key}={cfg.eval_sets[key.split('.')[1]].get('data')!r}: {why}")


def evaluation(model, cfg, step, history, log, writer, save_best):
    """Rank 0 (log not None): evaluate cfg.eval_sets on the weights after `step` steps, log the record (log.jsonl,
    TensorBoard, one printed line), keep out_dir/best (save_best(record)) when the select rule picks this one ->
    why the run stops early (early_stop_patience), or "". history: this run's evaluations so far (appended to)."""
    rec = {"step": step, "event": "eval", **evaluate_sets(model, cfg.eval_sets, cfg.query_prefix, cfg.passage_prefix)}
    history.append(rec)
    line, why = f"eval step {step} ({rec['eval_s']:.0f} s) | {summary(rec, cfg.eval_sets)}", ""
    if cfg.select_metric:
        best, barred = choose(history, cfg.select_metric, cfg.retain_metric, cfg.retain_tolerance)
        rec["best_step"] = history[best]["step"]
        line += f" | best {cfg.select_metric} {history[best][cfg.select_metric]:.4f} at step {rec['best_step']}"
        line += f" (not this one: {barred[-1]})" if barred[-1] else ""
        if best == len(history) - 1:
            save_best(rec)
        waited = len(history) - 1 - best
        if cfg.early_stop_patience and waited >= cfg.early_stop_patience:
            why = (f"early stop at step {step}: {waited} evaluations without a better {cfg.select_metric} than step "
                   f"{rec['best_step']}'s {history[best][cfg.select_metric]:.4f} (early_stop_patience "
                   f"{cfg.early_stop_patience}); out_dir/best holds step {rec['best_step']}")
    log_record(log, writer, rec, line)
    if why:
        log_record(log, None, {"step": step, "event": "early_stop", "reason": why}, why)
    return why


def logged_evaluations(out_dir):
    """The evaluation records of a run's log.jsonl, in order (after a resume's start_run_dir: those it kept)."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r.get("event") == "eval"]


def check_resume(cfg, step):
    """Before a resume at `step` changes out_dir: the retention guard needs the starting model's evaluation."""
    if cfg.retain_metric and step > 0 and not any(r["step"] == 0 for r in logged_evaluations(cfg.out_dir)):
        stop(f"config: retain_metric={cfg.retain_metric!r}: the starting model's value (the step-0 "
             f"evaluation) is not in {cfg.out_dir}/log.jsonl: the run started without eval_every, so "
             "the guard has nothing to compare with; drop retain_metric or start a new run")
