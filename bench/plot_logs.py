"""Loss curves of one or more runs, from their log.jsonl, to a PNG: for people without a dashboard.

    python bench/plot_logs.py runs/a/log.jsonl runs/b/log.jsonl --out curves.png [--keys loss,dense,sparse_share]

One panel per key (default: every term the runs logged, the loss first: each head's loss, the ensemble,
self-distillation, the accuracy, the sparse head's health and any term an edit added; not the bookkeeping in SKIP), one
line per file, against the step. Needs matplotlib (pip install matplotlib), imported only here.
"""
import argparse
import json
import os

SKIP = ("epoch", "lr", "ms", "tok_s", "samples_s", "eval_s", "best_step")  # bookkeeping: drawn only if asked for


def read_log(path):
    """{key: ([steps], [values])} of a log.jsonl, every numeric key but step; a line cut short by a kill is skipped."""
    series = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    series.setdefault(k, ([], []))
                    series[k][0].append(rec["step"])
                    series[k][1].append(v)
    return series


def plot(paths, out, keys=None):
    """Draw `keys` of every log in paths into out (PNG), default every logged key but SKIP, the loss first; keys no
    log has are left out. Returns the keys drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"bench/plot_logs.py needs matplotlib: pip install matplotlib ({e})")
    logs = {p: read_log(p) for p in paths}
    found = list(dict.fromkeys(["loss"] + [k for s in logs.values() for k in s if k not in SKIP]))  # in log order
    keys = [k for k in keys or found if any(k in s for s in logs.values())]
    if not keys:
        raise SystemExit(f"none of the keys is in {', '.join(paths)}")
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        for p, s in logs.items():
            if k in s:
                ax.plot(*s[k], label=os.path.basename(os.path.dirname(os.path.abspath(p))) or p)
        ax.set_ylabel(k)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return keys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="log.jsonl files")
    p.add_argument("--out", default="curves.png")
    p.add_argument("--keys", default="", help="comma-separated log.jsonl keys, one panel each (default: every "
                                              "logged term)")
    a = p.parse_args(argv)
    missing = [x for x in a.logs if not os.path.isfile(x)]
    if missing:
        p.error(f"no such file: {', '.join(missing)}")
    keys = plot(a.logs, a.out, [k for k in a.keys.split(",") if k])
    print(f"wrote {a.out}: {', '.join(keys)} of {len(a.logs)} runs")


if __name__ == "__main__":
    main()
