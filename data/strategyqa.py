"""data/strategyqa.py: StrategyQA (Geva et al. 2021), yes/no questions that need implicit
multi-step reasoning. Splits: the authors' `train` (2061) / `dev` (229) split of the 2290 labelled
questions (the 490 test labels are hidden, so `dev` is the evaluation split).

Each record carries `facts` (the evidence sentences a person wrote) and a `decomposition` into
sub-questions, which give three experts of different kinds (all end with `Answer: yes` /
`Answer: no`):
- `facts`: the facts, one per line, then the answer: evidence first, conclusion last.
- `decompose`: the sub-questions asked and answered in turn (`Q1:` / `A1:` ...). The dataset has no
  answers to the sub-questions, so each fact answers the sub-question it shares the most content
  words with; a step that no fact matches is asked and left unanswered (the next steps use it as
  #k), and the last step (which is the question itself, reworded) is answered with the gold yes/no.
- `term`: entity first and short: the key term with its description and the one fact closest to the
  question, then the answer.
"""

import re

from .common import Expert, Record, Source, read_json_array, require

_BASE = ("https://raw.githubusercontent.com/eladsegal/strategyqa/"
         "1ba1e97452e189569357876f2854b01357ffbe37/data/strategyqa/")
SOURCES = {
    "train": Source("train.json", _BASE + "train.json",
                    "0f72560b8a6fad3db847d2f1a7524fb087297843bb45a8d3245ffd68cbe0de12",
                    what="StrategyQA train (2061 labelled questions)"),
    "dev": Source("dev.json", _BASE + "dev.json",
                  "0d94842ffb022db8fd5ecd2168b785d5cf67f6faf64f665476bad544a3eb9dde",
                  what="StrategyQA dev (229 labelled questions)"),
}
KEYS = ("qid", "question", "answer", "facts", "decomposition")

_TASK = "You answer yes/no questions that need several steps of world knowledge. "
_FINAL = " End with a final line 'Answer: yes' or 'Answer: no'."
EXPERTS = [
    Expert("facts", _TASK + "First state the relevant facts, one per line, then decide." + _FINAL,
           description="the annotated facts, then the answer"),
    Expert("decompose", _TASK + "Break the question into sub-questions Q1, Q2, ... and answer each "
           "in turn as A1, A2, ...; a later sub-question may refer to an earlier answer as #1, #2."
           + _FINAL,
           description="the decomposition's sub-questions, each answered by its closest fact"),
    Expert("term", _TASK + "Name the key term with a short description, give the single most "
           "important fact, then decide." + _FINAL,
           description="key term, description and one key fact"),
]

_STOP = set("the a an of in on at to is are was were be been do does did has have had for and or "
            "with by as it its that this what which who whom how many much than from into can "
            "could would will there their they".split())


def load(split: str, data_dir: str | None = None) -> list[Record]:
    if split not in SOURCES:
        raise ValueError(f"strategyqa has splits {list(SOURCES)}, not {split!r}")
    path = require("strategyqa", SOURCES[split], data_dir)
    records = []
    for row in read_json_array(path, KEYS, types={"question": str, "answer": bool, "facts": list,
                                                  "decomposition": list}):
        answer = "yes" if row["answer"] else "no"
        facts = [f.strip() for f in row["facts"] if f and f.strip()]
        steps = [s.strip() for s in row["decomposition"] if s and s.strip()]
        traces = {"facts": facts_trace(facts, answer),
                  "decompose": decompose_trace(steps, facts, answer)}
        traces["term"] = term_trace(row.get("term", ""), row.get("description", ""),
                                    row["question"], facts, answer)
        meta = {"term": row.get("term", ""), "facts": facts, "decomposition": steps}
        records.append(Record(row["qid"], row["question"].strip(), answer, traces, meta))
    return records


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOP and len(w) > 1}


def _overlap(a: str, b: str) -> int:
    return len(content_words(a) & content_words(b))


def facts_trace(facts: list[str], answer: str) -> str:
    return "\n".join(facts + [f"Answer: {answer}"])


def assign_facts(steps: list[str], facts: list[str]) -> list[list[str]]:
    """For each sub-question, the facts that share the most content words with it (each fact goes to
    one step, ties to the earliest; a fact sharing no word goes to the last step)."""
    answers: list[list[str]] = [[] for _ in steps]
    for fact in facts:
        scores = [_overlap(step, fact) for step in steps]
        best = (max(range(len(steps)), key=lambda k: (scores[k], -k)) if max(scores) > 0
                else len(steps) - 1)
        answers[best].append(fact)
    return answers


def decompose_trace(steps: list[str], facts: list[str], answer: str) -> str:
    if not steps:
        return facts_trace(facts, answer)
    lines = []
    for k, (step, found) in enumerate(zip(steps, assign_facts(steps, facts)), 1):
        lines.append(f"Q{k}: {step}")
        if k == len(steps):
            lines.append(f"A{k}: " + " ".join(found + [f"So {answer}."]))
        elif found:
            lines.append(f"A{k}: " + " ".join(found))
    return "\n".join(lines + [f"Answer: {answer}"])


def term_trace(term: str, description: str, question: str, facts: list[str], answer: str) -> str:
    lines = ([f"Key term: {term} ({description})." if description else f"Key term: {term}."]
             if term else [])
    if facts:
        key = max(facts, key=lambda f: (_overlap(question, f), -facts.index(f)))
        lines.append(f"Key fact: {key}")
    return "\n".join(lines + [f"Answer: {answer}"])
