"""
model.py: one decoder-only transformer that runs Llama 3.x and Qwen2/2.5 checkpoints.

The two families differ in four config values only, so one module covers both:

    block:  h = x + o_proj(attn(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))
            y = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))
    llama:  no biases; RoPE theta 5e5, `llama3` frequency scaling (factor 8 for 3.1, 32 for 3.2)
    qwen2:  bias on q/k/v only; RoPE theta 1e6, no scaling
    both:   RMSNorm, rotate-half RoPE (HF layout), grouped-query attention, SwiGLU, tied/untied head

Choices (see REFERENCES.md section 4 for every fact used here):
- Parameter names mirror the Hugging Face ones minus `model.`, so loading is a key rename, not a
  conversion. Weights load onto a meta-device model with `assign=True`: never allocated twice.
- A tied head shares the embedding Parameter: a copy would double ~394M params (3.2-3B) and drift.
- RoPE angles are computed in fp32 and cast afterwards, RMSNorm normalises in fp32 and casts before
  the weight multiply, exactly as transformers does, so logits match it to ~1e-6 in fp32.
- Attention is `F.scaled_dot_product_attention(enable_gqa=True)`. Training runs right-padded rows
  with a plain causal mask (pads sit after the real tokens and cannot affect them). Decoding uses
  a preallocated KV cache and an explicit key mask, with per-row positions (see rollout.py).
- bf16 on CUDA, fp32 on CPU unless asked otherwise.

Which checkpoint a name like `llama3.2-3b` means, and fetching it, is presets.py's job.
The `tiny` preset is a random-init Llama (its byte-level tokenizer is in tokenizer.py), so the
whole pipeline runs on a laptop CPU through exactly the same code path as a 3B model.
"""

import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from plumbing.dist import default_device
from plumbing.presets import PRESET_CONFIGS, PRESETS, resolve_checkpoint  # noqa: F401 (re-export)


def model_config(name_or_path: str) -> "ModelConfig":
    """A preset's or a directory's ModelConfig without reading any weights (offline for presets)."""
    if name_or_path == "tiny":
        return tiny_config()
    if name_or_path in PRESET_CONFIGS:
        return ModelConfig.from_hf(PRESET_CONFIGS[name_or_path])
    with open(os.path.join(resolve_checkpoint(name_or_path), "config.json")) as f:
        return ModelConfig.from_hf(json.load(f))


# ---- config --------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    vocab_size: int = 264
    dim: int = 128  # hidden_size
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    ffn_dim: int = 384  # intermediate_size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF's, e.g. {"rope_type": "llama3", "factor": 32.0, ...}
    qkv_bias: bool = False  # True for Qwen2
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    model_type: str = "llama"  # "llama" or "qwen2": only used to write config.json back
    extra: dict = field(default_factory=dict)  # other config.json keys (token ids...), kept as-is

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        if d.get("model_type") not in ("llama", "qwen2"):
            raise ValueError(f"model_type {d.get('model_type')!r} is not supported: "
                             "only 'llama' and 'qwen2'")
        # transformers >= 5 nests theta and scaling in `rope_parameters`; older configs (and the
        # hub) use top-level `rope_theta` + `rope_scaling`. Accept both.
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        nested = rope if rope.get("rope_type", "default") != "default" else None
        scaling = d.get("rope_scaling") or nested
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
            raise ValueError(f"rope scaling {scaling} is not supported (only 'llama3')")
        n_heads = d["num_attention_heads"]
        known = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps",
                 "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
                 "tie_word_embeddings", "max_position_embeddings", "model_type", "architectures",
                 "torch_dtype", "dtype", "transformers_version"}
        return cls(
            vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads", n_heads),
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads, rope_scaling=scaling,
            ffn_dim=d["intermediate_size"], norm_eps=d["rms_norm_eps"], rope_theta=float(theta),
            qkv_bias=d["model_type"] == "qwen2" or d.get("attention_bias", False),
            tie_embeddings=d.get("tie_word_embeddings", False),
            max_seq_len=d.get("max_position_embeddings", 2048), model_type=d["model_type"],
            extra={k: v for k, v in d.items() if k not in known})

    def to_hf(self) -> dict:
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        d = dict(self.extra, architectures=[arch], model_type=self.model_type,
                 vocab_size=self.vocab_size, hidden_size=self.dim, num_hidden_layers=self.n_layers,
                 num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                 head_dim=self.head_dim, intermediate_size=self.ffn_dim, rms_norm_eps=self.norm_eps,
                 rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                 tie_word_embeddings=self.tie_embeddings, max_position_embeddings=self.max_seq_len,
                 hidden_act="silu")
        if self.model_type == "llama":
            d.update(attention_bias=self.qkv_bias, mlp_bias=False)
        return d


def tiny_config() -> ModelConfig:
    """The `tiny` preset: ~0.8M params, 264 byte-level ids (tokenizer.py), learns on a CPU."""
    return ModelConfig(extra={"bos_token_id": 256, "eos_token_id": 258, "pad_token_id": 257})


# ---- building blocks -----------------------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """inv_freq_j = theta^(-2j/d), with Llama 3's piecewise scaling when set; (head_dim/2,) fp32."""
    d = cfg.head_dim
    # on the CPU, even in a model built on meta: ops on meta tensors import torch._dynamo (~2 s)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device="cpu").float() / d))
    s = cfg.rope_scaling
    if not s or s.get("rope_type", s.get("type")) != "llama3":
        return inv
    # llama3 scaling: keep high frequencies, divide low ones by `factor`, blend the band between.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    alpha = ((ctx / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0 = low band, 1 = high band
    mid = (1 - alpha) * inv / factor + alpha * inv
    return torch.where(wavelen < ctx / hi, inv, torch.where(wavelen > ctx / lo, inv / factor, mid))


def rope_cos_sin(inv_freq, positions, dtype):
    """positions (B, T) int -> cos, sin (B, T, head_dim), fp32 angles as in transformers. sin has
    rotate-half's sign folded in, (-sin, sin), so apply_rope rotates by a roll: 2 fewer kernels."""
    angles = positions.float()[..., None] * inv_freq.float()  # (B, T, d/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE: the pair (x_j, x_{j+d/2}) turns by angle_j. x (B, H, T, d), cos/sin
    (B, T, d), sin signed by rope_cos_sin. Rotating half is [-x2, x1] = roll(x, d/2) * [-1, 1]: bit
    for bit transformers' rotate_half products (tests/test_model.py compares logits)."""
    return x * cos[:, None] + x.roll(x.shape[-1] // 2, dims=-1) * sin[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) in fp32, one fused op (bit for bit the six ops written out, on
        # CPU), then cast before the weight multiply, as HF and Meta do
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


@dataclass
class KVCache:
    """Preallocated keys/values, one (B, n_kv_heads, max_len, head_dim) pair per layer; `pos` =
    slots filled. All rows write the same slot each step (prompts are left-padded): one int tracks
    it. Static mode (`slot` set, a (T,) long tensor): new keys go to those slots and attention sees
    the whole buffer (the caller's key mask hides unfilled slots): every decode step has the same
    shapes and Python ints, so torch.compile traces it once (gpt-fast's cache)."""
    k: list
    v: list
    pos: int = 0
    slot: torch.Tensor | None = None  # static mode: the caller advances it; trunk leaves pos alone

    def update(self, layer, k, v):
        """Store k/v (B, Hkv, T, d); return the keys/values to attend over, (B, Hkv, S, d)."""
        if self.slot is not None:
            # autocast: RoPE's fp32 cos/sin make k fp32; index_copy_ casts nothing (slicing does)
            self.k[layer].index_copy_(2, self.slot, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, self.slot, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache, layer):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if T == 1 and mask is not None:  # one decoding step
            y = decode_attention(q, k, v, mask)
        else:  # mask None: causal self-attention over exactly these T tokens (training, scoring)
            y = F.scaled_dot_product_attention(q, k, v, mask, is_causal=mask is None and T > 1,
                                               enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


def decode_attention(q, k, v, mask):
    """Attention of ONE new query per row over the cache, as a grouped matmul: the query heads that
    share a KV head are batched against it, so K/V are never repeated (SDPA's CPU kernel: ~1.7x
    slower). q (B, H, 1, d), k/v (B, Hkv, S, d), mask (B, 1, 1, S) bool -> (B, H, 1, d)."""
    B, H, _, d = q.shape
    n_kv = k.shape[1]
    scores = (q.view(B, n_kv, H // n_kv, d) @ k.transpose(-1, -2)) * d ** -0.5  # (B, Hkv, H/Hkv, S)
    scores = scores.masked_fill(~mask.view(B, 1, 1, -1), float("-inf"))
    return (scores.float().softmax(dim=-1).to(v.dtype) @ v).view(B, H, 1, d)  # softmax in fp32


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


# ---- the model -----------------------------------------------------------------------------------

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # nn.Embedding's own init, except on meta (where normal_ would import torch._dynamo)
        e = torch.empty(cfg.vocab_size, cfg.dim)
        self.embed_tokens = nn.Embedding(*e.shape, _weight=e)
        if not e.is_meta:
            nn.init.normal_(self.embed_tokens.weight)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False  # recompute in backward: memory for ~30% more compute

    def trunk(self, ids, positions=None, cache=None, mask=None):
        """ids (B, T) -> final-normed hidden states (B, T, dim); positions: 0..T-1 (+ cache.pos)."""
        B, T = ids.shape
        if positions is None:
            start = cache.pos if cache is not None else 0
            positions = torch.arange(start, start + T, device=ids.device).expand(B, T)
        x = self.embed_tokens(ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i)
        if cache is not None and cache.slot is None:
            cache.pos += T
        return self.norm(x)

    def forward(self, ids, positions=None, cache=None, mask=None, hidden_only=False):
        """ids (B, T) -> logits (B, T, vocab); hidden_only: the trunk's (B, T, dim), for callers
        that apply lm_head.weight themselves (rollout.token_logprobs). Training comes here, not to
        trunk(): under per-layer FSDP the root's hooks gather the embedding and head (dist.py)."""
        hidden = self.trunk(ids, positions, cache, mask)
        return hidden if hidden_only else self.lm_head(hidden)

    def new_cache(self, batch, max_len) -> KVCache:
        c, p = self.cfg, self.embed_tokens.weight
        # under autocast (fp32 master weights, bf16 compute) k and v come out in the autocast dtype
        autocast = torch.is_autocast_enabled(p.device.type)
        dtype = torch.get_autocast_dtype(p.device.type) if autocast else p.dtype
        shape = (batch, c.n_kv_heads, max_len, c.head_dim)
        zeros = [torch.zeros(shape, device=p.device, dtype=dtype) for _ in range(2 * c.n_layers)]
        return KVCache(zeros[:c.n_layers], zeros[c.n_layers:])

    def _apply(self, fn, *args, **kwargs):
        # .to(bf16) / .half() would round RoPE frequencies (0.05 rad off at position 256): redo fp32
        super()._apply(fn, *args, **kwargs)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)
        return self

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once

    # -- loading and saving (Hugging Face format) ---------------------------------------------

    @classmethod
    def from_config(cls, cfg: ModelConfig, device=None, dtype=None, seed=0) -> "Transformer":
        """A randomly initialised model (normal(0, 0.02), as transformers' Llama init)."""
        device, dtype = default_device(device), default_dtype(device, dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(cfg)
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    nn.init.normal_(p, std=0.02)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)
        return model.to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device=None, dtype=None) -> "Transformer":
        """A preset name, a local directory in HF format, or a hub repo id."""
        if name_or_path == "tiny":
            return cls.from_config(tiny_config(), device, dtype)
        path = resolve_checkpoint(name_or_path)
        device, dtype = default_device(device), default_dtype(device, dtype)
        with open(os.path.join(path, "config.json")) as f:
            cfg = ModelConfig.from_hf(json.load(f))
        with torch.device("meta"):
            model = cls(cfg)
        state = {}
        for file in safetensors_files(path):
            state.update(read_safetensors(file, device, dtype))
        if cfg.tie_embeddings:
            state.pop("lm_head.weight", None)  # a tied checkpoint may keep a copy: embedding rules
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match the config: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight  # assign=True broke the tie: restore
        model.inv_freq = model.inv_freq.to(device)  # computed on the CPU
        return model

    def save_pretrained(self, out_dir: str, dtype=None, state=None):
        """Write config.json + model.safetensors, which transformers' AutoModelForCausalLM loads.
        state: weights to write instead of self.state_dict() (whole, gathered from FSDP shards)."""
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        tensors = {}
        for name, t in (self.state_dict() if state is None else state).items():
            if self.cfg.tie_embeddings and name == "lm_head.weight":
                continue
            key = name if name == "lm_head.weight" else "model." + name
            tensors[key] = t.detach().to(dtype or t.dtype).contiguous().cpu()
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        cfg = self.cfg.to_hf()
        cfg["torch_dtype"] = str(dtype or self.embed_tokens.weight.dtype).removeprefix("torch.")
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)


# ---- reading Hugging Face weight files (from_pretrained) -----------------------------------------

def safetensors_files(path: str) -> list:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path}: neither model.safetensors nor "
                                "model.safetensors.index.json found")
    return [single]


def read_safetensors(file, device, dtype) -> dict:
    """One shard -> {our parameter name: tensor}, read straight to the target device and dtype."""
    from safetensors import safe_open
    out = {}
    with safe_open(file, framework="pt", device=str(device)) as f:
        for key in f.keys():
            name = key[len("model."):] if key.startswith("model.") else key
            t = f.get_tensor(key)
            out[name] = t.to(dtype) if t.is_floating_point() else t
    return out


def default_dtype(device=None, dtype=None):
    return dtype or (torch.bfloat16 if default_device(device).type == "cuda" else torch.float32)
