"""
config.py: every option of a run (Config: `python train.py --help` lists them with these comments)
and the defaults that depend on --model (`defaults`): from-scratch settings for the `tiny` preset,
the paper's for a real model. train.py parses the command line into a Config with the chosen
model's defaults, so --help shows the right ones; guard.check_options validates it before anything
loads.

tyro turns each field's comment into its --help text: the comment on the field's line, else the
comment lines right above it, joined (a line that starts with no letter starts a new help line). A
comment above a field also labels an uncommented field right below it, so those stay inline.
"""
from dataclasses import dataclass, field, replace
from typing import Literal

import data
from eval import EvalConfig
from mef import MEFConfig
from mel import MELConfig
from riel import RIELConfig

Stage = Literal["mef", "riel", "eval"]


@dataclass
class Config:
    # a preset (tiny, llama3.2-3b, qwen2.5-0.5b, smollm2-135m, ...), a directory or a hub id
    model: str = "tiny"
    data: str = "synthetic"  # synthetic | gsm8k | mathqa | strategyqa | math500 (eval only)
    data_dir: str | None = None  # where the task files are (default: data/<task>/ in this project)
    # expert names, in order (default: all); one name = ExpertX baseline
    experts: tuple[str, ...] | None = None
    # trace source overrides, e.g. rationale=self program=file (METHOD.md 2)
    sources: tuple[str, ...] = ()
    trace_file: str | None = None  # JSONL of teacher traces for experts with source `file`
    stages: tuple[Stage, ...] = ("mef", "riel", "eval")
    init: str | None = None  # start from this checkpoint directory instead of --model's weights
    out_dir: str = "out/run"
    # continue the run in out_dir from its last complete checkpoint (refused when there is none)
    resume: bool = False
    # resume out_dir's run if it holds a checkpoint, else start one there
    resume_or_start: bool = False
    resume_allow_change: tuple[str, ...] = ()  # --resume: options it may change (as riel.lr, seed)
    seed: int = 0
    device: str | None = None  # default: cuda if available, else cpu
    # auto: autocast on CUDA, fp32 on CPU | autocast: fp32 weights, bf16 autocast, any device (on
    # CPU: tries the GPU path) | fp32 | bf16: bf16 weights
    precision: Literal["auto", "autocast", "fp32", "bf16"] = "auto"
    # recompute activations in backward: memory for ~30% more compute
    gradient_checkpointing: bool = False
    # under torchrun: shard weights, gradients and optimizer state over the ranks (FSDP2, dist.py)
    fsdp: bool = False
    # > 0: train LoRA adapters of this rank on every attention/MLP linear, base frozen (lora.py)
    lora_rank: int = 0
    # LoRA scale alpha / rank: a fixed alpha keeps the best lr rank-independent (lora.py)
    lora_alpha: float = 32.0
    # print this run's GPU memory plan and exit (plan.py: the real code on fake tensors, offline)
    plan: bool = False
    # --plan: also a RIEL step's seconds and the run's hours on this GPU, one of h100 h200 a100
    # l40s 4090 (plan_time.py: FLOPs and bytes counted on the plan's fake run)
    plan_gpu: str | None = None
    # --plan: the GPU's memory in GiB (default: --plan-gpu's, else 80)
    plan_gpu_gb: float | None = None
    # --plan: GPUs (processes) of the run; with --fsdp they share the model
    plan_world_size: int = 1
    # --plan: also list the largest storages alive at each peak (op, module, shape)
    plan_detail: bool = False
    # auto (CUDA, and with --plan; CPU: the defaults): the largest MEF and RIEL micro-batches whose
    # memory plan leaves 10% of the GPU free (plan_fit: 4+ plans of ~1 min at 3B); kept on --resume
    micro_batch: Literal["default", "auto"] = "default"
    train_size: int | None = None  # use at most this many training questions
    difficulty: tuple[int, int] = (1, 6)  # synthetic only: question levels for MEF
    # synthetic only: levels for RIEL and eval (default: same)
    rl_difficulty: tuple[int, int] | None = None
    # synthetic only: data/synthetic.py
    testbed: Literal["nested", "complementary", "placebo", "disjoint", "disjoint_same"] = "nested"
    # disjoint testbeds: MEF keeps a non-owner expert's trace with this probability
    sft_cross: float | None = None
    # MEF on exactly these (question id, expert) entries of a run's flushed.jsonl, in order, with
    # the buffer's reference traces (the content-matched gold-SFT control)
    sft_replay: str | None = None
    # evaluate on these splits too (synthetic: val), logged as after_<stage>@<split>
    eval_splits: tuple[str, ...] = ()
    checkpoint_every: int = 50  # optimizer steps
    # a stdout line every N steps (None: ~20 per stage); metrics.jsonl has them all
    log_every: int | None = None
    # draw curves.png after MEF and at the end (needs matplotlib; 1-5 s of CPU each time)
    curves: bool = True
    # a tracker too (optional package; runlog.Tracker)
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    # RIEL: every N steps one question's groups (texts, rewards, advantages) go to samples.jsonl, as
    # do the answers of every eval; 0: off
    log_samples_every: int = 10
    # RIEL: every N steps, greedy accuracy (each expert, best, vote) on held-out questions; 0: off
    eval_every: int = 0
    eval_every_size: int = 100  # ... on the eval split's first this many questions (a fixed subset)
    mef: MEFConfig = field(default_factory=MEFConfig)
    riel: RIELConfig = field(default_factory=RIELConfig)
    mel: MELConfig = field(default_factory=MELConfig)  # `--mel` turns it on
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---- presets: how a run's defaults differ from the dataclasses' (the paper's), as data ----------
# A real model (any --model but tiny): GSM8K, longer answers, micro-batches that fit one GPU at 3B;
# sampling 96 of the 192 rows at a time halves the KV cache and gives the same tokens (README).
# The transfer's weight for every preset (the paper: own, lambda1 1; README): each token weighs as a
# policy-gradient token, lambda1 0.3, chosen on validation seeds (docs/positive_control.md).
TRANSFER = {"riel.term_scale": "step", "riel.lambda1": 0.3}
REAL_MODEL = {"data": "gsm8k", "gradient_checkpointing": True, "mef.micro_batch_size": 4,
              "eval.max_new_tokens": 512, "riel.max_new_tokens": 512, "riel.micro_batch_size": 4,
              "riel.questions_per_step": 8, "riel.sample_batch_size": 96, **TRANSFER}
# tiny, from random weights: SFT on levels 1-2 until the best expert solves ~20% of level 2 greedily
# (mef.stop_at: the edge of competence), then RL on level 2, where most groups get no reward spread
TINY = {"difficulty": (1, 2), "rl_difficulty": (2, 2), "train_size": 10000,
        "checkpoint_every": 100, "eval_every": 50, "mef.epochs": 2, "mef.lr": 3e-3,
        "mef.batch_size": 64,
        "mef.micro_batch_size": 64, "mef.max_len": 256, "mef.warmup_steps": 20,
        "mef.schedule": "cosine", "mef.stop_at": 0.2, "mef.check_every": 25, "mef.check_size": 100,
        "riel.steps": 250, "riel.questions_per_step": 16, "riel.group_size": 8,
        "riel.max_new_tokens": 48, "riel.lr": 3e-4, **TRANSFER, "riel.micro_batch_size": 64,
        "riel.buffer_size": 32, "riel.grad_shares": True, "mel.max_analysis_tokens": 48,
        "eval.size": 300, "eval.max_new_tokens": 48, "eval.batch_size": 150}
# tiny, per --testbed (data/synthetic.py): chain traces run to ~63 tokens; on a disjoint testbed an
# epoch is half the examples, and each expert must get strong on its own shape to rescue the other
TINY_TESTBEDS = {
    "complementary": {"riel.max_new_tokens": 64, "eval.max_new_tokens": 64},
    "disjoint": {"mef.epochs": 4, "mef.stop_at": 0.3},
    "disjoint_same": {"mef.epochs": 4, "mef.stop_at": 0.3},
}


def with_options(cfg: Config, options: dict) -> Config:
    """cfg with options ({"riel.lr": 1e-4, "seed": 1, ...}) set; a stage's dataclass is rebuilt."""
    top = {k: v for k, v in options.items() if "." not in k}
    stages = {}
    for key, value in options.items():
        if "." in key:
            stage, name = key.split(".", 1)
            stages.setdefault(stage, {})[name] = value
    return replace(cfg, **top, **{s: replace(getattr(cfg, s), **kw) for s, kw in stages.items()})


def defaults(model: str, testbed: str = "nested") -> Config:
    """The defaults of a run, by model (and, for tiny, by testbed): the tables above."""
    if model != "tiny":
        return with_options(Config(model=model), REAL_MODEL)
    testbed = testbed if testbed in data.synthetic.TESTBEDS else "nested"
    return with_options(Config(testbed=testbed), {**TINY, **TINY_TESTBEDS.get(testbed, {})})
