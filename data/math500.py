"""data/math500.py: MATH-500 (Lightman et al. 2023, the 500-problem test subset of Hendrycks' MATH),
evaluation only: its single split is `test`.

The answer is the dataset's `answer` field (LaTeX, e.g. `\\frac{9}{256}`), checked by verify.py on
the last `\\boxed{...}` of a completion. Experts here are prompts for evaluation; only `solution`
has a reference trace, the dataset's own worked solution (in the 8 solutions that box more than one
expression, the earlier boxes are unboxed, so the trace names one final answer).
"""

import re

from verify import boxed_contents

from .common import Expert, Record, Source, read_jsonl, require

SOURCES = {
    "test": Source(
        "test.jsonl",
        "https://raw.githubusercontent.com/ZubinGou/math-evaluation-harness/"
        "db77bc6bb2a17c90ed2d63e88ebd8c40a82858c5/data/math_oai/test.jsonl",
        "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
        what="MATH-500 (500 problems; the same bytes as openai/prm800k "
             "prm800k/math_splits/test.jsonl)",
    ),
}
KEYS = ("problem", "solution", "answer", "unique_id")

_FINAL = " Put the final answer, and only the final answer, in \\boxed{}."
EXPERTS = [
    Expert("solution", "You solve competition math problems. Write a clear step-by-step "
           "solution." + _FINAL,
           description="the dataset's worked solution"),
    Expert("concise", "You solve competition math problems. Be brief: give only the key steps as "
           "equations." + _FINAL,
           description="short equation-only reasoning (no reference traces)"),
    Expert("check", "You solve competition math problems. Solve it, then check the result by "
           "substituting it back or by a second method." + _FINAL,
           description="solve then verify (no reference traces)"),
]


def load(split: str, data_dir: str | None = None) -> list[Record]:
    if split not in SOURCES:
        raise ValueError(f"math500 has only the split 'test' (evaluation only), not {split!r}")
    path = require("math500", SOURCES[split], data_dir)
    records = []
    for row in read_jsonl(path, KEYS, types=dict.fromkeys(KEYS, str)):
        meta = {"subject": row.get("subject", ""), "level": row.get("level", 0)}
        traces = {"solution": solution_trace(row["solution"])}
        records.append(Record(row["unique_id"], row["problem"].strip(), row["answer"].strip(),
                              traces, meta))
    return records


def solution_trace(solution: str) -> str:
    """The solution with every `\\boxed{x}` but the last replaced by `x`."""
    boxes = list(re.finditer(r"\\boxed\s*\{", solution))
    for m in reversed(boxes[:-1]):  # right to left, so earlier offsets stay valid
        inner = boxed_contents(solution[m.start() :])[0]
        solution = solution[: m.start()] + inner + solution[m.end() + len(inner) + 1 :]
    return solution.strip()
