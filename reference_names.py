"""Option names a user brings from FlagEmbedding (the reference, SPEC.md) or from our earlier versions -> the Config key
to write here, or why there is none. train.py's "unknown key" message quotes it; README's table "Using your
FlagEmbedding data and checkpoints" lists the same pairs (tests/test_train.py checks that they agree)."""
from model import POOLINGS

RENAMED = {"kd": "teacher_kd", "kd_norm": "self_distill_norm"}  # ours, before

_FORMAT = ("not an option here: the {0} is {0}_prefix + {0} (their default format '{{}}{{}}'); for a format F with an "
           "instruction I, put F.format(I, '') into {0}_prefix")
FLAGEMBEDDING = {  # their option -> (our key, or None when there is none; a note)
    "model_name_or_path": ("model", ""),
    "output_dir": ("out_dir", ""),
    "overwrite_output_dir": ("overwrite", ""),
    "resume_from_checkpoint": ("resume", "resume=auto takes the newest intact checkpoint"),
    "query_instruction_for_retrieval": ("query_prefix", "a line's `prompt` still wins, as there"),
    "passage_instruction_for_retrieval": ("passage_prefix", ""),
    "query_instruction_format": (None, _FORMAT.format("query")),
    "passage_instruction_format": (None, _FORMAT.format("passage")),
    "knowledge_distillation": ("teacher_kd", ""),
    "kd_loss_type": ("teacher_kd_loss", "our default m3_kd_loss is what bge-m3 used (SPEC 3.1)"),
    "negatives_cross_device": ("cross_device_negatives", "on by default, with the exact gradient (SPEC 0)"),
    "unified_finetuning": ("head_schedule", "unified_finetuning=False is head_schedule=dense"),
    "use_self_distill": ("self_distill", ""),
    "self_distill_start_step": ("self_distill_start", "counted in optimizer steps"),
    "sentence_pooling_method": ("pooling", " or ".join(POOLINGS)),
    "fix_encoder": ("freeze", "freeze=encoder trains the heads alone"),
    "learning_rate": ("lr", ""),
    "num_train_epochs": ("epochs", ""),
    "per_device_train_batch_size": ("batch_sizes", "one per length range (length_ranges), per GPU"),
    "enable_sub_batch": ("sub_batch_size", "or sub_batch_tokens"),
    "logging_steps": ("log_every", ""),
    "save_steps": ("save_every", ""),
    "save_total_limit": ("keep_last", ""),
    "fp16": ("dtype", "dtype=fp16"),
    "bf16": ("dtype", "dtype=bf16 (the default on GPUs)"),
    "same_dataset_within_batch": (None, "always on: a batch comes from one file and one length range"),
    "normalize_embeddings": (None, "always on (SPEC 1.1)"),
    "max_example_num_per_dataset": (None, "not supported: cut the file"),
    "pad_to_multiple_of": (None, "always 8 (data.PAD_MULTIPLE)"),
    "deepspeed": (None, "plain torchrun DDP; for memory: gradient_checkpointing, sub_batch_size, grad_cache"),
    "eval_steps": ("eval_every", "with eval_sets: BEIR folders evaluated by eval.py's code"),
    "metric_for_best_model": ("select_metric", "a key <set>/<row>/<metric>, e.g. dev/all/nDCG@10"),
    "load_best_model_at_end": (None, "with select_metric, out_dir/best holds the best evaluation's weights"),
}


def hint(key):
    """What the unknown-key message adds for `key`, or "" when it is nobody's option name."""
    if key in RENAMED:
        return f": now called {RENAMED[key]!r}"
    if key not in FLAGEMBEDDING:
        return ""
    ours, note = FLAGEMBEDDING[key]
    return ": FlagEmbedding's option; " + (f"here it is {ours!r}" + (f" ({note})" if note else "") if ours else note)
