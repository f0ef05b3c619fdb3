"""
riel.py: Reinforced Inter-Expert Learning, stage 2 of MEML-GRPO (METHOD.md section 4): one RL step.

An "expert" is the same policy under its own system prompt P_i (i = 0..N-1). One step, for a batch
of Q questions:

  (a) sample G responses per (question, expert): N*G per question (our reading of "8 per prompt");
      reward r in {0, 1} from the caller's checker (verify.py).
  (b) advantages within each expert's own group:       A = r - mean_g(r)
  (c) policy loss with non-negative truncation:        L_GRPO = - sum_tokens logp * max(A, 0) / N_tokens
  (d) inter-expert transfer, per question: E+ = expert with the highest mean reward, E- = the lowest;
      O+ = a correct response of E+:                   L_KL = sg[logp(O+|Q,P+)] - logp(O+|Q,P-)  (token mean)
  (e) hard-example buffer: expert i with more than K of G wrong on Q -> push (Q, P_i, reference) with
      probability K/G; once it holds B entries:        L_SFT = - sum logp(O_gt|Q,P_i) / N_tokens, then clear
  (f) L = L_GRPO + lambda1 * L_KL + lambda2 * L_SFT, one optimizer step (grad clip 1.0, lr 1e-6).
      Optional: + weight * L_NLL of MEL's self-written analyses of the same rollouts (mel.py, --mel).
The math of (b)-(d) lives in losses.py, who teaches whom in (d) in transfer.py; this file chooses what to
score and runs the step.

What we keep of GRPO, and the choices the paper leaves open (all config options):
- On-policy, one update per batch: ratio == 1, so no clipping and no reference model (as nanochat's
  chat_rl.py). Options: ppo_epochs > 1 with TRL's clipped ratio (old log-probs = the first epoch's,
  detached); k3 KL to a frozen reference (kl_beta); the baselines' advantages, standard GRPO
  (r - mean)/(std + 1e-4) and Dr.GRPO r - mean with the constant normaliser N_seqs * max_new_tokens.
- Token-level aggregation: every micro-batch is divided by the token count of ALL sampled responses
  of the step, zero-advantage ones included, counted before the micro-batch loop (REFERENCES 5.3).
- A response with A == 0 contributes exactly zero loss and gradient (without a KL term), so it is
  never forwarded: with max(A, 0) that skips every below-mean and every zero-spread group.
- Transfer (our reading, METHOD.md 4(d)): the stated intent, not the printed sign; stop-gradient on
  the teacher side; ties go to the lowest expert index; skipped when E+ == E- (all means equal) or
  E+ has no correct response; one O+ drawn at random (option: all, pooled into one token mean over
  every O+ token of the step); scored at temperature 1 (it distils the policy, not the sampler).
  Option: the full-vocabulary token KL along O+.
- Buffer (our reading, METHOD.md 4(e); buffer.py): the reference is expert i's own stage-1 trace, else
  the record's first trace; a full buffer joins L_SFT into this step's optimizer step, then is emptied.
  With ppo_epochs > 1 the transfer and SFT terms join the first update only.
- A NaN/inf loss or gradient skips the optimizer step with a warning.
- Memory: sample_batch_size samples the step's rows in several calls of whole groups (the KV cache is the
  largest tensor of sampling: 15.6 GiB for 192 rows x ~760 tokens at 3B), with the same tokens as one call;
  no gradients and no cached bf16 weight copies are alive while sampling (README "Precision and memory").
- Autocast's cache is dropped between a no_grad pass and a grad-enabled one (after sampling; after the transfer's
  teacher side): before torch 2.11 a weight's bf16 copy cast under no_grad was reused by later grad-enabled
  forwards without grad history, so that weight got no gradient, silently (pytorch/pytorch#112583).
- Under torchrun (dist.py) each rank samples and scores its share of the questions (whole questions, so a
  group never spans ranks; the generator draws the whole batch's uniforms, so every token equals one
  process's), then all ranks gather the step. Everything that decides (advantages, token counts, the O+
  draw, buffer admission) runs on every rank on the gathered step, so generators and buffers stay equal;
  each rank then backpropagates its share of the rows, transfer pairs and flushed entries, normalised by
  the step's global counts, and the gradients are summed: the same update as one process.
"""
import time
from dataclasses import dataclass
from typing import Literal

import torch

import dist
from losses import (ADVANTAGE_MODES, AGGREGATIONS, TermNorms, aggregate, clipped_tokens, full_vocab_kl,
                    group_advantages, k3_kl, policy_gradient_loss, transfer_loss)
import mel
from buffer import HardExampleBuffer, admit_hard_examples
from optim import clip_and_step, length_sorted_micro_batches, micro_backward, read_sum, sharded_sft_backward
from tokenizer import render_chat, stop_token_ids
from rollout import Rollout, generate, token_logprobs
from premise import step_metrics
from transfer import transfer_pairs



@dataclass
class RIELConfig:
    steps: int | None = None  # RL steps; None: one epoch over the training questions (paper)
    questions_per_step: int = 8  # questions per step: Q * N experts * G samples rows
    group_size: int = 8  # G responses per (question, expert); paper: 8 rollouts per prompt
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    # meml: max(r - mean, 0) (paper) | grpo: (r - mean)/(std + 1e-4) | dr_grpo: r - mean (baselines)
    advantage: Literal["meml", "grpo", "dr_grpo"] = "meml"
    aggregation: Literal["token", "seq", "dr_grpo"] | None = None  # None: dr_grpo for dr_grpo, else token
    clip_eps: float = 0.2  # PPO clip, only active when ppo_epochs > 1
    clip_eps_high: float | None = None  # None: same as clip_eps
    ppo_epochs: int = 1  # updates per sampled batch; 1 = on-policy
    kl_beta: float = 0.0  # k3 KL to a frozen reference; needs ref_model
    transfer: bool = True  # (d) inter-expert mutual learning
    lambda1: float = 1.0
    transfer_mode: Literal["sampled", "full_vocab"] = "sampled"  # sg[logp+] - logp- | token KL(p+ || p-)
    transfer_all_correct: bool = False  # use every correct O+ of E+, not one at random
    buffer: bool = True  # (e) hard-example buffer
    buffer_k: int = 6  # admit when more than K of G are wrong, with probability K/G
    buffer_size: int = 64  # B: SFT step and clear when it holds this many
    lambda2: float = 1.0
    buffer_flush: Literal["all", "exact"] = "all"  # all: a full buffer empties (it may hold up to B + Q*N - 1);
    #                                                exact: the first B entries go, the rest wait for the next flush
    transfer_ties: Literal["lowest", "random"] = "lowest"  # E+/E- among tied experts: the lowest index, or at random
    # own: each term its own token mean (GRPO / all sampled tokens, transfer / O+ tokens, SFT / target tokens), as
    # METHOD.md writes them | step: every term / the step's sampled tokens, so lambda1 and lambda2 weigh a token of
    # their term as much as a GRPO token
    term_scale: Literal["own", "step"] = "own"
    mask_truncated: bool = False  # rows cut at max_new_tokens get no policy-gradient loss (DAPO's overlong mask)
    warmup_steps: int = 0  # RL lr warmup: linear over the first steps (train.py)
    grad_shares: bool = False  # log each term's gradient norm and share (one process; a copy of the gradients)
    micro_batch_size: int = 8  # rows per forward/backward
    sample_batch_size: int | None = None  # rows per sampling call (whole groups): bounds the KV cache; None: all
    lr: float = 1e-6  # for the caller's optimizer
    grad_clip: float = 1.0
    compile: bool = False  # torch.compile the sampler's decode step (rollout.generate)
    cuda_graphs: bool = False  # replay the sampler's decode step from a CUDA graph (rollout.DecodeGraph; off until a
    #                            GPU check measures it: docs/benchmark.md)

    def __post_init__(self):
        if self.advantage not in ADVANTAGE_MODES:
            raise ValueError(f"advantage must be one of {ADVANTAGE_MODES}, got {self.advantage!r}")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS} or None, got {self.aggregation!r}")
        for name, allowed in (("buffer_flush", ("all", "exact")), ("transfer_ties", ("lowest", "random")),
                              ("term_scale", ("own", "step"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.transfer_mode not in ("sampled", "full_vocab"):
            raise ValueError(f"transfer_mode must be 'sampled' or 'full_vocab', got {self.transfer_mode!r}")
        if self.group_size < 1 or self.ppo_epochs < 1 or self.micro_batch_size < 1:
            raise ValueError("group_size, ppo_epochs and micro_batch_size must be >= 1")
        if self.compile and self.cuda_graphs:
            raise ValueError("compile and cuda_graphs are two ways to speed up the same decode step: choose one")
        if self.sample_batch_size is not None and self.sample_batch_size < self.group_size:
            raise ValueError(f"sample_batch_size {self.sample_batch_size} < group_size {self.group_size}: a sampling "
                             "call holds whole groups (or None for one call)")

    def loss_aggregation(self) -> str:
        return self.aggregation or ("dr_grpo" if self.advantage == "dr_grpo" else "token")


# ---- (a) sampling and scoring ----------------------------------------------------------------------

def sample_groups(model, tok, records, experts, cfg, generator, rng_rows=None):
    """Prompt q*N + i = (question q, expert i); completion row (q*N + i)*G + g. rng_rows: see generate.
    cfg.sample_batch_size: at most that many rows per generate call (whole groups), so the KV cache holds that
    many rows, not the step's. Every call starts from the same generator state and draws the uniforms of all
    the rows (generate's rng_rows), so each row gets the token it gets in one call, and the generator ends
    where one call leaves it."""
    prompts = [render_chat(tok, ex.system_prompt, rec.question) for rec in records for ex in experts]
    G = cfg.group_size
    offset, total = rng_rows or (0, len(prompts) * G)
    per_call = len(prompts) if cfg.sample_batch_size is None else max(1, cfg.sample_batch_size // G)
    state = None
    if per_call < len(prompts):
        if generator is None:
            raise ValueError("sample_batch_size needs a generator: every sampling call replays its draw")
        state = generator.get_state()
    completions, finish, entropy = [], [], []
    model.eval()
    with torch.no_grad(), dist.unsharded(model):  # FSDP: decoding runs on the whole weights, gathered once
        for s in range(0, len(prompts), per_call):
            if state is not None:
                generator.set_state(state)
            out = generate(model, prompts[s:s + per_call], num_samples=G, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, top_p=cfg.top_p, stop_ids=stop_token_ids(tok),
                           generator=generator, vocab_limit=len(tok), rng_rows=(offset + s * G, total),
                           drop_finished=True, compile=cfg.compile, cuda_graphs=cfg.cuda_graphs,
                           entropy=cfg.temperature > 0)
            completions += out.completions
            finish += out.finish
            entropy += getattr(out, "entropy", None) or []  # (a stand-in sampler may not measure it)
    return prompts, Rollout(completions, finish, entropy or None)


def score_groups(tok, records, completions, reward_fn, n_experts, group_size):
    """reward_fn(record, completion text) -> float, for every row -> rewards (Q, N, G)."""
    per_question = n_experts * group_size
    r = [float(reward_fn(records[row // per_question], tok.decode(c, skip_special_tokens=True)))
         for row, c in enumerate(completions)]
    return torch.tensor(r, dtype=torch.float32).view(len(records), n_experts, group_size)


def sample_and_score(model, tok, records, experts, cfg, generator, reward_fn):
    """(a) for this rank's share of the questions (all of them in one process), gathered: every rank returns the
    whole step's prompts, Rollout and rewards (Q, N, G), the ones one process would have sampled."""
    N, G, Q = len(experts), cfg.group_size, len(records)
    lo, hi = dist.shard_range(Q)
    if hi == lo:
        raise ValueError(f"{Q} questions per step cannot be shared by {dist.world()} processes: raise questions_per_step")
    prompts, out = sample_groups(model, tok, records[lo:hi], experts, cfg, generator, rng_rows=(lo * N * G, Q * N * G))
    rewards = score_groups(tok, records[lo:hi], out.completions, reward_fn, N, G)
    if dist.world() == 1:
        return prompts, out, rewards
    parts = dist.all_gather_object((prompts, out.completions, out.finish, out.entropy or [], rewards.tolist()))
    prompts, completions, finish, entropy, r = ([x for part in parts for x in part[i]] for i in range(5))
    return prompts, Rollout(completions, finish, entropy or None), torch.tensor(r, dtype=torch.float32)


# ---- the three loss terms, each backpropagated micro-batch by micro-batch ---------------------------

def policy_gradient_backward(model, prompts, completions, adv, rows, cfg, counts, old_cache, ref_model=None):
    """Backprop L_GRPO over `rows` (indices into completions). adv (rows total,). counts: the step's
    n_tokens / n_seqs / max_len. old_cache: micro-batch -> old log-probs, filled by the first epoch.
    Returns (loss, mean k3 to the reference, clip fraction), read from the device once (optim.read_sum)."""
    G = cfg.group_size
    mbs = length_sorted_micro_batches([len(prompts[r // G]) + len(completions[r]) for r in rows],
                                      cfg.micro_batch_size)
    losses, kls, clipped = [], [], []
    for j, mb in enumerate(dist.lockstep(model, mbs)):  # FSDP: as many passes as the busiest rank
        idx = [rows[i] for i in mb]
        p, c = [prompts[r // G] for r in idx], [completions[r] for r in idx]
        logp, mask = token_logprobs(model, p, c, temperature=cfg.temperature)  # (b, T) each
        a = adv[idx].to(logp.device)  # (b,)
        on_policy = j not in old_cache
        old = old_cache.setdefault(j, logp.detach())  # first epoch: on-policy, ratio == 1
        per_token = policy_gradient_loss(logp, a, old, cfg.clip_eps, cfg.clip_eps_high)
        if cfg.kl_beta > 0:
            with torch.no_grad():
                ref, _ = token_logprobs(ref_model, p, c, temperature=cfg.temperature)
            kl = k3_kl(logp, ref)
            per_token = per_token + cfg.kl_beta * kl
            kls.append((kl.detach() * mask).sum())
        loss = aggregate(per_token, mask, cfg.loss_aggregation(), **counts)
        micro_backward(loss)
        losses.append(loss.detach())  # not the graph: its nodes die with the backward
        if not on_policy:  # the ratio is exactly 1 on the samples' own epoch: nothing can be clipped there
            clipped.append(clipped_tokens(logp, old, a, mask, cfg.clip_eps, cfg.clip_eps_high))
    n_fwd = sum(len(completions[r]) for r in rows) or 1
    return read_sum(losses), read_sum(kls) / n_fwd, read_sum(clipped) / n_fwd


def completion_logits(model, prompt, completion):
    """(C, V) logits that predict each completion token, from one full forward of prompt + completion."""
    ids = torch.tensor([prompt + completion], device=next(model.parameters()).device)
    return model(ids)[0, len(prompt) - 1:-1]


def transfer_backward(model, pairs, cfg, n_tokens=None) -> float:
    """Backprop lambda1 * L_KL over every (P+, P-, O+) pair; one token mean over all O+ tokens of the step
    (n_tokens; default: these pairs' own, i.e. all of them in one process)."""
    n_tokens = n_tokens or sum(len(o) for _, _, o in pairs)
    losses = []
    if cfg.transfer_mode == "full_vocab":  # one pair at a time: (C, V) logits under both prompts
        for teacher_prompt, student_prompt, o in dist.lockstep(model, pairs, no_grad_first=True):
            with torch.no_grad():
                teacher = completion_logits(model, teacher_prompt, o)
            torch.clear_autocast_cache()  # the teacher's no_grad casts give no gradient: pytorch/pytorch#112583
            student = completion_logits(model, student_prompt, o)
            loss = full_vocab_kl(teacher[None], student[None], torch.ones(1, len(o), device=student.device), n_tokens)
            micro_backward(cfg.lambda1 * loss)
            losses.append(loss.detach())  # not the graph: its nodes die with the backward
        return read_sum(losses)
    mbs = length_sorted_micro_batches([len(s) + len(o) for _, s, o in pairs], cfg.micro_batch_size)
    for mb in dist.lockstep(model, mbs, no_grad_first=True):
        outs = [pairs[i][2] for i in mb]
        with torch.no_grad():  # the teacher side is a target: sg[logp(O+ | Q, P+)]
            teacher, _ = token_logprobs(model, [pairs[i][0] for i in mb], outs)
        torch.clear_autocast_cache()  # the teacher's no_grad casts: no gradient (pytorch/pytorch#112583)
        student, mask = token_logprobs(model, [pairs[i][1] for i in mb], outs)
        loss = transfer_loss(student, teacher, mask, n_tokens)
        micro_backward(cfg.lambda1 * loss)
        losses.append(loss.detach())  # not the graph: its nodes die with the backward
    return read_sum(losses)


# ---- one RIEL step ------------------------------------------------------------------------------------

def update_policy(model, optimizer, cfg, prompts, completions, adv, rows, counts, pairs, flushed,
                  ref_model=None, mel_examples=(), mel_weight=1.0) -> dict:
    """(f) L = L_GRPO + lambda1 * L_KL + lambda2 * L_SFT [+ mel_weight * L_NLL], one optimizer step per epoch.
    The transfer, SFT and MEL terms join the first epoch only; later epochs re-use the samples through the
    clipped ratio."""
    model.train()
    old_cache, out = {}, {"clip_frac": 0.0, "skipped": False}
    my_rows, my_pairs = dist.shard(rows), dist.shard(pairs)  # this rank's share (all in one process)
    # term_scale "step": the transfer and SFT sums over the step's sampled tokens, as the GRPO term's
    n_o = sum(len(o) for *_, o in pairs)
    n_kl = counts["n_tokens"] if cfg.term_scale == "step" else n_o
    n_sft = sum(len(e.target_ids) for e in flushed)
    sft_scale = n_sft / counts["n_tokens"] if cfg.term_scale == "step" else 1.0
    for epoch in range(cfg.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        norms = TermNorms(model, cfg.grad_shares and epoch == 0 and dist.world() == 1)
        l_pg, kl_ref, clip = policy_gradient_backward(model, prompts, completions, adv, my_rows, cfg, counts,
                                                      old_cache, ref_model)
        norms.mark("grpo")
        l_pg, kl_ref, clip = over_ranks(l_pg, kl_ref, clip, sum(len(completions[r]) for r in my_rows))
        loss = l_pg
        if epoch == 0:
            l_kl = transfer_backward(model, my_pairs, cfg, n_tokens=n_kl) if pairs else 0.0
            l_kl = dist.sum_floats([l_kl])[0]
            norms.mark("transfer")
            l_sft = sft_scale * sharded_sft_backward(model, [e.prompt_ids for e in flushed],
                                                     [e.target_ids for e in flushed], cfg.micro_batch_size,
                                                     cfg.lambda2 * sft_scale) if flushed else 0.0
            norms.mark("sft")
            t_mel = time.perf_counter()
            l_mel = mel.nll_backward(model, mel_examples, cfg.micro_batch_size, mel_weight) if mel_examples else 0.0
            norms.mark("mel")
            loss = l_pg + cfg.lambda1 * l_kl + cfg.lambda2 * l_sft + mel_weight * l_mel
            out.update(loss=loss, loss_grpo=l_pg, loss_transfer=l_kl, loss_sft=l_sft, loss_mel=l_mel,
                       **({"kl": kl_ref} if cfg.kl_beta > 0 else {}),  # k3 to the reference, TRL's `kl`
                       lr=optimizer.param_groups[0]["lr"], mel_nll_s=time.perf_counter() - t_mel, **norms.metrics())
        else:  # ratio != 1 only from the second epoch on
            out["clip_frac"] += clip / (cfg.ppo_epochs - 1)
        grad_norm, skipped = clip_and_step(model, optimizer, cfg.grad_clip, loss)
        out.setdefault("grad_norm", grad_norm)  # the first (on-policy) update's norm
        out["skipped"] |= skipped
    return out


def over_ranks(l_pg, kl_ref, clip, n_tokens):
    """This rank's policy-gradient loss (already over the global count) and per-token means over its n_tokens
    -> the whole step's values, on every rank (unchanged in one process)."""
    return dist.sum_floats([l_pg])[0], dist.mean_over_ranks(kl_ref, n_tokens), dist.mean_over_ranks(clip, n_tokens)


def length_metrics(lengths, finish) -> dict:
    """Completion lengths in tokens, under TRL's names; clipped = cut at max_new_tokens."""
    n = max(1, len(lengths))
    return {"completions/mean_length": sum(lengths) / n, "completions/min_length": min(lengths, default=0),
            "completions/max_length": max(lengths, default=0),
            "completions/clipped_ratio": sum(f == "length" for f in finish) / n}


def riel_step(model, tok, records, experts, cfg: RIELConfig, optimizer, buffer: HardExampleBuffer,
              generator, reward_fn, ref_model=None, mel_cfg: mel.MELConfig | None = None, samples: int = 0) -> dict:
    """One RIEL step on a batch of records. reward_fn(record, completion_text) -> float in {0, 1}.
    The generator drives sampling, the O+ draw, buffer admission and MEL's pairs and analyses (drawn last,
    so turning MEL on leaves the draws before it unchanged). mel_cfg: the optional MEL loss (mel.py).
    Returns a flat dict of metrics; with samples=k also "samples": the groups of the first k questions (texts,
    rewards, advantages), for samples.jsonl."""
    if cfg.kl_beta > 0 and ref_model is None:
        raise ValueError("kl_beta > 0 needs a frozen ref_model")
    N = len(experts)
    t0 = time.perf_counter()
    # nothing of training lives on while sampling: no gradients (None, not zeros), no bf16 weight copies cached by
    # autocast (sampling casts the current weights afresh; a caller may have stepped without dropping them)
    optimizer.zero_grad(set_to_none=True)
    torch.clear_autocast_cache()
    prompts, out, rewards = sample_and_score(model, tok, records, experts, cfg, generator, reward_fn)  # (a)
    completions = out.completions  # Q*N*G rows; rewards (Q, N, G)
    sample_s = time.perf_counter() - t0

    adv = group_advantages(rewards, cfg.advantage).flatten()  # (b), (Q*N*G,) in row order
    lengths = [len(c) for c in completions]
    # mask_truncated: a cut row is neither trained nor counted; its reward still counts in its group's mean
    counted = [0 if cfg.mask_truncated and f == "length" else n for n, f in zip(lengths, out.finish)]
    counts = {"n_tokens": max(1, sum(counted)), "n_seqs": len(completions), "max_len": cfg.max_new_tokens}
    signal = (adv != 0).tolist() if cfg.kl_beta == 0 else [True] * len(completions)
    rows = [r for r in range(len(completions)) if counted[r] > 0 and signal[r]]
    pairs, chosen = ([], [])
    if cfg.transfer and N > 1:  # (d)
        pairs, chosen = transfer_pairs(rewards, prompts, completions, generator, cfg.transfer_all_correct,
                                       cfg.transfer_ties == "random")
    admitted, flushed = 0, []
    if cfg.buffer:  # (e)
        admitted = admit_hard_examples(buffer, tok, records, experts, prompts, rewards, cfg.buffer_k, generator)
        flushed = buffer.take_all(cfg.buffer_size if cfg.buffer_flush == "exact" else None) if buffer.is_full() else []
    mel_examples, mel_m = [], {}
    use_mel = mel_cfg is not None and mel_cfg.enabled
    if use_mel:  # MEL, an extra loss from the same rollouts (mel.py)
        mel_examples, mel_m = mel.collect(model, tok, records, experts, completions, rewards, mel_cfg,
                                          cfg.max_new_tokens, cfg.top_p, generator, reward_fn)

    torch.clear_autocast_cache()  # casts cached while sampling (no_grad) give no gradient: pytorch/pytorch#112583
    m = update_policy(model, optimizer, cfg, prompts, completions, adv, rows, counts, pairs, flushed, ref_model,
                      mel_examples, mel_cfg.weight if use_mel else 0.0)
    l_mel, nll_s = m.pop("loss_mel"), m.pop("mel_nll_s")
    if use_mel:
        mel_m.update({"mel/loss_nll": l_mel, "mel_s": mel_m["mel/collect_s"] + nll_s})
    train_s = time.perf_counter() - t0 - sample_s - mel_m.get("mel/collect_s", 0.0)
    trained_tokens = sum(lengths[r] for r in rows) + sum(len(o) for *_, o in pairs)
    m.update(step_metrics(rewards, experts, chosen), **mel_m)
    m.update(sampled_rows=len(completions), trained_rows=len(rows), trained_tokens=trained_tokens,
             transfer_pairs=len(pairs), flushed_entries=[(e.question_id, e.expert) for e in flushed],
             buffer_admitted=admitted,
             buffer_size=len(buffer.entries), buffer_flushes=buffer.flushes, flushed=len(flushed),
             **length_metrics(lengths, out.finish),
             **({"entropy": sum(e * n for e, n in zip(out.entropy, lengths)) / max(1, sum(lengths))}
                if out.entropy else {}),  # token mean, nats
             sample_s=sample_s, train_s=train_s, tokens_per_s=sum(lengths) / max(sample_s, 1e-9),
             train_tokens_per_s=trained_tokens / max(train_s, 1e-9))
    if samples:
        m["samples"] = group_samples(tok, records[:samples], experts, completions, rewards, adv, cfg.group_size)
    return m


def group_samples(tok, records, experts, completions, rewards, adv, G) -> list:
    """What the model wrote: one dict per (question, expert) group of the given first questions."""
    N = len(experts)
    return [{"question": rec.question, "answer": rec.answer, "expert": ex.name,
             "completions": [tok.decode(completions[(q * N + i) * G + g], skip_special_tokens=True) for g in range(G)],
             "rewards": rewards[q, i].tolist(), "advantages": adv[(q * N + i) * G:(q * N + i + 1) * G].tolist()}
            for q, rec in enumerate(records) for i, ex in enumerate(experts)]
