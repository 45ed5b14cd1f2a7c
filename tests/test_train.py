"""train.py: DDP == one process, gradient cache == plain path, resume == uninterrupted, head schedule, stage chain."""
import json
import pickle
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from data import epoch_batches, make_batch, open_datasets
from model import M3
from tiny import make_encoder, make_tokenizer, spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the a of and to in is for on with that by as are from be this we cell cells protein gene patients".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny saved M3 with heads, a bare encoder dir, and 12 fine-tuning examples whose lengths fit one range."""
    d = tmp_path_factory.mktemp("train")
    tok = make_tokenizer()
    m = M3(make_encoder(tok), tok)
    m.save_pretrained(d / "model")
    m.encoder.save_pretrained(d / "bare")
    tok.save_pretrained(d / "bare")
    rnd = random.Random(0)
    text = lambda n: " ".join(rnd.choice(WORDS) for _ in range(n))
    with open(d / "train.jsonl", "w") as f:
        for _ in range(12):
            f.write(json.dumps({"query": text(rnd.randint(3, 8)), "pos": [text(rnd.randint(5, 18))],
                                "neg": [text(rnd.randint(5, 18)) for _ in range(3)]}) + "\n")
    return d


def run(args, torchrun=0):
    """train.py in a fresh process (as users run it); returns the log records."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    out_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--out_dir="))
    for attempt in range(3):  # a gloo worker very occasionally aborts at start-up or teardown (tiny.spawn)
        out = subprocess.run(cmd + [os.path.join(ROOT, "train.py"), os.path.join(ROOT, "configs/tiny.yaml")] + args,
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode == 0 or not (torchrun and "SIGABRT" in out.stderr):
            break
        shutil.rmtree(out_dir, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def common(setup, out, *extra):
    return [f"--model={setup / 'model'}", f"--train_data={setup / 'train.jsonl'}", f"--out_dir={out}",
            "--length_ranges=0,64", *extra]


def test_two_process_ddp_equals_one_process_on_the_global_batch(setup, tmp_path):
    # Adam's first step is ~lr * g/|g| per weight, so fp32 noise in a near-zero gradient can move that weight
    # differently: all but a few weights in 10,000 must agree to 1e-6 (updates are ~1e-5), and the gradients
    # themselves are compared exactly, in float64, by the next test. This one runs the real torchrun launch.
    args = ["--max_steps=1", "--head_schedule=dense", "--lr=1e-5"]
    one = run(common(setup, tmp_path / "one", "--batch_sizes=4", *args))
    # 2 ranks x 2 queries, with the gradient cache in sub-batches of 3 texts: cross-device dense negatives
    two = run(common(setup, tmp_path / "two", "--batch_sizes=2", "--grad_cache=true", "--sub_batch_size=3", *args),
              torchrun=2)
    assert one[0]["loss"] == pytest.approx(two[0]["loss"], abs=1e-6)
    a, b = load_file(tmp_path / "one/final/model.safetensors"), load_file(tmp_path / "two/final/model.safetensors")
    init = load_file(setup / "model/model.safetensors")
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    assert moved > 5e-6  # the step changed the weights by ~lr, far above the tolerance below
    off = sum(((a[k] - b[k]).abs() > 1e-6).sum().item() for k in a) / sum(a[k].numel() for k in a)
    assert off < 1e-3, off


def grads_after_step(setup, heads=("dense", "sparse", "colbert"), world_size=1, rank=0, ddp=False, **over):
    """Gradients of one train_step on the first batch (this rank's slice of it)."""
    cfg = train.Config(**{**dict(train_group_size=3, query_max_len=16, passage_max_len=32, self_distill=True,
                                 gradient_checkpointing=False), **over})
    model = M3.from_pretrained(str(setup / "model")).double()  # float64: sums of many terms agree to 1e-12
    tok = model.tokenizer
    with torch.no_grad():  # make the heads clearly non-trivial so their gradients are checked too
        model.sparse_linear.bias.fill_(0.5)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    ds = open_datasets(str(setup / "train.jsonl"), tok)
    batches = epoch_batches(ds, epoch=0, seed=0, world_size=world_size, rank=rank, length_ranges=[0, 64],
                            batch_sizes=[4 // world_size])
    batch = make_batch(ds, batches[0], tok, epoch=0, step=0, seed=0, rank=rank, group_size=3, query_max_len=16,
                       passage_max_len=32)
    batch.pop("source")
    amp = torch.autocast("cpu", enabled=False)
    loss, parts = train.train_step(model, batch, cfg, list(heads), True, amp, torch.amp.GradScaler("cpu", enabled=False))
    named = model.module.named_parameters() if ddp else model.named_parameters()
    return loss, {n: p.grad.clone() for n, p in named if p.grad is not None}


def _ddp_worker(rank, init_file, setup, out_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    loss, g = grads_after_step(setup, heads=("dense",), world_size=2, rank=rank, ddp=True, grad_cache=True,
                               sub_batch_size=3)
    if rank == 0:
        torch.save(g, out_file)
    torch.distributed.barrier()  # both ranks done before either tears gloo down
    torch.distributed.destroy_process_group()


def test_ddp_gradients_with_gradient_cache_equal_one_process(setup, tmp_path):
    spawn(_ddp_worker, (setup, str(tmp_path / "g.pt")), nprocs=2)
    ddp = torch.load(tmp_path / "g.pt", weights_only=True)
    _, ref = grads_after_step(setup, heads=("dense",))
    assert set(ddp) == set(ref)
    for n in ref:
        assert torch.allclose(ddp[n], ref[n], rtol=0, atol=1e-10), (n, (ddp[n] - ref[n]).abs().max())
    assert ref["encoder.embeddings.word_embeddings.weight"].abs().max() > 1e-4


def test_gradient_cache_and_sub_batches_give_the_plain_gradients(setup):
    loss, ref = grads_after_step(setup)
    assert ref["sparse_linear.weight"].abs().max() > 0 and ref["colbert_linear.weight"].abs().max() > 0
    for over in (dict(sub_batch_size=5), dict(grad_cache=True), dict(grad_cache=True, sub_batch_size=5)):
        l2, g = grads_after_step(setup, **over)
        assert l2.item() == pytest.approx(loss.item(), abs=1e-10)
        assert set(g) == set(ref)
        for n in ref:
            assert torch.allclose(g[n], ref[n], rtol=0, atol=1e-10), (over, n, (g[n] - ref[n]).abs().max())


def test_resume_reproduces_the_uninterrupted_loss_sequence(setup, tmp_path):
    full = run(common(setup, tmp_path / "a", "--batch_sizes=2"))
    assert len(full) == 12  # 2 epochs of 6 batches
    b = tmp_path / "b"
    run(common(setup, b, "--batch_sizes=2"))
    assert sorted(os.listdir(b)) == ["config.yaml", "final", "log.jsonl", "step-0000008", "step-0000010"]
    for gone in ("final", "step-0000010"):  # what a kill after step 8 leaves behind (mid-epoch 2)
        shutil.rmtree(b / gone)
    kept = open(b / "log.jsonl").readlines()[:8]
    open(b / "log.jsonl", "w").writelines(kept)
    resumed = run(common(setup, b, "--batch_sizes=2", "--resume=auto"))
    assert [r["step"] for r in resumed] == list(range(12))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]  # exactly, not approximately


def test_warmup_head_schedule_switches_on_sparse_and_colbert_in_epoch_two(setup, tmp_path):
    log = run(common(setup, tmp_path / "w", "--batch_sizes=2", "--save_every=6", "--keep_last=5"))
    first, second = [r for r in log if r["epoch"] == 0], [r for r in log if r["epoch"] == 1]
    assert len(first) == len(second) == 6
    assert all(r["sparse"] == 0 and r["colbert"] == 0 and r["ens"] == 0 for r in first)
    assert all(r["sparse"] > 0 and r["colbert"] > 0 and r["ens"] > 0 and r["kd"] > 0 for r in second)
    init, after = setup / "model", tmp_path / "w/step-0000006"  # heads untouched while off, trained after
    for head in ("sparse_linear.pt", "colbert_linear.pt"):
        a, b = torch.load(init / head, weights_only=True), torch.load(after / head, weights_only=True)
        c = torch.load(tmp_path / "w/final" / head, weights_only=True)
        assert torch.equal(a["weight"], b["weight"]) and not torch.equal(a["weight"], c["weight"])


def test_pretrain_warmup_unified_chain(setup, tmp_path):
    tiny = ["--query_max_len=16", "--passage_max_len=32", "--length_ranges=0,64", "--batch_sizes=4",
            "--max_steps=2", "--gradient_checkpointing=false", f"--train_data={setup / 'train.jsonl'}"]
    stages = [("pretrain", [f"--model={setup / 'bare'}"]), ("warmup", [f"--init_from={tmp_path / 'pretrain/final'}"]),
              ("unified", [f"--init_from={tmp_path / 'warmup/final'}"])]
    for name, extra in stages:
        cmd = [sys.executable, "train.py", f"configs/{name}.yaml", *tiny, *extra, f"--out_dir={tmp_path / name}"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]
    m = M3.from_pretrained(str(tmp_path / "unified/final"))
    assert m.encode(["the cell"])["dense"].shape == (1, 32)
    logs = {n: [json.loads(x) for x in open(tmp_path / n / "log.jsonl")] for n, _ in stages}
    assert logs["pretrain"][0]["sparse"] == 0 and logs["unified"][0]["kd"] > 0


def test_non_finite_loss_stops_naming_step_and_source(setup, tmp_path):
    out = subprocess.run([sys.executable, "train.py", "configs/tiny.yaml", *common(setup, tmp_path / "nan"),
                          "--batch_sizes=2", "--temperature=0"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert "non-finite loss at step 0" in out.stderr and "train.jsonl:" in out.stderr
    assert not os.path.exists(tmp_path / "nan/final")


def test_config_errors_name_the_key_and_the_path(setup, tmp_path):
    with pytest.raises(SystemExit, match="unknown key 'lrr'"):
        train.load_config(["configs/tiny.yaml", "--lrr=1"])
    with pytest.raises(SystemExit, match=r"batch_sizes='x' \(command line\) is not a list"):
        train.load_config(["--batch_sizes=x"])
    with pytest.raises(SystemExit, match="epochs=1.5"):
        train.load_config(["--epochs=1.5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1e-5\nwarmup: 0.1\n")
    with pytest.raises(SystemExit, match=f"unknown key 'warmup' \\({bad}\\)"):
        train.load_config([str(bad)])
    assert train.load_config(["--lr=1e-5", "--length_ranges=0,10,20", "--batch_sizes=8,4"]).batch_sizes == [8, 4]
    with pytest.raises(SystemExit, match="batch_sizes has 2 values but length_ranges"):
        train.load_config(["--batch_sizes=8,4"])
    out = subprocess.run([sys.executable, "train.py", "configs/tiny.yaml", f"--model={setup / 'model'}",
                          f"--train_data={tmp_path / 'nope.jsonl'}", f"--out_dir={tmp_path / 'r'}"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "nope.jsonl" in out.stderr


def test_new_heads_are_seeded_and_frozen_weights_stay(setup, tmp_path):
    args = [f"--model={setup / 'bare'}", "--init_new_heads=true", "--max_steps=1", "--batch_sizes=2",
            "--head_schedule=dense,sparse,colbert", "--freeze=encoder.embeddings.word_embeddings"]
    for run_dir in ("a", "b"):
        run(common(setup, tmp_path / run_dir, *args[1:]) + [args[0]])
    heads = [torch.load(tmp_path / d / "final/colbert_linear.pt", weights_only=True)["weight"] for d in "ab"]
    assert torch.equal(heads[0], heads[1])  # two runs of the same config start (and end) with the same new heads
    init, after = load_file(setup / "bare/model.safetensors"), load_file(tmp_path / "a/final/model.safetensors")
    assert torch.equal(init["embeddings.word_embeddings.weight"], after["embeddings.word_embeddings.weight"])
    assert not torch.equal(init["embeddings.position_embeddings.weight"], after["embeddings.position_embeddings.weight"])


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/m3_train_state_pwned",))


def test_train_state_with_a_pickled_payload_is_refused(tmp_path):
    ck = tmp_path / "step-0000001"
    ck.mkdir()
    with open(ck / "train_state.pt", "wb") as f:
        pickle.dump({"step": 1, "optimizer": Payload()}, f)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train.find_resume(train.Config(out_dir=str(tmp_path), resume="auto"))
    assert not os.path.exists("/tmp/m3_train_state_pwned")
