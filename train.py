"""M3-Embedding training: torchrun DDP, staged configs, gradient checkpointing, gradient cache, exact resume.

    python train.py configs/tiny.yaml --out_dir=runs/x                       # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 train.py configs/warmup.yaml --train_data=... # one node, 8 GPUs
"""
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field

import yaml


@dataclass
class Config:
    # model
    model: str = "BAAI/bge-m3-unsupervised"  # hub name, local dir, or "minilm" (the bundled demo encoder)
    init_new_heads: bool = False  # start new random sparse/colbert heads when the checkpoint has none (SPEC 0, 1.5)
    pooling: str = "cls"  # dense pooling: cls (M3, SPEC 1.1) or mean (encoders trained that way, e.g. MiniLM)
    colbert_dim: int = -1  # multi-vector dim D; -1 = hidden size (SPEC 1.3)
    # data (SPEC 4)
    train_data: str = ""  # a .jsonl file or a directory of them; each file is one dataset
    query_max_len: int = 512  # SPEC 5.1
    passage_max_len: int = 8192  # SPEC 5.1
    train_group_size: int = 8  # 1 positive + 7 negatives (SPEC 3.1); 1 = pairs, in-batch negatives only
    length_ranges: list = field(default_factory=lambda: [0, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8192])
    batch_sizes: list = field(default_factory=lambda: [48, 32, 20, 18, 14, 14, 12, 10, 8])  # per GPU, SPEC 4.5
    group_by_length: bool = False  # inside a length range, batch similar lengths together (less padding)
    shuffle_ratio: float = 0.0  # text-chunk shuffle of positives (SPEC 4.2; paper 0.002)
    kd: bool = False  # distil from teacher pos_scores/neg_scores in the data (SPEC 3.5)
    kd_loss_type: str = "m3_kd_loss"  # m3_kd_loss (what bge-m3 used) or kl_div (SPEC 3.5)
    # loss (SPEC 3.4; losses.m3_loss)
    temperature: float = 0.02  # tau for every score (SPEC 3.1)
    head_schedule: str = "dense,sparse,colbert"  # heads trained per epoch, ';' between epochs, last one repeats
    cross_device_negatives: bool = True  # dense negatives from all ranks, exact gradient (SPEC 0, 3.3)
    w_dense: float = 1.0  # lambda_1: dense loss weight
    w_sparse: float = 0.1  # lambda_2: sparse loss weight (SPEC 3.4)
    w_colbert: float = 1.0  # lambda_3: multi-vector loss weight
    w_ens: float = 1.0  # weight of the ensemble CE term
    ens_dense: float = 1.0  # s_ens = ens_dense s_dense + ens_sparse s_sparse + ens_colbert s_colbert
    ens_sparse: float = 0.3  # SPEC 1.4
    ens_colbert: float = 1.0
    loss_norm: float = 4.0  # L = (...)/4 (SPEC 3.4)
    kd_norm: float = 3.0  # L' = (...)/3
    final_norm: float = 2.0  # (L + L')/2
    self_distill: bool = False  # self-knowledge distillation from s_ens (SPEC 3.4)
    self_distill_start: int = 0  # self-KD from this optimizer step on (paper: ~6000 warm-up steps without it)
    # optimisation (SPEC 5)
    lr: float = 1e-5
    head_lr: float = 0.0  # learning rate of the sparse/colbert heads; 0 = lr (new heads may want more)
    weight_decay: float = 0.01  # not applied to biases and norms
    warmup_ratio: float = 0.1  # linear warm-up, then linear decay to 0
    epochs: int = 1
    max_steps: int = -1  # stop after this many steps (-1: run all epochs); the schedule spans the shorter
    grad_clip: float = 1.0
    seed: int = 42
    # memory and speed
    dtype: str = "bf16"  # on GPU: bf16 autocast, fp16 (with a grad scaler) or fp32; CPU always runs fp32
    gradient_checkpointing: bool = True
    sub_batch_size: int = 0  # encode the batch in chunks of this many texts (0 = all at once), loss on the full batch
    grad_cache: bool = False  # gradient cache: memory does not grow with the batch (same gradients)
    # run
    out_dir: str = "runs/m3"
    init_from: str = ""  # start from this stage's checkpoint instead of `model` (e.g. runs/warmup/final)
    resume: str = ""  # "auto" = newest checkpoint in out_dir, or a checkpoint dir
    save_every: int = 1000  # steps between checkpoints (and one at the end)
    keep_last: int = 2  # checkpoints kept in out_dir
    log_every: int = 10


def load_config(argv):
    """Config from defaults <- YAML files (flat diffs) <- --key=value overrides; unknown keys and bad types raise."""
    cfg, types = Config(), {f.name: f.type for f in dataclasses.fields(Config)}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, val = arg[2:].partition("=")
            if not eq:
                raise SystemExit(f"config: {arg!r} must be --key=value")
            items, where = {key: yaml.safe_load(val)}, "command line"
        else:
            if not os.path.isfile(arg):
                raise SystemExit(f"config: no such file {arg!r}")
            items, where = yaml.safe_load(open(arg)) or {}, arg
        for key, val in items.items():
            if key not in types:
                raise SystemExit(f"config: unknown key {key!r} ({where})")
            setattr(cfg, key, _coerce(key, val, types[key], where))
    return cfg


def _coerce(key, val, typ, where):
    """Coerce a YAML/CLI value to the field's type: "1e-5" -> float, "48,32" -> [48, 32]."""
    typ = {"bool": bool, "int": int, "float": float, "str": str, "list": list}.get(getattr(typ, "__name__", typ), typ)
    try:
        if typ is list:
            return [int(x) for x in (val.split(",") if isinstance(val, str) else val)]
        if typ is bool and not isinstance(val, bool):
            raise ValueError("expected true/false")
        if typ is int and isinstance(val, float) and not val.is_integer():
            raise ValueError("expected an integer")
        return typ(val) if val is not None or typ is str else ""
    except (TypeError, ValueError) as e:
        raise SystemExit(f"config: {key}={val!r} ({where}) is not a {typ.__name__}: {e}") from None
