"""Fine-tuning without regret (selection.py, train.py's eval_every ... retain_tolerance): evaluating changes nothing
of training (one process and 2-process gloo DDP), the logged metrics are eval.py's on the saved checkpoint, best is
the best logged step's weights, early stopping and the retention guard follow selection.choose, a resume after a kill
between an evaluation and the next checkpoint logs every evaluation once, bad options stop before anything is
written."""
import json
import os
import random
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

import selection
import train
from test_eval import write_beir
from test_train import ROOT, common, launch
from tiny import run as run_cmd
from tiny import run_inputs

TIMING = ("ms", "tok_s", "samples_s")  # wall-clock fields of a step record


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny saved M3, 40 examples (d/long.jsonl) and a tiny BEIR folder (d/beir, split test) in the same words."""
    d = run_inputs(tmp_path_factory.mktemp("finetune"), long=40)
    write_beir(str(d / "beir"), np.random.default_rng(0), n_docs=30, n_q=8)
    return d


def sets(setup):
    return {"dev": {"data": str(setup / "beir"), "split": "test"},
            "ret": {"data": str(setup / "beir"), "split": "test", "max_queries": 3}}


def args(setup, out, *extra):
    return common(setup, out, f"--train_data={setup / 'long.jsonl'}", "--num_workers=0", "--batch_sizes=2", *extra)


def evaluating(setup, every=2, *extra):
    return [f"--eval_every={every}", f"--eval_sets={json.dumps(sets(setup))}", *extra]


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    steps = [{k: v for k, v in r.items() if k not in TIMING} for r in recs if "event" not in r]
    return steps, [r for r in recs if r.get("event") == "eval"], recs


# ---------------------------------------------------------------------------------------------- the select rule

def test_choose_equals_a_brute_force_rule():
    rnd = random.Random(0)
    for _ in range(300):
        n = rnd.randint(1, 8)
        recs = [{"s": rnd.choice([0.1, 0.2, 0.3, 0.4]), "r": rnd.choice([0.5, 0.6, 0.7])} for _ in range(n)]
        tol = rnd.choice([0.0, 0.1, 0.15])
        for retain in ("", "r"):
            ok = [i for i in range(n) if i == 0 or not retain or recs[i]["r"] >= recs[0]["r"] - tol]
            want = min(ok, key=lambda i: (-recs[i]["s"], i))  # highest, the earliest of equals
            best, barred = selection.choose(recs, "s", retain, tol)
            assert best == want and [i for i in range(n) if not barred[i]] == ok


# ---------------------------------------------------------------------------- evaluation does not change training

@pytest.mark.parametrize("ranks", [0, 2])
def test_the_loss_sequence_is_bit_identical_with_and_without_evaluation(setup, tmp_path, ranks):
    base = ["--max_steps=7"]
    plain = launch(args(setup, tmp_path / "plain", *base), torchrun=ranks)
    ev = launch(args(setup, tmp_path / "eval", *base, *evaluating(setup, 3)), torchrun=ranks)
    for out in (plain, ev):
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    a, _, _ = records(tmp_path / "plain")
    b, evals, _ = records(tmp_path / "eval")
    assert a == b and len(a) == 7  # every loss term, accuracy, lr: bit for bit (JSON floats round-trip)
    assert [r["step"] for r in evals] == [0, 3, 6, 7]  # the start, every 3 steps, the end
    assert all(0 <= r["dev/all/nDCG@10"] <= 1 for r in evals) and len({r["dev/all/nDCG@10"] for r in evals}) > 1
    for name in ("final/model.safetensors", "final/sparse_linear.pt"):
        assert open(tmp_path / "plain" / name, "rb").read() == open(tmp_path / "eval" / name, "rb").read()
    # early stopping under DDP too: dense Recall@1000 over a 30-document corpus never improves (every document is
    # retrieved), so 2 evaluations after the start's the run stops; every rank leaves the loop at the same step
    stop = launch(args(setup, tmp_path / "stop", *base, *evaluating(setup, 2, "--select_metric=dev/dense/Recall@1000",
                                                                    "--early_stop_patience=2")), torchrun=ranks)
    assert stop.returncode == 0, stop.stdout[-3000:] + stop.stderr[-3000:]
    c, evals, recs = records(tmp_path / "stop")
    assert c == a[:4] and [r["step"] for r in evals] == [0, 2, 4] and recs[-1]["event"] == "early_stop"
    assert json.load(open(tmp_path / "stop" / "final" / "train_state.json"))["step"] == 4
    assert json.load(open(tmp_path / "stop" / "best" / "best.json"))["step"] == 0


def test_logged_metrics_are_eval_py_s_and_best_is_the_best_steps_weights(setup, tmp_path):
    out = tmp_path / "run"
    res = launch(args(setup, out, "--max_steps=6", "--save_every=1", "--keep_last=10",
                      *evaluating(setup, 1, "--select_metric=dev/all/nDCG@10")))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _, evals, _ = records(out)
    best, _ = selection.choose(evals, "dev/all/nDCG@10")
    info = json.load(open(out / "best" / "best.json"))
    assert info["step"] == evals[best]["step"] == evals[-1]["best_step"]
    assert info["value"] == evals[best]["dev/all/nDCG@10"]
    ckpt = out / ("final" if info["step"] == 6 else f"step-{info['step']:07d}") if info["step"] else setup / "model"
    for f in ("model.safetensors",):
        a, b = load_file(out / "best" / f), load_file(ckpt / f)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    for f in ("sparse_linear.pt", "colbert_linear.pt"):
        import torch
        a, b = torch.load(out / "best" / f), torch.load(ckpt / f)
        assert all((a[k] == b[k]).all() for k in a)
    # eval.py on a saved checkpoint, as a user runs it (same thread count as training): the logged numbers
    step = 4
    for name, spec in sets(setup).items():
        cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--ckpt", str(out / f"step-{step:07d}"), "--data",
               spec["data"], "--split", "test", "--cache_dir", "", "--out", str(tmp_path / name)] + \
            [f"--max_queries={spec['max_queries']}" for _ in range("max_queries" in spec)]
        r = run_cmd(cmd, 300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        rows = json.load(open(tmp_path / name / "metrics.json"))["rows"]
        logged = next(e for e in evals if e["step"] == step)
        assert {f"{name}/{row}/{m}": v for row, ms in rows.items() for m, v in ms.items()} == \
            {k: v for k, v in logged.items() if k.startswith(name + "/")}


# ------------------------------------------------------------------ early stopping and the retention guard, scripted

def scripted(monkeypatch, values):
    """selection.evaluate_sets returns values[i] ({dev, ret}) at its i-th call: the rule is tested on known numbers."""
    calls = []

    def fake(model, sets, query_prefix="", passage_prefix=""):
        dev, ret = values[len(calls)]
        calls.append(1)
        return {"dev/all/nDCG@10": dev, "ret/all/nDCG@10": ret, "eval_s": 0.0}
    monkeypatch.setattr(selection, "evaluate_sets", fake)
    return calls


def test_early_stopping_after_the_patience_writes_final_and_a_resume_does_nothing(setup, tmp_path, monkeypatch,
                                                                                  capsys):
    scripted(monkeypatch, [(0.5, 0), (0.6, 0), (0.55, 0), (0.6, 0), (0.9, 0), (0.9, 0)])  # best: step 2
    out = tmp_path / "run"
    run = args(setup, out, "--max_steps=12", "--save_every=100", *evaluating(setup, 2, "--select_metric=dev/all/"
                                                                                       "nDCG@10",
                                                                             "--early_stop_patience=2"))
    train.main([os.path.join(ROOT, "configs/tiny.yaml"), *run])
    steps, evals, recs = records(out)
    assert [r["step"] for r in evals] == [0, 2, 4, 6] and len(steps) == 6  # the 2nd evaluation after the best: stop
    assert recs[-1]["event"] == "early_stop" and "early stop at step 6" in capsys.readouterr().out
    state = json.load(open(out / "final" / "train_state.json"))
    assert state["step"] == 6 and state["stopped"] == recs[-1]["reason"]
    assert json.load(open(out / "best" / "best.json"))["step"] == 2
    before = {f: os.path.getmtime(out / "final" / f) for f in os.listdir(out / "final")}
    train.main([os.path.join(ROOT, "configs/tiny.yaml"), *run, "--resume=auto"])
    assert "nothing to do, the run stopped early" in capsys.readouterr().out
    assert records(out)[2] == recs and before == {f: os.path.getmtime(out / "final" / f) for f in before}


def test_the_retention_guard_never_selects_weights_below_the_tolerance(setup, tmp_path, monkeypatch):
    # step 2 is best on dev, but its retention fell 0.1 below the start's (tolerance 0.05): step 4 is selected
    scripted(monkeypatch, [(0.5, 0.8), (0.7, 0.7), (0.6, 0.76), (0.55, 0.9)])
    out = tmp_path / "run"
    train.main([os.path.join(ROOT, "configs/tiny.yaml"), *args(
        setup, out, "--max_steps=6", "--save_every=2", "--keep_last=10",
        *evaluating(setup, 2, "--select_metric=dev/all/nDCG@10", "--retain_metric=ret/all/nDCG@10",
                    "--retain_tolerance=0.05"))])
    assert json.load(open(out / "best" / "best.json"))["step"] == 4
    a, b = load_file(out / "best" / "model.safetensors"), load_file(out / "step-0000004" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    assert [r["best_step"] for r in records(out)[1]] == [0, 0, 4, 4]


# ------------------------------------------------------------------------------------------------------ resume

KILL = """import os, signal, sys
sys.path.insert(0, {root!r})
import logs, runtime, selection, train
def killed(log, writer, rec, line, real=logs.log_record):
    real(log, writer, rec, line)
    if rec.get("event") == "eval" and rec["step"] == 6:  # logged, checkpoint 8 not yet written: a kill
        os.kill(os.getpid(), signal.SIGKILL)
selection.log_record = killed
runtime.run_command(train.main, sys.argv[1:])
"""


def test_a_resume_after_a_kill_between_an_evaluation_and_the_next_checkpoint_logs_every_evaluation_once(setup,
                                                                                                        tmp_path):
    run = lambda out, *extra: [os.path.join(ROOT, "configs/tiny.yaml"), *args(  # noqa: E731
        setup, out, "--max_steps=10", "--save_every=4", *evaluating(setup, 2, "--select_metric=dev/all/nDCG@10"),
        *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = run_cmd([sys.executable, os.path.join(ROOT, "train.py"), *run(tmp_path / "whole")], 300, cwd=ROOT, env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = run_cmd([sys.executable, "-c", KILL.format(root=ROOT), *run(tmp_path / "cut")], 300, cwd=ROOT, env=env)
    assert cut.returncode == -9 and not (tmp_path / "cut" / "step-0000008").exists()
    assert [r["step"] for r in records(tmp_path / "cut")[1]] == [0, 2, 4, 6]
    again = run_cmd([sys.executable, os.path.join(ROOT, "train.py"), *run(tmp_path / "cut", "--resume=auto")], 300,
                    cwd=ROOT, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    (a_steps, a_evals, _), (b_steps, b_evals, _) = records(tmp_path / "whole"), records(tmp_path / "cut")
    assert [r["step"] for r in b_evals] == [0, 2, 4, 6, 8, 10]  # step 4 not again, step 6 once (re-run)
    drop = lambda rs: [{k: v for k, v in r.items() if k != "eval_s"} for r in rs]  # noqa: E731
    assert drop(a_evals) == drop(b_evals) and a_steps == b_steps
    superseded = [json.loads(line) for line in open(tmp_path / "cut" / "log.superseded.jsonl")]
    assert [r["step"] for r in superseded if r.get("event") == "eval"] == [6]
    assert json.load(open(tmp_path / "whole/best/best.json"))["step"] == \
        json.load(open(tmp_path / "cut/best/best.json"))["step"]


# ---------------------------------------------------------------------------------------------------- bad options

def test_bad_evaluation_options_stop_naming_the_key_and_write_nothing(setup, tmp_path):
    out = tmp_path / "never"
    good = sets(setup)
    cases = [
        (evaluating(setup, 2)[1:], r"eval_sets=.*: are evaluated every eval_every steps: set eval_every too"),
        (["--eval_every=2"], r"eval_sets={} \(default\): is empty"),
        (["--eval_every=2", "--eval_sets=dev"], r"eval_sets='dev' \(command line\) is not a dict: expected a mapping"),
        (["--eval_every=2", '--eval_sets={"dev": {"data": "/nowhere"}}'], r"eval_sets.dev.data.*/nowhere: no such"),
        (["--eval_every=2", json.dumps({"dev": {**good["dev"], "split": "dev"}}).join(["--eval_sets=", ""])],
         r"eval_sets.dev.data.*qrels/dev.tsv"),
        (["--eval_every=2", f"--eval_sets={json.dumps({'dev': {**good['dev'], 'max_querys': 3}})}"],
         r"eval_sets.dev.max_querys.*unknown key; the keys are data, split, max_corpus, max_queries"),
        (["--eval_every=2", f"--eval_sets={json.dumps({'dev': {**good['dev'], 'max_queries': 0}})}"],
         r"eval_sets.dev.max_queries.*expected an integer >= 1"),
        (evaluating(setup, 2, "--select_metric=dev/al/nDCG@10"), r"select_metric='dev/al/nDCG@10'.*'al' is not one of"
                                                                 r" the rows: dense, sparse, multi-vector"),
        (evaluating(setup, 2, "--select_metric=test/all/nDCG@10"), r"'test' is not one of the eval_sets: dev, ret"),
        (evaluating(setup, 2, "--select_metric=dev/all/ndcg@10"), r"'ndcg@10' is not one of the metrics: nDCG@10"),
        (evaluating(setup, 2, "--select_metric=dev/all"), r"expected <set>/<row>/<metric>"),
        (evaluating(setup, 2, "--early_stop_patience=2"), r"early_stop_patience=2 .*: counts evaluations without"),
        (evaluating(setup, 2, "--retain_metric=ret/all/nDCG@10"), r"retain_metric=.*guards the choice .* select_metr"),
        (evaluating(setup, 2, "--select_metric=dev/all/nDCG@10", "--retain_tolerance=-0.1"), r"retain_tolerance=-0.1"
                                                                                             r" .*: must be >= 0"),
        (["--eval_every=-1"], r"eval_every=-1 \(command line\): must be >= 0")]
    for extra, msg in cases:
        with pytest.raises(SystemExit, match=msg):
            train.main([os.path.join(ROOT, "configs/tiny.yaml"), *args(setup, out, "--max_steps=2", *extra)])
        assert not out.exists(), extra


def test_retain_metric_on_a_run_without_its_starting_evaluation_stops(setup, tmp_path):
    out = tmp_path / "run"
    cfg = os.path.join(ROOT, "configs/tiny.yaml")
    train.main([cfg, *args(setup, out, "--max_steps=2", "--save_every=2")])
    log = open(out / "log.jsonl").read()
    with pytest.raises(SystemExit, match=r"retain_metric='ret/all/nDCG@10': the starting model's value .* not in"):
        train.main([cfg, *args(setup, out, "--max_steps=4", "--resume=auto", "--resume_changes=true",
                               *evaluating(setup, 2, "--select_metric=dev/all/nDCG@10",
                                           "--retain_metric=ret/all/nDCG@10"))])
    assert open(out / "log.jsonl").read() == log and not (out / "best").exists()


# ------------------------------------------------------------------------------------ bench/finetune.py's data

def test_the_measured_fine_tune_never_trains_or_selects_on_what_it_reports(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import finetune
    finetune.prepare(str(tmp_path))
    qrels = lambda path: [r.split("\t") for r in open(path).read().splitlines()[1:]]  # noqa: E731
    src = os.path.join(ROOT, "data", "scifact")
    dev = {q for q, _, _ in qrels(tmp_path / "scifact/qrels/dev.tsv")}
    train_q = {q for q, _, _ in qrels(os.path.join(src, "qrels/train.tsv"))}
    test_q = {q for q, _, _ in qrels(tmp_path / "scifact/qrels/test.tsv")}
    assert len(dev) == finetune.N_DEV and dev <= train_q and not dev & test_q
    texts = {r["_id"]: r["text"] for r in map(json.loads, open(os.path.join(src, "queries.jsonl")))}
    lines = open(os.path.join(src, "train_mined.jsonl")).readlines()
    kept = open(tmp_path / "train_nodev.jsonl").readlines()
    assert kept == [x for x in lines if json.loads(x)["query"] not in {texts[q] for q in dev}]  # in order, whole
    assert len(lines) - len(kept) == len(dev)
    halves = [qrels(tmp_path / f"xquad-en/qrels/{s}.tsv") for s in ("retention", "report")]
    paragraphs = [{d.split("-")[1] for _, d, _ in h} for h in halves]
    assert not paragraphs[0] & paragraphs[1] and abs(len(paragraphs[0]) - len(paragraphs[1])) <= 1
    assert sorted(halves[0] + halves[1]) == sorted(qrels(tmp_path / "xquad-en/qrels/test.tsv"))
