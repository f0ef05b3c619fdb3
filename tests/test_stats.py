"""experiments/stats.py against published values and naive enumerations."""
import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from stats import fisher_greater, holm, wilson  # noqa: E402


def test_fisher_greater_is_fishers_tea_tasting_value_and_a_brute_force_tail():
    # R: fisher.test(matrix(c(3, 1, 1, 3), 2), alternative = "greater")$p.value = 0.2428571
    assert fisher_greater(3, 4, 1, 4) == pytest.approx(0.2428571, abs=1e-7)
    # naive: every way to choose which of the 9 units are a's 4, with the 5 successes fixed
    successes, n_a = [1] * 5 + [0] * 4, 4
    draws = list(itertools.combinations(range(9), n_a))
    for a in range(0, 5):
        tail = sum(sum(successes[i] for i in d) >= a for d in draws) / len(draws)
        assert fisher_greater(a, n_a, 5 - a, 5) == pytest.approx(tail)
    assert fisher_greater(0, 300, 0, 300) == 1.0
    assert fisher_greater(43, 300, 1, 300) < 1e-9


def test_holm_multiplies_the_ith_smallest_by_m_minus_i_and_stays_monotone():
    # statsmodels multipletests([.01, .04, .03, .005], method="holm"): .03 .06 .06 .02
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert adj == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02})
    assert holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}


def test_wilson_matches_published_intervals():
    # Newcombe (1998), table I: 0/10 -> 0 to 0.2775; 81/263 -> 0.2553 to 0.3662
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)


def test_sign_flip_counts_the_sign_patterns_as_extreme_as_the_data():
    from stats import sign_flip
    # all four positive: only all-plus and all-minus reach |sum| 10 of 16 patterns
    assert sign_flip([1, 2, 3, 4]) == pytest.approx(2 / 16)
    # [1, -1]: every pattern has |sum| 0 or 2 >= 0
    assert sign_flip([1, -1]) == 1.0
    # naive: the same by listing the patterns with itertools
    diffs = [3.0, -1.0, 2.5, 0.5, 4.0]
    pats = list(itertools.product((1, -1), repeat=5))
    naive = sum(abs(sum(s * d for s, d in zip(p, diffs))) >= abs(sum(diffs)) for p in pats)
    assert sign_flip(diffs) == pytest.approx(naive / 32)


def test_t975_matches_the_table_beyond_the_exact_part():
    from stats import t975
    for df, t in ((1, 12.706), (9, 2.262), (10, 2.228), (20, 2.086), (30, 2.042), (120, 1.980)):
        assert t975(df) == pytest.approx(t, abs=2e-3)


def test_ols_and_its_prediction_interval_against_numpy():
    np = pytest.importorskip("numpy")
    from stats import ols, predict, r2
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 12)
    y = 0.3 + 2.0 * x + rng.normal(0, 0.1, 12)
    fit = ols(list(x), list(y))
    b, a = np.polyfit(x, y, 1)
    assert (fit["a"], fit["b"]) == pytest.approx((a, b))
    resid = y - (a + b * x)
    assert fit["r2"] == pytest.approx(1 - (resid ** 2).sum() / ((y - y.mean()) ** 2).sum())
    # the textbook interval: s sqrt(1 + 1/n + (x0 - xbar)^2 / Sxx), t with n - 2 = 10 df
    s = np.sqrt((resid ** 2).sum() / 10)
    x0 = 0.9
    half = 2.228 * s * np.sqrt(1 + 1 / 12 + (x0 - x.mean()) ** 2 / ((x - x.mean()) ** 2).sum())
    yhat, lo, hi = predict(fit, x0)
    assert yhat == pytest.approx(a + b * x0) and (hi - lo) / 2 == pytest.approx(half, rel=1e-3)
    assert r2(fit, list(x), list(y)) == pytest.approx(fit["r2"])
