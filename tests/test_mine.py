"""mine.py never loses data and never writes a record that cannot train: an existing --out is replaced only with
--overwrite, an output that is an input (by inode: a symlink or hard link counts) or any file of the data folder
being read is refused always, an --out that cannot be written is refused before any encoding; a query without a
positive in the corpus or without a negative in the ranks is left out and said, a range past the passage pool stops."""
import json
import os

import numpy as np
import pytest

import mine
from test_eval import write_beir
from tiny import tiny_m3


@pytest.fixture
def setup(tmp_path):
    tiny_m3().save_pretrained(str(tmp_path / "ck"))
    data = str(tmp_path / "data")
    write_beir(data, np.random.default_rng(6), n_docs=25, n_q=4)
    with open(os.path.join(data, "queries.jsonl"), "a") as f:  # a query whose only relevant doc is not in the corpus
        f.write(json.dumps({"_id": "q_lost", "text": "cell protein"}) + "\n")
    with open(os.path.join(data, "qrels", "test.tsv"), "a") as f:
        f.write("q_lost\td_gone\t1\n")
    return tmp_path, ["--ckpt", str(tmp_path / "ck"), "--data", data, "--split", "test", "--range", "2-10",
                      "--n_neg", "3", "--cache_dir", ""]


def files(folder):
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(folder) for f in fs}


def refused(argv, capsys, msg):
    with pytest.raises(SystemExit):
        mine.main(argv)
    err = capsys.readouterr().err
    assert msg in err, err


def test_an_existing_out_is_replaced_only_with_overwrite(setup, capsys):
    tmp, argv = setup
    out = tmp / "mined.jsonl"
    out.write_text("my earlier records\n")
    refused(argv + ["--out", str(out)], capsys, f"--out {out} exists: pass --overwrite to replace it")
    assert out.read_text() == "my earlier records\n"
    records = mine.main(argv + ["--out", str(out), "--overwrite"])
    assert [json.loads(x) for x in out.read_text().splitlines()] == records and len(records) == 4


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(setup, capsys):
    tmp, argv = setup
    data = argv[argv.index("--data") + 1]
    before = files(data)
    refused(argv + ["--out", os.path.join(data, "corpus.jsonl"), "--overwrite"], capsys, "lies in the data folder")
    refused(argv + ["--out", os.path.join(data, "new.jsonl")], capsys, "lies in the data folder")
    assert files(data) == before
    train = tmp / "train.jsonl"
    train.write_text(json.dumps({"query": "cell", "pos": ["protein gene"], "neg": ["risk"]}) + "\n")
    os.symlink(train, tmp / "link.jsonl")  # the same file under another path
    os.link(train, tmp / "hard.jsonl")
    jsonl = argv[:2] + ["--jsonl", str(train), "--range", "0-2", "--cache_dir", ""]
    for out in ("link.jsonl", "hard.jsonl"):
        refused(jsonl + ["--out", str(tmp / out), "--overwrite"], capsys, f"is the input {train}")
    (tmp / "pool.jsonl").write_text(json.dumps({"text": "gene"}) + "\n")
    os.symlink(tmp / "pool.jsonl", tmp / "pool_link.jsonl")
    refused(jsonl + ["--corpus", str(tmp / "pool.jsonl"), "--out", str(tmp / "pool_link.jsonl"), "--overwrite"], capsys,
            "is the input")
    assert json.loads(train.read_text()) == {"query": "cell", "pos": ["protein gene"], "neg": ["risk"]}
    refused(argv + ["--corpus", str(tmp / "pool.jsonl"), "--out", str(tmp / "m.jsonl")], capsys,
            "--corpus is the passage pool of --jsonl")


def test_an_out_that_cannot_be_written_is_refused_before_any_encoding(setup, capsys, monkeypatch):
    _, argv = setup
    calls = []
    monkeypatch.setattr(mine, "encode_cached", lambda *a, **k: calls.append(1))
    refused(argv + ["--out", "/proc/self/mined.jsonl"], capsys, "cannot write in /proc/self")
    refused(argv + ["--out", str(setup[0])], capsys, "is a folder, not a file")
    assert calls == []


def test_queries_without_a_positive_or_a_negative_are_left_out_and_said(setup, capsys):
    tmp, argv = setup
    records = mine.main(argv + ["--out", str(tmp / "m.jsonl")])
    said = capsys.readouterr().out
    assert "left out 1 of 5 queries with no positive in the corpus (e.g. 'cell protein')" in said
    assert len(records) == 4 and all(r["pos"] and len(r["neg"]) == 3 for r in records)
    only_pos = tmp / "only_pos.jsonl"  # the passage pool is this record's texts: its positives alone
    only_pos.write_text(json.dumps({"query": "data", "pos": ["model", "query"]}) + "\n")
    narrow = mine.main(argv[:2] + ["--jsonl", str(only_pos), "--range", "0-5", "--cache_dir", "",
                                   "--out", str(tmp / "n.jsonl")])
    said = capsys.readouterr().out
    assert "left out 1 of 1 queries with no negative in ranks 0-5 (e.g. 'data')" in said and narrow == []
    assert (tmp / "n.jsonl").read_text() == ""
    assert mine.mine(tiny_m3(), ["q"], [[0, 1]], ["a", "b"], lo=0, hi=2) == [None]
    with pytest.raises(ValueError, match=r"range: 25-30 starts past the passage pool's end \(25 passages\)"):
        mine.mine(tiny_m3(), ["q"], [[0]], [f"p{i}" for i in range(25)], lo=25, hi=30)
