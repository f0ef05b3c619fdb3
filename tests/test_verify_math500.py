"""verify.py's MATH-500 checker against math-verify (Hugging Face's reference checker, used by MEL
and open-r1; a test-only dependency) on the 500 gold answers, the dataset's own solutions, and
variants of each answer: equal forms written differently, and near misses that must fail.
Prints the agreement rate and every disagreement."""

import os
import re

import pytest

import data
import verify

math_verify = pytest.importorskip("math_verify")
DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
pytestmark = pytest.mark.skipif(not os.path.isdir(DATA_DIR), reason="../shared/data is absent")


def variants(gold: str) -> list[tuple[str, str]]:
    """(kind, answer) pairs: `same` are the gold written another way, `miss` are near misses."""
    out = [("same", gold), ("same", gold.replace(" ", "")),
           ("same", gold.replace("\\frac", "\\dfrac"))]
    if "=" not in gold:
        out.append(("same", f"x = {gold}"))
    frac = re.fullmatch(r"\\frac\{(\d+)\}\{(\d+)\}", gold)
    if frac:
        num, den = frac.group(1), frac.group(2)
        out += [("same", f"{num}/{den}"), ("miss", f"\\frac{{{den}}}{{{num}}}")]
    if re.fullmatch(r"-?\d+", gold):
        out += [("same", gold + ".0"), ("miss", str(int(gold) + 1))]
    digit = re.search(r"\d", gold)
    if digit:  # change one digit
        changed = str((int(digit.group()) + 1) % 10)
        out.append(("miss", gold[: digit.start()] + changed + gold[digit.end():]))
    if gold not in ("0", "x=5"):
        out.append(("miss", gold[1:] if gold.startswith("-") else f"-({gold})"))
    out.append(("miss", f"{gold}+1"))
    return list(dict.fromkeys(out))  # without repeats (a gold with no spaces or no \\frac)


def test_math500_checker_agrees_with_math_verify(capsys):
    records = data.load("math500", "test", DATA_DIR)
    rows = []  # (kind, gold, completion, ours, theirs)
    for r in records:
        gold = math_verify.parse(f"\\boxed{{{r.answer}}}")
        completions = [("solution", r.traces["solution"])]
        completions += [(kind, f"The answer is $\\boxed{{{v}}}$.")
                        for kind, v in variants(r.answer)]
        for kind, completion in completions:
            ours = verify.reward("math500", completion, r.answer) == 1.0
            theirs = bool(math_verify.verify(gold, math_verify.parse(completion)))
            rows.append((kind, r.answer, completion, ours, theirs))
    agree = sum(ours == theirs for *_, ours, theirs in rows)
    with capsys.disabled():  # the report always shows in the test output, not only on failure
        report(rows, agree)
    assert agree / len(rows) >= 0.98
    gold_rows = [row for row in rows
                 if row[0] == "solution" or row[2] == f"The answer is $\\boxed{{{row[1]}}}$."]
    # every gold answer and solution is accepted by us
    assert all(ours for *_, ours, _ in gold_rows)


def report(rows, agree):
    print(f"\nMATH-500 agreement with math-verify: {agree}/{len(rows)} = {agree / len(rows):.2%}")
    for kind in ("solution", "same", "miss"):
        sub = [row for row in rows if row[0] == kind]
        print(f"  {kind}: {sum(o == t for *_, o, t in sub)}/{len(sub)} agree, "
              f"ours accepts {sum(o for *_, o, _ in sub)}, "
              f"math-verify accepts {sum(t for *_, t in sub)}")
    for kind, gold, completion, ours, theirs in rows:
        if ours != theirs:
            print(f"  disagree [{kind}] gold {gold!r} completion {completion[-60:]!r}: "
                  f"ours {ours}, math-verify {theirs}")
