"""The compact index of a JSONL training file (SPEC 4.1, 4.3): every line checked; per example its token length
(uint16, clipped at 65,535), and per block of INDEX_BLOCK = 16 examples the byte offset and 1-based line number of
the block's first example: 2 + 16 / 16 = 3 bytes per example. Built in parallel over byte chunks and cached next to
the data under a content key, as .npy files that every rank memory-maps (block_offsets, block_lines, lengths).
data.py reads example i from its block's first line forward, skipping blank lines as build_index does, and batches
examples by their lengths; nothing else of a file is held in memory. training_files: which files a train_data path
names (and refuses compressed ones: an index of byte offsets cannot read a stream).
"""
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from runtime import write_atomic

INDEX_VERSION = 6  # 2: the key hashes the whole file; 3: type, batch_size and min_neg per file; 4: .npy files;
# 5: offsets and line numbers per block of INDEX_BLOCK examples, uint16 lengths; 6: finite teacher scores, no empty
# texts, strict UTF-8 (every file indexed by 5 is checked again)
INDEX_BLOCK = 16  # examples per block: one offset and one line number each
LENGTH_MAX = 2 ** 16 - 1  # lengths are uint16: longer examples count as this long (the batcher only compares lengths)
CHUNK_BYTES = 4 << 20  # bytes per indexing task: spreads one file over the workers, bounds their memory
TYPES = ("normal", "only_1neg", "symmetric_class", "symmetric_sts", "symmetric_clustering")  # `type` (SPEC 4.1)
FILE_FIELDS = ("type", "batch_size")  # one value per file: its batches share one group size and one batch size
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark (Windows editors write it): skipped at the start of a line
JSON_EXT = (".jsonl", ".json")  # a folder's training files, in any case
COMPRESSED = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd", ".zip": "zip"}  # suffix -> kind
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}
UNPACK = {"gzip": "gunzip -k", "bzip2": "bunzip2 -k", "xz": "unxz -k", "zstd": "unzstd", "zip": "unzip"}
INDEX_DIR = re.compile(r"\.idx(\.(tmp|old)\d+)?(/|$)")  # a cache directory of this module, or in one
log = logging.getLogger("data")


@dataclass
class JsonlDataset:
    """One JSONL file: example i is the (i % 16)-th non-blank line from byte block_offsets[i // 16]; nothing else of
    the file is held in memory. A merged dataset (data.merge_small) has parts instead of blocks."""
    path: str
    lengths: np.ndarray  # (n,) uint16 max token length (with special tokens) over query, pos and neg texts, clipped
    block_offsets: np.ndarray = None  # (ceil(n / 16),) int64 byte offset of the line of example 16 b
    block_lines: np.ndarray = None  # (ceil(n / 16),) int64 its 1-based line number (error messages)
    meta: dict = field(default_factory=dict)  # counts from indexing: blank, empty_neg, no_scores (+ first line of
    # each); the file's type and batch_size (FILE_FIELDS), min_neg (fewest negatives of an example) and size (bytes)
    no_in_batch_neg: bool = False  # the file or a folder above it ends in no_in_batch_neg (training_files)
    parts: list = field(default_factory=list)  # small files merged into this dataset (small_threshold), in order
    part_starts: np.ndarray = None  # (len(parts) + 1,) int64 index of each part's first example, then n


# ----------------------------------------------------------------------------- checking one line


def check_example(ex):
    """The error for a parsed line ("field 'x': problem"), or None if it is a valid SPEC 4.1 example."""
    strs = lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v)  # noqa: E731
    nums = lambda v: isinstance(v, list) and all(type(x) in (int, float) for x in v)  # noqa: E731 (no bools)
    if not isinstance(ex, dict):
        return f"expected a JSON object, got {type(ex).__name__}"
    if "query" not in ex:
        return "field 'query': missing"
    if not isinstance(ex["query"], str):
        return f"field 'query': expected a string, got {type(ex['query']).__name__}"
    if not ex["query"].strip():
        return "field 'query': empty"
    if "pos" not in ex:
        return "field 'pos': missing"
    for f in ("pos", "neg"):
        if f in ex and not strs(ex[f]):
            return f"field '{f}': expected a list of strings, got {json.dumps(ex[f])[:60]}"
    if not ex["pos"]:
        return "field 'pos': empty list"
    for f, texts in (("pos_scores", "pos"), ("neg_scores", "neg")):
        if f in ex and not nums(ex[f]):
            return f"field '{f}': expected a list of numbers"
        if f in ex and len(ex[f]) != len(ex.get(texts, [])):
            return f"field '{f}': {len(ex[f])} scores for {len(ex.get(texts, []))} '{texts}' texts"
        bad = next((i for i, x in enumerate(ex.get(f, ())) if not _finite(x)), None)  # json reads NaN, Infinity
        if bad is not None:
            return (f"field '{f}': index {bad}: {json.dumps(ex[f][bad])[:40]} is not a finite number (a teacher score "
                    "must be one: fix or drop the example)")
    if ex.get("prompt") is not None and not isinstance(ex["prompt"], str):
        return "field 'prompt': expected a string"
    for f in ("query", "prompt"):
        if isinstance(ex.get(f), str) and not is_unicode(ex[f]):
            return f"field '{f}': {NOT_UNICODE}"
    for f in ("pos", "neg"):
        for i, t in enumerate(ex.get(f) or ()):
            if not t.strip():
                return f"field '{f}': index {i}: empty text (drop it from the list)"
            if not is_unicode(t):
                return f"field '{f}': index {i}: {NOT_UNICODE}"
    if ex.get("type") is not None and ex["type"] not in TYPES:
        return f"field 'type': unsupported value {json.dumps(ex['type'])[:60]} (supported: {', '.join(TYPES)})"
    bs = ex.get("batch_size")
    if bs is not None and not (type(bs) is int and bs >= 1):
        return f"field 'batch_size': expected an integer >= 1, got {json.dumps(bs)[:40]}"
    return None


NOT_UNICODE = "not valid Unicode text (a lone surrogate such as \\ud800, which no tokenizer reads)"


def _finite(x):
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer past the float range
        return False


def is_unicode(text):
    """False for text with a lone surrogate (a "\\ud800" escape in the JSON): it has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def file_values(ex):
    """The values an example gives its file's FILE_FIELDS: a missing type is normal, a missing batch_size None."""
    return {"type": ex.get("type") or "normal", "batch_size": ex.get("batch_size")}


def query_text(ex, prefix=""):
    """Query text = instruction + query (format "{}{}", SPEC 4.1): the line's prompt if it has one, else prefix
    (Config.query_prefix); no prompt and no prefix adds nothing (no "None" prefix, SPEC 7)."""
    return (ex["prompt"] if ex.get("prompt") is not None else prefix) + ex["query"]


def parse_line(raw):
    """(example, None) for a valid line (bytes, strict UTF-8; a byte-order mark before it is skipped), else (None,
    the error)."""
    mark = len(BOM) if raw.startswith(BOM) else 0
    try:
        ex = json.loads(raw[mark:].decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte {mark + e.start + 1} of the line): save the file as UTF-8"
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg} (column {e.colno})"
    return ex, check_example(ex)


def is_blank(raw):
    """A line (bytes) that holds no example: whitespace, after a byte-order mark if any (skipped, counted blank)."""
    return not raw.removeprefix(BOM).strip()


# ----------------------------------------------------------------------------- the files of a train_data path


MINE_STATS = ".stats.json"  # mine.py's counts beside a mined file: not training data


def training_files(path):
    """[(file, no_in_batch_neg)] of train_data `path` (SPEC 4.1): the file itself, or every .jsonl/.json file under
    the folder (any case, sorted, index caches and mine.py's <out>.stats.json left out). A compressed file stops with
    its name (the index keeps byte offsets into a file: it cannot read a stream), unless its decompressed copy sits
    beside it (`gunzip -k`).
    no_in_batch_neg: the file's name (before .jsonl) or a folder above it ends in no_in_batch_neg, up to the folder
    passed (its own name included) or, for a file passed alone, the folder that holds it."""
    if os.path.isdir(path):
        found = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) if not INDEX_DIR.search(d) for f in fs)
        files = [f for f in found if f.lower().endswith(JSON_EXT) and not f.endswith(MINE_STATS)]
        plain = set(files)
        compressed = [f for f in found if compression(f, inner=True) and os.path.splitext(f)[0] not in plain]
        top = os.path.dirname(os.path.normpath(os.path.abspath(path)))
    elif os.path.isfile(path):
        files, compressed = [path], [path] if compression(path) else []
        top = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    if compressed:
        raise ValueError(compressed_error([(f, compression(f)) for f in compressed]))
    if not files:
        raise FileNotFoundError(f"{path}: no .jsonl or .json files")
    names = [os.path.splitext(os.path.relpath(os.path.abspath(f), top))[0].split(os.sep) for f in files]
    return [(f, any(x.endswith("no_in_batch_neg") for x in n)) for f, n in zip(files, names)]


def compression(path, inner=False):
    """The compression its name says (e.g. "gzip" for .gz) or None; inner: only for a compressed .jsonl/.json."""
    stem, ext = os.path.splitext(path.lower())
    return COMPRESSED.get(ext) if not inner or stem.endswith(JSON_EXT) else None


def compressed_error(files):
    """The error for compressed training files [(path, kind)]."""
    return ("; ".join(f"{p}: compressed ({k}): decompress it first ({UNPACK[k]} {p})" for p, k in files)
            + " (the index keeps byte offsets into a file, so it cannot read a compressed stream)")


# ----------------------------------------------------------------------------- building the index, in parallel


_TOK = None  # length tokenizer of the forked index workers


def clip_lengths(lengths):
    """Token counts as uint16, those above LENGTH_MAX clipped to it (not wrapped)."""
    return np.minimum(lengths, LENGTH_MAX).astype(np.uint16)


def _token_lengths(tok, texts):
    if isinstance(tok, Tokenizer):
        return np.array([len(e) for e in getattr(tok, "encode_batch_fast", tok.encode_batch)(texts)], np.int32)
    return np.array([len(x) for x in tok(texts, add_special_tokens=True)["input_ids"]], np.int32)


def _index_chunk(task, tok=None):
    """Check and measure the lines starting in [start, end) of one file; line numbers are relative to the chunk."""
    path, start, end = task
    with open(path, "rb") as f:
        f.seek(start)
        raw_lines = f.read(end - start).split(b"\n")
    if raw_lines[-1] == b"":  # the chunk ends with a newline: no line after it
        raw_lines.pop()
    out = dict(nbytes=end - start, n_lines=len(raw_lines), blank=0, empty_neg=0, no_scores=0, error=None,
               file=None, min_neg=None)  # file: (FILE_FIELDS values, line) of the chunk's first example
    offsets, rel, texts, n_texts, off = [], [], [], [], start
    for k, raw in enumerate(raw_lines):
        line_off, off = off, off + len(raw) + 1
        if is_blank(raw):
            out["blank"] += 1
            continue
        ex, err = parse_line(raw)
        if not err and out["file"] is not None and file_values(ex) != out["file"][0]:
            err = file_error(file_values(ex), out["file"][0])
        if err:
            out["error"] = (k, err)
            return out
        out["file"] = out["file"] or (file_values(ex), k)
        n_neg = len(ex.get("neg") or [])
        out["min_neg"] = n_neg if out["min_neg"] is None else min(out["min_neg"], n_neg)
        if not ex.get("neg"):
            out["empty_neg"] += 1
            out.setdefault("empty_neg_line", k)
        missing = [f for f in ("pos_scores", "neg_scores") if f not in ex]
        if missing:
            out["no_scores"] += 1
            out.setdefault("no_scores_at", (k, missing[0]))
        ex_texts = [query_text(ex)] + ex["pos"] + ex.get("neg", [])
        offsets.append(line_off)
        rel.append(k)
        texts += ex_texts
        n_texts.append(len(ex_texts))
    # example length = max over its texts: reduce the flat token lengths over each example's slice
    lengths = np.maximum.reduceat(_token_lengths(tok or _TOK, texts), np.cumsum([0] + n_texts[:-1])) if texts else []
    out.update(offsets=np.array(offsets, np.int64), rel_lines=np.array(rel, np.int64),  # (m,) int64 each
               lengths=clip_lengths(np.array(lengths, np.int64)))  # (m,) uint16
    return out


def file_error(got, first):
    """The error for an example whose FILE_FIELDS differ from those of the file's first example."""
    f = next(f for f in FILE_FIELDS if got[f] != first[f])
    return (f"field '{f}': {json.dumps(got[f])} here but {json.dumps(first[f])} on the file's first example: one {f} "
            f"per file (a batch comes from one file; split the file)")


def _set_tok(tok):
    global _TOK
    _TOK = tok


def _length_tokenizer(tokenizer):
    """A plain `tokenizers.Tokenizer` without truncation or padding (HF leaves the last call's truncation on it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer
    tok = Tokenizer.from_str(backend.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


def tokenizer_id(tokenizer):
    """Hash of the tokenizer's definition (vocab, normalizer, template), not of its per-call truncation state."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        spec = f"{tokenizer.name_or_path}|{len(tokenizer)}"
    else:
        d = json.loads(backend.to_str())
        spec = json.dumps({k: v for k, v in d.items() if k not in ("truncation", "padding")}, sort_keys=True)
    return hashlib.sha1(f"{type(tokenizer).__name__}|{spec}".encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- its cache


def _file_key(path, verify=True):
    """Cache key: size, mtime and the SHA-1 of the whole file. The hash makes the key sound (a same-size edit whose
    mtime was preserved by cp -p, rsync -a or tar is caught); it reads at ~0.8 GB/s, against ~50 MB/s for indexing.
    verify=False leaves the hash out (ranks that trust an index their node's local rank 0 has just checked)."""
    st = os.stat(path)
    key = dict(version=INDEX_VERSION, size=st.st_size, mtime_ns=st.st_mtime_ns)
    if verify:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(16 << 20), b""):
                h.update(block)
        key["sha1"] = h.hexdigest()
    return key


def build_index(path, tokenizer, num_workers):
    """Check and tokenize every line (in parallel over byte chunks) into lengths, and offsets and line numbers of
    every INDEX_BLOCK-th example (kept as each chunk arrives: a file's per-example offsets are never held)."""
    size = os.path.getsize(path)
    starts = [0]
    with open(path, "rb") as f:  # chunk boundaries at line starts, so each line belongs to exactly one chunk
        head = f.read(8)
        kind = next((k for magic, k in MAGIC.items() if head.startswith(magic)), None)  # a compressed file's start
        if kind:
            raise ValueError(compressed_error([(path, kind)]))
        while starts[-1] + CHUNK_BYTES < size:
            f.seek(starts[-1] + CHUNK_BYTES)
            f.readline()
            if f.tell() >= size:
                break
            starts.append(f.tell())
    tasks = [(path, s, e) for s, e in zip(starts, starts[1:] + [size])]
    tok = _length_tokenizer(tokenizer)
    pool = mp.get_context("fork").Pool(num_workers, _set_tok, (tok,)) if num_workers > 1 and len(tasks) > 1 else None
    results = pool.imap(_index_chunk, tasks) if pool else (_index_chunk(t, tok) for t in tasks)
    parts, meta, lines_before, n_before = [], dict(blank=0, empty_neg=0, no_scores=0, size=size), 0, 0
    try:
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"index {os.path.basename(path)}", disable=None) as bar:
            for r in results:
                if r["file"] is not None and meta.setdefault("file", r["file"][0]) != r["file"][0]:  # the chunk's
                    r["error"] = (r["file"][1], file_error(r["file"][0], meta["file"]))  # first: before its errors
                if r["error"]:
                    raise ValueError(f"{path}, line {lines_before + r['error'][0] + 1}: {r['error'][1]}")
                if r["min_neg"] is not None:
                    meta["min_neg"] = min(meta.get("min_neg", r["min_neg"]), r["min_neg"])
                for k in ("blank", "empty_neg", "no_scores"):
                    meta[k] += r[k]
                if "empty_neg_line" in r:
                    meta.setdefault("empty_neg_line", lines_before + r["empty_neg_line"] + 1)
                if "no_scores_at" in r:
                    meta.setdefault("no_scores_at", [lines_before + r["no_scores_at"][0] + 1, r["no_scores_at"][1]])
                first = -n_before % INDEX_BLOCK  # the chunk's first example that starts a block
                parts.append((r["offsets"][first::INDEX_BLOCK], r["rel_lines"][first::INDEX_BLOCK] + lines_before + 1,
                              r["lengths"]))
                lines_before, n_before = lines_before + r["n_lines"], n_before + len(r["lengths"])
                bar.update(r["nbytes"])
    finally:
        if pool:
            pool.terminate()
    if meta["blank"]:
        log.warning(f"{path}: skipped {meta['blank']} blank lines")
    meta.update(meta.pop("file", None) or file_values({}))  # type, batch_size
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint16))
    offsets, lines, lengths = (np.concatenate(p) for p in zip(*parts)) if parts else empty  # (n / 16,) x 2, (n,)
    return JsonlDataset(path, lengths, offsets, lines, meta)


ARRAYS = ("block_offsets", "block_lines", "lengths")  # one .npy each in the cache directory


def cache_path(path, tok_id, cache_dir):
    """The index's cache directory: next to the data, or in cache_dir (also when the data's directory is read-only)."""
    if cache_dir is None and not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "m3_index")  # read-only data directory
    if cache_dir is None:
        return f"{path}.{tok_id}.idx"
    os.makedirs(cache_dir, exist_ok=True)
    where = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
    return os.path.join(cache_dir, f"{os.path.basename(path)}.{where}.{tok_id}.idx")


def open_index(path, tokenizer, tok_id, cache_dir, num_workers, verify=True):
    """Reuse the cached index if its key (file content + tokenizer) matches, else build it and write it atomically.
    The arrays are memory-mapped .npy files: the ranks of a node share one copy through the page cache. key.json holds
    the content key, mtime.json the file's mtime when it was last checked: a fresh clone of a repository that carries
    an index (data/scifact) rewrites only mtime.json, never a tracked file."""
    cache = cache_path(path, tok_id, cache_dir)
    key = dict(_file_key(path, verify), tokenizer=tok_id)
    same = ("version", "size", "tokenizer", "sha1" if verify else "mtime_ns")  # content, or the trusted cheap part
    saved = _saved_key(cache)
    if saved is not None and all(saved.get(k) == key[k] for k in same):  # (a stale index's arrays are never read)
        try:
            ds = load_index(path, cache)
        except (OSError, ValueError) as e:  # a damaged cache (disk full, a killed copy) is built again
            log.warning(f"{cache}: unreadable ({e}); indexing {path} again")
        else:
            if verify and saved != key:  # same content, new mtime (a fresh clone, cp): record it for trusting ranks
                write_atomic(os.path.join(cache, "mtime.json"), [json.dumps({"mtime_ns": key["mtime_ns"]})])
            return ds
    ds = build_index(path, tokenizer, num_workers)
    save_index(cache, key if verify else dict(_file_key(path), tokenizer=tok_id), ds)
    return load_index(path, cache)


def _saved_key(cache):
    """key.json's content key with mtime.json's mtime (if any); None without a readable key.json."""
    try:
        with open(os.path.join(cache, "key.json")) as f:
            key = json.load(f)
    except (OSError, ValueError):
        return None
    try:
        with open(os.path.join(cache, "mtime.json")) as f:
            return {**key, **json.load(f)}
    except (OSError, ValueError):
        return key


def load_index(path, cache):
    """The JsonlDataset of `path` from its cache directory, arrays memory-mapped (read-only)."""
    arrays = {a: np.load(os.path.join(cache, f"{a}.npy"), mmap_mode="r", allow_pickle=False) for a in ARRAYS}
    n_blocks = -(-len(arrays["lengths"]) // INDEX_BLOCK)
    if len(arrays["block_offsets"]) != n_blocks or len(arrays["block_lines"]) != n_blocks:
        raise ValueError(f"arrays of lengths {[len(x) for x in arrays.values()]}: expected {n_blocks} blocks for "
                         f"{len(arrays['lengths'])} examples")
    with open(os.path.join(cache, "meta.json")) as f:
        meta = json.load(f)
    return JsonlDataset(path, arrays["lengths"], arrays["block_offsets"], arrays["block_lines"], meta)


def save_index(cache, key, ds):
    """Write the index to a temporary directory, then rename it into place: concurrent ranks or a crash never leave
    a half-written index (a reader sees the old one, the new one, or none)."""
    tmp = f"{cache}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for a in ARRAYS:
        np.save(os.path.join(tmp, f"{a}.npy"), np.ascontiguousarray(getattr(ds, a)))
    stamp = {k: key[k] for k in ("mtime_ns",) if k in key}  # mtime.json; the rest is the content key, key.json
    content = {k: v for k, v in key.items() if k not in stamp}
    for name, value in (("meta.json", ds.meta), ("key.json", content), ("mtime.json", stamp)):
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(value, f, sort_keys=True)
    old = f"{cache}.old{os.getpid()}" if os.path.exists(cache) else None
    if old:
        os.rename(cache, old)
    os.rename(tmp, cache)
    if old:
        shutil.rmtree(old, ignore_errors=True)
