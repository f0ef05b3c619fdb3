"""
tools/memtrace.py: a TorchDispatchMode that measures the memory of code run on fake tensors
(plan.py's instrument).

Every tensor an aten op returns has its storage counted from birth (the op) to death (a weakref
callback when its last reference goes); the sum of live storages at each moment is what the CUDA
caching allocator's `memory_allocated` would show, each block rounded up to ALLOC_ROUND bytes as
that allocator does, so the maximum over a stage is the stage's peak. At a new peak the live
storages are kept with the tag of what made them (weights, grads, AdamW state, autocast's bf16
weight copies, KV cache, log-prob chunks, optimizer step, activations: PARTS), so a peak comes with
its breakdown.

With `detail` on (plan.py --plan-detail), each storage also keeps what made it: the aten op, the
module whose forward was running (hooks set by `watch`), or "backward" for what backward made
(recomputes included), its shape and dtype; `stage()` then leaves the largest groups of such
storages alive at the peak in `last_detail`.

Fake tensors hold no values, so host reads (`.item()`, `bool(t)`, `.tolist()`) need an answer:
small integer/bool tensors built from Python data (lengths, positions, masks, indices) are shadowed
by real copies (_shadow), so reads of them are exact; any other read gets the worst case for memory
(_host_read): decoding runs to max_new_tokens, one row of each sampling call stops at the first
check and is dropped, a float is 1.0 (finite loss and gradient norm: the optimizer steps), a
sampled token id is 0, not a stop id.
"""
import re
import weakref
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

ALLOC_ROUND = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes
SHADOW_NUMEL = 1 << 22  # integer/bool tensors up to this size are also computed for real (above)
HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
              torch.ops.aten.is_nonzero.default)  # ops that return a Python number
PARTS = ("weights", "grads", "AdamW state", "bf16 weight copies", "KV cache", "log-prob chunks",
         "optimizer step", "activations")


class MemoryTrace(TorchDispatchMode):
    """Counts the storages of every tensor that aten ops return, from the op to the storage's
    death; keeps each stage's peak and what made it up. Enter it inside a FakeTensorMode (it also
    answers host reads, see above)."""

    def __init__(self, detail: bool = False):
        super().__init__()
        self.live = {}  # id(storage) -> [bytes, tag, weakref]
        # origin (with detail): id(storage) -> what made it
        self.detail, self.origin, self.op, self.module = detail, {}, "", ""
        self.last_detail = []
        self.total = self.peak = 0
        self.pending = False  # a new peak was reached and not yet broken down
        self.snap = {}
        self.tag = "activations"
        self.params, self.param_keys, self.optimizers = [], set(), []
        self.in_backward = False  # set around torch.autograd.backward by plan._instrumented
        self.any_results, self.dropped = WeakIdKeyDictionary(), False  # see _host_read
        self.shadow = WeakIdKeyDictionary()  # fake int/bool tensor -> a real copy

    # ---- counting ---------------------------------------------------------------------------
    def add(self, t, tag=None):
        st = t.untyped_storage()
        key = id(st)
        if key in self.live:
            return
        n = -(-st.nbytes() // ALLOC_ROUND) * ALLOC_ROUND
        self.live[key] = [n, tag or self.tag, weakref.ref(st, lambda _, k=key: self._free(k))]
        if self.detail:
            # layers.3.mlp -> layers.*.mlp: one group per kind. In backward no module is known (a
            # checkpointed recompute stops early, past its last module's forward hook): "backward"
            where = ("backward" if self.in_backward
                     else re.sub(r"\.\d+(?=\.|$)", ".*", self.module))
            self.origin[key] = (self.op, where,
                                tuple(t.shape), str(t.dtype).replace("torch.", ""))
        self.total += n
        if self.total > self.peak:
            self.peak, self.pending = self.total, True

    def _free(self, key):
        # the moment before the first free after a new peak IS the peak: keep what was live
        # (storages only: this runs inside a deallocation, where touching tensors is unsafe)
        if self.pending:
            self._snapshot()
        self.total -= self.live.pop(key)[0]
        self.origin.pop(key, None)

    def _snapshot(self):
        self.snap = {k: (v[0], v[1], self.origin.get(k)) for k, v in self.live.items()}
        self.pending = False

    def watch(self, model):
        """Tag the weights, and each .grad as assigned (post-accumulate-grad hook: safe moment)."""
        self.params = list(model.parameters())
        self.param_keys = {id(p.untyped_storage()) for p in self.params}
        for p in self.params:
            self.live[id(p.untyped_storage())][1] = "weights"
            if p.requires_grad:  # (LoRA's frozen base gets no .grad)
                p.register_post_accumulate_grad_hook(self._grad_hook)
        if self.detail:
            for name, p in model.named_parameters():
                self.origin[id(p.untyped_storage())] = (
                    "parameter", re.sub(r"\.\d+(?=\.|$)", ".*", name),
                    tuple(p.shape), str(p.dtype).replace("torch.", ""))
            for name, m in model.named_modules():
                m.register_forward_pre_hook(lambda m, a, name=name: setattr(self, "module", name))
                parent = name.rsplit(".", 1)[0] if "." in name else ""
                m.register_forward_hook(
                    lambda m, a, o, parent=parent: setattr(self, "module", parent))

    def _grad_hook(self, p):
        entry = self.live.get(id(p.grad.untyped_storage()))
        if entry is not None:
            entry[1] = "grads"

    def stage(self) -> tuple:
        """(peak bytes, {part: bytes}) since the last call; starts the next stage at the current
        total. AdamW's moments are recognised here (they are made inside the first step, tagged as
        its temporaries until now)."""
        if self.pending:
            self._snapshot()
        state = {id(v.untyped_storage()) for opt in self.optimizers for s in opt.state.values()
                 for v in s.values() if isinstance(v, torch.Tensor)}
        parts = dict.fromkeys(PARTS, 0)
        groups = defaultdict(lambda: [0, 0])  # (part, op, module, shape, dtype) -> [count, bytes]
        for key, (n, tag, origin) in self.snap.items():
            part = "AdamW state" if key in state else tag
            parts[part] = parts.get(part, 0) + n
            if self.detail:
                g = groups[(part, *(origin or ("?", "", (), "")))]
                g[0], g[1] = g[0] + 1, g[1] + n
        self.last_detail = sorted(((b, c, *k) for k, (c, b) in groups.items()), reverse=True)
        result = (self.peak, parts)
        self.peak, self.pending = self.total, True
        return result

    @contextmanager
    def tagged(self, tag):
        old, self.tag = self.tag, tag
        try:
            yield
        finally:
            self.tag = old

    # ---- the dispatch hook ------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:  # most calls by far: `t.device` of a fake tensor
            return func(*args, **kwargs)
        if func in HOST_READS and isinstance(args[0], FakeTensor):
            return self._host_read(args[0])
        if (func is torch.ops.aten.nonzero.default and isinstance(args[0], FakeTensor)
                and args[0] not in self.shadow):
            # which rows are still running, after the read above said one stopped: all but one
            out = torch.empty((max(args[0].numel() - 1, 0), args[0].dim()), dtype=torch.long,
                              device=args[0].device)
            self.add(out)
            return out
        out = func(*args, **kwargs)
        if (func in (torch.ops.aten.any.default, torch.ops.aten.any.dim)
                and isinstance(out, FakeTensor)):
            self.any_results[out] = True
        flat_out = [t for t in (out if isinstance(out, (tuple, list)) else (out,))
                    if isinstance(t, torch.Tensor)]
        if self.detail:
            self.op = func.__name__  # e.g. mm.default
        tag = None
        if (func is torch.ops.aten._to_copy.default
                and id(args[0].untyped_storage()) in self.param_keys):
            tag = "bf16 weight copies"  # autocast casting a weight (cached until the cache clears)
        elif (func is torch.ops.aten.index.Tensor
              and self.live.get(id(args[0].untyped_storage()), (0, ""))[1] == "KV cache"):
            tag = "KV cache"  # generate dropping finished rows: a copy of the cache
        if func is torch.ops.aten.add.Tensor and self.in_backward and not torch.is_grad_enabled():
            self._in_place(args, flat_out[0])  # first: the output takes the input's block
        for t in flat_out:
            self.add(t, tag)
        if (any(not t.dtype.is_floating_point for t in flat_out)
                or len(self.shadow) and func._schema.is_mutable):
            self._shadow(func, args, kwargs, flat_out)
        return out

    def _in_place(self, args, out):
        """The autograd engine summing two gradients of one tensor (its InputBuffer) adds out of
        place here, because under a dispatch mode every tensor has a Python object holding a
        reference; a real run's buffers have none and it adds in place. Count it so: the input's
        block becomes the output's."""
        for a in args[:2]:
            entry = self.live.get(id(a.untyped_storage())) if isinstance(a, torch.Tensor) else None
            if (entry is not None and a.shape == out.shape and entry[0]
                    and entry[1] == "activations"):
                self.total, entry[0] = self.total - entry[0], 0
                return

    def _host_read(self, t):
        real = self.shadow.get(t)
        if real is not None:
            with unset_fake_temporarily():
                return real.item()
        if t.dtype == torch.bool:
            if t in self.any_results and not self.dropped:  # "any row stopped?": once yes, then no
                self.dropped = True
                return True
            return False  # "have all rows stopped?" -> no: the longest decode
        if t.dtype.is_floating_point:
            return 1.0  # a finite loss / gradient norm: the optimizer steps
        return 0  # a sampled token id: 0, not a stop id (plan._PlanTokenizer never stops)

    def _shadow(self, func, args, kwargs, flat_out):
        """Small int/bool results, computed for real: reads of lengths, indices, masks are exact."""
        flat_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        ok = all(not isinstance(a, FakeTensor) or a in self.shadow for a in flat_in) and \
            all(not t.dtype.is_floating_point and t.numel() <= SHADOW_NUMEL for t in flat_out)
        if ok and flat_out:
            real = lambda a: self.shadow[a] if isinstance(a, FakeTensor) else a
            arg = lambda a: real(a) if isinstance(a, torch.Tensor) else a
            with unset_fake_temporarily():
                res = func(*tree_map(arg, args), **tree_map(arg, kwargs))
            for f, r in zip(flat_out,
                            [t for t in tree_flatten(res)[0] if isinstance(t, torch.Tensor)]):
                if isinstance(f, FakeTensor):
                    self.shadow[f] = r
            return
        # an op that cannot be shadowed but writes into shadowed tensors: their copies (and views')
        # are stale
        schema = func._schema.arguments
        written = [a for i, a in enumerate(args) if isinstance(a, FakeTensor) and i < len(schema)
                   and schema[i].alias_info is not None and schema[i].alias_info.is_write]
        written += [v for k, v in kwargs.items() if k == "out" and isinstance(v, FakeTensor)]
        if written:
            stale = {id(a.untyped_storage()) for a in written}
            for f in [f for f in self.shadow.keys() if id(f.untyped_storage()) in stale]:
                del self.shadow[f]
