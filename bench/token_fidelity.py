"""What compact token vectors (eval.py --tokens, codec.py) cost in quality: the demo's checkpoint on SciFact test (300
queries, all 5,183 passages at 256 tokens) evaluated from a store of float16, int8 and pq32 token vectors, both
protocols (the exact one reads the token vectors twice: its token index and MaxSim; the paper one only for MaxSim over
the dense top-200), every row's nDCG@10 against float16, and each store's bytes per token vector (the token files'
sizes over the token count); and the paper protocol from a store without token vectors (--colbert_from encode: the
candidates encoded per query batch), which must equal float16's to float16 rounding. Stores go to --dir (kept: a rerun
evaluates them again without encoding).

    python bench/token_fidelity.py [--ckpt runs/demo/3_unified/final]   # ~20 min on 2 idle cores, after bash demo.sh
Last line: token_int8_max_dndcg=<f> token_pq32_max_dndcg=<f> colbert_encode_max_dndcg=<f> pq32_x_smaller=<f> (the
largest |difference| over rows and protocols; how many times smaller than float16 pq32's token vectors are).
"""
import argparse
import json
import os

from common import ROOT  # noqa: F401 (common puts the repository on sys.path)
import codec  # noqa: E402
from eval import evaluate  # noqa: E402
from search import ROWS  # noqa: E402
from store import FILES  # noqa: E402

KINDS = ("float16", "int8", "pq32")


def token_bytes(path):
    """Bytes per token vector of the store in path: its token files (codec.ARRAYS, without .npy headers) / tokens."""
    meta = json.load(open(os.path.join(path, "meta.json")))
    arrays = codec.ARRAYS[codec.kind(meta["token_vectors"])]
    return sum(meta["files"][FILES[k]]["size"] - 128 for k in arrays) / meta["tokens"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", default=os.path.join(ROOT, "runs", "demo", "3_unified", "final"))
    p.add_argument("--dir", default=os.path.join(ROOT, "runs", "token_fidelity"))
    p.add_argument("--kinds", default=",".join(KINDS) + ",encode", help="float16 first; encode: --colbert_from encode")
    a = p.parse_args()
    kinds = a.kinds.split(",")
    data = os.path.join(ROOT, "data", "scifact")
    res = {}
    for tokens in [k for k in kinds if k != "encode"]:
        st = os.path.join(a.dir, tokens)
        for protocol in ("exact", "paper"):
            r = evaluate(a.ckpt, data, "test", passage_max_len=256, protocol=protocol, store=st, tokens=tokens,
                         cache_dir=os.path.join(a.dir, "cache"), verbose=False)
            res[tokens, protocol] = {row: r["rows"][row]["nDCG@10"] for row in ROWS}
        res[tokens, "bytes"] = token_bytes(st)
    if "encode" in kinds:
        r = evaluate(a.ckpt, data, "test", passage_max_len=256, protocol="paper", store=os.path.join(a.dir, "none"),
                     colbert_from="encode", cache_dir=os.path.join(a.dir, "cache"), verbose=False)
        res["none", "paper"], res["none", "bytes"] = {row: r["rows"][row]["nDCG@10"] for row in ROWS}, 0.0
        print(f"--colbert_from encode: {r['colbert_encoded_per_query']} passages encoded per query, "
              f"{r['time_s']['colbert_encode']} s encoding on this CPU")
    done = [k for k in kinds if k != "encode"] + (["none"] if "encode" in kinds else [])
    print(f"{'tokens':8s} {'bytes/token':>11s} {'protocol':8s} " + " ".join(f"{r:>13s}" for r in ROWS))
    worst = {}
    for tokens in done:
        for protocol in ("exact", "paper") if tokens != "none" else ("paper",):
            d = [res[tokens, protocol][r] - res["float16", protocol][r] for r in ROWS]
            worst[tokens] = max(worst.get(tokens, 0), max(abs(x) for x in d))
            cells = [f"{res[tokens, protocol][r]:.4f}" + (f" ({x:+.4f})" if tokens != "float16" else "")
                     for r, x in zip(ROWS, d)]
            print(f"{tokens:8s} {res[tokens, 'bytes']:11.1f} {protocol:8s} " + " ".join(f"{c:>13s}" for c in cells))
    if len(done) == len(KINDS) + 1:  # every kind: the line progress is read from
        print(f"token_int8_max_dndcg={worst['int8']:.4f} token_pq32_max_dndcg={worst['pq32']:.4f} "
              f"colbert_encode_max_dndcg={worst['none']:.4f} "
              f"pq32_x_smaller={res['float16', 'bytes'] / res['pq32', 'bytes']:.1f}")


if __name__ == "__main__":
    main()
