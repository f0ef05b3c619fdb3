"""
runlog.py: what a run leaves for people to read: metrics.jsonl (every optimizer step), the step
lines on stdout, summary.json and curves.png. train.py calls these; nothing here touches the model.

- metrics.jsonl is one JSON object per line; on resume the lines past the checkpoint are dropped
  (they will be redone), so the file always describes one uninterrupted run.
- stdout gets a line every `log_every` steps holding the means since the previous line: one RL step
  alone is noisy.
- A picture is never worth a failed run: curves.png failures are warnings.
- --report-to tensorboard|wandb (Tracker) sends every numeric value of every metrics.jsonl line to a
  tracker too, under the same names, prefixed by the line's stage (riel/reward,
  eval/after_riel/accuracy/columns), at step gstep. Their packages are optional: imported only when
  chosen, a clear error when missing.
- samples.jsonl (write_samples) keeps what the model wrote: a few groups of a step, and an eval's
  answers.
"""
import dataclasses
import json
import math
import os
import subprocess
import statistics
import sys
import zlib

from plumbing import checkpoint
from plumbing.errors import UserError


class NullLog:
    """The metrics log of ranks other than 0: they compute the same metrics, rank 0 writes them."""

    def write(self, record: dict):
        pass

    def samples(self, record: dict):
        pass

    def close(self):
        pass


def read_lines(path: str) -> list:
    """The complete JSON lines of a log, for a resume. A last line cut short (a kill or a full disk
    mid-write) is dropped with a warning: the checkpoint, not the log, is the record, and that step
    is redone. A bad line anywhere else means the file was edited or damaged: an error naming the
    file and line."""
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    lines = []
    for n, line in enumerate(raw, 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except (ValueError, UnicodeDecodeError):
            if n >= len(raw) - 1 and not any(x.strip() for x in raw[n:]):
                print(f"warning: {path}:{n}: dropped a half-written last line", file=sys.stderr)
                continue
            raise UserError(f"{path}:{n}: not a JSON line (the file was damaged or edited): repair "
                            "or delete that line, then --resume again")
        lines.append(line.decode() + "\n")
    return lines


class MetricsLog:
    """metrics.jsonl: one JSON object per line. On resume, lines past the checkpoint are dropped
    (they will be redone), so the file always describes exactly one uninterrupted run.
    tracker: gets every line as well."""

    def __init__(self, path: str, keep_upto: int | None, tracker=None):
        self.path, self.tracker = path, tracker
        self.samples_path = os.path.join(os.path.dirname(path), "samples.jsonl")
        for p in (path, self.samples_path):
            if keep_upto is not None and os.path.exists(p):
                kept = [line for line in read_lines(p)
                        if json.loads(line).get("gstep", 0) <= keep_upto]
                with open(p + ".tmp", "w") as f:
                    f.writelines(kept)
                os.replace(p + ".tmp", p)
            elif keep_upto is None and os.path.exists(p):
                os.remove(p)

    def write(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record)

    def samples(self, record: dict):
        """samples.jsonl: what the model wrote (a step's groups, an eval's answers), one JSON object
        per line."""
        with open(self.samples_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self):
        if self.tracker is not None:
            self.tracker.close()

    def read(self) -> list:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f]


def scalars(record: dict) -> dict:
    """A metrics line -> {tag: float}: numbers only, nested dicts flattened with '/', under the
    line's stage (and an eval's name), e.g. riel/reward, eval/after_riel/accuracy/columns."""
    prefix = "/".join(str(record[k]) for k in ("stage", "name") if k in record)
    out = {}

    def walk(key, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{key}/{k}", x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    for k, v in record.items():
        if k not in ("stage", "name", "gstep"):
            walk(f"{prefix}/{k}" if prefix else k, v)
    return out


class Tracker:
    """--report-to: every metrics line, as scalars(record), at step gstep. tensorboard: event files
    in <out_dir>/tensorboard (on resume, events past the checkpoint are purged, as metrics.jsonl's
    lines are); wandb: a run in <out_dir>/wandb (WANDB_MODE=offline works without a network),
    resumed under the same id."""

    def __init__(self, kind: str, out_dir: str, config: dict, resume_step: int | None):
        self.kind = kind
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                            purge_step=resume_step)
            elif kind == "wandb":
                import wandb
                # one id per run directory, so --resume continues the same wandb run
                where = os.path.abspath(out_dir)
                run_id = f"{os.path.basename(where)}-{zlib.crc32(where.encode()):08x}"
                self.writer = wandb.init(project=os.environ.get("WANDB_PROJECT", "meml-grpo"),
                                         dir=out_dir, config=config, id=run_id, resume="allow")
            else:
                raise UserError(f"--report-to must be none, tensorboard or wandb, got {kind!r}")
        except ImportError as e:
            package = "tensorboard" if kind == "tensorboard" else "wandb"
            raise UserError(f"--report-to {kind} needs the {package} package ({e}): "
                            f"pip install {package}") from None
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 (wandb raises its own: not logged in, no network, ...)
            raise UserError(f"--report-to {kind}: the tracker did not start ({type(e).__name__}: "
                            f"{e}). For wandb: `wandb login`, or WANDB_MODE=offline to keep the "
                            "run in OUT/wandb without an account") from None

    def log(self, record: dict):
        values, step = scalars(record), int(record.get("gstep", 0))
        if self.kind == "tensorboard":
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)
        elif values:
            self.writer.log(values, step=step)

    def close(self):
        if self.kind == "tensorboard":
            self.writer.close()
        else:
            self.writer.finish()


class StepLines:
    """The stdout lines of a stage: its first and last step and every `every`-th, each showing the
    mean of every numeric metric over the steps since the previous line (one RL step alone is
    noisy); lr, buffer size and the step counters are the current ones. metrics.jsonl keeps every
    step."""

    CURRENT = ("step", "gstep", "epoch", "lr", "buffer_size")

    def __init__(self, log_every: int | None, start: int, total: int):
        self.every = log_every or max(1, math.ceil(total / 20))  # default: ~20 lines per stage
        self.start, self.total, self.window = start, total, []

    def __call__(self, step: int, m: dict) -> dict | None:
        """Add step `step`'s metrics; the dict to print when this step gets a line, else None."""
        self.window.append(m)
        if not (step == self.start + 1 or step == self.total or step % self.every == 0):
            return None
        numeric = [k for k, v in m.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in self.CURRENT]
        means = {k: statistics.fmean(w[k] for w in self.window if k in w) for k in numeric}
        self.window = []
        return {**m, **means}


def riel_line(step: int, steps: int, a: dict) -> str:
    """The stdout line of a RIEL step (a: StepLines' means): rewards, the three loss terms, the
    buffer, lengths, entropy, gradient norm and time; MEL's numbers when it is on."""
    return (f"riel {step:>4}/{steps} reward {a['reward']:.3f} zero-spread {a['zero_spread']:.2f} "
            f"L_grpo {a['loss_grpo']:+.4f} L_transfer {a['loss_transfer']:+.4f} "
            f"L_sft {a['loss_sft']:.3f} buffer {a['buffer_size']} transfers {a['transfers']:.1f} "
            f"len {a['completions/mean_length']:.0f} "
            + (f"entropy {a['entropy']:.2f} " if "entropy" in a else "")
            + f"gnorm {a['grad_norm']:.2f} sample {a['sample_s']:.1f}s train {a['train_s']:.1f}s"
            + (f" | mel kept {a['mel/kept']:.1f}/{a['mel/candidates']:.1f} "
               f"L_nll {a['mel/loss_nll']:.3f} {a['mel_s']:.1f}s" if "mel/kept" in a else ""))


def code_commit() -> str | None:
    """The git commit of the code this run ran (+ "-dirty" with uncommitted changes), so a number
    names its code; None outside a git checkout."""
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write_summary(cfg, state, log, wall_since_save, headline=None):
    rl = [m for m in log.read() if m.get("stage") == "riel"]
    tenth = max(1, len(rl) // 10)
    trend = {}
    if rl:
        for key in ("zero_spread", "reward"):
            trend[key] = {"first_10pct": sum(m[key] for m in rl[:tenth]) / tenth,
                          "last_10pct": sum(m[key] for m in rl[-tenth:]) / tenth}
    summary = {"model": cfg.model, "data": cfg.data, "stages": list(cfg.stages),
               **(headline or {}), "evals": state["evals"], "riel_trend": trend,
               "optimizer_steps": state["gstep"] - state.get("skipped_steps", 0),
               "skipped_steps": state.get("skipped_steps", 0),
               "resume_changes": state.get("changes", []),
               "wall_s": state["wall_s"] + wall_since_save,
               "checkpoint": checkpoint.latest(cfg.out_dir), "config": dataclasses.asdict(cfg),
               "commit": code_commit()}
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"summary -> {os.path.join(cfg.out_dir, 'summary.json')} ({summary['wall_s']:.0f}s)")
    if cfg.curves:
        write_curves(cfg.out_dir)


def write_curves(out_dir: str):
    """curves.png in the run directory (curves.py). A picture is never worth a failed run: any
    error becomes a warning; without matplotlib, plot_runs says in one line how to get it."""
    try:
        from plumbing.curves import plot_runs
        path = plot_runs([out_dir], os.path.join(out_dir, "curves.png"))
    except Exception as e:  # noqa: BLE001 (deliberately broad, see above)
        print(f"warning: curves.png not written ({type(e).__name__}: {e})", file=sys.stderr)
        return
    if path:
        print(f"curves -> {path}")


# ---- what one RIEL step logs (riel.riel_step) ----------------------------------------------------

def batch_metrics(batch, out, sample_s: float, train_s: float) -> dict:
    """riel.py: a step's rows, tokens, lengths (TRL's names; clipped = cut at max_new_tokens),
    entropy and speed."""
    lengths = [len(c) for c in batch.completions]
    n, total = max(1, len(lengths)), sum(lengths)
    trained = sum(lengths[r] for r in batch.rows) + sum(len(o) for *_, o in batch.pairs)
    return {"sampled_rows": len(lengths), "trained_rows": len(batch.rows),
            "trained_tokens": trained, "transfer_pairs": len(batch.pairs),
            "flushed": len(batch.flushed),
            "flushed_entries": [(e.question_id, e.expert) for e in batch.flushed],
            "completions/mean_length": total / n,
            "completions/min_length": min(lengths, default=0),
            "completions/max_length": max(lengths, default=0),
            "completions/clipped_ratio": sum(f == "length" for f in out.finish) / n,
            **({"entropy": sum(e * k for e, k in zip(out.entropy, lengths)) / max(1, total)}
               if out.entropy else {}),  # token mean, nats
            "sample_s": sample_s, "train_s": train_s, "tokens_per_s": total / max(sample_s, 1e-9),
            "train_tokens_per_s": trained / max(train_s, 1e-9)}


def group_samples(tok, records, experts, completions, rewards, adv) -> list:
    """What the model wrote: one dict per (question, expert) group of the given first questions;
    rewards (Q, N, G) tells the group size."""
    N, G = len(experts), rewards.shape[-1]
    return [{"question": rec.question, "answer": rec.answer, "expert": ex.name,
             "completions": [tok.decode(completions[(q * N + i) * G + g], skip_special_tokens=True)
                             for g in range(G)],
             "rewards": rewards[q, i].tolist(),
             "advantages": adv[(q * N + i) * G:(q * N + i + 1) * G].tolist()}
            for q, rec in enumerate(records) for i, ex in enumerate(experts)]
