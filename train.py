"""
train.py: MEML-GRPO end to end in one readable loop: MEF (multi-expert SFT), RIEL (RL), eval.

    python train.py                          # tiny model, synthetic task, CPU, a few minutes
    python train.py --model llama3.2-3b      # the paper's setting: GSM8K, 3 experts, G = 8
    python train.py --riel.advantage grpo --experts rationale --riel.no-transfer --riel.no-buffer
    python train.py --resume                 # continue the run in --out-dir from its checkpoint
    python train.py --mel                    # + MEL: learn from self-written analyses (mel.py)
    torchrun --standalone --nproc_per_node 8 train.py ...   # data-parallel on 8 GPUs (dist.py)

Data flows one way: data (records, experts) -> mef.py (stage 1) -> riel.py (stage 2: rollout.py
samples, verify.py scores, losses.py turns rewards into gradients) -> eval.py. This file only wires
them together, logs, and checkpoints; the options and their per-model defaults are in config.py,
the checks that keep a run safe in guard.py, the process (lock, signals, exit status) in
process.py, `--plan` in tools/plan_fit.py. Choices:
- Defaults depend on --model: the paper's (MEF lr 1e-5 1 epoch, RIEL lr 1e-6 1 epoch, G = 8,
  GSM8K) for a real model; for `tiny`, which starts from random weights, a from-scratch SFT with a
  larger lr and a harder RL task, so that the reward sparsity MEML-GRPO targets is real.
- Precision `auto`: on CUDA fp32 master weights with bf16 autocast (a 1e-6 update vanishes in a
  bf16 weight); on CPU fp32. `bf16` stores the weights in bf16 to save memory.
- Every optimizer step is a JSON line in metrics.jsonl; stdout gets a line every --log-every steps
  (~20 a stage: the means since the last line) under tqdm's bar; curves.png draws them (runlog.py).
- The tiny default stops MEF by measurement, not by a step count (`--mef.stop-at`, `competent`):
  RL starts where the best expert solves about a fifth of the RL questions greedily.
- Checkpoints are atomic (checkpoint.py) and hold everything `--resume` needs to continue bit for
  bit: weights, optimizer, sampling RNG, buffer, stage and step. The data order is a function of
  (seed, step), never of history. SIGTERM checkpoints at the next step and exits 143 (process.py).
- `--lora-rank R`: LoRA adapters on a frozen base (lora.py); checkpoints hold merged + adapters.
- Under torchrun every rank runs this loop on the same data order; mef.py, riel.py, eval.py split
  each step (dist.py). Rank 0 alone writes checkpoints, metrics, summary, log; all resume from it.
"""

import dataclasses
import json
import os
import signal
import sys
import time
from contextlib import nullcontext

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, lambda *_: (print("\ninterrupted: nothing was written yet",
                  file=sys.stderr), sys.exit(130)))  # Ctrl-C while the imports run: no traceback
import torch
from tqdm import tqdm

import data
import verify
from config import Config, defaults  # noqa: F401  (train.Config: the options, in config.py)
from eval import EvalConfig, evaluate, format_table, headline
from mef import SFTExample, build_sft_examples, encode_target, lr_schedule, mef_steps, num_steps
from model import Transformer, tiny_config
from plumbing import checkpoint, dist, guard, lora, process, runlog
from plumbing.errors import UserError
from plumbing.optim import drop_cast_weights, make_optimizer
from plumbing.tokenizer import load_tokenizer, render_chat, stop_token_ids
from riel import HardExampleBuffer, reference_trace, riel_step
from rollout import generate

# ---- setup -------------------------------------------------------------------------------------

def load_records(cfg: Config, split: str, stage: str) -> list:
    options = {}
    if cfg.data == "synthetic":
        levels = cfg.difficulty if stage == "mef" else (cfg.rl_difficulty or cfg.difficulty)
        options = {"difficulty": tuple(levels), "seed": cfg.seed, "testbed": cfg.testbed}
        if stage == "mef" and cfg.sft_cross is not None:
            options["sft_cross"] = cfg.sft_cross
        if split == "train" and cfg.train_size:
            options["n"] = cfg.train_size
    records = data.load(cfg.data, split, cfg.data_dir, **options)
    capped = split != data.SPLITS[cfg.data].eval and cfg.train_size
    return records[:cfg.train_size] if capped else records

def load_experts(cfg: Config) -> list:
    experts = data.experts(cfg.data, list(cfg.experts) if cfg.experts is not None else None,
                           **({"testbed": cfg.testbed} if cfg.data == "synthetic" else {}))
    if not experts:
        raise UserError("--experts is empty: name at least one expert of the task")
    for item in cfg.sources:
        name, _, source = item.partition("=")
        if source not in ("gold", "file", "self") or name not in [e.name for e in experts]:
            raise UserError(f"--sources {item!r}: expected <expert>=gold|file|self with an expert "
                            f"of {cfg.data}")
        experts = [dataclasses.replace(e, source=source) if e.name == name else e for e in experts]
    return experts

def with_traces(cfg, records, experts, model, tok, log):
    """Swap in `file` / `self` traces where an expert asks for them (data/traces.py); log the kept
    fraction."""
    if all(e.source == "gold" for e in experts):
        return records
    sampler = lambda prompts, **kw: generate(model, prompts, stop_ids=stop_token_ids(tok),
                                             vocab_limit=len(tok), **kw)
    with dist.unsharded(model):  # FSDP: decoding runs on the whole weights (every rank decodes)
        records, stats = data.collect_traces(cfg.data, records, experts, cfg.trace_file,
                                             generate=sampler, tok=tok, render_chat=render_chat,
                                             max_new_tokens=cfg.riel.max_new_tokens)
    for s in stats:
        log.write({"stage": "traces", **dataclasses.asdict(s)})
    return records

# ---- the run -----------------------------------------------------------------------------------

def main(cfg: Config):
    t_start = time.time()
    if cfg.plan:  # no GPU, no weights, no data needed
        from tools import plan_fit  # a tool: loaded only when asked for (tests/test_imports.py)
        return plan_fit.print_plan(cfg)
    guard.check_options(cfg, data.check_files)  # before anything loads or is written
    device = dist.init(cfg.device)  # under torchrun: joins the process group; this rank's device
    if not dist.is_main():
        sys.stdout = open(os.devnull, "w")  # one log, rank 0's; errors and warnings reach stderr
    dist.check_world(cfg.riel.questions_per_step, cfg.eval.batch_size)
    if dist.is_main():
        guard.check_writable(cfg.out_dir, resume=cfg.resume and not cfg.resume_or_start)
    with process.owned(cfg.out_dir):  # the lock on out_dir and SIGTERM's handler, until we exit
        run(cfg, device, t_start)

def run(cfg: Config, device, t_start):
    ckpt, state = process.start_or_resume(cfg)  # ckpt None: a new run
    if cfg.micro_batch == "auto":  # before resume_checks: it compares the sizes that will run
        from tools import plan_fit  # --micro-batch auto plans: the planner loads only then
        plan_fit.auto_micro_batches(cfg, state, device)
    if ckpt:
        guard.resume_checks(cfg, state, dataclasses.asdict(defaults(cfg.model, cfg.testbed)))
        print(f"resuming from {ckpt}: stage {state['stage']}, step {state['step']}, "
              f"done {state['done']}")
    torch.manual_seed(cfg.seed)
    param_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    on_cuda = device.type == "cuda"
    use_autocast = cfg.precision == "autocast" or (cfg.precision == "auto" and on_cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else nullcontext()

    source = ckpt or cfg.init or cfg.model
    base = lora.weights_source(cfg.lora_rank, cfg.fsdp, cfg.out_dir, ckpt, source)  # LoRA: its base
    if base == "tiny":
        model = Transformer.from_config(tiny_config(), device, param_dtype, seed=cfg.seed)
    else:
        model = Transformer.from_pretrained(base, device, param_dtype)
        if bad := guard.non_finite(model.state_dict().items()):  # never train on from a NaN
            hint = (checkpoint.fallback_hint(cfg.out_dir, ckpt) if ckpt
                    else "Use another --init/--model.")
            raise UserError(f"{base}: weight {bad} holds NaN or inf. " + hint)
    bf16 = torch.bfloat16 if use_autocast else None
    if cfg.lora_rank:  # a frozen base needs no fp32 copy
        lora.attach(model, cfg.lora_rank, cfg.lora_alpha, cfg.out_dir, ckpt, seed=cfg.seed,
                    from_scratch=base == "tiny", base_dtype=bf16)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    # DDP/FSDP: gradients summed over ranks; under autocast FSDP gathers bf16 weights
    dist.wrap(model, device, fsdp=cfg.fsdp, compute_dtype=bf16)
    tok = load_tokenizer(source)
    experts = load_experts(cfg)
    eval_split = data.SPLITS[cfg.data].eval
    resumed_at = state["gstep"] if ckpt else None
    tracker = (runlog.Tracker(cfg.report_to, cfg.out_dir, dataclasses.asdict(cfg), resumed_at)
               if cfg.report_to != "none" and dist.is_main() else None)
    log = (runlog.MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), resumed_at, tracker)
           if dist.is_main() else runlog.NullLog())
    print(f"model {source}: {model.num_params() / 1e6:.2f}M params on {device} ({cfg.precision}) x "
          f"{dist.world()} processes; task {cfg.data}; experts {[e.name for e in experts]}; "
          f"stages {list(cfg.stages)}")

    def save(stage, step, optimizer=None, generator=None, buffer=None):
        weights, opt_state = dist.full_state(model, optimizer)  # FSDP: all gather, rank 0 gets
        weights, files = lora.checkpoint_parts(model, weights) if cfg.lora_rank else (weights, None)
        state.update(stage=stage, step=step, wall_s=state["wall_s"] + time.time() - save.t0,
                     optimizer=opt_state, config=dataclasses.asdict(cfg),
                     generator=generator.get_state() if generator is not None else None,
                     buffer=buffer.to_dict() if buffer else None)
        save.t0 = time.time()
        if dist.is_main() and (bad := guard.non_finite((weights or model.state_dict()).items())):
            raise UserError(f"weight {bad} is NaN or inf at {stage} step {step}: not saved (the "
                            f"last complete checkpoint is {checkpoint.latest(cfg.out_dir)}). The "
                            f"lr is likely too high: lower --{stage}.lr "
                            f"({getattr(cfg, stage).lr:g})")
        path = (checkpoint.save(cfg.out_dir, model, tok, state, weights, keep=2, files=files)
                if dist.is_main() else None)
        dist.barrier()  # no rank runs ahead of (or resumes past) a checkpoint that is not complete
        return path
    save.t0 = t_start

    def run_eval(name):
        for split in (eval_split, *[s for s in cfg.eval_splits if s != eval_split]):
            key = name if split == eval_split else f"{name}@{split}"  # e.g. after_riel@val
            if key in state["evals"]:
                continue
            with autocast:  # SIGTERM: stops at a batch; the stage's checkpoint stands, resume evals
                res = evaluate(model, tok, cfg.data, load_records(cfg, split, "eval"), experts,
                               cfg.eval, seed=cfg.seed, keep_texts=cfg.log_samples_every > 0,
                               stop=process.stop_point)
            if "samples" in res:
                log.samples({"stage": "eval", "name": key, "gstep": state["gstep"],
                             "answers": res.pop("samples")})
            print(f"\n[eval {key}]\n" + format_table(res))
            state["evals"][key] = res
            checkpoint.record_evals(cfg.out_dir, state["evals"])  # a resume does not redo it
            log.write({"stage": "eval", "name": key, "gstep": state["gstep"], **res})

    for stage in [s for s in ("mef", "riel") if s in cfg.stages]:
        if stage not in state["done"]:
            if data.SPLITS[cfg.data].train is None:
                raise UserError(f"{cfg.data} is for evaluation only: use --stages eval")
            records = load_records(cfg, data.SPLITS[cfg.data].train, stage)
            with autocast:  # self-sampled traces in the precision RIEL samples in
                records = with_traces(cfg, records, experts, model, tok, log)
            start = state["step"] if state["stage"] == stage else 0
            resumed = state.get("optimizer") if state["stage"] == stage else None
            run = run_mef if stage == "mef" else run_riel
            with autocast:
                run(cfg, model, tok, records, experts, state, start, resumed, save, log)
            state["done"].append(stage)
            save(stage, state["step"])
        if "eval" in cfg.stages:
            run_eval(f"after_{stage}")  # a no-op when this checkpoint already holds it
        if dist.is_main() and cfg.curves and stage == "mef" and "riel" in cfg.stages:
            runlog.write_curves(cfg.out_dir)  # the picture so far, to look at while RIEL runs
    if "eval" in cfg.stages and not any(f"after_{s}" in state["evals"] for s in ("mef", "riel")):
        run_eval("final")
    if dist.is_main():
        checkpoint.prune(cfg.out_dir, 1, checkpoint.latest(cfg.out_dir))  # done: no fallback needed
        runlog.write_summary(cfg, state, log, time.time() - save.t0, headline(state["evals"]))
        log.close()

def replay_examples(cfg, tok, experts):
    """--sft-replay: the (question id, expert) entries a RIEL run's buffer flushed (its
    flushed.jsonl), in flush order, each with the reference trace the buffer used on the RL-level
    training records of this seed: a control that matches MEML's SFT in content, not only count."""
    records = {r.id: r for r in load_records(cfg, data.SPLITS[cfg.data].train, "riel")}
    by_name = {e.name: e for e in experts}
    def known(entry, where):  # another seed's or testbed's entry is refused at its line
        q, e = (entry.get(k) if isinstance(entry, dict) else 0 for k in ("question_id", "expert"))
        if not (isinstance(q, str) and q in records and isinstance(e, str) and e in by_name):
            raise UserError(f"{where}: {entry} names no question / expert of this run's RL "
                            "training records or experts (another seed or testbed?)")
    examples = []
    for entry in data.common.read_jsonl(cfg.sft_replay, (), check=known, empty_ok=True):
        rec, ex = records[entry["question_id"]], by_name[entry["expert"]]
        prompt = render_chat(tok, ex.system_prompt, rec.question)
        examples.append(SFTExample(rec.id, ex.name, prompt,
                                   encode_target(tok, reference_trace(rec, ex))))
    return examples, {"examples": len(examples), "replayed_from": cfg.sft_replay}

def run_mef(cfg, model, tok, records, experts, state, start, resumed, save, log):
    examples, counts = (replay_examples(cfg, tok, experts) if cfg.sft_replay else
                        build_sft_examples(tok, records, experts, cfg.mef.max_len))
    if not examples:
        if cfg.sft_replay:  # the buffer never flushed: the control trains on nothing
            return print(f"MEF: {cfg.sft_replay} is empty: no steps, the weights stay as loaded")
        raise UserError(f"MEF has no examples in the {cfg.data} training split"
                        + (f" under {cfg.data_dir}" if cfg.data_dir else "")
                        + f" ({counts}): check that file")
    total = num_steps(len(examples), cfg.mef)
    lines = runlog.StepLines(cfg.log_every, start, total)
    print(f"MEF: {counts['examples']} examples ({counts}), {total} steps of {cfg.mef.batch_size}; "
          f"a line every {lines.every} steps (means since the previous line)")
    opt = make_optimizer(dist.parameters(model), lr=cfg.mef.lr, weight_decay=cfg.mef.weight_decay)
    if resumed:
        dist.load_optimizer(model, opt, resumed)
    calib = (load_records(cfg, data.SPLITS[cfg.data].train, "riel")[:cfg.mef.check_size]
             if cfg.mef.stop_at is not None else [])  # the stop check's questions, loaded once
    bar = tqdm(total=total, initial=start, desc="mef", dynamic_ncols=True,
               disable=not dist.is_main())
    t0 = time.time()
    for m in mef_steps(model, examples, cfg.mef, opt, seed=cfg.seed, start_step=start,
                       lr_at=lr_schedule(cfg.mef, total), shuffle=not cfg.sft_replay):
        state["gstep"] += 1
        m.update(stage="mef", gstep=state["gstep"], tokens_per_s=m["tokens"] / (time.time() - t0))
        t0 = time.time()
        log.write(m)
        bar.update(1)
        if a := lines(m["step"], m):
            tqdm.write(f"mef {a['step']:>5}/{total} loss {a['loss']:.4f} lr {a['lr']:.2e} "
                       f"gnorm {a['grad_norm']:.2f} {a['tokens_per_s']:,.0f} tok/s")
        state["step"] = m["step"]
        guard.count_skipped(state, m, "mef", cfg.mef.lr)
        due = cfg.mef.stop_at is not None and m["step"] % cfg.mef.check_every == 0
        if due and m["step"] < total and competent(cfg, model, tok, experts, calib, state, log):
            break
        stop = process.stop_requested()  # SIGTERM on any rank: all checkpoint here, then exit 143
        if stop or (m["step"] % cfg.checkpoint_every == 0 and m["step"] < total):
            save("mef", m["step"], opt)
        if stop:
            raise process.Stopped()
    bar.close()

def competent(cfg, model, tok, experts, records, state, log) -> bool:
    """MEF's early stop (TINY_RL.md 4A): RL teaches best from the edge of competence, and how many
    SFT steps reach it swings with seed and machine (a phase change: 3% to 70% within a few hundred
    steps). So measure instead of guessing: greedy accuracy per expert on RL-level training
    questions (never the held-out ones)."""
    res = quick_eval(cfg, model, tok, experts, records, state, log, "mef_check")
    if done := res["best_accuracy"] >= cfg.mef.stop_at:
        tqdm.write(f"mef check: best >= {100 * cfg.mef.stop_at:.0f}%: stop MEF here")
    return done

def quick_eval(cfg, model, tok, experts, records, state, log, stage: str) -> dict:
    """Greedy accuracy of each expert, the best one and the vote on a fixed subset, logged as a
    `stage` line (metrics.jsonl, the tracker, curves.png): mef_check (MEF's early stop, on RL-level
    training questions) or eval_riel (--eval-every, on held-out ones; the answers go to
    samples.jsonl). Its own seeded sampler: it changes nothing of the run."""
    res = evaluate(model, tok, cfg.data, records, experts,
                   EvalConfig(max_new_tokens=cfg.eval.max_new_tokens,
                              batch_size=cfg.eval.batch_size),
                   seed=cfg.seed, keep_texts=stage == "eval_riel" and cfg.log_samples_every > 0)
    drop_cast_weights()  # its casts were made under no_grad
    model.train()
    at = {"stage": stage, "step": state["step"], "gstep": state["gstep"]}
    if "samples" in res:
        log.samples({**at, "answers": res.pop("samples")})
    log.write({**at, **res})
    tqdm.write(f"{stage} {state['step']:>5}: greedy on {len(records)} questions "
               + " ".join(f"{k} {100 * v:.1f}%" for k, v in res["accuracy"].items())
               + f", vote {100 * res['majority_vote']:.1f}%")
    return res

def run_riel(cfg, model, tok, records, experts, state, start, resumed, save, log):
    rc = cfg.riel
    steps = rc.steps or max(1, len(records) // rc.questions_per_step)  # paper: one epoch
    opt = make_optimizer(dist.parameters(model), lr=rc.lr, weight_decay=0.0)
    device = model.embed_tokens.weight.device
    # + start: a finished stage made longer (no generator saved at its end) draws anew
    generator = torch.Generator(device=device).manual_seed(cfg.seed + start)
    buffer = HardExampleBuffer(rc.buffer_size)
    if resumed:
        dist.load_optimizer(model, opt, resumed)
        generator.set_state(state["generator"])
        buffer = HardExampleBuffer.from_dict(state["buffer"])
    bf16 = torch.bfloat16 if torch.is_autocast_enabled(device.type) else None
    ref_model = None if rc.kl_beta == 0 else (  # LoRA: the policy with its adapters off
        lora.BaseModel(model) if cfg.lora_rank else checkpoint.reference_model(
            cfg.out_dir, model, bf16))
    reward_fn = lambda record, text: verify.reward(cfg.data, text, record.answer)
    lines = runlog.StepLines(cfg.log_every, start, steps)
    held_out = (load_records(cfg, data.SPLITS[cfg.data].eval, "eval")[:cfg.eval_every_size]
                if cfg.eval_every else [])
    zero_streak = 0
    print(f"RIEL: {steps} steps of {rc.questions_per_step} questions x {len(experts)} experts x "
          f"{rc.group_size} samples; a line every {lines.every} steps (means since the previous "
          "line)")
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="riel",
                     dynamic_ncols=True, disable=not dist.is_main()):
        ids = data.question_batch(len(records), rc.questions_per_step, step, cfg.seed)
        batch = [records[i] for i in ids]
        for group in opt.param_groups:  # RL warmup: linear over rc.warmup_steps, then constant
            group["lr"] = rc.lr * min(1.0, (step + 1) / max(1, rc.warmup_steps))
        ramp = min(1.0, (step + 1) / max(1, rc.lambda1_warmup))  # lambda1's warm-up, the same
        rc_now = dataclasses.replace(rc, lambda1=rc.lambda1 * ramp) if ramp < 1 else rc
        keep = cfg.log_samples_every > 0 and (step + 1) % cfg.log_samples_every == 0
        m = riel_step(model, tok, batch, experts, rc_now, opt, buffer, generator, reward_fn,
                      ref_model, cfg.mel, int(keep))
        state["gstep"] += 1
        state["step"] = step + 1
        at = {"stage": "riel", "step": step + 1, "gstep": state["gstep"]}
        flushed = m.pop("flushed_entries")
        if flushed and dist.is_main():  # what the buffer replayed, for the control (--sft-replay)
            with open(os.path.join(cfg.out_dir, "flushed.jsonl"), "a") as f:
                f.writelines(json.dumps({"step": step + 1, "question_id": q, "expert": e}) + "\n"
                             for q, e in flushed)
        if keep:
            log.samples({**at, "groups": m.pop("samples")})
        log.write({**at, **m})
        guard.count_skipped(state, m, "riel", rc.lr)
        guard.warn_collapse(state, m, rc.lr)
        zero_streak = zero_streak + 1 if m["reward"] == 0 else 0
        if zero_streak in (10, 50, 250) and cfg.log_samples_every > 0:  # GRPO's commonest complaint
            tqdm.write(f"riel {step + 1}: reward 0 for {zero_streak} steps: what the model writes "
                       f"is in {os.path.join(cfg.out_dir, 'samples.jsonl')}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            quick_eval(cfg, model, tok, experts, held_out, state, log, "eval_riel")
        if a := lines(step + 1, m):
            tqdm.write(runlog.riel_line(step + 1, steps, a))
        stop = process.stop_requested()  # SIGTERM on any rank: all checkpoint here, then exit 143
        if stop or ((step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps):
            save("riel", step + 1, opt, generator, buffer)
        if stop:
            raise process.Stopped()

def cli(argv=None) -> Config:
    """Parse the command line with the defaults of the chosen --model (--help shows those)."""
    argv = sys.argv[1:] if argv is None else argv
    argv = ["--mel.enabled" if a == "--mel" else a for a in argv]  # `--mel` alone switches MEL on

    def flag(name):
        value = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)
        if value is None and f"--{name}" in argv and argv.index(f"--{name}") + 1 < len(argv):
            value = argv[argv.index(f"--{name}") + 1]
        return value
    import tyro  # only the command line needs it: a GPU image without tyro still imports this file
    cfg = tyro.cli(Config, default=defaults(flag("model") or "tiny", flag("testbed") or "nested"),
                   args=argv)
    sizes = ("--mef.micro-batch-size", "--riel.micro-batch-size")
    given = [a.split("=")[0] for a in argv if a.split("=")[0].replace("_", "-") in sizes]
    if cfg.micro_batch == "auto" and given:  # auto would override it: refused, not silently done
        raise UserError(f"--micro-batch auto chooses the micro-batch sizes and {given[0]} fixes "
                        "one: pass one or the other")
    return cfg

if __name__ == "__main__":
    process.command_line(cli, main)  # exit status and one-line errors (process.py)
