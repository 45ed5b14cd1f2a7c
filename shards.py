"""Writing a store (store.py's layout): passages encoded in shards, by one process or torchrun's ranks, then merged.

python eval.py encode --ckpt DIR --data DIR --store DIR [--shard_size 4096]     # one process
torchrun --nproc_per_node 8 eval.py encode --ckpt DIR --data DIR --store DIR    # one GPU each, shards round robin
The corpus is encoded in shards of shard_size passages (shards/NNNNN.tokens.npy, the token matrix as the store holds
it, then shards/NNNNN.npz, the other arrays, each written under a temporary name and renamed), so a restart skips the
finished shards (each read and checked first; a damaged one is encoded again) and never reads a half-written one;
once all are there they are merged into the store and deleted after meta.json is written. A pq store's codebooks are
trained into shards/codebook.npz before the first shard. One process writes a store at a time (encode.lock; the ranks
of one torchrun job share rank 0's); a full disk leaves no half file under a final name, and a rerun resumes.
"""
import contextlib
import json
import os
import shutil
import socket
import warnings

import numpy as np
from tqdm import tqdm

import codec
from packed import check_packed, load, model_loader, pack
from runtime import end_distributed, init_distributed, read_json, replacing, trim_heap
from search import release
from store import (DTYPES, LOCK, check_meta, open_store, resolve_colbert_from, resolve_tokens, store_files, store_meta,
                   without_tokens, write_npy, write_or_check_meta)


def encode_corpora(model, dirs, store_dir, split, max_corpus, max_length, batch_size=32, mcls=False, shard_size=4096,
                   passage_prefix="", colbert_from=None, tokens=None):
    """eval.py encode: the corpus of each BEIR dir ({name: dir}, e.g. one per language) into store_dir/name, sharded
    over torchrun's ranks (one GPU each), with the passages and the key eval.py evaluates with. colbert_from "encode":
    stores without token vectors; "store": with them, held as tokens says (resolve_tokens); None: as a store already
    begun there, else with them."""
    from beir import load_beir, passage_text
    _, rank, world, _ = init_distributed(12 * 3600, backend="gloo")  # barriers only; rank 0's merge may take hours
    get_model, key, _ = model_loader(model, need_key=True)
    for name, d in dirs.items():
        texts = [passage_prefix + passage_text(r) for r in load_beir(d, split, max_corpus)[0]]  # as eval.py reads them
        path = os.path.join(store_dir, name)
        source = resolve_colbert_from(colbert_from, path)
        tv = "none" if source == "encode" else resolve_tokens(tokens, path)
        meta = store_meta(key, texts, max_length, mcls, tv)
        P = encode_store(get_model, texts, path, meta, batch_size, shard_size, rank, world)
        if P is not None:
            print(f"{path}: {meta['n']} passages, " + (f"{len(P['cb_vecs'])} token vectors ({tv})" if "cb_vecs" in P
                                                       else "no token vectors (multi-vector scores: --colbert_from "
                                                       "encode)"))
    end_distributed()


def encode_store(get_model, texts, out_dir, meta, batch_size=32, shard_size=4096, rank=0, world=1, progress=True):
    """The store of texts in out_dir (see the module docstring), encoded now where it is not yet: shard s by rank
    s % world; rank 0 holds the store's lock (store_lock) and merges once every shard is written (a torch.distributed
    barrier when world > 1), the other ranks return None at once. Returns open_store(out_dir) on rank 0. A store or
    shards of another meta: an error. meta's token_vectors: how token vectors are written ("none": not at all)."""
    final = os.path.join(out_dir, "meta.json")
    if os.path.exists(final):
        return open_store(out_dir, meta) if rank == 0 else None
    tv = meta["token_vectors"]
    if codec.kind(tv) == "pq":  # M must divide the token vectors' dimensions: known from one passage, before any write
        error = codec.tokens_error(tv, pack(get_model().encode(texts[:1], max_length=8, progress=False))["cb_vecs"]
                                   .shape[1])
        if error:
            raise ValueError(error)
    sdir = os.path.join(out_dir, "shards")
    os.makedirs(out_dir, exist_ok=True)
    with store_lock(out_dir) if rank == 0 else contextlib.nullcontext():
        if rank == 0 and not os.path.exists(final):  # shards of another model, corpus or shard size are never mixed in
            os.makedirs(sdir, exist_ok=True)
            write_or_check_meta(os.path.join(sdir, "meta.json"), dict(meta, shard_size=shard_size))
        barrier(world)
        if os.path.exists(final):  # finished by another process just before rank 0 took the lock
            return open_store(out_dir, meta) if rank == 0 else None
        check_meta(os.path.join(sdir, "meta.json"), dict(meta, shard_size=shard_size))
        n_shards = -(-len(texts) // shard_size)
        mine = [s for s in range(rank, n_shards, world)]
        size = lambda s: min(shard_size, len(texts) - s * shard_size)
        book = shard_codebook(out_dir, get_model, texts, meta, batch_size, rank, world)
        todo = [s for s in mine if not finished(shard_path(out_dir, s), size(s), tv)]
        with tqdm(total=sum(map(size, mine)), initial=sum(map(size, mine)) - sum(map(size, todo)), unit="passage",
                  desc=f"encode {os.path.basename(os.path.normpath(out_dir))}", disable=not progress or rank != 0,
                  smoothing=0.1) as bar:
            for s in todo:
                enc = encode_compact(get_model, texts[s * shard_size:s * shard_size + size(s)], meta, batch_size, book)
                write_shard(shard_path(out_dir, s), enc, tv)
                del enc
                trim_heap()
                bar.update(size(s))
        barrier(world)  # every shard is written
        if rank != 0:
            return None
        merge(out_dir, meta, n_shards, size)
        return open_store(out_dir, meta)


def shard_codebook(out_dir, get_model, texts, meta, batch_size=32, rank=0, world=1):
    """A pq store's codebooks (codec.train on the token vectors of codec.TRAIN_PASSAGES passages drawn with seed 0):
    trained by rank 0 into shards/codebook.npz before any shard (a resume reads them), then read by every rank; {}
    for the other kinds."""
    tv = meta["token_vectors"]
    if codec.kind(tv) != "pq":
        return {}
    path = os.path.join(out_dir, "shards", "codebook.npz")
    if rank == 0 and not os.path.exists(path):
        pick = np.sort(np.random.default_rng(0).choice(len(texts), min(len(texts), codec.TRAIN_PASSAGES), False))
        x = pack(get_model().encode([texts[i] for i in pick], batch_size=batch_size, max_length=meta["max_length"],
                                    mcls=meta["mcls"], progress=False))["cb_vecs"]  # (sample tokens, D) float32
        with replacing(path) as tmp:
            np.savez(tmp, **codec.train(x, tv))
    barrier(world)
    return load(path)  # damaged: a ValueError naming it


@contextlib.contextmanager
def store_lock(out_dir):
    """out_dir/encode.lock while this process writes the store: created with O_CREAT | O_EXCL holding its pid and host,
    removed at the end, also on errors. A second writer stops at once naming the holder; a lock whose pid no longer
    runs on this host (a killed run's) is stale and taken over. A holder on another host cannot be checked: it holds."""
    path, me = os.path.join(out_dir, LOCK), {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = read_json(path)
            if not (holder and holder.get("host") == me["host"] and not running(holder.get("pid"))):
                who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "a process (lock unreadable)"
                raise RuntimeError(f"{out_dir} is being written by {who} ({path}): wait for it to finish; if no "
                                   f"encode of this store runs there, remove {path}") from None
            if read_json(path) == holder:  # not taken over meanwhile by another process (a small window remains)
                warnings.warn(f"{path}: pid {holder['pid']} on {holder['host']} no longer runs: lock taken over")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    try:
        yield
    finally:
        if read_json(path) == me:
            os.remove(path)


def running(pid):
    """A process with this pid runs on this host (signal 0: nothing is sent); not an int: assumed running."""
    try:
        os.kill(pid, 0) if isinstance(pid, int) and pid > 0 else None
        return True
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process
        return True


def barrier(world):
    """Wait for every rank (torch.distributed, initialised by the caller, e.g. eval.py encode under torchrun)."""
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def shard_path(out_dir, s):
    """shards/NNNNN: the shard's files are this + .tokens.npy and + .npz."""
    return os.path.join(out_dir, "shards", f"{s:05d}")


def encode_compact(get_model, texts, meta, batch_size=32, book=None, tokens=1 << 18):
    """pack(model.encode(texts)) with the token vectors as the store holds them (codec.compress; "none": left out),
    encoded in chunks of at most `tokens` passage tokens: float32 token vectors of one chunk are held at a time, never a
    shard's (4,096 passages x 512 tokens x 1,024 dims would be 8.6 GB, twice while packed)."""
    tv, chunk = meta["token_vectors"], max(1, tokens // meta["max_length"])
    parts = []
    for a in range(0, len(texts), chunk):
        enc = pack(get_model().encode(texts[a:a + chunk], batch_size=batch_size, max_length=meta["max_length"],
                                      mcls=meta["mcls"], progress=False))
        parts.append(without_tokens(enc) | ({"cb_ptr": enc["cb_ptr"], **codec.compress(enc["cb_vecs"], tv, book)}
                                            if tv != "none" else {}))

    def joined(key):  # the chunks' arrays as one; (n+1,) offsets shifted by the entries of the chunks before
        if not key.endswith("_ptr"):
            return np.concatenate([p[key] for p in parts])
        rows = "sp_ids" if key == "sp_ptr" else codec.ARRAYS[codec.kind(tv)][0]
        shift = np.cumsum([0] + [len(p[rows]) for p in parts[:-1]])
        return np.concatenate([[0]] + [p[key][1:] + o for p, o in zip(parts, shift)])
    return {k: joined(k) for k in parts[0]}


def write_shard(path, enc, tokens="float16"):
    """encode_compact's arrays for a store of token_vectors tokens: the token matrix (codec.MATRIX) to path.tokens.npy,
    then the other arrays to path.npz, each under a temporary name and renamed (replacing): the .npz exists only once
    both are complete."""
    enc = dict(enc)
    if tokens != "none":
        with replacing(path + ".tokens.npy") as tmp:
            np.save(tmp, enc.pop(codec.MATRIX[codec.kind(tokens)]))
    with replacing(path + ".npz") as tmp:
        np.savez(tmp, **{k: v.astype(DTYPES[k]) for k, v in enc.items()})


def finished(path, n, tokens="float16"):
    """Shard path of n passages is written and readable (check_shard); a damaged one is named and encoded again."""
    if not os.path.exists(path + ".npz"):
        return False
    try:
        check_shard(path, n, tokens)
        return True
    except ValueError as e:
        warnings.warn(f"{e}: encoding it again")
        os.remove(path + ".npz")  # the mark of a finished shard
        return False


def merge(out_dir, meta, n_shards, size):
    """The shards -> the store's .npy files (streamed, one shard at a time), meta.json last with each file's record
    (write_npy); then the shards go."""
    paths, tv = [shard_path(out_dir, s) for s in range(n_shards)], meta["token_vectors"]
    try:
        c = [check_shard(p, size(s), tv) for s, p in enumerate(paths)]  # every shard checked before writing
    except ValueError as e:
        raise ValueError(f"{e}: run the same encode again, it encodes this shard again") from None
    H, W = (c[0]["H"], c[0]["W"]) if c else (0, 0)
    total = {k: sum(x[k] for x in c) for k in ("n", "nnz", "tokens")}
    book = load(os.path.join(out_dir, "shards", "codebook.npz")) if codec.kind(tv) == "pq" else {}
    matrix = codec.MATRIX[codec.kind(tv)] if tv != "none" else None

    def part(p, key):  # one array of shard p: its token matrix in chunks, the rest whole
        if key == matrix:
            tok = np.load(p + ".tokens.npy", mmap_mode="r")
            for a in range(0, len(tok), 1 << 16):
                yield np.asarray(tok[a:a + (1 << 16)])
                release(tok)
        else:
            with np.load(p + ".npz") as z:
                yield z[key]
    shapes = {"dense": (total["n"], H), "sp_ptr": (total["n"] + 1,), "sp_ids": (total["nnz"],),
              "sp_w": (total["nnz"],), "cb_ptr": (total["n"] + 1,), matrix: (total["tokens"], W),
              "cb_scale": (total["tokens"],), "cb_coarse": (total["tokens"],), **{k: v.shape for k, v in book.items()}}
    files = {}
    for key, fname in store_files(meta).items():
        if key in ("sp_ptr", "cb_ptr"):  # (N+1,) pointers, shifted to the whole store's positions
            ptr = [np.zeros(1, np.int64)]
            for p in paths:
                x, = part(p, key)
                ptr.append(x[1:] + ptr[-1][-1])
            chunks = ptr
        else:
            chunks = [book[key]] if key in book else (x for p in paths for x in part(p, key))
        files[fname] = write_npy(os.path.join(out_dir, fname), shapes[key], DTYPES[key], chunks)
    full = dict(meta, hidden=int(H), nnz=total["nnz"], dense_vectors=np.dtype(DTYPES["dense"]).name)
    if matrix:  # the token vectors' dimensions (pq: the codebook's; its matrix holds M codes a token)
        full.update(dim=int(book["book_coarse"].shape[1] if book else W), tokens=total["tokens"],
                    **({"codebook": {k: list(v.shape) for k, v in book.items()}} if book else {}))
    with replacing(os.path.join(out_dir, "meta.json")) as tmp, open(tmp, "w") as f:
        json.dump(dict(full, files=files), f, indent=1)  # the store is complete
    shutil.rmtree(os.path.join(out_dir, "shards"))


def check_shard(path, n, tokens="float16"):
    """Sizes of a written shard of n passages, its arrays read (the token matrix: mapped) and checked against each
    other; errors (ValueError) name the file and field. tokens: the store's token_vectors ("none": no token arrays)."""
    x = load(path + ".npz")
    if tokens == "none":
        check_packed(x, n, path + ".npz", tokens=False)
        return dict(n=n, nnz=len(x["sp_ids"]), tokens=0, H=x["dense"].shape[1], W=0)
    kind = codec.kind(tokens)
    matrix, dtype = codec.MATRIX[kind], np.dtype(DTYPES[codec.MATRIX[kind]])
    tok = load(path + ".tokens.npy", mmap_mode="r")
    if tok.dtype != dtype or tok.ndim != 2:
        raise ValueError(f"{path}.tokens.npy: field 'shape': expected (tokens, width) {dtype}, got {tok.shape} "
                         f"{tok.dtype}")
    check_packed(dict(x, cb_vecs=tok), n, path + ".npz")
    for side in (k for k in codec.ARRAYS[kind] if k != matrix):  # one entry per token
        if side not in x or x[side].shape != (len(tok),):
            raise ValueError(f"{path}.npz: field '{side}': expected shape ({len(tok)},), got "
                             f"{x[side].shape if side in x else 'missing'}")
    return dict(n=n, nnz=len(x["sp_ids"]), tokens=len(tok), H=x["dense"].shape[1], W=tok.shape[1])
