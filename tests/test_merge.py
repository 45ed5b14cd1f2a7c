"""merge.py: alpha 0 and 1 reproduce the inputs bit for bit, 0.5 is the mean (float64), heads new in the tuned model
are taken from it, bad inputs stop before writing anything, and --alpha auto chooses by selection.choose from the
table it prints (retention guard included) and writes merge(base, tuned, chosen alpha)."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import merge as mg
import selection
from model import HEAD_FILES, M3
from search import METRICS, ROWS
from st_layout import prompts as st_prompts
from test_eval import write_beir
from tiny import make_encoder, make_tokenizer, run, tiny_m3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = {"query": "query: ", "passage": "passage: "}  # the tuned model's: the merged model keeps them


def save(m, path, dtype=torch.float32, prompts=None):
    m.to(dtype).save_pretrained(path, prompts=prompts)
    return str(path)


def pair(d, dtype=torch.float32):
    """A (seed 0, cls pooling, no prompts) and B (seed 3, mean pooling, PROMPTS) saved under d: every tensor differs
    (B's layer norms and constant biases too: as after training)."""
    b = tiny_m3(seed=3)
    b.pooling = "mean"
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return save(tiny_m3(seed=0), d / "A", dtype), save(b, d / "B", dtype, PROMPTS)


def saved(path):
    """Every tensor a checkpoint folder stores: the encoder's safetensors and both head files."""
    out = {f"encoder.{k}": v for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    for head, fname in HEAD_FILES.items():
        f = os.path.join(path, fname)
        if os.path.exists(f):
            out.update({f"{head}.{k}": v for k, v in torch.load(f, weights_only=True).items()})
    return out


def assert_same(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def sets_file(d, names=("dev",)):
    """A tiny BEIR folder and an eval_sets YAML naming it once per name (split test: write_beir's)."""
    write_beir(str(d / "data"), np.random.default_rng(0))
    with open(d / "sets.yaml", "w") as f:
        yaml.safe_dump({n: {"data": str(d / "data"), "split": "test"} for n in names}, f)
    return str(d / "sets.yaml")


# ----------------------------------------------------------------------------------------------------------------
# the merge's arithmetic

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_0_and_1_reproduce_the_inputs_bit_for_bit(tmp_path, dtype):
    A, B = pair(tmp_path, dtype)
    a, b = saved(A), saved(B)
    assert all(not torch.equal(a[k], b[k]) for k in a)  # every tensor differs: the test can tell them apart
    for alpha, want in ((0, a), (1, b)):
        out = str(tmp_path / f"out{alpha}")
        rec = mg.main(["--base", A, "--tuned", B, "--alpha", str(alpha), "--out", out])
        assert_same(saved(out), want)  # encoder and both heads, in the inputs' dtype
        m = M3.from_pretrained(out)
        assert m.pooling == "mean" and st_prompts(out) == PROMPTS  # the tuned model's kind
        assert rec == json.load(open(os.path.join(out, "merge.json"))) and rec["alpha"] == alpha
        assert m.encode(["the cell"])["dense"].shape == (1, 32)


def test_alpha_half_is_the_mean_float64(tmp_path, capsys):
    A, B = pair(tmp_path, torch.float64)
    out = str(tmp_path / "C")
    os.makedirs(out)  # an empty folder is a new one
    mg.main(["--base", A, "--tuned", B, "--alpha", "0.5", "--out", out])
    a, b, c = saved(A), saved(B), saved(out)
    assert c.keys() == a.keys()
    for k in a:
        assert c[k].dtype == torch.float64
        torch.testing.assert_close(c[k], (a[k] + b[k]) / 2, rtol=1e-15, atol=1e-16)
    assert json.load(open(os.path.join(out, "merge.json")))["alpha"] == 0.5
    assert "pools with cls, --tuned with mean" in capsys.readouterr().out  # the pooling that differs is said
    M3.from_pretrained(out)
    # merge() in memory, at another alpha: (1 - alpha) base + alpha tuned, tensor by tensor
    x, y = tiny_m3(seed=0).double(), tiny_m3(seed=3).double()
    z = mg.merge(x, y, 0.25)
    tx, ty = mg.tensors(x), mg.tensors(y)
    for k, t in mg.tensors(z).items():
        if t.is_floating_point():
            torch.testing.assert_close(t, 0.75 * tx[k] + 0.25 * ty[k], rtol=1e-15, atol=1e-16)
        else:
            assert torch.equal(t, ty[k])


def test_non_float_tensors_must_be_equal(tmp_path):
    x, y = tiny_m3(seed=0), tiny_m3(seed=3)
    y.encoder.embeddings.position_ids += 1
    with pytest.raises(ValueError, match="non-float tensors differ.*encoder.embeddings.position_ids"):
        mg.merge(x, y, 0.5)


# ----------------------------------------------------------------------------------------------------------------
# heads

def test_head_absent_in_base_is_taken_from_tuned(tmp_path, capsys):
    m = tiny_m3(seed=0).double()
    m.encoder.save_pretrained(tmp_path / "bare")
    m.tokenizer.save_pretrained(tmp_path / "bare")
    A, B = str(tmp_path / "bare"), save(tiny_m3(seed=3), tmp_path / "B", torch.float64, PROMPTS)
    out = str(tmp_path / "C")
    rec = mg.main(["--base", A, "--tuned", B, "--alpha", "0.5", "--out", out])
    said = capsys.readouterr().out
    for head, fname in HEAD_FILES.items():
        assert f"--base {A} has no {fname}: the merged {head} is --tuned's as it is" in said
    a, b, c = saved(A), saved(B), saved(out)
    for k in b:
        if k.startswith("encoder."):
            torch.testing.assert_close(c[k], (a[k] + b[k]) / 2, rtol=1e-15, atol=1e-16)
        else:  # both heads: B's, bit for bit
            assert torch.equal(c[k], b[k]), k
    assert rec["heads_from_tuned"] == list(HEAD_FILES)


def test_head_absent_in_tuned_stops(tmp_path):
    A, B = pair(tmp_path)
    shutil.copytree(B, tmp_path / "B1")
    os.remove(tmp_path / "B1" / "sparse_linear.pt")
    m = tiny_m3(seed=3)
    m.encoder.save_pretrained(tmp_path / "bare")
    m.tokenizer.save_pretrained(tmp_path / "bare")
    for tuned, said in ((str(tmp_path / "B1"), "no sparse_linear.pt (--base"),
                        (str(tmp_path / "bare"), "no colbert_linear.pt / sparse_linear.pt (--base")):
        with pytest.raises(SystemExit) as e:
            mg.main(["--base", A, "--tuned", tuned, "--alpha", "0.5", "--out", str(tmp_path / "C")])
        assert f"--tuned {tuned}: {said}" in str(e.value.code) and "whole M3 checkpoint" in str(e.value.code)
        assert not os.path.exists(tmp_path / "C")


# ----------------------------------------------------------------------------------------------------------------
# bad inputs: a clear message, nothing written

def other_tuned(d, kind):
    """A tuned model that cannot be merged with pair()'s A."""
    if kind == "tokenizer":  # as many tokens, other ones: the same architecture
        tok = make_tokenizer("bert")
        m = M3(make_encoder(tok, "xlmr"), tok)
    else:
        m = tiny_m3(seed=3, **({"colbert_dim": 16} if kind == "colbert_dim" else {}))
        if kind in ("hidden", "layers"):
            tok = make_tokenizer()
            m = M3(make_encoder(tok, hidden=48 if kind == "hidden" else 32, layers=3 if kind == "layers" else 2), tok)
    return save(m, d / f"B_{kind}")


BAD = [  # (name, extra arguments or a tuned model's kind, what the message says)
    ("hidden", "hidden", "hidden_size 32 vs 48"),
    ("layers", "layers", "num_hidden_layers 2 vs 3"),
    ("colbert_dim", "colbert_dim", "colbert_linear.weight (32, 32) vs (16, 32)"),
    ("tokenizer", "tokenizer", "different tokenizers: the vocabularies differ"),
    ("alpha>1", ["--alpha", "1.5"], "--alpha '1.5': expected a number in [0, 1]"),
    ("alpha<0", ["--alpha", "-0.1"], "--alpha '-0.1': expected a number in [0, 1]"),
    ("alpha text", ["--alpha", "half"], "--alpha 'half': expected a number in [0, 1]"),
    ("alpha nan", ["--alpha", "nan"], "--alpha 'nan': expected a number in [0, 1]"),
    ("auto no sets", ["--alpha", "auto", "--select_metric", "dev/all/nDCG@10"], "--alpha auto needs --eval_sets"),
    ("auto no metric", ["--alpha", "auto", "--eval_sets", "SETS"], "--alpha auto needs --select_metric"),
    ("bad metric", ["--alpha", "auto", "--eval_sets", "SETS", "--select_metric", "dev/all/nDCG@11"],
     "--select_metric dev/all/nDCG@11: 'nDCG@11' is not one of the metrics"),
    ("bad set", ["--alpha", "auto", "--eval_sets", "SETS", "--select_metric", "dev/all/nDCG@10", "--retain_metric",
                 "retention/all/nDCG@10"], "--retain_metric retention/all/nDCG@10: 'retention' is not one of the"),
    ("grid no 0", ["--alpha", "auto", "--eval_sets", "SETS", "--select_metric", "dev/all/nDCG@10", "--grid",
                   "0.5,1"], "0 among them"),
    ("grid > 1", ["--alpha", "auto", "--eval_sets", "SETS", "--select_metric", "dev/all/nDCG@10", "--grid", "0,1.2"],
     "--grid '0,1.2': expected at least two alphas in [0, 1]"),
    ("grid without auto", ["--alpha", "0.5", "--grid", "0,1"], "--grid: only with --alpha auto"),
    ("tolerance alone", ["--alpha", "auto", "--eval_sets", "SETS", "--select_metric", "dev/all/nDCG@10",
                         "--retain_tolerance", "0.01"], "with --retain_metric"),
    ("out holds a run", "run", "holds a training run (config.yaml, final)"),
    ("out not empty", "notes", "is not empty (it holds notes.txt)"),
    ("out is a file", "file", "is a file, not a folder"),
    ("out unwritable", "under a file", "cannot write in"),
    ("out is base", "base", "is --base"),
    ("out inside tuned", "inside", "is --tuned"),
]


@pytest.mark.parametrize("name,how,said", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_stop_and_write_nothing(tmp_path, name, how, said):
    A, B = pair(tmp_path)
    out = str(tmp_path / "C")
    args = ["--alpha", "0.5"]
    if how in ("hidden", "layers", "colbert_dim", "tokenizer"):
        B = other_tuned(tmp_path, how)
    elif how == "run":
        os.makedirs(os.path.join(out, "final"))
        open(os.path.join(out, "config.yaml"), "w").close()
    elif how == "notes":
        os.makedirs(out)
        open(os.path.join(out, "notes.txt"), "w").close()
    elif how == "file":
        open(out, "w").close()
    elif how == "under a file":
        open(out, "w").close()
        out = os.path.join(out, "merged")
    elif how in ("base", "inside"):
        out = A if how == "base" else os.path.join(B, "merged")
    else:
        args = [sets_file(tmp_path) if x == "SETS" else x for x in how]
    before = sorted(os.walk(tmp_path))
    with pytest.raises(SystemExit) as e:
        mg.main(["--base", A, "--tuned", B, "--out", out, *args])
    assert said in str(e.value.code)
    assert sorted(os.walk(tmp_path)) == before  # nothing written: no --out, no temporary folder


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """A failure half-way through writing (a full disk) leaves no --out and no temporary folder."""
    A, B = pair(tmp_path)
    real = M3.save_pretrained

    def half(self, out_dir, prompts=None):
        real(self, out_dir, prompts)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(M3, "save_pretrained", half)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit, match="--out .*C: not written .*No space left"):
        mg.main(["--base", A, "--tuned", B, "--alpha", "0.5", "--out", str(tmp_path / "C")])
    assert sorted(os.listdir(tmp_path)) == before


# ----------------------------------------------------------------------------------------------------------------
# --alpha auto

def printed_table(text, n_cols):
    """The records of the table merge.py printed: [{"alpha", metric columns..., "note"}]."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("alpha   "))
    cols = lines[start].split()[1:]
    assert len(cols) == n_cols
    rows = []
    for line in lines[start + 1:]:
        tok = line.split()
        try:
            float(tok[0])
        except (IndexError, ValueError):  # the table ends
            break
        rows.append({"alpha": float(tok[0]), **dict(zip(cols, map(float, tok[1:1 + n_cols]))),
                     "note": " ".join(tok[1 + n_cols:])})
    return cols, rows


def same_model(out, A, B, alpha):
    """The written model's tensors equal merge(A, B, alpha)'s exactly."""
    want = mg.merge(mg.load(A, "A"), mg.load(B, "B"), alpha)
    got = mg.load(out, "out")
    for k, t in mg.tensors(want).items():
        assert torch.equal(mg.tensors(got)[k], t), k


TABLE = {0: (0.50, 0.800), 0.25: (0.55, 0.799), 0.5: (0.60, 0.797), 0.75: (0.65, 0.790), 1: (0.70, 0.700)}


def test_auto_retention_guard(tmp_path, monkeypatch, capsys):
    """Hand-built metrics per alpha: the best select metric (alpha 1, then 0.75) fell more than the tolerance on
    retention, so alpha 0.5 is chosen; without the guard alpha 1. The fake reads alpha back from the weights it is
    given: each alpha's merge is what gets evaluated."""
    A, B = pair(tmp_path)
    a, b = mg.load(A, "A"), mg.load(B, "B")
    ta, tb = mg.tensors(a), mg.tensors(b)
    seen = []

    @torch.no_grad()
    def fake(model, sets, query_prefix="", passage_prefix=""):
        assert (query_prefix, passage_prefix) == (PROMPTS["query"], PROMPTS["passage"])  # the tuned model's
        assert next(model.parameters()).dtype == torch.float32
        tm = mg.tensors(model)
        num = sum(((tm[k].double() - ta[k].double()) * (tb[k].double() - ta[k].double())).sum() for k in ta
                  if ta[k].is_floating_point())
        den = sum(((tb[k].double() - ta[k].double()) ** 2).sum() for k in ta if ta[k].is_floating_point())
        alpha = round(float(num / den), 4)
        seen.append(alpha)
        rec = {f"{s}/{row}/{m}": 0.0 for s in sets for row in ROWS for m in METRICS}
        rec["dev/all/nDCG@10"], rec["retention/all/nDCG@10"] = TABLE[alpha]
        return {**rec, "eval_s": 0.0}

    monkeypatch.setattr(selection, "evaluate_sets", fake)
    sets = sets_file(tmp_path, ("dev", "retention"))
    auto = ["--base", A, "--tuned", B, "--alpha", "auto", "--eval_sets", sets, "--select_metric", "dev/all/nDCG@10",
            "--grid", "1,0.5,0,0.25,0.75"]  # unsorted on purpose: evaluated from alpha 0 up
    rec = mg.main(auto + ["--retain_metric", "retention/all/nDCG@10", "--retain_tolerance", "0.005",
                          "--out", str(tmp_path / "C")])
    said = capsys.readouterr().out
    assert seen == [0, 0.25, 0.5, 0.75, 1]
    cols, rows = printed_table(said, 2)
    assert cols == ["dev/all/nDCG@10", "retention/all/nDCG@10"]
    assert [(r["alpha"], r[cols[0]], r[cols[1]]) for r in rows] == [(k, *v) for k, v in TABLE.items()]
    best, barred = selection.choose(rows, *cols, 0.005)
    assert rows[best]["alpha"] == rec["alpha"] == 0.5 and rows[best]["note"] == "chosen"
    assert [bool(w) for w in barred] == [False, False, False, True, True]
    assert [r["note"].startswith("barred: retention/all/nDCG@10 0.7") for r in rows] == [False] * 3 + [True] * 2
    table = json.load(open(tmp_path / "C" / "merge.json"))["auto"]["table"]
    assert [r["alpha"] for r in table] == [0, 0.25, 0.5, 0.75, 1] and table[3]["barred"] == barred[3]
    same_model(str(tmp_path / "C"), A, B, 0.5)
    seen.clear()  # no guard: the highest select metric
    rec = mg.main(auto + ["--out", str(tmp_path / "D")])
    cols, rows = printed_table(capsys.readouterr().out, 1)
    assert rec["alpha"] == 1 and selection.choose(rows, cols[0])[0] == 4 and rows[4]["note"] == "chosen"
    same_model(str(tmp_path / "D"), A, B, 1)


def test_auto_with_real_evaluation(tmp_path):
    """The script on a tiny BEIR set with the real evaluation: the chosen alpha is selection.choose's over the table
    (printed and in merge.json), the written model is merge(A, B, alpha), and evaluating the written folder as
    eval.py would gives the metrics the in-memory evaluation recorded for it."""
    A, B = pair(tmp_path)
    sets = sets_file(tmp_path)
    out = str(tmp_path / "C")
    res = run([sys.executable, "merge.py", "--base", A, "--tuned", B, "--alpha", "auto", "--eval_sets", sets,
               "--select_metric", "dev/all/nDCG@10", "--retain_metric", "dev/dense/nDCG@10", "--retain_tolerance",
               "0.01", "--grid", "0,0.5,1", "--out", out], timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    cols, rows = printed_table(res.stdout, 2)
    record = json.load(open(os.path.join(out, "merge.json")))
    table = record["auto"]["table"]
    assert [r["alpha"] for r in rows] == [r["alpha"] for r in table] == [0, 0.5, 1]
    for r, t in zip(rows, table):
        assert all(abs(r[c] - t[c]) <= 5e-5 for c in cols)
    best, barred = selection.choose(table, *cols, 0.01)
    assert record["alpha"] == table[best]["alpha"] == rows[best]["alpha"] and rows[best]["note"] == "chosen"
    assert [t["barred"] for t in table] == barred
    same_model(out, A, B, record["alpha"])
    again = selection.evaluate_sets(out, yaml.safe_load(open(sets)), PROMPTS["query"], PROMPTS["passage"])
    assert {k: v for k, v in again.items() if k != "eval_s"} == \
        {k: v for k, v in table[best].items() if k not in ("alpha", "barred", "eval_s")}
