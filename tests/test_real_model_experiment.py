"""experiments/real_model.py: its statistics (experiments/group_stats.py) against brute-force
enumeration of the sample subsets, and its --quick run (tiny random model, real GSM8K files) end to
end: the report's keys and the orderings that must hold."""
import itertools
import json
import random
import sys
from pathlib import Path

import pytest

from conftest import SHARED, requires_shared

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import group_stats as gs  # noqa: E402
import real_model as rm  # noqa: E402


def subsets(n, c, k):
    """Every k-subset of n samples of which the first c are right, as lists of rewards."""
    rewards = [1] * c + [0] * (n - c)
    return [[rewards[i] for i in idx] for idx in itertools.combinations(range(n), k)]


def test_statistics_match_enumeration():
    n, k = 6, 2
    rng = random.Random(0)
    for _ in range(20):
        counts = [rng.randint(0, n) for _ in range(3)]
        groups = [subsets(n, c, k) for c in counts]
        for c, g in zip(counts, groups):
            wrong, right = gs.all_same_prob(n, c, k)
            assert wrong == pytest.approx(sum(not any(s) for s in g) / len(g))
            assert right == pytest.approx(sum(all(s) for s in g) / len(g))
        draws = list(itertools.product(*groups))  # one k-subset per expert
        pooled = [sum(d, []) for d in draws]
        assert gs.mix_coverage(counts, n, k) == pytest.approx(
            sum(any(p) for p in pooled) / len(pooled))
        assert gs.mix_zero_signal(counts, n, k) == pytest.approx(
            sum(len(set(p)) == 1 for p in pooled) / len(pooled))


def row(i, counts, n, first=None):
    names = ["a", "b", "c"]
    return {"id": str(i), "index": i, "correct": dict(zip(names, counts)),
            "first_k": dict(zip(names, first or counts)), "marker": dict.fromkeys(names, n),
            "tokens": dict.fromkeys(names, 10 * n), "truncated": dict.fromkeys(names, 0)}


def test_coverage_and_cross_fitting():
    n, k, names = 6, 2, ["a", "b", "c"]
    # expert b is best on the even questions, c on the odd ones: each half is scored with the other
    # half's choice
    rows = [row(0, [0, 3, 0], n), row(1, [0, 0, 1], n), row(2, [0, 4, 0], n), row(3, [0, 0, 2], n)]
    cov = gs.coverage_stats(rows, names, n, k)
    assert cov["cross_fitted_choice"] == ["c", "b"]
    # b scores nothing on the odd half, c nothing on the even one
    assert cov["cross_fitted_coverage"] == 0.0
    assert cov["single"] == {"a": 0.0, "b": 0.5, "c": 0.5} and cov["oracle_best"] == "b"
    expected = sum(gs.mix_coverage(list(r["correct"].values()), n, k) for r in rows) / 4
    assert cov["mix"] == pytest.approx(expected)
    assert sum(cov["realized"].values()) == 4
    s = gs.expert_stats(rows, "b", n, k)
    assert s["pass@1"] == pytest.approx((3 + 4) / n / 4) and s["pass@6"] == 0.5
    assert s["format_rate"] == 1.0 and s["mean_len"] == 10


@requires_shared
def test_quick_run(tmp_path):
    rep = rm.main(rm.Config(quick=True, data_dir=str(SHARED), run_dir=str(tmp_path / "run"),
                            out=str(tmp_path / "report")))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["questions"] == rep["questions"] == 2
    assert (tmp_path / "report.md").read_text().startswith("GSM8K test, 2 held-out questions")
    n, k = rep["samples_per_expert"], rep["group"]
    assert set(rep["experts"]) == {"rationale", "equations", "program"}
    for s in rep["experts"].values():
        assert 0 <= s["pass@1"] <= s[f"pass@{k}"] <= s[f"pass@{n}"] <= 1
        assert s[f"zero_signal@{k}"] == pytest.approx(s[f"all_wrong@{k}"] + s[f"all_right@{k}"])
        assert 0 < s["mean_len"] <= rep["config"]["max_new_tokens"]
    cov = rep["coverage"]
    assert cov["budget"] == 3 * k
    for e, s in rep["experts"].items():
        assert cov["single"][e] == s[f"pass@{n}"] >= s[f"pass@{k}"]
    assert cov["oracle_best_coverage"] >= cov["cross_fitted_coverage"]
    assert set(rep["greedy_after_mef"]["experts"]) == set(rep["experts"])
    lines = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # a rerun finds every phase done and writes the same report
    again = rm.main(rm.Config(quick=True, data_dir=str(SHARED), run_dir=str(tmp_path / "run"),
                              out=str(tmp_path / "report2")))
    assert again["experts"] == rep["experts"] and again["coverage"] == cov
