"""What a run reports (logs.py, bench/plot_logs.py), and its instructions: every term the loss returns reaches the
printed line, log.jsonl and TensorBoard with no list to update (a term added by an edit too); the instructions reach
the tokenizer the same way in train.py, eval.py and mine.py; the sparse head's health against a hand-built batch, and
its warning; loss curves to a PNG."""
import contextlib
import io
import json
import os
import sys

import numpy as np
import pytest
import torch

import data
import eval as ev
import logs
import mine
import train
from logs import log_step
from model import M3
from tiny import make_encoder, make_tokenizer, tiny_m3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import plot_logs  # noqa: E402

QUERY, PASSAGE = "the cell", "gene expression"  # in the training data and in the evaluation data alike
PREFIX = {"query": "query: ", "passage": "passage: "}


class Spy:
    """A tokenizer that records every text it is given."""

    def __init__(self, tok, seen):
        self.tok, self.seen = tok, seen

    def __call__(self, texts, *args, **kw):
        self.seen += list(texts)
        return self.tok(texts, *args, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step training run with query/passage prefixes (and TensorBoard when installed) whose loss returns one more
    term than m3_loss's (an edit: 'dummy', monkeypatched), its printed output, the texts its batches tokenized, and a
    BEIR dir whose query and passage are the training data's."""
    d = tmp_path_factory.mktemp("run")
    tiny_m3().save_pretrained(d / "model")
    words = "of and to in is for on with that by as are".split()
    with open(d / "train.jsonl", "w") as f:
        f.write(json.dumps({"query": QUERY, "pos": [PASSAGE], "neg": ["protein data", "mice model"]}) + "\n")
        for i, w in enumerate(words[:5]):
            f.write(json.dumps({"query": f"{w} risk", "pos": [f"{w} study {w}"], "neg": [f"{w} human"]}) + "\n")
    os.makedirs(d / "beir/qrels")
    (d / "beir/corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in
                                                 enumerate([PASSAGE, "protein data", "mice model", "of study"])))
    (d / "beir/queries.jsonl").write_text(json.dumps({"_id": "q0", "text": QUERY}) + "\n")
    (d / "beir/qrels/test.tsv").write_text("q0\td0\t1\n")
    tb = logs.tensorboard_class(missing_ok=True) is not None
    seen, real = [], data.make_batch
    mp = pytest.MonkeyPatch()  # batches made in this process (--num_workers=0), so the spy sees them
    mp.setattr(data, "make_batch", lambda dss, b, tok, *a: real(dss, b, Spy(tok, seen), *a))
    m3_loss = train.m3_loss

    def edited(*a, **kw):  # a new term, as a user would add one to m3_loss's parts
        loss, parts = m3_loss(*a, **kw)
        return loss, {**parts, "dummy": torch.tensor(0.125)}
    mp.setattr(train, "m3_loss", edited)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            train.main([os.path.join(ROOT, "configs/tiny.yaml"), f"--model={d / 'model'}",
                        f"--train_data={d}/train.jsonl",
                        f"--out_dir={d / 'out'}", "--length_ranges=0,64", "--batch_sizes=2", "--max_steps=3",
                        "--head_schedule=dense,sparse,colbert", "--num_workers=0", f"--query_prefix={PREFIX['query']}",
                        f"--passage_prefix={PREFIX['passage']}"] + (["--report_to=tensorboard"] if tb else []))
    finally:
        mp.undo()
    return d, seen, tb, printed.getvalue()


def test_instructions_reach_the_tokenizer_alike_in_train_eval_and_mine(run, monkeypatch):
    d, train_seen, _, _ = run
    seen, real = [], M3.tokenize
    monkeypatch.setattr(M3, "tokenize", lambda self, texts, *a, **kw: seen.extend(texts) or real(self, texts, *a, **kw))
    ckpt = str(d / "out/final")
    ev.main(["--ckpt", ckpt, "--data", str(d / "beir"), "--out", str(d / "eval"), "--cache_dir", ""])  # prefixes:
    eval_seen, seen[:] = list(seen), []  # the checkpoint's own (config_sentence_transformers.json)
    mine.main(["--ckpt", ckpt, "--jsonl", str(d / "train.jsonl"), "--range", "0-3", "--out", str(d / "m.jsonl"),
               "--cache_dir", ""])
    mine_seen = list(seen)
    for where, texts in (("train", train_seen), ("eval", eval_seen), ("mine", mine_seen)):
        assert PREFIX["query"] + QUERY in texts and PREFIX["passage"] + PASSAGE in texts, where
        assert QUERY not in texts and PASSAGE not in texts, where  # never without its instruction
    assert json.loads(open(d / "m.jsonl").readline())["query"] == QUERY  # the mined records keep the bare texts
    seen[:] = []
    ev.main(["--ckpt", ckpt, "--data", str(d / "beir"), "--out", str(d / "eval2"), "--cache_dir", "",
             "--query_prefix", "", "--passage_prefix", "p: "])  # given options win over the checkpoint's
    assert QUERY in seen and "p: " + PASSAGE in seen
    with pytest.raises(SystemExit):
        ev.main(["--ckpt", ckpt, "--data", str(d / "beir"), "--query_instruction_for_retrieval", "q: "])


def test_a_new_loss_term_is_printed_and_in_log_jsonl_with_no_other_edit(run):
    d, _, _, printed = run
    records = [json.loads(x) for x in open(d / "out/log.jsonl")]
    assert [r["step"] for r in records] == [0, 1, 2] and all(r["dummy"] == 0.125 for r in records)
    lines = [x for x in printed.splitlines() if x.startswith("step ")]
    assert len(lines) == 3 and all(" dummy 0.125 " in x for x in lines)
    for x in lines:  # the known terms first, in their order, then the new one, then the accuracy
        assert x.index(" dense ") < x.index(" sparse ") < x.index(" colbert ") < x.index(" ens ") < x.index(" dummy ")
        assert x.index(" dummy ") < x.index(" acc ")


def test_tensorboard_records_the_values_of_log_jsonl_and_the_eval_metrics(run):
    d, _, tb, _ = run
    if not tb:
        pytest.skip("tensorboard is not installed (pip install -r requirements.txt installs it for the tests)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    records = [json.loads(x) for x in open(d / "out/log.jsonl")]
    assert [r["step"] for r in records] == [0, 1, 2]
    res = ev.main(["--ckpt", str(d / "out/final"), "--data", str(d / "beir"), "--out", str(d / "eval_tb"),
                   "--cache_dir", ""])
    acc = EventAccumulator(str(d / "out/tb"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = {k for r in records for k in r if k != "step"}
    assert "dummy" in logged  # the edit's new term, with no list updated
    assert {t[len("train/"):] for t in acc.Tags()["scalars"] if t.startswith("train/")} == logged
    for k in logged:
        got = {e.step: e.value for e in acc.Scalars(f"train/{k}")}
        assert got == {r["step"]: float(np.float32(r[k])) for r in records}, k  # the same values, as float32
    assert 0 < records[-1]["sparse_share"] <= 1 and records[-1]["sparse_q_terms"] > 0
    ev_tag = "eval/beir-test/all/nDCG@10"
    last = acc.Scalars(ev_tag)[-1]  # (the evaluations of the test above are there too)
    assert (last.step, last.value) == (3, float(np.float32(res["rows"]["all"]["nDCG@10"])))  # the final step


def test_lexical_health_on_a_hand_built_batch_and_its_warning(capsys):
    tok = make_tokenizer("xlmr")  # specials: <s>=0 <pad>=1 </s>=2 <unk>=3
    batch = {"q_ids": torch.tensor([[0, 7, 7, 9, 2], [0, 8, 2, 1, 1]]),
             "q_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2]),
             "p_ids": torch.tensor([[0, 5, 6, 3, 2]]), "p_mask": torch.ones(1, 5, dtype=torch.long)}
    q = {"sparse": torch.tensor([[0.0, 0.5, 0.2, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])}  # id 7 twice: one term
    p = {"sparse": torch.tensor([[0.0, 0.1, 0.3, 0.0, 0.0]])}
    h = logs.lexical_health(q, p, batch, M3(make_encoder(tok), tok).special_ids)
    # real tokens: query 1: 7, 7, 9; query 2: 8; passage: 5, 6 (3 is <unk>) -> 6, of which 4 weighted
    assert h["sparse_share"].item() == pytest.approx(4 / 6)
    assert h["sparse_q_terms"].item() == pytest.approx((1 + 0) / 2) and h["sparse_p_terms"].item() == 2
    cfg = train.Config(min_sparse_share=0.7)
    parts = {"dense": torch.tensor(1.0), "sparse": torch.tensor(2.0), **h}
    log_step(cfg, open(os.devnull, "w"), 5, 10, 0, torch.tensor(1.0), parts, 1e-5, 0.1, batch, 1)
    out = capsys.readouterr().out
    assert "sparse nz 0.67 q 0.5 p 2.0 terms" in out and "warning: step 5: only 66.7% of real tokens" in out
    log_step(train.Config(min_sparse_share=0.5), open(os.devnull, "w"), 6, 10, 0, torch.tensor(1.0), parts, 1e-5, 0.1,
             batch, 1)
    assert "warning" not in capsys.readouterr().out
    del parts["sparse"]  # the sparse head not trained this step (warm-up's first epoch): no warning
    log_step(cfg, open(os.devnull, "w"), 7, 10, 0, torch.tensor(1.0), parts, 1e-5, 0.1, batch, 1)
    assert "warning" not in capsys.readouterr().out


def test_plot_logs_reads_every_record_and_draws_a_png(tmp_path, monkeypatch):
    logs = []
    for name, scale in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        recs = [{"step": s, "sparse_share": 0.5, "loss": scale / (s + 1), "lr": 1e-5} for s in range(4)]
        recs[2]["dummy"] = 1.0  # a term only some records have (an edit's, or a head switched on later)
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 4, "lo')
        logs.append(str(tmp_path / name / "log.jsonl"))
    s = plot_logs.read_log(logs[1])
    assert s["loss"] == ([0, 1, 2, 3], [2.0, 1.0, 2 / 3, 0.5]) and set(s) == {"loss", "sparse_share", "lr", "dummy"}
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="needs matplotlib: pip install matplotlib"):
        plot_logs.plot(logs, str(tmp_path / "x.png"))
    monkeypatch.undo()
    pytest.importorskip("matplotlib", reason="pip install -r requirements.txt installs it for the tests")
    plot_logs.main(logs + ["--out", str(tmp_path / "c.png"), "--keys", "loss,sparse_share,colbert"])
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_logs.plot(logs, str(tmp_path / "d.png")) == ["loss", "sparse_share", "dummy"]  # every term, no list
