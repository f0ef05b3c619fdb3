"""
riel.py: Reinforced Inter-Expert Learning, stage 2 of MEML-GRPO (METHOD.md 4): one RL step.

An "expert" is the same policy under its own system prompt P_i (i = 0..N-1). One step, for a batch
of Q questions (riel_step below runs (a)-(f) in this order):

  (a) sample G responses per (question, expert), N*G per question; reward r in {0, 1} (verify.py).
  (b) advantages within each expert's own group:  A = r - mean_g(r)
  (c) policy loss with non-negative truncation:   L_GRPO = - sum_tokens logp * max(A, 0) / N_tokens
  (d) inter-expert transfer, per question: E+ = expert with the highest mean reward, E- = lowest;
      O+ = a correct response of E+:              L_KL = sg[logp(O+|Q,P+)] - logp(O+|Q,P-)
  (e) hard-example buffer: expert i with more than K of G wrong on Q -> push (Q, P_i, reference)
      w.p. K/G; once it holds B entries:          L_SFT = - sum logp(O_gt|Q,P_i) / N_tokens
  (f) L = L_GRPO + lambda1 * L_KL + lambda2 * L_SFT, one optimizer step (grad clip 1.0, lr 1e-6).
      Optional: + weight * L_NLL of MEL's self-written analyses of these rollouts (mel.py, --mel).
The math of (b)-(e) lives in losses.py; this file chooses what to score and runs the step.

Our choices where the paper is open (RIELConfig options; METHOD.md 4 says why):
- On-policy, one update per batch: ratio == 1, so no clip and no reference model (as nanochat's
  chat_rl.py). Options: ppo_epochs > 1 (TRL's clipped ratio), a k3 KL to a frozen reference, the
  baselines' advantages (losses.py). A row with A == 0 has no gradient and is never forwarded.
- Transfer: the stated intent, not the printed sign; teacher side stop-gradient; ties to the lowest
  index; one O+ at random; scored at temperature 1 (it distils the policy, not the sampler).
- Buffer: the reference is the expert's own stage-1 trace, else the record's first; a full buffer
  joins L_SFT into this step, then empties. Transfer and SFT join only a step's first epoch.
- Under torchrun each rank samples its share of the questions, every decision runs on every rank on
  the gathered step, each rank backpropagates its share: one process's update (dist.py).
"""
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

import mel
from losses import (ADVANTAGE_MODES, AGGREGATIONS, CORRECT, admit_hard_example, aggregate,
                    clipped_tokens, full_vocab_kl, group_advantages, k3_kl, policy_gradient_loss,
                    transfer_loss, transfer_pairs)
from mef import SFTExample, encode_target, sharded_sft_backward
from plumbing import dist
from plumbing.optim import (TermNorms, clip_and_step, drop_cast_weights,
                            length_sorted_micro_batches, micro_backward, read_sum)
from plumbing.premise import step_metrics
from plumbing.runlog import batch_metrics, group_samples
from plumbing.tokenizer import render_chat, stop_token_ids
from rollout import Rollout, completion_logits, generate, token_logprobs


@dataclass
class RIELConfig:
    steps: int | None = None  # RL steps; None: one epoch over the training questions (paper)
    questions_per_step: int = 8  # questions per step: Q * N experts * G samples rows
    group_size: int = 8  # G responses per (question, expert); paper: 8 rollouts per prompt
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    # meml: max(r - mean, 0) (paper) | grpo: (r - mean)/(std + 1e-4) | dr_grpo: r - mean
    advantage: Literal["meml", "grpo", "dr_grpo"] = "meml"
    aggregation: Literal["token", "seq", "dr_grpo"] | None = None  # None: dr_grpo's own, else token
    clip_eps: float = 0.2  # PPO clip, only active when ppo_epochs > 1
    clip_eps_high: float | None = None  # None: same as clip_eps
    ppo_epochs: int = 1  # updates per sampled batch; 1 = on-policy
    kl_beta: float = 0.0  # k3 KL to a frozen reference; needs ref_model
    transfer: bool = True  # (d) inter-expert mutual learning
    lambda1: float = 1.0
    lambda1_warmup: int = 0  # RL steps over which lambda1 ramps up linearly (train.py); 0: none
    transfer_cap: float | None = None  # the transfer's grad norm <= this x GRPO's (one process)
    transfer_mode: Literal["sampled", "full_vocab"] = "sampled"  # sg[logp+] - logp- | KL(p+ || p-)
    transfer_all_correct: bool = False  # use every correct O+ of E+, not one at random
    buffer: bool = True  # (e) hard-example buffer
    buffer_k: int | None = None  # admit if over K of G are wrong, w.p. K/G; None: 3G/4 (6 of 8)
    buffer_size: int = 64  # B: SFT step and clear when it holds this many
    lambda2: float = 1.0
    # all: a full buffer empties (up to B + Q*N - 1 entries) | exact: the first B go, the rest wait
    buffer_flush: Literal["all", "exact"] = "all"
    transfer_ties: Literal["lowest", "random"] = "lowest"  # E+/E- among tied experts
    # own: each term its own token mean (GRPO / all sampled tokens, transfer / O+ tokens, SFT /
    # target tokens), as METHOD.md writes them | step: every term / the step's sampled tokens
    term_scale: Literal["own", "step"] = "own"
    mask_truncated: bool = False  # rows cut at max_new_tokens get no policy-gradient loss (DAPO)
    warmup_steps: int = 0  # RL lr warmup: linear over the first steps (train.py)
    grad_shares: bool = False  # log each term's gradient norm and share (one process; a copy)
    micro_batch_size: int = 8  # rows per forward/backward
    sample_batch_size: int | None = None  # rows per sampling call (whole groups); None: all
    lr: float = 1e-6  # for the caller's optimizer
    grad_clip: float = 1.0
    compile: bool = False  # torch.compile the sampler's decode step (rollout.generate)
    cuda_graphs: bool = False  # replay the decode step from a CUDA graph (docs/benchmark.md)

    def __post_init__(self):
        choices = (("advantage", ADVANTAGE_MODES), ("aggregation", AGGREGATIONS + (None,)),
                   ("buffer_flush", ("all", "exact")), ("transfer_ties", ("lowest", "random")),
                   ("term_scale", ("own", "step")), ("transfer_mode", ("sampled", "full_vocab")))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.group_size < 1 or self.ppo_epochs < 1 or self.micro_batch_size < 1:
            raise ValueError("group_size, ppo_epochs and micro_batch_size must be >= 1")
        if self.compile and self.cuda_graphs:
            raise ValueError("compile and cuda_graphs speed up the same decode step: choose one")
        if self.sample_batch_size is not None and self.sample_batch_size < self.group_size:
            raise ValueError(f"sample_batch_size {self.sample_batch_size} < group_size "
                             f"{self.group_size}: a sampling call holds whole groups (or None)")

    def loss_aggregation(self) -> str:
        return self.aggregation or ("dr_grpo" if self.advantage == "dr_grpo" else "token")

    def hard_k(self) -> int:
        """K of the buffer's rule: as given, else the paper's 6 of 8 scaled to the group size."""
        return self.buffer_k if self.buffer_k is not None else (3 * self.group_size) // 4


# ---- one RIEL step ----------------------------------------------------------------------------

@dataclass
class Batch:
    """What one step trains on: the rows it sampled and what (b)-(e) chose from them."""
    prompts: list  # Q*N prompts: row q*N + i = (question q, expert i)
    completions: list  # Q*N*G completions: row (q*N + i)*G + g
    adv: torch.Tensor  # (Q*N*G,) advantages
    rows: list  # the rows with a policy-gradient signal
    counts: dict  # the step's n_tokens / n_seqs / max_len, the normalisers of every micro-batch
    pairs: list = field(default_factory=list)  # (P+ prompt, P- prompt, O+) of the transfer
    flushed: list = field(default_factory=list)  # HardExample entries the buffer released
    mel_examples: list = field(default_factory=list)  # MEL's kept analyses


def riel_step(model, tok, records, experts, cfg: RIELConfig, optimizer, buffer, generator,
              reward_fn, ref_model=None, mel_cfg=None, samples: int = 0) -> dict:
    """One RIEL step on a batch of records; reward_fn(record, completion_text) -> float in {0, 1}.
    The generator drives sampling, the O+ draw, buffer admission and MEL (drawn last). Returns a
    flat dict of metrics; with samples=k also the first k questions' groups, for samples.jsonl."""
    if cfg.kl_beta > 0 and ref_model is None:
        raise ValueError("kl_beta > 0 needs a frozen ref_model")
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)  # nothing of training stays alive while sampling
    drop_cast_weights()
    prompts, out, rewards = sample_and_score(model, tok, records, experts, cfg, generator,  # (a)
                                             reward_fn)
    sample_s = time.perf_counter() - t0
    adv = group_advantages(rewards, cfg.advantage).flatten()  # (b), (Q*N*G,) in row order
    batch = Batch(prompts, out.completions, adv, *signal_rows(adv, out, cfg))
    batch.pairs, chosen = transfer_pairs(  # (d)
        rewards, prompts, out.completions, generator, cfg.transfer_all_correct,
        cfg.transfer_ties == "random") if cfg.transfer and len(experts) > 1 else ([], [])
    admitted = admit_hard_examples(buffer, tok, records, experts, prompts, rewards,  # (e)
                                   cfg.hard_k(), generator) if cfg.buffer else 0
    if cfg.buffer and buffer.is_full():
        batch.flushed = buffer.take_all(cfg.buffer_size if cfg.buffer_flush == "exact" else None)
    use_mel, mel_m = mel_cfg is not None and mel_cfg.enabled, {}
    if use_mel:  # MEL: an extra loss from the same rollouts (mel.py)
        batch.mel_examples, mel_m = mel.collect(model, tok, records, experts, out.completions,
                                                rewards, mel_cfg, cfg.max_new_tokens, cfg.top_p,
                                                generator, reward_fn)
    drop_cast_weights()  # sampling cast under no_grad
    m = update_policy(model, optimizer, cfg, batch, ref_model, use_mel and mel_cfg.weight)  # (f)
    l_mel, nll_s = m.pop("loss_mel"), m.pop("mel_nll_s")
    mel_m |= {"mel/loss_nll": l_mel, "mel_s": mel_m["mel/collect_s"] + nll_s} if use_mel else {}
    train_s = time.perf_counter() - t0 - sample_s - mel_m.get("mel/collect_s", 0.0)
    m.update(step_metrics(rewards, experts, chosen, correct=CORRECT), **mel_m,
             buffer_admitted=admitted, buffer_size=len(buffer.entries),
             buffer_flushes=buffer.flushes, **batch_metrics(batch, out, sample_s, train_s))
    if samples:
        m["samples"] = group_samples(tok, records[:samples], experts, out.completions, rewards, adv)
    return m


def update_policy(model, optimizer, cfg, batch: Batch, ref_model=None, mel_weight=0.0) -> dict:
    """(f) L = L_GRPO + lambda1 * L_KL + lambda2 * L_SFT [+ mel_weight * L_NLL], one optimizer step
    per epoch. Each *_backward leaves its weighted term's gradient in .grad and returns the term's
    value; the transfer, SFT and MEL terms join the first epoch only."""
    model.train()
    old_cache, out = {}, {"clip_frac": 0.0, "skipped": False}
    n_kl, sft_scale = term_scales(cfg, batch)
    for epoch in range(cfg.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        norms = TermNorms(model, epoch == 0 and (cfg.grad_shares or cfg.transfer_cap is not None),
                          cap=cfg.transfer_cap)
        l_pg, kl_ref, clip = policy_gradient_backward(model, batch, cfg, old_cache, ref_model)
        norms.mark("grpo")
        loss = l_pg
        if epoch == 0:
            l_kl = dist.sum_floats([transfer_backward(model, dist.shard(batch.pairs), cfg, n_kl)
                                    if batch.pairs else 0.0])[0]
            norms.mark("transfer")
            l_sft = sft_scale * buffer_backward(model, batch.flushed, cfg, sft_scale)
            norms.mark("sft")
            t_mel = time.perf_counter()
            l_mel = mel.nll_backward(model, batch.mel_examples, cfg.micro_batch_size,
                                     mel_weight) if batch.mel_examples else 0.0
            norms.mark("mel")
            loss = l_pg + cfg.lambda1 * l_kl + cfg.lambda2 * l_sft + mel_weight * l_mel
            out.update(loss=loss, loss_grpo=l_pg, loss_transfer=l_kl, loss_sft=l_sft,
                       loss_mel=l_mel, **({"kl": kl_ref} if cfg.kl_beta > 0 else {}),  # TRL's `kl`
                       lr=optimizer.param_groups[0]["lr"], mel_nll_s=time.perf_counter() - t_mel,
                       **norms.metrics())
        else:  # ratio != 1 only from the second epoch on
            out["clip_frac"] += clip / (cfg.ppo_epochs - 1)
        grad_norm, skipped = clip_and_step(model, optimizer, cfg.grad_clip, loss)
        out.setdefault("grad_norm", grad_norm)  # the first (on-policy) update's norm
        out["skipped"] |= skipped
    return out


def signal_rows(adv, out: Rollout, cfg) -> tuple:
    """The rows that carry a policy gradient, and the step's counts (the normalisers of every term).
    mask_truncated: a cut row is neither trained nor counted, but its reward counts in its group."""
    counted = [0 if cfg.mask_truncated and f == "length" else len(c)
               for c, f in zip(out.completions, out.finish)]
    counts = {"n_tokens": max(1, sum(counted)), "n_seqs": len(out.completions),
              "max_len": cfg.max_new_tokens}
    signal = (adv != 0).tolist() if cfg.kl_beta == 0 else [True] * len(counted)
    return [r for r in range(len(counted)) if counted[r] > 0 and signal[r]], counts


def term_scales(cfg, batch: Batch) -> tuple:
    """term_scale "own": the transfer over its O+ tokens, the SFT term over its targets' (scale 1);
    "step": both over the step's sampled tokens, so a token of each term weighs as a GRPO token."""
    own, n = cfg.term_scale == "own", batch.counts["n_tokens"]
    n_kl = sum(len(o) for *_, o in batch.pairs) if own else n
    sft_scale = 1.0 if own else sum(len(e.target_ids) for e in batch.flushed) / n
    return n_kl, sft_scale


# ---- (a) sampling and scoring -----------------------------------------------------------------

def sample_groups(model, tok, records, experts, cfg, generator, rng_rows=None):
    """Prompt q*N + i = (question q, expert i), completions (q*N + i)*G + g; rng_rows: generate's.
    sample_batch_size: at most that many rows (whole groups) per call, so the KV cache holds that
    many; every call replays the generator state and draws all rows' uniforms: one call's tokens."""
    prompts = [render_chat(tok, e.system_prompt, r.question) for r in records for e in experts]
    G = cfg.group_size
    offset, total = rng_rows or (0, len(prompts) * G)
    per_call = len(prompts) if cfg.sample_batch_size is None else max(1, cfg.sample_batch_size // G)
    if per_call < len(prompts) and generator is None:
        raise ValueError("sample_batch_size needs a generator: every call replays its draw")
    state = generator.get_state() if per_call < len(prompts) else None
    completions, finish, entropy = [], [], []
    model.eval()
    with torch.no_grad(), dist.unsharded(model):  # FSDP: decoding runs on the whole weights
        for s in range(0, len(prompts), per_call):
            if state is not None:
                generator.set_state(state)
            out = generate(model, prompts[s:s + per_call], num_samples=G,
                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           top_p=cfg.top_p, stop_ids=stop_token_ids(tok), generator=generator,
                           vocab_limit=len(tok), rng_rows=(offset + s * G, total),
                           drop_finished=True, compile=cfg.compile, cuda_graphs=cfg.cuda_graphs,
                           entropy=cfg.temperature > 0)
            completions += out.completions
            finish += out.finish
            entropy += out.entropy or []
    return prompts, Rollout(completions, finish, entropy or None)


def score_groups(tok, records, completions, reward_fn, n_experts, group_size):
    """reward_fn(record, completion text) -> float, for every row -> rewards (Q, N, G)."""
    per_question = n_experts * group_size
    r = [float(reward_fn(records[row // per_question], tok.decode(c, skip_special_tokens=True)))
         for row, c in enumerate(completions)]
    return torch.tensor(r, dtype=torch.float32).view(len(records), n_experts, group_size)


def sample_and_score(model, tok, records, experts, cfg, generator, reward_fn):
    """(a) for this rank's share of the questions, gathered: every rank returns the whole step's
    prompts, Rollout and rewards (Q, N, G), the ones one process would have sampled."""
    N, G, Q = len(experts), cfg.group_size, len(records)
    lo, hi = dist.shard_range(Q)
    if hi == lo:
        raise ValueError(f"{Q} questions per step cannot be shared by {dist.world()} processes")
    prompts, out = sample_groups(model, tok, records[lo:hi], experts, cfg, generator,
                                 rng_rows=(lo * N * G, Q * N * G))
    rewards = score_groups(tok, records[lo:hi], out.completions, reward_fn, N, G)
    if dist.world() == 1:
        return prompts, out, rewards
    parts = dist.all_gather_object((prompts, out.completions, out.finish, out.entropy or [],
                                    rewards.tolist()))
    prompts, completions, finish, entropy, r = ([x for p in parts for x in p[i]] for i in range(5))
    return prompts, Rollout(completions, finish, entropy or None), torch.tensor(r)


# ---- (e) the hard-example buffer --------------------------------------------------------------

HardExample = SFTExample  # a buffer entry: (question_id, expert, prompt_ids, target_ids), as MEF's


@dataclass
class HardExampleBuffer:
    """Entries are plain lists of ids, so the buffer goes into a checkpoint as plain data."""
    capacity: int = 64
    entries: list = field(default_factory=list)  # list[HardExample]
    flushes: int = 0

    def is_full(self) -> bool:
        return len(self.entries) >= self.capacity

    def take_all(self, n: int | None = None) -> list:
        """Empty the buffer for its SFT step (n: the n oldest; the rest wait); count the flush."""
        out, self.entries = self.entries[:n], self.entries[len(self.entries) if n is None else n:]
        self.flushes += 1
        return out

    def to_dict(self) -> dict:  # plain data, for checkpoints
        return {"capacity": self.capacity, "flushes": self.flushes,
                "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict) -> "HardExampleBuffer":
        return cls(d["capacity"], [HardExample(**e) for e in d["entries"]], d["flushes"])


def reference_trace(record, expert):
    """The buffer's O_gt: the expert's own stage-1 trace, else the record's first (our reading)."""
    return record.traces.get(expert.name) or next((t for t in record.traces.values() if t), None)


def admit_hard_examples(buffer, tok, records, experts, prompts, rewards, k, generator=None) -> int:
    """(e) offer every (question, expert) group to the buffer; returns how many were admitted."""
    N, admitted = len(experts), 0
    for q, rec in enumerate(records):
        for i, ex in enumerate(experts):
            if not admit_hard_example(rewards[q, i], k, generator):
                continue
            if trace := reference_trace(rec, ex):
                buffer.entries.append(HardExample(rec.id, ex.name, prompts[q * N + i],
                                                  encode_target(tok, trace)))
                admitted += 1
    return admitted


# ---- the loss terms, each backpropagated micro-batch by micro-batch ---------------------------

def policy_gradient_backward(model, batch: Batch, cfg, old_cache, ref_model=None):
    """Backprop L_GRPO over this rank's share of batch.rows. old_cache: micro-batch -> old
    log-probs, filled by the first epoch. Returns the whole step's (loss, mean k3 to the
    reference, clip fraction), each read from the device once."""
    G, rows, completions = cfg.group_size, dist.shard(batch.rows), batch.completions
    lengths = [len(batch.prompts[r // G]) + len(completions[r]) for r in rows]
    mbs = length_sorted_micro_batches(lengths, cfg.micro_batch_size)
    losses, kls, clipped = [], [], []
    for j, mb in enumerate(dist.lockstep(model, mbs)):  # FSDP: as many passes as the busiest rank
        idx = [rows[i] for i in mb]
        p, c = [batch.prompts[r // G] for r in idx], [completions[r] for r in idx]
        logp, mask = token_logprobs(model, p, c, temperature=cfg.temperature)  # (b, T) each
        a = batch.adv[idx].to(logp.device)  # (b,)
        on_policy = j not in old_cache
        old = old_cache.setdefault(j, logp.detach())  # first epoch: on-policy, ratio == 1
        per_token = policy_gradient_loss(logp, a, old, cfg.clip_eps, cfg.clip_eps_high)
        if cfg.kl_beta > 0:
            with torch.no_grad():
                ref, _ = token_logprobs(ref_model, p, c, temperature=cfg.temperature)
            kl = k3_kl(logp, ref)
            per_token = per_token + cfg.kl_beta * kl
            kls.append((kl.detach() * mask).sum())
        loss = aggregate(per_token, mask, cfg.loss_aggregation(), **batch.counts)
        micro_backward(loss)
        losses.append(loss.detach())  # not the graph: its nodes die with the backward
        if not on_policy:  # the ratio is exactly 1 on the samples' own epoch: nothing is clipped
            clipped.append(clipped_tokens(logp, old, a, mask, cfg.clip_eps, cfg.clip_eps_high))
    n_fwd = sum(len(completions[r]) for r in rows)
    per_token = [read_sum(kls) / max(1, n_fwd), read_sum(clipped) / max(1, n_fwd)]
    return (dist.sum_floats([read_sum(losses)])[0],
            *(dist.mean_over_ranks(v, n_fwd) for v in per_token))


def transfer_backward(model, pairs, cfg, n_tokens=None) -> float:
    """Backprop lambda1 * L_KL over every (P+, P-, O+) pair; one token mean over all O+ tokens of
    the step (n_tokens; default: these pairs' own, i.e. all of them in one process)."""
    n_tokens, losses = n_tokens or sum(len(o) for _, _, o in pairs), []
    if cfg.transfer_mode == "full_vocab":  # one pair at a time: (C, V) logits under both prompts
        for teacher_prompt, student_prompt, o in dist.lockstep(model, pairs, no_grad_first=True):
            with torch.no_grad():
                teacher = completion_logits(model, teacher_prompt, o)
            drop_cast_weights()  # the teacher's logits were cast under no_grad
            student = completion_logits(model, student_prompt, o)
            ones = torch.ones(1, len(o), device=student.device)
            loss = full_vocab_kl(teacher[None], student[None], ones, n_tokens)
            micro_backward(cfg.lambda1 * loss)
            losses.append(loss.detach())
        return read_sum(losses)
    mbs = length_sorted_micro_batches([len(s) + len(o) for _, s, o in pairs], cfg.micro_batch_size)
    for mb in dist.lockstep(model, mbs, no_grad_first=True):
        outs = [pairs[i][2] for i in mb]
        with torch.no_grad():  # the teacher side is a target: sg[logp(O+ | Q, P+)]
            teacher, _ = token_logprobs(model, [pairs[i][0] for i in mb], outs)
        drop_cast_weights()  # the teacher was scored under no_grad
        student, mask = token_logprobs(model, [pairs[i][1] for i in mb], outs)
        loss = transfer_loss(student, teacher, mask, n_tokens)
        micro_backward(cfg.lambda1 * loss)
        losses.append(loss.detach())
    return read_sum(losses)


def buffer_backward(model, flushed, cfg, scale=1.0) -> float:
    """Backprop lambda2 * L_SFT over the flushed entries (MEF's loss, mef.py)."""
    if not flushed:
        return 0.0
    return sharded_sft_backward(model, [e.prompt_ids for e in flushed],
                                [e.target_ids for e in flushed], cfg.micro_batch_size,
                                cfg.lambda2 * scale)
