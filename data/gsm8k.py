"""data/gsm8k.py: GSM8K (Cobbe et al. 2021, openai/grade-school-math), train 7473 / test 1319.

Each dataset answer is a worked solution with calculator annotations and a final line, e.g.
    Natalia sold 48/2 = <<48/2=24>>24 clips in May.
    Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.
    #### 72
Three experts are built from it with no external model, and they differ in kind:
- `rationale`: the solution in words, annotations removed (the dataset's own reasoning).
- `equations`: only the calculator annotations, one `expression = result` per line: arithmetic
  with no words, so it is short and checkable step by step.
- `program`: the same calculations as named assignments (`s2 = 48 + s1 = 72`): where an operand
  equals an earlier result (and is not a number from the question) it becomes that result's name,
  so the trace shows the data flow, like a tiny program.
All three end with `#### <answer>`, the answer as a plain integer (the gold `1,000` becomes `1000`).
Coverage: 113 of the 8792 solutions (1.3%) carry no annotation; they get no `equations` / `program`
trace (consumers fall back to `rationale`, see data/common.py).
"""

import re

from verify import parse_number

from .common import DataError, Expert, Record, Source, read_jsonl, require

_BASE = ("https://raw.githubusercontent.com/openai/grade-school-math/"
         "3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/")
SOURCES = {
    "train": Source("train.jsonl", _BASE + "train.jsonl",
                    "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
                    what="GSM8K train (7473 problems)"),
    "test": Source("test.jsonl", _BASE + "test.jsonl",
                   "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
                   what="GSM8K test (1319 problems)"),
}

_FINAL = "End with a final line of the form '#### <number>', the number alone."
EXPERTS = [
    Expert("rationale", "You solve grade-school math word problems. Reason in short plain "
           "sentences, one step per line. " + _FINAL,
           description="the dataset's worked solution in words"),
    Expert("equations", "You solve math word problems with a chain of equations only: one "
           "calculation per line, written as 'expression = result', no words. " + _FINAL,
           description="the calculator annotations as an equation chain"),
    Expert("program", "You solve math word problems as a tiny program: name each intermediate "
           "result (s1, s2, ...) and compute it from numbers in the problem or earlier names, "
           "one assignment per line as 'name = expression = value'. " + _FINAL,
           description="the calculations as named assignments showing the data flow"),
]

_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


def load(split: str, data_dir: str | None = None) -> list[Record]:
    if split not in SOURCES:
        raise ValueError(f"gsm8k has splits {list(SOURCES)}, not {split!r}")
    path = require("gsm8k", SOURCES[split], data_dir)
    records = []
    for i, row in enumerate(read_jsonl(path, ("question", "answer"),
                                       types={"question": str, "answer": str})):
        solution, _, final = row["answer"].rpartition("####")
        value = parse_number(final)
        if value is None or not solution:
            raise DataError(f"{path}:{i + 1}: answer has no '#### <number>' final line")
        answer = str(value)
        traces = {"rationale": rationale_trace(solution, answer)}
        steps = annotations(solution)
        if steps:
            traces["equations"] = equations_trace(steps, answer)
            traces["program"] = program_trace(steps, row["question"], answer)
        records.append(Record(f"gsm8k-{split}-{i}", row["question"].strip(), answer, traces))
    return records


def annotations(solution: str) -> list[tuple[str, str]]:
    """[(expression, result)] from the `<<expression=result>>` calculator annotations, in order."""
    return [(expr.strip(), result.strip()) for expr, result in _ANNOTATION.findall(solution)]


def rationale_trace(solution: str, answer: str) -> str:
    text = _ANNOTATION.sub("", solution).strip()
    return f"{text}\n#### {answer}"


def _spaced(expr: str) -> str:
    """`48+24*2` -> `48 + 24 * 2`: operators spaced so each number stands alone."""
    return re.sub(r"\s*([-+*/])\s*", r" \1 ", expr).replace("( ", "(").replace(" )", ")").strip()


def equations_trace(steps: list[tuple[str, str]], answer: str) -> str:
    lines = [f"{_spaced(expr)} = {result}" for expr, result in steps]
    return "\n".join(lines) + f"\n#### {answer}"


def program_trace(steps: list[tuple[str, str]], question: str, answer: str) -> str:
    given = set(re.findall(r"\d+(?:\.\d+)?", question.replace(",", "")))
    names: dict[str, str] = {}  # result text -> latest name holding it
    lines = []
    for k, (expr, result) in enumerate(steps, 1):
        def name_of(m: re.Match) -> str:
            number = m.group()
            return names[number] if number in names and number not in given else number

        body = re.sub(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", name_of, _spaced(expr))
        lines.append(f"s{k} = {body} = {result}")
        names[result] = f"s{k}"
    return "\n".join(lines) + f"\n#### {answer}"
