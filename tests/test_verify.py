"""Tests for verify.py: a table of tricky completions per task with the expected reward, and a
property test that no completion or gold string can make a checker raise (or hang)."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import verify

# (task, completion, gold, expected reward, flexible)
TABLE = [
    # gsm8k: the last `#### x`, numbers normalised and compared numerically
    ("gsm8k", "16 - 3 - 4 = 9\n#### 18", "18", 1.0, False),
    ("gsm8k", "#### 1,234", "1234", 1.0, False),  # thousands separator
    ("gsm8k", "#### 1234", "1,234", 1.0, False),  # gold with a separator
    ("gsm8k", "#### 1,000.50", "1000.5", 1.0, False),
    ("gsm8k", "#### $18.00", "18", 1.0, False),  # currency and trailing zeros
    ("gsm8k", "#### 18.", "18", 1.0, False),  # trailing period
    ("gsm8k", "#### 50%", "50", 1.0, False),  # percent sign
    ("gsm8k", "#### -3", "-3", 1.0, False),  # negative
    ("gsm8k", "#### 3", "-3", 0.0, False),  # sign matters
    ("gsm8k", "#### $-5", "-5", 1.0, False),
    ("gsm8k", "#### 0.5", "1/2", 1.0, False),  # decimal = fraction
    ("gsm8k", "#### 18.01", "18", 0.0, False),
    ("gsm8k", "####42", "42", 1.0, False),  # no space after the marker
    ("gsm8k", "#### 42 apples. Then 3 more.", "42", 1.0, False),  # text after the answer
    ("gsm8k", "#### 42\n" + "and so on. " * 34, "42", 1.0, False),  # long text after: never clipped
    # self-correction: the last counts
    ("gsm8k", "#### 17  Wait, recompute: 9 + 9 = 18\n#### 18", "18", 1.0, False),
    ("gsm8k", "#### 18  Wait, recompute\n#### 17", "18", 0.0, False),  # ... in both directions
    ("gsm8k", "#### 1 #### 2 #### 3", "3", 1.0, False),  # run-on: only the last one counts ...
    ("gsm8k", "#### 1 #### 2 #### 3", "1", 0.0, False),  # ... a hedge earns nothing from its others
    # cut after a last, empty marker
    ("gsm8k", "#### 18\nso the answer is\n#### ", "18", 0.0, False),
    ("gsm8k", "#### 7 then #### 7.0", "7", 1.0, False),  # repeated, same value
    ("gsm8k", "#### 1,5", "15", 0.0, False),  # not a thousands separator
    ("gsm8k", "So the answer is 12.", "12", 0.0, False),  # missing marker: strict 0
    ("gsm8k", "So the answer is 12.", "12", 1.0, True),  # flexible: last number
    ("gsm8k", "", "12", 0.0, True),  # empty output
    # cut at max length
    ("gsm8k", "She has 5 apples and then 3 more, so 5 + 3 =", "8", 0.0, False),
    ("gsm8k", "#### ", "0", 0.0, False),  # marker with nothing after it
    ("gsm8k", "#### 9" + "9" * 100, "9" * 101, 0.0, False),  # absurdly long numbers are not parsed
    # synthetic: exact string after the marker
    ("synthetic", "rev 765\n#### 567", "567", 1.0, False),
    ("synthetic", "#### 0567", "567", 0.0, False),
    ("synthetic", "#### 567.0", "567", 0.0, False),
    ("synthetic", "#### 567 #### 568", "567", 0.0, False),  # the last marker counts
    ("synthetic", "#### 568 #### 567", "567", 1.0, False),
    ("synthetic", "567", "567", 0.0, False),
    # mathqa: the letter, or the option text behind it
    ("mathqa", "5 ^ 4 = 625\nAnswer: (c)", "(c) 625", 1.0, False),
    ("mathqa", "Answer: C", "(c) 625", 1.0, False),  # case
    ("mathqa", "the answer is c.", "(c) 625", 1.0, False),
    ("mathqa", "Answer: (b)", "(c) 625", 0.0, False),
    ("mathqa", "Answer: 625", "(c) 625", 1.0, False),  # the option's text
    ("mathqa", "Answer: rs. 1,200", "(d) rs . 1200", 1.0, False),
    ("mathqa", "Answer: 624", "(c) 625", 0.0, False),
    # 'a' is an article here
    ("mathqa", "the answer is a prime number, so (c)", "(c) 625", 0.0, False),
    ("mathqa", "the answer is a prime number, so (c)", "(c) 625", 1.0, True),  # flexible: last (x)
    ("mathqa", "Answer: (a) Answer: (b) Answer: (c)", "(c) 625", 1.0, False),  # run-on: last counts
    ("mathqa", "Answer: (c) Answer: (b) Answer: (a)", "(c) 625", 0.0, False),  # ... whichever way
    # corrected option text
    ("mathqa", "Answer: 624\nNo, 5^4 is\nAnswer: 625", "(c) 625", 1.0, False),
    ("mathqa", "Answer: (c)\nAnswer: (c)", "c", 1.0, False),  # gold as a bare letter
    ("mathqa", "", "(c) 625", 0.0, True),
    # strategyqa: yes/no after the marker
    ("strategyqa", "Fact.\nAnswer: yes", "yes", 1.0, False),
    ("strategyqa", "Answer: Yes.", "true", 1.0, False),  # gold as a bool string
    ("strategyqa", "Answer: no", "False", 1.0, False),
    ("strategyqa", "Answer: yes", "false", 0.0, False),
    ("strategyqa", "Answer: no", "yes", 0.0, False),
    ("strategyqa", "Answer: yes\nAnswer: no", "no", 1.0, False),  # corrected: the last counts
    ("strategyqa", "Answer: no\nAnswer: yes", "no", 0.0, False),  # a hedge: only its last answer
    ("strategyqa", "I think no.", "no", 0.0, False),  # no marker
    ("strategyqa", "I think no.", "no", 1.0, True),
    ("strategyqa", "Answer: maybe", "yes", 0.0, True),
    # math500: \boxed{} with light normalisation
    ("math500", "so $\\boxed{\\dfrac{1}{2}}$.", "\\frac{1}{2}", 1.0, False),
    ("math500", "\\boxed{0.5}", "\\frac12", 1.0, False),
    ("math500", "\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)",
     1.0, False),
    ("math500", "\\boxed{90}", "90^\\circ", 1.0, False),
    ("math500", "\\boxed{5.4}", "5.4 \\text{ cents}", 1.0, False),
    ("math500", "\\boxed{11111111100}", "11,\\! 111,\\! 111,\\! 100", 1.0, False),
    ("math500", "\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", 1.0, False),
    ("math500", "\\boxed{C}", "\\text{(C)}", 1.0, False),
    ("math500", "\\boxed{x=5}", "5", 1.0, False),
    ("math500", "\\boxed{\\frac{2}{1}}", "\\frac{1}{2}", 0.0, False),
    ("math500", "\\boxed{1} and \\boxed{5}", "5", 1.0, False),  # two boxes: the last counts
    ("math500", "\\boxed{5} and \\boxed{1}", "5", 0.0, False),
    ("math500", "\\boxed{5} so \\boxed{5}", "5", 1.0, False),
    ("math500", "The answer is \\boxed{5", "5", 0.0, False),  # cut before the closing brace
    ("math500", "The answer is 5", "5", 0.0, False),
    ("math500", "\\boxed{}", "5", 0.0, False),
]


@pytest.mark.parametrize("task,completion,gold,expected,flexible", TABLE)
def test_tricky_completions_score_as_expected(task, completion, gold, expected, flexible):
    assert verify.check(task, completion, gold, flexible=flexible)[0] == expected


def test_check_returns_the_parsed_answer_for_logging():
    assert verify.check("gsm8k", "#### $1,000", "1000") == (1.0, "$1,000")
    assert verify.check("mathqa", "Answer: (B)", "(c) 1") == (0.0, "b")
    assert verify.check("strategyqa", "Answer: no", "yes") == (0.0, "no")
    # the last marker is the parsed answer
    assert verify.check("gsm8k", "#### 1 #### 2", "1") == (0.0, "2")


def test_reward_is_check_without_the_answer():
    assert verify.reward("gsm8k", "#### 3", "3") == 1.0
    assert verify.reward("gsm8k", "#### 4", "3") == 0.0


def test_unknown_task_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown task"):
        verify.reward("gsm9k", "#### 3", "3")


@pytest.mark.parametrize("bad", [None, 3, b"#### 3", ["#### 3"]])
def test_non_string_inputs_score_zero(bad):
    for task in verify.TASKS:
        assert verify.check(task, bad, "3") == (0.0, None)
        assert verify.check(task, "#### 3", bad) == (0.0, None)


def test_parse_number_forms():
    from fractions import Fraction

    cases = {"1,000.50": Fraction(2001, 2), "$18.00": 18, "-3": -3, "50%": 50, "7.": 7,
             ".5": Fraction(1, 2), "3/4": Fraction(3, 4), "1,2": None, "abc": None, "": None,
             "1/0": None}
    for text, value in cases.items():
        assert verify.parse_number(text) == value, text


# fragments that checkers look for, glued at random: more likely to hit edge cases than plain text
FRAGMENTS = ["####", "#### ", "\\boxed{", "\\fbox{", "{", "}", "\\frac", "\\left(", "\\right)",
             "\\text{", "Answer:", "answer is", "yes", "no", "(c)", "(", ")", "a", "e", "1", "0",
             "9" * 30, "1,000", ",", ".", "$", "%", "-", "/", "^\\circ", "\n", " ", "\\", "\\\\",
             "=", "x", "é", "\x00", "😀"]
adversarial = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
any_text = st.one_of(st.text(max_size=300), adversarial)


@settings(max_examples=300, deadline=None)
@given(task=st.sampled_from(verify.TASKS), completion=any_text, gold=any_text,
       flexible=st.booleans())
def test_checkers_never_raise(task, completion, gold, flexible):
    score, parsed = verify.check(task, completion, gold, flexible=flexible)
    assert score in (0.0, 1.0)
    assert parsed is None or isinstance(parsed, str)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(-10**12, 10**12), extra=st.sampled_from(["", ".", ".00", " dollars", "\n"]))
def test_any_integer_written_with_separators_is_accepted(n, extra):
    assert verify.reward("gsm8k", f"so\n#### {n:,}{extra}", str(n)) == 1.0
    assert verify.reward("gsm8k", f"#### {n + 1}", str(n)) == 0.0


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 10**6), b=st.integers(0, 10**6))
def test_only_the_last_of_two_answers_counts(a, b):
    # a corrected answer scores; a hedge earns no more than its last answer alone would
    for task in ("gsm8k", "synthetic"):
        assert verify.reward(task, f"#### {a}\n#### {b}", str(b)) == 1.0
        assert verify.reward(task, f"#### {a}\n#### {b}", str(a)) == float(a == b)
    assert verify.reward("math500", f"\\boxed{{{a}}} \\boxed{{{b}}}", str(b)) == 1.0
    assert verify.reward("math500", f"\\boxed{{{a}}} \\boxed{{{b}}}", str(a)) == float(a == b)


@pytest.mark.parametrize("text", [
    "\\boxed{" * 20000,
    "####" + " " * 100000 + "x",
    "\\boxed{5\\text{" + " " * 50000 + "!}}",
    "answer " * 20000 + "is",
    "1," * 50000,
    "{" * 50000 + "}" * 50000,
])
def test_pathological_inputs_stay_fast(text):
    start = time.time()
    for task in verify.TASKS:
        verify.check(task, text, "5", flexible=True)
    assert time.time() - start < 2.0
