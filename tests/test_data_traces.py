"""Tests for data/traces.py: teacher-trace files (parsing, errors with file:line, checker filtering)
and self-generated traces with a scripted fake sampler standing in for rollout.generate."""

import json
from dataclasses import dataclass, replace

import pytest

import data
from data import synthetic


def records():
    return [data.Record("q0", "2+3=?", "5", {"chain": "2+3=5\n#### 5"}),
            data.Record("q1", "4+4=?", "8", {"chain": "4+4=8\n#### 8"}),
            data.Record("q2", "1+1=?", "2", {"chain": "1+1=2\n#### 2"})]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_teacher_file_keeps_first_accepted_response_per_record(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"id": "q0", "expert": "chain", "response": "#### 6"},  # wrong: dropped
        {"id": "q0", "expert": "chain", "response": "two and three\n#### 5"},  # kept
        # accepted, but q0 already has one
        {"id": "q0", "expert": "chain", "response": "again\n#### 5"},
        {"id": "q1", "expert": "columns", "response": "#### 8"},  # another expert
        {"id": "zz", "expert": "chain", "response": "#### 1"},  # unknown id
        # the last answer (9) is wrong: dropped
        {"id": "q1", "expert": "chain", "response": "#### 8 #### 9"},
    ])
    found, stats = data.file_traces("synthetic", records(), "chain", path)
    assert found == {"q0": "two and three\n#### 5"}
    assert (stats.candidates, stats.accepted, stats.kept, stats.unknown) == (4, 2, 1, 1)
    assert stats.kept_fraction == pytest.approx(1 / 3)


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"id": "q0", "expert": "chain"}), "string fields"),
    (json.dumps(["q0", "chain", "#### 5"]), "string fields"),
    (json.dumps({"id": 3, "expert": "chain", "response": "x"}), "string fields"),
])
def test_malformed_teacher_file_names_file_and_line(tmp_path, line, message):
    good = {"id": "q0", "expert": "chain", "response": "#### 5"}
    path = write_jsonl(tmp_path / "t.jsonl", [good, "", line])
    with pytest.raises(data.DataError, match=rf"t\.jsonl:3: .*{message}"):
        data.read_teacher_traces(path)


@dataclass
class FakeRollout:
    completions: list
    finish: list


class FakeTokenizer:
    """Bytes as ids, 999 a special token that decode drops (like skip_special_tokens=True)."""

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i < 256).decode()


def fake_render_chat(tok, system, user):
    return tok.encode(f"{system}|{user}")


def scripted_generate(script):
    """A stand-in for functools.partial(rollout.generate, model): answers each prompt from a script
    keyed by question, prompt-major rows, with the stop token (999) where finish is 'stop'."""
    calls = []

    def generate(prompts, num_samples=1, max_new_tokens=256, temperature=1.0, **kwargs):
        calls.append((len(prompts), num_samples, max_new_tokens, temperature, kwargs))
        completions, finish = [], []
        for p in prompts:
            question = bytes(p).decode().split("|")[1]
            for text, how in script[question][:num_samples]:
                completions.append(list(text.encode()) + ([999] if how == "stop" else []))
                finish.append(how)
        return FakeRollout(completions, finish)

    return generate, calls


def test_self_traces_keep_checked_stopped_samples():
    script = {
        # 2 accepted, first kept
        "2+3=?": [("#### 4", "stop"), ("2+3=5\n#### 5", "stop"), ("#### 5", "stop")],
        # cut at max length: dropped
        "4+4=?": [("4+4=8\n#### 8", "length"), ("#### 9", "stop"), ("", "stop")],
        "1+1=?": [("#### 2", "stop"), ("#### 2 #### 3", "stop"), ("#### 2", "length")],
    }
    generate, calls = scripted_generate(script)
    expert = synthetic.EXPERTS[0]
    found, stats = data.self_traces("synthetic", records(), expert, generate, FakeTokenizer(),
                                    fake_render_chat, num_samples=3, batch_size=2,
                                    max_new_tokens=64, temperature=0.7, top_p=0.9)
    assert found == {"q0": "2+3=5\n#### 5", "q2": "#### 2"}
    assert (stats.candidates, stats.accepted, stats.kept, stats.records) == (9, 3, 2, 3)
    print(f"\nself traces: kept {stats.kept}/{stats.records} records "
          f"({stats.kept_fraction:.0%}), accepted {stats.accepted}/{stats.candidates} samples")
    # batches of prompts
    assert calls == [(2, 3, 64, 0.7, {"top_p": 0.9}), (1, 3, 64, 0.7, {"top_p": 0.9})]


def test_collect_traces_applies_each_experts_source(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl",
                       [{"id": "q1", "expert": "columns", "response": "teacher\n#### 8"}])
    answers = [("2+3=?", "5"), ("4+4=?", "7"), ("1+1=?", "2")]
    generate, _ = scripted_generate({q: [("self\n#### " + a, "stop")] for q, a in answers})
    gold, teacher, sampled = synthetic.EXPERTS
    experts = [gold, replace(teacher, source="file"), replace(sampled, source="self")]
    recs = [replace(r, traces={**r.traces, "columns": "old", "reverse": "old"}) for r in records()]
    out, stats = data.collect_traces("synthetic", recs, experts, trace_file=path,
                                     generate=generate, tok=FakeTokenizer(),
                                     render_chat=fake_render_chat, num_samples=1)
    assert [r.traces for r in out] == [
        {"chain": "2+3=5\n#### 5", "reverse": "self\n#### 5"},
        {"chain": "4+4=8\n#### 8", "columns": "teacher\n#### 8"},
        {"chain": "1+1=2\n#### 2", "reverse": "self\n#### 2"},
    ]
    assert [(s.expert, s.kept) for s in stats] == [("columns", 1), ("reverse", 2)]
    assert recs[0].traces["columns"] == "old"  # the input records are not modified
    with pytest.raises(ValueError, match="no trace file"):
        data.collect_traces("synthetic", recs, [replace(gold, source="file")])
    with pytest.raises(ValueError, match="unknown trace source"):
        data.collect_traces("synthetic", recs, [replace(gold, source="web")])


def test_reference_trace_falls_back_to_the_rationale():
    r = data.Record("x", "q", "1", {"rationale": "r\n#### 1"})
    assert data.reference_trace(r, "equations", "rationale") == "r\n#### 1"
    assert data.reference_trace(data.Record("y", "q", "1"), "equations", "rationale") is None
