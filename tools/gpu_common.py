"""
tools/gpu_common.py: what the one-call GPU checks share (gpu_check.py, gpu_riel.py, gpu_decode.py,
gpu_memory.py): models at the real shapes of Llama-3.2-1B/-3B with random weights made on the
device, the inputs of a RIEL step without a tokenizer or data, and the runner that a session lent a
GPU for one call depends on.

The runner's choices, all for a call that may be cut short (the device machine gives ~10 minutes a
call):
- one table (part, model, setting, result, compare, note), each row printed (flush=True) the
  moment it is measured and $OUT/gpu_check.md and $OUT/gpu_check.json rewritten after every row,
  so whatever was measured comes back;
- the parts run in a fixed order, each with its estimated seconds: a part that would not fit the
  rest of the budget is skipped with a note in its row (a later, shorter part may still run); a
  part that runs past the budget is interrupted (SIGALRM) and says so, so the last rows and the
  JSON are always written before the call's timeout;
- each part catches its own error into an ERROR row and the next part runs; between parts
  everything a part may leave behind goes (its tensors, a memory cap, memory-history recording);
- the JSON keeps each part's estimate next to its measured wall time, to correct the estimates
  after a run.
"""
import contextlib
import gc
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
import zlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import ModelConfig, Transformer, tiny_config  # noqa: E402

GIB = 2 ** 30
LLAMA3_STOPS = [128001, 128008, 128009]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
COLUMNS = ["part", "model", "setting", "result", "compare", "note"]


# ---- shapes, models, the inputs of a RIEL step ---------------------------------------------

def id_range(vocab):
    """Prompt ids that are no stop id: bytes for `tiny`, else below Llama 3's specials (128000+)."""
    return (3, 256) if vocab < 1000 else (3, 128000)


def model_cfg(name) -> ModelConfig:
    """The preset's shapes (model.model_config), offline; `tiny` for --quick."""
    if name == "tiny":
        return tiny_config()
    import model
    return model.model_config(name)


def random_model(mcfg, device, dtype, seed=0) -> Transformer:
    """normal(0, 0.02) weights made on the device (a 3B init on the host takes most of a minute)."""
    torch.manual_seed(seed)
    with torch.device(device):
        m = Transformer(mcfg)
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 2:
                    p.normal_(std=0.02)
    return m.to(dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def riel_config(quick):
    """config.Config: train.py's defaults for 3B (the paper's), or scaled to `tiny` for --quick."""
    import config
    cfg = config.defaults("llama3.2-3b")
    if quick:
        cfg.model = "tiny"
        cfg.riel.questions_per_step, cfg.riel.group_size, cfg.riel.max_new_tokens = 2, 4, 12
        cfg.riel.sample_batch_size = 8
    return cfg


class StandInTokenizer:
    """What a RIEL step asks of a tokenizer, offline: a text -> ~200 ids (quick ~24) by its hash."""

    def __init__(self, vocab_size, stop, quick):
        self.vocab_size, self.eos_token_id, self.quick = vocab_size, stop, quick

    def __len__(self):
        return self.vocab_size

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "\n".join(f"{x['role']}: {x['content']}" for x in messages)

    def encode(self, text, add_special_tokens=False):
        h = zlib.crc32(text.encode())
        n = (20 if self.quick else 180) + h % (8 if self.quick else 40)
        g = torch.Generator().manual_seed(h)
        return torch.randint(*id_range(self.vocab_size), (n,), generator=g).tolist()

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def get_vocab(self):
        return {}


def stand_in_reward(record, text):
    """~25% of completions correct, by their text: every part of a RIEL step (transfer too) runs."""
    return float(zlib.crc32(text.encode()) % 4 == 0)


def riel_inputs(rc, vocab, quick):
    """(tokenizer, records, experts): one riel_step's rc.questions_per_step GSM8K-like questions."""
    import data
    experts = data.experts("gsm8k")
    tok = StandInTokenizer(vocab, 258 if quick else LLAMA3_STOPS[-1], quick)
    records = [SimpleNamespace(id=i, question=f"question {i}: how many apples?", answer="7",
                               traces={e.name: f"trace {i} of {e.name}" for e in experts})
               for i in range(rc.questions_per_step)]
    return tok, records, experts


# ---- the table -----------------------------------------------------------------------------

class Table:
    """Rows of COLUMNS, each printed when added and the files rewritten: $OUT/gpu_check.md (the
    markdown table) and $OUT/gpu_check.json (the rows, the run's facts, each part's estimated and
    measured seconds). A row can be filled in later (update: a plan that comes after its
    measurement); the new version is printed too."""

    def __init__(self, title, meta, name="gpu_check"):
        self.title, self.meta, self.rows, self.parts = title, meta, [], []
        out = os.environ.get("OUT")
        self.paths = ((os.path.join(out, f"{name}.md"), os.path.join(out, f"{name}.json"))
                      if out else None)
        print("\n".join([title, "", self._line(dict(zip(COLUMNS, COLUMNS))),
                         "|---" * len(COLUMNS) + "|"]),
              flush=True)
        self.write()

    @staticmethod
    def _line(cells):
        return "| " + " | ".join(str(cells.get(c, "")).replace("|", "/").replace("\n", " ")
                                 for c in COLUMNS) + " |"

    def row(self, **cells) -> int:
        self.rows.append({c: str(cells.get(c, "")) for c in COLUMNS})
        print(self._line(self.rows[-1]), flush=True)
        self.write()
        return len(self.rows) - 1

    def update(self, i, **cells):
        self.rows[i].update({c: str(v) for c, v in cells.items()})
        print("updated: " + self._line(self.rows[i]), flush=True)
        self.write()

    def write(self):
        if not self.paths:
            return
        md, js = self.paths
        head = [self.title, "", self._line(dict(zip(COLUMNS, COLUMNS))),
                "|---" * len(COLUMNS) + "|"]
        with open(md, "w") as f:
            f.write("\n".join(head + [self._line(r) for r in self.rows]) + "\n")
        with open(js, "w") as f:
            json.dump({"title": self.title, **self.meta, "rows": self.rows, "parts": self.parts}, f,
                      indent=1)


def job_result(job, timeout=0.0):
    """A CPU process's result (multiprocessing's AsyncResult; None: --no-plan) -> its value, None
    while it runs, or "n/a: <the error it raised>"."""
    if job is None:
        return "n/a (--no-plan)"
    try:
        return job.get(timeout)
    except multiprocessing.TimeoutError:
        return None
    except Exception as e:  # noqa: BLE001  (its error, raised again here)
        return f"n/a: {type(e).__name__}: {str(e)[:200]}"


class Waiting:
    """Rows with cells that wait on a CPU process (a memory plan, a time estimate): the row is
    printed when measured, its waiting cells filled in (an `updated:` row) when the process is
    done, so a call cut short keeps the measurement."""

    def __init__(self, table):
        self.table, self.items = table, []

    def row(self, job, cells, **measured) -> int:
        """Add the row; cells(result) -> the cells the job's result fills (a str if it failed)."""
        result = job_result(job)
        i = self.table.row(**measured, **cells(result if result is not None else "pending"))
        if result is None:
            self.items.append((i, job, cells))
        return i

    def settle(self, deadline=None):
        """Fill in the rows whose jobs are done; with a deadline (time.time()), wait till then."""
        still = []
        for i, job, cells in self.items:
            result = job_result(job, max(0.0, deadline - time.time()) if deadline else 0.0)
            if result is None and deadline is None:
                still.append((i, job, cells))
            else:
                late = "n/a: not done within the budget"
                self.table.update(i, **cells(result if result is not None else late))
        self.items = still


# ---- the runner ----------------------------------------------------------------------------

@dataclass
class Part:
    name: str  # its row's `part` when it is skipped or fails
    model: str
    est_s: float  # seconds on one H200, its CUDA work and compiles (listed in gpu_check.py)
    est_quick_s: float  # seconds of --quick on a CPU
    fn: Callable  # fn(ctx) adds the part's rows to ctx.table


class PastBudget(Exception):
    """A part ran past the budget: raised in it by SIGALRM, so the later rows are still written."""


@contextlib.contextmanager
def deadline(seconds):
    """Raise PastBudget in the main thread after `seconds` (elsewhere, no setitimer: no limit)."""
    if (threading.current_thread() is not threading.main_thread()
            or not hasattr(signal, "setitimer")):
        yield
        return

    def fire(signum, frame):
        raise PastBudget(f"interrupted: ran past the budget after {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def tidy(device):
    """What a part may leave behind, gone: its tensors, gpu_memory's cap, the memory history."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.memory._record_memory_history(None)
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


def run_parts(parts, ctx, after_each=None):
    """Run the parts in order under ctx.budget seconds from ctx.t0 (ctx: table, device, quick, t0,
    budget); after_each() after each, ready or skipped."""
    for p in parts:
        est = p.est_quick_s if ctx.quick else p.est_s
        left = ctx.t0 + ctx.budget - time.time()
        record = {"part": p.name, "model": p.model, "est_s": est, "s": 0.0, "status": "ok"}
        if est > left:
            record["status"] = "skipped"
            ctx.table.row(part=p.name, model=p.model,
                          note=f"skipped: needs ~{est:.0f} s, {max(left, 0):.0f} s left "
                               f"of the {ctx.budget:.0f} s budget")
        else:
            t = time.time()
            try:
                with deadline(left):
                    p.fn(ctx)
            except Exception as e:  # noqa: BLE001  (one failure must not cost the other rows)
                traceback.print_exc(file=sys.stderr)
                record["status"] = type(e).__name__
                ctx.table.row(part=p.name, model=p.model, result="ERROR",
                              note=f"{type(e).__name__}: {str(e)[:200]}")
            finally:
                tidy(ctx.device)
            record["s"] = round(time.time() - t, 1)
        ctx.table.parts.append(record)
        ctx.table.write()
        if after_each:
            after_each()
