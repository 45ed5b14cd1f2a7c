"""What the bench scripts share: the repository on sys.path, resident memory, random token batches, all heads on."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the flat modules, and tests/tiny.py's tokenizer
ALL_HEADS = ["dense", "sparse", "colbert"]  # head_schedule "dense,sparse,colbert": every head trains


def rss_mb(field="VmRSS"):
    """VmRSS (now) or VmHWM (peak since reset_peak_rss) of this process, in MB. Linux only."""
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024


def reset_peak_rss():
    """Set VmHWM back to the current RSS, so the next peak is the next step's own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def random_batch(B, G, TQ, TP, tok, vocab, gen=None, device=None, ragged=False):
    """B queries x TQ tokens, B*G passages x TP tokens: random ids in [5, vocab), CLS first, SEP last, no teacher.
    ragged: lengths uniform in [T/2, T] (the first text full length), padded after; else every text is full.
    Drawn on the CPU (gen: a CPU generator), then moved to device."""
    import torch  # here, so that a bench without torch (eval_scale.py) does not load it
    out = {"teacher": None}
    for k, n, T in (("q", B, TQ), ("p", B * G, TP)):
        ids = torch.randint(5, vocab, (n, T), generator=gen)  # (n, T)
        if ragged:
            lens = torch.randint(T // 2, T + 1, (n,), generator=gen)
            lens[0] = T  # the batch's padded length is T
            mask = (torch.arange(T)[None] < lens[:, None]).long()  # (n, T)
            ids[:, 0], ids[torch.arange(n), lens - 1] = tok.cls_token_id, tok.sep_token_id
            ids = ids.masked_fill(mask == 0, tok.pad_token_id)
        else:
            mask = torch.ones(n, T, dtype=torch.long)
            ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
        out[f"{k}_ids"], out[f"{k}_mask"] = ids.to(device), mask.to(device)
    return out
