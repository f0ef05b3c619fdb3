"""
dist.py: data-parallel training across processes and machines, on PyTorch's own engine
(torch.distributed + DDP).

    torchrun --standalone --nproc_per_node 8 train.py ...                     # one machine, 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 --master_addr HOST train.py ...  # 2 nodes

Without torchrun every function here is the identity or a no-op (rank 0 of 1), so a single-process
run executes exactly the code it did before this file existed. Under torchrun (RANK / WORLD_SIZE /
LOCAL_RANK set):
- `init` joins the process group: nccl on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on CPU.
- Every rank holds the whole model. Work is split with `shard` (contiguous, balanced slices, so
  `gather` restores the original order); decisions are not: whatever consumes the random generator
  or decides what to train on (the O+ draw, buffer admission) runs on every rank on the same
  gathered data, so all ranks stay in the same state and a step trains on exactly what one process
  would.
- Gradients: every rank backpropagates its share of the work through the PLAIN module, any number
  of times (ranks differ: other rows, other transfer pairs). DDP's reducer only listens after a
  forward through the DDP wrapper, so these backwards accumulate locally, as under `ddp.no_sync()`.
  Then `sync_grads` runs exactly one zero-weighted forward/backward through the wrapper on every
  rank: its gradient is 0, so the reducer all-reduces the accumulated .grad, bucketed and
  overlapped as DDP always does. The alternative, routing every micro-batch through the wrapper
  under no_sync, would need the wrapper everywhere (token_logprobs multiplies by
  model.lm_head.weight itself, generate calls model.trunk); this keeps the model code unaware of
  DDP.
- The reducer SUMS (a comm hook) instead of DDP's default mean: every loss is already divided by
  the step's global count (tokens, sequences: losses.py), so the sum over ranks is exactly one
  process's gradient, with no factor of world size to remember anywhere. After it the gradients are
  identical on every rank, so clipping sees the global norm and the optimizers stay identical.

`--fsdp` (`wrap(..., fsdp=True)`): FSDP2 instead of DDP, for models whose weights, gradients and
AdamW state do not fit one GPU together. Each Block is its own FSDP group, the root (embedding,
final norm, head) one more; between passes every rank keeps 1/world of every weight, gradient and
AdamW moment (ZeRO-3 storage). Training is FSDP as usual: a forward all-gathers one layer at a time
and frees it after use, a backward gathers it again and reduce-scatters its gradient into the
shards (a SUM, as above) at once, micro-batch by micro-batch; clipping and AdamW run on the shards
(DTensors: clip_grad_norm_ reduces the global norm). Two things follow from FSDP's collectives
being per layer, which every rank must join in the same order:
- Training passes: ranks have different numbers of micro-batches (uneven shares of rows, transfer
  pairs, buffer entries). Each micro-batch loop goes through `lockstep`, which runs zero-weighted
  passes on a one-token input until every rank has run as many as the busiest one: same
  collectives, gradient exactly 0.
- Sampling decodes token by token and stops when this rank's rows are done, a different number of
  forwards on every rank. So `unsharded(model)` all-gathers every layer once around a generate call
  and keeps them for it (what TRL's unwrap_model_for_generation does for DeepSpeed ZeRO-3: a gather
  per layer per token would also be slow). Sampling therefore needs the whole weights (not the
  gradients or the optimizer state) on one GPU.
Under autocast the weights are gathered in bf16 (`compute_dtype`); shards, gradient reduction and
AdamW stay fp32. Training passes must go through model(...) (`hidden_only=True` for
token_logprobs), whose root hooks gather the embedding and head; generate may call model.trunk
directly, as everything is gathered then.
"""
import gc
import os
from contextlib import contextmanager

import torch
import torch.distributed as td
from torch.nn.parallel import DistributedDataParallel


# id(module) -> its DDP wrapper, or the module itself under FSDP: one process trains one model
_WRAPPED = {}


def default_device(device=None) -> torch.device:
    """The device asked for, else CUDA when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def launched() -> bool:
    """True when started by torchrun (or any launcher that sets torch.distributed's environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str | None = None) -> torch.device:
    """Join the process group under torchrun and return this rank's device; without torchrun just
    pick the device (`device`, else cuda if available, else cpu). Under torchrun a CUDA device is
    always cuda:LOCAL_RANK."""
    if not launched():
        return default_device(device)
    use_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if use_cuda:
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs "
                               "visible: --nproc_per_node must not exceed the GPUs of a node")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if use_cuda else "gloo",
                              device_id=dev if use_cuda else None)
    return dev


def rank() -> int:
    return td.get_rank() if td.is_initialized() else 0


def world() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 writes checkpoints, metrics and logs."""
    return rank() == 0


def barrier():
    if world() > 1:
        td.barrier()


def teardown():
    # free DDP/FSDP state (cycles through the module's hooks) while Python is alive: left to
    # shutdown, their references to gloo's process group sometimes aborted it ("terminate called")
    _WRAPPED.clear()
    gc.collect()
    if td.is_initialized():
        td.destroy_process_group()


def _comm_device() -> torch.device:
    if td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_floats(values: list) -> list:
    """Element-wise sum of Python numbers over all ranks (float64, so counts stay exact)."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    td.all_reduce(t)
    return t.tolist()


def mean_over_ranks(value: float, weight: float) -> float:
    """The weighted mean of per-rank means (e.g. a per-token metric over each rank's tokens)."""
    if world() == 1:
        return value
    total, weights = sum_floats([value * weight, weight])
    return total / weights if weights else 0.0


def all_gather_object(obj) -> list:
    """Every rank's obj, in rank order (any picklable object)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    td.all_gather_object(out, obj)
    return out


def from_main(fn):
    """Run fn on rank 0 only and hand its result to every rank (e.g. looking up the checkpoint to
    resume)."""
    if world() == 1:
        return fn()
    box = [fn() if is_main() else None]
    td.broadcast_object_list(box, src=0)
    return box[0]


def shard_range(n: int, r: int | None = None, w: int | None = None) -> tuple:
    """[lo, hi) of rank r's contiguous share of n items; shares differ in size by at most one."""
    r, w = rank() if r is None else r, world() if w is None else w
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return lo, lo + base + (r < extra)


def shard(items: list) -> list:
    lo, hi = shard_range(len(items))
    return items[lo:hi]


def gather(local: list) -> list:
    """Inverse of shard: every rank's list, concatenated in rank order (so the original order)."""
    return [x for part in all_gather_object(local) for x in part] if world() > 1 else local


def _one_token(model) -> torch.Tensor:
    return torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)


def _zero_pass(wrapper, model):
    """Forward one token through wrapper (DDP, or the FSDP-sharded model itself) and backward a
    zero loss: every parameter joins the backward (and its collectives), every gradient grows by
    exactly 0."""
    (wrapper(_one_token(model)).float().sum() * 0.0).backward()


def _sum_hook(state, bucket):
    # DDP's default hook divides by the world size; our losses are normalised by global counts
    work = td.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap(model: torch.nn.Module, device: torch.device, fsdp: bool = False, compute_dtype=None):
    """Wrap the model in DDP (it broadcasts rank 0's weights, so every rank starts equal) for
    sync_grads; returns the wrapper, or None in a single process. The code keeps calling the plain
    model. fsdp: shard it instead (FSDP2, see the top of this file); every rank must have built the
    same weights (same seed or checkpoint). compute_dtype (FSDP only): the dtype weights are
    gathered in, e.g. bf16 under autocast."""
    if world() == 1:
        return None
    if fsdp:
        return _shard(model, compute_dtype)
    ddp = DistributedDataParallel(model,
                                  device_ids=[device.index] if device.type == "cuda" else None,
                                  forward_sync_buffers=False)  # buffers (RoPE) equal by design
    ddp.register_comm_hook(None, _sum_hook)
    _WRAPPED[id(model)] = ddp
    return ddp


def sync_grads(model: torch.nn.Module):
    """Sum the gradients accumulated on every rank into every rank's .grad (one collective per
    optimizer step; every rank must call it). A no-op in one process, and when no rank has any
    gradient: one process would then step with no gradients at all (AdamW skips such parameters),
    whereas all-reduced zeros would move its momentum."""
    if world() == 1 or _sharded(model):  # FSDP reduce-scattered every backward's gradient already
        return
    ddp = _WRAPPED.get(id(model))
    if ddp is None:
        raise RuntimeError("dist.sync_grads: wrap the model with dist.wrap(model, device) first")
    if not sum_floats([float(any(p.grad is not None for p in model.parameters()))])[0]:
        return
    _zero_pass(ddp, model)  # gradient 0: only triggers the reducer on the accumulated .grad


# ---- FSDP2 (--fsdp) -----------------------------------------------------------------------------


def _sharded(model) -> bool:
    return id(model) in _WRAPPED and _WRAPPED[id(model)] is model


def _shard(model, compute_dtype=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # gathered in compute_dtype (bf16 under autocast: half the traffic and memory of fp32 gathers,
    # and autocast then finds no fp32 weights to keep bf16 copies of); the rest stays in fp32
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype,
                              reduce_dtype=torch.float32 if compute_dtype else None)
    for layer in model.layers:
        # freed after forward, gathered again for backward
        fully_shard(layer, reshard_after_forward=True, mp_policy=mp)
    # the rest: embedding (tied head), final norm; gathered from forward to backward
    fully_shard(model, mp_policy=mp)
    for m in _fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)  # a SUM, like _sum_hook (force: gloo has no PREMUL_SUM)
        m.set_force_sum_reduction_for_comms(True)
    _WRAPPED[id(model)] = model
    with torch.no_grad():  # FSDP's lazy init (root, streams) now, on every rank at once, not later
        model(_one_token(model))
    _reshard(model)
    return model


def _fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _reshard(model):
    for m in _fsdp_modules(model):
        m.reshard()


@contextmanager
def unsharded(model):
    """Under FSDP: every layer's whole weights for the duration (one all-gather each; every rank
    must enter), e.g. around generate, which runs a different number of forwards on every rank.
    Elsewhere a no-op."""
    if not _sharded(model):
        yield
        return
    # gathered outside inference mode: they are parameters, not inference tensors
    with torch.inference_mode(False):
        for m in _fsdp_modules(model):
            if m is not model:  # the root is never resharded after forward anyway
                m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
    try:
        yield
    finally:
        for m in _fsdp_modules(model):
            if m is not model:
                m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def lockstep(model, batches: list, no_grad_first: bool = False):
    """Iterate over this rank's micro-batches; under FSDP, then run zero-weighted passes on a
    one-token input until this rank has run as many as the rank with the most, so every rank joins
    the same per-layer collectives (a pass: forward + backward; no_grad_first: a no-grad forward
    first, like the transfer's teacher side). Their gradient is exactly 0. The count is agreed
    before the first pass: a collective amid another rank's passes would be out of step. Every rank
    must call it; elsewhere plain iteration."""
    if not _sharded(model):
        yield from batches
        return
    most = torch.tensor([len(batches)], device=_comm_device())
    td.all_reduce(most, op=td.ReduceOp.MAX)
    yield from batches
    for _ in range(int(most) - len(batches)):
        if no_grad_first:
            with torch.no_grad():
                model(_one_token(model))
        _zero_pass(model, model)


def parameters(model):
    """The parameters an optimizer must hold: the trainable ones (LoRA: the adapters only); under
    FSDP their shards (so reshard first)."""
    if _sharded(model):
        _reshard(model)
    return [p for p in model.parameters() if p.requires_grad]


def check_world(questions_per_step: int, eval_batch_size: int):
    """Under torchrun every rank needs a share of each RL step's questions and each eval batch."""
    from plumbing.errors import UserError
    w = world()
    if w > 1 and questions_per_step < w:
        raise UserError(f"--riel.questions-per-step {questions_per_step} < {w} processes: "
                        "each needs a question")
    if w > 1 and eval_batch_size < w:
        raise UserError(f"--eval.batch-size {eval_batch_size} < {w} processes: "
                        "each needs a prompt per batch")


def full_state(model, optimizer=None) -> tuple:
    """(weights, optimizer state) to checkpoint: model.state_dict() / optimizer.state_dict(),
    except that under FSDP every rank must call it (it gathers) and only rank 0 gets the whole
    tensors, on the CPU."""
    if not _sharded(model):
        return model.state_dict(), optimizer.state_dict() if optimizer else None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    _reshard(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None)


def load_optimizer(model, optimizer, state: dict):
    """optimizer.load_state_dict(state), or under FSDP each rank takes its shard of the whole state
    full_state wrote."""
    if not _sharded(model):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, state, options=options)
