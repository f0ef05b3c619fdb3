"""
experiments/group_stats.py: what real_model.py reports, as pure functions of correct counts
(c right of n samples).

Exact expectations, not simulations: a GRPO group of k is k of the n samples drawn without
replacement, so P(all wrong) = C(n - c, k) / C(n, k) and P(all right) = C(c, k) / C(n, k)
(hypergeometric), averaged over every k-subset at once. tests/test_real_model_experiment.py checks
each against brute-force enumeration.
"""
import math

from eval import pass_at_k


def all_same_prob(n: int, c: int, k: int) -> tuple[float, float]:
    """(P(all wrong), P(all right)) for k samples drawn without replacement from n of which c
    are right."""
    return math.comb(n - c, k) / math.comb(n, k), math.comb(c, k) / math.comb(n, k)


def mix_coverage(counts: list, n: int, k: int) -> float:
    """P(>= 1 right) among k samples of each expert drawn from its n (c_e right):
    1 - prod_e P(all k wrong)."""
    return 1.0 - math.prod(all_same_prob(n, c, k)[0] for c in counts)


def mix_zero_signal(counts: list, n: int, k: int) -> float:
    """P(the pooled k samples of every expert all share one reward): all wrong or all right."""
    probs = [all_same_prob(n, c, k) for c in counts]
    return math.prod(p[0] for p in probs) + math.prod(p[1] for p in probs)


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def expert_stats(rows: list, name: str, n: int, k: int) -> dict:
    counts = [r["correct"][name] for r in rows]
    same = [all_same_prob(n, c, k) for c in counts]
    return {"pass@1": mean(c / n for c in counts),
            f"pass@{k}": mean(pass_at_k(n, c, k) for c in counts),
            f"pass@{n}": mean(float(c > 0) for c in counts),
            f"zero_signal@{k}": mean(a + b for a, b in same),
            f"all_wrong@{k}": mean(a for a, _ in same),
            f"all_right@{k}": mean(b for _, b in same),
            "format_rate": mean(r["marker"][name] / n for r in rows),
            "mean_len": mean(r["tokens"][name] / n for r in rows),
            "truncated": mean(r["truncated"][name] / n for r in rows)}


def cross_fitted_best(rows: list, names: list) -> tuple[list, list]:
    """For each half (even / odd question index) the expert with the best pass@1 on the OTHER half
    (ties: the first expert). Returns (per-question chosen expert, [choice for even half, choice for
    odd half])."""
    halves = [rows[0::2], rows[1::2]]
    choice = []
    for h in range(2):
        other = halves[1 - h]
        choice.append(max(names, key=lambda e: sum(r["correct"][e] for r in other)))
    return [choice[i % 2] for i in range(len(rows))], choice


def coverage_stats(rows: list, names: list, n: int, k: int) -> dict:
    """Equal budget: N experts x k samples vs one expert's N x k samples (n must be >= N x k for
    the latter)."""
    budget = len(names) * k
    mix = mean(mix_coverage([r["correct"][e] for e in names], n, k) for r in rows)
    single = {e: mean(pass_at_k(n, r["correct"][e], budget) for r in rows) for e in names}
    oracle = max(names, key=lambda e: single[e])
    chosen, choice = cross_fitted_best(rows, names)
    fitted = [pass_at_k(n, r["correct"][e], budget) for r, e in zip(rows, chosen)]
    out = {"budget": budget, "mix": mix, "single": single, "oracle_best": oracle,
           "oracle_best_coverage": single[oracle],
           "cross_fitted_choice": choice, "cross_fitted_coverage": mean(fitted),
           "mix_zero_signal": mean(mix_zero_signal([r["correct"][e] for e in names], n, k)
                                   for r in rows),
           "single_zero_signal": {e: mean(sum(all_same_prob(n, r["correct"][e], budget))
                                          for r in rows)
                                  for e in names}}
    if budget == n:  # the realized draw: each expert's first k samples (i.i.d.: any k would do)
        mix_hit = [any(r["first_k"][e] for e in names) for r in rows]
        one_hit = [r["correct"][e] > 0 for r, e in zip(rows, chosen)]
        out["realized"] = {"both": sum(a and b for a, b in zip(mix_hit, one_hit)),
                           "mix_only": sum(a and not b for a, b in zip(mix_hit, one_hit)),
                           "single_only": sum(b and not a for a, b in zip(mix_hit, one_hit)),
                           "neither": sum(not a and not b for a, b in zip(mix_hit, one_hit))}
    return out
