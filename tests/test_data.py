"""data.py: the index and its cache, bad-input errors, length-range batches per rank, sampling, collation, resume."""
import json
import logging
import os
import random
import re
import sys
from collections import Counter
from itertools import permutations

import numpy as np
import pytest
import torch

import data
import jsonl_index
from runtime import end_distributed
from tiny import WORDS, make_tokenizer, run

TOK = make_tokenizer("xlmr")
RANGES = [0, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8192]
BS = [6, 5, 4, 4, 3, 3, 2, 2, 2]
WORDS = WORDS[:22]  # the 22 words this file's texts are drawn from


def write(path, rows):
    """Rows are dicts (one JSON line each) or raw strings (written as they are)."""
    with open(path, "w") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def words(n, w="the"):
    return " ".join([w] * n)  # n tokens with the tiny tokenizer, n + 2 with <s> </s>


def ids(text, max_len=10_000):
    return TOK(text, truncation=True, max_length=max_len)["input_ids"]


def rows_of(p):
    return [r[m.bool()].tolist() for r, m in zip(p[0], p[1])]


def fake(lengths):
    return data.JsonlDataset("fake", jsonl_index.clip_lengths(np.asarray(lengths)))  # the plan needs lengths only


def opts(epoch=0, group_size=8, **kw):
    """(data.Sampling, epoch) from the keywords these tests use (group_size: Config's train_group_size)."""
    return data.Sampling(train_group_size=group_size, **kw), epoch


def mk(dss, batch, tok, **kw):
    """data.make_batch of batch with the Sampling options in kw (and epoch)."""
    return data.make_batch(dss, batch, tok, *opts(**kw))


def mixed_rows(n, seed=0):
    r = random.Random(seed)
    out = []
    for i in range(n):
        ex = {"query": f"{WORDS[i % len(WORDS)]} {words(r.randint(1, 20), 'cell')}",
              "pos": [words(r.randint(1, 60), "gene") + f" {i}" for _ in range(r.randint(1, 3))],
              "neg": [words(r.randint(1, 80), "protein") + f" {i} {k}" for k in range(r.randint(0, 9))]}
        ex["pos_scores"] = [r.random() for _ in ex["pos"]]
        ex["neg_scores"] = [r.random() for _ in ex["neg"]]
        if i % 3 == 0:
            ex["prompt"] = "represent this: "
        out.append(ex)
    return out

# ----------------------------------------------------------------------------- index and cache


def test_index_matches_brute_force_and_workers_agree(tmp_path, monkeypatch):
    rows = mixed_rows(60) + [{"query": "ünïcode ☃", "pos": ["x"], "prompt": None}]
    raw = [json.dumps(r) for r in rows]
    raw.insert(5, "   ")  # a blank line: skipped, counted, later line numbers still true
    path = write(tmp_path / "d.jsonl", raw)
    TOK("the cell", truncation=True, max_length=3)  # leaves truncation set on the backend; lengths must ignore it
    ds = data.open_datasets(path, TOK, num_workers=1, cache_dir=str(tmp_path / "c1"))[0]
    assert len(ds.lengths) == len(rows) and ds.meta["blank"] == 1
    for i, ex in enumerate(rows):
        assert data._read(ds, i) == (ex, (path, i + 1 + (i >= 5)))  # the example and its line
        texts = [(ex.get("prompt") or "") + ex["query"]] + ex["pos"] + ex.get("neg", [])
        assert ds.lengths[i] == max(len(TOK(t)["input_ids"]) for t in texts)
    assert ds.meta["empty_neg"] == sum(not r.get("neg") for r in rows)
    monkeypatch.setattr(jsonl_index, "CHUNK_BYTES", 300)  # many chunks over 2 forked workers
    ds2 = data.open_datasets(path, TOK, num_workers=2, cache_dir=str(tmp_path / "c2"))[0]
    for a in jsonl_index.ARRAYS:
        assert np.array_equal(getattr(ds, a), getattr(ds2, a))
    assert ds.meta == ds2.meta


def test_index_cache_reused_and_rebuilt_on_change(tmp_path, monkeypatch):
    built = []
    real = jsonl_index.build_index
    monkeypatch.setattr(jsonl_index, "build_index", lambda *a: built.append(a[0]) or real(*a))
    rows = mixed_rows(10)
    path = write(tmp_path / "d.jsonl", rows)
    ds = data.open_datasets(path, TOK)[0]
    assert len(built) == 1 and any(f.endswith(".idx") for f in os.listdir(tmp_path))  # cached next to the data
    TOK("a b c", truncation=True, max_length=2)  # per-call tokenizer state is not part of its identity
    again = data.open_datasets(path, TOK)[0]
    assert len(built) == 1 and np.array_equal(again.lengths, ds.lengths) and again.meta == ds.meta
    write(path, rows + [{"query": "q", "pos": [words(300)]}])  # file changed: rebuilt
    changed = data.open_datasets(path, TOK)[0]
    assert len(built) == 2 and len(changed.lengths) == 11 and changed.lengths[-1] == 302
    data.open_datasets(path, make_tokenizer("bert"))  # another tokenizer: its own index
    data.open_datasets(path, TOK)
    assert len(built) == 3
    cache_dir = tmp_path / "cache"
    data.open_datasets(path, TOK, cache_dir=str(cache_dir))
    data.open_datasets(path, TOK, cache_dir=str(cache_dir))
    assert len(built) == 4 and len(os.listdir(cache_dir)) == 1


def test_cached_index_is_memory_mapped_equals_the_built_one_and_a_damaged_cache_is_rebuilt(tmp_path, caplog):
    path = write(tmp_path / "d.jsonl", mixed_rows(30))
    built = jsonl_index.build_index(path, TOK, 1)
    ds = data.open_datasets(path, TOK)[0]
    again = data.open_datasets(path, TOK)[0]  # from the cache
    for a in jsonl_index.ARRAYS:
        assert isinstance(getattr(again, a), np.memmap) and not getattr(again, a).flags.writeable
        assert np.array_equal(getattr(again, a), getattr(built, a))
        assert getattr(again, a).dtype == getattr(built, a).dtype
    assert again.meta == built.meta == ds.meta
    cache = jsonl_index.cache_path(path, jsonl_index.tokenizer_id(TOK), None)
    npy = os.path.join(cache, "lengths.npy")
    open(npy, "r+b").truncate(os.path.getsize(npy) - 8)  # a killed copy, a full disk
    with caplog.at_level(logging.WARNING):
        fixed = data.open_datasets(path, TOK)[0]
    assert "unreadable" in caplog.text and np.array_equal(fixed.lengths, built.lengths)
    np.save(npy, np.ones(33, np.uint16))  # 33 examples need 3 blocks, the index has 2
    with caplog.at_level(logging.WARNING):
        data.open_datasets(path, TOK)
    assert "arrays of lengths [2, 2, 33]: expected 3 blocks for 33 examples" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", os.path.basename(cache)]  # no temporary directory left


def edit_in_place(path, old, new):
    """Replace bytes old by new (same length) in the middle of the file and give it back its mtime, as cp -p,
    rsync -a or tar leave a file that changed: size and mtime say nothing changed."""
    st, raw = os.stat(path), open(path, "rb").read()
    assert len(old) == len(new) and raw.count(old) == 1
    open(path, "wb").write(raw.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_same_size_edit_with_preserved_mtime_is_indexed_again(tmp_path, monkeypatch):
    built = []
    real = jsonl_index.build_index
    monkeypatch.setattr(jsonl_index, "build_index", lambda *a: built.append(a[0]) or real(*a))
    rows = [{"query": f"q{i}", "pos": [words(20_000, WORDS[i % 20])]} for i in range(60)]  # ~6 MB: a middle
    rows[30]["query"] = "the marked query"  # that neither its first nor its last megabyte covers
    path = write(tmp_path / "d.jsonl", rows)
    stale = data.open_datasets(path, TOK)[0]
    edit_in_place(path, b'{"query": "the marked', b'{"qxery": "the marked')  # line 31 now lacks 'query'
    with pytest.raises(ValueError, match=r"d.jsonl, line 31: field 'query': missing"):
        data.open_datasets(path, TOK)
    assert len(built) == 2  # the cache was not trusted
    # an index held from before the edit (a long run) stops at the line instead of training on a garbage text
    with pytest.raises(ValueError, match=r"d.jsonl, line 31: field 'query': missing \(did the file change"):
        data._read(stale, 30)
    assert data._read(stale, 29) == (rows[29], (path, 30))


def test_index_cache_survives_a_new_mtime_and_trusting_ranks_reuse_it(tmp_path, monkeypatch):
    built = []
    real = jsonl_index.build_index
    monkeypatch.setattr(jsonl_index, "build_index", lambda *a: built.append(a[0]) or real(*a))
    path = write(tmp_path / "d.jsonl", mixed_rows(10))
    data.open_datasets(path, TOK)
    os.utime(path, ns=(1, 10 ** 18))  # a fresh clone or a copy: same content, new mtime
    data.open_datasets(path, TOK, verify=False)  # a trusting rank does not hash: the cheap key differs -> rebuild
    assert len(built) == 2
    os.utime(path, ns=(1, 2 * 10 ** 18))
    cache = next(str(p) for p in tmp_path.iterdir() if p.name.endswith(".idx"))
    key = open(os.path.join(cache, "key.json"), "rb").read()
    a = data.open_datasets(path, TOK)[0]  # the content hash matches: reused, the new mtime recorded
    b = data.open_datasets(path, TOK, verify=False)[0]  # so the other ranks trust it without hashing
    assert len(built) == 2 and np.array_equal(a.block_offsets, b.block_offsets) and a.meta == b.meta
    assert open(os.path.join(cache, "key.json"), "rb").read() == key  # a tracked index stays unmodified in git
    assert json.load(open(os.path.join(cache, "mtime.json"))) == {"mtime_ns": 2 * 10 ** 18}


def test_read_refuses_a_line_that_moved_since_indexing(tmp_path):
    rows = mixed_rows(8)
    path = write(tmp_path / "d.jsonl", rows)
    ds = data.open_datasets(path, TOK)[0]
    write(path, [{"query": "x"}] + rows)  # a line inserted before: every offset now points into another line
    errs = []
    for i in range(1, 8):
        try:
            data._read(ds, i)
        except ValueError as e:
            errs.append(str(e))
    assert len(errs) == 7 and all(re.search(r"d.jsonl, line \d+: ", e) for e in errs)


def blank_spaced(n, seed):
    """n example lines with blank lines at the start, just before and after every block's first example (16 b) and
    its predecessor, and at the end -> (the raw lines, [(1-based line, example)] per example)."""
    raw, want = ["", "  "], []
    for i, ex in enumerate(mixed_rows(n, seed)):
        if i % jsonl_index.INDEX_BLOCK in (0, 1, 15):
            raw += ["", " \t "][:1 + i % 2]
        raw.append(json.dumps(ex))
        want.append((len(raw), ex))
    return raw + ["", "   ", ""], want


@pytest.mark.parametrize("n", [1, 5, 15, 16, 17, 33, 50])
def test_compact_index_reads_every_example_as_a_line_by_line_parse(tmp_path, monkeypatch, n):
    raw, want = blank_spaced(n, seed=n)
    path = write(tmp_path / "d.jsonl", raw)
    content = open(path, "rb").read()
    assert [(k, json.loads(x)) for k, x in enumerate(content.split(b"\n"), 1) if x.strip()] == want  # brute force
    ds = data.open_datasets(path, TOK)[0]  # built, then memory-mapped from its cache
    assert [data._read(ds, i) for i in range(n)] == [(ex, (path, line)) for line, ex in want]
    starts = np.cumsum([0] + [len(x) + 1 for x in content.split(b"\n")])  # (lines + 1,) byte offset of every line
    first = [want[i][0] for i in range(0, n, jsonl_index.INDEX_BLOCK)]  # the line of each block's first example
    assert ds.block_lines.tolist() == first and ds.block_offsets.tolist() == [starts[x - 1] for x in first]
    assert ds.lengths.dtype == np.uint16 and ds.block_offsets.dtype == ds.block_lines.dtype == np.int64
    assert sum(getattr(ds, a).nbytes for a in jsonl_index.ARRAYS) == 2 * n + 16 * len(first)  # ~3 bytes per example
    for chunk in (200, 5_000, 12_000):  # chunks of 1, ~2 and ~5 lines that cut blocks, over 2 workers: the same index
        monkeypatch.setattr(jsonl_index, "CHUNK_BYTES", chunk)
        built = jsonl_index.build_index(path, TOK, 2)
        for a in jsonl_index.ARRAYS:
            assert isinstance(getattr(ds, a), np.memmap) and np.array_equal(getattr(ds, a), getattr(built, a)), a
        assert built.meta == ds.meta and ds.meta["blank"] == len(raw) - n


def test_a_file_edited_after_indexing_stops_at_the_line_of_the_example(tmp_path):
    raw, want = blank_spaced(40, seed=1)
    path = write(tmp_path / "d.jsonl", raw)
    ds = data.open_datasets(path, TOK)[0]
    content = open(path, "rb").read()
    starts = np.cumsum([0] + [len(x) + 1 for x in content.split(b"\n")])  # (lines + 1,) byte offset of every line

    def read_edited(i, at, new):  # example i after the same number of bytes at byte `at` became `new`
        open(path, "wb").write(content[:at] + new + content[at + len(new):])
        return data._read(ds, i)

    line = want[20][0]  # block 1, after the blank lines around its first example
    at = starts[line - 1] + raw[line - 1].index('"query"')
    with pytest.raises(ValueError, match=rf"d.jsonl, line {line}: field 'query': missing \(did the file change"):
        read_edited(20, at, b'"qxery"')
    assert read_edited(21, at, b'"qxery"') == (want[21][1], (path, want[21][0]))  # its neighbour reads as before
    block_1 = want[16][0]  # a blank line before it: "\n\n{" becomes " \n" + the line without its "{"
    with pytest.raises(ValueError, match=rf"d.jsonl, line {block_1}: not at the start of a line"):
        read_edited(20, starts[block_1 - 2], b" \n")
    last = want[39][0]  # the last example's line blanked out: the file ends before it
    with pytest.raises(ValueError, match=rf"d.jsonl, line {len(raw) + 1}: the file ends before this example"):
        read_edited(39, starts[last - 1], b" " * len(raw[last - 1]))
    open(path, "ab").write(b"\n")
    with pytest.raises(ValueError, match=rf"d.jsonl, line {want[0][0]}: the file has {len(content) + 1} bytes, "
                                         rf"{len(content)} when indexed"):
        data._read(ds, 0)


def test_merged_small_files_read_each_example_from_its_part_at_its_line(tmp_path):
    files = {"a.jsonl": blank_spaced(20, 2), "b.jsonl": blank_spaced(17, 3), "c.jsonl": blank_spaced(3, 4)}
    for name, (raw, _) in files.items():
        write(tmp_path / name, raw)
    (merged,) = data.open_datasets(str(tmp_path), TOK, small_threshold=100)
    want = [(ex, (str(tmp_path / name), line)) for name, (_, w) in files.items() for line, ex in w]
    assert merged.part_starts.tolist() == [0, 20, 37, 40] and merged.block_offsets is None
    assert [data._read(merged, j) for j in range(40)] == want
    assert np.array_equal(merged.lengths, np.concatenate([p.lengths for p in merged.parts]))
    out = mk([merged], [(0, 19), (0, 20), (0, 36), (0, 39)], TOK, group_size=2, **BATCH_KW)
    assert out["source"] == [want[j][1] for j in (19, 20, 36, 39)]


def test_lengths_past_uint16_are_clipped_not_wrapped(tmp_path):
    got = jsonl_index.clip_lengths(np.array([0, 8192, 65534, 65535, 65536, 70_000, 2 ** 31 - 1], np.int64))
    assert got.dtype == np.uint16 and got.tolist() == [0, 8192, 65534, 65535, 65535, 65535, 65535]
    path = write(tmp_path / "long.jsonl", [{"query": "q", "pos": [words(70_000)]}, GOOD])
    want = max(len(ids(t)) for t in ("q", "p", "n"))
    assert data.open_datasets(path, TOK)[0].lengths.tolist() == [65535, want]


def test_directory_gives_one_dataset_per_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "b.jsonl", mixed_rows(3))
    write(tmp_path / "a.json", mixed_rows(4))
    write(tmp_path / "sub" / "c.jsonl", mixed_rows(5))
    (tmp_path / "notes.txt").write_text("not data")
    for _ in range(2):  # the second time the cached indexes sit in the directory too
        dss = data.open_datasets(str(tmp_path), TOK)
        assert [os.path.relpath(d.path, tmp_path) for d in dss] == ["a.json", "b.jsonl", "sub/c.jsonl"]
        assert [len(d.lengths) for d in dss] == [4, 3, 5]


GOOD = {"query": "q", "pos": ["p"], "neg": ["n"]}
BAD = [
    ('{"query": "q", "pos": ["p"]', "malformed JSON"),
    ('["q", "p"]', "expected a JSON object"),
    ({"pos": ["p"]}, "field 'query': missing"),
    ({"query": "  ", "pos": ["p"]}, "field 'query': empty"),
    ({"query": 3, "pos": ["p"]}, "field 'query': expected a string"),
    ({"query": "q"}, "field 'pos': missing"),
    ({"query": "q", "pos": []}, "field 'pos': empty list"),
    ({"query": "q", "pos": "p"}, "field 'pos': expected a list of strings"),
    ({"query": "q", "pos": ["p"], "neg": ["n", 1]}, "field 'neg': expected a list of strings"),
    ({"query": "q", "pos": ["p"], "pos_scores": [1, 2]}, "field 'pos_scores': 2 scores for 1 'pos' texts"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": []}, "field 'neg_scores': 0 scores for 1 'neg' texts"),
    ({"query": "q", "pos": ["p"], "neg_scores": ["high"]}, "field 'neg_scores': expected a list of numbers"),
    ({"query": "q", "pos": ["p"], "prompt": 5}, "field 'prompt': expected a string"),
    ({"query": "q", "pos": ["p"], "type": "classification"}, "field 'type': unsupported value \"classification\""),
    ({"query": "q", "pos": ["p"], "batch_size": 0}, "field 'batch_size': expected an integer >= 1, got 0"),
    ({"query": "q", "pos": ["p"], "type": "only_1neg"}, "field 'type': \"only_1neg\" here but \"normal\" on the"),
    ({"query": "q", "pos": ["p"], "batch_size": 4}, "field 'batch_size': 4 here but null on the file's first example"),
]


@pytest.mark.parametrize("bad,msg", BAD)
def test_bad_line_names_file_line_and_field(tmp_path, bad, msg):
    path = write(tmp_path / "bad.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: {msg}")):
        data.open_datasets(path, TOK)


def test_bad_line_number_in_a_later_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl_index, "CHUNK_BYTES", 100)
    path = write(tmp_path / "bad.jsonl", [GOOD] * 36 + ["", {"query": "q", "pos": []}] + [GOOD] * 30)
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 38: field 'pos': empty list")):
        data.open_datasets(path, TOK, num_workers=2)


def test_empty_files_missing_paths_and_kd_requirements(tmp_path):
    for name, rows in (("empty.jsonl", []), ("blank.jsonl", ["", "  "])):
        path = write(tmp_path / name, rows)
        with pytest.raises(ValueError, match=re.escape(f"{path}: empty file")):
            data.open_datasets(path, TOK)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.open_datasets(str(tmp_path / "nope.jsonl"), TOK)
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jsonl"):
        data.open_datasets(str(tmp_path / "d"), TOK)
    scored = {"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1], "neg_scores": [0]}
    path = write(tmp_path / "kd.jsonl", [scored, {**scored, "neg_scores": None}])
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: field 'neg_scores': expected a list of numbers")):
        data.open_datasets(path, TOK)
    path = write(tmp_path / "kd2.jsonl", [scored, scored, {"query": "q", "pos": ["p"], "neg": ["n"]}])
    assert len(data.open_datasets(path, TOK)[0].lengths) == 3  # fine without kd
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 3: field 'pos_scores': missing")):
        data.open_datasets(path, TOK, teacher_kd=True)
    path = write(tmp_path / "kd3.jsonl", [scored, {**scored, "neg": [], "neg_scores": []}])
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: field 'neg': empty")):
        data.open_datasets(path, TOK, teacher_kd=True)

# ----------------------------------------------------------------------------- length-range batches


def expected_range(n):
    return max(k for k in range(len(BS)) if n >= RANGES[k])  # [r[k], r[k+1]); above the last edge -> last range


def test_buckets_batch_sizes_and_tail(tmp_path):
    r = np.random.default_rng(0)
    edges = [0, 499, 500, 999, 1000, 1999, 2000, 6999, 7000, 8191, 8192, 20000]
    dss = [fake(r.choice(edges, 300)), fake(r.integers(0, 9000, 200))]
    batches = data.epoch_batches(dss, epoch=0, seed=0, world_size=1, rank=0, length_ranges=RANGES, batch_sizes=BS)
    seen = Counter()
    for b in batches:
        (d,) = {d for d, _ in b}  # one dataset per batch
        (k,) = {expected_range(dss[d].lengths[i]) for _, i in b}  # one length range per batch
        assert len(b) == BS[k] or 2 <= len(b) < BS[k]
        seen[d, k, len(b) == BS[k]] += len(b)
    for d, ds in enumerate(dss):
        for k in range(len(BS)):
            n = sum(expected_range(x) == k for x in ds.lengths)
            assert seen[d, k, True] == n // BS[k] * BS[k]
            assert seen[d, k, False] == (n % BS[k] if n % BS[k] >= 2 else 0)  # tail rule with W = 1


@pytest.mark.parametrize("tail,n_batches,last", [(3, 2, 5), (4, 3, 2), (9, 3, 4)])
def test_tail_rule_same_steps_and_sizes_on_every_rank(tail, n_batches, last):
    ds = fake([10] * (2 * 10 + tail))  # W=2, bs=5: two full global batches of 10, then the tail
    per_rank = [data.epoch_batches([ds], epoch=3, seed=1, world_size=2, rank=r, length_ranges=RANGES,
                                   batch_sizes=[5] + BS[1:]) for r in range(2)]
    for b in per_rank:
        assert len(b) == n_batches and sorted(len(x) for x in b)[0] == last
    assert [len(x) for x in per_rank[0]] == [len(x) for x in per_rank[1]]


def test_rank_slices_are_disjoint_and_cover_the_global_batch():
    W, r = 3, np.random.default_rng(1)
    counts = {100: BS[0] * W * 7, 700: BS[1] * W * 4, 8000: BS[8] * W * 5}  # no tails: every bucket cuts exactly
    dss = [fake(r.permutation(np.repeat(list(counts), list(counts.values())))), fake([100] * BS[0] * W * 3)]
    args = dict(epoch=2, seed=7, length_ranges=RANGES)
    ranks = [data.epoch_batches(dss, world_size=W, rank=k, batch_sizes=BS, **args) for k in range(W)]
    glob = data.epoch_batches(dss, world_size=1, rank=0, batch_sizes=[b * W for b in BS], **args)
    assert [len(b) for b in ranks] == [len(glob)] * W
    for step, g in enumerate(glob):
        assert sum((rb[step] for rb in ranks), []) == g  # rank k holds slice k of the same global batch
    flat = [x for rb in ranks for b in rb for x in b]
    assert len(flat) == len(set(flat)) == sum(len(d.lengths) for d in dss)  # disjoint, and every example once


def test_epoch_batches_deterministic_per_epoch_and_seed():
    dss = [fake(np.random.default_rng(2).integers(0, 3000, 500))]
    run = lambda **kw: list(data.epoch_batches(dss, **{**dict(epoch=0, seed=0, world_size=2, rank=1,  # noqa: E731
                                                             length_ranges=RANGES, batch_sizes=BS), **kw}))
    a = run()
    assert a == run() and a != run(epoch=1) and a != run(seed=1)
    b = data.epoch_batches(dss, epoch=0, seed=0, world_size=2, rank=1, length_ranges=RANGES, batch_sizes=BS)
    assert b[-1] == a[-1] and b[2:5] == a[2:5] and list(b) == a


def reference_epoch_batches(datasets, *, epoch, seed, world_size, rank, length_ranges, batch_sizes,
                            group_by_length=False, sort_window=data.SORT_WINDOW):
    """The plan as first written: every bucket's whole permutation and every rank's part kept (n x int64 several
    times over). The memory-light data.epoch_batches must give exactly these batches."""
    W, rng = world_size, np.random.default_rng([seed, epoch])
    inner, glob = np.asarray(length_ranges[1:-1]), []
    for d, ds in enumerate(datasets):
        bucket = np.searchsorted(inner, ds.lengths, side="right")
        for k, bs in enumerate(batch_sizes):
            idx, gbs = rng.permutation(np.flatnonzero(bucket == k)), bs * W
            if group_by_length:
                for s in range(0, len(idx), sort_window * gbs):
                    w = idx[s:s + sort_window * gbs]
                    idx[s:s + len(w)] = w[np.argsort(ds.lengths[w], kind="stable")]
            n_full = len(idx) // gbs
            glob += [(d, idx[b * gbs:(b + 1) * gbs]) for b in range(n_full)]
            tail = len(idx) - n_full * gbs
            if tail >= 2 * W:
                glob.append((d, idx[n_full * gbs:n_full * gbs + tail // W * W]))
    glob = [glob[j] for j in rng.permutation(len(glob))]
    return [[(d, int(i)) for i in ix[rank * (len(ix) // W):(rank + 1) * (len(ix) // W)]] for d, ix in glob]


def test_memory_light_plan_equals_the_reference_plan():
    r = np.random.default_rng(0)
    for trial in range(12):
        cap = 200_000 if trial % 3 == 0 else 9000  # lengths past 2**16 are clipped, as the index holds them
        dss = [fake(np.minimum(r.lognormal(5 + 3 * (cap > 9000), 1.2, r.integers(50, 3000)).astype(np.int32) + 3, cap))
               for _ in range(r.integers(1, 4))]
        W = int(r.integers(1, 6))
        kw = dict(epoch=int(r.integers(3)), seed=trial, world_size=W, length_ranges=RANGES, batch_sizes=BS,
                  group_by_length=bool(trial % 2), sort_window=int(r.integers(1, 5)))
        for rank in range(W):
            got = data.epoch_batches(dss, rank=rank, **kw)
            want = reference_epoch_batches(dss, rank=rank, **kw)
            assert len(got) == len(want) > 0 and got[:] == want, (trial, rank)
    n = 40_000  # chunked bucketing and member lists, across several chunks
    lengths = r.integers(1, 9000, n).astype(np.int32)
    bucket = data.length_buckets(lengths, RANGES, chunk=4096)
    assert np.array_equal(bucket, np.searchsorted(np.asarray(RANGES[1:-1]), lengths, side="right"))
    for k in range(len(BS)):
        assert np.array_equal(data.bucket_members(bucket, k, chunk=4096), np.flatnonzero(bucket == k))


def padding_efficiency(ds, batches):
    real = sum(int(ds.lengths[i]) for b in batches for _, i in b)
    return real / sum(len(b) * max(int(ds.lengths[i]) for _, i in b) for b in batches)


def test_group_by_length_cuts_padding_and_keeps_shuffling():
    r = np.random.default_rng(3)
    ds = fake(np.clip(r.lognormal(4.5, 0.8, BS[0] * 2 * 200), 8, 499).astype(int))  # all in range 0, no tail at W=2
    kw = dict(seed=0, world_size=2, rank=0, length_ranges=RANGES, batch_sizes=BS)
    plain = data.epoch_batches([ds], epoch=0, **kw)
    grouped = data.epoch_batches([ds], epoch=0, group_by_length=True, sort_window=16, **kw)
    assert padding_efficiency(ds, grouped) > 0.9 > padding_efficiency(ds, plain) + 0.2
    everyone = [x for k in range(2) for b in data.epoch_batches([ds], epoch=0, group_by_length=True, sort_window=16,
                                                                **{**kw, "rank": k}) for x in b]
    assert sorted(everyone) == [(0, i) for i in range(len(ds.lengths))]  # grouping reorders, never drops
    maxes = [max(ds.lengths[i] for _, i in b) for b in grouped]
    assert maxes != sorted(maxes)  # batches are not served shortest first
    again = data.epoch_batches([ds], epoch=1, group_by_length=True, sort_window=16, **kw)
    assert {frozenset(b) for b in grouped} != {frozenset(b) for b in again}  # batch contents vary by epoch

# ----------------------------------------------------------------------------- sampling and collation


BATCH_KW = dict(epoch=0, seed=0, query_max_len=16, passage_max_len=24)


def test_collation_layout_padding_truncation_prompt(tmp_path):
    rows = [{"query": "the cell", "pos": ["gene a"], "neg": [f"protein {w}" for w in WORDS[:5]], "prompt": "is a: "},
            {"query": words(40, "of"), "pos": [words(50, "and")], "neg": [f"to {w}" for w in WORDS[:5]]},
            {"query": "we", "pos": ["cells"], "neg": [f"by {w}" for w in WORDS[:5]], "prompt": None}]
    path = write(tmp_path / "d.jsonl", [rows[0], "", rows[1], rows[2]])
    dss = data.open_datasets(path, TOK)
    G = 3
    out = mk(dss, [(0, 0), (0, 1), (0, 2)], TOK, group_size=G, **BATCH_KW)
    assert out["q_ids"].shape == (3, 16) and out["p_ids"].shape == (9, 24) and out["teacher"] is None
    assert rows_of((out["q_ids"], out["q_mask"])) == [ids("is a: the cell"), ids(words(40, "of"), 16), ids("we")]
    assert len(ids(words(40, "of"), 16)) == 16 and ids(words(40, "of"), 16)[-1] == TOK.eos_token_id
    p = rows_of((out["p_ids"], out["p_mask"]))
    for i, ex in enumerate(rows):
        assert p[i * G] == ids(ex["pos"][0], 24)  # group-major: the positive of query i is row i*G
        negs = {tuple(ids(t, 24)) for t in ex["neg"]}
        group_negs = {tuple(x) for x in p[i * G + 1:(i + 1) * G]}
        assert group_negs <= negs and len(group_negs) == 2  # from this query's own negatives, without replacement
    assert out["source"] == [(path, 1), (path, 3), (path, 4)]
    for t, m in ((out["q_ids"], out["q_mask"]), (out["p_ids"], out["p_mask"])):
        assert t.dtype == m.dtype == torch.long and torch.all(t[m == 0] == TOK.pad_token_id)
    small = mk(dss, [(0, 0), (0, 2)], TOK, group_size=G, **BATCH_KW)
    assert small["q_ids"].shape == (2, 8)  # longest query is 7 tokens -> padded to the next multiple of 8


def scored_file(tmp_path, negs, scores, name="s.jsonl"):
    row = {"query": "q", "pos": ["gene", "cell"], "pos_scores": [5.0, 6.0], "neg": negs, "neg_scores": scores}
    return data.open_datasets(write(tmp_path / name, [row]), TOK, teacher_kd=True), row


def picked(out, row):
    """Negative indices of the passages in the single group of `out`, and the check that scores travel with them."""
    text_of = {tuple(ids(t)): k for k, t in enumerate(row["neg"])}
    p = rows_of((out["p_ids"], out["p_mask"]))
    picks = [text_of[tuple(x)] for x in p[1:]]
    pos = ["gene", "cell"].index(TOK.decode(p[0], skip_special_tokens=True))
    want = torch.tensor([row["pos_scores"][pos]] + [row["neg_scores"][k] for k in picks], dtype=torch.float32)
    assert out["teacher"].dtype == torch.float32 and torch.equal(out["teacher"][0], want)
    return picks, pos


def test_sampling_short_pool_replicates_balanced_and_sorts_by_teacher(tmp_path):
    dss, row = scored_file(tmp_path, ["a", "of", "the"], [0.1, 0.9, 0.5])
    positives = set()
    for epoch in range(20):
        out = mk(dss, [(0, 0)], TOK, group_size=8, teacher_kd=True, **{**BATCH_KW, "epoch": epoch})
        picks, pos = picked(out, row)
        positives.add(pos)
        c = Counter(picks)
        assert len(picks) == 7 and set(c) == {0, 1, 2} and max(c.values()) <= 3  # ceil(7/3) copies of each, sampled
        t = out["teacher"][0, 1:].tolist()
        assert t == sorted(t, reverse=True)  # negatives by teacher score, descending; positive first
    assert positives == {0, 1}  # the positive is drawn from all of pos


def test_sampling_large_pool_without_replacement(tmp_path):
    negs = WORDS[:12]
    dss, row = scored_file(tmp_path, negs, [float(k % 5) for k in range(12)])
    subsets = set()
    for epoch in range(10):
        out = mk(dss, [(0, 0)], TOK, group_size=8, teacher_kd=True, **{**BATCH_KW, "epoch": epoch})
        picks, _ = picked(out, row)
        assert len(set(picks)) == 7
        subsets.add(frozenset(picks))
    assert len(subsets) > 1


def test_empty_negative_pool_borrows_from_same_dataset_and_warns_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(data, "_warned", set())
    rows = [{"query": "q", "pos": [f"cell {w}"]} for w in WORDS[:3]]  # no neg at all
    rows += [{"query": "q", "pos": [f"gene {w}"], "neg": [f"protein {w}"]} for w in WORDS[3:6]]
    rows[1]["neg"] = []
    write(tmp_path / "a.jsonl", rows)
    write(tmp_path / "b.jsonl", [{"query": "q", "pos": ["study"], "neg": ["mice"]}])
    dss = data.open_datasets(str(tmp_path), TOK)
    caplog.set_level(logging.WARNING)
    for epoch in range(5):
        out = mk(dss, [(0, 0), (0, 1), (1, 0)], TOK, group_size=4, **{**BATCH_KW, "epoch": epoch})
        p = [tuple(x) for x in rows_of((out["p_ids"], out["p_mask"]))]
        for q in (0, 1):
            others = {tuple(ids(t)) for j, r in enumerate(rows) if j != q for t in r["pos"] + r.get("neg", [])}
            assert p[q * 4] == tuple(ids(rows[q]["pos"][0])) and set(p[q * 4 + 1:q * 4 + 4]) <= others
        again = mk(dss, [(0, 0), (0, 1), (1, 0)], TOK, group_size=4, **{**BATCH_KW, "epoch": epoch})
        assert torch.equal(out["p_ids"], again["p_ids"])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "a.jsonl: 3 of 6 queries have no 'neg'" in warnings[0]


def test_pretraining_pairs_group_size_one(tmp_path, caplog):
    rows = [{"query": f"q {w}", "pos": [f"p {w}"]} for w in WORDS[:4]]
    dss = data.open_datasets(write(tmp_path / "pairs.jsonl", rows), TOK)
    caplog.set_level(logging.WARNING)
    out = mk(dss, [(0, 3), (0, 1)], TOK, group_size=1, **BATCH_KW)
    assert rows_of((out["p_ids"], out["p_mask"])) == [ids("p " + WORDS[3]), ids("p " + WORDS[1])]
    assert out["teacher"] is None and not caplog.records  # in-batch negatives only: nothing borrowed, nothing to report


def test_chunk_shuffle_of_positives(tmp_path):
    r = random.Random(0)
    text = "".join(r.choice("abcdefgh") for _ in range(150))
    shuffled = [data._chunk_shuffle(text, np.random.default_rng(s)) for s in range(5)]
    assert all(sorted(t.split(" ")) == sorted([text[:51], text[51:102], text[102:]]) for t in shuffled)
    assert any(t.replace(" ", "") != text for t in shuffled)
    rows = [{"query": "q", "pos": [text], "neg": ["the", "of"]}, {"query": "q", "pos": ["short"], "neg": ["a"]}]
    dss = data.open_datasets(write(tmp_path / "d.jsonl", rows), TOK)
    kw = dict(group_size=2, **{**BATCH_KW, "passage_max_len": 200})
    plain = rows_of((lambda o: (o["p_ids"], o["p_mask"]))(mk(dss, [(0, 0), (0, 1)], TOK, **kw)))
    shuf = rows_of((lambda o: (o["p_ids"], o["p_mask"]))(
        mk(dss, [(0, 0), (0, 1)], TOK, shuffle_ratio=1.0, **kw)))
    thirds = [text[:51], text[51:102], text[102:]]
    assert shuf[0] in [ids(" ".join(p)) for p in permutations(thirds) if list(p) != thirds]
    assert shuf[1:] == plain[1:]  # negatives and short (<= 100 chars) positives are never shuffled

# ----------------------------------------------------------------------------- resume and rank independence


def test_resume_at_step_equals_uninterrupted_run(tmp_path):
    write(tmp_path / "a.jsonl", mixed_rows(40, seed=1))
    write(tmp_path / "b.jsonl", [r for r in mixed_rows(30, seed=2) if r.get("neg")])
    ranges, bss = [0, 20, 60, 8192], [3, 2, 2]
    kw = dict(group_size=4, query_max_len=12, passage_max_len=40, shuffle_ratio=0.5, seed=5)

    def run_step(dss, step):
        batches = data.epoch_batches(dss, epoch=1, seed=5, world_size=2, rank=1, length_ranges=ranges,
                                     batch_sizes=bss, group_by_length=True)
        return mk(dss, batches[step], TOK, epoch=1, **kw), len(batches)

    dss = data.open_datasets(str(tmp_path), TOK)
    first, n = run_step(dss, 0)
    full = [first] + [run_step(dss, s)[0] for s in range(1, n)]
    assert n >= 5
    np.random.seed(123), torch.manual_seed(123), random.seed(123)  # a resumed process has other global RNG states
    dss = data.open_datasets(str(tmp_path), TOK)
    for step in (3, n - 1, 0):
        resumed, _ = run_step(dss, step)
        assert resumed["source"] == full[step]["source"]
        for k in ("q_ids", "q_mask", "p_ids", "p_mask"):
            assert torch.equal(resumed[k], full[step][k])


def test_ranks_sample_like_one_process_on_the_global_batch(tmp_path):
    rows = [r for r in mixed_rows(60) if r.get("neg")][:32]  # 32 = 4 global batches of 8: no tail at W=1 or W=2
    dss = data.open_datasets(write(tmp_path / "a.jsonl", rows), TOK, teacher_kd=True)
    kw = dict(epoch=0, seed=3, world_size=2, length_ranges=[0, 8192], batch_sizes=[4])
    r0, r1 = (data.epoch_batches(dss, rank=k, **kw) for k in range(2))
    glob = data.epoch_batches(dss, rank=0, **{**kw, "world_size": 1, "batch_sizes": [8]})
    kw_b = dict(epoch=0, seed=3, group_size=5, query_max_len=32, passage_max_len=64, teacher_kd=True)
    parts = [mk(dss, b[2], TOK, **kw_b) for b in (r0, r1)]
    whole = mk(dss, glob[2], TOK, **kw_b)
    assert rows_of((whole["p_ids"], whole["p_mask"])) == sum((rows_of((o["p_ids"], o["p_mask"])) for o in parts), [])
    assert torch.equal(whole["teacher"], torch.cat([o["teacher"] for o in parts]))


def test_batch_stream_prefetched_by_workers_equals_make_batch_in_order(tmp_path):
    write(tmp_path / "a.jsonl", [r for r in mixed_rows(60, seed=1) if r.get("neg")])  # teacher_kd needs negatives
    dss = data.open_datasets(str(tmp_path), TOK, teacher_kd=True)
    batches = data.epoch_batches(dss, epoch=1, seed=5, world_size=1, rank=0, length_ranges=[0, 20, 60, 8192],
                                 batch_sizes=[3, 2, 2], group_by_length=True)
    kw = dict(epoch=1, seed=5, group_size=4, query_max_len=12, passage_max_len=40, teacher_kd=True, shuffle_ratio=0.5)
    want = [mk(dss, batches[j], TOK, **kw) for j in range(2, len(batches))]
    assert len(want) >= 8
    for workers, prefetch in ((0, 1), (2, 3)):
        got = list(data.batch_stream(dss, batches, 2, TOK, *opts(**kw), num_workers=workers, prefetch=prefetch))
        assert [b["source"] for b in got] == [b["source"] for b in want], workers  # the same examples, in order
        for b, w in zip(got, want):
            for k in ("q_ids", "q_mask", "p_ids", "p_mask", "teacher"):
                assert torch.equal(b[k], w[k]), (workers, k)


def test_a_bad_line_read_by_a_worker_stops_with_file_line_and_reason(tmp_path):
    path = write(tmp_path / "a.jsonl", mixed_rows(12, seed=1))
    dss = data.open_datasets(path, TOK)
    batches = data.epoch_batches(dss, epoch=0, seed=0, world_size=1, rank=0, length_ranges=[0, 8192],
                                 batch_sizes=[2])
    bad = batches[3][0][1]  # the first example of the 4th batch: its line is broken after indexing
    lines = open(path).read().split("\n")
    lines[bad] = lines[bad][:-1] + " "  # the same byte length, no closing brace
    open(path, "w").write("\n".join(lines))
    stream = data.batch_stream(dss, batches, 0, TOK, *opts(seed=0, group_size=2, query_max_len=12, passage_max_len=40),
                               num_workers=2, prefetch=2)
    for _ in range(3):
        next(stream)  # the batches before it arrive
    with pytest.raises(ValueError, match=f"a.jsonl, line {bad + 1}: malformed JSON"):
        next(stream)


def test_data_stall_bench_runs_and_ends_with_its_figure():
    out = run([sys.executable, "bench/data_stall.py", "--quick"],
              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"data_wait_fraction=\d+\.\d{4}", last) and 0 <= float(last.split("=")[1]) <= 1, last


def _share_worker(rank, init_file, root, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    built = []
    real = jsonl_index.build_index
    jsonl_index.build_index = lambda *a: built.append(os.path.basename(a[0])) or real(*a)
    dss = data.open_datasets(root, TOK, share=(rank, 2, torch.distributed.barrier))
    torch.save({"built": built, "arrays": [[np.array(getattr(d, a)) for a in jsonl_index.ARRAYS] for d in dss]},
               f"{out}.{rank}")
    end_distributed()


def test_two_ranks_split_the_index_build_and_get_the_single_process_index(tmp_path):
    from tiny import spawn
    for root in ("one", "two"):
        (tmp_path / root).mkdir()
        for k, n in enumerate((7, 5, 9)):
            write(tmp_path / root / f"part-{k}.jsonl", mixed_rows(n, seed=k))
    single = data.open_datasets(str(tmp_path / "one"), TOK)
    spawn(_share_worker, (str(tmp_path / "two"), str(tmp_path / "out")), nprocs=2)
    res = [torch.load(f"{tmp_path / 'out'}.{r}", weights_only=False) for r in (0, 1)]
    assert res[0]["built"] == ["part-0.jsonl", "part-2.jsonl"] and res[1]["built"] == ["part-1.jsonl"]
    for r in res:  # every rank then holds every file's index, identical to one process's build
        assert len(r["arrays"]) == len(single) == 3
        for got, ds in zip(r["arrays"], single):
            for x, a in zip(got, jsonl_index.ARRAYS):
                assert np.array_equal(x, getattr(ds, a)), a


def test_index_scale_bench_runs_and_ends_with_its_figures():
    out = run([sys.executable, "bench/index_scale.py", "--quick"],
              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"index_rss_per_rank_mb_at_1p2b=-?\d+ plan_s_at_1p2b=-?\d+\.\d", last), last


# ----------------------------------------------------------------------------- the reference's options (SPEC 4.1, 4.4)


def texts_of(ids, mask):
    """The decoded rows of a padded batch, special tokens dropped."""
    return [TOK.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(ids, mask)]


def test_type_sets_the_group_size_and_symmetric_batches_are_halved(tmp_path):
    negs = lambda i, n: [f"protein {WORDS[i]} {WORDS[k]}" for k in range(n)]  # noqa: E731
    one = data.open_datasets(write(tmp_path / "one.jsonl", [{"query": f"q {WORDS[i]}", "pos": [f"gene {WORDS[i]}"],
                                                             "neg": negs(i, 5), "type": "only_1neg"}
                                                            for i in range(4)]), TOK)
    out = mk(one, [(0, 0), (0, 1), (0, 2)], TOK, group_size=4, **BATCH_KW)
    p = texts_of(out["p_ids"], out["p_mask"])
    assert out["group_size"] == 2 and len(p) == 6  # [pos, one own negative] per query, whatever train_group_size
    assert all(p[2 * i] == f"gene {WORDS[i]}" and p[2 * i + 1] in negs(i, 5) for i in range(3))
    cls = data.open_datasets(write(tmp_path / "cls.jsonl", [{"query": f"q {i}", "pos": ["gene"], "neg": negs(i, n),
                                                             "type": "symmetric_class"}
                                                            for i, n in enumerate([4, 2, 3])]), TOK)
    assert cls[0].meta["min_neg"] == 2 and data.file_group_size(cls[0], 8) == 3 == data.file_group_size(cls[0], 5)
    assert data.file_group_size(cls[0], 2) == 2 and data.file_group_size(one[0], 8) == 2
    out = mk(cls, [(0, 1), (0, 2)], TOK, group_size=8, **BATCH_KW)
    p = texts_of(out["p_ids"], out["p_mask"])
    assert out["group_size"] == 3 and sorted(p[1:3]) == sorted(negs(1, 2)) and len(set(p[4:6])) == 2  # no repeats
    sts = data.open_datasets(write(tmp_path / "sts.jsonl", [{**GOOD, "type": "symmetric_sts"}] * 40), TOK)[0]
    assert data.dataset_batch_sizes(sts, [6, 5, 1]) == [3, 2, 1] and data.dataset_batch_sizes(one[0], [6, 5]) == [6, 5]
    kw = dict(epoch=0, seed=0, world_size=1, rank=0, length_ranges=[0, 64], batch_sizes=[6])
    assert [len(b) for b in data.epoch_batches([sts], **kw)] == [3] * 13  # 40 examples: 13 batches of 6 // 2
    sized = data.open_datasets(write(tmp_path / "bs.jsonl", [{**GOOD, "batch_size": 4, "type": "symmetric_sts"}] * 9),
                               TOK)[0]
    assert data.dataset_batch_sizes(sized, [6, 2]) == [4, 4]  # a batch_size field wins, halving or not (the reference)


def test_instructions_reach_the_right_texts(tmp_path):
    rows = [{"query": "the cell", "pos": ["gene a"], "neg": ["protein b"]},
            {"query": "we", "pos": ["cells"], "neg": ["mice"], "prompt": "is a: "},
            {"query": "of", "pos": ["data"], "neg": ["model"], "prompt": ""}]  # an empty prompt: no instruction
    dss = data.open_datasets(write(tmp_path / "d.jsonl", rows), TOK)
    kw = dict(group_size=2, query_prefix="query: ", passage_prefix="passage: ", **BATCH_KW)
    out = mk(dss, [(0, 0), (0, 1), (0, 2)], TOK, **kw)
    assert texts_of(out["q_ids"], out["q_mask"]) == ["query : the cell", "is a : we", "of"]
    assert texts_of(out["p_ids"], out["p_mask"]) == ["passage : gene a", "passage : protein b", "passage : cells",
                                                     "passage : mice", "passage : data", "passage : model"]
    sym = data.open_datasets(write(tmp_path / "s.jsonl", [{**r, "type": "symmetric_clustering"} for r in rows]), TOK)
    out = mk(sym, [(0, 0), (0, 1), (0, 2)], TOK, **kw)  # passages are queries too: the query's prompt
    assert texts_of(out["p_ids"], out["p_mask"]) == ["query : gene a", "query : protein b", "is a : cells",
                                                     "is a : mice", "data", "model"]
    plain = mk(dss, [(0, 0)], TOK, group_size=2, **BATCH_KW)
    assert texts_of(plain["q_ids"], plain["q_mask"]) == ["the cell"]  # no prefix, no "None" (SPEC 7)


def test_no_in_batch_neg_from_the_file_or_folder_name(tmp_path):
    (tmp_path / "cls_no_in_batch_neg").mkdir()
    write(tmp_path / "cls_no_in_batch_neg" / "a.jsonl", [GOOD] * 3)
    write(tmp_path / "b_no_in_batch_neg.jsonl", [GOOD] * 3)
    write(tmp_path / "c.jsonl", [GOOD] * 3)
    dss = data.open_datasets(str(tmp_path), TOK)
    assert [(os.path.relpath(d.path, tmp_path), d.no_in_batch_neg) for d in dss] == \
        [("b_no_in_batch_neg.jsonl", True), ("c.jsonl", False), ("cls_no_in_batch_neg/a.jsonl", True)]
    assert [mk(dss, [(d, 0)], TOK, group_size=2, **BATCH_KW)["no_in_batch_neg"] for d in range(3)] == \
        [True, False, True]
    assert data.open_datasets(str(tmp_path / "cls_no_in_batch_neg"), TOK)[0].no_in_batch_neg  # the folder given
    with pytest.raises(ValueError, match=r"b_no_in_batch_neg.jsonl: no_in_batch_neg data .* groups have 1 passage"):
        data.open_datasets(str(tmp_path), TOK, group_size=1)  # its own group alone: nothing to contrast
    assert len(data.open_datasets(str(tmp_path), TOK, group_size=2)) == 3


def test_small_files_of_a_folder_merge_and_the_merged_set_can_be_dropped(tmp_path):
    (tmp_path / "sub").mkdir()
    row = lambda name, i: {"query": f"{name} {i}", "pos": [f"gene {name} {i}"], "neg": ["protein"]}  # noqa: E731
    for name, n in (("big", 5), ("s1", 2), ("s2", 3)):
        write(tmp_path / f"{name}.jsonl", [row(name, i) for i in range(n)])
    write(tmp_path / "bs.jsonl", [{**row("bs", 0), "batch_size": 1}])
    write(tmp_path / "sym.jsonl", [{**row("sym", 0), "type": "symmetric_sts"}])  # another type: its own set
    write(tmp_path / "sub" / "s3.jsonl", [row("s3", 0)])
    dss = data.open_datasets(str(tmp_path), TOK, small_threshold=4, drop_threshold=2)
    assert [os.path.relpath(d.path, tmp_path) for d in dss] == ["big.jsonl", "[3 files < small_threshold 4]"]
    merged = dss[1]  # bs + s1 + s2; sym (1 example) and sub/s3 (1 example) dropped
    assert [os.path.basename(p.path) for p in merged.parts] == ["bs.jsonl", "s1.jsonl", "s2.jsonl"]
    assert data.dataset_batch_sizes(merged, [6, 3]) == [1, 1]  # the smallest of its files' (bs.jsonl's field)
    out = mk(dss, [(1, i) for i in range(6)], TOK, group_size=2, **BATCH_KW)
    assert rows_of((out["q_ids"], out["q_mask"])) == [ids(t) for t in ("bs 0", "s1 0", "s1 1", "s2 0", "s2 1", "s2 2")]
    assert out["source"] == [(str(tmp_path / f), n) for f, n in [("bs.jsonl", 1), ("s1.jsonl", 1), ("s1.jsonl", 2),
                                                                  ("s2.jsonl", 1), ("s2.jsonl", 2), ("s2.jsonl", 3)]]
    kept = data.open_datasets(str(tmp_path), TOK, small_threshold=4, drop_threshold=1)
    assert sorted(os.path.relpath(d.path, tmp_path) for d in kept) == \
        ["[3 files < small_threshold 4]", "big.jsonl", "sub/s3.jsonl", "sym.jsonl"]  # alone in their set: as they are
    assert len(data.open_datasets(str(tmp_path), TOK)) == 6  # small_threshold 0: one dataset per file
    with pytest.raises(ValueError, match="no data left"):
        data.open_datasets(str(tmp_path / "sub"), TOK, small_threshold=4, drop_threshold=2)


def test_file_values_must_agree_across_index_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl_index, "CHUNK_BYTES", 100)
    path = write(tmp_path / "t.jsonl", [{**GOOD, "type": "only_1neg"}] * 30 + [GOOD] + [{**GOOD, "type": "only_1neg"}])
    msg = f"{path}, line 31: field 'type': \"normal\" here but \"only_1neg\""  # the first line of a later chunk
    with pytest.raises(ValueError, match=re.escape(msg)):
        data.open_datasets(path, TOK, num_workers=2)
