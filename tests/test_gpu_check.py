"""bench/gpu_check.py --dry-run: the GPU acceptance check's code path on CPU passes every part, prints every figure."""
import math
import os
import re
import sys

from tiny import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ["device_tests", "bf16_loss", "grad_cache", "stages", "step_time", "encode_rate", "max_batch"]
NUMBERS = ["device_tests_passed", "device_tests_failed", "loss_fp32", "loss_bf16", "loss_bf16_vs_fp32_rel",
           "grad_cache_vs_plain_rel", "grad_cache_ckpt_vs_plain_rel", "dropout_effect_rel", "stage_pretrain_loss0",
           "stage_warmup_loss0", "stage_unified_loss0", "step_over_encoder", "optimizer_ms", "step_over_encoder_b48",
           "encoder_mask_over_nomask", "tok_s_512", "tok_s_8192", "encode_tok_s_512", "encode_tok_s_8192",
           "max_queries_per_gpu", "max_batch_exact", "passages_per_gpu", "paper_table10"]


def test_dry_run_passes_every_part_and_prints_every_figure(tmp_path):
    out = run([sys.executable, "bench/gpu_check.py", "--dry-run", f"--log_dir={tmp_path}"], cwd=ROOT, timeout=600)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    last = re.fullmatch(r"gpu_check ok=(\d+) failed=0", lines[-1])
    assert last and int(last.group(1)) == len(PARTS), lines[-1]
    figures = dict(line.split("=", 1) for line in lines[:-1] if re.fullmatch(r"[a-z][a-z0-9_]*=\S+", line))
    assert len(figures) == len(lines) - 1, [x for x in lines[:-1] if "=" not in x]  # nothing else on a passing run
    for key in NUMBERS:
        assert math.isfinite(float(figures[key])), key
    assert {f"part_{p}" for p in PARTS} | {f"stage_{s}" for s in ("pretrain", "warmup", "unified")} <= set(figures)
    assert all(figures[f"part_{p}"] == "ok" for p in PARTS)
    assert int(figures["device_tests_passed"]) > 0 and int(figures["device_tests_failed"]) == 0
    assert float(figures["grad_cache_vs_plain_rel"]) <= 1e-4 < float(figures["dropout_effect_rel"])
    if figures["max_batch_stopped_by_budget"] == "0":  # --tiny simulates room for 10.5 queries
        assert int(figures["max_queries_per_gpu"]) == 10 and figures["max_batch_exact"] == "1"
