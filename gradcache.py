"""A batch encoded in chunks (SPEC 4.6): sub-batches (forward_chunks: slices of one padded tensor, one graph), and the
gradient cache (SPEC 0): one step's gradients with a peak memory that does not grow with the batch.

1) encode every chunk of texts without a graph, 2) the loss on the whole batch and its gradients with respect to the
representations, 3) re-encode each chunk with a graph (the same dropout: its RNG state is replayed) and back-propagate
the cached gradients into the encoder. The gradients equal the plain step's (tests/test_train.py); the encoder runs
forward twice.
"""
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP


def grad_cache_step(model, batch, chunk, heads, loss_fn, amp, scaler):
    """Forward + backward of one batch in chunks of chunk["q"] queries and chunk["p"] passages (0: one chunk per side)
    -> (loss, parts). heads: the optional heads to compute (M3.forward). loss_fn(q, p) -> (loss, parts) scores the
    representations of the whole batch (compute_loss)."""
    chunk = {k: n if n > 0 else len(batch[f"{k}_ids"]) for k, n in chunk.items()}
    pieces = [(k, s) for k in ("q", "p") for s in range(0, len(batch[f"{k}_ids"]), chunk[k])]  # (side, first text)
    reps, rng = {"q": [], "p": []}, []
    with torch.no_grad(), amp:
        for k, s in pieces:
            rng.append(rng_state())
            reps[k].append(model(batch[f"{k}_ids"][s:s + chunk[k]], batch[f"{k}_mask"][s:s + chunk[k]], heads))
    cached = {k: {n: torch.cat([o[n] for o in outs]) for n in outs[0]} for k, outs in reps.items()}
    del reps  # one copy of the representations (+ their gradients) is all the cache holds
    for outs in cached.values():
        for n, t in outs.items():
            if t.is_floating_point():
                t.requires_grad_(True)
    loss, parts = loss_fn(cached["q"], cached["p"])
    scaler.scale(loss).backward()  # gradients now sit on the cached representations
    for j, ((k, s), state) in enumerate(zip(pieces, rng)):
        sync = j == len(pieces) - 1 or not isinstance(model, DDP)  # DDP all-reduces once, after the last chunk
        with (nullcontext() if sync else model.no_sync()):
            set_rng_state(state)
            with amp:
                out = model(batch[f"{k}_ids"][s:s + chunk[k]], batch[f"{k}_mask"][s:s + chunk[k]], heads)
            names = [n for n in out if out[n].is_floating_point()]  # colbert_mask carries no gradient
            torch.autograd.backward([out[n] for n in names], [cached[k][n].grad[s:s + chunk[k]] for n in names])
    return loss.detach(), parts


def rng_state():
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def set_rng_state(state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def texts_per_chunk(cfg, ids):
    """Texts per encoder call for ids (N, T): sub_batch_tokens // T (at least 1), else sub_batch_size; 0 = all N."""
    return max(1, cfg.sub_batch_tokens // ids.shape[1]) if cfg.sub_batch_tokens > 0 else cfg.sub_batch_size


def forward_chunks(model, ids, mask, chunk, heads):
    """model(ids, mask, heads) in chunks of `chunk` texts (0: at once): slices of one padded tensor, so they
    concatenate. heads: the optional heads to compute (M3.forward)."""
    if chunk <= 0 or chunk >= len(ids):
        return model(ids, mask, heads)
    outs = [model(ids[s:s + chunk], mask[s:s + chunk], heads) for s in range(0, len(ids), chunk)]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
