"""
guard.py: what keeps a run from losing its work or silently lying. train.py calls these; they decide nothing about
training itself.

- check_options: every option checked BEFORE any model or data loads: ranges, finite learning rates, "0" where a
  user would mean "none" refused with the option's name (--riel.steps 0 does not mean "one epoch"), a group of
  one sample refused where an advantage needs a group, a --plan-gpu plan_time.py has no figures for.
- RunLock: a run owns its directory. OUT/run.lock holds the owner's pid and host, created exclusively before
  anything is written and removed at exit; a second run on the same directory stops with a clear error; a lock
  whose pid is dead on this host is stale and taken over with a warning.
- config_changes: on --resume, the saved config against the new one. A change to anything that alters what the
  run computes (data, experts, testbed, seed, model, LoRA, group size, advantage, lrs, steps, ...) is refused
  unless --resume-allow-change names its key; options that only change logging and output pass (LOGGING).
- non_finite: the first weight holding a NaN or inf, so that no such checkpoint is ever written or resumed.
- check_writable: the output directory takes a file, checked before the model loads (a read-only or missing
  parent directory would otherwise fail only at the first checkpoint, after minutes of work).
- resume_checks: a resumed run is the run it continues (config_changes, and no more steps for a finished stage).
- count_skipped / warn_collapse: a run that diverges (NaN/inf steps in a row) stops and names the lr; one whose
  policy collapsed (entropy near 0, reward not rising) is warned about once.
- stopped_message: where an interrupted run stands, and the exact command that continues it.
"""
import dataclasses
import math
import os
import socket
import warnings

from tqdm import tqdm

from plumbing import checkpoint
from plumbing.errors import UserError

# options that change what a run logs or writes, never what it computes: free to change on --resume
LOGGING = {"resume", "resume_or_start", "resume_allow_change", "log_every", "curves", "report_to", "log_samples_every",
           "checkpoint_every", "plan", "plan_gpu", "plan_gpu_gb", "plan_world_size", "plan_detail", "device", "out_dir",
           "micro_batch"}  # micro_batch: how the sizes were chosen; the sizes themselves are compared


def _positive(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise UserError(f"--{name} {value}: must be >= 1" + (" (or unset)" if allow_none else ""))


def _lr(name, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"--{name} {value}: a learning rate must be a finite number > 0")


def check_options(cfg):
    """Raise UserError for the first option no run could mean. cfg: train.Config."""
    r, m, e = cfg.riel, cfg.mef, cfg.eval
    for name, value, none_ok in (("riel.steps", r.steps, True), ("riel.questions-per-step", r.questions_per_step, False),
                                 ("riel.max-new-tokens", r.max_new_tokens, False),
                                 ("riel.micro-batch-size", r.micro_batch_size, False),
                                 ("riel.buffer-size", r.buffer_size, False), ("mef.epochs", m.epochs, False),
                                 ("mef.batch-size", m.batch_size, False), ("mef.micro-batch-size", m.micro_batch_size, False),
                                 ("mef.check-every", m.check_every, False), ("mef.check-size", m.check_size, False),
                                 ("mef.max-len", m.max_len, False), ("eval.size", e.size, True),
                                 ("eval.batch-size", e.batch_size, False), ("eval.max-new-tokens", e.max_new_tokens, False),
                                 ("train-size", cfg.train_size, True), ("checkpoint-every", cfg.checkpoint_every, False),
                                 ("eval-every-size", cfg.eval_every_size, False), ("log-every", cfg.log_every, True)):
        _positive(name, value, none_ok)
    _lr("mef.lr", m.lr)
    _lr("riel.lr", r.lr)
    for name, value in (("riel.grad-clip", r.grad_clip), ("mef.grad-clip", m.grad_clip), ("riel.lambda1", r.lambda1),
                        ("riel.lambda2", r.lambda2), ("riel.kl-beta", r.kl_beta), ("riel.temperature", r.temperature),
                        ("eval-every", cfg.eval_every), ("log-samples-every", cfg.log_samples_every),
                        ("lora-rank", cfg.lora_rank), ("mef.weight-decay", m.weight_decay)):
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{name} {value}: must be a finite number >= 0")
    if r.temperature == 0:
        raise UserError("--riel.temperature 0: RL samples; greedy decoding gives a group no spread (use > 0)")
    if r.group_size < 2:
        raise UserError(f"--riel.group-size {r.group_size}: a group advantage (r - mean of the group) needs >= 2 "
                        "samples; with one every advantage is 0 and nothing is learned")
    if r.buffer_k is not None and not 0 <= r.buffer_k < r.group_size:
        raise UserError(f"--riel.buffer-k {r.buffer_k}: must be in [0, group size {r.group_size})")
    if m.stop_at is not None and not (math.isfinite(m.stop_at) and m.stop_at >= 0):
        raise UserError(f"--mef.stop-at {m.stop_at}: a share of questions >= 0 (above 1: never), or None")
    lo, hi = cfg.difficulty
    if not 1 <= lo <= hi:
        raise UserError(f"--difficulty {lo} {hi}: levels are >= 1, low first")
    if cfg.rl_difficulty is not None and not 1 <= cfg.rl_difficulty[0] <= cfg.rl_difficulty[1]:
        raise UserError(f"--rl-difficulty {cfg.rl_difficulty[0]} {cfg.rl_difficulty[1]}: levels are >= 1, low first")
    if cfg.trace_file is not None and not os.path.isfile(cfg.trace_file):
        raise UserError(f"--trace-file {cfg.trace_file}: no such file")
    if cfg.sft_cross is not None and (cfg.data != "synthetic" or not cfg.testbed.startswith("disjoint")
                                      or not 0.0 <= cfg.sft_cross <= 1.0):  # data/synthetic.py's DISJOINT
        raise UserError(f"--sft-cross {cfg.sft_cross}: a probability in [0, 1], for a --testbed disjoint* only")
    if cfg.sft_replay is not None and not os.path.isfile(cfg.sft_replay):
        raise UserError(f"--sft-replay {cfg.sft_replay}: no such file (a RIEL run's flushed.jsonl)")
    _check_plan(cfg)


def _check_plan(cfg):
    if cfg.plan_gpu is not None and not cfg.plan:
        raise UserError(f"--plan-gpu {cfg.plan_gpu}: an estimate of --plan's; pass --plan too")
    if cfg.plan_gpu_gb is not None and not (math.isfinite(cfg.plan_gpu_gb) and cfg.plan_gpu_gb > 0):
        raise UserError(f"--plan-gpu-gb {cfg.plan_gpu_gb}: a GPU's memory in GiB, > 0")
    _positive("plan-world-size", cfg.plan_world_size)


def check_writable(out_dir: str):
    """Make out_dir and prove it takes a file; a clear error instead of an OSError minutes into the run."""
    probe = os.path.join(out_dir, ".write_probe")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise UserError(f"--out-dir {out_dir} cannot be written ({err.strerror}): choose a writable directory")


# ---- the lock -------------------------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class RunLock:
    """OUT/run.lock, held from before the first write until exit. A second run on the directory is refused; a
    lock left by a dead process of this host is taken over with a warning."""

    def __init__(self, out_dir: str):
        self.path, self.held = os.path.join(out_dir, "run.lock"), False

    def acquire(self):
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid, host = self.owner()
                if host == socket.gethostname() and pid is not None and not _alive(pid):
                    warnings.warn(f"{self.path}: taking over the lock of process {pid}, which is no longer running")
                    os.remove(self.path)
                    continue
                raise UserError(f"{os.path.dirname(self.path)} is in use by process {pid} on {host} "
                                f"({self.path}): wait for it, or choose another --out-dir. If that process is gone "
                                "(another machine), delete the lock file by hand.")
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return self
        raise UserError(f"{self.path}: could not take the lock")

    def owner(self):
        try:
            pid, host = open(self.path).read().split()
            return int(pid), host
        except (OSError, ValueError):
            return None, "?"

    def release(self):
        if self.held and self.owner()[0] == os.getpid():
            os.remove(self.path)
        self.held = False


# ---- resume ---------------------------------------------------------------------------------------------------

def flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(saved: dict, new: dict, allowed=()) -> list:
    """[(key, saved value, new value)] of every option the resumed run would change, logging ones excepted.
    Raises UserError for a change not in `allowed` (keys as in summary.json's config: riel.lr, seed, ...)."""
    old, now = flat(saved), flat(new)
    changes = [(k, old.get(k), now.get(k)) for k in sorted(set(old) | set(now))
               if k.split(".")[0] not in LOGGING and old.get(k) != now.get(k) and k in old]
    allowed = {a.lstrip("-").replace("-", "_") for a in allowed}  # riel.lr, --riel.lr, riel.kl-beta: all the same
    refused = [c for c in changes if c[0] not in allowed]
    flag = lambda key: key.replace("_", "-")  # noqa: E731  (as the command line spells it)
    if refused:
        lines = ", ".join(f"--{flag(k)} {a!r} -> {b!r}" for k, a, b in refused)
        raise UserError(f"--resume would change what this run computes ({lines}); a resumed run must be the run it "
                        "continues. Pass --resume-allow-change " + " ".join(flag(k) for k, *_ in refused)
                        + " to change it anyway (recorded in summary.json), or start a new --out-dir")
    return changes


def non_finite(named_tensors) -> str | None:
    """The name of the first tensor with a NaN or inf, or None. named_tensors: (name, tensor) pairs."""
    for name, t in named_tensors:
        if t.is_floating_point() and not bool(t.isfinite().all()):
            return name
    return None


def resume_checks(cfg, state):
    """A resumed run is the run it continues: a change of what it computes is refused unless allowed, and an
    allowed one is recorded with the step it took effect (summary.json's `changes`)."""
    changes = config_changes(state.get("config") or {}, dataclasses.asdict(cfg), cfg.resume_allow_change)
    for key, _, _ in changes:
        stage = key.split(".")[0]
        if stage in ("mef", "riel") and stage in state["done"] and key.endswith(".steps"):
            raise UserError(f"--{key.replace('_', '-')}: stage {stage} already finished in this run; more steps would "
                            "be a new stage. Start a new run with --init on its last checkpoint instead")
    if changes:
        state.setdefault("changes", []).append({"gstep": state["gstep"], "changes": [list(c) for c in changes]})


SKIP_LIMIT = 5  # non-finite steps in a row that end a run: it is diverging, not unlucky
COLLAPSE_ENTROPY, COLLAPSE_STEPS = 0.05, 5  # nats per token, steps in a row


def count_skipped(state, m, stage, lr):
    """Count the optimizer steps skipped for a NaN/inf loss or gradient (summary.json's skipped_steps), and stop
    the run after SKIP_LIMIT in a row, naming the lr, instead of finishing with a model that did not train."""
    state["skipped_steps"] = state.get("skipped_steps", 0) + int(m["skipped"])
    state["skip_streak"] = state.get("skip_streak", 0) + 1 if m["skipped"] else 0
    if state["skip_streak"] >= SKIP_LIMIT:
        raise UserError(f"{stage}: {SKIP_LIMIT} optimizer steps in a row had a NaN/inf loss or gradient (step "
                        f"{state['step']}); the run is diverging. Lower --{stage}.lr ({lr:g}) and start again")


def warn_collapse(state, m, lr):
    """Once per run: the policy stopped exploring (token entropy near 0 for several steps) while its reward
    fell, the usual sign of an RL lr too high for the model."""
    if state.get("collapse_warned") or "entropy" not in m:
        return
    hist = state.setdefault("collapse_hist", [])
    hist[:] = (hist + [(m["entropy"], m["reward"])])[-COLLAPSE_STEPS:]
    if len(hist) == COLLAPSE_STEPS and all(e < COLLAPSE_ENTROPY for e, _ in hist) and hist[-1][1] <= hist[0][1]:
        state["collapse_warned"] = True
        tqdm.write(f"warning: entropy below {COLLAPSE_ENTROPY} nats for {COLLAPSE_STEPS} steps with the reward not "
                   f"rising: the policy has collapsed; --riel.lr {lr:g} is likely too high")


def stopped_message(cfg, argv) -> str:
    """Where a stopped run stands: its last complete checkpoint and the exact command that continues it."""
    if cfg is None:
        return ""
    try:
        last = checkpoint.latest(cfg.out_dir)
    except (UserError, OSError):
        last = None
    if last is None:
        return f"no checkpoint was written yet in {cfg.out_dir}: run the same command again to start over"
    args = [a for a in argv if a not in ("--resume", "--resume-or-start")]
    return f"the last complete checkpoint is {last}; continue with: python train.py {' '.join(args)} --resume".replace(
        "  ", " ")
