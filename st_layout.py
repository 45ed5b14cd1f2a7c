"""The sentence-transformers files of a checkpoint, as the released BAAI/bge-m3 directory ships them: with these,
SentenceTransformer(dir).encode(texts) gives M3.encode(texts)["dense"] (the same pooling, model.POOLINGS, then L2
normalisation); without them sentence-transformers falls back to mean pooling, silently. M3.from_pretrained never
reads them. modules.json names the modules by their classic paths (sentence_transformers.models.*), which every
sentence-transformers version since 2.x resolves.
"""
import json
import os

MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
           {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
           {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json")
ST_POOLING_FLAGS = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                    "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


def max_length(encoder, tokenizer):
    """The longest input the encoder takes: its position embeddings, less RoBERTa's padding offset (position ids start
    at pad + 1: XLM-R's 8194 -> 8192), and at most the tokenizer's model_max_length."""
    n = encoder.config.max_position_embeddings
    pad = getattr(getattr(encoder, "embeddings", None), "padding_idx", None)  # set by RoBERTa-style embeddings only
    n -= pad + 1 if pad is not None else 0
    return min(n, int(getattr(tokenizer, "model_max_length", n) or n))


def write(out_dir, encoder, tokenizer, pooling_flag, prompts=None):
    """modules.json, sentence_bert_config.json (max_length), 1_Pooling/config.json (pooling_flag: the Pooling mode
    that means our pooling, model.POOLINGS; Normalize has no files, as in bge-m3) and config_sentence_transformers.json
    with the non-empty prompts ({"query": ..., "passage": ...}: the instructions the checkpoint was trained with;
    sentence-transformers applies them only when asked, encode(prompt_name=...))."""
    pool = {"word_embedding_dimension": encoder.config.hidden_size, "include_prompt": True,
            **{flag: flag == pooling_flag for flag in ST_POOLING_FLAGS}}
    st = {"prompts": {k: v for k, v in (prompts or {}).items() if v}, "default_prompt_name": None,
          "similarity_fn_name": "cosine"}
    os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
    config = {"max_seq_length": max_length(encoder, tokenizer), "do_lower_case": False}
    for name, content in zip(FILES, (MODULES, config, st, pool)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)


def prompts(path):
    """The prompts a checkpoint directory records ({} when none): eval.py and mine.py's default prefixes."""
    f = os.path.join(path, "config_sentence_transformers.json")
    try:
        with open(f) as fh:
            found = json.load(fh).get("prompts") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v for k, v in found.items() if isinstance(v, str)}
