"""
buffer.py: the hard-example buffer of RIEL (METHOD.md 4(e)): where the questions an expert keeps failing wait
for their supervised replay.

After each RL step every (question, expert) group is offered: expert i with more than K of its G answers
wrong is admitted with probability K/G, as (question, expert i's prompt, reference answer). Once the buffer
holds B entries, riel.py adds L_SFT = -sum logp(O_gt | Q, P_i) / N_tokens over all of them to that step's
loss and empties it. Our readings: the reference is expert i's own stage-1 trace, else the record's first
trace; entries are plain lists of ids so the buffer goes into a checkpoint as plain data (exact resume).
"""
from dataclasses import asdict, dataclass, field

import torch

from mef import encode_target
from verify import CORRECT


def rng_device(generator):
    """Where a generator draws: a CUDA generator fills only CUDA tensors (None: torch's global CPU stream)."""
    return generator.device if generator is not None else "cpu"


def uniform(generator) -> float:
    """One draw in [0, 1) from the generator (on its device): the step's random decisions share its stream."""
    return torch.rand((), generator=generator, device=rng_device(generator)).item()


@dataclass
class HardExample:
    question_id: object
    expert: str
    prompt_ids: list  # the expert's chat prompt for the question
    target_ids: list  # reference answer + end-of-turn


@dataclass
class HardExampleBuffer:
    capacity: int = 64
    entries: list = field(default_factory=list)  # list[HardExample]
    flushes: int = 0

    def is_full(self) -> bool:
        return len(self.entries) >= self.capacity

    def take_all(self, n: int | None = None) -> list:
        """Empty the buffer for its SFT step (n: only the n oldest entries; the rest wait) and count the flush."""
        out, self.entries = self.entries[:n], self.entries[len(self.entries) if n is None else n:]
        self.flushes += 1
        return out

    def to_dict(self) -> dict:  # plain data, for checkpoints
        return {"capacity": self.capacity, "flushes": self.flushes, "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict) -> "HardExampleBuffer":
        return cls(d["capacity"], [HardExample(**e) for e in d["entries"]], d["flushes"])


def admit_hard_example(group_rewards, k, generator=None) -> bool:
    """group_rewards (G,): more than k wrong -> admit with probability k / G."""
    G = group_rewards.numel()
    if int((group_rewards < CORRECT).sum()) <= k:
        return False
    return uniform(generator) < k / G


def reference_trace(record, expert):
    """O_gt for the buffer: the expert's own stage-1 trace, else the record's first one (our reading)."""
    return record.traces.get(expert.name) or next((t for t in record.traces.values() if t), None)


def admit_hard_examples(buffer, tok, records, experts, prompts, rewards, k, generator=None) -> int:
    """(e) offer every (question, expert) group to the buffer; returns how many were admitted."""
    N, admitted = len(experts), 0
    for q, rec in enumerate(records):
        for i, ex in enumerate(experts):
            if not admit_hard_example(rewards[q, i], k, generator):
                continue
            trace = reference_trace(rec, ex)
            if trace:
                buffer.entries.append(HardExample(rec.id, ex.name, prompts[q * N + i], encode_target(tok, trace)))
                admitted += 1
    return admitted
