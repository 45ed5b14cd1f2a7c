"""--colbert_from encode: a store of dense and sparse only, the paper protocol's multi-vector candidates encoded for
each batch of queries. Against the stored-token path: every row's rankings equal and scores within float16 rounding
(a real tiny model, whose vectors move with the batch they are encoded in); the model called once per chunk of each
batch's candidate union, each passage once (a logging model); a store of the wrong kind refused naming the option,
nothing encoded or written; a store without tokens resumed and merged by two torchrun ranks; old stores unchanged."""
import hashlib
import json
import os
import re
import sys

import numpy as np
import pytest

import eval as ev
import packed
import search
import shards
import store
from beir import passage_text
from model import M3
from test_eval import NoisyTokens, write_beir
from test_scale import SMALL, TEXTS, crash_in_third_shard
from tiny import run, tiny_m3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN, PREFIX = 12, "passage: "  # passages of 10-21 tokens cut to 12, with a prefix: ignoring either scores apart
COLBERT_ROWS = ("multi-vector", "all")  # the rows that read token vectors; the others must not move at all


def two_stores(tmp_path, m, texts, **kw):
    """{token_vectors: the opened store of texts} with ("float16") and without ("none") token vectors, model m."""
    out = {}
    for tv in ("float16", "none"):
        meta = store.store_meta(packed.model_key(m), texts, MAX_LEN, False, tv)
        out[tv] = shards.encode_store(lambda: m, texts, str(tmp_path / tv), meta, 4, 7, progress=False, **kw)
    return out


def test_encoded_candidates_score_as_stored_tokens_on_every_paper_row(tmp_path):
    m = tiny_m3()
    data = str(tmp_path / "data")
    docs, qs, _ = write_beir(data, np.random.default_rng(2), n_docs=30, n_q=8)
    texts = [PREFIX + passage_text(d) for d in docs]  # as evaluate reads them
    P = two_stores(tmp_path, m, texts)
    assert "cb_vecs" not in P["none"] and sorted(os.listdir(tmp_path / "none")) == [
        "dense.npy", "meta.json", "sp_ids.npy", "sp_ptr.npy", "sp_w.npy"]
    Q = packed.pack(m.encode([q["text"] for q in qs], max_length=16))
    tie = np.random.default_rng(3).permutation(len(texts))
    stored = search.paper_rows(Q, P["float16"], SMALL, tie, qbatch=3, progress=False)
    enc = packed.TokenEncoder(lambda: m, texts, MAX_LEN, batch_size=5)  # other batches than the store's shards
    encoded = search.paper_rows(Q, P["none"], SMALL, tie, qbatch=3, progress=False, encode=enc, encode_chunk=6)
    # float16 rounding: an entry x of a token vector encoded in another batch (float32 noise on CPU) may round to the
    # float16 neighbour of the stored value, |dx| <= 2^-10 |x| (float16's relative spacing), which moves a dot product
    # with a query token q by at most 2^-10 sum |q_i x_i| <= 2^-10 (unit vectors), and MaxSim (a mean of maxima) and
    # the all row (colbert weight / sum of weights <= 1) by no more
    tol = 2.0 ** -10
    for row in search.ROWS:
        for i, ((c, s), (ce, se)) in enumerate(zip(stored[row], encoded[row])):
            np.testing.assert_array_equal(ce, c, err_msg=f"{row}, query {i}: rankings differ")
            if row not in COLBERT_ROWS:
                np.testing.assert_array_equal(se, s, err_msg=f"{row}, query {i}")
                continue
            np.testing.assert_allclose(se, s, rtol=0, atol=tol, err_msg=f"{row}, query {i}")
            assert len(s) < 2 or -np.diff(s).min() > 2 * tol, f"{row}, query {i}: a near-tie, rankings undefined"
    assert enc.passages == sum(len(np.unique(np.concatenate([c[:SMALL["mv"]] for c, _ in stored["dense"][a:a + 3]])))
                               for a in range(0, len(qs), 3))

    kw = dict(protocol="paper", task="mkqa", passage_max_len=MAX_LEN, passage_prefix=PREFIX, verbose=False)
    with_tokens = ev.evaluate(m, data, store=str(tmp_path / "float16"), **kw)
    without = ev.evaluate(m, data, store=str(tmp_path / "none"), **kw)  # the store decides: encode
    assert (with_tokens["colbert_from"], without["colbert_from"]) == ("store", "encode")
    assert without["rows"] == with_tokens["rows"] and "colbert_encoded_per_query" not in with_tokens
    assert without["colbert_encoded_per_query"] == round(30 / 8, 2)  # one batch of 8 queries; mv 200: all 30 passages
    in_memory = ev.evaluate(m, data, colbert_from="encode", **kw)  # no store, no cache: tokens dropped, then encoded
    assert in_memory["rows"] == with_tokens["rows"] and in_memory["colbert_encoded_per_query"] == 3.75


class Logged(NoisyTokens):
    """NoisyTokens (token vectors depend on the text only) that logs the texts of every encode call."""

    def __init__(self):
        super().__init__()
        self.log = []

    def encode(self, texts, **kw):
        self.log.append(list(texts))
        return super().encode(texts, **kw)


def test_each_query_batch_encodes_the_union_of_its_candidates_once(tmp_path):
    m = Logged()
    texts = TEXTS + [t + " dose" for t in TEXTS]  # 46 passages
    P = two_stores(tmp_path, m, texts)
    qo = m.encode(TEXTS[::2], max_length=64)  # 12 queries
    Q, tie = packed.pack(qo), np.arange(len(texts))
    m.log.clear()
    enc = packed.TokenEncoder(lambda: m, texts, MAX_LEN, batch_size=4)
    encoded = search.paper_rows(Q, P["none"], SMALL, tie, qbatch=5, progress=False, encode=enc, encode_chunk=9)
    want, shared = [], 0
    for a in range(0, 12, 5):  # batches of 5, 5, 2 queries: their candidates' union, ascending, 9 passages a call
        cands = [c[:SMALL["mv"]] for c, _ in encoded["dense"][a:a + 5]]  # mv 8 >= all 5: what both rows rerank
        union = np.unique(np.concatenate(cands))
        shared += sum(map(len, cands)) - len(union)
        assert len(union) < len(texts)
        want += [[texts[j] for j in union[b:b + 9]] for b in range(0, len(union), 9)]
    assert m.log == want and shared > 0  # passages two queries of a batch share: encoded once
    assert enc.calls == len(want) and enc.passages == sum(map(len, want))
    stored = search.paper_rows(Q, P["float16"], SMALL, tie, qbatch=5, progress=False)
    for row in search.ROWS:  # tokens that do not depend on the batch: equal up to float32 summation order
        for (c, s), (ce, se) in zip(stored[row], encoded[row]):
            np.testing.assert_array_equal(ce, c)
            np.testing.assert_allclose(se, s, rtol=0, atol=1e-6)


def listing(path):
    """{file: bytes} of a folder."""
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


def test_a_store_of_the_other_kind_stops_naming_colbert_from_nothing_encoded_or_written(tmp_path, monkeypatch, capsys):
    ck, data, st, st2 = (str(tmp_path / x) for x in ("ck", "data", "st", "st2"))
    tiny_m3().save_pretrained(ck)
    write_beir(data, np.random.default_rng(8), n_docs=20, n_q=4)
    base = ["--ckpt", ck, "--data", data, "--cache_dir", ""]
    ev.main(["encode", *base, "--store", st, "--colbert_from", "encode", "--shard_size", "8"])
    ev.main(["encode", *base, "--store", st2, "--shard_size", "8"])  # with token vectors
    meta = json.load(open(os.path.join(st, "meta.json")))
    assert meta["token_vectors"] == "none" and "tokens" not in meta and "dim" not in meta
    assert sorted(os.listdir(st)) == ["dense.npy", "meta.json", "sp_ids.npy", "sp_ptr.npy", "sp_w.npy"]
    before = {s: listing(s) for s in (st, st2)}
    monkeypatch.setattr(M3, "encode", lambda *a, **k: pytest.fail("encoded"))
    out = str(tmp_path / "out")
    none = rf"{re.escape(st)} holds no passage token vectors \(written with --colbert_from encode\)"
    cases = ((["--protocol", "paper", "--store", st, "--colbert_from", "store"],
              rf"--colbert_from store: {none}: pass --colbert_from encode \(or leave it out\), or another --store"),
             (["--store", st], rf"--colbert_from encode: {none}; the exact protocol searches every passage's token "
                               r"vectors \(--colbert_k\): use --protocol paper, or a store with token vectors"),
             (["--colbert_from", "encode"], r"--colbert_from encode: the exact protocol searches"),
             (["--protocol", "paper", "--store", st2, "--colbert_from", "encode"],
              rf"--colbert_from encode: {re.escape(st2)} holds passage token vectors \(float16, written with "
              r"--colbert_from store\): pass --colbert_from store"),
             (["--protocol", "paper", "--colbert_from", "stored"],
              r"--colbert_from: invalid choice: 'stored' \(choose from 'store', 'encode'\)"))
    for extra, error in cases:
        with pytest.raises(SystemExit):
            ev.main(base + ["--out", out] + extra)
        assert re.search(error, capsys.readouterr().err.splitlines()[-1]), extra
    with pytest.raises(SystemExit):  # eval.py encode: the same
        ev.main(["encode", *base, "--store", st, "--colbert_from", "store"])
    assert re.search(rf"--colbert_from store: {none}", capsys.readouterr().err.splitlines()[-1])
    with pytest.raises(ValueError, match=rf"^colbert_from store: {re.escape(st)} holds no passage token vectors "
                                         r"\(written with colbert_from encode\): pass colbert_from encode"):
        ev.evaluate(ck, data, protocol="paper", store=st, colbert_from="store", out_dir=out, verbose=False)
    with pytest.raises(ValueError, match=r"st/meta.json: field 'token_vectors': this store was written for 'none', "
                                         r"this run needs 'float16' \(another --tokens or --colbert_from\)"):
        store.open_store(st, {"token_vectors": "float16"})  # the store layer refuses it on its own too
    assert not os.path.exists(out) and {s: listing(s) for s in (st, st2)} == before
    monkeypatch.undo()
    res = ev.main(base + ["--protocol", "paper", "--store", st, "--out", out])  # no option: the store's kind
    assert res["colbert_from"] == "encode" and res["colbert_encoded_per_query"] == 5.0  # 20 passages, 4 queries
    assert listing(st) == before[st]


def test_a_store_written_before_token_vectors_were_recorded_is_a_token_store_under_its_old_name(tmp_path):
    m = NoisyTokens()
    meta = store.store_meta(packed.model_key(m), TEXTS, 64, False)
    P = shards.encode_store(lambda: m, TEXTS, str(tmp_path / "st"), meta, 4, 7, progress=False)
    f = tmp_path / "st" / "meta.json"
    old = {k: v for k, v in json.loads(f.read_text()).items() if k != "token_vectors"}
    f.write_text(json.dumps(old))  # as merge wrote it before the field
    again = store.open_store(str(tmp_path / "st"), meta)
    assert set(again) == set(P) and all(np.array_equal(again[k], P[k]) for k in P)
    assert store.stored_tokens(str(tmp_path / "st")) == "float16"
    assert store.resolve_colbert_from(None, str(tmp_path / "st")) == "store"
    before = {k: v for k, v in meta.items() if k != "token_vectors"}  # what eval.py hashed for a cache's store name
    assert store.store_name(meta) == "store-" + hashlib.sha256(json.dumps(before).encode()).hexdigest()[:40]
    assert store.store_name(dict(meta, token_vectors="none")) != store.store_name(meta)


def test_sharded_encode_of_a_store_without_tokens_resumes_and_merges(tmp_path, monkeypatch):
    ck, data, st, one = (str(tmp_path / x) for x in ("ck", "data", "st", "one"))
    tiny_m3().save_pretrained(ck)
    write_beir(data, np.random.default_rng(9), n_docs=30, n_q=4)  # shards of 8, 8, 8, 6 passages
    cmd = ["encode", "--ckpt", ck, "--data", data, "--shard_size", "8", "--colbert_from", "encode"]
    ev.main(cmd + ["--store", one])  # uninterrupted, one process
    crash_in_third_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        ev.main(cmd + ["--store", st])
    monkeypatch.undo()
    shard_dir = os.path.join(st, "shards")
    assert sorted(os.listdir(shard_dir)) == ["00000.npz", "00001.npz", "meta.json"]  # no token files
    x = dict(np.load(os.path.join(shard_dir, "00000.npz")))
    np.savez(os.path.join(shard_dir, "00000.npz"), **dict(x, sp_w=2 * x["sp_w"]))  # marks a shard taken as it is
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              os.path.join(ROOT, "eval.py"), *cmd[:-2], "--store", st]  # no --colbert_from: the shards' kind
    res = run(launch, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "30 passages, no token vectors" in res.stdout and not os.path.exists(shard_dir)
    two, ref = store.open_store(st), store.open_store(one)
    assert set(two) == set(ref) == {"dense", "sp_ptr", "sp_ids", "sp_w"}
    assert json.load(open(os.path.join(st, "meta.json")))["token_vectors"] == "none"
    for k in ("sp_ptr", "sp_ids"):
        np.testing.assert_array_equal(two[k], ref[k])
    first = ref["sp_ptr"][8]  # shard 0's sparse weights: the resumed run kept them (doubled), encoded no others again
    np.testing.assert_allclose(two["sp_w"][:first], 2 * ref["sp_w"][:first], rtol=1e-6)
    for k, a, b in (("dense", two["dense"], ref["dense"]), ("sp_w", two["sp_w"][first:], ref["sp_w"][first:])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=k)  # shards 1-3 by two processes
