"""What float16 dense vectors in a store (store.py, meta.json dense_vectors) cost in quality: the demo's checkpoint on
SciFact test, both protocols, every row's nDCG@10 with the passages' dense vectors as float32 (the model's output) and
as float16 (a store's); the other arrays are the same. The float32 vectors come from --store when it holds them (a
store written before dense_vectors, e.g. bench/token_fidelity.py's float16 store), else from encoding the passages in
memory (cached in --cache_dir).

    python bench/dense_fp16.py [--ckpt runs/demo/3_unified/final]   # ~15 min on 2 idle cores
Last line: dense_fp16_max_dndcg=<f> (the largest |float16 - float32| over rows and protocols).
"""
import argparse
import os

import numpy as np

from common import ROOT  # noqa: F401 (common puts the repository on sys.path)
from beir import load_beir, passage_text  # noqa: E402
from eval import evaluate  # noqa: E402
from packed import encode_cached, model_loader  # noqa: E402
from search import ROWS  # noqa: E402
from store import as_stored, open_store  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", default=os.path.join(ROOT, "runs", "demo", "3_unified", "final"))
    p.add_argument("--store", default=os.path.join(ROOT, "runs", "token_fidelity", "float16"))
    p.add_argument("--cache_dir", default=os.path.join(ROOT, "runs", "token_fidelity", "cache"))
    a = p.parse_args()
    data = os.path.join(ROOT, "data", "scifact")
    texts = [passage_text(r) for r in load_beir(data, "test")[0]]
    P = open_store(a.store) if os.path.exists(os.path.join(a.store, "meta.json")) else None
    if P is None or P["dense"].dtype != np.float32 or len(P["dense"]) != len(texts):
        get_model, key, _ = model_loader(a.ckpt, need_key=True)
        P = as_stored(encode_cached(get_model, texts, 256, 32, False, a.cache_dir, key))  # float16 dense
        P["dense"] = encode_cached(get_model, texts, 256, 32, False, a.cache_dir, key)["dense"]  # float32 (cached)
    res = {}
    for dtype in (np.float32, np.float16):
        for protocol in ("exact", "paper"):
            r = evaluate(a.ckpt, data, "test", passage_max_len=256, protocol=protocol, verbose=False,
                         passages=(texts, dict(P, dense=np.asarray(P["dense"], dtype))), cache_dir=a.cache_dir)
            res[dtype, protocol] = [r["rows"][row]["nDCG@10"] for row in ROWS]
            print(f"{np.dtype(dtype).name:8s} {protocol:6s} " + " ".join(f"{x:.6f}" for x in res[dtype, protocol]))
    worst = max(abs(x - y) for pr in ("exact", "paper") for x, y in zip(res[np.float16, pr], res[np.float32, pr]))
    print(f"dense_fp16_max_dndcg={worst:.6f}")


if __name__ == "__main__":
    main()
