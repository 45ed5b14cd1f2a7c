"""train.py: DDP == one process, gradient cache == plain path, resume == uninterrupted, head schedule, stage chain."""
import dataclasses
import datetime
import json
import os
import pickle
import re
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

import gradcache
import train
from data import Sampling, epoch_batches, make_batch, open_datasets
from losses import info_nce
from model import M3, dense_score, sparse_score
from runtime import end_distributed
from tiny import Payload, make_encoder, make_tokenizer, spawn, write_examples
from tiny import run as run_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny saved M3 with heads, a bare encoder dir, and 12 fine-tuning examples whose lengths fit one range."""
    d = tmp_path_factory.mktemp("train")
    tok = make_tokenizer()
    m = M3(make_encoder(tok), tok)
    m.save_pretrained(d / "model")
    m.encoder.save_pretrained(d / "bare")
    tok.save_pretrained(d / "bare")
    write_examples(d / "train.jsonl", 12)
    return d


def launch(args, torchrun=0, config="configs/tiny.yaml", timeout=300):
    """train.py in a fresh process (as users run it), killed with everything it started after timeout s ->
    CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    return run_cmd(cmd + [os.path.join(ROOT, "train.py"), os.path.join(ROOT, config)] + args, timeout, cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def run(args, torchrun=0, output=False):
    """launch() that must succeed; returns the log records (and the process's stdout with output=True)."""
    out_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--out_dir="))
    out = launch(args, torchrun)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    return (records, out.stdout) if output else records


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
    assert one[0]["loss"] == pytest.approx(two[0]["loss"], rel=1e-5)  # fp32 sums in another order on any CPU
    a, b = load_file(tmp_path / "one/final/model.safetensors"), load_file(tmp_path / "two/final/model.safetensors")
    init = load_file(setup / "model/model.safetensors")
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    assert moved > 5e-6  # the step changed the weights by ~lr, far above the tolerance below
    off = sum(((a[k] - b[k]).abs() > 1e-6).sum().item() for k in a) / sum(a[k].numel() for k in a)
    assert off < 1e-3, off


def step_inputs(setup, world_size=1, rank=0, **over):
    """(cfg, float64 model with non-trivial heads, this rank's slice of the first batch) for one train_step."""
    cfg = train.Config(**{**dict(train_group_size=3, query_max_len=16, passage_max_len=32, self_distill=True,
                                 gradient_checkpointing=False), **over})
    model = M3.from_pretrained(str(setup / "model")).double()  # float64: sums of many terms agree to 1e-12
    tok = model.tokenizer
    with torch.no_grad():  # make the heads clearly non-trivial so their gradients are checked too
        model.sparse_linear.bias.fill_(0.5)
    ds = open_datasets(str(setup / "train.jsonl"), tok)
    batches = epoch_batches(ds, epoch=0, seed=0, world_size=world_size, rank=rank, length_ranges=[0, 64],
                            batch_sizes=[4 // world_size])
    batch = make_batch(ds, batches[0], tok, Sampling(seed=0, train_group_size=3, query_max_len=16, passage_max_len=32),
                       epoch=0)
    batch.pop("source")
    return cfg, model, batch


def grads_after_step(setup, heads=("dense", "sparse", "colbert"), world_size=1, rank=0, ddp=False, calls=None,
                     **over):
    """Gradients of one train_step on the first batch (this rank's slice of it). calls: a list that gets the name of
    each head module called."""
    cfg, model, batch = step_inputs(setup, world_size, rank, **over)
    if calls is not None:
        for name in ("sparse_linear", "colbert_linear"):
            getattr(model, name).register_forward_hook(lambda *_, name=name: calls.append(name))
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    amp = torch.autocast("cpu", enabled=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, parts = train.train_step(model, batch, cfg, list(heads), True, amp, scaler)
    named = model.module.named_parameters() if ddp else model.named_parameters()
    return loss, {n: p.grad.clone() for n, p in named if p.grad is not None}


def _ddp_worker(rank, init_file, setup, out_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    loss, g = grads_after_step(setup, heads=("dense",), world_size=2, rank=rank, ddp=True, grad_cache=True,
                               sub_batch_size=3)
    if rank == 0:
        torch.save(g, out_file)
    end_distributed()  # as train.py ends: the DDP wrapper freed, both ranks done, then gloo torn down


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
    for over in (dict(sub_batch_size=5), dict(grad_cache=True), dict(grad_cache=True, sub_batch_size=5),
                 dict(sub_batch_tokens=70), dict(grad_cache=True, sub_batch_tokens=70)):
        l2, g = grads_after_step(setup, **over)
        assert l2.item() == pytest.approx(loss.item(), abs=1e-10)
        assert set(g) == set(ref)
        for n in ref:
            assert torch.allclose(g[n], ref[n], rtol=0, atol=1e-10), (over, n, (g[n] - ref[n]).abs().max())


def test_dense_only_steps_do_not_compute_the_other_heads_and_give_the_same_gradients(setup):
    cfg, model, batch = step_inputs(setup)  # reference: every head computed, the loss on dense alone
    q, p = (model(batch[f"{k}_ids"], batch[f"{k}_mask"]) for k in ("q", "p"))
    ref_loss, _ = train.compute_loss(q, p, batch, cfg, ["dense"], True)
    ref_loss.backward()
    ref = {n: prm.grad for n, prm in model.named_parameters() if prm.grad is not None}
    for over in (dict(), dict(grad_cache=True, sub_batch_size=5), dict(sub_batch_size=5)):
        calls = []
        loss, g = grads_after_step(setup, heads=("dense",), calls=calls, **over)
        assert calls == [], over  # neither head ran
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
        for n, want in ref.items():  # the heads' gradients are zeros (DDP reduces them; optimizer_step drops them)
            assert torch.allclose(g[n], want, rtol=1e-12, atol=1e-15), (over, n, (g[n] - want).abs().max())
        assert g["colbert_linear.weight"].abs().max() == 0 < g["encoder.embeddings.word_embeddings.weight"].abs().max()
    calls = []
    grads_after_step(setup, heads=("dense", "sparse"), calls=calls)
    assert set(calls) == {"sparse_linear"}


def test_sub_batch_tokens_sizes_chunks_by_padded_length():
    cfg = train.Config(sub_batch_tokens=100)
    assert [gradcache.texts_per_chunk(cfg, torch.zeros(40, T)) for T in (16, 32, 100, 512)] == [6, 3, 1, 1]
    assert gradcache.texts_per_chunk(train.Config(sub_batch_size=3), torch.zeros(40, 16)) == 3  # texts, as before


def test_bf16_representations_are_scored_in_fp32():
    torch.manual_seed(0)
    B, G, T, D = 2, 3, 6, 8
    cfg = train.Config(train_group_size=G, cross_device_negatives=False)
    rep = lambda n: {"dense": F.normalize(torch.randn(n, D), dim=-1).bfloat16(),  # noqa: E731 (autocast's outputs)
                     "sparse": torch.rand(n, T).bfloat16(),
                     "colbert": F.normalize(torch.randn(n, T, D), dim=-1).bfloat16(),
                     "colbert_mask": torch.ones(n, T, dtype=torch.bool)}
    q, p = rep(B), rep(B * G)
    batch = {"q_ids": torch.randint(5, 30, (B, T)), "p_ids": torch.randint(5, 30, (B * G, T)), "teacher": None}
    _, parts = train.compute_loss(q, p, batch, cfg, ["dense", "sparse", "colbert"], False)
    tau, f = cfg.temperature, lambda x: x.float()  # noqa: E731
    want = {"dense": info_nce(dense_score(f(q["dense"]), f(p["dense"])) / tau, G),
            "sparse": info_nce(sparse_score(batch["q_ids"], f(q["sparse"]), batch["p_ids"], f(p["sparse"])) / tau, G)}
    rounded = info_nce(sparse_score(batch["q_ids"], q["sparse"], batch["p_ids"], p["sparse"]).float() / tau, G)
    for x, v in want.items():
        assert parts[x].item() == pytest.approx(v.item(), rel=1e-6), x
    assert abs(rounded.item() - want["sparse"].item()) > 1e-4  # scoring in bf16 would be caught


def test_the_process_group_waits_dist_timeout_s(monkeypatch):
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 1)
    ddp, rank, world, device = train.init_distributed(train.Config(dist_timeout_s=5400).dist_timeout_s)
    assert ddp and seen["timeout"] == datetime.timedelta(seconds=5400) and seen["backend"] == "gloo"


def test_resume_reproduces_the_uninterrupted_loss_sequence(setup, tmp_path):
    full = run(common(setup, tmp_path / "a", "--batch_sizes=2"))
    assert len(full) == 12  # 2 epochs of 6 batches
    b = tmp_path / "b"
    run(common(setup, b, "--batch_sizes=2"))
    assert sorted(os.listdir(b)) == ["config.yaml", "final", "log.jsonl", "step-0000008", "step-0000010"]
    # what a kill during the last step's save leaves behind, with step 10's weights cut short by a bad copy:
    # resume=auto falls back to step 8, the newest intact checkpoint, and says so
    shutil.rmtree(b / "final")
    weights = b / "step-0000010/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    resumed, stdout = run(common(setup, b, "--batch_sizes=2", "--resume=auto"), output=True)
    assert re.search(r"skipped .*step-0000010, newer but broken \(ValueError: .*model.safetensors", stdout)
    assert "resumed from" in stdout and "step-0000008 at step 8" in stdout
    assert [r["step"] for r in resumed] == list(range(12))  # the re-run steps 8-11 are in the log once
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]  # exactly, not approximately
    superseded = [json.loads(x) for x in open(b / "log.superseded.jsonl")]  # the first attempt's, kept aside
    assert [r["step"] for r in superseded] == [8, 9, 10, 11]
    # resuming a finished run does nothing and changes nothing
    before = {f: (b / f).read_bytes() for f in ("log.jsonl", "config.yaml", "final/model.safetensors")}
    _, stdout = run(common(setup, b, "--batch_sizes=2", "--resume=auto"), output=True)
    assert "at step 12 (epoch 2, batch 0): nothing to do" in stdout
    assert before == {f: (b / f).read_bytes() for f in before}


def test_a_used_out_dir_is_refused_and_nothing_written_is_lost(setup, tmp_path):
    out = tmp_path / "r"
    run(common(setup, out, "--batch_sizes=2", "--max_steps=3", "--save_every=1", "--keep_last=2"))
    snapshot = lambda: {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
                        for d, _, fs in os.walk(out) for f in fs}
    first = snapshot()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(setup / "train.jsonl").read() + '{"query": "q", "pos": "not a list"}\n')
    for extra, msg in [([], r"out_dir='.*r' already holds config.yaml, final, log.jsonl, step-0000001, "
                            r"step-0000002: --resume=auto continues that run, --overwrite=true replaces it"),
                       (["--seed=7", "--overwrite=true", f"--train_data={bad}"], r"bad.jsonl, line 13: field 'pos'")]:
        res = launch(common(setup, out, "--batch_sizes=2", "--max_steps=3") + extra)
        assert res.returncode != 0 and re.search(msg, res.stderr), res.stderr[-2000:]
        assert snapshot() == first  # the earlier run is untouched: config, log, checkpoints
    log = run(common(setup, out, "--batch_sizes=2", "--max_steps=2", "--seed=7", "--overwrite=true"))
    assert [r["step"] for r in log] == [0, 1]  # the new run's log alone
    assert sorted(os.listdir(out)) == ["config.yaml", "final", "log.jsonl"]  # no step checkpoint of the old run
    assert yaml.safe_load(open(out / "config.yaml"))["seed"] == 7 and first["final/model.safetensors"] != \
        open(out / "final/model.safetensors", "rb").read()


def test_a_stage_whose_init_from_has_not_run_says_which_stage_to_run_once(setup, tmp_path):
    # the README's card command on a fresh checkout: warmup.yaml starts from runs/pretrain/final
    res = launch([f"--train_data={setup / 'train.jsonl'}", f"--out_dir={tmp_path / 'w'}"], torchrun=2,
                 config="configs/warmup.yaml")
    assert res.returncode != 0
    msg = "init_from='runs/pretrain/final': no such checkpoint directory. It is written by configs/pretrain.yaml"
    assert res.stderr.count(msg) == 1, res.stderr[-3000:]  # printed by rank 0 only
    assert "with --init_from=" in res.stderr and "huggingface" not in res.stderr.lower()
    assert not os.path.exists(tmp_path / "w")


def test_warmup_head_schedule_switches_on_sparse_and_colbert_in_epoch_two(setup, tmp_path):
    log = run(common(setup, tmp_path / "w", "--batch_sizes=2", "--save_every=6", "--keep_last=5"))
    first, second = [r for r in log if r["epoch"] == 0], [r for r in log if r["epoch"] == 1]
    assert len(first) == len(second) == 6
    off = ("sparse", "colbert", "ens", "self_kd", "sparse_share")  # switched-off heads: absent, not logged as 0
    assert all(not set(off) & set(r) and r["dense"] > 0 for r in first)
    assert all(r["sparse"] > 0 and r["colbert"] > 0 and r["ens"] > 0 and r["self_kd"] > 0 for r in second)
    init, after = setup / "model", tmp_path / "w/step-0000006"  # heads untouched while off, trained after
    for head in ("sparse_linear.pt", "colbert_linear.pt"):
        a, b = torch.load(init / head, weights_only=True), torch.load(after / head, weights_only=True)
        c = torch.load(tmp_path / "w/final" / head, weights_only=True)
        assert torch.equal(a["weight"], b["weight"]) and not torch.equal(a["weight"], c["weight"])


def test_pretrain_warmup_unified_chain(setup, tmp_path):
    tiny = ["--query_max_len=16", "--passage_max_len=32", "--length_ranges=0,64", "--batch_sizes=4",
            "--max_steps=2", "--gradient_checkpointing=false", f"--train_data={setup / 'train.jsonl'}"]
    stages = [("pretrain", [f"--model={setup / 'bare'}", "--pooling=mean"]),  # later stages: the checkpoint's
              ("warmup", [f"--init_from={tmp_path / 'pretrain/final'}"]),
              ("unified", [f"--init_from={tmp_path / 'warmup/final'}"])]
    for name, extra in stages:
        cmd = [sys.executable, "train.py", f"configs/{name}.yaml", *tiny, *extra, f"--out_dir={tmp_path / name}"]
        out = run_cmd(cmd, 300, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]
    m = M3.from_pretrained(str(tmp_path / "unified/final"))
    assert m.encode(["the cell"])["dense"].shape == (1, 32)
    logs = {n: [json.loads(x) for x in open(tmp_path / n / "log.jsonl")] for n, _ in stages}
    assert "sparse" not in logs["pretrain"][0] and logs["unified"][0]["self_kd"] > 0
    assert m.pooling == "mean"  # chained stages keep the pooling the first one trained with


def test_non_finite_loss_stops_naming_step_and_source(setup, tmp_path):
    out = run_cmd([sys.executable, "train.py", "configs/tiny.yaml", *common(setup, tmp_path / "nan"),
                   "--batch_sizes=2", "--temperature=1e-45"], 300, cwd=ROOT)
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
    with pytest.raises(SystemExit, match=r"batch_sizes=\[8, 4\] \(command line\): 2 values but length_ranges .* 9 "):
        train.load_config(["--batch_sizes=8,4"])
    bad_values = {"temperature=0": "must be > 0", "temperature=-0.02": "must be > 0",
                  "train_group_size=0": "must be >= 1", "teacher_kd_loss=kl": "must be one of 'm3_kd_loss', 'kl_div'",
                  "max_steps=0": "must be >= 1, or -1", "keep_last=0": "must be >= 1", "save_every=0": "must be >= 1",
                  "epochs=0": "must be >= 1", "pooling=max": "must be one of '', 'cls', 'mean'",
                  "dtype=fp8": "must be one of 'bf16', 'fp16', 'fp32'", "lr=inf": "must be a finite number",
                  "w_sparse=nan": "must be a finite number", "w_ens=-1": "must be >= 0",
                  "adam_beta2=1": r"must be in \[0, 1\)", "head_schedule=dense;dense;dense": "names 3 epochs but the "
                  "run has epochs=2: the last 1 would never train",
                  "warmup_ratio=2": r"must be in \[0, 1\]", "length_ranges=0,64,32": "increasing",
                  "head_schedule=dense,colbrt": "unknown head 'colbrt'",
                  "head_schedule=sparse": "every epoch trains dense",
                  "head_schedule=dense;dense,sparse,sparse": "listed twice", "lr=0": "must be > 0",
                  "num_workers=-1": "must be >= 0", "prefetch=0": "must be >= 1"}
    for arg, msg in bad_values.items():
        key, val = arg.split("=", 1)
        extra = ["--batch_sizes=2,2"] if key == "length_ranges" else []
        with pytest.raises(SystemExit, match=f"config: {key}=.* \\(command line\\): .*{msg}"):
            train.load_config(["configs/tiny.yaml", f"--{arg}", *extra])
    with pytest.raises(SystemExit, match=r"sub_batch_size=4 \(command line\): and sub_batch_tokens=65536 are both"):
        train.load_config(["configs/unified.yaml", "--sub_batch_size=4"])  # the stage configs chunk by tokens
    yml = tmp_path / "typo.yaml"
    yml.write_text("head_schedule: dense,colbrt\n")
    with pytest.raises(SystemExit, match=f"head_schedule='dense,colbrt' \\({yml}\\): unknown head 'colbrt'"):
        train.load_config([str(yml)])
    with pytest.raises(SystemExit, match="overwrite=True .*exclude each other"):
        train.load_config(["--resume=auto", "--overwrite=true"])
    assert train.parse_schedule(" dense, sparse ;dense,sparse,colbert") == [["dense", "sparse"],
                                                                          ["dense", "sparse", "colbert"]]
    out = run_cmd([sys.executable, "train.py", "configs/tiny.yaml", f"--model={setup / 'model'}",
                   f"--train_data={tmp_path / 'nope.jsonl'}", f"--out_dir={tmp_path / 'r'}"], 300, cwd=ROOT)
    assert out.returncode != 0 and "nope.jsonl" in out.stderr


def test_stage_configs_are_minimal_diffs_without_ignored_keys():
    defaults = dataclasses.asdict(train.Config())
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        path = os.path.join(ROOT, "configs", name)
        keys, cfg = yaml.safe_load(open(path)), train.load_config([path])  # every key known, every value valid
        assert [k for k in keys if getattr(cfg, k) == defaults[k]] == [], name  # no restated default
        assert not ("model" in keys and keys.get("init_from")), name  # init_from would silently override model
    with pytest.raises(SystemExit, match="unknown key 'kd' \\(command line\\): now called 'teacher_kd'"):
        train.load_config(["--kd=true"])


def test_new_heads_are_seeded_and_frozen_weights_stay(setup, tmp_path):
    args = [f"--model={setup / 'bare'}", "--init_new_heads=true", "--max_steps=1", "--batch_sizes=2",
            "--head_schedule=dense, sparse, colbert", "--freeze=encoder.embeddings.word_embeddings"]
    for run_dir in ("a", "b"):
        run(common(setup, tmp_path / run_dir, *args[1:]) + [args[0]])
    heads = [torch.load(tmp_path / d / "final/colbert_linear.pt", weights_only=True)["weight"] for d in "ab"]
    assert torch.equal(heads[0], heads[1])  # two runs of the same config start (and end) with the same new heads
    sparse = torch.load(tmp_path / "a/final/sparse_linear.pt", weights_only=True)["weight"]
    assert sparse.abs().max() > 0  # "dense, sparse, colbert" (spaces) trained the new sparse head (it starts at 0)
    init, after = load_file(setup / "bare/model.safetensors"), load_file(tmp_path / "a/final/model.safetensors")
    assert torch.equal(init["embeddings.word_embeddings.weight"], after["embeddings.word_embeddings.weight"])
    pos = "embeddings.position_embeddings.weight"
    assert not torch.equal(init[pos], after[pos])


def test_freeze_takes_whole_name_components():
    m = M3(make_encoder(make_tokenizer(), layers=12), make_tokenizer())
    layer1 = train.frozen(m, "encoder.encoder.layer.1")
    assert layer1 and all(n.startswith("encoder.encoder.layer.1.") for n in layer1)  # not layers 10 and 11
    both = train.frozen(m, "sparse_linear, colbert_linear.weight")  # spaces after commas are fine
    assert both == ["sparse_linear.weight", "sparse_linear.bias", "colbert_linear.weight"]
    assert len(train.frozen(m, "encoder")) == len([n for n, _ in m.named_parameters() if n.startswith("encoder.")])


def test_resume_auto_takes_the_newest_intact_checkpoint_and_says_what_it_skipped(setup, tmp_path, capsys,
                                                                                  monkeypatch):
    model = M3.from_pretrained(str(setup / "model"))
    cfg = train.Config(out_dir=str(tmp_path), resume="auto", keep_last=10)
    opt, sched = train.make_optimizer(model, cfg, 10)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in (2, 4, 6, 8, 10):
        train.save_checkpoint(model, opt, sched, scaler, cfg, {"step": step, "epoch": 0, "index": step},
                              "final" if step == 10 else f"step-{step:07d}")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, **kw: loads.append(str(f)) or real_load(f, **kw))
    path, state = train.find_resume(cfg)
    assert path == str(tmp_path / "final") and state["step"] == 10
    assert [os.path.basename(os.path.dirname(f)) for f in loads if f.endswith("train_state.pt")] == ["final"]
    # break every checkpoint but step 2, each in another way
    for f in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(tmp_path / "final" / f)
    (tmp_path / "step-0000008/model.safetensors").write_bytes(b"\0" * 7)
    if os.path.exists(Payload.MARKER):
        os.remove(Payload.MARKER)
    with open(tmp_path / "step-0000006/train_state.pt", "wb") as f:
        pickle.dump({"step": 6, "optimizer": Payload()}, f)
    (tmp_path / "step-0000004/sparse_linear.pt").write_bytes(b"PK\3\4")
    path, state = train.find_resume(cfg)
    assert path == str(tmp_path / "step-0000002") and state["step"] == 2
    said = capsys.readouterr().out
    for name, why in [("final", "missing tokenizer files"), ("step-0000008", "model.safetensors: unreadable"),
                      ("step-0000006", "Weights only load failed"), ("step-0000004", "sparse_linear.pt")]:
        assert re.search(f"skipped .*{name}, newer but broken \\(.*{why}", said), (name, said)
    assert not os.path.exists(Payload.MARKER)  # the pickled payload never ran
    os.remove(tmp_path / "step-0000002/train_state.pt")
    with pytest.raises(SystemExit, match="no intact checkpoint in"):
        train.find_resume(cfg)
    with pytest.raises(SystemExit, match="resume='nope': no such checkpoint directory"):
        train.find_resume(train.Config(out_dir=str(tmp_path), resume="nope"))
    with pytest.raises(SystemExit, match="step-0000006'?: not a usable checkpoint: .*Weights only load failed"):
        train.find_resume(train.Config(out_dir=str(tmp_path), resume=str(tmp_path / "step-0000006")))


def test_new_options_fail_clearly_and_leave_the_run_dir_intact(setup, tmp_path, monkeypatch):
    out = tmp_path / "r"
    (out / "final").mkdir(parents=True)
    for f, text in (("config.yaml", "seed: 1\n"), ("log.jsonl", '{"step": 0}\n'), ("final/x", "w")):
        (out / f).write_text(text)
    snapshot = lambda: {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f)).read()  # noqa: E731
                        for d, _, fs in os.walk(out) for f in fs}
    first = snapshot()
    bad_type = tmp_path / "bad.jsonl"
    bad_type.write_text(open(setup / "train.jsonl").readline() + '{"query": "q", "pos": ["p"], "type": "sts"}\n')
    (tmp_path / "cls_no_in_batch_neg").mkdir()
    shutil.copy(setup / "train.jsonl", tmp_path / "cls_no_in_batch_neg" / "a.jsonl")
    listed = tmp_path / "listed.yaml"
    listed.write_text("query_prefix: [query, passage]\n")
    base = common(setup, out, "--batch_sizes=2", "--max_steps=1", "--overwrite=true")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    cases = [(["--report_to=tensorboard"], r"report_to='tensorboard' \(command line\): needs the tensorboard package: "
                                           r"pip install tensorboard"),
             (["--report_to=wandb"], r"report_to='wandb' \(command line\): must be one of '', 'none', 'tensorboard'"),
             (["--query_instruction_for_retrieval=q: "], r"unknown key 'query_instruction_for_retrieval' \(command "
                                                         r"line\): FlagEmbedding's option; here it is 'query_prefix'"),
             (["--passage_instruction_format={}{}"], r"'passage_instruction_format' .*: FlagEmbedding's option; not an "
                                                     r"option here: the passage is passage_prefix \+ passage"),
             (["--drop_threshold=5"], r"drop_threshold=5 \(command line\): drops merged small files only"),
             (["--small_threshold=-1"], r"small_threshold=-1 \(command line\): must be >= 0"),
             (["--min_sparse_share=2"], r"min_sparse_share=2.0 \(command line\): must be in \[0, 1\]"),
             ([str(listed)], r"query_prefix=\['query', 'passage'\] \(.*listed.yaml\) is not a str: expected text"),
             ([f"--train_data={bad_type}"], r"bad.jsonl, line 2: field 'type': unsupported value \"sts\""),
             (["--freeze=encoder.embedings"], r"freeze='encoder.embedings': 'encoder.embedings' names no parameter "
                                              r"\(nearest: encoder.embeddings"),
             (["--freeze=encoder.embeddings,"], r"freeze='encoder.embeddings,': an empty prefix would freeze every"),
             ([f"--train_data={tmp_path / 'cls_no_in_batch_neg'}", "--train_group_size=1"],
              r"a.jsonl: no_in_batch_neg data scores each query against its own group only")]
    for extra, msg in cases:
        with pytest.raises((SystemExit, ValueError), match=msg):
            train.main([os.path.join(ROOT, "configs/tiny.yaml"), *base, *extra])
        assert snapshot() == first, extra  # nothing of the earlier run is lost or changed
    assert train.load_config(["--query_prefix=query: "]).query_prefix == "query: "  # not YAML's {"query": None}


def test_readme_table_answers_every_flagembedding_option_as_the_code_does():
    import reference_names
    text = open(os.path.join(ROOT, "README.md")).read().split("## Using your FlagEmbedding data and checkpoints")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.split("\n## ")[0].splitlines()
            if line.startswith("| `")]
    for theirs, (ours, _) in reference_names.FLAGEMBEDDING.items():
        row = next((r for r in rows if f"`{theirs}`" in r[0]), None)
        assert row, f"README's table has no row for {theirs}"
        assert (f"`{ours}`" in row[1] or f"`{ours}=" in row[1]) if ours else "-" in row[1], (theirs, row)
        if ours:
            assert ours in dataclasses.asdict(train.Config()), ours
        with pytest.raises(SystemExit, match=f"unknown key '{theirs}' .*FlagEmbedding's option"):
            train.load_config([f"--{theirs}=1"])
