"""
experiments/stats.py: the few tests the studies report, written out so a reader can check them.

- fisher_greater: one-sided Fisher exact test that a's success rate exceeds b's (2x2 table,
  hypergeometric tail: P(X >= a) for X ~ Hypergeom(N = n_a + n_b, K = a + b, n = n_a)).
- holm: Holm's step-down adjustment of several p-values (family-wise error control).
- wilson: the Wilson score 95% interval of a proportion (Wilson 1927).
- sign_flip: the exact paired permutation test of a mean difference (Fisher 1935).
- ols, r2, predict: a straight line, its out-of-sample R^2 and 95% prediction interval.
"""
import math


def fisher_greater(a: int, n_a: int, b: int, n_b: int) -> float:
    """P-value of H1: rate a/n_a > rate b/n_b, conditioning on the a + b successes in all."""
    k, n = a + b, n_a + n_b
    total = math.comb(n, k)
    return sum(math.comb(n_a, x) * math.comb(n_b, k - x)
               for x in range(a, min(n_a, k) + 1)) / total


def holm(pvalues: dict) -> dict:
    """name -> p  ->  name -> Holm-adjusted p: the i-th smallest times (m - i), kept monotone."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[name]))
        adjusted[name] = running
    return adjusted


def wilson(correct: int, total: int, z: float = 1.959964) -> tuple:
    """The Wilson score interval (low, high) of correct / total."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def sign_flip(diffs: list) -> float:
    """Two-sided exact paired permutation p-value of mean(diffs) != 0: every sign pattern of the
    differences (2^n of them; n <= 20), the share whose |mean| is at least the observed one."""
    n, observed = len(diffs), abs(sum(diffs))
    hits = sum(abs(sum(d if (mask >> i) & 1 else -d for i, d in enumerate(diffs)))
               >= observed - 1e-12 for mask in range(2 ** n))
    return hits / 2 ** n


def t975(df: int) -> float:
    """t_{0.975, df}: exact table to df 9 (as fair_ablation's), then the Cornish-Fisher series."""
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262]
    if df <= len(table):
        return table[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def ols(xs: list, ys: list) -> dict:
    """y = a + b x by least squares: a, b, the residual sd s, n, mean x, Sxx and R^2."""
    n = len(xs)
    xm, ym = sum(xs) / n, sum(ys) / n
    sxx = sum((x - xm) ** 2 for x in xs)
    b = sum((x - xm) * (y - ym) for x, y in zip(xs, ys)) / sxx
    a = ym - b * xm
    sse = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    sst = sum((y - ym) ** 2 for y in ys)
    return {"a": a, "b": b, "s": math.sqrt(sse / (n - 2)) if n > 2 else float("nan"), "n": n,
            "x_mean": xm, "sxx": sxx, "r2": 1 - sse / sst if sst else float("nan")}


def r2(fit: dict, xs: list, ys: list) -> float:
    """Out-of-sample R^2 of a fit on new points: 1 - SSE / SS around their own mean."""
    ym = sum(ys) / len(ys)
    sse = sum((y - fit["a"] - fit["b"] * x) ** 2 for x, y in zip(xs, ys))
    return 1 - sse / sum((y - ym) ** 2 for y in ys)


def predict(fit: dict, x: float) -> tuple:
    """(y, low, high): the fit's prediction at x with its 95% prediction interval."""
    y = fit["a"] + fit["b"] * x
    half = t975(fit["n"] - 2) * fit["s"] * math.sqrt(
        1 + 1 / fit["n"] + (x - fit["x_mean"]) ** 2 / fit["sxx"])
    return y, y - half, y + half
