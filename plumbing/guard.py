"""
guard.py: what keeps a run from losing its work or silently lying. train.py calls these; they decide
nothing about training itself (the process, its lock and its signals: process.py).

- check_options: every option checked BEFORE any model or data loads: ranges, finite learning
  rates, "0" where a user would mean "none" refused with the option's name (--riel.steps 0 does
  not mean "one epoch"), a group of one sample refused where an advantage needs a group, a
  --plan-gpu plan_time.py has no figures for, --fsdp without torchrun, a data file or split the
  stages will read that is missing, an --init whose config.json or weights would not load.
- config_changes: on --resume, the saved config against the new one. A change to anything that
  alters what the run computes (data, experts, testbed, seed, model, LoRA, group size, advantage,
  lrs, ...) is refused unless --resume-allow-change names its key; logging options pass; a LoRA
  run's --lora-rank / --lora-alpha never change (its adapters have their shape and scale).
- resume_checks: a resumed run is the run it continues (config_changes on the values the run
  uses: an unset --riel.buffer-k is the K it derives; an option the checkpoint lacks, its
  default), except that a larger --riel.steps or --mef.epochs extends its stage, finished or not
  (extend). A checkpoint that records no options is refused.
- non_finite: the first weight holding a NaN or inf: no such checkpoint is written or resumed.
- check_writable: the output directory takes a file, checked before the model loads (a read-only
  or missing parent directory would otherwise fail only at the first checkpoint, minutes in); a
  file is not a directory; --resume does not make a mistyped one.
- count_skipped / warn_collapse: a run that diverges (NaN/inf steps in a row) stops and names the
  lr; one whose policy collapsed (entropy near 0, reward not rising) is warned about once.
"""
import dataclasses
import math
import os

from tqdm import tqdm

from plumbing import checkpoint, dist, presets
from plumbing.errors import UserError

# options that change what a run logs or writes, never what it computes: free to change on --resume
LOGGING = {"resume", "resume_or_start", "resume_allow_change", "log_every", "curves", "report_to",
           "log_samples_every", "checkpoint_every", "plan", "plan_gpu", "plan_gpu_gb",
           "plan_world_size", "plan_detail", "device", "out_dir",
           "micro_batch"}  # micro_batch: how the sizes were chosen; the sizes are compared
EXTENDS = {"riel.steps": "riel", "mef.epochs": "mef"}  # on --resume, more extends its stage
FIXED = {"lora_rank", "lora_alpha"}  # the saved adapters' shapes and scale: no resume can change


def _positive(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise UserError(f"--{name} {value}: must be >= 1" + (" (or unset)" if allow_none else ""))


def _lr(name, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"--{name} {value}: a learning rate must be a finite number > 0")


def check_options(cfg, check_files=None):
    """Raise UserError for the first option no run could mean. cfg: train.Config. check_files:
    data.check_files (guard does not import data), for the splits the stages will read."""
    r, m, e = cfg.riel, cfg.mef, cfg.eval
    for name, value, none_ok in (
            ("riel.steps", r.steps, True), ("riel.questions-per-step", r.questions_per_step, False),
            ("riel.max-new-tokens", r.max_new_tokens, False),
            ("riel.micro-batch-size", r.micro_batch_size, False),
            ("riel.buffer-size", r.buffer_size, False), ("mef.epochs", m.epochs, False),
            ("mef.batch-size", m.batch_size, False),
            ("mef.micro-batch-size", m.micro_batch_size, False),
            ("mef.check-every", m.check_every, False), ("mef.check-size", m.check_size, False),
            ("mef.max-len", m.max_len, False), ("eval.size", e.size, True),
            ("eval.batch-size", e.batch_size, False),
            ("eval.max-new-tokens", e.max_new_tokens, False),
            ("train-size", cfg.train_size, True), ("checkpoint-every", cfg.checkpoint_every, False),
            ("eval-every-size", cfg.eval_every_size, False), ("log-every", cfg.log_every, True)):
        _positive(name, value, none_ok)
    _lr("mef.lr", m.lr)
    _lr("riel.lr", r.lr)
    for name, value in (("riel.grad-clip", r.grad_clip), ("mef.grad-clip", m.grad_clip),
                        ("riel.lambda1", r.lambda1), ("riel.lambda2", r.lambda2),
                        ("riel.kl-beta", r.kl_beta), ("riel.temperature", r.temperature),
                        ("eval-every", cfg.eval_every),
                        ("log-samples-every", cfg.log_samples_every),
                        ("lora-rank", cfg.lora_rank), ("mef.weight-decay", m.weight_decay),
                        ("mef.warmup-steps", m.warmup_steps), ("riel.warmup-steps", r.warmup_steps),
                        ("riel.clip-eps", r.clip_eps),
                        ("riel.clip-eps-high", 0 if r.clip_eps_high is None else r.clip_eps_high),
                        ("riel.lambda1-warmup", r.lambda1_warmup),
                        ("riel.transfer-cap", 0 if r.transfer_cap is None else r.transfer_cap)):
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{name} {value}: must be a finite number >= 0")
    if not 0 <= cfg.seed < 2 ** 32:
        raise UserError(f"--seed {cfg.seed}: must be in [0, 2**32 - 1]")
    if not (math.isfinite(r.top_p) and 0 < r.top_p <= 1):
        raise UserError(f"--riel.top-p {r.top_p}: a probability mass in (0, 1]")
    if not (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0):
        raise UserError(f"--lora-alpha {cfg.lora_alpha}: must be a finite number > 0")
    if r.temperature == 0:
        raise UserError("--riel.temperature 0: RL samples; greedy decoding gives a group no spread "
                        "(use > 0)")
    if r.group_size < 2:
        raise UserError(f"--riel.group-size {r.group_size}: a group advantage (r - mean of the "
                        "group) needs >= 2 samples; with one every advantage is 0 and nothing is "
                        "learned")
    if r.buffer_k is not None and not 0 <= r.buffer_k < r.group_size:
        raise UserError(f"--riel.buffer-k {r.buffer_k}: must be in [0, group size {r.group_size})")
    if m.stop_at is not None and not (math.isfinite(m.stop_at) and m.stop_at >= 0):
        raise UserError(f"--mef.stop-at {m.stop_at}: a share of questions >= 0 (above 1: never), "
                        "or None")
    lo, hi = cfg.difficulty
    if not 1 <= lo <= hi:
        raise UserError(f"--difficulty {lo} {hi}: levels are >= 1, low first")
    if cfg.rl_difficulty is not None and not 1 <= cfg.rl_difficulty[0] <= cfg.rl_difficulty[1]:
        lo, hi = cfg.rl_difficulty
        raise UserError(f"--rl-difficulty {lo} {hi}: levels are >= 1, low first")
    if cfg.init and os.path.isdir(cfg.init) and (bad := checkpoint.model_problem(cfg.init)):
        raise UserError(f"--init {cfg.init} is damaged: {' '.join(bad)}. Use another checkpoint")
    if cfg.trace_file is not None and not os.path.isfile(cfg.trace_file):
        raise UserError(f"--trace-file {cfg.trace_file}: no such file")
    disjoint = cfg.data == "synthetic" and cfg.testbed.startswith("disjoint")  # synthetic.DISJOINT
    if cfg.sft_cross is not None and not (disjoint and 0.0 <= cfg.sft_cross <= 1.0):
        raise UserError(f"--sft-cross {cfg.sft_cross}: a probability in [0, 1], for a --testbed "
                        "disjoint* only")
    if cfg.sft_replay is not None and not os.path.isfile(cfg.sft_replay):
        raise UserError(f"--sft-replay {cfg.sft_replay}: not a file (a RIEL run's flushed.jsonl)")
    _check_plan(cfg)
    presets.check_name(cfg.model)  # (before the data: a misspelt model changes the data's default)
    if check_files is not None:  # a missing test file must not wait for MEF to end
        evaluating = "eval" in cfg.stages
        held_out = evaluating or ("riel" in cfg.stages and cfg.eval_every > 0)
        roles = ("train",) * bool({"mef", "riel"} & set(cfg.stages)) + ("eval",) * held_out
        check_files(cfg.data, cfg.data_dir, roles, cfg.eval_splits if evaluating else ())
    if r.transfer_cap is not None and dist.launched():
        raise UserError("--riel.transfer-cap compares the terms' gradients of one process: run it "
                        "without torchrun")
    if cfg.fsdp and not cfg.plan and not dist.launched():  # --plan --fsdp plans it anywhere
        raise UserError("--fsdp shards the model over torchrun's processes: launch with torchrun "
                        "(README)")


def _check_plan(cfg):
    if cfg.plan_gpu is not None and not cfg.plan:
        raise UserError(f"--plan-gpu {cfg.plan_gpu}: an estimate of --plan's; pass --plan too")
    if cfg.plan_gpu_gb is not None and not (math.isfinite(cfg.plan_gpu_gb) and cfg.plan_gpu_gb > 0):
        raise UserError(f"--plan-gpu-gb {cfg.plan_gpu_gb}: a GPU's memory in GiB, > 0")
    _positive("plan-world-size", cfg.plan_world_size)


def check_writable(out_dir: str, resume: bool = False):
    """Make out_dir and prove it takes a file: a clear error, not an OSError minutes in. resume
    (--resume alone): out_dir must exist, and a mistyped one is not made."""
    if resume and not os.path.isdir(out_dir):
        raise UserError(f"--resume: {out_dir} does not exist: nothing to resume. Check --out-dir, "
                        "or pass --resume-or-start to start a new run there")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out-dir {out_dir} is a file, not a directory: choose a directory")
    probe = os.path.join(out_dir, ".write_probe")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise UserError(f"--out-dir {out_dir} cannot be written ({err.strerror}): choose a "
                        "writable directory")


# ---- resume -------------------------------------------------------------------------------------

def flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(saved: dict, new: dict, allowed=()) -> list:
    """[(key, saved value, new value)] of every option the resumed run would change, logging ones
    excepted. Raises UserError for a change not in `allowed` (keys as in summary.json's config)."""
    old, now = flat(saved), flat(new)
    changes = [(k, old.get(k), now.get(k)) for k in sorted(set(old) | set(now))
               if k.split(".")[0] not in LOGGING and old.get(k) != now.get(k) and k in old]
    allowed = {a.lstrip("-").replace("-", "_") for a in allowed}  # riel.lr, --riel.lr, riel.kl-beta
    refused = [c for c in changes if c[0] not in allowed]
    flag = lambda key: key.replace("_", "-")  # noqa: E731  (as the command line spells it)
    if fixed := [c for c in changes if c[0] in FIXED and (old.get("lora_rank") or now.get(
            "lora_rank"))]:
        raise UserError(f"--resume cannot change --{flag(fixed[0][0])} ({fixed[0][1]!r} -> "
                        f"{fixed[0][2]!r}), even when allowed: a run resumes with the adapters it "
                        "was written with (their shape and scale), or none. Start a new run from "
                        "its last checkpoint instead: --init OUT/ckpt-N with another --out-dir")
    if refused:
        lines = ", ".join(f"--{flag(k)} {a!r} -> {b!r}" for k, a, b in refused)
        raise UserError(f"--resume would change what this run computes ({lines}); a resumed run "
                        "must be the run it continues. Pass --resume-allow-change "
                        + " ".join(flag(k) for k, *_ in refused)
                        + " to change it anyway (recorded in summary.json), or start a new "
                        "--out-dir")
    return changes


def non_finite(named_tensors) -> str | None:
    """The name of the first tensor with a NaN or inf, or None. named_tensors: (name, tensor)."""
    for name, t in named_tensors:
        if t.is_floating_point() and not bool(t.isfinite().all()):
            return name
    return None


def _as_run(config: dict, riel) -> dict:
    """config with riel.buffer_k as the K the run uses: unset (None) is riel.hard_k()'s 3G/4, so a
    checkpoint that saved the former default 6 resumes under the default None at G = 8."""
    r = config.get("riel")
    if not r or "buffer_k" not in r or r.get("group_size") != riel.group_size:
        return config  # another group size: refused as such
    k = dataclasses.replace(riel, buffer_k=r["buffer_k"]).hard_k()
    return {**config, "riel": {**r, "buffer_k": k}}


def _longer(old, new, state, stage) -> bool:
    """Whether new (riel.steps, mef.epochs) lengthens its stage. riel.steps None (one epoch) ran
    state["step"] steps once RIEL finished; before that its length is unknown here."""
    if new is None or old == new:
        return False
    if old is None:
        return state["stage"] == stage and stage in state["done"] and new > state["step"]
    return new > old


def extend(state, stage: str, key: str):
    """A finished stage asked for more steps goes on: it leaves `done`, its step count continues
    where it ended, and its after-stage evaluations run again at the new end. Not once a later
    stage has begun."""
    if stage not in state["done"]:
        return  # unfinished: it runs on to the new end
    if state["stage"] != stage:
        raise UserError(f"--{key.replace('_', '-')}: stage {stage} is done and {state['stage']} "
                        "has trained on its result in this run; more steps would come after RL. "
                        "Start a new run with --init on its last checkpoint instead")
    state["done"].remove(stage)
    for name in [k for k in state["evals"] if k.split("@")[0] == f"after_{stage}"]:
        del state["evals"][name]


def _with_defaults(saved: dict, default: dict) -> dict:
    """saved, with the options it lacks (added after it was written, or deleted by hand) at their
    defaults: what that run computed with."""
    out = {**default, **saved}
    for k, v in default.items():
        if isinstance(v, dict) and isinstance(saved.get(k), dict):
            out[k] = _with_defaults(saved[k], v)
    return out


def resume_checks(cfg, state, default: dict | None = None):
    """A resumed run is the run it continues: a change of what it computes is refused unless
    allowed or a larger riel.steps / mef.epochs (an extension), and recorded with the step it took
    effect (summary.json's `resume_changes`). default: the options' defaults (as a dict), for the
    options the saved config lacks: one set there is a change too."""
    if not state.get("config"):
        raise UserError("the checkpoint's trainer_state.pt records no options (no 'config'): a "
                        "resume cannot tell what this command would change. Start a new run from "
                        "it instead: --init <that checkpoint> in another --out-dir")
    saved = _as_run(_with_defaults(state["config"], default or {}), cfg.riel)
    new = _as_run(dataclasses.asdict(cfg), cfg.riel)
    longer = [k for k, stage in EXTENDS.items()
              if _longer(flat(saved).get(k), flat(new).get(k), state, stage)]
    changes = config_changes(saved, new, (*cfg.resume_allow_change, *longer))
    for key in longer:
        extend(state, EXTENDS[key], key)
    if changes:
        state.setdefault("changes", []).append({"gstep": state["gstep"],
                                                "changes": [list(c) for c in changes]})


SKIP_LIMIT = 5  # non-finite steps in a row that end a run: it is diverging, not unlucky
COLLAPSE_ENTROPY, COLLAPSE_STEPS = 0.05, 5  # nats per token, steps in a row


def count_skipped(state, m, stage, lr):
    """Count the optimizer steps skipped for a NaN/inf loss or gradient (summary.json's
    skipped_steps), and stop the run after SKIP_LIMIT in a row, naming the lr, rather than end with
    a model that did not train."""
    state["skipped_steps"] = state.get("skipped_steps", 0) + int(m["skipped"])
    state["skip_streak"] = state.get("skip_streak", 0) + 1 if m["skipped"] else 0
    if state["skip_streak"] >= SKIP_LIMIT:
        raise UserError(f"{stage}: {SKIP_LIMIT} optimizer steps in a row had a NaN/inf loss or "
                        f"gradient (step {state['step']}); the run is diverging. Lower "
                        f"--{stage}.lr ({lr:g}) and start again")


def warn_collapse(state, m, lr):
    """Once per run: the policy stopped exploring (token entropy near 0 for several steps) while its
    reward fell, the usual sign of an RL lr too high for the model."""
    if state.get("collapse_warned") or "entropy" not in m:
        return
    hist = state.setdefault("collapse_hist", [])
    hist[:] = (hist + [(m["entropy"], m["reward"])])[-COLLAPSE_STEPS:]
    if (len(hist) == COLLAPSE_STEPS and all(e < COLLAPSE_ENTROPY for e, _ in hist)
            and hist[-1][1] <= hist[0][1]):
        state["collapse_warned"] = True
        tqdm.write(f"warning: entropy below {COLLAPSE_ENTROPY} nats for {COLLAPSE_STEPS} steps "
                   "with the reward not rising: the policy has collapsed; "
                   f"--riel.lr {lr:g} is likely too high")
