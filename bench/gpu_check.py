"""GPU acceptance check in one command: seven parts, each in its own process with its own time limit, one key=value line
per figure, then `gpu_check ok=<n> failed=<m>` (exit code 0 iff m == 0). Random weights: nothing is downloaded.

    python bench/gpu_check.py             # one CUDA GPU, at most 8 minutes (--deadline_s; --log_dir to keep logs)
    python bench/gpu_check.py --dry-run   # the same code path on CPU: 2 layers, hidden 32, short texts (~1 minute)

Parts and their figures (GPU shapes; --dry-run runs every part with tiny ones and max_batch_gpu.py --tiny):
  device_tests  device_tests_passed, device_tests_failed, device_tests_skipped: `pytest -m device tests/test_device.py`
                with M3_TEST_DEVICE=cuda (scores vs brute force, m3_loss vs CPU float64, gradient cache, encode)
  bf16_loss     loss_fp32, loss_bf16, loss_bf16_vs_fp32_rel (fails above 5e-3), grad_bf16_vs_fp32_rel (shown only):
                one train.train_step (all heads + self-distillation), same batch and model, bf16 autocast vs fp32
  grad_cache    grad_cache_vs_plain_rel, grad_cache_ckpt_vs_plain_rel (each fails above 1e-4), grad_cache_loss_rel,
                dropout_effect_rel (must exceed 1e-2): fp32 gradients of train.train_step with dropout 0.1, the gradient
                cache (+ checkpointing) vs the plain path in the same sub-batches; the effect = plain path, another seed
  stages        stage_<pretrain|warmup|unified>=ok, stage_<name>_loss0 (step-0 loss), stage_<name>_steps: the three
                stage configs chained by torchrun (NCCL; gloo on CPU), 2-3 steps each, on a tiny random model
  step_time     gpu, step_over_encoder (train step / encoder forward+backward, same batch of 4 x 8; target <= 1.10),
                optimizer_ms (its clip + AdamW part; a profile of both sides goes to the log), encoder_mask_over_nomask
                (encoder time with padded texts, SDPA given a 4-D mask, over the same shapes unpadded), tok_s_512,
                tok_s_8192 (train-step tokens/s, gradient cache in the stage configs' chunks + checkpointing),
                peak_gib_8192, step_over_encoder_b48 (the paper's per-GPU batch at 0-500 tokens, 48 x 8,
                checkpointing on both sides): XLM-R-large shape
  encode_rate   encode_tok_s_512, encode_tok_s_8192: tokens/s of packed.TokenEncoder (model.encode in bf16 autocast,
                batch 32 texts, packed and cast to float16 on the host: eval.py --colbert_from encode's cost per
                passage) on random texts of 512 and 8,192 tokens: XLM-R-large shape
  max_batch     max_queries_per_gpu, max_batch_exact, passages_per_gpu, paper_table10, max_batch_stopped_by_budget:
                bench/max_batch_gpu.py (its last line), --budget_s from the time left
Each part ends with part_<name>=ok|failed|timeout and time_<name>_s; one the deadline leaves no time for prints
skipped_<name>=deadline and counts as failed. Every process's full output is kept in --log_dir (default: a new
temporary directory, printed as log_dir=...).
"""
import argparse
import dataclasses
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import yaml
from transformers import XLMRobertaConfig, XLMRobertaModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ALL_HEADS, ROOT, random_batch, reset_peak_rss, rss_mb  # noqa: E402  (the repository on sys.path)
import train  # noqa: E402
from model import M3  # noqa: E402
from tiny import WORDS, make_encoder, make_tokenizer  # noqa: E402

# (layers, hidden, attention heads, FFN, vocab, positions) of the random XLM-R-shaped encoders
SHAPES = {"small": (4, 256, 4, 1024, 250002, 512), "large": (24, 1024, 16, 4096, 250002, 8192),
          "tiny": (2, 32, 2, 128, 1000, 256)}
LIMITS = {"device_tests": (90, 60), "bf16_loss": (60, 40), "grad_cache": (60, 40), "stages": (150, 90),
          "step_time": (150, 60), "encode_rate": (90, 40),
          "max_batch": (None, None)}  # seconds (GPU, --dry-run); None: all that is left
STAGE_CHUNK_TOKENS = yaml.safe_load(open(os.path.join(ROOT, "configs", "unified.yaml")))["sub_batch_tokens"]
FIGURE = re.compile(r"[a-z][a-z0-9_]*=\S+")


def fig(key, value):
    print(f"{key}={value}", flush=True)


def note(text):
    """Lines that are not figures: kept in the log, shown under a part that fails."""
    for line in str(text).rstrip().splitlines():
        print(f"# {line}", flush=True)


def sh(cmd, timeout, log, env=None):
    """cmd in its own process group, output to the file `log` -> (exit code, or None past timeout; the output).
    On a timeout, or when this process is stopped, the group gets SIGTERM (torchrun passes it on), then SIGKILL."""
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except BaseException as e:  # TimeoutExpired, or SystemExit from the SIGTERM handler of a part process
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(p.pid, sig)
                    p.wait(wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            rc = None
    return rc, open(log, errors="replace").read()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def random_m3(shape, dev, dropout):
    """A random XLM-R-shaped M3 (sdpa attention) built on `dev`, and the tests' tokenizer (XLM-R special ids)."""
    L, H, A, F, V, P = SHAPES[shape]
    tok = make_tokenizer("xlmr")
    torch.manual_seed(0)
    with dev:
        enc = XLMRobertaModel(XLMRobertaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=A,
                                               intermediate_size=F, max_position_embeddings=P + 2, type_vocab_size=1,
                                               pad_token_id=tok.pad_token_id, bos_token_id=0, eos_token_id=2,
                                               hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                               attn_implementation="sdpa"), add_pooling_layer=False)
        model = M3(enc, tok)
    return model.to(dev).train(), tok, V


def batch_on(dev, B, G, TQ, TP, tok, V, ragged):
    """common.random_batch (drawn on the CPU from seed 0, then moved): the same batch on every device."""
    return random_batch(B, G, TQ, TP, tok, V, torch.Generator().manual_seed(0), device=dev, ragged=ragged)


def grads_of_step(model, batch, cfg, amp, seed=0):
    """One train.train_step from zero gradients, dropout seeded -> (loss, {name: gradient})."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, _ = train.train_step(model, batch, cfg, ALL_HEADS, True, amp, torch.amp.GradScaler(amp.device, enabled=False))
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_rel(g, ref):
    """max over tensors of max|g - ref| / max|ref|: every tensor on the scale of its own gradient."""
    assert set(g) == set(ref), set(g) ^ set(ref)
    return max(((g[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)).item() for n in ref)


# ----------------------------------------------------------------------------------------------------------------
# the parts (each runs in its own process: python bench/gpu_check.py --part NAME)

def part_device_tests(dev, dry, limit_s, log_dir):
    rc, out = sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "device",
                  "tests/test_device.py"], limit_s - 5, os.path.join(log_dir, "device_tests.pytest.log"),
                 env={"M3_TEST_DEVICE": dev.type})
    note("\n".join(out.splitlines()[-15:]))
    summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b", line)]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary[-1] if summary else "")}
    fig("device_tests_passed", counts.get("passed", 0))
    fig("device_tests_failed", counts.get("failed", 0) + counts.get("error", 0))
    fig("device_tests_skipped", counts.get("skipped", 0))
    assert rc == 0 and counts.get("passed", 0) > 0 and not counts.get("skipped"), f"pytest exit code {rc}"


def part_bf16_loss(dev, dry, limit_s, log_dir):
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 side is true fp32
    model, tok, V = random_m3("tiny" if dry else "small", dev, dropout=0.0)
    B, G, TQ, TP = (2, 3, 16, 32) if dry else (4, 4, 32, 128)
    batch = batch_on(dev, B, G, TQ, TP, tok, V, ragged=True)
    cfg = train.Config(train_group_size=G, query_max_len=TQ, passage_max_len=TP, self_distill=True)
    loss32, g32 = grads_of_step(model, batch, cfg, torch.autocast(dev.type, enabled=False))
    loss16, g16 = grads_of_step(model, batch, cfg, torch.autocast(dev.type, dtype=torch.bfloat16))  # CPU too
    rel = abs(loss16 - loss32) / abs(loss32)
    fig("loss_fp32", f"{loss32:.6f}")
    fig("loss_bf16", f"{loss16:.6f}")
    fig("loss_bf16_vs_fp32_rel", f"{rel:.3g}")
    norm = lambda gs: math.sqrt(sum(x.double().pow(2).sum().item() for x in gs))  # noqa: E731
    fig("grad_bf16_vs_fp32_rel", f"{norm(g16[n] - g32[n] for n in g32) / norm(g32.values()):.3g}")
    # bf16 keeps 8 significant bits, but the scores are computed in fp32 from the bf16 representations: measured with
    # CPU bf16 autocast, 1.3e-4 on this part's GPU shapes (1.4e-3 on the dry run's hidden-32 model). Scores left in
    # bf16 (no fp32 upcast before the division by tau = 0.02, which multiplies every score error by 50) give 7.9e-3
    # on the GPU shapes. 5e-3 passes the first with ~40x room and fails the second; 2e-2 would pass both.
    assert math.isfinite(loss16) and rel <= 5e-3, f"bf16 loss {loss16} vs fp32 {loss32}: rel {rel:.3g} > 5e-3"


def part_grad_cache(dev, dry, limit_s, log_dir):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides: differences are summation order only
    model, tok, V = random_m3("tiny" if dry else "small", dev, dropout=0.1)  # hidden and attention dropout
    B, G, TQ, TP = (2, 3, 16, 32) if dry else (4, 4, 32, 128)
    batch = batch_on(dev, B, G, TQ, TP, tok, V, ragged=True)
    # both paths encode the same sub-batches in the same order, so one seed draws the same dropout masks in both;
    # the gradient cache must replay them (CPU and CUDA RNG state) when it re-encodes a chunk with a graph
    cfg = train.Config(train_group_size=G, query_max_len=TQ, passage_max_len=TP, self_distill=True, sub_batch_size=3)
    amp = torch.autocast(dev.type, enabled=False)
    loss, plain = grads_of_step(model, batch, cfg, amp)
    loss_gc, cached = grads_of_step(model, batch, dataclasses.replace(cfg, grad_cache=True), amp)
    model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, cached_ckpt = grads_of_step(model, batch, dataclasses.replace(cfg, grad_cache=True), amp)
    model.encoder.gradient_checkpointing_disable()
    _, other = grads_of_step(model, batch, cfg, amp, seed=1)  # other dropout masks: what a failed replay looks like
    rel, rel_ckpt, effect = max_rel(cached, plain), max_rel(cached_ckpt, plain), max_rel(other, plain)
    fig("grad_cache_vs_plain_rel", f"{rel:.3g}")
    fig("grad_cache_ckpt_vs_plain_rel", f"{rel_ckpt:.3g}")
    fig("grad_cache_loss_rel", f"{abs(loss_gc - loss) / abs(loss):.3g}")
    fig("dropout_effect_rel", f"{effect:.3g}")
    # fp32 keeps 24 bits (6e-8); the two paths add the same terms in another order (per chunk into .grad vs one
    # backward; CUDA kernels may also use atomics), which moves a gradient by ~1e-7..1e-6 of its tensor's largest
    # entry (measured on CPU: 1e-7 dry run, 7.5e-7 on the GPU shapes). 1e-4 is >100x that, and ~10^4 below the
    # effect of other dropout masks (dropout_effect_rel: 1.9 dry run, 3.8 on the GPU shapes).
    assert rel <= 1e-4 and rel_ckpt <= 1e-4, f"gradient cache vs plain: {rel:.3g}, with checkpointing {rel_ckpt:.3g}"
    assert effect > 1e-2, f"dropout moves the gradients by only {effect:.3g}: a replay fault would go unseen"


def part_stages(dev, dry, limit_s, log_dir):
    end = time.time() + limit_s - 5
    d = tempfile.mkdtemp(prefix="stages_", dir=log_dir)  # model, data and the three runs, kept with the logs
    tok = make_tokenizer()
    make_encoder(tok).save_pretrained(os.path.join(d, "bare"))  # a bare encoder: pretrain starts its heads
    tok.save_pretrained(os.path.join(d, "bare"))
    rnd = random.Random(0)
    text = lambda n: " ".join(rnd.choice(WORDS) for _ in range(n))  # noqa: E731
    with open(os.path.join(d, "train.jsonl"), "w") as f:  # 8 examples = 2 batches of 4 per epoch
        for _ in range(8):
            f.write(json.dumps({"query": text(rnd.randint(3, 8)), "pos": [text(rnd.randint(5, 18))],
                                "neg": [text(rnd.randint(5, 18)) for _ in range(3)]}) + "\n")
    # warmup: max_steps=3 = 2 dense-only steps (epoch 1) + 1 with all heads (epoch 2); the others stop after 1 epoch
    tiny = ["--query_max_len=16", "--passage_max_len=32", "--length_ranges=0,64", "--batch_sizes=4", "--max_steps=3",
            "--sub_batch_size=3", "--sub_batch_tokens=0", "--gradient_checkpointing=true", "--log_every=1",
            f"--train_data={os.path.join(d, 'train.jsonl')}"]
    stages = [("pretrain", [f"--model={os.path.join(d, 'bare')}", "--init_new_heads=true", "--train_group_size=1"]),
              ("warmup", [f"--init_from={os.path.join(d, 'pretrain', 'final')}", "--train_group_size=3"]),
              ("unified", [f"--init_from={os.path.join(d, 'warmup', 'final')}", "--train_group_size=3"])]
    logs = {}
    for name, extra in stages:
        out_dir = os.path.join(d, name)  # fresh: train.py refuses a used out_dir
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py",
               f"configs/{name}.yaml", *tiny, *extra, f"--out_dir={out_dir}"]
        rc, out = sh(cmd, end - time.time(), os.path.join(log_dir, f"stages.{name}.log"))
        note("\n".join(line for line in out.splitlines() if line.startswith("step ")) or out[-3000:])
        assert rc == 0, f"{name}: " + ("out of time" if rc is None else f"exit code {rc}")
        assert os.path.isdir(os.path.join(out_dir, "final")), f"{name}: no final checkpoint"
        logs[name] = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
        assert logs[name] and all(math.isfinite(r["loss"]) for r in logs[name]), f"{name}: {logs[name]}"
        fig(f"stage_{name}", "ok")
        fig(f"stage_{name}_loss0", f"{logs[name][0]['loss']:.4f}")
        fig(f"stage_{name}_steps", len(logs[name]))
    assert "sparse" not in logs["pretrain"][0] and logs["warmup"][-1]["colbert"] > 0, "head schedule not followed"
    assert all(r["self_kd"] > 0 and r["sparse"] > 0 for r in logs["unified"]), "unified: a head or self-KD is off"


def part_step_time(dev, dry, limit_s, log_dir):
    cuda = dev.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py on a GPU (init_distributed)
    fig("gpu", torch.cuda.get_device_name().replace(" ", "_") if cuda else "none")
    model, tok, V = random_m3("tiny" if dry else "large", dev, dropout=0.1)
    H, reps = model.encoder.config.hidden_size, 2 if dry else 3
    G, TQ = (4, 16) if dry else (8, 64)
    cfg = train.Config(train_group_size=G, query_max_len=TQ, self_distill=True)
    opt, sched = train.make_optimizer(model, cfg, total_steps=1000)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda)  # as train.py: bf16 on a GPU, fp32 on CPU
    scaler = torch.amp.GradScaler(dev.type, enabled=False)

    opt_s = []  # seconds of each optimizer_step (clip, AdamW, schedule, zero_grad)

    def step(batch, cfg):
        """train.train_step + train.optimizer_step, as train.main runs them -> seconds."""
        sync(dev)
        t0 = time.perf_counter()
        train.train_step(model, batch, cfg, ALL_HEADS, True, amp, scaler)
        sync(dev)
        t1 = time.perf_counter()
        train.optimizer_step(model, opt, sched, scaler, cfg, ALL_HEADS)
        sync(dev)
        opt_s.append(time.perf_counter() - t1)
        return time.perf_counter() - t0

    # 1) the step over the bare encoder (bench/train_step.py's measure): plain path, no checkpointing, both sides
    #    encode the same padded tensors under the same autocast; the encoder's loss is a fixed random projection
    B, TP = (2, 64) if dry else (4, 512)
    batch = batch_on(dev, B, G, TQ, TP, tok, V, ragged=True)
    r_q, r_p = torch.randn(B, TQ, H, device=dev), torch.randn(B * G, TP, H, device=dev)

    def encoder_only():
        sync(dev)
        t0 = time.perf_counter()
        with amp:
            h_q = model.encoder(input_ids=batch["q_ids"], attention_mask=batch["q_mask"]).last_hidden_state
            h_p = model.encoder(input_ids=batch["p_ids"], attention_mask=batch["p_mask"]).last_hidden_state
        ((h_q.float() * r_q).sum() + (h_p.float() * r_p).sum()).backward()
        sync(dev)
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    plain = dataclasses.replace(cfg, passage_max_len=TP)
    step(batch, plain), encoder_only()  # warm-up (optimizer states, kernels)
    ratios = []
    for _ in range(reps):  # interleaved, so machine noise hits both sides alike
        s, e = step(batch, plain), encoder_only()
        ratios.append(s / e)
        note(f"step {1000 * s:.0f} ms, encoder fwd+bwd {1000 * e:.0f} ms")
    fig("step_over_encoder", f"{statistics.median(ratios):.3f}")
    fig("optimizer_ms", f"{1000 * statistics.median(opt_s):.1f}")  # part of the step: clip + AdamW + zero_grad
    for name, fn in (("train step", lambda: step(batch, plain)), ("encoder fwd+bwd", encoder_only)):
        note(f"profile of one {name}, top ops by self time:\n{profile_table(fn, dev)}")
    # what SDPA's 4-D padding mask costs: the same shapes without padding (no mask: flash attention may run)
    padded, batch = batch, batch_on(dev, B, G, TQ, TP, tok, V, ragged=False)
    no_mask = statistics.median(encoder_only() for _ in range(reps))
    batch = padded
    fig("encoder_mask_over_nomask", f"{statistics.median(encoder_only() for _ in range(reps)) / no_mask:.3f}")
    # 2) tokens/s of the stage configs' setting: gradient cache (chunks of their sub_batch_tokens) + checkpointing
    model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for label, (B, TP) in {"512": (2, 64) if dry else (4, 512), "8192": (1, 256) if dry else (1, 8192)}.items():
        batch = batch_on(dev, B, G, TQ, TP, tok, V, ragged=False)
        big = dataclasses.replace(cfg, passage_max_len=TP, grad_cache=True, sub_batch_tokens=STAGE_CHUNK_TOKENS)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        step(batch, big)  # warm-up
        dt = statistics.median(step(batch, big) for _ in range(reps))
        tokens = (batch["q_mask"].sum() + batch["p_mask"].sum()).item()
        note(f"{label}: {B} queries x {TQ} + {B * G} passages x {TP} tokens, {1000 * dt:.0f} ms per step")
        fig(f"tok_s_{label}", f"{tokens / dt:.0f}")
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else rss_mb("VmHWM") / 1024  # CPU: the process's RSS
    fig("peak_gib_8192", f"{peak:.2f}")
    # 3) the ratio at the paper's per-GPU fine-tuning batch for 0-500 tokens (SPEC 4.5: 48 queries x 8 passages),
    #    checkpointing on both sides: the optimizer's fixed cost is spread over a batch the size of a real one
    B, TP = (4, 64) if dry else (48, 512)
    batch = batch_on(dev, B, G, TQ, TP, tok, V, ragged=True)
    r_q, r_p = torch.randn(B, TQ, H, device=dev), torch.randn(B * G, TP, H, device=dev)
    real = dataclasses.replace(cfg, passage_max_len=TP)
    step(batch, real), encoder_only()
    ratios = [step(batch, real) / encoder_only() for _ in range(reps)]
    fig("step_over_encoder_b48", f"{statistics.median(ratios):.3f}")


def profile_table(fn, dev, rows=15):
    """The top ops by self time (on the GPU when there is one) of one call of fn, as torch.profiler's table."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        fn()
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def part_encode_rate(dev, dry, limit_s, log_dir):
    """Tokens/s of --colbert_from encode's encoder call (packed.TokenEncoder) on random texts, all full length."""
    from packed import TokenEncoder
    model, tok, V = random_m3("tiny" if dry else "large", dev, dropout=0.0)
    rng = random.Random(0)
    for label, (n, T) in {"512": (16, 64) if dry else (512, 512), "8192": (4, 256) if dry else (32, 8192)}.items():
        texts = [" ".join(rng.choice(WORDS) for _ in range(T)) for _ in range(n)]  # >= T tokens: cut to T
        enc = TokenEncoder(lambda: model, texts, T, batch_size=32 if T <= 512 else 4)
        enc(range(min(n, 4)))  # warm-up (kernels, autotuning)
        sync(dev)
        t0 = time.perf_counter()
        out = enc(range(n))
        sync(dev)
        dt = time.perf_counter() - t0
        note(f"{label}: {n} texts, {len(out['cb_vecs'])} token vectors, {dt:.2f} s")
        fig(f"encode_tok_s_{label}", f"{(len(out['cb_vecs']) + n) / dt:.0f}")  # + CLS: no token vector


def part_max_batch(dev, dry, limit_s, log_dir):
    budget = max(5, limit_s - (20 if dry else 75))  # the rest: start-up, model, warm-up, probes, the last try's overrun
    rc, out = sh([sys.executable, "bench/max_batch_gpu.py", f"--budget_s={budget:.0f}"] + (["--tiny"] if dry else []),
                 limit_s - 3, os.path.join(log_dir, "max_batch.log"))
    note("\n".join(line for line in out.splitlines() if "Warning" not in line and "warnings.warn" not in line))
    last = re.search(r"^max_queries_per_gpu=(\d+) exact=([01]) passages_per_gpu=(\d+) paper_table10=(\d+)$", out,
                     re.MULTILINE)
    assert rc == 0 and last, f"bench/max_batch_gpu.py: {'out of time' if rc is None else f'exit code {rc}'}"
    for key, val in zip(("max_queries_per_gpu", "max_batch_exact", "passages_per_gpu", "paper_table10"), last.groups()):
        fig(key, val)
    fig("max_batch_stopped_by_budget", int("stopped by --budget_s" in out))


PARTS = {"device_tests": part_device_tests, "bf16_loss": part_bf16_loss, "grad_cache": part_grad_cache,
         "stages": part_stages, "step_time": part_step_time, "encode_rate": part_encode_rate,
         "max_batch": part_max_batch}


# ----------------------------------------------------------------------------------------------------------------
# the run: every part in a process of its own, within its limit and the global deadline

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the same code path in about a minute")
    ap.add_argument("--deadline_s", type=float, default=None, help="all parts together (default 460; dry run 180)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run, in order")
    ap.add_argument("--log_dir", default="", help="every process's full output (default: a new temporary directory)")
    ap.add_argument("--part", default="", help=argparse.SUPPRESS)  # internal: run one part in this process
    ap.add_argument("--limit_s", type=float, default=60, help=argparse.SUPPRESS)
    args = ap.parse_args()
    dev = torch.device("cpu" if args.dry_run else "cuda")
    log_dir = os.path.abspath(args.log_dir or tempfile.mkdtemp(prefix="gpu_check_"))  # parts run in the repository
    os.makedirs(log_dir, exist_ok=True)
    if args.part:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so sh() stops this part's own children too
        PARTS[args.part](dev, args.dry_run, args.limit_s, log_dir)
        return
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "`python bench/gpu_check.py --dry-run` runs the same code path on CPU")
    names = [n for n in args.parts.split(",") if n]
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}: parts are {', '.join(PARTS)}")
    if args.dry_run:  # every process below: one CPU thread (two spin-wait ~50x slower on a busy 2-core machine)
        os.environ["OMP_NUM_THREADS"] = "1"
    t_start = time.time()
    deadline = t_start + (args.deadline_s or (180 if args.dry_run else 460))
    fig("dry_run", int(args.dry_run))
    fig("torch", torch.__version__)
    fig("log_dir", log_dir)
    ok = failed = 0
    for name in names:
        left = deadline - time.time()
        limit = LIMITS[name][args.dry_run]
        limit = left if limit is None else min(limit, left)
        if limit < (10 if args.dry_run or name != "max_batch" else 90):  # too little time to be worth starting
            fig(f"skipped_{name}", "deadline")
            failed += 1
            continue
        t0 = time.time()
        cmd = [sys.executable, os.path.abspath(__file__), "--part", name, f"--limit_s={limit:.0f}",
               f"--log_dir={log_dir}"] + (["--dry-run"] if args.dry_run else [])
        rc, out = sh(cmd, limit, os.path.join(log_dir, f"{name}.log"))
        lines = out.splitlines()
        for line in lines:
            if FIGURE.fullmatch(line):
                print(line)
        status = "ok" if rc == 0 else "timeout" if rc is None else "failed"
        if status != "ok":  # why, in a few lines that no figure grep picks up
            for line in [x for x in lines if not FIGURE.fullmatch(x)][-15:]:
                print(line if line.startswith("# ") else f"# {line}")
        fig(f"part_{name}", status)
        fig(f"time_{name}_s", f"{time.time() - t0:.0f}")
        ok, failed = ok + (status == "ok"), failed + (status != "ok")
        sys.stdout.flush()
    fig("time_total_s", f"{time.time() - t_start:.0f}")
    print(f"gpu_check ok={ok} failed={failed}", flush=True)
    sys.exit(0 if failed == 0 else 1)


if __name__ == "__main__":
    main()
