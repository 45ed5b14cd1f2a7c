"""Passage encodings on disk (a store): packed.pack's arrays as .npy files, memory-mapped for evaluation (open_store);
shards.py writes them.

A store is a directory of packed.pack's arrays as .npy files: dense.npy (N, H) float16, sp_ptr.npy (N+1,) int64,
sp_ids.npy int32, sp_w.npy float32, offsets.npy (N+1,) int64 and tokens.npy (sum of L_i, D) float16 (passage i's token
vectors are tokens[offsets[i]:offsets[i + 1]]), and meta.json, written last: the model, corpus and settings that wrote
it, and each array file's size, mtime and SHA-1 (check_files: a file whose size or mtime changed is hashed on open;
checked.json remembers a changed mtime whose content matched, e.g. a copied store).
meta.json "token_vectors" says how token vectors are held (eval.py --tokens, codec.py): "float16" (tokens.npy, the
default; a store written before the field), "int8" (tokens_int8.npy + token_scales.npy), "pq<M>" (token_codes.npy +
token_coarse.npy, the codebooks in codebook_coarse.npy and codebook_sub.npy), or "none" (--colbert_from encode): dense
and sparse only, no offsets.npy; the multi-vector scores of its candidates are encoded when evaluated (eval.py). Kinds
are never mixed: a run asking for another stops naming the option. meta.json "dense_vectors" says the dense file's
dtype: "float16" (half the disk and page cache of float32: 67 GB for 33M 1,024-d passages; within 2^-11 relative of
float32 per entry; the index and exact dense scores read it as float32), or "float32" (a store written before the
field, read as it is: not encoded again).
"""
import glob
import hashlib
import io
import json
import os
import warnings

import numpy as np

import codec
from packed import load
from runtime import read_json, replacing

FORMAT = "m3-store-1"
FILES = {"dense": "dense.npy", "sp_ptr": "sp_ptr.npy", "sp_ids": "sp_ids.npy", "sp_w": "sp_w.npy",
         "cb_ptr": "offsets.npy", "cb_vecs": "tokens.npy", "cb_q": "tokens_int8.npy", "cb_scale": "token_scales.npy",
         "cb_codes": "token_codes.npy", "cb_coarse": "token_coarse.npy", "book_coarse": "codebook_coarse.npy",
         "book_sub": "codebook_sub.npy"}  # packed (or codec) key -> file
DTYPES = {"dense": np.float16, "sp_ptr": np.int64, "sp_ids": np.int32, "sp_w": np.float32, "cb_ptr": np.int64,
          **codec.DTYPES}
TOKEN_KEYS = ("cb_ptr", "cb_vecs")  # what a store without token vectors leaves out
COLBERT_FROM = ("store", "encode")  # --colbert_from: MaxSim over the store's token vectors, or encoded candidates
DEFAULTS = {"token_vectors": "float16", "dense_vectors": "float32"}  # meta.json fields a store written before them
# has, with their value then
LOCK, CHECKED = "encode.lock", "checked.json"  # in the store's folder: its writer; the mtimes accepted since merge


# ----------------------------------------------------------------------------------------------------------------
# the store on disk

def store_meta(key, texts, max_length, mcls, token_vectors="float16"):
    """What a store must match to be read: the model's key, the passages (SHA-256 of their texts), how they were
    encoded, and its token vectors: an eval.py --tokens value, or "none" (--colbert_from encode)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return {"format": FORMAT, "model": key, "corpus": h.hexdigest(), "n": len(texts), "max_length": max_length,
            "mcls": bool(mcls), "token_vectors": token_vectors}


def store_name(meta):
    """A store's folder name in a cache: store-<hash of meta>, fields at their DEFAULTS value left out (a store
    written before the field keeps its name)."""
    named = {k: v for k, v in meta.items() if k not in DEFAULTS or v != DEFAULTS[k]}
    return "store-" + hashlib.sha256(json.dumps(named).encode()).hexdigest()[:40]


def store_files(meta):
    """{packed or codec key: file} of the arrays a store of this meta.json holds."""
    kind = codec.kind(meta.get("token_vectors", DEFAULTS["token_vectors"]))
    keys = [] if kind == "none" else ["cb_ptr", *codec.ARRAYS[kind], *(codec.BOOK if kind == "pq" else ())]
    return {k: FILES[k] for k in ("dense", "sp_ptr", "sp_ids", "sp_w", *keys)}


def stored_tokens(path):
    """The token vectors of the store in path (meta.json's "token_vectors"), finished or still in shards; None where no
    store is written yet."""
    for f in (os.path.join(path, "meta.json"), os.path.join(path, "shards", "meta.json")):
        meta = read_json(f)  # None: missing (or unreadable: encode_store and open_store name it)
        if meta is not None:
            return meta.get("token_vectors", DEFAULTS["token_vectors"])
    return None


def resolve_colbert_from(colbert_from, path, prefix=""):
    """Where multi-vector scores come from for the store in path (None: none): colbert_from as given, or by default
    "encode" for a store without token vectors, else "store". A store of the other kind: a ValueError naming the option
    (prefix "--" on the command line); the store is left as it is."""
    if colbert_from not in (None, *COLBERT_FROM):
        raise ValueError(f"{prefix}colbert_from: expected one of {', '.join(COLBERT_FROM)}; got {colbert_from!r}")
    held = stored_tokens(path) if path else None
    if colbert_from is None:
        return "encode" if held == "none" else "store"
    if held is not None and (held == "none") != (colbert_from == "encode"):
        other = "encode" if held == "none" else "store"
        which = ("holds no passage token vectors (" if held == "none" else f"holds passage token vectors ({held}, ")
        raise ValueError(f"{prefix}colbert_from {colbert_from}: {path} {which}written with {prefix}colbert_from "
                         f"{other}): pass {prefix}colbert_from {other} (or leave it out), or another {prefix}store")
    return colbert_from


def resolve_tokens(tokens, path, prefix=""):
    """How the store in path holds its token vectors (eval.py --tokens, codec.py): tokens as given, by default as a
    store begun there holds them, else float16. A bad value: a ValueError naming the option (prefix "--")."""
    held = stored_tokens(path) if path else None
    tokens = tokens if tokens is not None else held if held not in (None, "none") else "float16"  # "": an error
    error = codec.tokens_error(tokens, prefix=prefix)
    if error:
        raise ValueError(error)
    return tokens


def as_stored(P):
    """Packed encodings in memory with a store's dtypes (DTYPES: float16 dense and token vectors, int32 token ids), so
    they score exactly as a store of them does."""
    return {k: np.asarray(v, DTYPES[k]) for k, v in P.items()}


def without_tokens(P):
    """Packed encodings less their token vectors and offsets (TOKEN_KEYS): what a store without tokens holds."""
    return {k: v for k, v in P.items() if k not in TOKEN_KEYS}


def write_npy(path, shape, dtype, chunks):
    """A .npy file of shape and dtype from chunks (arrays whose rows concatenate to it), streamed through a temporary
    file (replacing); the rows must add up to shape[0]. Returns its record for meta.json: size, mtime_ns and the SHA-1
    of the bytes, hashed as they are written (file_hash's)."""
    h, rows = hashlib.sha1(), 0
    with replacing(path) as tmp, open(tmp, "wb") as f:
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                    "fortran_order": False, "shape": tuple(int(x) for x in shape)})
        f.write(head.getvalue())
        h.update(head.getvalue())
        for x in chunks:
            x = np.ascontiguousarray(x, dtype)
            f.write(x)
            h.update(x)
            rows += len(x)
        if rows != shape[0]:
            raise ValueError(f"{path}: {rows} rows written, expected {shape[0]}")
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": h.hexdigest()}


def file_hash(path, chunk=1 << 24):
    """SHA-1 of a file's bytes, read in chunks of 16 MB (stores can be tens of GB)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_or_check_meta(path, meta):
    """Write meta to path (JSON) if it is not there, else check that it says the same (check_meta)."""
    if not os.path.exists(path):
        with replacing(path) as tmp, open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
    check_meta(path, meta)


def check_meta(path, expect):
    """Load a store's meta.json and check each field of expect; errors name the file and the field."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a store's meta.json ({e.__class__.__name__}: {e})") from None
    for k, v in expect.items():
        got = meta.get(k, DEFAULTS.get(k))  # a field the store was written before: its value then
        if got != v:
            show = lambda x: x[:12] if isinstance(x, str) and len(x) == 64 else x  # hashes: a prefix is enough
            other = "another --tokens or --colbert_from" if k == "token_vectors" else "another model, corpus or setting"
            raise ValueError(f"{path}: field '{k}': this store was written for {show(got)!r}, this run needs "
                             f"{show(v)!r} ({other}): pass another --store, or remove {os.path.dirname(path)} to "
                             "encode again")
    return meta


def open_store(path, expect=None):
    """The store in path as packed encodings, every array memory-mapped (np.load mmap_mode="r"): nothing is read until
    used. expect: fields meta.json must have (store_meta). Every file is checked against meta.json (dtype, shape,
    offsets, then check_files: unchanged since merge), naming the file and the field. A store without token vectors:
    no cb_ptr, cb_vecs; compact ones (int8, pq): cb_vecs is a codec.Decoded view that decodes the rows read."""
    if not os.path.exists(os.path.join(path, "meta.json")):
        shards = glob.glob(os.path.join(path, "shards", "*.npz"))
        raise FileNotFoundError(f"{path}: no meta.json: not a finished store ({len(shards)} shards written; "
                                "python eval.py encode ... finishes it)")
    meta = check_meta(os.path.join(path, "meta.json"), {"format": FORMAT, **(expect or {})})
    T, D, tv = meta.get("tokens"), meta.get("dim"), meta.get("token_vectors", DEFAULTS["token_vectors"])
    shapes = {"dense": (meta["n"], meta["hidden"]), "sp_ptr": (meta["n"] + 1,), "sp_ids": (meta["nnz"],),
              "sp_w": (meta["nnz"],), "cb_ptr": (meta["n"] + 1,), "cb_vecs": (T, D), "cb_q": (T, D), "cb_scale": (T,),
              "cb_coarse": (T,), "cb_codes": (T, int(tv[2:]) if codec.kind(tv) == "pq" else None),
              **{k: tuple(v) for k, v in meta.get("codebook", {}).items()}}
    dtypes = dict(DTYPES, dense=np.dtype(meta.get("dense_vectors", DEFAULTS["dense_vectors"])))
    P = {}
    for key, fname in store_files(meta).items():
        f = os.path.join(path, fname)
        x = load(f, mmap_mode="r")  # missing, truncated, not a .npy: "unreadable"
        if x.dtype != dtypes[key] or x.shape != shapes[key]:
            raise ValueError(f"{f}: field 'shape': expected {shapes[key]} {np.dtype(dtypes[key])} (meta.json), got "
                             f"{x.shape} {x.dtype}")
        P[key] = x
    for key, total in (("sp_ptr", meta["nnz"]), ("cb_ptr", meta.get("tokens"))):
        if key not in P:  # a store without token vectors
            continue
        ptr = P[key] = np.array(P[key])  # (N+1,) int64 in memory: 8 MB per million passages
        if ptr[0] != 0 or ptr[-1] != total or (np.diff(ptr) < 0).any():
            down = np.flatnonzero(np.diff(ptr) < 0)
            raise ValueError(f"{os.path.join(path, FILES[key])}: field 'values': expected offsets from 0 to {total} "
                             f"(meta.json), non-decreasing; got {ptr[0]} .. {ptr[-1]}"
                             + (f", decreasing after entry {down[0]}" if len(down) else ""))
    check_files(path, meta)
    if tv in ("float16", "none"):
        return P
    book = {k: np.array(P.pop(k)) for k in codec.BOOK if k in P}  # pq's codebooks, in memory (a few MB)
    parts = {k: P.pop(k) for k in codec.ARRAYS[codec.kind(tv)]}
    return dict(P, cb_vecs=codec.Decoded(parts, book, D))


def check_files(path, meta):
    """Each array file is the one merge wrote (meta.json's "files": size, mtime_ns, sha1). Only a file whose size or
    mtime differs from the record is read: hashed, and refused if its content differs; the same content at a new mtime
    (a copied store) is accepted and the mtime kept in checked.json, so it is not hashed again. A store written before
    the record has its files hashed on first open (what they then were goes to checked.json; a store takes hours to
    encode, a hash pass minutes) and is checked from then on."""
    record, checked, new = meta.get("files"), read_json(os.path.join(path, CHECKED)) or {}, {}
    if not record and not checked:
        gb = sum(os.path.getsize(os.path.join(path, f)) for f in store_files(meta).values()) / 1e9
        warnings.warn(f"{path}: written before stores recorded their files' hashes: hashing them now ({gb:.1f} GB, "
                      "once), checked from now on")
    for fname in store_files(meta).values():
        f, st = os.path.join(path, fname), os.stat(os.path.join(path, fname))
        ref = (record or checked).get(fname) or {}  # {} before the record, on first open
        known = [r for r in (ref, checked.get(fname)) if r and r.get("sha1") == ref.get("sha1")]
        if any((r.get("size"), r.get("mtime_ns")) == (st.st_size, st.st_mtime_ns) for r in known):
            continue  # unchanged: not read
        h = file_hash(f) if not ref or ref.get("size") == st.st_size else None
        if ref and h != ref.get("sha1"):
            raise ValueError(f"{f}: changed since it was written ({'content' if h else 'size'} differs from "
                             f"{'meta.json' if record else CHECKED}): encode again (remove {path})")
        new[fname] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": h}
    if new:
        try:
            with replacing(os.path.join(path, CHECKED), tag=str(os.getpid())) as tmp, open(tmp, "w") as f:
                json.dump(dict(checked, **new), f, indent=1)
        except OSError as e:  # a read-only store still opens
            warnings.warn(f"{e}: its changed files are hashed again on every open")
