"""Teacher scores from a cross-encoder (mine.py --teacher): pos_scores/neg_scores for training with teacher_kd=true.

python mine.py --teacher CROSS_ENCODER --jsonl in.jsonl --out out.jsonl [--query_prefix ..] [--passage_prefix ..]
    [--batch_size 32] [--max_length 512] [--overwrite]
Every (query, text) pair of every line gets the logit of a Hugging Face sequence-classification cross-encoder with one
label (a reranker such as BAAI/bge-reranker-v2-m3, an XLM-R one), on the GPU when there is one; the line's other
fields are kept. The pairs are the texts training encodes: the line's prompt, else --query_prefix, + the query;
--passage_prefix + the text. Resumable: lines are written one by one in input order and fsynced after every chunk of
about --batch_size pairs; a rerun continues after the last complete line (checked against the input; a half line left
by a crash is cut off) and forwards the very batches an uninterrupted run does. The M3 checkpoint's own fused scores
are mine.py --scores.
"""
import argparse
import json
import os

from beir import read_jsonl
from jsonl_index import check_example, query_text
from packed import inference_device
from runtime import output_error

TEACHER_OPTIONS = ("--teacher", "--jsonl", "--out", "--query_prefix", "--passage_prefix", "--batch_size",
                   "--max_length", "--overwrite")


def without_scores(rec):
    """rec without pos_scores/neg_scores: what an output record keeps of its input line."""
    return {k: v for k, v in rec.items() if k not in ("pos_scores", "neg_scores")}


def load_teacher(name):
    """(model, tokenizer) of a sequence-classification cross-encoder with one label, in its saved dtype (float32 when
    none is saved; half precision on a CPU becomes float32), eval mode, on the GPU when there is one. ValueError for
    anything else: a bare encoder would get a random classifier from AutoModelForSequenceClassification."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    try:
        cfg = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ValueError(f"--teacher {name}: not a Hugging Face model ({e})") from None
    arch = ", ".join(cfg.architectures or []) or "a model of no recorded architecture"
    if not any(x.endswith("ForSequenceClassification") for x in cfg.architectures or []):
        raise ValueError(f"--teacher {name} is {arch}, not a sequence classifier: --teacher takes a cross-encoder "
                         "with one label (e.g. BAAI/bge-reranker-v2-m3); the M3 checkpoint's own fused scores: "
                         "--ckpt DIR --scores")
    if cfg.num_labels != 1:
        raise ValueError(f"--teacher {name}: {arch} with {cfg.num_labels} labels; a teacher score is one logit: a "
                         "cross-encoder with num_labels 1")
    device = inference_device()
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    dtype = torch.float32 if device == "cpu" and dtype in (torch.float16, torch.bfloat16) else dtype
    model, info = AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype, output_loading_info=True)
    if info["missing_keys"]:
        raise ValueError(f"--teacher {name}: no weights for {sorted(info['missing_keys'])[:4]}: they would be random")
    return model.to(device).eval(), AutoTokenizer.from_pretrained(name)


def teacher_scores(model, tokenizer, pairs, batch_size=32, max_length=512):
    """The cross-encoder's logit of each (query, passage) pair, as floats; batches of batch_size pairs in order, each
    pair truncated to max_length tokens (longest first, as FlagEmbedding's rerankers)."""
    import torch
    out, device = [], next(model.parameters()).device
    with torch.no_grad():
        for a in range(0, len(pairs), batch_size):
            q, p = zip(*pairs[a:a + batch_size])
            enc = tokenizer(list(q), list(p), padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
            out += model(**enc).logits[:, 0].double().tolist()  # (B, 1) -> B floats
    return out


def chunks(recs, batch_size):
    """[(a, b)]: consecutive records of >= batch_size pairs each (the last: what is left), fixed by the input alone, so
    a resumed run forwards the very batches of an uninterrupted one (the same floats)."""
    out, a, n = [], 0, 0
    for k, r in enumerate(recs):
        n += len(r["pos"]) + len(r.get("neg") or [])
        if n >= batch_size:
            out.append((a, k + 1))
            a, n = k + 1, 0
    return out + ([(a, len(recs))] if a < len(recs) else [])


def resume_point(path, recs, what):
    """(records already scored, bytes they fill) of the output path: every complete line must be the input's record
    of its number with valid scores, a last line without its newline (a killed run) the start of the next one (it is
    cut off); ValueError otherwise. what: names the files in the message."""
    with open(path, "rb") as f:
        data = f.read()
    size = data.rfind(b"\n") + 1
    lines, tail = data[:size].split(b"\n")[:-1], data[size:]
    for k, line in enumerate(lines):
        try:
            got = json.loads(line)
        except ValueError:
            got = None
        if (k >= len(recs) or not isinstance(got, dict) or without_scores(got) != without_scores(recs[k])
                or check_example(got) or not {"pos_scores", "neg_scores"} <= set(got)):
            raise ValueError(f"{what}: line {k + 1} is not the input's record {k + 1} with its scores: --out is "
                             "another file, or the input changed; pass --overwrite to start over")
    if tail:
        head = len(lines) < len(recs) and json.dumps(without_scores(recs[len(lines)]), ensure_ascii=False)[:-1]
        if not head or not (tail.startswith(head.encode()) or head.encode().startswith(tail)):  # head: up to scores
            raise ValueError(f"{what}: its last line (no newline) is not the start of the input's record "
                             f"{len(lines) + 1}: --out is another file; pass --overwrite to start over")
    return len(lines), size


def score_file(model, tokenizer, recs, path, start=0, size=0, batch_size=32, max_length=512, query_prefix="",
               passage_prefix=""):
    """Write recs with pos_scores/neg_scores (teacher_scores of (query_text, passage_prefix + text)) to path, one line
    per record, each in one write and flushed, fsynced after every chunk; the first `start` records are already there
    in path's first `size` bytes (what follows is cut off). A chunk is scored whole, its missing lines written."""
    with open(path, "r+b" if os.path.exists(path) else "wb") as f:
        f.truncate(size)
        f.seek(size)
        for a, b in chunks(recs, batch_size):
            if b <= start:
                continue
            texts = [[r["pos"], r.get("neg") or []] for r in recs[a:b]]
            q = [query_text(r, query_prefix) for r in recs[a:b]]
            pairs = [(q[i], passage_prefix + t) for i, (pos, neg) in enumerate(texts) for t in pos + neg]
            s = iter(teacher_scores(model, tokenizer, pairs, batch_size, max_length))
            for k, (pos, neg) in zip(range(a, b), texts):
                rec = {**without_scores(recs[k]), "pos_scores": [next(s) for _ in pos],
                       "neg_scores": [next(s) for _ in neg]}
                if k >= start:
                    f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode())
                    f.flush()
            os.fsync(f.fileno())


def main(argv):
    """python mine.py --teacher CROSS_ENCODER --jsonl in.jsonl --out out.jsonl: in.jsonl's records with pos_scores and
    neg_scores, one logit per text (its other fields kept). An existing --out is continued after its last complete
    line (a rerun of a killed run; a finished file: nothing to do) unless --overwrite starts over."""
    p = argparse.ArgumentParser(prog="mine.py --teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="a Hugging Face cross-encoder (sequence classifier, one label)")
    p.add_argument("--jsonl", required=True, help="FlagEmbedding training JSONL (query, pos[, neg][, prompt])")
    p.add_argument("--out", required=True, help="output JSONL; never the input")
    p.add_argument("--query_prefix", default="", help="training's query_prefix (a line's prompt wins)")
    p.add_argument("--passage_prefix", default="", help="training's passage_prefix")
    p.add_argument("--batch_size", type=int, default=32, help="pairs per forward")
    p.add_argument("--max_length", type=int, default=512, help="tokens per pair (query and passage)")
    p.add_argument("--overwrite", action="store_true", help="start --out over instead of continuing it")
    a, extra = p.parse_known_args(argv)
    if extra:
        p.error(f"{extra[0]}: not an option of --teacher, which takes only {', '.join(TEACHER_OPTIONS)}")
    for k, least in (("batch_size", 1), ("max_length", 2)):
        if getattr(a, k) < least:
            p.error(f"--{k}: expected an integer >= {least}; got {getattr(a, k)}")
    error = output_error(a.out, "--out", inputs=(a.jsonl,), overwrite=True)  # an existing --out: continued below
    if error:
        p.error(error)
    recs = read_jsonl(a.jsonl, check=check_example)
    start, size = 0, 0
    if os.path.exists(a.out) and not a.overwrite:
        try:
            start, size = resume_point(a.out, recs, f"--out {a.out}")
        except ValueError as e:
            p.error(str(e))
        if start == len(recs) and size == os.path.getsize(a.out):
            print(f"--out {a.out} holds all {len(recs)} records of {a.jsonl} with their scores: nothing to do")
            return
        print(f"--out {a.out}: continuing after record {start} of {len(recs)}")
    try:
        model, tokenizer = load_teacher(a.teacher)
    except ValueError as e:
        p.error(str(e))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    score_file(model, tokenizer, recs, a.out, start, size, a.batch_size, a.max_length, a.query_prefix,
               a.passage_prefix)
    no_neg = sum(not r.get("neg") for r in recs)
    print(f"wrote {len(recs)} records with teacher scores to {a.out}"
          + (f"; {no_neg} have no negative: teacher_kd training refuses them (mine negatives first)" if no_neg else ""))
