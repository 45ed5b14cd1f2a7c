"""Data (SPEC 4): JSONL datasets read by offset, length-range batches per rank, negative sampling, collation."""
import hashlib
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

INDEX_VERSION = 2  # 2: the key hashes the whole file
CHUNK_BYTES = 4 << 20  # bytes per indexing task: spreads one file over the workers, bounds their memory
log = logging.getLogger(__name__)


@dataclass
class JsonlDataset:
    """One JSONL file: example i is the JSON line at byte offsets[i]; nothing else of the file is held in memory."""
    path: str
    offsets: np.ndarray  # (n,) int64 byte offset of each example's line
    lines: np.ndarray  # (n,) int64 1-based line number, for error messages
    lengths: np.ndarray  # (n,) int32 max token length (with special tokens) over query, pos and neg texts
    meta: dict = field(default_factory=dict)  # counts from indexing: blank, empty_neg, no_scores (+ first line of each)

# ----------------------------------------------------------------------------- reading and checking one line


def _is_str_list(v):
    return isinstance(v, list) and all(isinstance(t, str) for t in v)


def _is_num_list(v):
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _check(ex):
    """The error for a parsed line ("field 'x': problem"), or None if it is a valid SPEC 4.1 example."""
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
        if f in ex and not _is_str_list(ex[f]):
            return f"field '{f}': expected a list of strings, got {json.dumps(ex[f])[:60]}"
    if not ex["pos"]:
        return "field 'pos': empty list"
    for f, texts in (("pos_scores", "pos"), ("neg_scores", "neg")):
        if f in ex and not _is_num_list(ex[f]):
            return f"field '{f}': expected a list of numbers"
        if f in ex and len(ex[f]) != len(ex.get(texts, [])):
            return f"field '{f}': {len(ex[f])} scores for {len(ex.get(texts, []))} '{texts}' texts"
    if ex.get("prompt") is not None and not isinstance(ex["prompt"], str):
        return "field 'prompt': expected a string"
    return None


def _query(ex):
    """Query text = prompt + query (format "{}{}", SPEC 4.1); no prompt adds nothing (no "None" prefix, SPEC 7)."""
    return (ex.get("prompt") or "") + ex["query"]


def _read(ds, i):
    """Example i, checked again as it is read: a file edited after its index was built stops with its line."""
    off = int(ds.offsets[i])
    with open(ds.path, "rb") as f:
        f.seek(max(off - 1, 0))
        before, raw = (f.read(1) if off else b"\n"), f.readline()
    try:
        ex = json.loads(raw)
        err = _check(ex) if before == b"\n" else "not at the start of a line"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        err = f"malformed JSON: {e}"
    if err:
        raise ValueError(f"{ds.path}, line {ds.lines[i]}: {err} (did the file change after its index was built? "
                         "a changed file is indexed again on the next start)")
    return ex

# ----------------------------------------------------------------------------- the offset/length index


_TOK = None  # length tokenizer of the forked index workers


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
    out = dict(nbytes=end - start, n_lines=len(raw_lines), blank=0, empty_neg=0, no_scores=0, error=None)
    offsets, rel, texts, n_texts, off = [], [], [], [], start
    for k, raw in enumerate(raw_lines):
        line_off, off = off, off + len(raw) + 1
        if not raw.strip():
            out["blank"] += 1
            continue
        try:
            ex = json.loads(raw)
            err = _check(ex)
        except json.JSONDecodeError as e:
            err = f"malformed JSON: {e.msg} (column {e.colno})"
        except UnicodeDecodeError:
            err = "not valid UTF-8"
        if err:
            out["error"] = (k, err)
            return out
        if not ex.get("neg"):
            out["empty_neg"] += 1
            out.setdefault("empty_neg_line", k)
        missing = [f for f in ("pos_scores", "neg_scores") if f not in ex]
        if missing:
            out["no_scores"] += 1
            out.setdefault("no_scores_at", (k, missing[0]))
        ex_texts = [_query(ex)] + ex["pos"] + ex.get("neg", [])
        offsets.append(line_off)
        rel.append(k)
        texts += ex_texts
        n_texts.append(len(ex_texts))
    # example length = max over its texts: reduce the flat token lengths over each example's slice
    lengths = np.maximum.reduceat(_token_lengths(tok or _TOK, texts), np.cumsum([0] + n_texts[:-1])) if texts else []
    out.update(offsets=np.array(offsets, np.int64), rel_lines=np.array(rel, np.int64),
               lengths=np.array(lengths, np.int32))
    return out


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


def _tokenizer_id(tokenizer):
    """Hash of the tokenizer's definition (vocab, normalizer, template), not of its per-call truncation state."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        spec = f"{tokenizer.name_or_path}|{len(tokenizer)}"
    else:
        d = json.loads(backend.to_str())
        spec = json.dumps({k: v for k, v in d.items() if k not in ("truncation", "padding")}, sort_keys=True)
    return hashlib.sha1(f"{type(tokenizer).__name__}|{spec}".encode()).hexdigest()[:12]


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


def _build_index(path, tokenizer, num_workers):
    """Check and tokenize every line (in parallel over byte chunks) into offsets, line numbers and lengths."""
    size = os.path.getsize(path)
    starts = [0]
    with open(path, "rb") as f:  # chunk boundaries at line starts, so each line belongs to exactly one chunk
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
    parts, meta, lines_before = [], dict(blank=0, empty_neg=0, no_scores=0), 0
    try:
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"index {os.path.basename(path)}", disable=None) as bar:
            for r in results:
                if r["error"]:
                    raise ValueError(f"{path}, line {lines_before + r['error'][0] + 1}: {r['error'][1]}")
                for k in ("blank", "empty_neg", "no_scores"):
                    meta[k] += r[k]
                if "empty_neg_line" in r:
                    meta.setdefault("empty_neg_line", lines_before + r["empty_neg_line"] + 1)
                if "no_scores_at" in r:
                    meta.setdefault("no_scores_at", [lines_before + r["no_scores_at"][0] + 1, r["no_scores_at"][1]])
                parts.append((r["offsets"], r["rel_lines"] + lines_before + 1, r["lengths"]))
                lines_before += r["n_lines"]
                bar.update(r["nbytes"])
    finally:
        if pool:
            pool.terminate()
    if meta["blank"]:
        log.warning(f"{path}: skipped {meta['blank']} blank lines")
    offsets, lines, lengths = (np.concatenate(p) for p in zip(*parts)) if parts else [np.zeros(0, np.int64)] * 3
    return JsonlDataset(path, offsets, lines, lengths.astype(np.int32), meta)


def _open_one(path, tokenizer, tok_id, cache_dir, num_workers, verify=True):
    """Reuse the cached index if its key (file content + tokenizer) matches, else build it and write it atomically."""
    if cache_dir is None and not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "m3_index")  # read-only data directory
    if cache_dir is None:
        cache = f"{path}.{tok_id}.idx.npz"
    else:
        os.makedirs(cache_dir, exist_ok=True)
        where = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
        cache = os.path.join(cache_dir, f"{os.path.basename(path)}.{where}.{tok_id}.idx.npz")
    key = dict(_file_key(path, verify), tokenizer=tok_id)
    same = ("version", "size", "tokenizer", "sha1" if verify else "mtime_ns")  # content, or the trusted cheap part
    if os.path.exists(cache):
        with np.load(cache) as z:
            saved = json.loads(str(z["key"]))
            ds = JsonlDataset(path, z["offsets"], z["lines"], z["lengths"], json.loads(str(z["meta"])))
        if all(saved.get(k) == key[k] for k in same):
            if verify and saved != key:  # same content, new mtime (a fresh clone, cp): record it for trusting ranks
                _save_index(cache, key, ds)
            return ds
    ds = _build_index(path, tokenizer, num_workers)
    _save_index(cache, key if verify else dict(_file_key(path), tokenizer=tok_id), ds)
    return ds


def _save_index(cache, key, ds):
    tmp = f"{cache}.tmp{os.getpid()}"  # temp + rename: concurrent ranks or a crash never leave a half-written index
    with open(tmp, "wb") as f:
        np.savez(f, key=np.array(json.dumps(key, sort_keys=True)), meta=np.array(json.dumps(ds.meta)),
                 offsets=ds.offsets, lines=ds.lines, lengths=ds.lengths)
    os.replace(tmp, cache)


def open_datasets(path, tokenizer, *, cache_dir=None, num_workers=2, kd=False, verify=True):
    """One JsonlDataset per .jsonl/.json file under `path` (sorted); index cached next to the data or in cache_dir.
    verify=False trusts a cache whose size, mtime and tokenizer match without hashing the file (see _file_key)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith((".jsonl", ".json")))
        if not files:
            raise FileNotFoundError(f"{path}: no .jsonl or .json files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    tok_id = _tokenizer_id(tokenizer)  # DDP: open on rank 0 first, then a barrier, or every rank builds the index
    datasets = []
    for f in files:
        ds = _open_one(f, tokenizer, tok_id, cache_dir, num_workers, verify)
        if len(ds.lengths) == 0:
            raise ValueError(f"{f}: empty file, no examples")
        if kd and ds.meta["no_scores"]:
            line, fld = ds.meta["no_scores_at"]
            raise ValueError(f"{f}, line {line}: field '{fld}': missing (kd=True needs pos_scores and neg_scores)")
        if kd and ds.meta["empty_neg"]:  # borrowed negatives (below) would have no teacher score
            raise ValueError(f"{f}, line {ds.meta['empty_neg_line']}: field 'neg': empty (kd=True needs scored negs)")
        datasets.append(ds)
    return datasets

# ----------------------------------------------------------------------------- length-range batches for one rank


class Batches(Sequence):
    """This rank's batches as arrays (a tuple per example costs GBs at pre-training scale); item: [(d, i), ...]."""

    def __init__(self, ds, flat, starts):
        self.ds, self.flat, self.starts = ds, flat, starts  # (n_batches,), (n_examples,), (n_batches+1,)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, s):
        if isinstance(s, slice):
            return [self[k] for k in range(*s.indices(len(self)))]
        s = range(len(self))[s]
        return [(int(self.ds[s]), int(i)) for i in self.flat[self.starts[s]:self.starts[s + 1]]]


def epoch_batches(datasets, *, epoch, seed, world_size, rank, length_ranges, batch_sizes, group_by_length=False,
                  sort_window=64):
    """This rank's batches for `epoch`: one dataset and one length range each, bs = batch_sizes[range] (SPEC 4.4-4.5).

    All ranks use the same RNG (seed, epoch): each (dataset, range) bucket is shuffled and cut into global batches of
    bs*W, the global batches are shuffled, and rank r takes the contiguous slice [r*bs, (r+1)*bs) of each.
    Tail rule: a bucket's last m < bs*W examples form one smaller global batch if m >= 2*W (W*(m//W) of them,
    m//W per rank; the reference's old rule), else they sit out this epoch (the next epoch's shuffle differs).
    So every rank gets the same number of batches, and the same batch size at each step.
    group_by_length: sort by length inside windows of `sort_window` global batches before cutting, so a batch holds
    similar lengths (less padding) while batches still differ from epoch to epoch and are shuffled across the epoch.
    """
    assert len(batch_sizes) == len(length_ranges) - 1 and 0 <= rank < world_size
    W, rng = world_size, np.random.default_rng([seed, epoch])
    inner = np.asarray(length_ranges[1:-1])
    glob = []  # (dataset index, example indices of one global batch)
    for d, ds in enumerate(datasets):
        bucket = np.searchsorted(inner, ds.lengths, side="right")  # range k = [r[k], r[k+1]); above the last: last
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
    mine = [ix[rank * (len(ix) // W):(rank + 1) * (len(ix) // W)] for _, ix in glob]
    starts = np.cumsum([0] + [len(m) for m in mine])
    flat = np.concatenate(mine) if mine else np.zeros(0, np.int64)
    return Batches(np.array([d for d, _ in glob], np.int64), flat, starts)

# ----------------------------------------------------------------------------- sampling one group and collation


_warned = set()  # datasets whose empty-negative count was reported


def _chunk_shuffle(text, rng):
    """SPEC 4.2 / paper A.1: cut the text into 3 character chunks, shuffle them, join with spaces."""
    n = len(text) // 3 + 1
    chunks = [text[k:k + n] for k in range(0, len(text), n)]
    return " ".join(chunks[j] for j in rng.permutation(len(chunks)))


def _borrow(ds, i, k, rng):
    """k negatives for a query with no `neg`: random passages (pos or neg) of other examples of the same dataset."""
    n = len(ds.offsets)
    if n < 2:
        raise ValueError(f"{ds.path}, line {ds.lines[i]}: field 'neg': empty and no other example to borrow from")
    out = []
    for j in rng.integers(n - 1, size=k):
        other = _read(ds, j + (j >= i))  # any example but i
        texts = other["pos"] + other.get("neg", [])
        out.append(texts[rng.integers(len(texts))])
    return out


def _sample_group(ds, i, ex, rng, G, kd, shuffle_ratio):
    """[pos, neg1..neg(G-1)] texts and their teacher scores (SPEC 4.2): pos uniform, negs without replacement."""
    p = int(rng.integers(len(ex["pos"])))
    texts, scores = [ex["pos"][p]], [ex["pos_scores"][p]] if kd else None
    neg = ex.get("neg") or []
    if G > 1 and not neg:
        texts += _borrow(ds, i, G - 1, rng)
    elif G > 1:
        pool = np.tile(np.arange(len(neg)), -(-(G - 1) // len(neg)))  # replicated when short: duplicates stay balanced
        picks = [int(j) for j in rng.choice(pool, G - 1, replace=False)]
        if kd:  # negatives by teacher score, descending: m3_kd_loss treats group order as a ranking (SPEC 3.5)
            picks.sort(key=lambda j: -ex["neg_scores"][j])
            scores += [ex["neg_scores"][j] for j in picks]
        texts += [neg[j] for j in picks]
    if shuffle_ratio > 0 and len(texts[0]) > 100 and rng.random() < shuffle_ratio:  # last: negatives don't depend on it
        texts[0] = _chunk_shuffle(texts[0], rng)
    return texts, scores


def _pad(seqs, pad_id, multiple):
    """(n, T) ids and mask, T = longest rounded up to `multiple`."""
    T = -(-max(len(s) for s in seqs) // multiple) * multiple
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def make_batch(datasets, batch, tokenizer, *, epoch, step, seed, rank, group_size, query_max_len, passage_max_len,
               kd=False, shuffle_ratio=0.0, pad_multiple=8):
    """Read, sample, tokenize, pad one batch of (dataset, example); passages group-major [q0 pos, q0 negs, q1 pos, ..].

    Each example's RNG is seeded by (seed, epoch, dataset, example), so (seed, epoch, step, rank) fix the batch through
    `batch`, and a query gets the same group on whichever rank (or world size) holds it: a W-rank step equals one
    process on the global batch. G-1 negatives per query; an empty `neg` borrows them from the same dataset.
    """
    G = group_size
    queries, passages, teacher, source = [], [], [], []
    for d, i in batch:
        ds = datasets[d]
        if G > 1 and ds.meta.get("empty_neg") and ds.path not in _warned:
            _warned.add(ds.path)
            log.warning(f"{ds.path}: {ds.meta['empty_neg']} of {len(ds.offsets)} queries have no 'neg'; "
                        f"their {G - 1} negatives are drawn from other examples of this file")
        rng = np.random.default_rng([seed, epoch, d, i])
        ex = _read(ds, i)
        texts, scores = _sample_group(ds, i, ex, rng, G, kd, shuffle_ratio)
        queries.append(_query(ex))
        passages += texts
        teacher += scores or []
        source.append((ds.path, int(ds.lines[i])))
    enc = dict(add_special_tokens=True, truncation=True, return_attention_mask=False, return_token_type_ids=False)
    q_ids, q_mask = _pad(tokenizer(queries, max_length=query_max_len, **enc)["input_ids"], tokenizer.pad_token_id,
                         pad_multiple)
    p_ids, p_mask = _pad(tokenizer(passages, max_length=passage_max_len, **enc)["input_ids"], tokenizer.pad_token_id,
                         pad_multiple)
    teacher = torch.tensor(teacher, dtype=torch.float32).view(len(batch), G) if kd else None
    return dict(q_ids=q_ids, q_mask=q_mask, p_ids=p_ids, p_mask=p_mask, teacher=teacher, source=source)
