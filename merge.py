"""Merge a fine-tuned M3 checkpoint with the model it started from (README "Merging"; LM-Cocktail's idea): every
parameter of the encoder and of both heads becomes (1 - alpha) * base + alpha * tuned.

python merge.py --base A --tuned B --alpha 0.5 --out C
python merge.py --base A --tuned B --alpha auto --eval_sets FILE.yaml --select_metric dev/all/nDCG@10 \
    [--retain_metric retention/all/nDCG@10 --retain_tolerance 0.005] [--grid 0,0.25,0.5,0.75,1] --out C

alpha is the tuned model's share: 0 gives A and 1 gives B, bit for bit (A in B's dtype, if they differ). The sums are
computed in float64 and stored in B's dtype; merge(base, tuned, alpha) does the same to two M3s in memory. A and B must
have the same architecture and the same tokenizer. The merged model is B's kind: B's config, pooling, tokenizer and
query/passage prompts. A head that A lacks (A a bare encoder such as minilm) is taken from B as it is. B must have both
heads. --out gets the release layout (model.save_pretrained: encoder, tokenizer, heads, m3.json,
the sentence-transformers files) plus merge.json (base, tuned, alpha, and with auto the table). It is written to a
temporary folder and renamed when complete, so a failure leaves no --out.
--alpha auto evaluates the merge at each alpha of --grid in memory, on --eval_sets (a YAML mapping of evaluation sets,
or the training config that has them: selection.read_sets), with B's prompts. It picks alpha by train.py's rule
(selection.choose): the highest --select_metric among the alphas whose --retain_metric is at least alpha 0's (the
base's) minus --retain_tolerance. A tie goes to the smaller alpha. Each merge is evaluated as eval.py would evaluate it
once written: in float32, on the GPU if there is one. It prints the table it chose from, then writes that merge.
"""
import argparse
import copy
import json
import os
import shutil
import sys

import torch

import selection
from checkpoints import run_files
from model import HEAD_FILES, M3, find_file, load_head, resolve
from packed import inference_device
from runtime import run_command, stop, writable_error
from st_layout import prompts as st_prompts

GRID = [i / 10 for i in range(11)]  # --alpha auto's default alphas: 0, 0.1, ..., 1
PARTS = ("encoder", *HEAD_FILES)  # what is merged: the encoder and both heads
ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size", "hidden_act", "position_embedding_type", "layer_norm_eps")


def parser():
    """merge.py's options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the model fine-tuning started from: checkpoint dir, hub or bundled "
                                                 "name (minilm); a bare encoder's missing heads come from --tuned")
    p.add_argument("--tuned", required=True, help="the fine-tuned checkpoint (both heads): the merged model's kind")
    p.add_argument("--alpha", required=True, help="the tuned model's share in [0, 1], or auto (pick it on --grid)")
    p.add_argument("--out", required=True, help="a new folder (absent or empty) for the merged checkpoint")
    p.add_argument("--eval_sets", help="auto: YAML file of evaluation sets (name -> {data, split, max_corpus, "
                                       "max_queries}) or the training config that has eval_sets")
    p.add_argument("--select_metric", help="auto: the metric to maximise, <set>/<row>/<metric>, e.g. dev/all/nDCG@10")
    p.add_argument("--retain_metric", help="auto: an alpha whose value fell more than --retain_tolerance below "
                                           "alpha 0's (the base's) is never chosen, e.g. retention/all/nDCG@10")
    p.add_argument("--retain_tolerance", type=float, help="auto: see --retain_metric (default 0)")
    p.add_argument("--grid", help="auto: comma-separated alphas in [0, 1] that include 0 (default 0,0.1,...,1)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# the merge

def tensors(m, skip=()):
    """{"<part>.<name>": tensor} for every parameter and buffer of the encoder and both heads, except the parts
    named in skip. The tensors are the model's own, not copies."""
    return {f"{part}.{n}": t for part in PARTS if part not in skip
            for mods in (getattr(m, part).named_parameters(), getattr(m, part).named_buffers()) for n, t in mods}


def architecture_problem(base, tuned, skip=()):
    """Why base and tuned (M3s) cannot be merged parameter by parameter, or None. Checked: the encoder config's
    ARCH_KEYS, the tensors' names and shapes, and non-float tensors (buffers such as position ids), which must be
    equal because they are copied, not mixed. skip names heads that are taken from tuned as they are."""
    ca, cb = base.encoder.config, tuned.encoder.config
    diff = [f"{k} {getattr(ca, k, None)!r} vs {getattr(cb, k, None)!r}" for k in ARCH_KEYS
            if getattr(ca, k, None) != getattr(cb, k, None)]
    if diff:
        return f"different architectures (base vs tuned encoder config): {'; '.join(diff)}"
    a, b = tensors(base, skip), tensors(tuned, skip)
    only = [f"only in {w}: {', '.join(sorted(set(x) - set(y))[:5])}" for w, x, y in (("base", a, b), ("tuned", b, a))
            if set(x) - set(y)]
    shapes = [f"{n} {tuple(a[n].shape)} vs {tuple(b[n].shape)}" for n in a if n in b and a[n].shape != b[n].shape]
    if only or shapes:
        return f"different architectures (base vs tuned tensors): {'; '.join(only + shapes[:5])}"
    unequal = [n for n in a if not (a[n].is_floating_point() and b[n].is_floating_point()) and
               (a[n].dtype != b[n].dtype or not torch.equal(a[n].cpu(), b[n].cpu()))]
    if unequal:
        return f"non-float tensors differ between base and tuned (they are copied, not mixed): {', '.join(unequal)}"
    return None


def tokenizer_state(tok):
    """What decides how a tokenizer splits text: its vocabulary, special tokens and, for a fast tokenizer, its
    normalizer, pre-tokenizer, model and post-processor (tokenizer.json without the padding and truncation
    settings)."""
    backend = getattr(tok, "backend_tokenizer", None)
    parts = json.loads(backend.to_str()) if backend is not None else {}
    return {"vocabulary": tok.get_vocab(), "special tokens": tok.special_tokens_map,
            **{k: v for k, v in parts.items() if k not in ("version", "padding", "truncation")}}


def tokenizer_problem(base_tok, tuned_tok):
    """Why the two tokenizers differ (the first part that does), or None."""
    a, b = tokenizer_state(base_tok), tokenizer_state(tuned_tok)
    for part in dict.fromkeys([*a, *b]):
        if a.get(part) == b.get(part):
            continue
        if part == "vocabulary":
            va, vb = a[part], b[part]
            diff = sorted(t for t in set(va) | set(vb) if va.get(t) != vb.get(t))  # tokens in one, or other ids
            return (f"different tokenizers: the vocabularies differ ({len(va)} vs {len(vb)} tokens, {len(diff)} not "
                    f"in both with the same id, e.g. {diff[:3]})")
        return f"different tokenizers: their {part} differ"
    return None


def merge(base, tuned, alpha, from_tuned=()):
    """(1 - alpha) * base + alpha * tuned for every tensor of the encoder and both heads -> a new M3 of tuned's kind
    (its config, tokenizer, pooling, dtype). Computed in float64 and cast to tuned's dtype. Alpha 0 and 1 copy base's
    and tuned's tensors exactly. from_tuned: heads taken from tuned as they are (base has none of its own).
    Raises ValueError when the architectures or tokenizers differ."""
    problem = architecture_problem(base, tuned, from_tuned) or tokenizer_problem(base.tokenizer, tuned.tokenizer)
    if problem:
        raise ValueError(problem)
    out = copy.deepcopy(tuned)
    a = tensors(base, from_tuned)
    with torch.no_grad():
        for name, t in tensors(out, from_tuned).items():
            if not t.is_floating_point() or alpha == 1:
                continue  # tuned's own: equal to base's (architecture_problem), or all of tuned at alpha 1
            x = a[name].to(t.device)
            t.copy_(x if alpha == 0 else torch.lerp(x.double(), t.double(), float(alpha)))  # copy_ casts to t's dtype
    return out


# ----------------------------------------------------------------------------------------------------------------
# checks, before anything is loaded; loading

def parse_alpha(text):
    """--alpha: a number in [0, 1] or "auto"."""
    if text == "auto":
        return text
    try:
        alpha = float(text)
    except ValueError:
        alpha = None
    if alpha is None or not 0 <= alpha <= 1:  # NaN fails the comparison too
        stop(f"--alpha {text!r}: expected a number in [0, 1] (the tuned model's share: 0 = --base, 1 = --tuned) "
             "or auto (with --eval_sets and --select_metric)")
    return alpha


def parse_grid(text):
    """--grid: comma-separated alphas in [0, 1], 0 among them -> sorted, without repeats. Alpha 0 comes first because
    it is the base: the retention guard compares every alpha with it, and choose() gives a tie to the earlier
    (smaller) alpha."""
    if text is None:
        return GRID
    try:
        grid = [float(x) for x in text.split(",")]
    except ValueError:
        stop(f"--grid {text!r}: expected comma-separated numbers, e.g. 0,0.25,0.5,0.75,1")
    if not all(0 <= g <= 1 for g in grid) or 0 not in grid or len(set(grid)) < 2:
        stop(f"--grid {text!r}: expected at least two alphas in [0, 1], 0 among them (alpha 0 is the base: the "
             "retention guard compares every alpha with it)")
    return sorted(set(grid))


def auto_options(a):
    """--alpha auto's options checked and read -> (eval sets, grid). Metric keys are checked against the sets before
    any model is loaded. A number for --alpha refuses them."""
    given = [f"--{k}" for k in ("eval_sets", "select_metric", "retain_metric", "retain_tolerance", "grid")
             if getattr(a, k) is not None]
    if a.alpha != "auto":
        if given:
            stop(f"{', '.join(given)}: only with --alpha auto (--alpha {a.alpha} merges at that alpha)")
        return None, None
    missing = [f"--{k}" for k in ("eval_sets", "select_metric") if not getattr(a, k)]
    if missing:
        stop(f"--alpha auto needs {' and '.join(missing)}: it picks alpha by --select_metric on --eval_sets")
    if a.retain_tolerance is not None and not (a.retain_metric and 0 <= a.retain_tolerance < float("inf")):
        stop(f"--retain_tolerance {a.retain_tolerance}: a number >= 0, with --retain_metric (whose fall it bounds)")
    sets = selection.read_sets(a.eval_sets)
    for option in ("select_metric", "retain_metric"):
        value = getattr(a, option)
        problem = value and selection.metric_problem(value, sets)
        if problem:
            stop(f"--{option} {value}: {problem} (the sets of --eval_sets {a.eval_sets})")
    return sets, parse_grid(a.grid)


def out_error(out, inputs):
    """Why --out must not be written, or None. Refused: the folder or a subfolder of an input, a file, a folder
    that holds a training run or anything else, a place that cannot be written. inputs: [(option, path)]."""
    real = os.path.realpath(out)
    for option, path in inputs:
        try:
            folder = resolve(path)
        except OSError:  # a bundled name whose package is missing: heads_in says so
            continue
        if os.path.isdir(folder) and (real + os.sep).startswith(os.path.realpath(folder) + os.sep):
            return (f"--out {out} is {option} {path} or lies inside it: the merge would write into a model it reads; "
                    "choose a new folder")
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out} is a file, not a folder"
    held = sorted(os.listdir(out)) if os.path.isdir(out) else []
    run = sorted(run_files(out)) if held else []
    if run:
        return (f"--out {out} holds a training run ({', '.join(run[:6])}): merge.py writes a new folder and never "
                "mixes its files with a run's; choose another --out")
    if held:
        return (f"--out {out} is not empty (it holds {', '.join(held[:6])}{' ...' if len(held) > 6 else ''}): "
                "choose a new folder")
    return writable_error(out, f"--out {out}")


def heads_in(path, option):
    """The heads whose files the checkpoint at path (dir, hub or bundled name) has; stops if there is no such
    model folder or hub name."""
    try:
        folder = resolve(path)
        return [name for name, fname in HEAD_FILES.items() if find_file(folder, fname)]
    except (OSError, ValueError) as e:  # a missing folder, a name the hub refuses
        stop(f"{option} {path}: {e}")


def where(path):
    """A note for a path that is no local folder (it was looked up as a hub name: a typo?), else ""."""
    try:
        return "" if os.path.isdir(resolve(path)) else " (a hub name: no local folder has this name)"
    except OSError:
        return ""


def load(path, option, new_heads=False):
    """The M3 at path in the dtype it was saved in (encoder and head files alike), so a merge changes no precision.
    new_heads: the heads path lacks start new (merge() then takes them from --tuned)."""
    try:
        m = M3.from_pretrained(path, new_heads=new_heads, dtype="auto")
        for name, fname in HEAD_FILES.items():  # from_pretrained casts heads to float32: reload in the file's dtype
            f = find_file(resolve(path), fname)
            if f:
                state = load_head(f)
                getattr(m, name).to(state["weight"].dtype).load_state_dict(state)
    except (OSError, ValueError) as e:
        stop(f"{option} {path}: not loadable: {e}")
    return m.eval()


def prompts_of(path):
    """The query/passage prompts a checkpoint records (config_sentence_transformers.json), {} when none."""
    f = find_file(resolve(path), "config_sentence_transformers.json")
    return st_prompts(os.path.dirname(f)) if f else {}


# ----------------------------------------------------------------------------------------------------------------
# --alpha auto, writing, the command line

def choose_alpha(base, tuned, from_tuned, sets, grid, prompts, select_metric, retain_metric, retain_tolerance):
    """Evaluate merge(base, tuned, alpha) at every alpha of grid, in memory, and pick one by selection.choose.
    Each merge is evaluated as eval.py would evaluate it once written: in float32, on the inference device.
    Returns (the chosen alpha, the records, one per alpha, each with its "barred" reason or "")."""
    records = []
    for alpha in grid:
        model = merge(base, tuned, alpha, from_tuned).to(inference_device(), torch.float32)
        rec = {"alpha": alpha, **selection.evaluate_sets(model, sets, prompts.get("query", ""),
                                                         prompts.get("passage", ""))}
        records.append(rec)
        del model
        print(f"alpha {alpha:g} ({rec['eval_s']:.0f} s) | {selection.summary(rec, sets)}", flush=True)
    best, barred = selection.choose(records, select_metric, retain_metric or "", retain_tolerance or 0.0)
    for rec, why in zip(records, barred):
        rec["barred"] = why
    print("\n".join(table(records, best, select_metric, retain_metric)))
    return records[best]["alpha"], records


def table(records, best, select_metric, retain_metric):
    """The lines of the table --alpha auto chose from: a header, then per alpha the alpha, the select and retain
    metrics, and "chosen" or why it may not be chosen."""
    cols = [select_metric] + ([retain_metric] if retain_metric else [])
    lines = ["alpha   " + "  ".join(cols)]
    for i, r in enumerate(records):
        note = "chosen" if i == best else f"barred: {r['barred']}" if r["barred"] else ""
        lines.append((f"{r['alpha']:<6g}  " + "  ".join(f"{r[c]:<{len(c)}.4f}" for c in cols) + f"  {note}").rstrip())
    return lines


def write(model, out, prompts, record):
    """model's release layout + merge.json (record) in a temporary folder next to out, renamed to out when complete:
    a failure (a full disk) leaves no --out."""
    final = os.path.abspath(out)
    tmp = os.path.join(os.path.dirname(final), f".tmp-merge-{os.path.basename(final)}-{os.getpid()}")
    try:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        model.save_pretrained(tmp, prompts=prompts)
        with open(os.path.join(tmp, "merge.json"), "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, final)  # out is absent or an empty folder (out_error)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        stop(f"--out {out}: not written ({str(e).splitlines()[0]}): disk full or not writable; nothing was left there")


def main(argv=None):
    """The command line above."""
    a = parser().parse_args(sys.argv[1:] if argv is None else argv)
    a.alpha = parse_alpha(a.alpha)
    sets, grid = auto_options(a)
    error = out_error(a.out, [("--base", a.base), ("--tuned", a.tuned)])
    if error:
        stop(error)
    base_heads, tuned_heads = heads_in(a.base, "--base"), heads_in(a.tuned, "--tuned")
    missing = [HEAD_FILES[h] for h in HEAD_FILES if h not in tuned_heads]
    if missing:
        also = [HEAD_FILES[h] for h in base_heads if h not in tuned_heads]
        stop(f"--tuned {a.tuned}{where(a.tuned)}: no {' / '.join(missing)}" +
             (f" (--base {a.base} has {' / '.join(also)})" if also else "") + ": the merged model is --tuned's "
             "kind, heads included: --tuned must be a whole M3 checkpoint (a training run's final or best)")
    from_tuned = [h for h in HEAD_FILES if h not in base_heads]
    base, tuned = load(a.base, "--base", new_heads=bool(from_tuned)), load(a.tuned, "--tuned")
    problem = architecture_problem(base, tuned, from_tuned) or tokenizer_problem(base.tokenizer, tuned.tokenizer)
    if problem:
        stop(f"--base {a.base} and --tuned {a.tuned} cannot be merged: {problem}")
    for h in from_tuned:
        print(f"--base {a.base} has no {HEAD_FILES[h]}: the merged {h} is --tuned's as it is (alpha does not apply)")
    prompts, base_prompts = prompts_of(a.tuned), prompts_of(a.base)
    if find_file(resolve(a.base), "m3.json") and base.pooling != tuned.pooling:
        print(f"--base pools with {base.pooling}, --tuned with {tuned.pooling}: the merged model uses "
              f"{tuned.pooling} (--tuned's kind)")
    if base_prompts and base_prompts != prompts:
        print(f"--base's prompts {base_prompts} differ from --tuned's {prompts}: the merged model keeps --tuned's")
    record = {"base": a.base, "tuned": a.tuned, "alpha": a.alpha, "heads_from_tuned": from_tuned}
    if a.alpha == "auto":
        record["alpha"], records = choose_alpha(base, tuned, from_tuned, sets, grid, prompts, a.select_metric,
                                                a.retain_metric, a.retain_tolerance)
        record["auto"] = {"eval_sets": sets, "select_metric": a.select_metric, "retain_metric": a.retain_metric or "",
                          "retain_tolerance": a.retain_tolerance or 0.0, "grid": grid, "table": records}
    write(merge(base, tuned, record["alpha"], from_tuned), a.out, prompts, record)
    print(f"{a.out}: (1 - {record['alpha']:g}) x --base {a.base} + {record['alpha']:g} x --tuned {a.tuned}")
    return record


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
