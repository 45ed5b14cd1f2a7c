"""A run directory never loses a run and a resume is the same run: --overwrite keeps the earlier run until the new one
saves its first checkpoint (a failure puts it back; a kill leaves it aside and the next start says how to keep it),
never deletes the checkpoint a run starts from; a resume whose config changes the run is refused with the changes
listed unless resume_changes accepts them (the new settings then apply); resume=auto with a missing out_dir is refused;
an out_dir that cannot be written is refused before loading; a full disk at a checkpoint names it and keeps the earlier
ones; resume=auto skips a checkpoint whose tokenizer or m3.json is damaged."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import checkpoints
import runtime
import train
from model import M3
from tiny import run_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return run_inputs(tmp_path_factory.mktemp("runs"), long=400, seed=3)


def args(setup, out, *extra):
    return [os.path.join(ROOT, "configs/tiny.yaml"), f"--model={setup / 'model'}",
            f"--train_data={setup / 'train.jsonl'}", f"--out_dir={out}", "--length_ranges=0,64", "--batch_sizes=2",
            "--num_workers=0", *extra]


def snapshot(out):
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(out) for f in fs}


def records(out):
    return [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]


def test_overwrite_keeps_the_earlier_run_until_the_new_one_has_a_checkpoint(setup, tmp_path):
    out = tmp_path / "r"
    train.main(args(setup, out, "--max_steps=3"))
    earlier = snapshot(out)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):  # fails before its first checkpoint
        train.main(args(setup, out, "--max_steps=3", "--overwrite=true", "--temperature=1e-45"))
    assert snapshot(out) == earlier  # put back as it was, nothing of the failed run left
    with pytest.raises(SystemExit, match="holds the checkpoint this run starts from"):
        train.main(args(setup, out, "--overwrite=true", f"--init_from={out / 'final'}"))
    assert snapshot(out) == earlier
    train.main(args(setup, out, "--max_steps=2", "--seed=7", "--overwrite=true"))
    assert [r["step"] for r in records(out)] == [0, 1] and sorted(os.listdir(out)) == ["config.yaml", "final",
                                                                                       "log.jsonl"]


def test_a_killed_overwrite_leaves_the_earlier_run_aside_and_the_next_start_says_how_to_keep_it(setup, tmp_path):
    out = tmp_path / "k"
    train.main(args(setup, out, "--max_steps=2"))
    earlier = snapshot(out)
    cmd = [sys.executable, "train.py"] + args(setup, out, f"--train_data={setup / 'long.jsonl'}", "--epochs=1",
                                              "--overwrite=true", "--head_schedule=dense", "--save_every=100000")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not ((out / checkpoints.REPLACED).is_dir() and (out / "log.jsonl").exists()  # the new run's log
                   and (out / "log.jsonl").read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, "the run ended before it was killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    aside = snapshot(out / checkpoints.REPLACED)
    assert aside == earlier  # the earlier run, whole, moved aside
    with pytest.raises(SystemExit, match=r"holds .*\.replaced: the run an --overwrite moved aside.*files back"):
        train.main(args(setup, out, "--overwrite=true"))
    assert snapshot(out / checkpoints.REPLACED) == earlier


def test_a_resume_that_changes_the_run_is_refused_unless_accepted_and_then_uses_the_new_settings(setup, tmp_path):
    out = tmp_path / "c"
    train.main(args(setup, out, "--max_steps=6", "--save_every=3"))
    os.remove(out / "final" / "train_state.pt")  # resume from step 3
    before = snapshot(out)
    with pytest.raises(SystemExit, match=r"step-0000003 was saved by another config: train_group_size 3 -> 2; "
                                         r"lr 0.001 -> 0.002\. A resume continues the same run"):
        train.main(args(setup, out, "--max_steps=6", "--resume=auto", "--lr=2e-3", "--train_group_size=2"))
    with pytest.raises(SystemExit, match="freeze '' -> 'encoder.embeddings'"):
        train.main(args(setup, out, "--max_steps=6", "--resume=auto", "--freeze=encoder.embeddings"))
    assert snapshot(out) == before
    with pytest.raises(SystemExit, match="optimizer state does not fit this run's trainable parameters"):
        train.main(args(setup, out, "--max_steps=6", "--resume=auto", "--freeze=encoder.embeddings",
                        "--resume_changes=true"))
    train.main(args(setup, out, "--max_steps=6", "--resume=auto", "--lr=2e-3", "--resume_changes=true",
                    "--log_every=1"))
    saved = yaml.safe_load(open(out / "config.yaml"))
    assert saved["lr"] == 2e-3
    same = args(setup, tmp_path / "same", "--max_steps=6", "--lr=2e-3", "--log_every=1")
    train.main(same)  # the new lr from the start: at steps 3-5 the schedule's lr is the same function of the step
    lrs = {r["step"]: r["lr"] for r in records(out) if r["step"] >= 3}
    assert lrs == {r["step"]: r["lr"] for r in records(tmp_path / "same") if r["step"] >= 3} and len(lrs) == 3
    state = torch.load(out / "final" / "train_state.pt", weights_only=True)
    assert all(g["lr"] == pytest.approx(0.0) for g in state["optimizer"]["param_groups"])  # decayed to 0 at the end


def test_resume_auto_refuses_a_missing_out_dir_and_says_when_there_is_nothing_yet(setup, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"resume=auto: out_dir='.*typo' does not exist, so there is no run"):
        train.main(args(setup, tmp_path / "typo", "--resume=auto", "--max_steps=1"))
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    train.main(args(setup, tmp_path / "empty", "--resume=auto", "--max_steps=1"))
    assert "resume=auto: no checkpoint in" in capsys.readouterr().out and (tmp_path / "empty" / "final").is_dir()


def test_an_out_dir_that_cannot_be_written_is_refused_before_loading(setup, monkeypatch):
    loads = []
    monkeypatch.setattr(M3, "from_pretrained", lambda *a, **k: loads.append(a))
    with pytest.raises(SystemExit, match=r"out_dir='/proc/self/run'.*: cannot write in /proc/self"):
        train.main(args(setup, "/proc/self/run", "--max_steps=1"))
    assert loads == []


def test_a_full_disk_at_a_checkpoint_names_it_and_keeps_the_earlier_ones(setup, tmp_path, monkeypatch):
    out = tmp_path / "d"
    real = torch.save

    def full(obj, f, *a, **k):  # the second checkpoint's train_state.pt finds the disk full
        if str(f).endswith(os.path.join(".tmp-step-0000004", "train_state.pt")):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 512 vs 448")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"step-0000004: checkpoint not written \(.*inline_container.*\): disk full"):
        train.main(args(setup, out, "--max_steps=6", "--save_every=2"))
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["config.yaml", "log.jsonl", "step-0000002"]  # no half checkpoint
    cfg = train.load_config(args(setup, out, "--max_steps=6", "--save_every=2", "--resume=auto"))
    path, state = checkpoints.find_resume(cfg)
    assert path.endswith("step-0000002") and state["step"] == 2


def test_resume_auto_skips_a_checkpoint_whose_tokenizer_or_m3_json_is_damaged(setup, tmp_path, capsys):
    out = tmp_path / "t"
    train.main(args(setup, out, "--max_steps=6", "--save_every=2", "--keep_last=5"))
    (out / "final" / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    (out / "step-0000004" / "m3.json").write_text("{pooling")
    cfg = train.load_config(args(setup, out, "--max_steps=6", "--save_every=2", "--keep_last=5", "--resume=auto"))
    capsys.readouterr()
    path, _ = checkpoints.find_resume(cfg)
    said = capsys.readouterr().out
    assert path.endswith("step-0000002")
    for name, why in (("final", "tokenizer.json: not valid JSON"), ("step-0000004", "m3.json: not valid JSON")):
        assert re.search(f"skipped .*{name}, newer but broken \\(.*{why}", said), (name, said)


def test_the_writable_check_takes_relative_paths_whose_folders_do_not_exist_yet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/eval/<name>: eval.py's default --out, before runs/ exists
    assert runtime.writable_error(os.path.join("runs", "eval", "x"), "--out") is None
    assert "cannot write in /proc/self" in runtime.writable_error("/proc/self/a/b", "--out")
