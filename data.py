"""Data (SPEC 4): how one training batch is built (sampling: edit here), JSONL datasets read by their index,
length-range batches per rank, and batches made ahead of the step.

Read in this order: Sampling and make_batch (each query's group: its positive and negatives, then tokenize and pad; the
options from Config, one object), open_datasets (one checked, indexed dataset per file: jsonl_index.py),
epoch_batches (this rank's batches of one dataset and one length range), batch_stream (make_batch ahead of the step,
in worker processes), _read (one example from its file). Evaluation data (BEIR layout): beir.py.
"""
import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from jsonl_index import (INDEX_BLOCK, JsonlDataset, is_blank, open_index, parse_line, query_text, tokenizer_id,
                         training_files)

SORT_WINDOW = 64  # group_by_length sorts windows of this many global batches by length (bench/padding.py: 0.999)
PAD_MULTIPLE = 8  # batches are padded to a multiple of 8 tokens (tensor-core friendly shapes)
SHUFFLE_MIN_CHARS, SHUFFLE_CHUNKS = 100, 3  # shuffle_ratio: positives over 100 characters, in 3 chunks (SPEC 4.2)
log = logging.getLogger(__name__)


# ================================================================================================================
# sampling: edit here. One query's group (its positive and negatives), the batch built from the groups.

@dataclasses.dataclass
class Sampling:
    """How make_batch builds a batch: train.py's Config values of the same names (Sampling.of(cfg)). A new data option
    is one field here, one in Config and its use in sample_group or make_batch."""
    seed: int
    train_group_size: int  # G: 1 positive + G-1 negatives (file_group_size: per file type)
    query_max_len: int
    passage_max_len: int
    teacher_kd: bool = False  # teacher scores of the group, negatives sorted by them (SPEC 3.5)
    shuffle_ratio: float = 0.0  # text-chunk shuffle of positives (SPEC 4.2)
    query_prefix: str = ""
    passage_prefix: str = ""

    @classmethod
    def of(cls, cfg):
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def sample_group(ds, i, ex, rng, G, opt):
    """[pos, neg1..neg(G-1)] texts and their teacher scores (SPEC 4.2): pos uniform, negs without replacement; an
    empty `neg` borrows them from other examples of the dataset; a positive chunk-shuffled with shuffle_ratio."""
    p = int(rng.integers(len(ex["pos"])))
    texts, scores = [ex["pos"][p]], [ex["pos_scores"][p]] if opt.teacher_kd else None
    neg = ex.get("neg") or []
    if G > 1 and not neg:
        texts += _borrow(ds, i, G - 1, rng)
    elif G > 1:
        pool = np.tile(np.arange(len(neg)), -(-(G - 1) // len(neg)))  # replicated when short: duplicates stay balanced
        picks = [int(j) for j in rng.choice(pool, G - 1, replace=False)]
        if opt.teacher_kd:  # by teacher score, descending: m3_kd_loss takes group order as a ranking (SPEC 3.5)
            picks.sort(key=lambda j: -ex["neg_scores"][j])
            scores += [ex["neg_scores"][j] for j in picks]
        texts += [neg[j] for j in picks]
    if opt.shuffle_ratio > 0 and len(texts[0]) > SHUFFLE_MIN_CHARS and rng.random() < opt.shuffle_ratio:
        texts[0] = _chunk_shuffle(texts[0], rng)  # drawn last: the negatives do not depend on it
    return texts, scores


def make_batch(datasets, batch, tokenizer, opt, epoch):
    """Read, sample (opt: Sampling), tokenize, pad one batch of (dataset, example) of `epoch`; passages group-major
    [q0 pos, q0 negs, q1 pos, ..].

    Each example's RNG is seeded by (seed, epoch, dataset, example) alone, so a query gets the same group on whichever
    rank (or world size) and at whichever step holds it: a W-rank step equals one process on the global batch, and a
    resumed run replays its batches. G-1 negatives per query (G: file_group_size); an empty `neg` borrows
    them from the same dataset. Queries get the line's prompt, else query_prefix; passages get passage_prefix, or for
    types symmetric_sts/_clustering the query's instruction (SPEC 4.1).
    """
    G = file_group_size(datasets[batch[0][0]], opt.train_group_size) if batch else opt.train_group_size
    queries, passages, teacher, source = [], [], [], []
    for d, i in batch:
        ds = datasets[d]
        if G > 1 and ds.meta.get("empty_neg") and ds.path not in _warned:
            _warned.add(ds.path)
            log.warning(f"{ds.path}: {ds.meta['empty_neg']} of {len(ds.lengths)} queries have no 'neg'; "
                        f"their {G - 1} negatives are drawn from other examples of this file")
        rng = np.random.default_rng([opt.seed, epoch, d, i])
        ex, src = _read(ds, i)  # src: (file, line), for error messages
        texts, scores = sample_group(ds, i, ex, rng, G, opt)
        queries.append(query_text(ex, opt.query_prefix))
        symmetric = ds.meta.get("type") in ("symmetric_sts", "symmetric_clustering")  # passages are queries too
        passages += [query_text({**ex, "query": t}, opt.query_prefix) if symmetric else opt.passage_prefix + t
                     for t in texts]
        teacher += scores or []
        source.append(src)
    enc = dict(add_special_tokens=True, truncation=True, return_attention_mask=False, return_token_type_ids=False)
    pad = tokenizer.pad_token_id
    q_ids, q_mask = _pad(tokenizer(queries, max_length=opt.query_max_len, **enc)["input_ids"], pad)  # (B, Tq) each
    p_ids, p_mask = _pad(tokenizer(passages, max_length=opt.passage_max_len, **enc)["input_ids"], pad)  # (B*G, Tp)
    teacher = torch.tensor(teacher, dtype=torch.float32).view(len(batch), G) if opt.teacher_kd else None  # (B, G)
    return dict(q_ids=q_ids, q_mask=q_mask, p_ids=p_ids, p_mask=p_mask, teacher=teacher, source=source, group_size=G,
                no_in_batch_neg=bool(batch) and datasets[batch[0][0]].no_in_batch_neg)


def file_group_size(ds, G):
    """The group size of ds's batches (SPEC 4.1): 2 for type only_1neg, for symmetric_class at most 1 + the fewest
    negatives of an example of the file (so no group repeats a negative), else Config.train_group_size."""
    return {"only_1neg": 2, "symmetric_class": min(ds.meta.get("min_neg", G) + 1, G)}.get(ds.meta.get("type"), G)


_warned = set()  # datasets whose empty-negative count was reported


def _chunk_shuffle(text, rng):
    """SPEC 4.2 / paper A.1: cut the text into 3 character chunks, shuffle them, join with spaces."""
    n = len(text) // SHUFFLE_CHUNKS + 1  # characters per chunk
    chunks = [text[k:k + n] for k in range(0, len(text), n)]
    return " ".join(chunks[j] for j in rng.permutation(len(chunks)))


def _borrow(ds, i, k, rng):
    """k negatives for a query with no `neg`: random passages (pos or neg) of other examples of the same dataset."""
    n = len(ds.lengths)
    if n < 2:
        path, line = _read(ds, i)[1]
        raise ValueError(f"{path}, line {line}: field 'neg': empty and no other example to borrow from")
    out = []
    for j in rng.integers(n - 1, size=k):
        other, _ = _read(ds, j + (j >= i))  # any example but i
        texts = other["pos"] + other.get("neg", [])
        out.append(texts[rng.integers(len(texts))])
    return out


def _pad(seqs, pad_id):
    """(n, T) ids and mask, T = longest rounded up to PAD_MULTIPLE."""
    T = -(-max(len(s) for s in seqs) // PAD_MULTIPLE) * PAD_MULTIPLE
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


# ================================================================================================================
# datasets, batches per rank, batches made ahead

def open_datasets(path, tokenizer, *, cache_dir=None, num_workers=2, teacher_kd=False, verify=True, share=None,
                  small_threshold=0, drop_threshold=0, group_size=None):
    """One JsonlDataset per .jsonl/.json file under `path` (jsonl_index.training_files: sorted, any case; compressed
    files refused); index cached next to the data or in cache_dir.
    verify=False trusts a cache whose size, mtime and tokenizer match without hashing the file (jsonl_index).
    share=(local_rank, local_world, barrier): a node's ranks check (and build) every local_world-th file's index
    each, wait at barrier(), then every rank opens them all, trusting them: the build is spread over the ranks.
    A file whose name (before .jsonl) or a folder above it ends in no_in_batch_neg gets no in-batch negatives (SPEC
    4.1; training_files); with group_size (Config.train_group_size) such a file must give groups of 2 or more
    passages. small_threshold / drop_threshold: see merge_small."""
    files = training_files(path)  # [(file, no_in_batch_neg)]
    tok_id = tokenizer_id(tokenizer)
    if share:
        local_rank, local_world, barrier = share
        for f, _ in files[local_rank::local_world]:
            open_index(f, tokenizer, tok_id, cache_dir, num_workers, verify=True)
        barrier()
        verify = False
    datasets = []
    for f, no_in_batch_neg in files:
        ds = open_index(f, tokenizer, tok_id, cache_dir, num_workers, verify)
        if len(ds.lengths) == 0:
            raise ValueError(f"{f}: empty file, no examples")
        if teacher_kd and ds.meta["no_scores"]:
            line, fld = ds.meta["no_scores_at"]
            raise ValueError(f"{f}, line {line}: field '{fld}': missing (teacher_kd needs pos_scores and neg_scores)")
        if teacher_kd and ds.meta["empty_neg"]:  # borrowed negatives (below) would have no teacher score
            raise ValueError(f"{f}, line {ds.meta['empty_neg_line']}: field 'neg': empty (teacher_kd needs scores)")
        ds.no_in_batch_neg = no_in_batch_neg
        if ds.no_in_batch_neg and group_size and file_group_size(ds, group_size) < 2:
            raise ValueError(f"{f}: no_in_batch_neg data scores each query against its own group only, and its groups "
                             f"have 1 passage (train_group_size {group_size}, type {ds.meta['type']}): no negative")
        datasets.append(ds)
    return merge_small(datasets, small_threshold, drop_threshold) if small_threshold > 0 else datasets


def merge_small(datasets, small_threshold, drop_threshold):
    """SPEC 4.4: the files of one folder with fewer than small_threshold examples become one dataset (per type and
    no_in_batch_neg, so its batches keep one layout; batch size: the smallest of its files'), dropped if it has
    fewer than drop_threshold examples. Larger files stay as they are."""
    out, small = [], {}
    for ds in datasets:
        if len(ds.lengths) >= small_threshold:
            out.append(ds)
        else:
            small.setdefault((os.path.dirname(ds.path), ds.meta["type"], ds.no_in_batch_neg), []).append(ds)
    for (folder, _, _), parts in small.items():
        n = sum(len(p.lengths) for p in parts)
        if n < drop_threshold:
            log.warning(f"{folder}: dropped {len(parts)} small files ({n} examples < drop_threshold {drop_threshold})")
            continue
        if len(parts) == 1:
            out.append(parts[0])
            continue
        meta = dict(parts[0].meta, empty_neg=sum(p.meta["empty_neg"] for p in parts),
                    min_neg=min(p.meta["min_neg"] for p in parts), batch_size=None)
        name = os.path.join(folder, f"[{len(parts)} files < small_threshold {small_threshold}]")
        out.append(JsonlDataset(name, np.concatenate([p.lengths for p in parts]), meta=meta,  # (n,) uint16
                                no_in_batch_neg=parts[0].no_in_batch_neg, parts=parts,
                                part_starts=np.cumsum([0] + [len(p.lengths) for p in parts])))  # (parts + 1,) int64
    if not out:
        raise ValueError(f"{os.path.dirname(datasets[0].path)}: no data left: every file has fewer than "
                         f"small_threshold {small_threshold} examples, and each merged set fewer than drop_threshold")
    return out


def dataset_batch_sizes(ds, batch_sizes):
    """ds's batch size per length range: its batch_size field everywhere, else batch_sizes, halved for symmetric_*
    types (SPEC 4.4); a merged dataset takes the smallest of its files'."""
    if ds.parts:
        return [min(x) for x in zip(*(dataset_batch_sizes(p, batch_sizes) for p in ds.parts))]
    if ds.meta.get("batch_size"):
        return [ds.meta["batch_size"]] * len(batch_sizes)
    symmetric = "symmetric" in (ds.meta.get("type") or "")
    return [max(1, b // 2) for b in batch_sizes] if symmetric else list(batch_sizes)


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
        s = range(len(self))[s]  # negative indices; IndexError past the end
        return [(int(self.ds[s]), int(i)) for i in self.flat[self.starts[s]:self.starts[s + 1]]]


def epoch_batches(datasets, *, epoch, seed, world_size, rank, length_ranges, batch_sizes, group_by_length=False,
                  sort_window=SORT_WINDOW):
    """This rank's batches for `epoch`: one dataset and one length range each, bs = batch_sizes[range] (SPEC 4.4-4.5;
    per dataset: dataset_batch_sizes).

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
    glob = []  # per global batch: (dataset index, this rank's examples of it); other ranks' parts are never kept
    for d, ds in enumerate(datasets):
        bucket = length_buckets(ds.lengths, length_ranges)  # (n,) int8, range k = [r[k], r[k+1]); above: last
        for k, bs in enumerate(dataset_batch_sizes(ds, batch_sizes)):
            idx, gbs = bucket_members(bucket, k), bs * W  # (n_k,) int32 (int64 past 2**31 examples)
            rng.shuffle(idx)  # in place: the same order as rng.permutation (tests/test_data.py)
            if group_by_length:
                for s in range(0, len(idx), sort_window * gbs):
                    w = idx[s:s + sort_window * gbs]
                    idx[s:s + len(w)] = w[np.argsort(ds.lengths[w], kind="stable")]  # uint16: a radix sort
            n_full = len(idx) // gbs
            glob += [(d, part) for part in idx[:n_full * gbs].reshape(n_full, W, bs)[:, rank].copy()]
            tail = len(idx) - n_full * gbs
            if tail >= 2 * W:
                per = tail // W
                glob.append((d, idx[n_full * gbs + rank * per:n_full * gbs + (rank + 1) * per].copy()))
            del idx
        del bucket
    glob = [glob[j] for j in rng.permutation(len(glob))]
    starts = np.cumsum([0] + [len(m) for _, m in glob])
    flat = np.concatenate([m for _, m in glob]) if glob else np.zeros(0, np.int64)
    return Batches(np.array([d for d, _ in glob], np.int64), flat, starts)


def length_buckets(lengths, length_ranges, chunk=1 << 24):
    """(n,) int8 length-range index of every example, computed in chunks (no n x int64 temporary)."""
    inner, out = np.asarray(length_ranges[1:-1]), np.empty(len(lengths), np.int8)
    for s in range(0, len(lengths), chunk):
        out[s:s + chunk] = np.searchsorted(inner, lengths[s:s + chunk], side="right")
    return out


def bucket_members(bucket, k, chunk=1 << 24):
    """Indices i with bucket[i] == k, ascending, as int32 when they fit (half the memory of np.flatnonzero)."""
    dtype = np.int32 if len(bucket) < 2 ** 31 else np.int64
    return np.concatenate([np.flatnonzero(bucket[s:s + chunk] == k).astype(dtype) + dtype(s)
                           for s in range(0, len(bucket), chunk)] or [np.zeros(0, dtype)])


def batch_stream(datasets, batches, start, tokenizer, opt, epoch, *, num_workers, prefetch, pin_memory=False):
    """make_batch(datasets, batches[j], tokenizer, opt, epoch) for j = start, start + 1, ..., prepared ahead of the
    training step by num_workers processes, `prefetch` batches each (0 workers: one by one, in this process). The same
    batches in the same order either way (each example's RNG depends on the example alone); a worker's error (a bad
    line) stops the loop with its message. A generator: close() (or its end) stops the workers and joins them."""
    if num_workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers: one tokenizer thread each
    loader = torch.utils.data.DataLoader(
        range(start, len(batches)), batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=lambda j: make_batch(datasets, batches[j], tokenizer, opt, epoch),
        prefetch_factor=prefetch if num_workers else None, multiprocessing_context="fork" if num_workers else None,
        generator=torch.Generator())  # draws the workers' seeds from its own generator, not the global one (dropout)
    it = iter(loader)
    try:
        yield from it
    finally:  # now, not whenever the iterator is garbage-collected (at interpreter exit, after the process group)
        getattr(it, "_shutdown_workers", lambda: None)()


def rank_batches(datasets, tokenizer, opt, batch_kw, epoch, index, **stream_kw):
    """(epoch, index, batches in the epoch, batch) of this rank from batch `index` of `epoch` on, epoch after epoch:
    epoch_batches(datasets, **batch_kw) made ahead by batch_stream(..., **stream_kw); closing this generator closes
    the stream (its workers exit and are joined)."""
    while True:
        batches = epoch_batches(datasets, **{**batch_kw, "epoch": epoch})
        stream = batch_stream(datasets, batches, index, tokenizer, opt, epoch, **stream_kw)
        try:
            for j in range(index, len(batches)):
                yield epoch, j, len(batches), next(stream)
        finally:
            stream.close()
        epoch, index = epoch + 1, 0

# ----------------------------------------------------------------------------- reading one example


def _part(ds, i):
    """(the dataset holding example i, its index there): a merged dataset's examples live in its parts' files."""
    if not ds.parts:
        return ds, i
    p = int(np.searchsorted(ds.part_starts, i, side="right")) - 1
    return ds.parts[p], i - int(ds.part_starts[p])


def _read(ds, i):
    """Example i and its (file, line): from the line of its block's first example, forward over i % INDEX_BLOCK
    examples, skipping blank lines as build_index does. Checked again as it is read: a file edited after its index
    was built stops with its line (a block that starts mid-line, an end of file before the example, a line that no
    longer parses, or a new size)."""
    ds, i = _part(ds, i)
    b, k = divmod(i, INDEX_BLOCK)
    off, line = int(ds.block_offsets[b]), int(ds.block_lines[b])
    with open(ds.path, "rb") as f:
        f.seek(max(off - 1, 0))
        err = None if off == 0 or f.read(1) == b"\n" else "not at the start of a line"
        while not err:
            raw = f.readline()
            if not raw:
                err = "the file ends before this example"
            elif not is_blank(raw) and k == 0:
                break  # example i's line
            else:
                k -= not is_blank(raw)  # an example before it, or a blank line
                line += 1
        size = os.fstat(f.fileno()).st_size
    ex, err = (None, err) if err else parse_line(raw)
    if not err and size != ds.meta["size"]:
        err = f"the file has {size} bytes, {ds.meta['size']} when indexed"
    if err:
        raise ValueError(f"{ds.path}, line {line}: {err} (did the file change after its index was built? "
                         "a changed file is indexed again on the next start)")
    return ex, (ds.path, line)
