"""data/mathqa.py: MathQA (Amini et al. 2019), five-option math word problems with operation
programs.

Splits: the official `dev` (4475) is our training split because it carries rationales and programs
(the official `train.json` does too, and is read as split `train` if you download the full archive);
`test` (2985) is the evaluation split; `challenge_test` (604) is available as well.

The question shown to the model is the problem followed by its options, so it is self-contained:
    a shopkeeper sold ... ?
    Options: (a) 38, (b) 27.675, (c) 30, (d) data inadequate, (e) none of these
Symbols garbled in the release (`ã —` for ×) are repaired by `fix_mojibake` (about 90% of them).
The gold answer is the letter with its option text, `(a) 38`; verify.py accepts `Answer: (a)` (or
the option text). Options come in two forms in the files ("a ) 38 , b ) ..." and a Python-list
string, sometimes with the prefix doubled, "a ) a ) 3"); `parse_options` reads both.

Experts (all end with the line `Answer: (x)`):
- `rationale`: the human rationale (quotes stripped, a trailing "answer : c" clause moved to the
  final line). 15 of 7460 dev+test rationales name a different letter than `correct` (label noise
  or elimination talk); they get no rationale trace, since such a trace would teach a wrong
  conclusion.
- `program`: the `annotated_formula` program executed step by step (data/mathqa_program.py), one
  line per operation with its value, then the option its result is closest to.
- `formula`: the same program as one infix expression and its value: compact, no intermediate
  values.
The two program experts exist only where the program runs and its value lands closest to the correct
option, within 5%: 68.4% of dev, 66.7% of test. The programs are noisy annotations: in most of the
rest they compute something else (a wrong operand, a missing step), so no honest trace can be built.
"""

import ast
import math
import re

from verify import check

from .common import DataError, Expert, Record, Source, read_json_array, require
from .mathqa_program import Node, evaluate, fmt, infix, parse_program, steps

_ZIP = "https://math-qa.github.io/math-QA/data/MathQA.zip"
SOURCES = {
    "train": Source("train.json", _ZIP, None, "train.json",
                    "MathQA official train (29837, from MathQA.zip)"),
    "dev": Source("dev.json", _ZIP,
                  "aeca12424fc8f32d0e35c09b7738986a446c12f110c8071f3cc8913712f04bf3",
                  "dev.json", "MathQA dev (4475, from MathQA.zip)"),
    "test": Source("test.json", _ZIP,
                   "dfe7bc4691caf26842ccd4cf14e8f978327bab4f2989e0b076a4e6b38a9371d1",
                   "test.json", "MathQA test (2985, from MathQA.zip)"),
    "challenge_test": Source("challenge_test.json", _ZIP,
                             "76cfe1091d19c61a95abc8cca23dfde9e1690bdb6a0b42a35453193483253579",
                             "challenge_test.json", "MathQA challenge test (604)"),
}
KEYS = ("Problem", "Rationale", "options", "correct", "annotated_formula")
LETTERS = "abcde"

_FINAL = "End with a final line 'Answer: (x)' where x is the letter of the correct option."
EXPERTS = [
    Expert("rationale", "You solve multiple-choice math problems. Explain your reasoning briefly "
           "in plain words. " + _FINAL,
           description="the dataset's human rationale"),
    Expert("program", "You solve multiple-choice math problems by writing the calculation as "
           "numbered steps, one operation per line with its value, then name the closest "
           "option. " + _FINAL,
           description="the annotated_formula program executed step by step"),
    Expert("formula", "You solve multiple-choice math problems by writing a single formula that "
           "computes the answer and its value, then name the closest option. " + _FINAL,
           description="the program as one infix formula with its value"),
]

# the relative gap allowed between a program's value and its option (options are rounded)
_TOLERANCE = 0.05


def load(split: str, data_dir: str | None = None) -> list[Record]:
    if split not in SOURCES:
        raise ValueError(f"mathqa has splits {list(SOURCES)}, not {split!r}")
    path = require("mathqa", SOURCES[split], data_dir)
    records = []
    for i, row in enumerate(read_json_array(path, KEYS, types={"Problem": str, "options": str})):
        options = parse_options(fix_mojibake(row["options"]))
        letter = str(row["correct"]).strip().lower()
        if len(options) != 5 or letter not in LETTERS:
            raise DataError(f"{path}: record [{i}]: "
                            "cannot read five options a-e and a correct letter")
        question = (fix_mojibake(row["Problem"]).strip() + "\nOptions: "
                    + ", ".join(f"({k}) {v}" for k, v in zip(LETTERS, options)))
        answer = f"({letter}) {options[LETTERS.index(letter)]}"
        traces = {}
        rationale = rationale_trace(fix_mojibake(row["Rationale"]), letter)
        if rationale is not None:
            traces["rationale"] = rationale
        traces.update(program_traces(row["annotated_formula"], options, letter))
        meta = {"options": options, "correct": letter, "category": row.get("category", ""),
                "formula": row["annotated_formula"]}
        records.append(Record(f"mathqa-{split}-{i}", question, answer, traces, meta))
    return records


def fix_mojibake(text: str) -> str:
    """`100 ã — 5` -> `100 × 5`: the files hold UTF-8 symbols decoded as cp1252 and lowercased,
    with spaces between the pieces (× ÷ − – √ ’ ⇒ ...). Re-encode each piece; leave what does not
    decode."""

    def repair(m: re.Match) -> str:
        # ã is a lowercased Ã: restored before re-encoding
        lead, rest = ("â", m.group(1) + m.group(2)) if m.group(1) else ("Ã", m.group(3))
        try:
            return (lead + rest).encode("cp1252").decode("utf-8")
        except UnicodeError:
            return m.group(0)

    return re.sub(r"â (\S) (\S)|ã (\S)", repair, text)


def parse_options(text: str) -> list[str]:
    """`"a ) 38 , b ) 27.675 , ..."` or `"['a ) 38', 'b ) 27.675', ...]"` -> ['38', '27.675',
    ...]."""
    text = text.strip()
    items = None
    if text.startswith("["):
        try:
            items = [str(x) for x in ast.literal_eval(text)]
        except (ValueError, SyntaxError):
            text = text.strip("[]").replace("'", "")
    if items is None:
        items = re.split(r"\s*,\s*(?=[a-e]\s*\))", text)
    out = []
    for letter, item in zip(LETTERS, items):
        while re.match(rf"\s*{letter}\s*\)", item):  # the prefix, sometimes doubled
            item = re.sub(rf"^\s*{letter}\s*\)\s*", "", item, count=1)
        out.append(item.strip())
    return out if len(items) == 5 else []


_ANSWER_CLAUSE = re.compile(
    r"[\s.,;:-]*(?:hence|so|therefore|thus|ans)?[\s,]*(?:the\s+)?(?:correct\s+|final\s+|right\s+)?"
    r"(?:answer|option|choice|ans)\s*(?:is|will be|should be|would be)?\s*[:=]?\s*"
    r"(?:option\s*|choice\s*)?"
    r"\(?\s*[a-e]\s*\)?\s*[.!]*\s*$",
    re.IGNORECASE,
)


def rationale_trace(rationale: str, letter: str) -> str | None:
    """The rationale with its closing answer clause moved to a final `Answer: (x)` line; None when
    the rationale itself states a different option than `letter` (so the trace would contradict)."""
    text = rationale.strip().strip('"').strip()
    text = _ANSWER_CLAUSE.sub("", text).strip() or text
    trace = f"{text}\nAnswer: ({letter})"
    return trace if check("mathqa", trace, letter)[0] == 1.0 else None


def option_value(text: str) -> float | None:
    """The number an option stands for: `rs . 1,200` -> 1200, `13 1 / 2` -> 13.5,
    `4 π` -> 12.566..., `9 : 8` -> 1.125."""
    s = text.lower().replace(",", "") if re.search(r"\d,\d{3}", text) else text.lower()
    s = s.replace("–", "-").replace("−", "-")
    ratio = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*", s)
    if ratio:  # "9 : 8" is the number 9/8, which is what the programs compute
        return float(ratio.group(1)) / float(ratio.group(2)) if float(ratio.group(2)) else None
    m = re.search(r"(-\s*)?(\d+(?:\.\d+)?)(?:\s+(\d+)\s*/\s*(\d+)|\s*/\s*(\d+(?:\.\d+)?))?", s)
    if m is None:
        return None
    value = float(m.group(2))
    if m.group(3):  # a mixed number "13 1 / 2"
        value += float(m.group(3)) / float(m.group(4)) if float(m.group(4)) else 0.0
    elif m.group(5):
        value = value / float(m.group(5)) if float(m.group(5)) else math.inf
    if "π" in s[m.end() : m.end() + 3]:
        value *= math.pi
    return -value if m.group(1) else value


def closest_option(value: float, options: list[str]) -> int | None:
    """Index of the option whose number is closest to value, if within the tolerance."""
    scored = [(abs(v - value), i) for i, v in enumerate(map(option_value, options))
              if v is not None and math.isfinite(v)]
    if not scored:
        return None
    gap, best = min(scored)
    return best if gap <= _TOLERANCE * max(abs(value), 1e-9) + 1e-6 else None


def program_traces(formula: str, options: list[str], letter: str) -> dict[str, str]:
    """{'program': ..., 'formula': ...}, or {} when the program fails or points at another
    option."""
    tree: Node | None = parse_program(formula)
    value = evaluate(tree) if tree is not None else None
    if value is None or closest_option(value, options) != LETTERS.index(letter):
        return {}
    ending = f"Closest option: ({letter}) {options[LETTERS.index(letter)]}\nAnswer: ({letter})"
    lines = [f"{k}) {line}" for k, line in enumerate(steps(tree), 1)]
    return {
        "program": "\n".join(lines) + "\n" + ending,
        "formula": f"{infix(tree)} = {fmt(value)}\n{ending}",
    }
