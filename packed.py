"""Encodings as packed arrays (eval.py, mine.py, store.py): model.encode's output packed into flat arrays (pack),
checked (check_packed), cached on disk under the checkpoint's identity (encode_cached, ckpt_key, model_key), the
model loaded only when an encoding is missing (model_loader), and passages' token vectors encoded on demand
(TokenEncoder).

Packed: dense (N, D) float32; sparse CSR sp_ptr (N+1,), sp_ids, sp_w (ids sorted within a row); colbert cb_ptr (N+1,),
cb_vecs (sum of L_i, D). Row i's entries: ptr[i]:ptr[i + 1]. A store (store.py) holds the same arrays on disk.
"""
import fnmatch
import functools
import hashlib
import os
import time
import warnings
import zipfile

import numpy as np
import torch

from model import HEAD_FILES, M3, TOKENIZER_FILES, is_local_path
from runtime import read_json, replacing

UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)  # what np.load of a damaged file raises
KEY_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
             "pytorch_model*.bin.index.json", *HEAD_FILES.values(), *TOKENIZER_FILES, "merges.txt",
             "special_tokens_map.json", "added_tokens.json")  # what M3.from_pretrained reads (and m3.json's pooling)


def encode_cached(get_model, texts, max_length, batch_size=32, mcls=False, cache_dir=None, key=None):
    """pack(model.encode(texts)), cached as <cache_dir>/<sha256(checkpoint, texts, max_length, mcls)>.npz, no pickle."""
    if cache_dir:
        h = hashlib.sha256(f"{key}|{max_length}|{mcls}|{len(texts)}".encode())
        h.update("\0".join(texts).encode())
        path = os.path.join(cache_dir, h.hexdigest()[:40] + ".npz")
        if os.path.exists(path):
            try:
                return check_packed(load(path), len(texts), path)
            except ValueError as e:  # truncated, garbage, or not these texts' arrays
                warnings.warn(f"{path}: damaged encoding cache ({e}): encoding again and replacing it")
    enc = pack(get_model().encode(texts, batch_size=batch_size, max_length=max_length, mcls=mcls))
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        with replacing(path, tag=str(os.getpid())) as tmp:  # never a half-written cache file; no lock: own temporary
            np.savez(tmp, **enc)
    return enc


class TokenEncoder:
    """Passage token vectors encoded when asked for (eval.py --colbert_from encode: the multi-vector candidates of a
    store without token vectors): called with passage ids, returns their packed colbert arrays cb_ptr (n+1,), cb_vecs
    (sum of L_i, D) in that order, float16 as a store holds them, encoded as the store was (the texts with their prefix,
    max_length, mcls) by get_model() (on the GPU when there is one: model_loader). Counts calls and passages encoded."""

    def __init__(self, get_model, texts, max_length, mcls=False, batch_size=32):
        self.get_model, self.texts, self.max_length, self.mcls = get_model, texts, max_length, mcls
        self.batch_size, self.calls, self.passages, self.seconds = batch_size, 0, 0, 0.0

    def __call__(self, ids):
        t0 = time.time()
        out = self.get_model().encode([self.texts[j] for j in ids], batch_size=self.batch_size,
                                      max_length=self.max_length, mcls=self.mcls, progress=False)
        P = pack(out)
        self.calls += 1
        self.passages += len(ids)
        self.seconds += time.time() - t0
        return {"cb_ptr": P["cb_ptr"], "cb_vecs": P["cb_vecs"].astype(np.float16)}


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
    """Identity of a checkpoint dir: what its encodings depend on, KEY_FILES (the encoder's config and weights, the
    heads, the tokenizer) and m3.json's pooling, not the rest of the folder (train_state.*, config.yaml, notes, logs,
    the sentence-transformers files). Content hash of files under 64 MB, (name, size, mtime) of larger ones."""
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
        if os.path.isfile(f) and any(fnmatch.fnmatchcase(name, p) for p in KEY_FILES):
            st = os.stat(f)
            h.update(f"{name}|{st.st_size}|".encode())
            if st.st_size < 64 << 20:
                with open(f, "rb") as fh:
                    h.update(fh.read())
            else:
                h.update(str(st.st_mtime_ns).encode())
    saved = read_json(os.path.join(path, "m3.json")) or {}  # its pooling, not its bytes; none: cls, as from_pretrained
    h.update(f"m3.json|pooling={saved.get('pooling', 'cls')}".encode())
    return h.hexdigest()


def model_key(model):
    """Identity of an in-memory model: hash of its weights and pooling."""
    h = hashlib.sha256(str(getattr(model, "pooling", "")).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def load(f, mmap_mode=None):
    """A .npy file memory-mapped (mmap_mode), or an .npz's arrays as a dict, read now; no pickle. Missing or damaged: a
    ValueError naming the file."""
    try:
        if mmap_mode:
            return np.load(f, mmap_mode=mmap_mode, allow_pickle=False)
        with open(f, "rb") as fh:  # ours to close: np.load leaves a file it opened open when it is no zip
            z = np.load(fh, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz")
            with z:
                return {k: z[k] for k in z.files}
    except UNREADABLE as e:
        raise ValueError(f"{f}: unreadable ({e.__class__.__name__}: {e})") from None


def check_packed(x, n, where, tokens=True):
    """x if it is pack's arrays for n passages (shapes, and offsets from 0 to their array's length, non-decreasing),
    else a ValueError naming where and the field. tokens False: the arrays without cb_ptr and cb_vecs (a store that
    holds no token vectors), which must then be absent."""
    need = {"dense": (n, None), "sp_ptr": (n + 1,), "sp_ids": (None,), "sp_w": (None,), "cb_ptr": (n + 1,),
            "cb_vecs": (None, None)}
    if not tokens:
        extra = [k for k in ("cb_ptr", "cb_vecs") if k in x]
        if extra:
            raise ValueError(f"{where}: field '{extra[0]}': not expected without token vectors")
        del need["cb_ptr"], need["cb_vecs"]
    for k, shape in need.items():
        if k not in x or x[k].ndim != len(shape) or shape[0] not in (None, len(x[k])):
            got = x[k].shape if k in x else "missing"
            raise ValueError(f"{where}: field '{k}': expected shape {shape} (None: any), got {got}")
    for k, rows in (("sp_ptr", "sp_ids"), ("cb_ptr", "cb_vecs")):
        if k in need and (x[k][0] != 0 or x[k][-1] != len(x[rows]) or (np.diff(x[k]) < 0).any()):
            raise ValueError(f"{where}: field '{k}': expected offsets from 0 to {len(x[rows])}, non-decreasing")
    if len(x["sp_w"]) != len(x["sp_ids"]):
        raise ValueError(f"{where}: field 'sp_w': {len(x['sp_w'])} weights for {len(x['sp_ids'])} ids")
    return x
