"""data: the tasks, their experts and reference traces, behind one small interface.

    import data
    records = data.load("gsm8k", "train", data_dir)  # [Record]: id, question, answer, traces, meta
    experts = data.experts("gsm8k")                  # [Expert]: name, system_prompt, source
    train_split, eval_split = data.SPLITS["gsm8k"]   # ("train", "test")
    data.download("gsm8k", data_dir)                 # on a machine with internet access
    python -m data download gsm8k --data-dir data    # the same from the shell

| task       | module (data/)  | splits (train / eval)             | experts                       |
|------------|-----------------|-----------------------------------|-------------------------------|
| synthetic  | synthetic.py    | train / test (generated, default) | chain, columns, reverse       |
|            | (and `val`; testbeds nested / complementary / placebo: see the module)          |
| gsm8k      | gsm8k.py        | train / test                      | rationale, equations, program |
| mathqa     | mathqa.py       | dev / test (dev has rationales)   | rationale, program, formula   |
| strategyqa | strategyqa.py   | train / dev (test labels hidden)  | facts, decompose, term        |
| math500    | math500.py      | - / test (evaluation only)        | solution, concise, check      |

Every trace ends with its expert's final-answer form, so verify.reward(task, trace, record.answer)
is 1.0 for each of them (tests/test_data.py checks every record of the real files). The first expert
of each task is the dataset's own rationale, the fallback where another expert has no trace.
Teacher-file and self-sampled traces: data/traces.py.
"""

from typing import NamedTuple

import torch

from . import gsm8k, math500, mathqa, strategyqa, synthetic
from .common import (DataError, Expert, MissingDataError, Record, UserError, reference_trace,
                     require)
from .traces import (KeepStats, collect_traces, file_traces, read_teacher_traces, replace_traces,
                     self_traces)

TASKS = ("synthetic", "gsm8k", "mathqa", "strategyqa", "math500")
_MODULES = {"synthetic": synthetic, "gsm8k": gsm8k, "mathqa": mathqa, "strategyqa": strategyqa,
            "math500": math500}


class Splits(NamedTuple):
    train: str | None  # None: the task is for evaluation only
    eval: str


SPLITS = {
    "synthetic": Splits("train", "test"),
    "gsm8k": Splits("train", "test"),
    "mathqa": Splits("dev", "test"),
    "strategyqa": Splits("train", "dev"),
    "math500": Splits(None, "test"),
}


def _module(task: str):
    if task not in _MODULES:
        raise UserError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return _MODULES[task]


def load(task: str, split: str | None = None, data_dir: str | None = None,
         **options) -> list[Record]:
    """Records of one split (default: the task's training split). options go to the task's loader
    (synthetic: n, seed, difficulty, testbed)."""
    module = _module(task)
    split = split or SPLITS[task].train
    if split is None:
        raise UserError(f"{task} is for evaluation only; load split {SPLITS[task].eval!r}")
    return module.load(split, data_dir, **options)


def check_files(task: str, data_dir: str | None, roles=("train", "eval"), splits=()):
    """Before a run trains, reading nothing: the error load would give much later for the task's
    `roles` splits (SPLITS' train, eval) or the `splits` named: a task without a training split, an
    unknown split, a missing file (with the command that fetches it)."""
    module = _module(task)
    for split in dict.fromkeys([getattr(SPLITS[task], r) for r in roles] + list(splits)):
        if split is None:
            raise UserError(f"{task} is for evaluation only: use --stages eval")
        known = list(getattr(module, "SOURCES", None) or module.SPLITS)
        if split not in known:
            raise UserError(f"{task} has splits {known}, not {split!r}")
        if hasattr(module, "SOURCES"):
            require(task, module.SOURCES[split], data_dir)


def experts(task: str, names: list[str] | None = None, **options) -> list[Expert]:
    """The task's experts, or the named subset in the given order (e.g. one expert: ExpertX-SFT).
    options go to the task's `experts` (synthetic: testbed)."""
    module = _module(task)
    pool = {e.name: e for e in (module.experts(**options) if hasattr(module, "experts")
                                else module.EXPERTS)}
    if names is None:
        return list(pool.values())
    unknown = [n for n in names if n not in pool]
    if unknown:
        raise UserError(f"{task} has experts {list(pool)}, not {unknown}")
    return [pool[n] for n in names]


def download(task: str, data_dir: str | None = None) -> list[str]:
    """Fetch the task's files into data_dir/<task>/ (needs internet; skips files already there)."""
    from .common import download as fetch

    module = _module(task)
    if not hasattr(module, "SOURCES"):
        return []  # generated in code
    return fetch(task, list(module.SOURCES.values()), data_dir)


__all__ = ["TASKS", "SPLITS", "Splits", "Record", "Expert", "DataError", "MissingDataError",
           "KeepStats", "load", "check_files", "experts", "download", "reference_trace",
           "read_teacher_traces", "file_traces", "self_traces", "replace_traces", "collect_traces"]


def question_batch(n: int, size: int, step: int, seed: int) -> list:
    """Indices of the questions of RL step `step`: consecutive slices of per-epoch permutations
    drawn from (seed, epoch) alone, so that a resumed run sees the same batches."""
    out, pos = [], step * size
    while len(out) < size:
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = min(size - len(out), n - i)
        out += perm[i:i + take].tolist()
        pos += take
    return out
