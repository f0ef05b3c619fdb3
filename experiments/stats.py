"""
experiments/stats.py: the few tests the studies report, written out so a reader can check them.

- fisher_greater: one-sided Fisher exact test that a's success rate exceeds b's (2x2 table,
  hypergeometric tail: P(X >= a) for X ~ Hypergeom(N = n_a + n_b, K = a + b, n = n_a)).
- holm: Holm's step-down adjustment of several p-values (family-wise error control).
- wilson: the Wilson score 95% interval of a proportion (Wilson 1927).
- sign_flip: the exact paired permutation test of a mean difference (Fisher 1935).
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
