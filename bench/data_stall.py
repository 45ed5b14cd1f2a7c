"""How long the training loop waits for its data: today's synchronous loop against batches prepared ahead by workers.

The loop is train.py's (data.batch_stream, then a step); the step is a stand-in for a GPU step, a sleep (the process
waits, as it waits for CUDA kernels) of (a) 200 ms, and (b) what an H200 takes for that batch with XLM-R large: its
tokens at the training tokens/s that bench/gpu_check.py measured (RESULTS.md: 40.9k/s at 512, 34.4k/s at 8192).
Data: real SciFact abstracts (data/scifact/corpus.jsonl) joined into queries of ~30 words and passages of the target
length, written to a temporary JSONL file; the all-MiniLM-L6-v2 WordPiece tokenizer (bundled, real). Two batch shapes
of the paper's fine-tuning table (SPEC 4.5, per GPU, G=8): 48 queries x 8 passages of up to 500 tokens, and 8 x 8 of
7,000-8,192 tokens. wait fraction = time in next(stream) / loop time, over steps 1.. (step 0 fills the pipeline).

Making a batch costs CPU time in proportion to its tokens (the tokenizer: ~0.4M tokens/s per core here), so the
workers a rank needs = seconds per batch / seconds per step; the 200 ms step needs ~10 at 8 x 8 x 8192 tokens.

    python bench/data_stall.py     # last line: data_wait_fraction=<f>  (default workers, H200 step, worst shape)
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT  # noqa: E402  (the repository on sys.path)
import train  # noqa: E402
from data import Sampling, batch_stream, epoch_batches, make_batch, open_datasets  # noqa: E402
from model import resolve  # noqa: E402

STEP_S = 0.2
H200_TOK_S = {500: 40_900, 8192: 34_400}  # training tokens/s on one H200 (bench/gpu_check.py, RESULTS.md)
SHAPES = {"0-500": (48, 400, 500), "7000-8192": (8, 7800, 8192)}  # queries per batch, passage words, max tokens


def write_data(path, n_queries, passage_words, G=8):
    """n_queries examples: a query of ~30 words, 1 positive and G-1 negatives of passage_words words each."""
    words = []
    for line in open(os.path.join(ROOT, "data", "scifact", "corpus.jsonl")):
        words += json.loads(line)["text"].split()
        if len(words) > 200_000:
            break
    at = lambda k, n: " ".join(words[(k * 7919) % (len(words) - n):][:n])  # noqa: E731 (a window of n words)
    with open(path, "w") as f:
        for i in range(n_queries):
            f.write(json.dumps({"query": at(i, 30), "pos": [at(i + 1, passage_words)],
                                "neg": [at(i * G + k + 2, passage_words) for k in range(G - 1)]}) + "\n")


def wait_fraction(datasets, batches, tok, max_len, workers, prefetch, steps, step_s):
    """Run `steps` loop iterations with a step of step_s seconds (None: the batch's H200 time) -> the data wait
    fraction over steps 1.. (step 0 fills the pipeline)."""
    opt = Sampling(seed=0, train_group_size=8, query_max_len=512, passage_max_len=max_len)
    stream = batch_stream(datasets, batches, 0, tok, opt, 0, num_workers=workers, prefetch=prefetch)
    waited = 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        batch = next(stream)
        if step == 1:
            start, waited = t0, 0.0
        waited += time.perf_counter() - t0
        tokens = (batch["q_mask"].sum() + batch["p_mask"].sum()).item()
        time.sleep(step_s or tokens / H200_TOK_S[max_len])  # the GPU step
    return waited / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="3 steps of small batches (the tests)")
    args = ap.parse_args()
    cfg = train.Config()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(resolve("minilm"))
    tok.model_max_length = 10 ** 6  # length checks are the batcher's (passage_max_len), not this tokenizer's
    worst = 0.0
    with tempfile.TemporaryDirectory() as d:
        for name, (B, words, max_len) in SHAPES.items():
            steps = 3 if args.quick else args.steps
            B = min(B, 4) if args.quick else B
            path = os.path.join(d, f"{name}.jsonl")
            write_data(path, B * (steps + 1), words // 20 if args.quick else words)
            ds = open_datasets(path, tok, cache_dir=d)
            batches = epoch_batches(ds, epoch=0, seed=0, world_size=1, rank=0, length_ranges=[0, 8192],
                                    batch_sizes=[B])
            t0 = time.perf_counter()
            made = make_batch(ds, batches[0], tok, Sampling(seed=0, train_group_size=8, query_max_len=512,
                                                            passage_max_len=max_len), 0)
            make_s = time.perf_counter() - t0
            tokens = (made["q_mask"].sum() + made["p_mask"].sum()).item()
            print(f"{name}: {B} queries x 8 passages of up to {max_len} tokens ({tokens} tokens): a batch takes "
                  f"{make_s:.2f} s to make in the loop; an H200 step {tokens / H200_TOK_S[max_len]:.2f} s", flush=True)
            for label, step_s in (("200 ms step", STEP_S), ("H200 step", None)):
                fr = {w: wait_fraction(ds, batches, tok, max_len, w, cfg.prefetch, steps, step_s)
                      for w in (0, cfg.num_workers)}
                print(f"  {label}: wait fraction in the loop (num_workers=0) {fr[0]:.3f}, ahead (num_workers="
                      f"{cfg.num_workers}, prefetch={cfg.prefetch}) {fr[cfg.num_workers]:.3f}", flush=True)
            worst = max(worst, fr[cfg.num_workers])
    print(f"data_wait_fraction={worst:.4f}")


if __name__ == "__main__":
    main()
