"""bench/stats.py: the error bars of bench/quality.py against hand-computed values and a brute-force bootstrap; the
quality runner's resume and its shared stages."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import quality  # noqa: E402
import stats  # noqa: E402


def test_mean_std_by_hand():
    assert stats.mean_std([0.70, 0.72, 0.74]) == pytest.approx((0.72, 0.02), rel=1e-12)
    assert stats.mean_std([0.5]) == (0.5, 0.0)


def test_seed_interval_by_hand():
    a = np.array([[1.0, 0.0], [0.8, 0.4], [0.6, 0.6]])  # seed means 0.5, 0.6, 0.6
    b = np.array([[0.2, 0.2], [0.4, 0.4], [0.5, 0.3]])  # seed means 0.2, 0.4, 0.4
    d = np.array([0.3, 0.2, 0.2])  # per-seed differences: mean 0.2333.., sample std 0.057735..
    half = 4.303 * d.std(ddof=1) / np.sqrt(3)
    assert stats.seed_interval(a, b) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half), rel=1e-12)
    assert np.isnan(stats.seed_interval(a[:1], b[:1])[1])


def test_query_bootstrap_equals_a_brute_force_loop_and_collapses_on_constant_differences():
    r = np.random.default_rng(1)
    a, b = r.random((3, 40)), r.random((3, 40))
    got = stats.query_bootstrap(a, b, n_boot=500, seed=7)
    d = (a - b).mean(0)
    draws = np.random.default_rng(7).integers(40, size=(500, 40))
    means = sorted(sum(d[j] for j in row) / 40 for row in draws)  # one resample at a time, by hand
    assert got[0] == pytest.approx(d.mean(), rel=1e-12)
    assert got[1] == pytest.approx(np.percentile(means, 2.5), rel=1e-12)
    assert got[2] == pytest.approx(np.percentile(means, 97.5), rel=1e-12)
    assert got[1] < got[0] < got[2]
    assert stats.query_bootstrap(b + 0.25, b) == pytest.approx((0.25, 0.25, 0.25), rel=1e-12)


def fake_eval(model, data, **ev):
    """Per-query nDCG@10 drawn from the model's name and weights: results that differ per run but not per call."""
    r = np.random.default_rng(sum(map(ord, str(model) + str(ev.get("weights")))))
    per = {row: [float(x) for x in r.random(5)] for row in quality.ROWS}
    sweep = [{"weights": [0, 0.1, 1], "nDCG@10": 0.9}, {"weights": [0.2, 0.1, 1], "nDCG@10": float(r.random())}]
    return {"rows": {row: {"nDCG@10": float(np.mean(v)), "Recall@100": 0.5} for row, v in per.items()},
            "per_query_ndcg10": {"query_ids": list("abcde"), **per}, "tuned": {"all": [1, 0.5, 1]}, "sweep": sweep}


def test_quality_runner_resumes_and_trains_each_run_once(tmp_path, monkeypatch):
    monkeypatch.setattr(quality.M3, "from_pretrained", lambda *a, **k: "zero-shot model")
    calls = []
    train = lambda out, config, seed, steps: calls.append((config, seed)) or f"{config} {seed}"  # noqa: E731
    res = quality.run_all(str(tmp_path), 2, (1, 1, 1), {}, "data", train, fake_eval)
    every = [c for c, (all_seeds, *_) in quality.CONFIGS.items() if all_seeds]
    assert calls == [(c, s) for s in (0, 1) for c in every] + [(c, 0) for c in quality.CONFIGS if c not in every]
    assert [len(res[c]) for c in every] == [2, 2, 2] and len(res["CLS pooling"]) == 1 and len(res["zero-shot"]) == 1
    calls.clear()
    assert quality.run_all(str(tmp_path), 2, (1, 1, 1), {}, "data", train, fake_eval) == res and calls == []
    os.remove(tmp_path / "results" / "ours-s1.json")  # a run that stopped before its result: redone, alone
    quality.run_all(str(tmp_path), 2, (1, 1, 1), {}, "data", train, fake_eval)
    assert calls == [("ours", 1)]
    text = quality.table(res)
    assert "ours - without self-KD" in text and "ours s0 - CLS pooling" in text  # one seed: against ours's seed 0
    assert quality.run_all(str(tmp_path), 2, (1, 1, 1), {}, "data", None, fake_eval) == res and calls == [("ours", 1)]
    os.remove(tmp_path / "results" / "ours-s1.json")
    assert len(quality.run_all(str(tmp_path), 2, (1, 1, 1), {}, "data", None, fake_eval)["ours"]) == 1  # --table
    calls.clear()
    quality.run_all(str(tmp_path), 3, (1, 1, 1), {}, "data", train, fake_eval, only="without self-KD")  # --only
    assert calls == [("without self-KD", 2)]
    path, calls[:] = tmp_path / "results" / "ours-s0.json", []
    before = json.load(open(path))
    with open(path, "w") as f:  # written before the tuned rows existed
        json.dump({**before, "rows": {k: v for k, v in before["rows"].items() if not k.startswith("tuned")}}, f)
    text = quality.table(quality.run_all(str(tmp_path), 2, (1, 1, 1), {}, "data", None, fake_eval))  # --table
    ours0 = next(line for line in text.splitlines() if line.startswith("ours "))
    assert ours0.split()[-2:] == ["-", "-"] and "ours: all - " in text and "ours: tuned all" not in text  # blank
    quality.run_all(str(tmp_path), 2, (1, 1, 1), {}, "data", train, fake_eval)
    assert calls == [("ours", 0), ("ours", 1)] and json.load(open(path)) == before  # s0 evaluated again; s1 missing
    assert "tuned all" in quality.table(quality.run_all(str(tmp_path), 2, (1, 1, 1), {}, "data", None, fake_eval))
    assert json.load(open(path))["best on test"] == {"weights": [0.2, 0.1, 1], "nDCG@10": before["best on test"][
        "nDCG@10"]}  # the sweep's best with every head weighted, not the better one without dense
    monkeypatch.setattr(quality, "SWEEP", quality.SWEEP[:-1])  # eval.py's grid changed: every result is redone
    calls.clear()
    quality.run_all(str(tmp_path), 2, (1, 1, 1), {}, "data", train, fake_eval)
    assert len(calls) == len(quality.runs(2)) - 1  # zero-shot: no training


def test_configurations_share_the_stages_they_have_in_common(tmp_path, monkeypatch):
    names = []
    monkeypatch.setattr(quality, "run_stage", lambda out, name, *a: names.append(name) or name)
    monkeypatch.setattr(quality, "random_sparse_head", lambda src, dst: dst)
    stages = {c: tuple(names[-3:]) for c in quality.CONFIGS if quality.train_config(str(tmp_path), c, 1, (1, 1, 1))}
    ours = stages["ours"]
    assert stages["without self-KD"][:2] == ours[:2] and stages["without self-KD"][2] != ours[2]
    assert stages["heads at the encoder's lr"][0] == ours[0] != stages["encoder lr 5e-5"][0]
    assert stages["random sparse head"][0] == ours[0] and stages["random sparse head"][1] != ours[1]
    weak, weak_no_kd = stages["random sparse head"], stages["random sparse head, without self-KD"]
    assert weak[:2] == weak_no_kd[:2] and weak[2] != weak_no_kd[2]
    assert len({s for v in stages.values() for s in v}) == 3 + 1 + 3 + 2 + 2 + 1 + 3 + 3  # nothing else is shared


def test_xquad_english_subset_is_the_english_questions_against_the_english_sentences(tmp_path):
    src = os.path.join(quality.ROOT, "data", "xquad-r")
    dst = quality.xquad_english(str(tmp_path / "en"), src)
    read = lambda d, name: [json.loads(line) for line in open(os.path.join(d, name), encoding="utf-8")]  # noqa: E731
    corpus, queries = read(dst, "corpus.jsonl"), read(dst, "queries.jsonl")
    assert (len(queries), len(corpus)) == (1190, 1180)  # data/README.md's counts
    english = [r for r in read(src, "corpus.jsonl") if r["lang"] == "en"]
    assert corpus == [{k: r[k] for k in ("_id", "title", "text")} for r in english]
    assert queries == [{"_id": r["_id"], "text": r["text"]} for r in read(src, "queries.jsonl") if r["lang"] == "en"]
    rows = [line.split("\t") for line in open(os.path.join(dst, "qrels", "test.tsv"), encoding="utf-8")]
    assert rows[0] == ["query-id", "corpus-id", "score\n"]
    assert sorted(q for q, _, _ in rows[1:]) == sorted(r["_id"] for r in queries)  # one relevant sentence each
    ids = {r["_id"] for r in corpus}
    assert all(d in ids for _, d, _ in rows[1:])
    os.remove(os.path.join(dst, "corpus.jsonl"))
    assert quality.xquad_english(dst, src) == dst and not os.path.exists(os.path.join(dst, "corpus.jsonl"))  # once


def test_transfer_rows_use_each_seeds_scifact_weights_and_resume(tmp_path, monkeypatch):
    out, calls = str(tmp_path), []
    train = lambda out, config, seed, steps: f"{config} {seed}"  # noqa: E731
    evals = lambda model, data, **ev: calls.append((model, ev.get("weights"))) or fake_eval(model, data, **ev)  # noqa
    with pytest.raises(FileNotFoundError, match=r"ours-s0.json: no such file .* bench/quality.py --seeds 2 first"):
        quality.run_transfer(out, 2, (1, 1, 1), {}, "xq", train, evals)
    quality.run_all(out, 2, (1, 1, 1), {}, "data", train, fake_eval)
    scifact = tmp_path / "results" / "ours-s1.json"
    rewrite = lambda path, **kv: path.write_text(json.dumps({**json.loads(path.read_text()), **kv}))  # noqa: E731
    rewrite(scifact, tuned={"all": [0.3, 0.2, 1]})
    res = quality.run_transfer(out, 2, (1, 1, 1), {"weights": (1, 0.3, 1)}, "xq", train, evals)
    assert calls == [("ours 0", (1, 0.3, 1)), ("ours 0", [1, 0.5, 1]),
                     ("ours 1", (1, 0.3, 1)), ("ours 1", [0.3, 0.2, 1])]
    for r, w in zip(res, ([1, 0.5, 1], [0.3, 0.2, 1])):
        tuned = fake_eval(f"ours {res.index(r)}", "xq", weights=w)
        assert r["rows"]["tuned all"] == tuned["rows"]["all"] and r["tuned"]["all"] == w
        assert r["per_query_ndcg10"]["tuned all"] == tuned["per_query_ndcg10"]["all"]
        assert r["rows"]["all"] == fake_eval(f"ours {res.index(r)}", "xq", weights=(1, 0.3, 1))["rows"]["all"]
    calls.clear()
    assert quality.run_transfer(out, 2, (1, 1, 1), {"weights": (1, 0.3, 1)}, "xq", train, evals) == res and not calls
    rewrite(scifact, tuned={"all": [0.5, 0.3, 1]})  # seed 1's SciFact tuning chose other weights: redone
    quality.run_transfer(out, 2, (1, 1, 1), {"weights": (1, 0.3, 1)}, "xq", train, evals)
    assert calls == [("ours 1", (1, 0.3, 1)), ("ours 1", [0.5, 0.3, 1])]
    monkeypatch.setattr(quality, "SWEEP", quality.SWEEP[:-1])  # another grid: the SciFact results, then these, redone
    with pytest.raises(FileNotFoundError, match=r"ours-s0.json: no such file or written before eval.SWEEP's grid"):
        quality.run_transfer(out, 2, (1, 1, 1), {"weights": (1, 0.3, 1)}, "xq", train, evals)
    quality.run_all(out, 2, (1, 1, 1), {}, "data", train, fake_eval)
    calls.clear()
    quality.run_transfer(out, 2, (1, 1, 1), {"weights": (1, 0.3, 1)}, "xq", train, evals)
    assert calls == [("ours 0", (1, 0.3, 1)), ("ours 0", [1, 0.5, 1]), ("ours 1", (1, 0.3, 1)), ("ours 1", [1, 0.5, 1])]
    text = quality.transfer_table(res, "XQ")
    assert "ours: all - " in text and "ours: tuned all - " in text
    best = max(("dense", "sparse", "multi-vector"), key=lambda row: np.mean([r["per_query_ndcg10"][row] for r in res]))
    bound = np.mean([r["best on test"]["nDCG@10"] for r in res]) - np.mean([r["rows"][best]["nDCG@10"] for r in res])
    assert f"ours: best on test - {best} {bound:+.4f}  (each seed's" in text
