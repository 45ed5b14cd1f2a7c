"""Compact passage token vectors for a store (eval.py encode --tokens): what a token vector costs on disk, and how
MaxSim reads it back (decoded to float32, rows on demand).

  float16  the vector as is: 2 D bytes (4 KB at D = 1024; 200-token passages: 410 GB per million)
  int8     q = round(127 x / s) with s = max |x| per vector, decoded s q / 127: D + 4 bytes (2x smaller); every entry
           within s / 254 of the float32 value
  pq<M>    residual product quantisation, ColBERTv2/PLAID's scheme with FAISS's k-means: the nearest of C coarse
           centroids (uint16), then the residual cut into M sub-vectors of D / M dims, each the nearest of k centroids
           (uint8): M + 2 bytes (pq32 at D = 384: 34 bytes, 22.6x smaller; pq64 at D = 1024: 66 bytes, 31x)
The codebooks (pq only) are trained once per store on the token vectors of TRAIN_PASSAGES passages drawn at random
(seed 0), before any shard is written, so every shard and every rank compresses with the same ones.
"""
import re

import faiss
import numpy as np

from search import release

TRAIN_PASSAGES = 1024  # passages whose token vectors train a store's pq codebooks (~200k vectors at 200 tokens)
COARSE, SUB = 4096, 256  # pq: coarse centroids (at most; uint16 ids) and centroids per sub-vector (uint8 codes)
ARRAYS = {"float16": ("cb_vecs",), "int8": ("cb_q", "cb_scale"), "pq": ("cb_coarse", "cb_codes")}  # per token
MATRIX = {"float16": "cb_vecs", "int8": "cb_q", "pq": "cb_codes"}  # the (tokens, .) array of each kind
BOOK = ("book_coarse", "book_sub")  # pq's codebooks: (C, D) and (M, k, D / M) float32
DTYPES = {"cb_vecs": np.float16, "cb_q": np.int8, "cb_scale": np.float32, "cb_coarse": np.uint16,
          "cb_codes": np.uint8, "book_coarse": np.float32, "book_sub": np.float32}


def kind(tokens):
    """"float16", "int8" or "pq" of a --tokens value (tokens_error has checked it)."""
    return "pq" if tokens.startswith("pq") else tokens


def tokens_error(tokens, dim=None, prefix=""):
    """What is wrong with a --tokens value for token vectors of dim dimensions (None: not known yet), or None."""
    m = re.fullmatch(r"pq(\d+)", tokens or "")
    if tokens not in ("float16", "int8") and not (m and int(m[1]) >= 1):
        return f"{prefix}tokens: expected float16, int8 or pq<M> (M sub-vectors, e.g. pq32); got {tokens!r}"
    if m and dim is not None and dim % int(m[1]):
        return (f"{prefix}tokens {tokens}: M = {m[1]} does not divide the token vectors' {dim} dimensions (e.g. "
                f"pq{next(d for d in (32, 64, 48, 16, 8, 1) if dim % d == 0)})")
    return None


def train(x, tokens, seed=0):
    """pq's codebooks from sample token vectors x (S, D) float32: {"book_coarse": (C, D), "book_sub": (M, k, D/M)},
    C = min(COARSE, S / 39) and k = min(SUB, S / 39) (FAISS k-means wants >= 39 points per centroid; a store's sample
    has ~200k: C = 4096, k = 256); {} for the other kinds."""
    if kind(tokens) != "pq":
        return {}
    x = np.ascontiguousarray(x, np.float32)
    S, D = x.shape
    M = int(tokens[2:])
    km = faiss.Kmeans(D, max(1, min(COARSE, S // 39)), niter=20, seed=seed)
    km.train(x)
    r = x - km.centroids[nearest(x, km.centroids)]  # (S, D) residuals
    subs = []
    for m, part in enumerate(np.split(r, M, axis=1)):  # (S, D/M) each
        sk = faiss.Kmeans(D // M, max(1, min(SUB, S // 39)), niter=20, seed=seed + 1 + m)
        sk.train(np.ascontiguousarray(part))
        subs.append(sk.centroids)
    return {"book_coarse": km.centroids.copy(), "book_sub": np.stack(subs)}


def nearest(x, centroids):
    """(n,) index of each row of x's nearest centroid (L2, FAISS exact search)."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    return index.search(np.ascontiguousarray(x, np.float32), 1)[1][:, 0]


def compress(x, tokens, book):
    """Token vectors x (T, D) float32 -> the arrays of ARRAYS[kind(tokens)] that stand for them."""
    x = np.asarray(x, np.float32)
    k = kind(tokens)
    if k == "float16":
        return {"cb_vecs": x.astype(np.float16)}
    if k == "int8":
        s = np.abs(x).max(1) if len(x) else np.zeros(0, np.float32)  # (T,) per-vector scale
        q = np.rint(x * (127 / np.where(s > 0, s, 1))[:, None])  # (T, D) in [-127, 127]
        return {"cb_q": q.astype(np.int8), "cb_scale": s.astype(np.float32)}
    coarse = nearest(x, book["book_coarse"]) if len(x) else np.zeros(0, np.int64)  # (T,)
    r = x - book["book_coarse"][coarse]  # (T, D) residuals
    M = len(book["book_sub"])
    codes = np.stack([nearest(part, book["book_sub"][m]) for m, part in enumerate(np.split(r, M, axis=1))], 1) \
        if len(x) else np.zeros((0, M), np.int64)  # (T, M)
    return {"cb_coarse": coarse.astype(np.uint16), "cb_codes": codes.astype(np.uint8)}


def decode(parts, book):
    """compress's arrays (rows of them) -> float32 token vectors (T, D)."""
    if "cb_vecs" in parts:
        return np.asarray(parts["cb_vecs"], np.float32)
    if "cb_q" in parts:
        return np.asarray(parts["cb_q"], np.float32) * (np.asarray(parts["cb_scale"], np.float32) / 127)[:, None]
    sub = book["book_sub"]  # (M, k, D/M)
    codes = np.asarray(parts["cb_codes"], np.int64)  # (T, M)
    r = sub[np.arange(len(sub)), codes].reshape(len(codes), -1)  # (T, M, D/M) -> (T, D) residuals
    return book["book_coarse"][np.asarray(parts["cb_coarse"], np.int64)] + r


class Decoded:
    """A store's compact token vectors as a read-only (T, D) float32 array for search.maxsim and build_index: rows
    (a slice or index array) are decoded when read, and the mapped pages released after."""

    def __init__(self, parts, book, dim):
        self.parts, self.book = parts, book
        self.shape, self.dtype, self.ndim = (len(next(iter(parts.values()))), dim), np.dtype(np.float32), 2

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        out = decode({k: v[rows] for k, v in self.parts.items()}, self.book)
        for v in self.parts.values():
            release(v)
        return out
