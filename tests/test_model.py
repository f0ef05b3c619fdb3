"""model.py against transformers: same weights -> same logits, both ways through the HF checkpoint
format."""

import json

import pytest
import torch
from conftest import hf_tiny

import model as ours
from plumbing import presets
CONFIGS = {
    "llama_gqa_llama3rope32_tied": dict(kind="llama", tied=True, scaling=True, n_kv=2),
    "llama_mha_noscaling_untied": dict(kind="llama", tied=False, scaling=False, n_kv=4),
    "qwen2_bias_untied": dict(kind="qwen2", tied=False, n_kv=2),
    "qwen2_bias_tied_mqa": dict(kind="qwen2", tied=True, n_kv=1),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(hf_pair, name):
    hf, m = hf_pair(**CONFIGS[name])
    ids = torch.randint(0, 128, (3, 41), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(ids).logits - m(ids)).abs().max().item()
    assert diff <= 1e-4, diff
    assert m.embed_tokens.weight.dtype == torch.float32  # fp32 on CPU by default


def test_logits_match_at_long_positions_where_llama3_scaling_matters(hf_pair):
    hf, m = hf_pair(kind="llama", scaling=True)
    ids = torch.randint(0, 128, (1, 16))
    pos = torch.arange(20000, 20016)[None]
    with torch.no_grad():
        diff = (hf(ids, position_ids=pos).logits - m(ids, positions=pos)).abs().max().item()
    assert diff <= 1e-4, diff


def test_tied_head_shares_the_embedding_parameter(hf_pair):
    _, m = hf_pair(kind="llama", tied=True)
    assert m.lm_head.weight is m.embed_tokens.weight
    _, m = hf_pair(kind="llama", tied=False)
    assert m.lm_head.weight is not m.embed_tokens.weight


@pytest.mark.parametrize("factor", [32.0, 8.0])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_llama3_inv_freq_equals_transformers(factor, head_dim):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf_cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, rope_theta=500000.0,
                         rope_scaling=scaling, max_position_embeddings=131072)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    cfg = ours.ModelConfig(head_dim=head_dim, rope_theta=500000.0, rope_scaling=scaling)
    mine = ours.rope_inv_freq(cfg)
    torch.testing.assert_close(mine, theirs.float(), rtol=1e-6, atol=0)


def test_llama3_inv_freq_matches_reference_table():
    # REFERENCES.md 3.6, recomputed in float64 there: head_dim 64, factor 32 (Llama-3.2-1B/3B)
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = ours.ModelConfig(head_dim=64, rope_theta=500000.0, rope_scaling=scaling)
    inv = ours.rope_inv_freq(cfg)
    expected = {0: 1.0, 15: 1.290548e-03, 16: 4.295568e-04, 17: 9.708288e-05, 18: 1.946164e-05,
                31: 9.418307e-08}
    for j, v in expected.items():
        assert inv[j].item() == pytest.approx(v, rel=1e-5)


def test_rmsnorm_and_rope_reference_vectors():
    norm = ours.RMSNorm(4, 1e-5)
    norm.weight.data = torch.tensor([0.5, 1, 1.5, 2])
    torch.testing.assert_close(norm(torch.tensor([1.0, 2, 3, 4])),
                               torch.tensor([0.182574, 0.730296, 1.643167, 2.921185]),
                               atol=1e-6, rtol=0)
    inv = ours.rope_inv_freq(ours.ModelConfig(head_dim=4, rope_theta=10000.0))
    cos, sin = ours.rope_cos_sin(inv, torch.tensor([[3]]), torch.float32)
    x = torch.tensor([1.0, 2, 3, 4]).view(1, 1, 1, 4)
    torch.testing.assert_close(ours.apply_rope(x, cos, sin).flatten(),
                               torch.tensor([-1.413353, 1.879118, -2.828857, 4.058191]),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["llama_gqa_llama3rope32_tied", "qwen2_bias_untied"])
def test_save_pretrained_loads_in_transformers_with_same_logits(tmp_path, name):
    from transformers import AutoModelForCausalLM
    cfg = CONFIGS[name]
    hf = hf_tiny(**cfg)
    hf.save_pretrained(tmp_path / "a")
    m = ours.Transformer.from_pretrained(str(tmp_path / "a"))
    # change the weights so the round trip cannot pass by reloading the original
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.save_pretrained(str(tmp_path / "b"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "b")).eval()
    ids = torch.randint(0, 128, (2, 23))
    with torch.no_grad():
        assert (back(ids).logits - m(ids)).abs().max().item() <= 1e-5
    with open(tmp_path / "b" / "config.json") as f:
        assert json.load(f)["tie_word_embeddings"] == cfg["tied"]


def test_load_sharded_checkpoint(tmp_path):
    hf = hf_tiny(kind="qwen2", tied=False)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    m = ours.Transformer.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        assert (hf(ids).logits - m(ids)).abs().max().item() <= 1e-4


def test_kv_cache_decoding_equals_full_forward(hf_pair):
    _, m = hf_pair(kind="llama")
    ids = torch.randint(0, 128, (2, 30))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 30)
        steps = [m(ids[:, :12], cache=cache)]
        steps += [m(ids[:, t:t + 1], cache=cache) for t in range(12, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    m = ours.Transformer.from_pretrained("tiny").train()
    ids = torch.randint(0, 256, (2, 16))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        m(ids).float().logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_tiny_preset_is_deterministic_and_saves_loads(tmp_path):
    a, b = ours.Transformer.from_pretrained("tiny"), ours.Transformer.from_pretrained("tiny")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    a.save_pretrained(str(tmp_path))
    c = ours.Transformer.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(a(ids), c(ids))


def test_unknown_model_name_lists_the_presets():
    with pytest.raises(ValueError) as e:
        ours.Transformer.from_pretrained("llama-9000")
    for preset in presets.PRESETS:
        assert preset in str(e.value)


def test_gated_model_error_says_how_to_log_in(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*a, **k):
        # skip __init__, which wants a live HTTP response
        error = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(error, "403 Client Error: access to model is restricted")
        raise error
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(presets.UserError, match="hf auth login"):
        ours.Transformer.from_pretrained("llama3.2-3b")


def test_missing_weights_file_names_the_directory(tmp_path):
    hf_tiny().config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ours.Transformer.from_pretrained(str(tmp_path))


def test_rope_frequencies_stay_fp32_when_the_model_is_cast_to_bf16():
    """bf16 is the default dtype on CUDA: casting the model must not round inv_freq (it would turn
    the angles ~0.05 rad wrong by position 256, and a reloaded checkpoint, which rebuilds them in
    fp32, would differ)."""
    cfg = ours.tiny_config()
    exact = ours.rope_inv_freq(cfg)
    built = ours.Transformer.from_config(cfg, torch.device("cpu"), torch.bfloat16)
    cast = ours.Transformer.from_config(cfg, torch.device("cpu"), torch.float32).to(torch.bfloat16)
    for m in (built, cast):
        assert m.embed_tokens.weight.dtype == torch.bfloat16
        assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, exact)


def test_a_model_built_from_a_seed_draws_what_torchs_own_modules_draw():
    """Transformer(cfg) after manual_seed draws, module by module, what torch's default inits
    draw (so the committed studies' starts, from_config's re-init after it, retrain bit for bit):
    the reference is the same modules built from plain torch.nn, in model order."""
    cfg = ours.tiny_config()
    torch.manual_seed(7)
    model = ours.Transformer(cfg)
    after = torch.rand(3)
    torch.manual_seed(7)
    nn = torch.nn
    ref = [nn.Embedding(cfg.vocab_size, cfg.dim).weight]
    for _ in range(cfg.n_layers):
        ref += [nn.Linear(cfg.dim, n * cfg.head_dim, bias=False).weight
                for n in (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads)]
        ref += [nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False).weight]
        ref += [nn.Linear(cfg.dim, cfg.ffn_dim, bias=False).weight for _ in range(2)]
        ref += [nn.Linear(cfg.ffn_dim, cfg.dim, bias=False).weight]
    nn.Linear(cfg.dim, cfg.vocab_size, bias=False)  # the head: tied, its draws discarded
    assert torch.equal(torch.rand(3), after)
    ours_2d = [p for p in model.parameters() if p.dim() == 2]
    assert len(ours_2d) == len(ref) and all(torch.equal(a, b) for a, b in zip(ours_2d, ref))
