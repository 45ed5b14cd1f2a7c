"""Every multi-process run exits: finished torchrun runs (plain and gradient-cache gloo paths) under CPU load, a rank
stopped by a bad line while the other waits in a collective, a non-finite loss on every rank. Each run has a deadline,
and no process of it (ranks, DataLoader workers) may be left behind.
M3_TEARDOWN_RUNS=20 python -m pytest -q tests/test_teardown.py runs the loop 20 times (RESULTS.md)."""
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import data
from model import M3
from tiny import run, run_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return run_inputs(tmp_path_factory.mktemp("teardown"), long=80)


def train_cmd(setup, out, *extra, data_file="train.jsonl"):
    return TORCHRUN + [os.path.join(ROOT, "train.py"), os.path.join(ROOT, "configs/tiny.yaml"),
                       f"--model={setup / 'model'}", f"--train_data={setup / data_file}", f"--out_dir={out}",
                       "--length_ranges=0,64", "--batch_sizes=2", *extra]


def leftovers(out):
    """Processes whose command line names out (the ranks and their DataLoader workers carry train.py's arguments)."""
    found = subprocess.run(["pgrep", "-f", f"--out_dir={out}"], capture_output=True, text=True).stdout.split()
    return [p for p in found if p != str(os.getpid())]


def test_finished_two_process_runs_always_exit(setup, tmp_path):
    n = int(os.environ.get("M3_TEARDOWN_RUNS", "4"))
    paths = [[], ["--grad_cache=true", "--sub_batch_size=3"]]  # both gloo paths, alternately

    def one(i):
        out = tmp_path / f"run{i}"
        res = run(train_cmd(setup, out, "--max_steps=3", "--head_schedule=dense", *paths[i % 2]), 240, cwd=ROOT,
                  env=ENV)
        return i, res, leftovers(out), (out / "final").is_dir()
    with ThreadPoolExecutor(2) as pool:  # two launches at once: 4 ranks and their workers on the CPU cores
        results = list(pool.map(one, range(n)))
    for i, res, left, final in results:
        assert res.returncode == 0 and final, (i, res.stdout[-1500:], res.stderr[-1500:])
        assert left == [], (i, left)


def freeze(proc, out, sig):
    """sig to every process of the run: torchrun's group, and the ranks with their DataLoader workers, which torchrun
    starts in sessions of their own (a signal to its group alone leaves them running: they would read the file while
    the test rewrites it)."""
    os.killpg(proc.pid, sig)
    for pid in leftovers(out):
        os.kill(int(pid), sig)


def test_a_rank_stopped_by_a_bad_line_does_not_leave_the_other_waiting(setup, tmp_path):
    out = tmp_path / "bad"
    path = str(setup / "long.jsonl")
    cmd = train_cmd(setup, out, "--batch_sizes=1", "--epochs=1", "--num_workers=2", "--prefetch=2",
                    "--save_every=1000", "--head_schedule=dense", "--dist_timeout_s=3600", data_file="long.jsonl")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV,
                            start_new_session=True)
    try:
        log = out / "log.jsonl"
        deadline = time.time() + 120
        while not (log.exists() and log.read_text().strip()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        freeze(proc, out, signal.SIGSTOP)  # the whole run, while rank 1's later lines are broken
        step = max(json.loads(x)["step"] for x in log.read_text().splitlines())
        tok = M3.from_pretrained(str(setup / "model")).tokenizer
        later = data.epoch_batches(data.open_datasets(path, tok), epoch=0, seed=42, world_size=2, rank=1,
                                   length_ranges=[0, 64], batch_sizes=[1], group_by_length=True)[step + 8:]
        assert len(later) >= 8, "the run went too far before it was stopped"
        lines = open(path).read().split("\n")
        for batch in later:  # the same byte length, no closing brace: broken, and found only when read
            lines[batch[0][1]] = lines[batch[0][1]][:-1] + " "
        open(path, "w").write("\n".join(lines))
        t0 = time.time()
        freeze(proc, out, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=120)  # far below dist_timeout_s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # the property under test: the run stops at once, not after dist_timeout_s, and leaves no process behind. Which rank
    # reports first is not asserted: in 2 of ~10 runs rank 0 died first (cause not yet found; see RESULTS, Reliability)
    assert proc.returncode != 0 and "Traceback" in stderr, stderr[-3000:]
    assert time.time() - t0 < 120 and leftovers(out) == []


def test_a_non_finite_loss_stops_every_rank(setup, tmp_path):
    res = run(train_cmd(setup, tmp_path / "nan", "--temperature=1e-45"), 240, cwd=ROOT, env=ENV)
    assert res.returncode != 0 and "non-finite loss at step 0" in res.stderr, res.stderr[-3000:]
    assert leftovers(tmp_path / "nan") == [] and not (tmp_path / "nan" / "final").exists()
