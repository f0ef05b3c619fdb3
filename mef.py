"""
mef.py: Multi-Expert Fine-Tuning, stage 1 of MEML-GRPO (METHOD.md section 3).

Every (question Q_j, expert i) pair that has a reference trace A_j^(i) becomes one chat example:
system = P_i (the expert's prompt), user = Q_j, assistant = A_j^(i) followed by the end-of-turn token.
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
- Under torchrun (dist.py) each rank backpropagates a contiguous share of every optimizer batch, weighted by
  its share of the batch's tokens, so the ranks' gradients sum to the one-process gradient of the same batch.
- Memory (README "Precision and memory"): AdamW is fused on CUDA (make_optimizer); the bf16 weight copies that
  autocast caches are dropped after the last backward, before the optimizer step; gradients are set to None,
  not zeroed, after every step.
RIEL's hard-example buffer reuses `sharded_sft_backward` for its SFT step (METHOD.md 4(e)).
"""
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

import dist
from tokenizer import end_of_turn_id, render_chat
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
    # Stop early at the edge of competence (train.py): every check_every steps, greedy accuracy of each expert on
    # check_size RL-level training questions; stop once the best expert reaches stop_at (None: never check).
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


def length_sorted_micro_batches(lengths, micro_batch_size):
    """Indices grouped into micro-batches of similar total length. lengths: list[int] -> list[list[int]]."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s:s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]


def sft_loss(model, prompts, targets, n_tokens):
    """Sum of -log p(target token | prompt, earlier target tokens) over this micro-batch, / n_tokens.
    n_tokens is the target-token count of the whole optimizer step. Prompt tokens get no loss."""
    logp, mask = token_logprobs(model, prompts, targets)  # (B, T) each, T = longest target
    return -(logp * mask).sum() / n_tokens


def micro_backward(loss):
    """loss.backward() for one micro-batch, with autocast's cached bf16 weight copies dropped before and after it.
    After: a copy cached by an EARLIER micro-batch's forward carries an older autograd node (the cast's
    ToCopyBackward) than anything this forward made, and autograd runs the newest ready node first, so that node,
    which turns the bf16 weight gradient into the fp32 .grad, would wait for the end of the backward: every layer's
    bf16 weight gradient alive at once (5.6 GiB at 3B; `--plan --plan-detail` showed them). Before: backward needs
    no copy the graph does not hold itself (without checkpointing the matmuls saved theirs; with it, a recomputed
    block casts its own), so the forward's copies (6 GiB at 3B) need not stay alive through the backward's first,
    largest moment, the head's. Re-casting costs one read of the weights per micro-batch (~6 ms at 3B on an H100)."""
    torch.clear_autocast_cache()
    loss.backward()
    torch.clear_autocast_cache()


def sft_backward(model, prompts, targets, micro_batch_size, weight=1.0) -> float:
    """Backpropagate weight * token-mean NLL of all (prompt, target) pairs, one micro-batch at a time.
    Returns the unweighted loss value of the whole batch."""
    n_tokens = sum(len(t) for t in targets)
    total = 0.0
    mbs = length_sorted_micro_batches([len(p) + len(t) for p, t in zip(prompts, targets)], micro_batch_size)
    for mb in dist.lockstep(model, mbs):  # FSDP: as many passes as the busiest rank
        loss = sft_loss(model, [prompts[i] for i in mb], [targets[i] for i in mb], n_tokens)
        micro_backward(weight * loss)
        total += loss.item()
    return total


def sharded_sft_backward(model, prompts, targets, micro_batch_size, weight=1.0) -> float:
    """sft_backward on this rank's share of the pairs (all of them in one process). Each rank's token mean is
    weighted by its share of all the target tokens, so the ranks' gradients sum to the whole batch's token mean
    (share == 1.0 exactly in one process). Returns the whole batch's loss, on every rank."""
    if not targets:
        return 0.0
    lo, hi = dist.shard_range(len(targets))
    share = sum(len(t) for t in targets[lo:hi]) / sum(len(t) for t in targets)
    loss = sft_backward(model, prompts[lo:hi], targets[lo:hi], micro_batch_size, weight * share) * share
    return dist.sum_floats([loss])[0]


def make_optimizer(params, lr, weight_decay=0.0, fused=None):
    """The AdamW of both stages (train.py). fused=None: fused when every parameter is on CUDA, as TRL's default
    (transformers' `adamw_torch_fused`): one kernel updates weights and moments in place, where foreach AdamW
    allocates parameter-sized temporaries (12.8 GB at 3B, on top of the step's peak). Otherwise foreach (bit for
    bit torch's per-tensor loop on a CPU: tests/test_memory.py). Pass fused=True to build what a CUDA run would use
    (plan.py traces it on CPU tensors)."""
    params = list(params)
    if fused is None:
        fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if fused else None,
                             foreach=None if fused else True)


def clip_and_step(model, optimizer, grad_clip, loss_value):
    """Clip the gradient norm and step, unless the loss or the gradient is NaN/inf (then skip and warn).
    Under torchrun the gradients are summed over the ranks first, so every rank sees the same (global) norm and
    loss_value must be the global loss: all ranks then take the same decision. Returns (grad norm, skipped)."""
    dist.sync_grads(model)  # under DDP a zero-weighted pass: it runs before the cache is dropped below
    # autocast caches the bf16 copy of each fp32 weight until its region ends, keyed by the tensor, not its
    # version; train.py runs a whole stage in one region, so without this every later forward would still
    # compute with the weights of before this step (CUDA; CPU autocast caches alike). Dropped here, after the
    # last backward and BEFORE the step, which does not need them: the step's peak (weights + grads + AdamW
    # moments) then does not also hold a bf16 copy of every weight (6.4 GB at 3B)
    torch.clear_autocast_cache()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        warnings.warn(f"skipping optimizer step: loss {loss_value}, grad norm {grad_norm}")
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, True
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # None, not zeros: no gradient memory between steps (RIEL samples there)
    return grad_norm, False


def mef_steps(model, examples, cfg: MEFConfig, optimizer, seed=0, start_step=0, lr_at=None, shuffle=True):
    """Run cfg.epochs passes over the examples; yield one metrics dict per optimizer step.

    The order of epoch e is a permutation drawn from seed + e alone (or the given order: shuffle=False), so a run
    resumed at `start_step` (the steps already taken) sees exactly the batches the uninterrupted run would.
    lr_at(step) -> lr sets a schedule (None: the optimizer's lr throughout)."""
    model.train()
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist() \
            if shuffle else list(range(len(examples)))
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
            yield {"step": step, "epoch": epoch, "loss": loss, "tokens": sum(len(t) for t in targets),
                   "examples": len(batch), "lr": lr, "grad_norm": grad_norm, "skipped": skipped}


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
