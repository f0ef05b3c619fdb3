"""
lora.py: LoRA (Hu et al. 2021), hand-written: train a low-rank update of every linear map, keep the
base frozen.

Each target linear y = W x (+ b) becomes

    y = W x (+ b) + (alpha / r) * B (A x)        A (r, in), B (out, r): the only trained weights

Choices (reference: "LoRA Without Regret", Schulman et al., Thinking Machines 2025):
- Adapters on every linear of attention and MLP (q, k, v, o, gate, up, down): attention-only LoRA
  falls well short of full fine-tuning there, all-layer LoRA matches it. The embedding and lm_head
  (tied or not) stay frozen.
- B starts at zero, so the model equals its base exactly at init (same logits, bit for bit); A
  starts like nn.Linear's own weight, uniform(+-1/sqrt(in)), so A x has the same scale whatever the
  width (PEFT's choice too). A's init comes from its own generator (seed), so adding LoRA draws
  nothing from the run's random state.
- Scale alpha / r with a fixed alpha (train.py: 32, the paper's): under Adam B's entries move by ~lr
  each step whatever r is, B A sums r such terms, so alpha / r makes the early update, and the best
  lr, independent of the rank. That best lr is about 10x full fine-tuning's on billion-parameter
  models and rank 1 is enough for their RL (the paper); on `tiny` we measured 1-3x and rank 1 24
  points behind, rank 8 level (docs/training.md, LoRA), so sweep --riel.lr / --mef.lr from 1x to 10x
  full's with LoRA.
- The wrapped linears' frozen base weights are bf16 whenever the run computes in bf16 (--precision
  bf16, and autocast, the CUDA default: `base_dtype`): a frozen weight needs no fp32 master copy,
  and under autocast a frozen fp32 weight would be cast again at every forward, since autocast
  caches only weights that require grad. That halves the base (Llama-3.2-3B: 12.0 -> 6.7 GiB with
  the fp32 embedding) and is what puts 3B on a 24 GiB card. Embedding, norms and lm_head keep the
  run's dtype (the fp32 residual stream under autocast). The adapters are fp32 always, since their
  small updates are what bf16 would round away.
- A wrapped linear keeps its base weight (and bias) under the SAME state-dict key
  (`...q_proj.weight`), so loading, Hugging Face key names and `lm_head`'s tie are untouched; the
  adapters add `...q_proj.lora_A/lora_B`.
- Checkpoints: `merged` gives what a Hugging Face checkpoint needs (W + (alpha/r) B A, adapters
  removed), the adapters alone go next to it (adapters.safetensors). A merge cannot be undone
  exactly in floating point, so a run writes its unmerged base once, to OUT/lora_base (as
  checkpoint.reference_model writes OUT/reference), and `--resume` rebuilds base + adapters from
  that and the checkpoint's adapters: bit for bit. The adapters go in PEFT's format too
  (ckpt/peft/: adapter_config.json + adapter_model.safetensors, `peft_files`, written without
  peft), so `peft.PeftModel.from_pretrained(<OUT/lora_base loaded>, ckpt/peft)` is the policy too.
- `adapters_off` switches every adapter off: the frozen base IS --riel.kl-beta's reference policy,
  so the reference costs one more forward and no second copy of the model (`BaseModel` hands
  riel.py that view). With MEF under LoRA in the same run that reference is the base, not the MEF'd
  policy: --init a merged checkpoint to make it the MEF'd one.
"""
import math
import os
import shutil
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing import checkpoint, dist
from plumbing.errors import UserError

# model.py's names
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILE = "adapters.safetensors"
# PEFT's names, in a folder of the checkpoint: beside model.safetensors transformers would load
# base + adapters from them rather than the merged weights
PEFT_DIR = "peft"
PEFT_CONFIG = f"{PEFT_DIR}/adapter_config.json"
PEFT_WEIGHTS = f"{PEFT_DIR}/adapter_model.safetensors"
BASE_DIR = "lora_base"


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus the trainable low-rank update (alpha / r) B A; `enabled` False: the
    base alone."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator,
                 base_dtype=None):
        super().__init__()
        cast = ((lambda p: p) if base_dtype is None
                else (lambda p: nn.Parameter(p.detach().to(base_dtype))))
        self.weight = cast(base.weight).requires_grad_(False)
        self.bias = cast(base.bias).requires_grad_(False) if base.bias is not None else None
        out_dim, in_dim = self.weight.shape
        bound = 1 / math.sqrt(in_dim)
        a = torch.empty(rank, in_dim, dtype=torch.float32)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(self.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_dim, rank, dtype=torch.float32,
                                               device=self.weight.device))
        self.scale = alpha / rank
        self.rank, self.alpha = rank, alpha  # PEFT's adapter_config.json wants both
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        # bf16 activations meet fp32 adapters: outside autocast F.linear wants one dtype (autocast
        # casts by itself)
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.dtype)
        # scale on the thin (.., r) tensor, sum in place: 2 more (.., out) tensors made LoRA slower
        # than full FT at 135M (docs/benchmark.md); the base linear saved x, W, not y: add_ is safe
        return y.add_(F.linear(F.linear(h, self.lora_A) * self.scale, self.lora_B).to(y.dtype))


def add_lora(model: nn.Module, rank: int, alpha: float, seed: int = 0,
             base_dtype=None) -> nn.Module:
    """Freeze every parameter, then wrap each target linear in a LoRALinear (in place), its base
    weight cast to base_dtype if given (bf16 when the run computes in bf16, see the top). Returns
    the model."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for module in list(model.modules()):
        for name in TARGETS:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha, generator, base_dtype))
    return model


def lora_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module) -> list:
    return [p for m in lora_layers(model) for p in (m.lora_A, m.lora_B)]


@contextmanager
def adapters_off(model: nn.Module):
    """The base model alone inside the block: the adapters stay as they are, but do not run."""
    layers = lora_layers(model)
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, on in zip(layers, before):
            m.enabled = on


class BaseModel:
    """The policy with its adapters off, wherever riel.py wants a frozen `ref_model`: calls run
    under adapters_off, everything else (lm_head, embed_tokens: frozen, shared) is the policy's
    own."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


# ---- state dicts and checkpoints ----------------------------------------------------------------

def is_adapter(key: str) -> bool:
    return key.endswith((".lora_A", ".lora_B"))


def merged(state: dict, scale: float, dtype=None) -> dict:
    """A LoRA model's state dict -> the plain model's: W + scale * B A in fp32, cast to dtype
    (default W's own; a bf16 base under autocast merges into the run's fp32, so one checkpoint has
    one dtype)."""
    out = {k: v for k, v in state.items() if not is_adapter(k)}
    for key in [k for k in state if k.endswith(".lora_A")]:
        prefix = key[:-len("lora_A")]
        w = state[prefix + "weight"]
        delta = scale * (state[prefix + "lora_B"].float() @ state[key].float())
        out[prefix + "weight"] = (w.float() + delta.to(w.device)).to(dtype or w.dtype)
        if prefix + "bias" in state and dtype is not None:
            out[prefix + "bias"] = state[prefix + "bias"].to(dtype)
    return out


def _run_dtype(model: nn.Module):
    return model.embed_tokens.weight.dtype  # never wrapped: the run's parameter dtype


def merged_state_dict(model: nn.Module) -> dict:
    return merged(model.state_dict(), lora_layers(model)[0].scale, _run_dtype(model))


def adapter_state_dict(model: nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if is_adapter(k)}


def checkpoint_parts(model: nn.Module, state: dict) -> tuple:
    """(Hugging Face weights, {file name: tensors or json} to write beside them) for
    checkpoint.save: the merged weights; our adapters, and the same in PEFT's format."""
    adapters = {k: v.detach().cpu().contiguous() for k, v in state.items() if is_adapter(k)}
    layer = lora_layers(model)[0]
    peft = peft_files(adapters, layer.rank, layer.alpha, getattr(model, "lora_base", None))
    return merged(state, layer.scale, _run_dtype(model)), {ADAPTER_FILE: adapters, **peft}


def peft_files(adapters: dict, rank: int, alpha: float, base: str | None) -> dict:
    """Our adapters as PEFT saves a LoRA (peft 0.21: PeftModel.save_pretrained), {file: tensors or
    json}: peft.PeftModel.from_pretrained(base model, ckpt dir) loads them. Written with no peft
    import, a test-only dependency. base: the model they sit on (OUT/lora_base), for
    AutoPeftModelForCausalLM."""
    # PeftModel wraps the HF model as `base_model.model.`, whose keys are ours + `model.`
    # (model.py), and saves `<module>.lora_A.weight` (its adapter name dropped); its A and B are
    # nn.Linear weights, (r, in) and (out, r): ours as they are
    tensors = {f"base_model.model.model.{k}.weight": v for k, v in adapters.items()}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
              # PEFT's scaling is lora_alpha / r without rslora: our alpha / rank
              "r": rank, "lora_alpha": alpha, "use_rslora": False,
              "target_modules": sorted({k.split(".")[-2] for k in adapters}),
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_dora": False,
              "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}
    return {PEFT_CONFIG: config, PEFT_WEIGHTS: tensors}


def load_adapters(model: nn.Module, path: str):
    from safetensors.torch import load_file
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    missing = [k for k in missing if is_adapter(k)]
    if missing or unexpected:
        raise ValueError(f"{path}: adapters do not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


def base_path(out_dir: str) -> str:
    return os.path.join(out_dir, BASE_DIR)


def weights_source(rank: int, fsdp: bool, out_dir: str, ckpt: str | None, source: str) -> str:
    """Where train.py reads the model's weights: `source`, except that a resumed LoRA run reads its
    unmerged base (missing or damaged: named, with the way on). A LoRA run resumes as a LoRA run
    (its checkpoints' weights are merged: full fine-tuning from them would go on silently
    elsewhere) and a full one as a full one."""
    if rank and fsdp:
        raise UserError("--lora-rank with --fsdp is not supported yet")
    if ckpt is None:
        return source
    if os.path.exists(os.path.join(ckpt, ADAPTER_FILE)) != (rank > 0):
        raise UserError(f"{ckpt} was {'' if rank == 0 else 'not '}written by a --lora-rank run: "
                        "resume it with the --lora-rank it was started with")
    base = base_path(out_dir)
    if not rank:
        return source
    problem = checkpoint.model_problem(base) if os.path.isdir(base) else ("", "")
    if problem:
        what = f"is damaged ({' '.join(problem)})" if problem[0] else "is missing"
        raise UserError(f"{base}, this run's LoRA base (its weights before the adapters, written "
                        f"once when the run started), {what}: --resume rebuilds the adapters on it "
                        "and cannot without it (checkpoints hold base and adapters merged). Start "
                        f"a new run from the checkpoint instead: --init {ckpt} --lora-rank {rank} "
                        "with another --out-dir")
    return base


def attach(model: nn.Module, rank: int, alpha: float, out_dir: str, ckpt: str | None,
           seed: int = 0, base_dtype=None, from_scratch=False):
    """train.py's LoRA: a fresh run writes its base once (OUT/lora_base), then wraps the model; a
    resumed one (whose model was built from OUT/lora_base) takes the checkpoint's adapters.
    from_scratch: the base is random weights."""
    if from_scratch and ckpt is None:
        warnings.warn("--lora-rank on randomly initialised weights (`tiny` without --init): MEF "
                      "can only learn a low-rank update of noise. LoRA adapts a trained model: run "
                      "MEF without it, then RIEL with --init OUT/ckpt-N --lora-rank 8 --riel.lr "
                      "1e-3 (docs/training.md, LoRA)", stacklevel=2)
    base_config = os.path.join(base_path(out_dir), "config.json")
    # rank 0 decides for all: a rank that looked after rank 0 wrote would skip the barrier (a hang)
    if ckpt is None and dist.from_main(lambda: not os.path.exists(base_config)):
        if dist.is_main():
            tmp = base_path(out_dir) + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)  # in the parameters' own dtype: back bit for bit
            checkpoint.shareable(tmp)
            os.rename(tmp, base_path(out_dir))
        dist.barrier()
    add_lora(model, rank, alpha, seed, base_dtype)
    model.lora_base = os.path.abspath(base_path(out_dir))  # checkpoint_parts' PEFT config names it
    if ckpt is not None:
        load_adapters(model, os.path.join(ckpt, ADAPTER_FILE))
    n = sum(p.numel() for p in lora_parameters(model))
    print(f"LoRA rank {rank}, alpha {alpha:g}: {n / 1e6:.3f}M trainable parameters in "
          f"{len(lora_layers(model))} linears")
    return model
