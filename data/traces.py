"""data/traces.py: the two trace sources beyond the dataset's own (METHOD.md section 2).

- `file`: teacher traces a user brings, one JSON object per line:
      {"id": "gsm8k-train-0", "expert": "rationale", "response": "... #### 72"}
  `id` is a Record id (data.load prints them), `expert` an expert name of the task.
- `self`: traces sampled from a model under the expert's prompt (rejection sampling).

Both keep a response only where verify.py accepts its final answer against the record's gold answer
(METHOD.md section 3: "filtered by the checker; the kept fraction is logged"), and only the first
accepted response per (record, expert). A kept trace replaces that expert's gold trace.

This module never imports model.py or rollout.py: the sampler comes in as arguments,
    generate(prompts: list[list[int]], num_samples=..., max_new_tokens=..., temperature=...)
        -> rollout
with `rollout.completions` (P * num_samples rows, prompt-major) and `rollout.finish`
("stop"/"length"), and render_chat(tok, system, user) -> prompt ids; in train.py these are
`functools.partial(rollout.generate, model)` and `model.render_chat`.
"""

import dataclasses
from dataclasses import dataclass
from typing import Callable

from verify import reward

from .common import DataError, Expert, Record, UserError, read_jsonl


@dataclass
class TeacherTrace:
    id: str
    expert: str
    response: str


@dataclass
class KeepStats:
    """What a trace source produced for one expert: responses seen, responses the checker accepted,
    and records that ended up with a trace."""

    expert: str
    candidates: int = 0
    accepted: int = 0
    records: int = 0  # records asked for
    kept: int = 0  # records that got a trace
    unknown: int = 0  # file lines whose id is not in the records (another split, a typo)

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.records if self.records else 0.0


def read_teacher_traces(path: str) -> list[TeacherTrace]:
    """Parse a teacher-trace JSONL file; a malformed line raises DataError naming file:line."""
    rows = read_jsonl(path, ("id", "expert", "response"), check=_check_teacher_row)
    return [TeacherTrace(r["id"], r["expert"], r["response"]) for r in rows]


def _check_teacher_row(row, where: str) -> None:
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str)
                                            for k in ("id", "expert", "response")):
        raise DataError(f"{where}: expected an object with string fields "
                        "'id', 'expert', 'response'")


def file_traces(task: str, records: list[Record], expert: str,
                path: str) -> tuple[dict[str, str], KeepStats]:
    """{record id: response} for `expert` from a teacher file, checker-filtered."""
    gold = {r.id: r.answer for r in records}
    stats, found = KeepStats(expert, records=len(records)), {}
    for t in read_teacher_traces(path):
        if t.expert != expert:
            continue
        if t.id not in gold:
            stats.unknown += 1
            continue
        stats.candidates += 1
        if reward(task, t.response, gold[t.id]) == 1.0:
            stats.accepted += 1
            found.setdefault(t.id, t.response)
    stats.kept = len(found)
    return found, stats


def self_traces(task: str, records: list[Record], expert: Expert, generate: Callable, tok,
                render_chat: Callable, num_samples: int = 4, batch_size: int = 16,
                max_new_tokens: int = 256, temperature: float = 1.0,
                **generate_kwargs) -> tuple[dict[str, str], KeepStats]:
    """{record id: response} sampled under the expert's prompt; a response is kept if it stopped by
    itself (not cut at max_new_tokens) and the checker accepts it."""
    stats, found = KeepStats(expert.name, records=len(records)), {}
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        prompts = [render_chat(tok, expert.system_prompt, r.question) for r in batch]
        out = generate(prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                       temperature=temperature, **generate_kwargs)
        for row, (ids, finish) in enumerate(zip(out.completions, out.finish)):
            record = batch[row // num_samples]  # prompt-major rows: p * num_samples + g
            stats.candidates += 1
            text = tok.decode(ids, skip_special_tokens=True)
            if finish == "stop" and reward(task, text, record.answer) == 1.0:
                stats.accepted += 1
                found.setdefault(record.id, text.strip())
    stats.kept = len(found)
    return found, stats


def replace_traces(records: list[Record], expert: str, found: dict[str, str]) -> list[Record]:
    """Copies of the records whose `expert` trace is the found one (or absent where none was
    found)."""
    out = []
    for r in records:
        traces = {k: v for k, v in r.traces.items() if k != expert}
        if r.id in found:
            traces[expert] = found[r.id]
        out.append(dataclasses.replace(r, traces=traces))
    return out


def collect_traces(task: str, records: list[Record], experts: list[Expert],
                   trace_file: str | None = None,
                   **self_kwargs) -> tuple[list[Record], list[KeepStats]]:
    """Apply every expert's source: "gold" keeps the dataset traces, "file" reads `trace_file`,
    "self" samples with self_kwargs (generate, tok, render_chat, ...). Returns (records, stats)."""
    all_stats = []
    for ex in experts:
        if ex.source == "gold":
            continue
        if ex.source == "file":
            if trace_file is None:
                raise UserError(f"expert {ex.name!r} has source 'file' but no trace file was given")
            found, stats = file_traces(task, records, ex.name, trace_file)
        elif ex.source == "self":
            found, stats = self_traces(task, records, ex, **self_kwargs)
        else:
            raise UserError(f"expert {ex.name!r}: unknown trace source {ex.source!r} "
                            "(gold, file, self)")
        records = replace_traces(records, ex.name, found)
        all_stats.append(stats)
    return records, all_stats
