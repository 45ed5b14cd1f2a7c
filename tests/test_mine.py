"""mine.py never loses data and never writes a record that cannot train: an existing --out is replaced only with
--overwrite, an output that is an input (by inode: a symlink or hard link counts) or any file of the data folder
being read is refused always, an --out that cannot be written is refused before any encoding; a query without a
positive in the corpus or without a negative in the ranks is left out and said, a range past the passage pool stops.
Positive-aware mining drops what a loop over the rules drops (ties, several positives, a positive not retrieved) and
counts it; teacher scores are a direct forward of the cross-encoder, resume byte for byte after a kill, and train with
teacher_kd; bad options and teachers stop before anything is written."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers import XLMRobertaForSequenceClassification

import mine
from teacher import without_scores
from test_eval import write_beir
from tiny import make_encoder, make_tokenizer, tiny_m3, write_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_queries_without_a_positive_are_left_out_and_without_a_negative_kept_and_said(setup, capsys):
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
    assert "kept 1 of 1 queries with fewer than 7 negatives, 1 with none (training borrows" in said
    assert narrow == [{"query": "data", "pos": ["model", "query"], "neg": []}]
    scored = mine.main(argv[:2] + ["--jsonl", str(only_pos), "--range", "0-5", "--cache_dir", "", "--scores",
                                   "--out", str(tmp / "s.jsonl")])
    said = capsys.readouterr().out  # teacher_kd cannot train a borrowed negative: left out
    assert "left out 1 of 1 queries with no negative in ranks 0-5 (--scores: a borrowed one" in said and scored == []
    assert (tmp / "s.jsonl").read_text() == ""
    assert mine.mine(tiny_m3(), ["q"], [[0, 1]], ["a", "b"], lo=0, hi=2, scores=True) == [None]
    with pytest.raises(ValueError, match=r"range: 25-30 starts past the passage pool's end \(25 passages\)"):
        mine.mine(tiny_m3(), ["q"], [[0]], [f"p{i}" for i in range(25)], lo=25, hi=30)


# ----------------------------------------------------------------------------- positive-aware mining


def loop_filter(cand, pos, R, M):
    """The rules one candidate at a time in Python floats: p the lowest positive; ratio drops s >= R p (p > 0; for
    p <= 0: s >= p), margin drops s > p - M; a rule that is None drops nothing."""
    p = min(pos)
    ratio = [R is not None and s >= (R * p if p > 0 else p) for s in cand]
    margin = [M is not None and s > p - M for s in cand]
    return ratio, margin


def test_positive_aware_equals_a_loop_over_hand_built_scores():
    below = np.nextafter(0.375, 0)
    cand = [0.375, below, 0.5, 0.625, 0.8, 0.0, -0.25]  # 0.375 = 0.75 x 0.5 exactly; 0.625: between the positives
    ratio, margin = mine.positive_aware(np.array(cand), np.array([0.75, 0.5]), 0.75, 0.125)
    assert ratio.tolist() == [True, False, True, True, True, False, False]  # a tie at exactly R x p is dropped
    assert margin.tolist() == [False, False, True, True, True, False, False]  # a tie at exactly p - M is kept
    assert [m.tolist() for m in mine.positive_aware(np.array(cand), np.array([0.5]), None, None)] == [[False] * 7] * 2
    rng, ties, nonpositive = np.random.default_rng(0), 0, 0
    for _ in range(400):  # multiples of 1/16 and dyadic R, M: every product exact, ties frequent
        cand, pos = rng.integers(-16, 17, rng.integers(0, 12)) / 16, rng.integers(-4, 17, rng.integers(1, 4)) / 16
        R, M = rng.choice([None, 0.25, 0.5, 0.75, 1.0]), rng.choice([None, 0.0, 0.125, 0.5])
        got = mine.positive_aware(cand, pos, R, M)
        assert [g.tolist() for g in got] == list(loop_filter(cand.tolist(), pos.tolist(), R, M)), (cand, pos, R, M)
        p = pos.min()
        ties += R is not None and p > 0 and bool((cand == R * p).any())
        nonpositive += R is not None and p <= 0 and len(cand) > 0
    assert ties > 10 and nonpositive > 20  # the cases the loop is there for did occur
    for bad in (dict(max_pos_ratio=0), dict(max_pos_ratio=1.5), dict(min_margin=-0.1), dict(max_pos_ratio=np.nan)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            mine.mine(tiny_m3(), ["q"], [[0]], ["p", "r"], lo=0, hi=2, **bad)


@pytest.fixture
def bag_of_words(tmp_path, monkeypatch):
    """mine.main over test_eval's FakeM3 (varied dense scores, from -0.3 to 1): 40 passages, 6 queries whose positives
    sit at chosen dense ranks, one with two positives, two whose positive is not in the fused top 15; and D, the
    queries' float64 dense scores with every passage."""
    from test_eval import WORDS, FakeM3
    fake = FakeM3()
    monkeypatch.setattr(mine, "model_loader", lambda model, need_key: ((lambda: fake), None, {}))
    rng = np.random.default_rng(3)
    passages = list(dict.fromkeys(" ".join(rng.choice(WORDS, 5)) for _ in range(40)))
    queries = [" ".join(rng.choice(WORDS, 3)) for _ in range(6)]
    D = fake.encode(queries)["dense"].astype(np.float64) @ fake.encode(passages)["dense"].astype(np.float64).T
    by_rank = np.argsort(-D, 1)  # (6, 40) passages by dense score
    positives = [[by_rank[0, 2], by_rank[0, 9]], [by_rank[1, 5]], [by_rank[2, -1]], [by_rank[3, 8]],
                 [by_rank[4, 0]], [by_rank[5, 30]]]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in passages))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"query": q, "pos": [passages[j] for j in pos]}) + "\n"
                                                  for q, pos in zip(queries, positives)))
    argv = ["--ckpt", "fake", "--jsonl", str(tmp_path / "train.jsonl"), "--corpus", str(tmp_path / "corpus.jsonl"),
            "--range", "0-15", "--cache_dir", ""]
    return tmp_path, argv, passages, queries, positives, D


def test_positive_aware_mining_keeps_what_the_loop_keeps_and_counts_it(bag_of_words, capsys):
    tmp, argv, passages, queries, positives, D = bag_of_words
    at = {t: j for j, t in enumerate(passages)}
    window = {r["query"]: r["neg"] for r in mine.main(argv + ["--n_neg", "100", "--out", str(tmp / "all.jsonl")])}
    assert [len(window[q]) for q in queries] == [13, 14, 15, 14, 14, 15]  # q2, q5: positive not in the fused top 15
    R, M = 0.85, 0.1  # p < M / (1 - R) = 2/3: the margin is the stricter rule, else the ratio
    filt = ["--max_pos_ratio", str(R), "--min_margin", str(M)]
    kept, count = {}, dict(candidates_in_window=0, dropped_by_ratio=0, dropped_by_margin=0, dropped=0)
    for i, q in enumerate(queries):
        s = [D[i, at[t]] for t in window[q]]
        pos = [D[i, j] for j in positives[i]]
        thresholds = [(R * p if p > 0 else p, p - M) for p in [min(pos)]][0]
        assert min(abs(x - t) for x in s for t in thresholds) > 1e-5  # float32 in mine.py: no near-tie decides
        ratio, margin = loop_filter(s, pos, R, M)
        kept[q] = [t for t, r, m in zip(window[q], ratio, margin) if not (r or m)]
        for k, n in zip(count, (len(s), sum(ratio), sum(margin), sum(r or m for r, m in zip(ratio, margin)))):
            count[k] += n
        if i == 0:  # two positives: the lower one sets the threshold
            assert kept[q] != [t for t, r, m in zip(window[q], *loop_filter(s, [max(pos)], R, M)) if not (r or m)]
    assert 0 < count["dropped_by_ratio"] < count["dropped"] and 0 < count["dropped_by_margin"] < count["dropped"]
    assert kept[queries[2]] == [] and kept[queries[5]] == []  # unretrieved positives: scored exactly, every one drops
    got = {r["query"]: r["neg"] for r in mine.main(argv + filt + ["--n_neg", "100", "--out", str(tmp / "f.jsonl")])}
    assert got == kept  # in rank order; a query left without a negative is kept (training borrows negatives)
    said = capsys.readouterr().out
    assert (f"positive-aware: of {count['candidates_in_window']} candidates in ranks 0-15, dropped "
            f"{count['dropped_by_ratio']} by --max_pos_ratio, {count['dropped_by_margin']} by --min_margin "
            f"({count['dropped']} in all)") in said
    n_kept = [len(kept[q]) for q in queries]
    assert sorted(n_kept)[1] == 0 and any(0 < n < 5 for n in n_kept) and any(n >= 5 for n in n_kept)
    for drop_short in (False, True):
        out = tmp / f"short{drop_short}.jsonl"
        recs = mine.main(argv + filt + ["--n_neg", "5", "--out", str(out)] + ["--drop_short"] * drop_short)
        written = [q for q, n in zip(queries, n_kept) if n >= (5 if drop_short else 0)]
        assert [r["query"] for r in recs] == written
        for r in recs:  # drawn from the kept ones, in rank order
            assert len(r["neg"]) == min(5, len(kept[r["query"]])) and r["neg"] == [t for t in kept[r["query"]]
                                                                                    if t in r["neg"]]
        stats = json.loads(open(str(out) + ".stats.json").read())
        assert stats == dict(queries=6, queries_written=len(written), queries_dropped=6 - len(written), **count,
                             queries_short=sum(n < 5 for n in n_kept), range=[0, 15], n_neg=5, score="dense",
                             max_pos_ratio=R, min_margin=M, drop_short=drop_short)
    assert [r["neg"] for r in recs] == [r["neg"] for r in mine.main(argv + filt + [
        "--n_neg", "5", "--out", str(tmp / "x.jsonl")]) if r["query"] in written]  # the same draws
    from jsonl_index import training_files  # a folder of mined files trains without its stats files
    assert [f for f, _ in training_files(str(tmp))] == sorted(str(f) for f in tmp.glob("*.jsonl"))


def test_bad_filter_options_stop_and_write_nothing(bag_of_words, capsys):
    tmp, argv, *_ = bag_of_words
    out = tmp / "m.jsonl"
    R, M = "R with 0 < R <= 1", "M >= 0"
    for opt, value, msg in (("--max_pos_ratio", "0", R), ("--max_pos_ratio", "1.01", R), ("--max_pos_ratio", "-0.5", R),
                            ("--max_pos_ratio", "nan", R), ("--min_margin", "-0.01", M), ("--min_margin", "inf", M)):
        refused(argv + [opt, value, "--out", str(out)], capsys, f"{opt}: expected a number {msg}")
    assert sorted(os.listdir(tmp)) == ["corpus.jsonl", "train.jsonl"]
    (tmp / "m.jsonl.stats.json").write_text("an earlier run's counts\n")
    refused(argv + ["--out", str(out)], capsys, f"--out's stats file {out}.stats.json exists: pass --overwrite")
    assert not out.exists() and (tmp / "m.jsonl.stats.json").read_text() == "an earlier run's counts\n"


# ----------------------------------------------------------------------------- teacher scores from a cross-encoder


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (several fight over a shared machine's cores); a killed run and its
    resumption use one thread alike."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cross_encoder(path, num_labels=1, seed=3):
    """A tiny random XLM-R cross-encoder in float64 (scores spread by a wide initialisation), saved to path."""
    tok = make_tokenizer()
    cfg = make_encoder(tok).config
    cfg.num_labels, cfg.initializer_range = num_labels, 0.5
    torch.manual_seed(seed)
    model = XLMRobertaForSequenceClassification(cfg).double().eval()
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return model, tok


def training_file(path, n, seed=0):
    """n training lines of tiny.write_examples; line 1 with a prompt, line 2 with another field and old scores, line 3
    with two positives."""
    write_examples(path, n, seed)
    recs = [json.loads(x) for x in open(path)]
    recs[0]["prompt"] = "Represent the question: "
    recs[1].update(id=7, pos_scores=[9.0], neg_scores=[1, 2, 3])
    recs[2]["pos"].append("mice data model")
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def test_teacher_scores_equal_a_direct_forward_and_train_with_teacher_kd(tmp_path, one_thread, capsys):
    model, tok = cross_encoder(tmp_path / "ce")
    recs = training_file(tmp_path / "in.jsonl", 7)
    out = tmp_path / "out.jsonl"
    mine.main(["--teacher", str(tmp_path / "ce"), "--jsonl", str(tmp_path / "in.jsonl"), "--out", str(out),
               "--query_prefix", "query: ", "--passage_prefix", "passage: ", "--batch_size", "5"])
    got = [json.loads(x) for x in open(out)]
    assert [without_scores(g) for g in got] == [without_scores(r) for r in recs]  # other fields kept

    def forward(q, p):  # one pair, unpadded, float64
        with torch.no_grad():
            return model(**tok(q, p, truncation=True, max_length=512, return_tensors="pt")).logits[0, 0].item()
    bare, prefixed = [], []
    for r, g in zip(recs, got):
        q = r.get("prompt", "query: ") + r["query"]
        for f, texts in (("pos_scores", r["pos"]), ("neg_scores", r["neg"])):
            want = [forward(q, "passage: " + t) for t in texts]
            np.testing.assert_allclose(g[f], want, rtol=0, atol=1e-12)
            prefixed += want
            bare += [forward(r["query"], t) for t in texts]
    assert np.std(prefixed) > 0.1 and np.abs(np.subtract(bare, prefixed)).min() > 1e-6  # the texts matter
    from data import open_datasets  # the output trains with teacher_kd=true; the input, without scores, does not
    ds = open_datasets(str(out), make_tokenizer(), cache_dir=str(tmp_path / "idx"), num_workers=1, teacher_kd=True)
    assert ds[0].meta["no_scores"] == 0 and len(ds[0].lengths) == 7
    write_examples(tmp_path / "bare.jsonl", 3)
    with pytest.raises(ValueError, match="teacher_kd needs pos_scores and neg_scores"):
        open_datasets(str(tmp_path / "bare.jsonl"), make_tokenizer(), cache_dir=str(tmp_path / "idx"), num_workers=1,
                      teacher_kd=True)


def test_teacher_resumes_a_killed_run_byte_for_byte(tmp_path, one_thread, capsys):
    cross_encoder(tmp_path / "ce")
    for name, n in (("small", 8), ("big", 200)):
        training_file(tmp_path / f"{name}.jsonl", n)
        mine.main(["--teacher", str(tmp_path / "ce"), "--jsonl", str(tmp_path / f"{name}.jsonl"), "--batch_size", "6",
                   "--out", str(tmp_path / f"{name}_whole.jsonl")])  # 4 pairs a line: chunks of 2 lines, 6 + 2 pairs
    argv = ["--teacher", str(tmp_path / "ce"), "--jsonl", str(tmp_path / "small.jsonl"), "--batch_size", "6"]
    whole = (tmp_path / "small_whole.jsonl").read_bytes()
    assert whole.count(b"\n") == 8
    mine.main(argv + ["--out", str(tmp_path / "small_whole.jsonl")])
    assert "holds all 8 records" in capsys.readouterr().out and (tmp_path / "small_whole.jsonl").read_bytes() == whole
    ends = [i + 1 for i, b in enumerate(whole) if b == ord("\n")]
    for cut in (0, ends[2], ends[2] + 40, ends[3] - 1, ends[4]):  # after line 3 (mid-chunk), in line 4, at line 5's end
        (tmp_path / "cut.jsonl").write_bytes(whole[:cut])
        mine.main(argv + ["--out", str(tmp_path / "cut.jsonl")])
        assert (tmp_path / "cut.jsonl").read_bytes() == whole, cut
    argv[3], whole, killed = str(tmp_path / "big.jsonl"), (tmp_path / "big_whole.jsonl").read_bytes(), tmp_path / "k"
    with open(tmp_path / "log", "w") as log:  # a real run, killed once it has written a line
        proc = subprocess.Popen([sys.executable, "mine.py"] + argv + ["--out", str(killed)], cwd=ROOT, stdout=log,
                                stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        try:
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline and b"\n" not in (
                    killed.read_bytes() if killed.exists() else b""):
                time.sleep(0.002)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    part = killed.read_bytes()
    done = part.count(b"\n")
    assert proc.returncode == -signal.SIGKILL and 1 <= done < 200, (proc.returncode, open(log.name).read())
    assert whole.startswith(part[:part.rfind(b"\n") + 1])
    mine.main(argv + ["--out", str(killed)])
    assert f"continuing after record {done} of 200" in capsys.readouterr().out
    assert killed.read_bytes() == whole


def test_teacher_bad_input_stops_with_a_clear_message_and_writes_nothing(tmp_path, one_thread, capsys):
    cross_encoder(tmp_path / "ce")
    cross_encoder(tmp_path / "two", num_labels=2)
    tok = make_tokenizer()
    make_encoder(tok).save_pretrained(str(tmp_path / "bare"))
    tok.save_pretrained(str(tmp_path / "bare"))
    tiny_m3().save_pretrained(str(tmp_path / "m3"))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    training_file(inp, 3)
    before = inp.read_bytes()
    os.symlink(inp, tmp_path / "link.jsonl")
    argv = lambda teacher="ce", o=out: ["--teacher", str(tmp_path / teacher), "--jsonl", str(inp), "--out", str(o)]
    for extra, msg in ((argv("bare"), f"--teacher {tmp_path / 'bare'} is XLMRobertaModel, not a sequence classifier"),
                       (argv("m3"), "is XLMRobertaModel, not a sequence classifier: --teacher takes a cross-encoder"),
                       (argv("two"), "XLMRobertaForSequenceClassification with 2 labels"),
                       (argv("nowhere"), f"--teacher {tmp_path / 'nowhere'}: not a Hugging Face model"),
                       (argv(o=inp), f"--out {inp} is the input {inp}"),
                       (argv(o=tmp_path / "link.jsonl"), f"is the input {inp}"),
                       (argv() + ["--range", "10-100"], "--range: not an option of --teacher, which takes only"),
                       (argv() + ["--ckpt", "x", "--scores"], "--ckpt: not an option of --teacher"),
                       (argv() + ["--max_pos_ratio=0.9"], "--max_pos_ratio=0.9: not an option of --teacher"),
                       (argv() + ["--batch_size", "0"], "--batch_size: expected an integer >= 1; got 0")):
        refused(extra, capsys, msg)
        assert not out.exists() and inp.read_bytes() == before, extra
    for text, msg in (("my earlier records\n", "line 1 is not the input's record 1 with its scores: --out is"),
                      (json.dumps({"query": "q", "pos": ["p"]}) + "\n", "line 1 is not the input's record 1 with"),
                      ('{"query": "other', "its last line (no newline) is not the start of the input's record 1:")):
        out.write_text(text)  # not a run of this input: never cut, never continued
        refused(argv(), capsys, msg)
        assert out.read_text() == text
    out.write_text("a longer earlier file\n" * 1000)
    mine.main(argv() + ["--overwrite"])  # starts over: nothing of the earlier file is left
    assert [without_scores(json.loads(x)) for x in open(out)] == [without_scores(json.loads(x)) for x in open(inp)]
