"""
mef.py: Multi-Expert Fine-Tuning, stage 1 of MEML-GRPO (METHOD.md section 3).

Every (question Q_j, expert i) pair that has a reference trace A_j^(i) becomes one chat example:
system = P_i (the expert's prompt), user = Q_j, assistant = A_j^(i) then the end-of-turn token.
The loss is the NLL of the assistant tokens only:

    L_MEF = - sum_{j,i} sum_t log p(A_t | Q_j, P_i, A_<t) / N_tokens

With all experts this trains the paper's MoE-SFT model; with one expert, the ExpertX-SFT baseline.

Choices:
- Token mean with ONE token count per optimizer step, counted before the micro-batch loop, so the
  micro-batch losses (and gradients) add up to the full-batch loss. The paper writes a plain sum; a
  mean only rescales the learning rate and keeps it independent of batch size (our reading).
- The target ends with the end-of-turn token, so the model learns to stop (and the RL sampler then
  stops on it).
- Examples are shuffled into optimizer batches; each batch is sorted by length before it is cut into
  micro-batches, so the rows of a micro-batch pad to similar lengths (as GRPO-Zero does).
- Records with no trace for an expert are skipped and counted; so are examples longer than max_len
  (cut short, a target would lose its end-of-turn token).
- The log-probs come from rollout.token_logprobs, the same function RIEL trains with.
- Under torchrun (plumbing/dist.py) each rank backpropagates a contiguous share of every optimizer
  batch, weighted by its share of the batch's tokens, so the ranks' gradients sum to the
  one-process gradient of the same batch.
- The SFT loss and its backward live here; RIEL's hard-example buffer reuses `sharded_sft_backward`
  for its SFT step (METHOD.md 4(e)). The mechanics of a step (micro-batches, AdamW, clip-and-step,
  what they do for memory and host syncs) live in plumbing/optim.py, shared by every stage.
"""
import math
from dataclasses import dataclass
from typing import Literal

import torch

from plumbing import dist
from plumbing.optim import clip_and_step, length_sorted_micro_batches, micro_backward, read_sum
from plumbing.tokenizer import end_of_turn_id, render_chat
from rollout import token_logprobs


@dataclass
class MEFConfig:
    epochs: int = 1  # paper: 1 epoch
    lr: float = 1e-5  # paper: 1e-5 (the optimizer is built by the caller)
    batch_size: int = 32  # examples per optimizer step
    micro_batch_size: int = 8  # examples per forward/backward
    max_len: int = 1024  # prompt + target tokens; longer examples are skipped
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup (train.py's schedule)
    schedule: Literal["constant", "cosine"] = "constant"  # after warmup; cosine decays to 10% of lr
    # Stop early at the edge of competence (train.py): every check_every steps, each expert's greedy
    # accuracy on check_size RL-level training questions; stop once any reaches stop_at (None: off)
    stop_at: float | None = None
    check_every: int = 25
    check_size: int = 100


@dataclass
class SFTExample:
    question_id: object
    expert: str
    prompt_ids: list  # chat prompt ending with the assistant header
    target_ids: list  # trace tokens + end-of-turn: the only tokens with a loss


def encode_target(tok, text: str) -> list:
    """Assistant-turn target: the trace's tokens, then the token that ends a turn."""
    return tok.encode(text, add_special_tokens=False) + [end_of_turn_id(tok)]


def build_sft_examples(tok, records, experts, max_len=None):
    """One example per (record, expert) that has a trace. Returns (examples, counts)."""
    examples, counts = [], {"examples": 0, "missing_trace": 0, "too_long": 0}
    for rec in records:
        for ex in experts:
            trace = rec.traces.get(ex.name)
            if not trace:
                counts["missing_trace"] += 1
                continue
            prompt = render_chat(tok, ex.system_prompt, rec.question)
            target = encode_target(tok, trace)
            if max_len is not None and len(prompt) + len(target) > max_len:
                counts["too_long"] += 1
                continue
            examples.append(SFTExample(rec.id, ex.name, prompt, target))
    counts["examples"] = len(examples)
    return examples, counts


def sft_loss(model, prompts, targets, n_tokens):
    """Sum of -log p(target token | prompt, earlier target tokens) over this micro-batch,
    / n_tokens, the target-token count of the whole optimizer step. Prompt tokens get no loss."""
    logp, mask = token_logprobs(model, prompts, targets)  # (B, T) each, T = longest target
    return -(logp * mask).sum() / n_tokens


def sft_backward(model, prompts, targets, micro_batch_size, weight=1.0) -> float:
    """Backpropagate weight * token-mean NLL of all (prompt, target) pairs, one micro-batch at a
    time. Returns the unweighted loss value of the whole batch."""
    n_tokens = sum(len(t) for t in targets)
    losses = []
    lengths = [len(p) + len(t) for p, t in zip(prompts, targets)]
    mbs = length_sorted_micro_batches(lengths, micro_batch_size)
    for mb in dist.lockstep(model, mbs):  # FSDP: as many passes as the busiest rank
        loss = sft_loss(model, [prompts[i] for i in mb], [targets[i] for i in mb], n_tokens)
        micro_backward(weight * loss)
        losses.append(loss.detach())  # not the graph: its nodes die with the backward
    return read_sum(losses)


def sharded_sft_backward(model, prompts, targets, micro_batch_size, weight=1.0) -> float:
    """sft_backward on this rank's share of the pairs (all of them in one process). Each rank's
    token mean is weighted by its share of all the target tokens, so the ranks' gradients sum to
    the whole batch's token mean (share == 1.0 exactly in one process). Returns the whole batch's
    loss, on every rank."""
    if not targets:
        return 0.0
    lo, hi = dist.shard_range(len(targets))
    share = sum(len(t) for t in targets[lo:hi]) / sum(len(t) for t in targets)
    part = sft_backward(model, prompts[lo:hi], targets[lo:hi], micro_batch_size, weight * share)
    return dist.sum_floats([part * share])[0]


def mef_steps(model, examples, cfg: MEFConfig, optimizer, seed=0, start_step=0, lr_at=None,
              shuffle=True):
    """Run cfg.epochs passes over the examples; yield one metrics dict per optimizer step.

    The order of epoch e is a permutation drawn from seed + e alone (or the given order:
    shuffle=False), so a run resumed at `start_step` (the steps already taken) sees exactly the
    batches the uninterrupted run would.
    lr_at(step) -> lr sets a schedule (None: the optimizer's lr throughout)."""
    model.train()
    step = 0
    for epoch in range(cfg.epochs):
        gen = torch.Generator().manual_seed(seed + epoch)
        order = (torch.randperm(len(examples), generator=gen).tolist() if shuffle
                 else list(range(len(examples))))
        for s in range(0, len(order), cfg.batch_size):
            step += 1
            if step <= start_step:
                continue
            batch = [examples[i] for i in order[s:s + cfg.batch_size]]
            prompts, targets = [e.prompt_ids for e in batch], [e.target_ids for e in batch]
            if lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step - 1)
            optimizer.zero_grad(set_to_none=True)
            loss = sharded_sft_backward(model, prompts, targets, cfg.micro_batch_size)
            lr = optimizer.param_groups[0]["lr"]  # read before the step: the lr this step used
            grad_norm, skipped = clip_and_step(model, optimizer, cfg.grad_clip, loss)
            yield {"step": step, "epoch": epoch, "loss": loss,
                   "tokens": sum(len(t) for t in targets), "examples": len(batch), "lr": lr,
                   "grad_norm": grad_norm, "skipped": skipped}


def num_steps(n_examples, cfg: MEFConfig) -> int:
    return cfg.epochs * math.ceil(n_examples / cfg.batch_size)


def lr_schedule(cfg: MEFConfig, total: int):
    """step -> lr: linear warmup, then constant or cosine decay to 10% of the peak."""
    def lr_at(step):
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return cfg.lr
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    return lr_at
