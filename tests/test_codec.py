"""Compact token stores (codec.py, eval.py --tokens int8|pq<M>): int8's decode error within its stated bound (s/254 per
entry, float64); pq's codes the nearest centroids by brute force; MaxSim rankings over an int8 store equal to the
float16 store's wherever the float16 scores are further apart than the bound allows; sharded, killed and resumed
encoding equal to one uninterrupted run, byte for byte, for each kind; the bytes a token costs; bad --tokens values and
a store of another kind stop naming the option, nothing written or changed."""
import os

import numpy as np
import pytest

import codec
import eval as ev
import packed
import search
import shards
import store
from test_eval import NoisyTokens, write_beir
from test_scale import TEXTS, crash_in_third_shard, write_store
from tiny import tiny_m3


def vectors(n=500, d=16, seed=0):
    """n unit-ish rows with varied norms (the per-vector scale matters), float32."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * rng.uniform(0.1, 3, (n, 1))).astype(np.float32)


def test_int8_decodes_within_s_over_254_per_entry():
    x = np.concatenate([vectors(), np.zeros((1, 16), np.float32)])  # a zero vector decodes to zero
    parts = codec.compress(x, "int8", {})
    assert parts["cb_q"].dtype == np.int8 and parts["cb_scale"].dtype == np.float32
    back = codec.decode(parts, {}).astype(np.float64)
    s = np.abs(x.astype(np.float64)).max(1, keepdims=True)  # (n, 1)
    assert (np.abs(back - x) <= s / 254 * (1 + 1e-6) + 1e-12).all()
    assert (np.abs(back - x) > s / 508).any()  # the bound is reached in half: not a test of a lossless path
    assert np.array_equal(back[-1], np.zeros(16))


def test_pq_codes_are_the_nearest_centroids_by_brute_force():
    x = vectors(2000, 16, seed=1)
    book = codec.train(x, "pq4")
    C, (M, k, d) = len(book["book_coarse"]), book["book_sub"].shape
    assert (C, M, k, d) == (2000 // 39, 4, 2000 // 39, 4)
    parts = codec.compress(x, "pq4", book)
    assert parts["cb_coarse"].dtype == np.uint16 and parts["cb_codes"].shape == (2000, 4)
    X, cent = x.astype(np.float64), book["book_coarse"].astype(np.float64)
    dist = ((X[:, None, :] - cent[None]) ** 2).sum(-1)  # (n, C)
    near = np.sort(dist, 1)
    clear = near[:, 1] - near[:, 0] > 1e-4  # FAISS computes in float32: only a clear nearest is asserted
    assert clear.mean() > 0.9 and np.array_equal(parts["cb_coarse"][clear], dist.argmin(1)[clear])
    r = X - cent[parts["cb_coarse"]]  # (n, D) residuals of the chosen coarse centroids
    for m in range(M):
        dm = ((r[:, None, m * d:(m + 1) * d] - book["book_sub"][m][None].astype(np.float64)) ** 2).sum(-1)  # (n, k)
        nm = np.sort(dm, 1)
        ok = nm[:, 1] - nm[:, 0] > 1e-4
        assert np.array_equal(parts["cb_codes"][ok, m], dm.argmin(1)[ok])
    back = codec.decode(parts, book)  # coarse centroid + the sub-centroids, concatenated
    expect = cent[parts["cb_coarse"]] + np.concatenate([book["book_sub"][m][parts["cb_codes"][:, m]]
                                                        for m in range(M)], 1)
    np.testing.assert_allclose(back, expect, rtol=1e-6, atol=1e-6)
    err = np.linalg.norm(back - X, axis=1) / np.linalg.norm(X, axis=1)
    assert np.median(err) < 0.5  # and it is an approximation worth having (a coarse centroid alone: ~1)


def test_int8_store_keeps_maxsim_rankings_apart_from_near_ties(tmp_path):
    m = NoisyTokens()
    f16 = write_store(tmp_path, TEXTS, m, name="f16")
    meta = store.store_meta(packed.model_key(m), TEXTS, 64, False, "int8")
    i8 = shards.encode_store(lambda: m, TEXTS, str(tmp_path / "i8"), meta, 4, 7, progress=False)
    assert isinstance(i8["cb_vecs"], codec.Decoded) and i8["cb_vecs"].shape == f16["cb_vecs"].shape
    Q = packed.pack(m.encode(TEXTS[:8], max_length=64))
    cand = np.arange(len(TEXTS))
    checked = 0
    for i in range(8):
        a, b = search.maxsim(Q, i, f16, cand), search.maxsim(Q, i, i8, cand, max_tokens=9)  # (N,) each
        q = Q["cb_vecs"][Q["cb_ptr"][i]:Q["cb_ptr"][i + 1]].astype(np.float64)
        s = np.abs(np.asarray(f16["cb_vecs"], np.float64)).max()  # the largest per-token scale
        entry = s / 254 + s / 2048  # int8's error, plus float16's rounding of the float16 store's values
        bound = np.abs(q).sum(1).mean() * entry  # |max_b q.p'_b - max_b q.p_b| <= |q|_1 x entry, averaged over q
        assert np.abs(a - b).max() <= bound
        order = np.argsort(-a.astype(np.float64), kind="stable")
        gaps = -np.diff(a[order].astype(np.float64))
        apart = gaps > 2 * bound  # neighbours in the float16 ranking further apart than both errors
        assert (b[order][:-1][apart] > b[order][1:][apart]).all()
        checked += apart.sum()
    assert checked > 20  # of 176 neighbour pairs: the test compares rankings, not only near-ties


@pytest.mark.parametrize("tokens", ["int8", "pq4"])
def test_sharded_killed_and_resumed_encode_equals_one_run_for_each_kind(tmp_path, monkeypatch, tokens):
    m = tiny_m3()
    data = str(tmp_path / "data")
    write_beir(data, np.random.default_rng(11), n_docs=30, n_q=4)
    cmd = ["encode", "--ckpt", str(tmp_path / "ck"), "--data", data, "--shard_size", "8", "--tokens", tokens]
    m.save_pretrained(str(tmp_path / "ck"))
    ev.main(cmd + ["--store", str(tmp_path / "one")])
    crash_in_third_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        ev.main(cmd + ["--store", str(tmp_path / "st")])
    monkeypatch.undo()
    written = ["00000.npz", "00000.tokens.npy", "00001.npz", "00001.tokens.npy", "meta.json"]
    assert sorted(os.listdir(tmp_path / "st" / "shards")) == sorted(written + ["codebook.npz"] * (tokens == "pq4"))
    ev.main(cmd + ["--store", str(tmp_path / "st")])  # resumes: shards 2 and 3, the same codebook
    one, st = store.open_store(str(tmp_path / "one")), store.open_store(str(tmp_path / "st"))
    files = store.store_files({"token_vectors": tokens})
    assert sorted(os.listdir(tmp_path / "st")) == sorted([*files.values(), "meta.json"])
    for f in files.values():
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "st" / f).read_bytes(), f
    T, D = one["cb_vecs"].shape
    bytes_per_token = sum(os.path.getsize(tmp_path / "st" / files[k]) - 128
                          for k in codec.ARRAYS[codec.kind(tokens)]) / T  # less each .npy's 128-byte header
    assert bytes_per_token == (D + 4 if tokens == "int8" else 4 + 2)  # 16 dims: 20 bytes, 6 bytes (vs 32 float16)
    assert np.array_equal(one["cb_vecs"][3:40], st["cb_vecs"][3:40])


def test_bad_tokens_values_and_a_store_of_another_kind_stop_naming_the_option(tmp_path, capsys):
    m = tiny_m3()
    m.save_pretrained(str(tmp_path / "ck"))
    data, st = str(tmp_path / "data"), str(tmp_path / "st")
    write_beir(data, np.random.default_rng(12), n_docs=20, n_q=3)
    base = ["--ckpt", str(tmp_path / "ck"), "--data", data, "--cache_dir", ""]
    for bad, error in ((["--tokens", "int4"], "--tokens: expected float16, int8 or pq<M>"),
                       (["--tokens", "pq0"], "--tokens: expected float16, int8 or pq<M>"),
                       (["--tokens", ""], "(M sub-vectors, e.g. pq32); got ''")):  # empty: not the default
        with pytest.raises(SystemExit):
            ev.main(["encode", *base, "--store", st, *bad])
        assert error in capsys.readouterr().err and not os.path.exists(st)
    D = tiny_m3().encode(["a b"])["colbert"][0].shape[1]
    with pytest.raises(ValueError, match=f"tokens pq7: M = 7 does not divide the token vectors' {D} dimensions"):
        ev.main(["encode", *base, "--store", st, "--tokens", "pq7"])
    assert not os.path.exists(st)  # nothing written
    with pytest.raises(ValueError, match="tokens int8: compact token vectors are a store's: pass store"):
        ev.evaluate(str(tmp_path / "ck"), data, tokens="int8", verbose=False)  # no store, no cache
    ev.main(["encode", *base, "--store", st, "--tokens", "int8"])
    before = {f: os.path.getmtime(os.path.join(st, f)) for f in os.listdir(st)}
    with pytest.raises(ValueError, match="field 'token_vectors': this store was written for 'int8', this run needs "
                                         r"'float16' \(another --tokens or --colbert_from\)"):
        ev.main([*base, "--store", st, "--tokens", "float16", "--out", str(tmp_path / "o")])
    res = ev.main([*base, "--store", st, "--out", str(tmp_path / "o")])  # no --tokens: as the store holds them
    assert res["tokens"] == "int8" and {f: os.path.getmtime(os.path.join(st, f)) for f in before} == before
    with pytest.raises(ValueError, match="tokens int8: a store for colbert_from encode holds no token vectors"):
        ev.evaluate(str(tmp_path / "ck"), data, protocol="paper", colbert_from="encode", tokens="int8",
                    cache_dir=str(tmp_path / "c"), verbose=False)


def test_a_shard_encoded_in_chunks_equals_one_call_for_each_kind():
    m = NoisyTokens()  # a text's vectors do not depend on its batch: chunks must change nothing
    for tv in ("float16", "int8", "pq2", "none"):
        meta = store.store_meta(packed.model_key(m), TEXTS, 64, False, tv)
        book = codec.train(packed.pack(m.encode(TEXTS))["cb_vecs"], tv)
        calls = m.calls
        one = shards.encode_compact(lambda: m, TEXTS, meta, 4, book)
        chunked = shards.encode_compact(lambda: m, TEXTS, meta, 4, book, tokens=5 * 64)  # 23 texts: 5 calls of <= 5
        assert m.calls - calls == 1 + 5 and list(one) == list(chunked)
        assert all(np.array_equal(one[k], chunked[k]) and one[k].dtype == chunked[k].dtype for k in one), tv
        assert ("cb_ptr" in one) == (tv != "none") and one["sp_ptr"][-1] == len(one["sp_ids"])


def test_one_pass_finds_what_a_flat_index_finds_and_scores_as_maxsim(tmp_path):
    m = NoisyTokens()
    P = store.as_stored(packed.pack(m.encode(TEXTS)))  # float16 token vectors, as a store holds them
    P = {"cb_ptr": np.insert(P["cb_ptr"], 3, P["cb_ptr"][3]), "cb_vecs": P["cb_vecs"]}  # passage 3 has no tokens
    Q = packed.pack(m.encode(TEXTS[:6]))
    Q = {"cb_ptr": np.insert(Q["cb_ptr"], 2, Q["cb_ptr"][2]), "cb_vecs": Q["cb_vecs"]}  # query 2 has no tokens
    rows = np.arange(1, 7)  # queries 1-6 of 7
    flat = search.build_index(np.asarray(P["cb_vecs"], np.float32), "Flat")  # the same values, float32
    tokens = Q["cb_vecs"][Q["cb_ptr"][1]:Q["cb_ptr"][7]]
    _, i_flat = flat.search(tokens, 8)
    N = len(P["cb_ptr"]) - 1
    for block in (1 << 15, 17):  # one block; blocks of whole passages of <= 17 tokens (at least one passage)
        hits, S = search.colbert_pass(Q, rows, P, 8, block_tokens=block, row_chunk=5)
        assert np.array_equal(hits, i_flat)
        for r, i in enumerate(rows):  # every passage's MaxSim, as maxsim scores it
            np.testing.assert_allclose(S[r], search.maxsim(Q, i, P, np.arange(N)), rtol=1e-6, atol=1e-6)
        assert not S[1].any() and not S[:, 3].any()  # the empty query, the empty passage: 0
    i8 = shards.encode_store(lambda: m, TEXTS, str(tmp_path / "i8"), store.store_meta(
        packed.model_key(m), TEXTS, 64, False, "int8"), 4, 7, progress=False)  # cb_vecs: a codec.Decoded
    hits, S = search.colbert_pass(Q, rows, i8, 8, block_tokens=17)
    assert np.array_equal(hits, search.build_index(i8["cb_vecs"][:], "Flat").search(tokens, 8)[1])
    np.testing.assert_allclose(S[0], search.maxsim(Q, 1, i8, np.arange(len(TEXTS))), rtol=1e-6, atol=1e-6)
