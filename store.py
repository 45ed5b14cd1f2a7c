"""Passage encodings: packed in memory (pack), cached under the checkpoint's identity (encode_cached), and written once
into a store on disk by one process or several, memory-mapped for evaluation (encode_store, open_store).

python eval.py encode --ckpt DIR --data DIR --store DIR [--shard_size 4096]     # one process
torchrun --nproc_per_node 8 eval.py encode --ckpt DIR --data DIR --store DIR    # one GPU each, shards round robin
A store is a directory of model.pack's arrays as .npy files: dense.npy (N, H) float32, sp_ptr.npy (N+1,) int64,
sp_ids.npy int32, sp_w.npy float32, offsets.npy (N+1,) int64 and tokens.npy (sum of L_i, D) float16 (passage i's token
vectors are tokens[offsets[i]:offsets[i + 1]]), and meta.json, written last: the model, corpus and settings that wrote
it, checked on every open. The corpus is encoded in shards of shard_size passages (shards/NNNNN.tokens.npy, then
shards/NNNNN.npz, each written under a temporary name and renamed), so a restart skips the finished shards and never
reads a half-written one; once all are there they are merged into the store and deleted after meta.json is written.
"""
import functools
import glob
import hashlib
import json
import os
import shutil

import numpy as np
import torch
from tqdm import tqdm

from model import HEAD_FILES, M3, is_local_path
from runtime import end_distributed, init_distributed
from search import release

FORMAT = "m3-store-1"
FILES = {"dense": "dense.npy", "sp_ptr": "sp_ptr.npy", "sp_ids": "sp_ids.npy", "sp_w": "sp_w.npy",
         "cb_ptr": "offsets.npy", "cb_vecs": "tokens.npy"}  # packed key -> file
DTYPES = {"dense": np.float32, "sp_ptr": np.int64, "sp_ids": np.int32, "sp_w": np.float32, "cb_ptr": np.int64,
          "cb_vecs": np.float16}


# ----------------------------------------------------------------------------------------------------------------
# encodings in memory (eval.py, mine.py): packed arrays, cached on disk under the checkpoint's identity

def encode_cached(get_model, texts, max_length, batch_size=32, mcls=False, cache_dir=None, key=None):
    """pack(model.encode(texts)), cached as <cache_dir>/<sha256(checkpoint, texts, max_length, mcls)>.npz, no pickle."""
    if cache_dir:
        h = hashlib.sha256(f"{key}|{max_length}|{mcls}|{len(texts)}".encode())
        h.update("\0".join(texts).encode())
        path = os.path.join(cache_dir, h.hexdigest()[:40] + ".npz")
        if os.path.exists(path):
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    enc = pack(get_model().encode(texts, batch_size=batch_size, max_length=max_length, mcls=mcls))
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        np.savez(path + ".tmp.npz", **enc)
        os.replace(path + ".tmp.npz", path)  # never a half-written cache file
    return enc


def pack(out):
    """model.encode output -> flat arrays: dense (N, D); sparse CSR sp_ptr (N+1,), sp_ids, sp_w (ids sorted within a
    row); colbert cb_ptr (N+1,), cb_vecs (sum of L_i, D). Row i's entries: ptr[i]:ptr[i + 1]."""
    sp = [sorted(d.items()) for d in out["sparse"]]
    sp_len = np.array([len(d) for d in sp], np.int64)
    cb_len = np.array([len(v) for v in out["colbert"]], np.int64)
    D = out["dense"].shape[1]
    return dict(dense=np.ascontiguousarray(out["dense"], np.float32),
                sp_ptr=np.concatenate([[0], np.cumsum(sp_len)]),
                sp_ids=np.fromiter((k for d in sp for k, _ in d), np.int64, sp_len.sum()),
                sp_w=np.fromiter((w for d in sp for _, w in d), np.float32, sp_len.sum()),
                cb_ptr=np.concatenate([[0], np.cumsum(cb_len)]),
                cb_vecs=np.concatenate([np.asarray(v, np.float32).reshape(-1, D) for v in out["colbert"]]))


def model_loader(model, need_key):
    """(get_model, key, ckpt) for a checkpoint path (loaded lazily, only on a cache miss), an in-memory M3 or a function
    returning one (cli_setup's --new_heads/--pooling: loaded after the data checks); ckpt: what metrics.json records.
    A triple this returned is returned as is (eval.evaluate_langs: one model for every language)."""
    if isinstance(model, tuple):
        return model
    if not isinstance(model, str):
        model = model if hasattr(model, "encode") else model()
        key = model_key(model) if need_key else None
        return (lambda: model), key, {"ckpt": getattr(model, "source", "<in-memory model>"), "ckpt_abspath": None,
                                      "ckpt_key": key}
    key = ckpt_key(model)
    ckpt = {"ckpt": model, "ckpt_abspath": os.path.abspath(model) if os.path.isdir(model) else None, "ckpt_key": key}

    @functools.cache
    def get():
        return M3.from_pretrained(model).to(inference_device()).eval()
    return get, key, ckpt


def inference_device():
    """Where evaluation and mining encode: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def ckpt_key(path):
    """Identity of a checkpoint dir: content hash of files under 64 MB, (name, size, mtime) of larger ones."""
    if not os.path.isdir(path):
        if is_local_path(path):
            raise FileNotFoundError(f"{path}: no such checkpoint directory")
        return f"hub:{path}"  # a hub name: from_pretrained checks the heads; the cache assumes the repo does not change
    missing = [f for f in HEAD_FILES.values() if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"{path} has no {' / '.join(missing)}: a checkpoint without heads (e.g. dense-only "
                                "fine-tuning) cannot be evaluated on sparse/multi-vector retrieval (SPEC.md 2); "
                                "for a bare encoder's zero-shot dense row pass --new_heads")
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            st = os.stat(f)
            h.update(f"{name}|{st.st_size}|".encode())
            if st.st_size < 64 << 20:
                with open(f, "rb") as fh:
                    h.update(fh.read())
            else:
                h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()


def model_key(model):
    """Identity of an in-memory model: hash of its weights and pooling."""
    h = hashlib.sha256(str(getattr(model, "pooling", "")).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# the store on disk

def store_meta(key, texts, max_length, mcls):
    """What a store must match to be read: the model's key, the passages (SHA-256 of their texts), how they were
    encoded."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return {"format": FORMAT, "model": key, "corpus": h.hexdigest(), "n": len(texts), "max_length": max_length,
            "mcls": bool(mcls)}


def as_stored(P):
    """Packed encodings in memory with a store's dtypes (DTYPES: float16 token vectors, int32 token ids), so they score
    exactly as a store of them does."""
    return {k: np.asarray(v, DTYPES[k]) for k, v in P.items()}


def encode_corpora(model, dirs, store_dir, split, max_corpus, max_length, batch_size=32, mcls=False, shard_size=4096,
                   passage_prefix=""):
    """eval.py encode: the corpus of each BEIR dir ({name: dir}, e.g. one per language) into store_dir/name, sharded
    over torchrun's ranks (one GPU each), with the passages and the key eval.py evaluates with."""
    from beir import load_beir, passage_text
    _, rank, world, _ = init_distributed(12 * 3600, backend="gloo")  # barriers only; rank 0's merge may take hours
    get_model, key, _ = model_loader(model, need_key=True)
    for name, d in dirs.items():
        texts = [passage_prefix + passage_text(r) for r in load_beir(d, split, max_corpus)[0]]  # as eval.py reads them
        meta = store_meta(key, texts, max_length, mcls)
        P = encode_store(get_model, texts, os.path.join(store_dir, name), meta, batch_size, shard_size, rank, world)
        if P is not None:
            print(f"{os.path.join(store_dir, name)}: {meta['n']} passages, {len(P['cb_vecs'])} token vectors")
    end_distributed()


def encode_store(get_model, texts, out_dir, meta, batch_size=32, shard_size=4096, rank=0, world=1, progress=True):
    """The store of texts in out_dir (see the module docstring), encoded now where it is not yet: shard s by rank
    s % world; rank 0 merges once every shard is written (a torch.distributed barrier when world > 1), the other ranks
    return None at once. Returns open_store(out_dir) on rank 0. A store or shards of another meta: an error."""
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        return open_store(out_dir, meta) if rank == 0 else None
    sdir = os.path.join(out_dir, "shards")
    os.makedirs(sdir, exist_ok=True)
    if rank == 0:  # shards of another model, corpus or shard size are never mixed in
        write_or_check_meta(os.path.join(sdir, "meta.json"), dict(meta, shard_size=shard_size))
    barrier(world)
    check_meta(os.path.join(sdir, "meta.json"), dict(meta, shard_size=shard_size))
    n_shards = -(-len(texts) // shard_size)
    mine = [s for s in range(rank, n_shards, world)]
    size = lambda s: min(shard_size, len(texts) - s * shard_size)
    todo = [s for s in mine if not os.path.exists(shard_path(out_dir, s) + ".npz")]
    with tqdm(total=sum(map(size, mine)), initial=sum(map(size, mine)) - sum(map(size, todo)), unit="passage",
              desc=f"encode {os.path.basename(os.path.normpath(out_dir))}", disable=not progress or rank != 0,
              smoothing=0.1) as bar:
        for s in todo:
            enc = pack(get_model().encode(texts[s * shard_size:s * shard_size + size(s)], batch_size=batch_size,
                                          max_length=meta["max_length"], mcls=meta["mcls"], progress=False))
            write_shard(shard_path(out_dir, s), enc)
            bar.update(size(s))
    barrier(world)  # every shard is written
    if rank != 0:
        return None
    merge(out_dir, meta, n_shards, size)
    return open_store(out_dir, meta)


def barrier(world):
    """Wait for every rank (torch.distributed, initialised by the caller, e.g. eval.py encode under torchrun)."""
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def shard_path(out_dir, s):
    """shards/NNNNN: the shard's files are this + .tokens.npy and + .npz."""
    return os.path.join(out_dir, "shards", f"{s:05d}")


def write_shard(path, enc):
    """Token vectors (float16) to path.tokens.npy, then the other arrays to path.npz, each under a temporary name
    and renamed: the .npz exists only once both are complete."""
    np.save(path + ".tmp.tokens.npy", enc["cb_vecs"].astype(np.float16))
    os.replace(path + ".tmp.tokens.npy", path + ".tokens.npy")
    np.savez(path + ".tmp.npz", **{k: v.astype(DTYPES[k]) for k, v in enc.items() if k != "cb_vecs"})
    os.replace(path + ".tmp.npz", path + ".npz")


def merge(out_dir, meta, n_shards, size):
    """The shards -> the store's .npy files (streamed, one shard at a time), meta.json last; then the shards go."""
    paths = [shard_path(out_dir, s) for s in range(n_shards)]
    c = [check_shard(p, size(s)) for s, p in enumerate(paths)]  # every shard checked before anything is written
    H, D = (c[0]["H"], c[0]["D"]) if c else (0, 0)
    total = {k: sum(x[k] for x in c) for k in ("n", "nnz", "tokens")}

    def part(p, key):  # one array of shard p: its token vectors in chunks, the rest whole
        if key == "cb_vecs":
            tok = np.load(p + ".tokens.npy", mmap_mode="r")
            for a in range(0, len(tok), 1 << 16):
                yield np.asarray(tok[a:a + (1 << 16)])
                release(tok)
        else:
            with np.load(p + ".npz") as z:
                yield z[key]
    shapes = {"dense": (total["n"], H), "sp_ptr": (total["n"] + 1,), "sp_ids": (total["nnz"],),
              "sp_w": (total["nnz"],), "cb_ptr": (total["n"] + 1,), "cb_vecs": (total["tokens"], D)}
    for key, fname in FILES.items():
        if key in ("sp_ptr", "cb_ptr"):  # (N+1,) pointers, shifted to the whole store's positions
            ptr = [np.zeros(1, np.int64)]
            for p in paths:
                x, = part(p, key)
                ptr.append(x[1:] + ptr[-1][-1])
            chunks = ptr
        else:
            chunks = (x for p in paths for x in part(p, key))
        write_npy(os.path.join(out_dir, fname), shapes[key], DTYPES[key], chunks)
    full = dict(meta, hidden=int(H), dim=int(D), nnz=total["nnz"], tokens=total["tokens"])
    with open(os.path.join(out_dir, "meta.json.tmp"), "w") as f:
        json.dump(full, f, indent=1)
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))  # the store is complete
    shutil.rmtree(os.path.join(out_dir, "shards"))


def check_shard(path, n):
    """Sizes of a written shard of n passages, its arrays checked against each other; errors name the file and
    field."""
    with np.load(path + ".npz") as z:
        x = {k: z[k] for k in z.files}
    tok = np.load(path + ".tokens.npy", mmap_mode="r")
    need = {"dense": (n, None), "sp_ptr": (n + 1,), "sp_ids": (None,), "sp_w": (None,), "cb_ptr": (n + 1,)}
    for k, shape in need.items():
        if k not in x or x[k].ndim != len(shape) or shape[0] not in (None, len(x[k])):
            got = x[k].shape if k in x else "missing"
            raise ValueError(f"{path}.npz: field '{k}': expected shape {shape} (None: any), got {got}; remove this "
                             "shard to encode it again")
    for k, total in (("sp_ptr", len(x["sp_ids"])), ("cb_ptr", len(tok))):
        if x[k][0] != 0 or x[k][-1] != total or (np.diff(x[k]) < 0).any():
            raise ValueError(f"{path}.npz: field '{k}': expected offsets from 0 to {total}, non-decreasing; remove "
                             "this shard to encode it again")
    if tok.dtype != np.float16 or tok.ndim != 2 or len(x["sp_w"]) != len(x["sp_ids"]):
        raise ValueError(f"{path}.tokens.npy: field 'shape': expected (tokens, D) float16, got {tok.shape} {tok.dtype}"
                         "; remove this shard to encode it again")
    return dict(n=n, nnz=len(x["sp_ids"]), tokens=len(tok), H=x["dense"].shape[1], D=tok.shape[1])


def write_npy(path, shape, dtype, chunks):
    """A .npy file of shape and dtype from chunks (arrays whose rows concatenate to it), streamed through
    path.tmp and renamed; the rows must add up to shape[0]."""
    rows = 0
    with open(path + ".tmp", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": tuple(int(x) for x in shape)})
        for x in chunks:
            f.write(np.ascontiguousarray(x, dtype).tobytes())
            rows += len(x)
    if rows != shape[0]:
        os.remove(path + ".tmp")
        raise ValueError(f"{path}: {rows} rows written, expected {shape[0]}")
    os.replace(path + ".tmp", path)


def write_or_check_meta(path, meta):
    """Write meta to path (JSON) if it is not there, else check that it says the same (check_meta)."""
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(path + ".tmp", path)
    check_meta(path, meta)


def check_meta(path, expect):
    """Load a store's meta.json and check each field of expect; errors name the file and the field."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a store's meta.json ({e.__class__.__name__}: {e})") from None
    for k, v in expect.items():
        if meta.get(k) != v:
            show = lambda x: x[:12] if isinstance(x, str) and len(x) == 64 else x  # hashes: a prefix is enough
            raise ValueError(f"{path}: field '{k}': this store was written for {show(meta.get(k))!r}, this run needs "
                             f"{show(v)!r} (another model, corpus or setting): pass another --store, or remove "
                             f"{os.path.dirname(path)} to encode again")
    return meta


def open_store(path, expect=None):
    """The store in path as packed encodings, every array memory-mapped (np.load mmap_mode="r"): nothing is read until
    used. expect: fields meta.json must have (store_meta). Every file is checked against meta.json (dtype, shape,
    offsets), naming the file and the field."""
    if not os.path.exists(os.path.join(path, "meta.json")):
        shards = glob.glob(os.path.join(path, "shards", "*.npz"))
        raise FileNotFoundError(f"{path}: no meta.json: not a finished store ({len(shards)} shards written; "
                                "python eval.py encode ... finishes it)")
    meta = check_meta(os.path.join(path, "meta.json"), {"format": FORMAT, **(expect or {})})
    shapes = {"dense": (meta["n"], meta["hidden"]), "sp_ptr": (meta["n"] + 1,), "sp_ids": (meta["nnz"],),
              "sp_w": (meta["nnz"],), "cb_ptr": (meta["n"] + 1,), "cb_vecs": (meta["tokens"], meta["dim"])}
    P = {}
    for key, fname in FILES.items():
        f = os.path.join(path, fname)
        try:
            x = np.load(f, mmap_mode="r")
        except (OSError, ValueError) as e:  # missing, truncated, not a .npy
            raise ValueError(f"{f}: unreadable ({e.__class__.__name__}: {e})") from None
        if x.dtype != DTYPES[key] or x.shape != shapes[key]:
            raise ValueError(f"{f}: field 'shape': expected {shapes[key]} {np.dtype(DTYPES[key])} (meta.json), got "
                             f"{x.shape} {x.dtype}")
        P[key] = x
    for key, total in (("sp_ptr", meta["nnz"]), ("cb_ptr", meta["tokens"])):
        ptr = P[key] = np.array(P[key])  # (N+1,) int64 in memory: 8 MB per million passages
        if ptr[0] != 0 or ptr[-1] != total or (np.diff(ptr) < 0).any():
            down = np.flatnonzero(np.diff(ptr) < 0)
            raise ValueError(f"{os.path.join(path, FILES[key])}: field 'values': expected offsets from 0 to {total} "
                             f"(meta.json), non-decreasing; got {ptr[0]} .. {ptr[-1]}"
                             + (f", decreasing after entry {down[0]}" if len(down) else ""))
    return P
