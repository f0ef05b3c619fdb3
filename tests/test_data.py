"""Tests for data/ on the real files in ../shared/data (skipped when that folder is absent): every
reference trace of every expert verifies against its record's gold answer and fails against a
perturbed one; plus the interface, the error messages and the MathQA/StrategyQA helpers."""

import json
import os

import pytest

import data
import verify
from data import mathqa, strategyqa
from data.mathqa_program import OPS, evaluate, infix, parse_program, steps

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA_DIR), reason="../shared/data is absent")

REAL = [("gsm8k", "train"), ("gsm8k", "test"), ("mathqa", "dev"), ("mathqa", "test"),
        ("strategyqa", "train"), ("strategyqa", "dev"), ("math500", "test")]
SIZES = {("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319, ("mathqa", "dev"): 4475,
         ("mathqa", "test"): 2985, ("strategyqa", "train"): 2061, ("strategyqa", "dev"): 229,
         ("math500", "test"): 500}
_cache: dict = {}


def load(task, split):
    if (task, split) not in _cache:
        _cache[task, split] = data.load(task, split, DATA_DIR)
    return _cache[task, split]


def perturbed_gold(task: str, record) -> str:
    """A wrong gold answer of the same form."""
    if task == "gsm8k":
        return str(int(record.answer) + 1)
    if task == "mathqa":
        other = "abcde"[("abcde".index(record.meta["correct"]) + 1) % 5]
        return f"({other}) {record.meta['options']['abcde'.index(other)]}"
    if task == "strategyqa":
        return "no" if record.answer == "yes" else "yes"
    return record.answer + "1"  # math500: a different expression


def perturbed_trace(task: str, trace: str, record) -> str:
    """The same trace with its final answer line replaced by a wrong one."""
    head = trace.rsplit("\n", 1)[0] if "\n" in trace else ""
    wrong = perturbed_gold(task, record)
    last = {"gsm8k": f"#### {wrong}", "mathqa": f"Answer: {wrong[:3]}",
            "strategyqa": f"Answer: {wrong}"}
    if task == "math500":
        boxed = verify.boxed_contents(trace)[-1]
        return trace.replace(f"\\boxed{{{boxed}}}", f"\\boxed{{{wrong}}}")
    return f"{head}\n{last[task]}"


@needs_data
@pytest.mark.parametrize("task,split", REAL)
def test_every_gold_trace_verifies_and_a_perturbed_answer_does_not(task, split):
    records = load(task, split)
    assert len(records) == SIZES[task, split]
    assert len({r.id for r in records}) == len(records)
    failures, n = [], 0
    for r in records:
        wrong_gold = perturbed_gold(task, r)
        for name, trace in r.traces.items():
            n += 1
            if verify.reward(task, trace, r.answer) != 1.0:
                failures.append(f"{r.id}/{name}: gold trace scored 0")
            if verify.reward(task, trace, wrong_gold) != 0.0:
                failures.append(f"{r.id}/{name}: scored 1 against the wrong gold {wrong_gold!r}")
            if verify.reward(task, perturbed_trace(task, trace, r), r.answer) != 0.0:
                failures.append(f"{r.id}/{name}: a trace with a wrong final answer scored 1")
    assert not failures, failures[:10]
    coverage = {e.name: sum(e.name in r.traces for r in records) / len(records)
                for e in data.experts(task)}
    print(f"\n{task}/{split}: {len(records)} records, {n} traces, coverage " +
          ", ".join(f"{k} {v:.1%}" for k, v in coverage.items()))


@needs_data
@pytest.mark.parametrize("task,split,minimum", [
    ("gsm8k", "train", {"rationale": 1.0, "equations": 0.98, "program": 0.98}),
    ("mathqa", "dev", {"rationale": 0.99, "program": 0.6, "formula": 0.6}),
    ("strategyqa", "train", {"facts": 1.0, "decompose": 1.0, "term": 1.0}),
])
def test_expert_coverage_is_as_documented(task, split, minimum):
    records = load(task, split)
    for name, low in minimum.items():
        assert sum(name in r.traces for r in records) / len(records) >= low, name


@needs_data
def test_questions_are_self_contained_and_answers_in_checker_form():
    r = load("mathqa", "test")[0]
    assert r.question.endswith("Options: (a) 38, (b) 27.675, (c) 30, (d) data inadequate, "
                               "(e) none of these")
    assert r.answer == "(a) 38"
    assert load("gsm8k", "test")[0].answer == "18"
    assert {r.answer for r in load("strategyqa", "dev")} == {"yes", "no"}
    assert load("math500", "test")[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_interface_tasks_splits_and_experts():
    assert set(data.TASKS) == set(data.SPLITS) == set(verify.TASKS)
    for task in data.TASKS:
        experts = data.experts(task)
        assert len(experts) >= 3
        assert (len({e.name for e in experts}) == len({e.system_prompt for e in experts})
                == len(experts))
        assert all(e.source == "gold" for e in experts)
    chosen = data.experts("gsm8k", ["program", "rationale"])
    assert [e.name for e in chosen] == ["program", "rationale"]
    with pytest.raises(ValueError):
        data.experts("gsm8k", ["nope"])
    with pytest.raises(ValueError, match="evaluation only"):
        data.load("math500", None, DATA_DIR)
    with pytest.raises(ValueError, match="unknown task"):
        data.load("gsm9k", "train")
    with pytest.raises(ValueError, match="splits"):
        data.load("gsm8k", "dev", DATA_DIR)


@pytest.mark.parametrize("task", ["gsm8k", "mathqa", "strategyqa", "math500"])
def test_missing_file_error_names_file_source_and_command(task, tmp_path):
    with pytest.raises(data.MissingDataError) as e:
        data.load(task, data.SPLITS[task].eval, str(tmp_path))
    message = str(e.value)
    source = getattr(data, task).SOURCES[data.SPLITS[task].eval]
    assert str(tmp_path / task / source.file) in message
    assert source.url in message
    assert f"python -m data download {task} --data-dir {tmp_path}" in message


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    path = tmp_path / "gsm8k" / "test.jsonl"
    good = json.dumps({"question": "q?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"})
    path.write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(data.DataError, match=r"test\.jsonl:3: not valid JSON"):
        data.load("gsm8k", "test", str(tmp_path))
    path.write_text(good + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(data.DataError, match=r"test\.jsonl:2: missing key\(s\) 'answer'"):
        data.load("gsm8k", "test", str(tmp_path))
    path.write_text(good + "\n" + json.dumps({"question": "q", "answer": "no final"}) + "\n")
    with pytest.raises(data.DataError, match=r"test\.jsonl:2: answer has no"):
        data.load("gsm8k", "test", str(tmp_path))


def test_malformed_json_array_names_record_index_or_line(tmp_path):
    (tmp_path / "strategyqa").mkdir()
    path = tmp_path / "strategyqa" / "dev.json"
    row = {"qid": "x", "question": "Is it?", "answer": True, "facts": ["f"],
           "decomposition": ["Is it?"]}
    path.write_text(json.dumps([row, {"qid": "y"}]))
    with pytest.raises(data.DataError, match=r"dev\.json: record \[1\]: missing key"):
        data.load("strategyqa", "dev", str(tmp_path))
    path.write_text("[\n" + json.dumps(row) + ",\n{oops}\n]")
    with pytest.raises(data.DataError, match=r"dev\.json:3:"):
        data.load("strategyqa", "dev", str(tmp_path))
    path.write_text(json.dumps(row))
    with pytest.raises(data.DataError, match="expected a JSON array"):
        data.load("strategyqa", "dev", str(tmp_path))
    path.write_text(json.dumps([row]))
    assert data.load("strategyqa", "dev", str(tmp_path))[0].traces["facts"] == "f\nAnswer: yes"


def test_mathqa_options_in_both_forms_and_doubled_prefixes():
    want = ["38", "27.675", "30", "data inadequate", "none of these"]
    plain = "a ) 38 , b ) 27.675 , c ) 30 , d ) data inadequate , e ) none of these"
    assert mathqa.parse_options(plain) == want
    listed = "['a ) 38', 'b ) 27.675', 'c ) 30', 'd ) data inadequate', 'e ) none of these']"
    assert mathqa.parse_options(listed) == want
    doubled = "a ) a ) 10,700 , b ) b ) 16,000 , c ) c ) 1 , d ) d ) 2 , e ) e ) 3"
    assert mathqa.parse_options(doubled)[:2] == ["10,700", "16,000"]
    assert mathqa.parse_options("a ) 1 , b ) 2") == []
    assert mathqa.option_value("rs . 1,200") == 1200 and mathqa.option_value("13 1 / 2") == 13.5
    assert mathqa.option_value("9 : 8") == 1.125 and mathqa.option_value("none of these") is None
    assert mathqa.fix_mojibake("100 ã — 5 â ˆ ’ 3") == "100 × 5 − 3"


def test_mathqa_program_runs_and_prints():
    tree = parse_program("subtract(divide(multiply(add(const_100, 31.1), const_100), "
                         "subtract(const_100, 5)), const_100)")
    assert abs(evaluate(tree) - 38) < 1e-9
    assert steps(tree) == ["100 + 31.1 = 131.1", "131.1 * 100 = 13110", "100 - 5 = 95",
                           "13110 / 95 = 138", "138 - 100 = 38"]
    assert infix(tree) == "(100 + 31.1) * 100 / (100 - 5) - 100"
    assert infix(parse_program("subtract(5, subtract(3, 1))")) == "5 - (3 - 1)"
    assert infix(parse_program("power(add(1, 2), const_2)")) == "(1 + 2) ^ 2"
    assert evaluate(parse_program("divide(1, 0)")) is None  # a failing step fails the program
    assert evaluate(parse_program("const_0_25")) == 0.25
    for bad in ["add(1, 2", "add(1)", "frobnicate(1, 2)", "add(1,2) 3", "", "n0"]:
        assert parse_program(bad) is None, bad


@needs_data
def test_mathqa_program_knows_every_listed_operation():
    with open(os.path.join(DATA_DIR, "mathqa", "operation_list.txt")) as f:
        listed = {line.strip() for line in f if line.strip()}
    assert listed <= set(OPS), listed - set(OPS)


def test_strategyqa_decomposition_answers_steps_with_the_closest_fact():
    steps_ = ["What language is used in Saint Vincent?", "Is #1 based in English?"]
    facts = ["The primary language spoken in Saint Vincent is Vincentian Creole.",
             "Vincentian Creole is English-based."]
    assert strategyqa.assign_facts(steps_, facts) == [[facts[0]], [facts[1]]]
    trace = strategyqa.decompose_trace(steps_, facts, "yes")
    assert trace.splitlines() == [f"Q1: {steps_[0]}", f"A1: {facts[0]}",
                                  f"Q2: {steps_[1]}", f"A2: {facts[1]} So yes.", "Answer: yes"]
