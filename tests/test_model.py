"""model.py: the three heads and their scores against brute-force definitions; checkpoints; MCLS."""
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

import st_layout
from model import SPARSE_INIT, M3, colbert_score, dense_score, sparse_score, sparse_vectors
from tiny import Payload, make_encoder, make_tokenizer, tiny_m3

TEXTS = ["the cell protein of the cell", "cancer risk in human patients and mice", "a dense sparse vector",
         "gene expression increased in cells treated with protein", "query"]


def batch(m, texts, extra_pad=0):
    b = m.tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = b["input_ids"], b["attention_mask"]
    if extra_pad:
        ids = torch.cat([ids, torch.full((len(texts), extra_pad), m.tokenizer.pad_token_id)], 1)
        mask = torch.cat([mask, torch.zeros(len(texts), extra_pad, dtype=mask.dtype)], 1)
    return ids, mask


def brute_sparse(ids, w, special):
    """Per text {id: max weight}, specials removed, then sum over shared ids of products; autograd-friendly."""
    vecs = []
    for row_ids, row_w in zip(ids.tolist(), w):
        d = {}
        for t, i in enumerate(row_ids):
            if i not in special:
                d[i] = torch.maximum(d[i], row_w[t]) if i in d else row_w[t]
        vecs.append(d)
    return vecs


def test_sparse_score_values_and_grads_equal_dict_overlap():
    torch.manual_seed(0)
    q_ids, p_ids = torch.randint(0, 12, (3, 7)), torch.randint(0, 12, (5, 9))  # many repeats and shared ids
    q_w, p_w = torch.rand(3, 7, requires_grad=True), torch.rand(5, 9, requires_grad=True)
    s = sparse_score(q_ids, q_w, p_ids, p_w)
    qd, pd = brute_sparse(q_ids, q_w, set()), brute_sparse(p_ids, p_w, set())
    ref = torch.stack([torch.stack([sum((a[k] * b[k] for k in a if k in b), torch.tensor(0.0)) for b in pd])
                       for a in qd])
    assert torch.allclose(s, ref, atol=1e-6)
    g = torch.randn_like(s)
    gq, gp = torch.autograd.grad((s * g).sum(), (q_w, p_w))
    rq, rp = torch.autograd.grad((ref * g).sum(), (q_w, p_w))
    assert torch.allclose(gq, rq, atol=1e-6) and torch.allclose(gp, rp, atol=1e-6)


def test_sparse_vectors_drop_ids_outside_vocab():
    ids = torch.tensor([[5, 9, 5, 250001]])
    w = torch.tensor([[0.2, 0.7, 0.4, 0.9]])
    out = sparse_vectors(ids, w, torch.tensor([1, 5, 9]))
    assert out[0].tolist() == pytest.approx([0.0, 0.4, 0.7])


@pytest.mark.parametrize("style", ["xlmr", "bert"])
def test_model_sparse_matches_brute_force_and_skips_special_tokens(style):
    m = tiny_m3(style)
    ids, mask = batch(m, TEXTS)
    out = m(ids, mask)
    special = set(m.special_ids.tolist())
    assert m.tokenizer.cls_token_id in special and m.tokenizer.pad_token_id in special
    assert out["sparse"][torch.isin(ids, m.special_ids)].abs().max() == 0
    assert out["sparse"].max() > 0  # the test would be vacuous with an all-zero head
    s = sparse_score(ids, out["sparse"], ids, out["sparse"])
    vecs = brute_sparse(ids, out["sparse"], special)
    ref = torch.tensor([[float(sum(a[k] * b[k] for k in a if k in b)) for b in vecs] for a in vecs])
    assert torch.allclose(s, ref, atol=1e-5)
    enc = m.encode(TEXTS)
    for d, v in zip(enc["sparse"], vecs):
        assert not set(d) & special
        assert d == pytest.approx({k: float(x) for k, x in v.items() if x > 0}, rel=1e-5, abs=1e-6)


def test_a_new_sparse_head_starts_as_term_matching():
    """Fresh heads: sparse score = SPARSE_INIT^2 x number of distinct non-special token ids the texts share."""
    tok = make_tokenizer("xlmr")
    m = M3(make_encoder(tok), tok)
    ids, mask = batch(m, TEXTS)
    w = m(ids, mask)["sparse"]  # (N, T)
    s = sparse_score(ids, w, ids, w)
    special = set(m.special_ids.tolist())
    sets = [set(row[msk.bool()].tolist()) - special for row, msk in zip(ids, mask)]
    ref = torch.tensor([[len(a & b) * SPARSE_INIT ** 2 for b in sets] for a in sets])
    assert ref.max() > 0 and torch.allclose(s, ref, atol=1e-6)


def brute_colbert(q, p):
    """mean over query tokens of max over passage tokens, one pair of (L, D) arrays."""
    return float(np.mean(np.max(q @ p.T, axis=1)))


def test_colbert_score_unchanged_by_padding_and_equals_maxsim():
    m = tiny_m3()
    q_ids, q_mask = batch(m, TEXTS[:2])
    p_ids, p_mask = batch(m, TEXTS)
    q, p = m(q_ids, q_mask), m(p_ids, p_mask)
    s = colbert_score(q["colbert"], p["colbert"], q["colbert_mask"], p["colbert_mask"])
    qx, px = m(*batch(m, TEXTS[:2], extra_pad=5)), m(*batch(m, TEXTS, extra_pad=11))
    s_pad = colbert_score(qx["colbert"], px["colbert"], qx["colbert_mask"], px["colbert_mask"])
    assert torch.allclose(s, s_pad, atol=1e-5)
    small = colbert_score(q["colbert"], p["colbert"], q["colbert_mask"], p["colbert_mask"], chunk_elems=1)
    assert torch.allclose(s, small, atol=1e-6)  # chunking over passages changes nothing
    enc_q, enc_p = m.encode(TEXTS[:2]), m.encode(TEXTS)
    ref = [[brute_colbert(a, b) for b in enc_p["colbert"]] for a in enc_q["colbert"]]
    assert np.allclose(s.detach().numpy(), ref, atol=1e-5)
    assert colbert_score(enc_q["colbert"][0], enc_p["colbert"][1]) == pytest.approx(ref[0][1], rel=1e-5, abs=1e-6)
    assert [len(c) for c in enc_p["colbert"]] == (p_mask.sum(1) - 1).tolist()  # every real token after CLS


def test_scores_on_a_hand_computed_example():
    q, p = torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert dense_score(q, p)[0].tolist() == pytest.approx([0.6, 0.8])
    # query {7: max(.5, .2), 9: .1}, passage {7: .4, 3: .9}: shared id 7 -> 0.5 * 0.4
    s = sparse_score(torch.tensor([[7, 9, 7]]), torch.tensor([[0.5, 0.1, 0.2]]),
                     torch.tensor([[7, 3]]), torch.tensor([[0.4, 0.9]]))
    assert s.item() == pytest.approx(0.2)
    # query tokens a1=(1,0), a2=(0,1); passage b1=(.6,.8), b2=(-1,0), b3 = padding (masked): (max(.6,-1) + .8)/2
    qc, pc = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[0.6, 0.8], [-1.0, 0.0], [0.0, 0.0]]])
    s = colbert_score(qc, pc, torch.ones(1, 2), torch.tensor([[1, 1, 0]]))
    assert s.item() == pytest.approx(0.7)
    # a padded passage row would score 0 > -1 for a query token pointing away from every real token
    s = colbert_score(torch.tensor([[[-1.0, 0.0]]]), pc, torch.ones(1, 1), torch.tensor([[1, 1, 0]]))
    assert s.item() == pytest.approx(1.0)


def test_dense_is_normalised_cls_or_mean():
    m = tiny_m3()
    ids, mask = batch(m, TEXTS)
    h = m.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    out = m(ids, mask)
    assert torch.allclose(out["dense"], torch.nn.functional.normalize(h[:, 0], dim=-1), atol=1e-6)
    m.pooling = "mean"
    mean = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(m(ids, mask)["dense"], torch.nn.functional.normalize(mean, dim=-1), atol=1e-6)


def test_save_load_round_trip_and_missing_heads(tmp_path):
    m = tiny_m3(colbert_dim=16, pooling="mean")
    m.save_pretrained(tmp_path / "ck")
    assert {"colbert_linear.pt", "sparse_linear.pt", "config.json", "model.safetensors",
            "tokenizer.json"} <= set(os.listdir(tmp_path / "ck"))
    heads = torch.load(tmp_path / "ck" / "colbert_linear.pt", weights_only=True)
    assert heads["weight"].shape == (16, 32) and heads["bias"].shape == (16,)
    m2 = M3.from_pretrained(str(tmp_path / "ck"))
    assert m2.pooling == "mean"
    a, b = m.encode(TEXTS), m2.encode(TEXTS)
    assert np.array_equal(a["dense"], b["dense"]) and a["sparse"] == b["sparse"]
    assert all(np.array_equal(x, y) for x, y in zip(a["colbert"], b["colbert"]))
    # a bare encoder (no head files) fails loudly unless new heads are asked for
    m.encoder.save_pretrained(tmp_path / "bare")
    m.tokenizer.save_pretrained(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="colbert_linear.pt.*new_heads=True"):
        M3.from_pretrained(str(tmp_path / "bare"))
    fresh = M3.from_pretrained(str(tmp_path / "bare"), new_heads=True)
    assert fresh.pooling == "cls" and fresh.colbert_linear.weight.shape == (32, 32)  # defaults: CLS, D = H
    assert torch.equal(fresh.encoder.embeddings.word_embeddings.weight, m.encoder.embeddings.word_embeddings.weight)


def test_a_checkpoint_without_its_tokenizer_or_with_a_truncated_encoder_is_refused(tmp_path):
    m = tiny_m3()
    m.save_pretrained(tmp_path / "ck")
    for f in ("tokenizer.json", "tokenizer_config.json"):  # AutoTokenizer would fall back to a 5-token <unk> one
        os.remove(tmp_path / "ck" / f)
    with pytest.raises(FileNotFoundError, match=r"ck: no tokenizer files"):
        M3.from_pretrained(str(tmp_path / "ck"))
    m.save_pretrained(tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy cut short
    with pytest.raises(ValueError, match=r"ck/model.safetensors: unreadable .*truncated"):
        M3.from_pretrained(str(tmp_path / "ck"))
    m.save_pretrained(tmp_path / "ck")
    make_tokenizer("bert").save_pretrained(tmp_path / "ck")  # another model's tokenizer, larger than the vocabulary
    small = M3(make_encoder(make_tokenizer(), hidden=32), make_tokenizer())
    small.encoder.resize_token_embeddings(20)
    small.encoder.save_pretrained(tmp_path / "ck")
    with pytest.raises(ValueError, match=r"tokens but the encoder only 20 embeddings"):
        M3.from_pretrained(str(tmp_path / "ck"))


def test_pooling_comes_from_the_checkpoint_unless_overridden(tmp_path):
    tiny_m3(pooling="mean").save_pretrained(tmp_path)
    assert M3.from_pretrained(str(tmp_path)).pooling == "mean"
    with pytest.warns(UserWarning, match="trained with mean pooling .* now used with cls"):
        assert M3.from_pretrained(str(tmp_path), pooling="cls").pooling == "cls"


def test_pickled_payload_in_head_file_is_refused(tmp_path):
    m = tiny_m3()
    m.save_pretrained(tmp_path)
    with open(tmp_path / "sparse_linear.pt", "wb") as f:
        pickle.dump({"weight": Payload(), "bias": torch.zeros(1)}, f)
    if os.path.exists(Payload.MARKER):
        os.remove(Payload.MARKER)
    with pytest.raises(ValueError, match="sparse_linear.pt: not a plain tensor file"):
        M3.from_pretrained(str(tmp_path))
    assert not os.path.exists(Payload.MARKER)


def test_mcls_inserts_cls_every_256_tokens_and_averages_their_states():
    m = tiny_m3()
    text = " ".join(["protein"] * 600)  # one token per word in the tiny vocab
    ids = m.tokenize([text], max_length=700, mcls=True)[0]
    cls, end = m.tokenizer.cls_token_id, m.tokenizer.sep_token_id
    assert len(ids) == 600 + 3 + 1 and ids[-1] == end
    assert [i for i, t in enumerate(ids) if t == cls] == [0, 256, 512]
    assert len(m.tokenize([text], max_length=512, mcls=True)[0]) == 512  # truncated with room for CLS + end
    x = torch.tensor([ids])
    h = m.encoder(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state[0]
    ref = torch.nn.functional.normalize(h[[0, 256, 512]].mean(0), dim=-1)
    out = m.encode([text], max_length=700, mcls=True)
    assert np.allclose(out["dense"][0], ref.detach().numpy(), atol=1e-5)
    assert len(out["colbert"][0]) == len(ids) - 3  # inserted CLS tokens are not multi-vectors
    short = m.encode(["the cell"], mcls=True)["dense"]  # a short text has one CLS: same as plain encoding
    assert np.allclose(short, m.encode(["the cell"])["dense"], atol=1e-6)


def test_a_released_bge_m3_style_directory_loads_unchanged(tmp_path):
    """The release layout as BGE-M3 ships it: XLMRobertaModel with its pooler, fp16 head files, no m3.json."""
    tok = make_tokenizer("xlmr")
    enc = make_encoder(tok)
    from transformers import XLMRobertaModel
    full = XLMRobertaModel(enc.config, add_pooling_layer=True)
    full.load_state_dict(enc.state_dict(), strict=False)
    full.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    torch.manual_seed(3)
    colbert, sparse = torch.nn.Linear(32, 32).half(), torch.nn.Linear(32, 1).half()
    torch.save(colbert.state_dict(), tmp_path / "colbert_linear.pt")
    torch.save(sparse.state_dict(), tmp_path / "sparse_linear.pt")
    released_st_files(tmp_path)  # its sentence-transformers files, which from_pretrained does not read
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the unused pooler is expected: no warning
        m = M3.from_pretrained(str(tmp_path))
    assert m.pooling == "cls" and m.colbert_linear.weight.dtype == torch.float32
    assert torch.equal(m.colbert_linear.weight, colbert.weight.float())
    assert torch.equal(m.sparse_linear.bias, sparse.bias.float())
    assert torch.equal(m.encoder.embeddings.word_embeddings.weight, enc.embeddings.word_embeddings.weight)


def test_encoder_weights_missing_from_a_checkpoint_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    m = tiny_m3()
    m.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = next(k for k in state if k.endswith("layer.1.output.dense.weight"))
    del state[key]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"randomly initialised.*layer\.1\.output\.dense\.weight"):
        M3.from_pretrained(str(tmp_path))


def full_size_outputs_in_backward(q, p, chunk_elems):
    """How many tensors of p's full size colbert_score's backward creates (TorchDispatchMode sees every op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else [out]
            Count.n += sum(torch.is_tensor(o) and o.numel() >= p.numel() for o in outs)
            return out
    s = colbert_score(q, p, chunk_elems=chunk_elems)
    with Count():
        s.sum().backward()
    return Count.n


def test_colbert_backward_allocates_the_passage_gradient_a_fixed_number_of_times():
    # slicing p per block made each block's backward allocate a zero-filled gradient of p's full size (B^3 work)
    torch.manual_seed(0)
    q, p = torch.randn(2, 3, 8, requires_grad=True), torch.randn(32, 5, 8, requires_grad=True)
    few = full_size_outputs_in_backward(q, p, chunk_elems=2 * 3 * 5 * 16)  # 2 passage blocks
    many = full_size_outputs_in_backward(q, p, chunk_elems=2 * 3 * 5 * 1)  # 32 passage blocks
    assert many == few <= 3, (few, many)


def test_bf16_autocast_keeps_representations_bf16_and_scores_accumulate_in_fp32():
    m = tiny_m3()
    ids, mask = batch(m, TEXTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CUDA autocast on CPU: same op lists for these ops
        out = m(ids, mask)
    assert out["dense"].dtype == out["colbert"].dtype == torch.bfloat16  # F.normalize alone would give fp32
    s = colbert_score(out["colbert"], out["colbert"], out["colbert_mask"], out["colbert_mask"])
    ref = colbert_score(out["colbert"].double(), out["colbert"].double(), out["colbert_mask"], out["colbert_mask"])
    assert s.dtype == torch.float32 and torch.allclose(s.double(), ref, rtol=1e-6, atol=1e-6)  # bf16 sums: ~4e-3


def test_an_encoder_stored_in_bf16_loads_in_fp32(tmp_path):
    tok = make_tokenizer("xlmr")
    make_encoder(tok).to(torch.bfloat16).save_pretrained(tmp_path)  # like a release's fp16/bf16 files
    tok.save_pretrained(tmp_path)
    m = M3.from_pretrained(str(tmp_path), new_heads=True)
    assert {p.dtype for p in m.parameters()} == {torch.float32}  # AdamW keeps fp32 masters; autocast does bf16


def released_st_files(path):
    """The sentence-transformers files as BAAI/bge-m3 ships them (modules.json, 1_Pooling with CLS, max 8192)."""
    os.makedirs(path / "1_Pooling", exist_ok=True)
    (path / "modules.json").write_text(json.dumps(st_layout.MODULES))
    (path / "sentence_bert_config.json").write_text('{"max_seq_length": 8192, "do_lower_case": false}')
    (path / "config_sentence_transformers.json").write_text('{"__version__": {"sentence_transformers": "2.2.2"}}')
    (path / "1_Pooling/config.json").write_text(json.dumps({"word_embedding_dimension": 32, "pooling_mode_cls_token":
                                                           True, "pooling_mode_mean_tokens": False}))


@pytest.mark.parametrize("style,pooling", [("xlmr", "cls"), ("bert", "mean")])
def test_sentence_transformers_reads_a_checkpoint_as_m3_encode(tmp_path, style, pooling):
    m = tiny_m3(style, pooling=pooling)
    m.save_pretrained(tmp_path, prompts={"query": "query: ", "passage": ""})
    modules = json.load(open(tmp_path / "modules.json"))
    assert [(x["path"], x["type"].rsplit(".", 1)[1]) for x in modules] == \
        [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    pool = json.load(open(tmp_path / "1_Pooling/config.json"))
    assert (pool["pooling_mode_cls_token"], pool["pooling_mode_mean_tokens"]) == (pooling == "cls", pooling == "mean")
    assert pool["word_embedding_dimension"] == 32 and not pool["pooling_mode_max_tokens"]
    assert json.load(open(tmp_path / "sentence_bert_config.json"))["max_seq_length"] == 512  # the tokenizer's limit
    assert st_layout.prompts(str(tmp_path)) == {"query": "query: "}  # empty prompts are not written
    texts = TEXTS + ["x", " ".join(TEXTS * 20)]  # the last one is cut at 512 tokens by both
    ref = m.encode(texts)["dense"]
    assert np.array_equal(M3.from_pretrained(str(tmp_path)).encode(texts)["dense"], ref)  # the files change nothing
    st = pytest.importorskip("sentence_transformers", reason="pip install -r requirements.txt installs it (tests)")
    got = st.SentenceTransformer(str(tmp_path), device="cpu").encode(texts, convert_to_numpy=True)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99999, cos  # without the files: mean pooling, unnormalised (cosine ~0.5 here)


def test_sentence_transformers_max_length_is_the_encoders_limit():
    tok = make_tokenizer("xlmr")
    tok.model_max_length = 10 ** 30  # a tokenizer without a limit of its own
    xlmr, bert = make_encoder(tok, max_positions=1024), make_encoder(make_tokenizer("bert"), "bert", max_positions=1024)
    assert xlmr.config.max_position_embeddings == 1026 and st_layout.max_length(xlmr, tok) == 1024  # bge-m3: 8192
    assert st_layout.max_length(bert, tok) == 1024 and st_layout.max_length(bert, make_tokenizer("bert")) == 512
