"""
optim.py: the training mechanics every stage shares: micro-batches, the backward of one micro-batch,
AdamW, and clip-and-step. The losses are not here (the SFT loss is mef.py's).

    for mb in length_sorted_micro_batches(lengths, micro_batch_size):
        micro_backward(loss_of(mb))  # fills .grad; mef.sft_backward is one such loop
    grad_norm, skipped = clip_and_step(model, optimizer, grad_clip, loss)

mef.py (stage 1), riel.py (stage 2) and mel.py build their losses on top of these, so a fix to how a
step runs lands in one place. Choices:
- Micro-batches are cut from a length-sorted order, so the rows of one pad to similar lengths
  (GRPO-Zero does so).
- One host sync per loss term per step, not per micro-batch: each micro-batch's loss stays on the
  device and the term's sum is read once (`read_sum`), after its last backward. A `.item()` per
  micro-batch would stall a GPU's queue of kernels once per micro-batch.
- Token means use ONE token count per optimizer step (losses.py says why); under torchrun each
  rank's share is weighted by its share of the tokens, so the ranks' gradients sum to the
  one-process gradient (dist.py).
- Memory (README "Precision and memory"): AdamW is fused on CUDA; gradients are set to None, not
  zeroed.

The autocast cache, told once here (every stage calls drop_cast_weights): autocast keeps the bf16
copy of each fp32 weight it cast until the cache is cleared, keyed by the tensor, not its version.
So the copies are dropped (1) between a no_grad pass and a grad-enabled one: a copy cast under
no_grad has no grad history, and before torch 2.11 later forwards reused it, so that weight got no
gradient, silently (pytorch/pytorch#112583); (2) before the optimizer step: copies of the old
weights would serve every later forward, and the step's peak would hold them too (6.4 GB at 3B);
(3) before and after each micro-batch's backward (micro_backward). After: a copy cast by an EARLIER
micro-batch carries an older autograd node than this forward's, and autograd runs the newest ready
node first, so the cast's backward (bf16 weight gradient -> fp32 .grad) waits for the end: every
layer's bf16 weight gradient alive at once (5.6 GiB at 3B). Before: backward needs no copy its
graph does not hold (a recomputed block casts its own), so the forward's copies (6 GiB at 3B) need
not live through the head's backward, its peak. Re-casting reads the weights once per micro-batch
(~6 ms at 3B on an H100).
"""
import math
import warnings

import torch

from plumbing import dist


def length_sorted_micro_batches(lengths, micro_batch_size):
    """Indices grouped into micro-batches of similar total length.
    lengths: list[int] -> list[list[int]]."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s:s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]


def read_sum(values) -> float:
    """The sum of 0-dim device tensors (a term's micro-batch losses), read with ONE host sync.
    Summed in fp64, as the Python floats it replaces were, so a logged loss does not depend on how
    the batch was cut."""
    return float(torch.stack([v.detach().double() for v in values]).sum()) if values else 0.0


def drop_cast_weights():
    """Forget autocast's cached bf16 weight copies (the module docstring says when and why)."""
    torch.clear_autocast_cache()


def micro_backward(loss):
    """loss.backward() for one micro-batch, with autocast's cached bf16 weight copies dropped before
    and after it (why: (3) in the module docstring)."""
    drop_cast_weights()
    loss.backward()
    drop_cast_weights()


def _undecorated(name, cls=torch.optim.Optimizer):
    method = getattr(cls, name)
    return getattr(method, "__wrapped__", method)


class AdamW(torch.optim.AdamW):
    """torch's AdamW, ~2 s of CPU faster to start: torch.optim imports torch._dynamo at the first
    step and the first call of four methods, only to hide them from torch.compile, which never
    traces an optimizer here. Unwrapped, they run the same code (the step under no_grad)."""
    add_param_group = _undecorated("add_param_group")
    zero_grad = _undecorated("zero_grad")
    state_dict = _undecorated("state_dict")
    load_state_dict = _undecorated("load_state_dict")

    @torch.no_grad()
    def step(self, closure=None):
        return _undecorated("step", torch.optim.AdamW)(self, closure)


def make_optimizer(params, lr, weight_decay=0.0, fused=None):
    """The AdamW of every stage (train.py). fused=None: fused when every parameter is on CUDA, as
    TRL's default (`adamw_torch_fused`): one kernel updates weights and moments in place, where
    foreach AdamW allocates parameter-sized temporaries (12.8 GB at 3B, on top of the step's peak).
    Otherwise foreach (bit for bit torch's per-tensor loop on a CPU: tests/test_memory.py).
    fused=True builds what a CUDA run would use (plan.py traces it on CPU tensors)."""
    params = list(params)
    if fused is None:
        fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return AdamW(params, lr=lr, weight_decay=weight_decay,
                 fused=True if fused else None, foreach=None if fused else True)


def clip_and_step(model, optimizer, grad_clip, loss_value):
    """Clip the gradient norm and step, unless the loss or the gradient is NaN/inf (then skip and
    warn). Under torchrun the gradients are summed over the ranks first, so every rank sees the same
    (global) norm, and loss_value must be the global loss: all ranks then take the same decision.
    Returns (grad norm, skipped)."""
    dist.sync_grads(model)  # under DDP a zero-weighted pass: it runs before the drop below
    drop_cast_weights()  # (2): stale after the step, and the step's peak need not hold them
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = float(norm)  # the step's one other sync
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        warnings.warn(f"skipping optimizer step: loss {loss_value}, grad norm {grad_norm}")
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, True
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # None, not zeros: no grad memory while RIEL samples
    return grad_norm, False


class TermNorms:
    """Each loss term's gradient norm (the weighted term, as it enters the sum), from the gradient
    it adds to .grad: one copy of the gradients kept between terms. Off (no copy, no metrics)
    unless enabled; one process only (under torchrun .grad is this rank's until the step).
    cap: the transfer's gradient is scaled down to at most cap x the GRPO term's norm."""

    def __init__(self, model, enabled, cap=None):
        self.model, self.norms, self.last, self.cap, self.uncapped = model, {}, None, cap, None
        self.enabled = enabled and dist.world() == 1

    def mark(self, term):
        if not self.enabled:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapters
        now = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        delta = now if self.last is None else [a - b for a, b in zip(now, self.last)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in delta]))
        self.norms[term] = norm.item()
        if term == "transfer" and self.cap is not None and norm > self.cap * self.norms["grpo"]:
            shrink = 1 - self.cap * self.norms["grpo"] / self.norms[term]  # of the term's part
            for p, d, n in zip(params, delta, now):
                if p.grad is not None:
                    p.grad.sub_(shrink * d)
                    n.sub_(shrink * d)
            self.norms[term], self.uncapped = (1 - shrink) * norm.item(), norm.item()
        self.last = now

    def metrics(self) -> dict:
        total = sum(self.norms.values()) or 1.0
        return {**{f"grad_norm/{t}": n for t, n in self.norms.items()},
                **{f"grad_share/{t}": n / total for t, n in self.norms.items()},
                **({"grad_norm/transfer_uncapped": self.uncapped} if self.uncapped else {})}
