"""Evaluation at benchmark scale against brute force: the paper protocol (SPEC 6.2) against numpy in float64, a
memory-mapped store against the same arrays in memory (bit for bit), sharded and resumed encoding against one
uninterrupted process, per-language folders and their macro average by hand, and bad stores, folders and options."""
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest

import eval as ev
import packed
import search
import shards
import store
from runtime import end_distributed
from test_eval import WORDS, FakeM3, NoisyTokens, rand_out, write_beir
from tiny import run, spawn, tiny_m3

SMALL = dict(first=20, mv=8, all=5, fusion={"dense+sparse": (1, 0.3, 0), "all": (0.15, 0.5, 0.35)})  # below the corpus
W_DS = SMALL["fusion"]["dense+sparse"][:2]


def test_paper_settings_are_spec_6_2():
    assert search.PAPER["mkqa"] == dict(first=1000, mv=200, all=100)
    assert search.PAPER["mldr"] == dict(first=1000, mv=200, all=200)
    assert search.FUSION["mkqa"] == {"dense+sparse": (1, 0.3, 0), "all": (1, 0.3, 1)}
    assert search.FUSION["mldr"] == {"dense+sparse": (0.2, 0.8, 0), "all": (0.15, 0.5, 0.35)}
    assert search.PAPER["miracl"] == search.PAPER["mkqa"] and search.FUSION["miracl"] == search.FUSION["mkqa"]
    assert search.IMPACT == 100


def test_fuse_lists_fills_a_missing_passage_with_zero_exactly_in_float64():
    tie = np.array([5, 4, 3, 2, 1, 0, 6, 7])  # ties go to the lower tie rank
    dense = (np.array([3, 1, 5]), np.array([0.5, 0.25, 0.75], np.float32))
    sparse = (np.array([1, 7, 4]), np.array([2.0, 4.0, 2.5]))
    c, f = search.fuse_lists([dense, sparse], (1, 0.3), tie, depth=10)
    want = {3: 0.5, 1: 0.25 + 0.3 * 2.0, 5: 0.75, 7: 0.3 * 4.0, 4: 0.3 * 2.5}  # float64, 0 for the missing part
    assert c.tolist() == [7, 1, 5, 4, 3] and f.dtype == np.float64  # 0.75 = 0.3 * 2.5: passage 4 has the lower tie
    np.testing.assert_array_equal(f, [want[j] for j in c.tolist()])
    assert search.fuse_lists([dense, sparse], (1, 0.3), tie, depth=2)[0].tolist() == [7, 1]


def brute_paper(qo, P, cfg, tie):
    """The paper's rows by their definitions in float64 (python loops and dicts), on the stored (float16) tokens."""
    d = qo["dense"].astype(np.float64) @ P["dense"].T.astype(np.float64)  # (nq, N)
    ps = [dict(zip(P["sp_ids"][a:b].tolist(), P["sp_w"][a:b].tolist())) for a, b in zip(P["sp_ptr"], P["sp_ptr"][1:])]
    qs = [{t: float(np.float32(w)) for t, w in q.items()} for q in qo["sparse"]]
    s_imp = np.array([[sum(math.ceil(100 * w) * math.ceil(100 * p[t]) for t, w in q.items() if t in p) / 1e4
                       for p in ps] for q in qs])
    s_lex = np.array([[sum(w * p[t] for t, w in q.items() if t in p) for p in ps] for q in qs])
    toks = [P["cb_vecs"][a:b].astype(np.float64) for a, b in zip(P["cb_ptr"], P["cb_ptr"][1:])]
    c = np.array([[(q.astype(np.float64) @ t.T).max(1).mean() for t in toks] for q in qo["colbert"]])
    out = {r: [] for r in search.ROWS}
    for i in range(len(d)):
        order = lambda s, among: among[np.lexsort((tie[among], -s[among]))]
        dl = order(d[i], np.arange(len(tie)))[:cfg["first"]]
        sl = order(s_imp[i], np.flatnonzero(s_imp[i] > 0))[:cfg["first"]]
        out["dense"].append((dl, d[i, dl]))
        out["sparse"].append((sl, s_imp[i, sl]))
        out["multi-vector"].append((order(c[i], dl[:cfg["mv"]]), None))
        w_ds = cfg["fusion"]["dense+sparse"]
        fused = {j: w_ds[0] * d[i, j] * (j in dl) + w_ds[1] * s_imp[i, j] * (j in sl)
                 for j in set(dl) | set(sl)}
        u = np.array(sorted(fused))
        f = np.zeros(len(tie))
        f[u] = [fused[j] for j in u]
        out["dense+sparse"].append((order(f, u)[:cfg["first"]], None))
        w = np.array(cfg["fusion"]["all"])
        out["all"].append((order((w[0] * d[i] + w[1] * s_lex[i] + w[2] * c[i]) / w.sum(), dl[:cfg["all"]]), None))
    return out, dict(dense=d, sparse=s_imp, lex=s_lex, colbert=c)


def test_paper_protocol_equals_brute_force():
    rng = np.random.default_rng(21)
    qo, po = rand_out(rng, 9), rand_out(rng, 60, max_nnz=12)
    Q, P = packed.pack(qo), store.as_stored(packed.pack(po))
    tie = rng.permutation(60)  # a rank per passage, not the index order
    want, S = brute_paper(qo, P, SMALL, tie)
    got = search.paper_rows(Q, P, SMALL, tie, qbatch=4, progress=False)
    for row in search.ROWS:
        for i, ((c, s), (wc, ws)) in enumerate(zip(got[row], want[row])):
            np.testing.assert_array_equal(c, wc, err_msg=f"{row}, query {i}")
            if ws is not None:
                np.testing.assert_allclose(s, ws, rtol=1e-5, atol=1e-6)
    gap = lambda x: np.diff(np.sort(x)).min()
    for i in range(9):  # the float32 orders are defined: no near-ties where a list is cut or ranked
        assert gap(np.sort(S["dense"][i])[::-1][:SMALL["first"] + 1]) > 1e-5
        assert gap(S["colbert"][i, got["dense"][i][0][:SMALL["mv"]]]) > 1e-5 and gap(got["all"][i][1]) > 1e-5
        assert gap(got["dense+sparse"][i][1]) > 1e-5 or len(got["dense+sparse"][i][1]) < 2
        np.testing.assert_array_equal(got["sparse"][i][1], want["sparse"][i][1])  # integer impacts / 1e4: exact
    fused = [(c, s) for c, s in got["dense+sparse"]]
    d_only = sum(len(set(c) - set(got["sparse"][i][0])) for i, (c, _) in enumerate(fused))
    s_only = sum(len(set(c) - set(got["dense"][i][0])) for i, (c, _) in enumerate(fused))
    assert d_only and s_only  # both kinds of missing passage occur, each got 0 for its missing part
    for i, (c, f) in enumerate(fused):  # fused scores: the zero fill, not the exact score of the other head
        d, s = S["dense"][i, c] * np.isin(c, got["dense"][i][0]), S["sparse"][i, c] * np.isin(c, got["sparse"][i][0])
        np.testing.assert_allclose(f, W_DS[0] * d + W_DS[1] * s, rtol=1e-5, atol=1e-6)
    w_d, w_s = W_DS
    exact_fill = [np.lexsort((tie[c], -(w_d * S["dense"][i, c] + w_s * S["sparse"][i, c])))
                  for i, (c, _) in enumerate(fused)]
    assert any((o != np.arange(len(o))).any() for o in exact_fill)  # the fill changes rankings here: tested


def write_store(tmp_path, texts, model, shard_size=7, name="st", **kw):
    """encode_store of texts with model (key: its weights) into tmp_path/name."""
    meta = store.store_meta(packed.model_key(model), texts, 64, False)
    return shards.encode_store(lambda: model, texts, str(tmp_path / name), meta, 4, shard_size, progress=False, **kw)


TEXTS = [" ".join(np.random.default_rng(i).choice(WORDS, 5)) for i in range(23)]


def test_store_is_memory_mapped_and_scores_bit_identically_to_memory(tmp_path):
    m = NoisyTokens()
    P = write_store(tmp_path, TEXTS, m)
    assert isinstance(P["cb_vecs"], np.memmap) and P["cb_vecs"].dtype == np.float16 and P["sp_ids"].dtype == np.int32
    mem = store.as_stored(packed.pack(m.encode(TEXTS, max_length=64)))  # the same encodings, never written
    assert all(np.array_equal(mem[k], P[k]) and mem[k].dtype == P[k].dtype for k in mem)
    Q = packed.pack(m.encode(TEXTS[:6], max_length=64))
    tie = np.arange(len(TEXTS))
    task = dict(SMALL, first=10, mv=6, all=4)
    a, b = (search.paper_rows(Q, x, task, tie, qbatch=2, progress=False) for x in (P, mem))
    for row in search.ROWS:
        for (ca, sa), (cb, sb) in zip(a[row], b[row]):
            np.testing.assert_array_equal(ca, cb)
            np.testing.assert_array_equal(sa, sb)  # bit for bit
    for (ca, sa, ra), (cb, sb, rb) in zip(search.retrieve(Q, P, depth=8, colbert_k=3),
                                          search.retrieve(Q, mem, 8, colbert_k=3)):
        assert np.array_equal(ca, cb) and np.array_equal(sa, sb) and np.array_equal(ra, rb)  # --protocol exact too
    cand = np.array([22, 3, 3, 17, 0])
    for i in range(6):
        np.testing.assert_array_equal(search.maxsim(Q, i, P, cand, max_tokens=9),
                                      search.maxsim(Q, i, mem, cand, max_tokens=9))
        np.testing.assert_array_equal(search.exact_scores(Q, i, P, cand), search.exact_scores(Q, i, mem, cand))
    for x in (P["dense"], P["cb_vecs"], mem["cb_vecs"]):
        search.release(x)  # mapped: pages dropped; in memory: nothing to do
    calls = m.calls
    again = write_store(tmp_path, TEXTS, m)  # finished: opened, nothing encoded
    assert m.calls == calls and all(np.array_equal(again[k], P[k]) for k in P)


def test_store_errors_name_file_and_field_and_lose_nothing(tmp_path):
    m = FakeM3()
    write_store(tmp_path, TEXTS, m)  # 4 shards
    path = tmp_path / "st"
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}
    other = FakeM3()
    other.pooling = "mean"  # another model: another key
    with pytest.raises(ValueError, match=r"st/meta.json: field 'model'"):
        write_store(tmp_path, TEXTS, other)
    with pytest.raises(ValueError, match=r"st/meta.json: field 'corpus'"):
        write_store(tmp_path, TEXTS[:-1] + ["another text"], m)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before and m.calls == 4
    cases = [("offsets.npy", lambda x: np.save(x, np.arange(len(TEXTS)) * 2), r"offsets.npy: field 'shape'"),
             ("offsets.npy", lambda x: np.save(x, np.r_[0, 9, 5, np.load(x)[3:]]), r"offsets.npy: field 'values'.*"
              "decreasing after entry 1"),
             ("tokens.npy", lambda x: open(x, "r+b").truncate(os.path.getsize(x) - 2), r"tokens.npy: unreadable"),
             ("tokens.npy", lambda x: np.save(x, np.load(x).astype(np.float32)), r"tokens.npy: field 'shape'.*float32"),
             ("sp_ptr.npy", lambda x: np.save(x, np.load(x)[::-1]), r"sp_ptr.npy: field 'values'"),
             ("meta.json", lambda x: open(x, "w").write("{"), r"meta.json: not a store's meta.json")]
    for n, (f, corrupt, error) in enumerate(cases):
        bad = tmp_path / f"bad{n}"
        shutil.copytree(path, bad)
        corrupt(str(bad / f))
        with pytest.raises(ValueError, match=error):
            store.open_store(str(bad))
    os.remove(path / "meta.json")
    with pytest.raises(FileNotFoundError, match="no meta.json: not a finished store"):
        store.open_store(str(path))


def crash_in_third_shard(monkeypatch, half_written=False):
    """shards.write_shard patched: two shards are written, then the encode stops (KeyboardInterrupt) at the third;
    half_written: its token matrix left under a temporary name and its .npz never renamed, as a kill mid-write does."""
    real, saved = shards.write_shard, []

    def crash_in_third(path, enc, *a):
        if len(saved) == 2:
            if half_written:
                np.save(path + ".tmp.tokens.npy", enc["cb_vecs"][:3])
            raise KeyboardInterrupt
        saved.append(path)
        real(path, enc, *a)
    monkeypatch.setattr(shards, "write_shard", crash_in_third)


def test_encoding_resumes_from_finished_shards(tmp_path, monkeypatch):
    full = write_store(tmp_path, TEXTS, NoisyTokens(), name="once")  # 4 shards of 7, the last of 2
    m = NoisyTokens()
    crash_in_third_shard(monkeypatch, half_written=True)
    with pytest.raises(KeyboardInterrupt):
        write_store(tmp_path, TEXTS, m)
    assert m.calls == 3 and sorted(os.listdir(tmp_path / "st" / "shards")) == [
        "00000.npz", "00000.tokens.npy", "00001.npz", "00001.tokens.npy", "00002.tmp.tokens.npy", "meta.json"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="shards/meta.json: field 'shard_size'"):  # shards are never mixed
        write_store(tmp_path, TEXTS, m, shard_size=5)
    P = write_store(tmp_path, TEXTS, m)
    assert m.calls == 5 and not os.path.exists(tmp_path / "st" / "shards")  # shards 2 and 3 only, then merged
    assert all(np.array_equal(P[k], full[k]) for k in P)


def shard_worker(rank, init, out, texts):
    """One of 2 gloo processes encoding a store with the tiny model."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    write_store(out, texts, tiny_m3(), shard_size=4, rank=rank, world=2)
    end_distributed()


def test_two_processes_encode_the_store_one_process_does(tmp_path):
    import pathlib
    texts = TEXTS[:19] + ["a much longer passage " * 9]  # 5 shards of 4: rank 0 takes 0, 2, 4
    spawn(shard_worker, (tmp_path, texts))
    one = write_store(tmp_path, texts, tiny_m3(), shard_size=4, name="one")
    two = store.open_store(str(pathlib.Path(tmp_path) / "st"))
    for k in ("sp_ptr", "cb_ptr", "sp_ids"):
        np.testing.assert_array_equal(two[k], one[k])
    for k in ("dense", "sp_w", "cb_vecs"):  # float16 tokens: within one float16 step of [-1, 1]
        np.testing.assert_allclose(np.asarray(two[k], np.float32), np.asarray(one[k], np.float32), rtol=1e-5,
                                   atol=1e-3 if k == "cb_vecs" else 1e-6)


def write_langs(root, sizes):
    """Per-language BEIR folders root/<lang> with distinct corpora and query counts."""
    for n, (lang, n_q) in enumerate(sizes.items()):
        write_beir(os.path.join(root, lang), np.random.default_rng(30 + n), n_docs=25, n_q=n_q)


def test_per_language_folders_and_macro_average_by_hand(tmp_path, capsys):
    tiny_m3().save_pretrained(str(tmp_path / "ck"))
    root = str(tmp_path / "miracl")
    write_langs(root, {"fi": 3, "sw": 6, "te": 4})
    out = str(tmp_path / "out")
    cli = ["--ckpt", str(tmp_path / "ck"), "--data", root, "--cache_dir", str(tmp_path / "cache"), "--out", out]
    res = ev.main(cli + ["--protocol", "paper", "--task", "mldr", "--langs", "te,fi"])
    assert list(res["per_lang"]) == ["te", "fi"] and res["n_queries"] == {"te": 4, "fi": 3}
    for lang in ("te", "fi"):  # each language: the same rows as evaluating its folder alone
        alone = ev.evaluate(str(tmp_path / "ck"), os.path.join(root, lang), protocol="paper", task="mldr",
                            verbose=False)
        assert res["per_lang"][lang] == alone["rows"]
    for row in search.ROWS:
        for k in ("nDCG@10", "Recall@100"):
            by_hand = (res["per_lang"]["te"][row][k] + res["per_lang"]["fi"][row][k]) / 2
            assert res["rows"][row][k] == res["macro"][row][k] == pytest.approx(by_hand, abs=1e-6)
    assert json.load(open(os.path.join(out, "metrics.json")))["macro"] == res["macro"]
    table = capsys.readouterr().out
    assert "macro avg" in table and "Recall@100 per language" in table
    one = ev.evaluate(FakeM3(), os.path.join(root, "sw"), verbose=False)  # one folder, queries with a lang field
    langs = [json.loads(line)["lang"] for line in open(os.path.join(root, "sw", "queries.jsonl"))]
    assert one["macro"]["all"]["nDCG@10"] == pytest.approx(np.mean([one["per_lang"][l]["all"]["nDCG@10"]
                                                                    for l in sorted(set(langs))]), abs=1e-6)
    shutil.rmtree(os.path.join(root, "sw", "qrels"))
    before = open(os.path.join(out, "metrics.json")).read()
    for extra, error in ((["--langs", "fi,xx"], r"miracl/xx: no such language folder.*fi, sw, te"),
                         ([], r"miracl/sw: no qrels/test.tsv")):
        with pytest.raises(SystemExit):
            ev.main(cli + extra)
        assert re.search(error, capsys.readouterr().err.splitlines()[-1])
    assert open(os.path.join(out, "metrics.json")).read() == before


def test_bad_protocol_task_or_weights_fail_early_naming_the_option(tmp_path, capsys):
    data = str(tmp_path / "data")
    write_beir(data, np.random.default_rng(41), n_docs=10, n_q=3)
    cli = ["--ckpt", str(tmp_path / "no_such_ckpt"), "--data", data]
    for extra, error in ((["--protocol", "papr"], r"--protocol: invalid choice: 'papr'"),
                         (["--task", "nq"], r"--task: invalid choice: 'nq'"),
                         (["--task", "mldr"], r"--task: sets the paper protocol's depths and weights: add --protocol"),
                         (["--protocol", "paper", "--weights", "1,1,1"], r"--weights: the paper protocol"),
                         (["--protocol", "paper", "--sweep"], r"--sweep: the paper protocol")):
        with pytest.raises(SystemExit):
            ev.main(cli + extra)
        assert re.search(error, capsys.readouterr().err.splitlines()[-1])
    m = FakeM3()
    for kw, opt in ((dict(protocol="papr"), "protocol: expected one of exact, paper; got 'papr'"),
                    (dict(protocol="paper", task="nq"), "task: expected one of miracl, mkqa, mldr; got 'nq'"),
                    (dict(task="mldr"), "task: sets the paper protocol's depths and weights"),
                    (dict(protocol="paper", weights="mldr"), "weights: the paper protocol"),
                    (dict(protocol="paper", sweep=True), "sweep: the paper protocol"),
                    (dict(shard_size=0), "shard_size: expected an integer >= 1")):
        with pytest.raises(ValueError, match=opt):
            ev.evaluate(m, data, verbose=False, **kw)
    assert m.calls == 0


def test_encode_command_then_paper_protocol_reads_the_store(tmp_path, monkeypatch):
    tiny_m3().save_pretrained(str(tmp_path / "ck"))
    data, st = str(tmp_path / "data"), str(tmp_path / "store")
    write_beir(data, np.random.default_rng(40), n_docs=30, n_q=5)
    ev.main(["encode", "--ckpt", str(tmp_path / "ck"), "--data", data, "--store", st, "--shard_size", "8"])
    files = store.store_files({"token_vectors": "float16"}).values()
    assert sorted(os.listdir(st)) == sorted([*files, "meta.json"])
    calls = []
    real = shards.encode_store
    monkeypatch.setattr(ev, "encode_store", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    argv = ["--ckpt", str(tmp_path / "ck"), "--data", data, "--protocol", "paper", "--cache_dir", ""]
    with_store = ev.main(argv + ["--store", st, "--out", str(tmp_path / "o1"), "--shard_size", "8"])
    in_memory = ev.main(argv + ["--out", str(tmp_path / "o2")])  # no cache, no store: the same dtypes in memory
    assert calls == [st] and with_store["rows"] == in_memory["rows"] and with_store["store"] == os.path.abspath(st)
    exact = ev.main(argv[:-4] + ["--cache_dir", "", "--out", str(tmp_path / "o3")])
    st1 = str(tmp_path / "one_shard")  # encoded in one call, as in memory (shards of 8: other batches, float32 noise)
    on_disk = ev.main(argv[:-4] + ["--cache_dir", "", "--out", str(tmp_path / "o4"), "--store", st1])
    assert exact["protocol"] == on_disk["protocol"] == "exact" and calls == [st, st1]
    assert on_disk["rows"] == exact["rows"]  # float16 token vectors in memory as on disk: the same scores


def test_bench_quick_mode_runs_and_cleans_up(tmp_path):
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "eval_scale.py")
    res = run([sys.executable, bench, "--quick", "--dir", str(tmp_path)], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout.splitlines()
    keys = dict(kv.split("=") for kv in out[-1].split(" "))
    assert list(keys) == ["eval_disk_kb_per_passage", "eval_rss_mb_2000", "ms_per_query_2000"]
    assert all(float(v) > 0 for v in keys.values())
    kb = {line.split()[0]: float(line.split()[2]) for line in out if " KB/passage " in line}
    assert list(kb) == ["encode", "pq8", "int8", "float16"] and float(keys["eval_disk_kb_per_passage"]) == kb["encode"]
    per_token = {"pq8": 10, "int8": 68, "float16": 128}  # 16 tokens a passage, 64 dims: bytes a token vector
    book = (4096 + 256) * 64 * 4 / 2000 / 1024  # pq's codebooks: (4096, 64) and (8, 256, 8) float32, over 2,000
    for opt, b in per_token.items():  # every byte written: the token files add their bytes (+ offsets, headers)
        least = 16 * b / 1024 + (book if opt == "pq8" else 0)
        assert least < kb[opt] - kb["encode"] < least + 0.1, opt
    assert os.listdir(tmp_path) == []
