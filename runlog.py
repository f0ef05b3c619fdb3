"""
runlog.py: what a run leaves for people to read: metrics.jsonl (every optimizer step), the step lines on stdout,
summary.json and curves.png. train.py calls these; nothing here touches the model.

- metrics.jsonl is one JSON object per line; on resume the lines past the checkpoint are dropped (they will be
  redone), so the file always describes one uninterrupted run.
- stdout gets a line every `log_every` steps holding the means since the previous line: one RL step alone is noisy.
- A picture is never worth a failed run: curves.png failures are warnings.
"""
import dataclasses
import json
import math
import os
import statistics
import sys

import checkpoint


class NullLog:
    """The metrics log of ranks other than 0: they compute the same metrics, rank 0 writes them."""

    def write(self, record: dict):
        pass


class MetricsLog:
    """metrics.jsonl: one JSON object per line. On resume, lines past the checkpoint are dropped (they will be
    redone), so the file always describes exactly one uninterrupted run."""

    def __init__(self, path: str, keep_upto: int | None):
        self.path = path
        if keep_upto is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if json.loads(line).get("gstep", 0) <= keep_upto]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        elif keep_upto is None and os.path.exists(path):
            os.remove(path)

    def write(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f]


class StepLines:
    """The stdout lines of a stage: its first and last step and every `every`-th, each showing the mean of every
    numeric metric over the steps since the previous line (one RL step alone is noisy); lr, buffer size and
    the step counters are the current ones. metrics.jsonl keeps every step."""

    CURRENT = ("step", "gstep", "epoch", "lr", "buffer_size")

    def __init__(self, log_every: int | None, start: int, total: int):
        self.every = log_every or max(1, math.ceil(total / 20))  # default: ~20 lines per stage
        self.start, self.total, self.window = start, total, []

    def __call__(self, step: int, m: dict) -> dict | None:
        """Add step `step`'s metrics; the dict to print when this step gets a line, else None."""
        self.window.append(m)
        if not (step == self.start + 1 or step == self.total or step % self.every == 0):
            return None
        numeric = [k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in self.CURRENT]
        means = {k: statistics.fmean(w[k] for w in self.window if k in w) for k in numeric}
        self.window = []
        return {**m, **means}


def write_summary(cfg, state, log, wall_since_save):
    rl = [m for m in log.read() if m.get("stage") == "riel"]
    tenth = max(1, len(rl) // 10)
    trend = {}
    if rl:
        for key in ("zero_spread", "reward"):
            trend[key] = {"first_10pct": sum(m[key] for m in rl[:tenth]) / tenth,
                          "last_10pct": sum(m[key] for m in rl[-tenth:]) / tenth}
    summary = {"model": cfg.model, "data": cfg.data, "stages": list(cfg.stages), "evals": state["evals"],
               "riel_trend": trend, "optimizer_steps": state["gstep"], "wall_s": state["wall_s"] + wall_since_save,
               "checkpoint": checkpoint.latest(cfg.out_dir), "config": dataclasses.asdict(cfg)}
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"summary -> {os.path.join(cfg.out_dir, 'summary.json')} ({summary['wall_s']:.0f}s)")
    if cfg.curves:
        write_curves(cfg.out_dir)


def write_curves(out_dir: str):
    """curves.png in the run directory (experiments/plot.py). A picture is never worth a failed run: any
    error becomes a warning; without matplotlib, plot_runs says in one line how to get it."""
    try:
        from experiments.plot import plot_runs
        path = plot_runs([out_dir], os.path.join(out_dir, "curves.png"))
    except Exception as e:  # noqa: BLE001 (deliberately broad, see above)
        print(f"warning: curves.png not written ({type(e).__name__}: {e})", file=sys.stderr)
        return
    if path:
        print(f"curves -> {path}")
