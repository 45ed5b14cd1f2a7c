"""What the tests share: tiny in-memory tokenizers, encoders and M3 models (no files, no downloads, < 0.1 s each),
unit vectors, a word list, a pickled payload, and process launchers with a deadline."""
import os
import string

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

from model import M3

WORDS = ("the a of and to in is for on with that by as are from be this we cell cells protein gene "
         "patients cancer study results risk treatment disease expression increased reduced mice human "
         "data model query passage retrieval dense sparse vector").split()


def _wordpiece_vocab(specials):
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = list(specials) + pieces + ["##" + c for c in string.ascii_lowercase + string.digits] + WORDS
    return {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}  # dict.fromkeys: unique, in order


def make_tokenizer(style="xlmr"):
    """style="xlmr": <s>=0 <pad>=1 </s>=2 <unk>=3 like XLM-R; style="bert": [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3, no eos."""
    if style == "xlmr":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        cls, pad, sep, unk, mask = specials
        names = dict(bos_token=cls, cls_token=cls, eos_token=sep, sep_token=sep, pad_token=pad, unk_token=unk,
                     mask_token=mask)
    else:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        pad, unk, cls, sep, mask = specials
        names = dict(cls_token=cls, sep_token=sep, pad_token=pad, unk_token=unk, mask_token=mask)
    vocab = _wordpiece_vocab(specials)
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **names)


def make_encoder(tokenizer, style="xlmr", hidden=32, layers=2, seed=0, max_positions=1024):
    """A random 2-layer encoder of hidden size 32 matching `tokenizer` (dropout off unless the caller turns it on)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=2 * hidden, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  pad_token_id=tokenizer.pad_token_id)
    if style == "xlmr":
        cfg = XLMRobertaConfig(max_position_embeddings=max_positions + 2, type_vocab_size=1, bos_token_id=0,
                               eos_token_id=2, **common)
        return XLMRobertaModel(cfg, add_pooling_layer=False)
    return BertModel(BertConfig(max_position_embeddings=max_positions, **common), add_pooling_layer=False)


def write_examples(path, n, seed=0, words=WORDS[:23]):
    """n fine-tuning examples (query, 1 pos, 3 neg) of 3-18 random words each, one JSON line each, to path."""
    import json
    import random
    rnd = random.Random(seed)
    text = lambda k: " ".join(rnd.choice(words) for _ in range(k))  # noqa: E731
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"query": text(rnd.randint(3, 8)), "pos": [text(rnd.randint(5, 18))],
                                "neg": [text(rnd.randint(5, 18)) for _ in range(3)]}) + "\n")
    return str(path)


def run_inputs(d, long=0, seed=1):
    """A tiny saved M3 with heads (d/model) and 12 fine-tuning examples (d/train.jsonl) for train.py runs; long > 0:
    also d/long.jsonl with that many (seeded by seed), for runs that must last."""
    tok = make_tokenizer()
    M3(make_encoder(tok), tok).save_pretrained(d / "model")
    write_examples(d / "train.jsonl", 12)
    if long:
        write_examples(d / "long.jsonl", long, seed=seed)
    return d


def spawn(fn, args, nprocs=2, timeout=300):
    """torch.multiprocessing.spawn with a deadline: fn(rank, init_file, *args) in nprocs processes, init_file a fresh
    rendezvous file. A worker's exception or death fails the test (no retry: a crash at start-up or teardown is a
    product bug, and the workers end with runtime.end_distributed as train.py does); processes still running after
    timeout seconds are killed and the test fails naming fn."""
    import tempfile
    import time

    import torch.multiprocessing as mp
    init = os.path.join(tempfile.mkdtemp(), "init")
    ctx = mp.start_processes(fn, args=(init,) + tuple(args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.time())):
        if time.time() >= deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{fn.__name__}: {nprocs} processes still running after {timeout} s")


def run(cmd, timeout=300, **kw):
    """subprocess.run(cmd, capture_output=True, text=True, **kw) in its own process group, with a deadline: on
    timeout every process it started (torchrun's ranks, DataLoader workers) is killed and the test fails naming the
    command, never by waiting for CI's time to run out."""
    import signal
    import subprocess
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kw) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"still running after {timeout} s, killed: {' '.join(map(str, cmd))}\n"
                                 f"{out[-2000:]}{err[-2000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def tiny_m3(style="xlmr", seed=0, **kw):
    """A tiny M3 whose sparse head gives clearly non-zero, token-dependent weights (a new head's term-matching start,
    weight 0, would make every sparse test about uniform weights)."""
    tok = make_tokenizer(style)
    m = M3(make_encoder(tok, style, seed=seed), tok, **kw)
    torch.manual_seed(seed + 1)
    torch.nn.init.normal_(m.sparse_linear.weight, std=0.5)
    torch.nn.init.constant_(m.sparse_linear.bias, 0.3)
    return m


def unit(x):
    """Rows of x scaled to unit length, float32."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class Payload:
    """Pickled, it runs `touch MARKER` when unpickled: a loader that refuses pickled code leaves no MARKER."""
    MARKER = "/tmp/m3_pickled_payload_ran"

    def __reduce__(self):
        return (os.system, (f"touch {self.MARKER}",))
