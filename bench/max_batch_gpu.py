"""Largest per-GPU query batch of one bf16 unified step at 8192 passage tokens, next to the paper's Table 10.

24-layer XLM-R-large-shaped random encoder (hidden 1024, 16 heads, FFN 4096, vocab 250002, 8194 positions, sdpa
attention), queries 512 / passages 8192 tokens (full length), G=8, all three heads + self-distillation, bf16 autocast,
gradient checkpointing ON, gradient cache ON (sub_batch_size texts per chunk). A try = train.train_step +
train.optimizer_step (optimizer states exist: one warm-up step at 1 query first); a try fits unless it raises
torch.cuda.OutOfMemoryError; the cache is emptied between tries. PYTORCH_CUDA_ALLOC_CONF defaults to
expandable_segments:True (less fragmentation); fp32 matmuls (the scores, computed in fp32) may use TF32 to keep the
in-batch colbert scores (B x B*G x 511 x 8191 x 1024) fast; neither changes what is allocated.
Search: probes at 1, 2, 4 queries -> quadratic fit of peak memory -> first guess; then steps of 1, 2, 4, ... away from
the guess until the answer is bracketed, then bisection; capped at --cap queries. Time guard: a try at B queries is
estimated at 1.2 x B x the largest per-query time of any fitting try so far (time grows about linearly in B, a little
faster through the B x B*G colbert scores); a try that would overrun --budget_s is replaced by the largest one that
would not, if that still narrows the bracket, else the search stops and says "stopped by --budget_s" with the bracket.

    python bench/max_batch_gpu.py            # one GPU; ~8 min on an H100; last line: max_queries_per_gpu=<n> ...
    python bench/max_batch_gpu.py --tiny     # the same search on CPU: 2 layers, short texts, simulated memory
"""
import argparse
import gc
import os
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import XLMRobertaConfig, XLMRobertaModel  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ALL_HEADS, random_batch  # noqa: E402  (puts the repository on sys.path)
import train  # noqa: E402
from model import M3  # noqa: E402
from tiny import make_tokenizer  # noqa: E402

PAPER = 130  # Table 10: max batch size per device at 8192 tokens with split-batch (A800 80GB), SPEC 4.6
TINY_PEAK_MB = (0.5, 20.0, 100.0)  # --tiny: peak = 0.5 B^2 + 20 B + 100 MB, simulated (a tiny step's RSS is noise)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU check of the search: 2 layers, 16/128 tokens")
    ap.add_argument("--cap", type=int, default=256, help="largest batch tried (queries)")
    ap.add_argument("--budget_s", type=float, default=420, help="seconds for the search after the probes")
    ap.add_argument("--sub_batch", type=int, default=4, help="texts per gradient-cache chunk")
    ap.add_argument("--group", type=int, default=8)
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("bench/max_batch_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False here). "
                         "Run `python bench/max_batch_gpu.py --tiny` to check the search logic on CPU.")
    dev = torch.device("cpu" if args.tiny else "cuda")
    G = args.group
    if args.tiny:
        TQ, TP, shape = 16, 128, dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=128, max_position_embeddings=130)
    else:
        TQ, TP, shape = 512, 8192, dict(vocab_size=250002, hidden_size=1024, num_hidden_layers=24,
                                        num_attention_heads=16, intermediate_size=4096, max_position_embeddings=8194)
        torch.set_float32_matmul_precision("high")
    tok = make_tokenizer("xlmr")
    torch.manual_seed(0)
    with dev:  # random init directly on the device
        enc = XLMRobertaModel(XLMRobertaConfig(type_vocab_size=1, pad_token_id=tok.pad_token_id, bos_token_id=0,
                                               eos_token_id=2, attn_implementation="sdpa", **shape),
                              add_pooling_layer=False)
        model = M3(enc, tok)
    model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(dev).train()
    cfg = train.Config(train_group_size=G, query_max_len=TQ, passage_max_len=TP, self_distill=True, dtype="bf16",
                       gradient_checkpointing=True, grad_cache=True, sub_batch_size=args.sub_batch)
    opt, sched = train.make_optimizer(model, cfg, total_steps=1000)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")  # CPU runs fp32, as train.py
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (--tiny)"
    print(f"{name} | encoder {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, vocab "
          f"{shape['vocab_size']}, {n_params / 1e6:.0f}M parameters | queries {TQ} / passages {TP} tokens, G={G} | "
          f"bf16={dev.type == 'cuda'}, checkpointing on, grad cache on, sub_batch_size={args.sub_batch}", flush=True)

    def free():
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    capacity = [None]  # bytes a step may peak at (GPU: reachable by the allocator; --tiny: simulated, set below)
    fits_s = {}  # B -> seconds of each try that fitted: the time guard's measure

    def attempt(B):
        """One training step at B queries -> (fits, seconds, peak bytes or None)."""
        free()
        batch = random_batch(B, G, TQ, TP, tok, shape["vocab_size"], device=dev)  # full length
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            train.train_step(model, batch, cfg, ALL_HEADS, True, amp, scaler)
            train.optimizer_step(model, opt, sched, scaler, cfg, ALL_HEADS)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
            else:
                peak = np.polyval(TINY_PEAK_MB, B) * 2 ** 20
                if capacity[0] is not None and peak > capacity[0]:
                    raise torch.cuda.OutOfMemoryError(f"simulated: peak {peak / 2 ** 20:.0f} MB > cap")
            ok = True
        except torch.cuda.OutOfMemoryError as e:
            ok, peak = False, None
            msg = str(e).splitlines()[0][:120]
        dt = time.perf_counter() - t0
        if ok:
            fits_s[B] = max(dt, fits_s.get(B, 0.0))
        opt.zero_grad(set_to_none=True)  # after an OOM: the partial gradients go
        del batch
        free()
        print(f"  B={B:4d} ({B * G} passages): {'fits' if ok else 'OOM '} {dt:7.1f} s"
              + (f", peak {peak / 2 ** 30:.2f} GiB" if ok else f" ({msg})"), flush=True)
        return ok, dt, peak

    attempt(1)  # warm-up: optimizer states now exist
    fits_s.clear()  # its one-off start-up costs are no measure of a try's time
    probes = {}
    for B in (1, 2, 4):
        ok, dt, peak = attempt(B)
        if not ok:
            raise SystemExit(f"max_queries_per_gpu<{B}: a {B}-query step does not fit (paper: {PAPER})")
        probes[B] = (dt, peak)
    Bs = np.array(list(probes), dtype=float)
    fit = np.polyfit(Bs, [p for _, p in probes.values()], 2)  # peak(B) = c2 B^2 + c1 B + c0
    if dev.type == "cuda":
        capacity[0] = 0.97 * (torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved())
    else:  # pretend the device holds about 10.5 queries' worth, so the search has an answer to find (10)
        capacity[0] = np.polyval(TINY_PEAK_MB, 10.5) * 2 ** 20
    grid = np.arange(1, args.cap + 1)
    under = grid[np.polyval(fit, grid) <= capacity[0]]
    guess = int(under.max()) if len(under) else 1
    per_query = lambda: max(dt / B for B, dt in fits_s.items())  # noqa: E731  (slowest per query so far)
    print(f"probes: peak ~ {fit[0] / 2 ** 20:.3f} B^2 + {fit[1] / 2 ** 20:.1f} B + {fit[2] / 2 ** 20:.0f} MB, capacity "
          f"{capacity[0] / 2 ** 30:.2f} GiB -> first guess B={guess}; ~{per_query():.2f} s per query", flush=True)

    lo, hi, B, step, mode, t_start = 4, args.cap + 1, guess, 1, None, time.perf_counter()
    stopped = False
    while hi - lo > 1:  # lo fits; hi does not (cap + 1: never tried)
        B = min(max(B, lo + 1), hi - 1)
        left = args.budget_s - (time.perf_counter() - t_start)
        if 1.2 * per_query() * B > left:  # conservative: never start a try that would overrun the budget
            can = int(left / (1.2 * per_query()))  # the largest try that would not
            if can <= lo:
                stopped = True
                print(f"stopping: a {B}-query try (~{1.2 * per_query() * B:.1f} s) would overrun --budget_s="
                      f"{args.budget_s:g} ({max(left, 0):.1f} s left)", flush=True)
                break
            print(f"  a {B}-query try (~{1.2 * per_query() * B:.1f} s) would overrun --budget_s={args.budget_s:g} "
                  f"({left:.1f} s left): {can} queries instead", flush=True)
            B = can
        ok = attempt(B)[0]
        lo, hi = (B, hi) if ok else (lo, B)
        mode = ok if mode is None else mode
        if mode is ok:  # still moving away from the guess in the same direction: double the step
            B, step = (B + step if ok else B - step), 2 * step
        else:  # bracketed: bisect
            mode, B = "bisect", (lo + hi) // 2
    exact = hi - lo == 1
    if stopped:
        upper = (f"stopped by --budget_s={args.budget_s:g}: the largest fitting batch is in [{lo}, {hi - 1}] ("
                 + (f"{hi} does not fit)" if hi <= args.cap else f"nothing above {lo} tried; --cap={args.cap})"))
    else:
        upper = "(cap reached)" if hi > args.cap else f"{hi} does not fit"
    print(f"largest fitting batch: {lo} queries = {lo * G} passages = {lo * (G + 1)} texts of up to {TP} tokens; "
          f"{upper}. Paper Table 10: {PAPER} per device at 8192 with split-batch (A800 80GB; the paper does not "
          f"say whether that counts queries with their {G - 1} negatives or single texts)")
    print(f"max_queries_per_gpu={lo} exact={int(exact)} passages_per_gpu={lo * G} paper_table10={PAPER}")


if __name__ == "__main__":
    main()
