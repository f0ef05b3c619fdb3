"""lora.py: the base at init, adapters the only trainable weights, merged Hugging Face checkpoints,
bit-exact resume, and --riel.kl-beta's reference as the policy with its adapters off (no second
model)."""
import dataclasses
import json

import pytest
import torch

from plumbing import dist
from plumbing import lora
import train
from plumbing.optim import make_optimizer
from model import Transformer, tiny_config
from rollout import token_logprobs
from test_train import SMALL, killed_after_checkpoint

NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny(dtype=torch.float32, **changes):
    cfg = dataclasses.replace(tiny_config(), **changes)
    return Transformer.from_config(cfg, "cpu", dtype, seed=0)


def perturb(model, seed=1):
    """Adapters as after some training (B != 0), drawn from their own generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("autocast", [False, True])
def test_a_lora_linear_is_w_x_plus_b_plus_alpha_over_r_b_a_x_with_its_gradients(autocast):
    """The forward (scale on the thin tensor, sum in place) against the formula written out, outputs
    and gradients (input, A, B), with a bias, a 3-d input and a scale that is not a power of 2;
    under CPU bf16 autocast too."""
    base = torch.nn.Linear(24, 40)
    m = lora.LoRALinear(base, rank=3, alpha=5.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(2, 5, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = m(x)
        ref = x @ base.weight.T + base.bias + (5.0 / 3) * (x @ m.lora_A.T) @ m.lora_B.T
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), ref.float(), **tol)
    w = torch.randn(y.shape)
    for a, b in zip(torch.autograd.grad((y.float() * w).sum(), (x, m.lora_A, m.lora_B)),
                    torch.autograd.grad((ref.float() * w).sum(), (x, m.lora_A, m.lora_B))):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype,bias", [(torch.float32, False), (torch.float32, True),
                                        (torch.bfloat16, False)])
def test_at_init_a_lora_model_is_its_base_bit_for_bit(dtype, bias):
    base = tiny(dtype, qkv_bias=bias)
    model = lora.add_lora(tiny(dtype, qkv_bias=bias), rank=2, alpha=4)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
               if isinstance(m, lora.LoRALinear)}
    assert wrapped == set(NAMES) and len(lora.lora_layers(model)) == 7 * tiny_config().n_layers
    assert not isinstance(model.lm_head, lora.LoRALinear)
    assert model.lm_head.weight is model.embed_tokens.weight
    # the base keeps its state-dict keys (Hugging Face names); the adapters add theirs, in fp32
    assert set(base.state_dict()) == {k for k in model.state_dict() if not lora.is_adapter(k)}
    assert all(p.dtype == torch.float32 for p in lora.lora_parameters(model))
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))


def test_under_autocast_the_frozen_base_is_bf16_and_still_the_base_bit_for_bit():
    """train.py under autocast: the wrapped linears' base weights in bf16 (half the memory; autocast
    would cast them to bf16 at every forward anyway, so the logits are the fp32 model's under
    autocast, bit for bit), embedding and norms in fp32, and a merged checkpoint in one dtype, the
    run's fp32."""
    base = tiny(qkv_bias=True)
    model = lora.add_lora(tiny(qkv_bias=True), rank=2, alpha=4, base_dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    base_linears = [n for n in dtypes if n.rsplit(".", 2)[-2] in NAMES and not lora.is_adapter(n)]
    assert {dtypes[n] for n in base_linears} == {torch.bfloat16}
    assert (dtypes["embed_tokens.weight"] == dtypes["norm.weight"]
            == dtypes["layers.0.mlp.down_proj.lora_A"] == torch.float32)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(ids), base(ids))
    assert {v.dtype for v in lora.merged_state_dict(perturb(model)).values()} == {torch.float32}


def test_adapters_compute_the_merged_weights_and_switch_off_to_the_base():
    base, model = tiny(), perturb(lora.add_lora(tiny(), rank=2, alpha=4))
    plain = tiny()
    plain.load_state_dict(lora.merged_state_dict(model))
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        on = model(ids)
        assert (on - plain(ids)).abs().max() < 1e-5 and (on - base(ids)).abs().max() > 1e-2
        with lora.adapters_off(model):
            assert torch.equal(model(ids), base(ids))
        assert torch.equal(model(ids), on)  # switched back on
        assert torch.equal(lora.BaseModel(model)(ids), base(ids))


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False),
                                            (torch.float32, True)])
def test_only_adapters_get_gradients_and_optimizer_state(dtype, autocast):
    """fp32, bf16 base weights (--precision bf16), fp32 weights under bf16 autocast: fp32 adapters
    in every case."""
    model = lora.add_lora(tiny(dtype), rank=2, alpha=4)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not lora.is_adapter(k)}
    opt = make_optimizer(dist.parameters(model), lr=1e-2)
    assert [p for g in opt.param_groups for p in g["params"]] == lora.lora_parameters(model)
    ids = torch.randint(0, 256, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(ids).float().logsumexp(-1).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if lora.is_adapter(n)}
    assert all(p.grad.dtype == torch.float32 for p in lora.lora_parameters(model))
    # (A's gradient is 0 while B is: B A x)
    assert all(m.lora_B.grad.abs().max() > 0 for m in lora.lora_layers(model))
    opt.step()
    assert set(opt.state) == set(lora.lora_parameters(model))  # AdamW moments for the adapters only
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    assert all(m.lora_B.abs().max() > 0 for m in lora.lora_layers(model))


def test_the_reference_log_probs_are_the_base_models():
    base, model = tiny(), perturb(lora.add_lora(tiny(), rank=1, alpha=32))
    prompts, completions = [[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [10, 11]]
    with torch.no_grad():
        ref, _ = token_logprobs(lora.BaseModel(model), prompts, completions)
        want, _ = token_logprobs(base, prompts, completions)
        policy, _ = token_logprobs(model, prompts, completions)
    assert torch.equal(ref, want) and not torch.equal(policy, want)


def run(out_dir, *extra):
    train.main(train.cli(["--out-dir", str(out_dir), *SMALL, *extra]))


def latest(out):
    return out / (out / "latest").read_text().strip()


def load(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_checkpoint_is_the_merged_model_that_transformers_loads(tmp_path):
    run(tmp_path / "run", "--lora-rank", "2", "--lora-alpha", "4", "--stages", "mef", "riel")
    out = tmp_path / "run"
    ckpt = latest(out)
    adapters = load(ckpt / lora.ADAPTER_FILE)
    assert adapters and all(lora.is_adapter(k) for k in adapters) and all(
        v.abs().max() > 0 for k, v in adapters.items() if k.endswith("lora_B"))  # trained
    assert not any(lora.is_adapter(k) for k in load(ckpt / "model.safetensors"))
    # the base written once is the untouched start (tiny: seed 0's random weights)
    start = tiny().state_dict()
    written = load(out / lora.BASE_DIR / "model.safetensors")
    assert all(torch.equal(v, start[k[len("model."):]]) for k, v in written.items())
    mine = Transformer.from_pretrained(str(out / lora.BASE_DIR))
    lora.add_lora(mine, rank=2, alpha=4)
    lora.load_adapters(mine, str(ckpt / lora.ADAPTER_FILE))
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        ours, theirs = mine(ids), hf(ids).logits
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)
        assert (theirs - tiny()(ids)).abs().max() > 1e-2  # the adapters moved the model


def test_killed_lora_run_with_a_reference_resumes_bit_exact_from_its_base(tmp_path, monkeypatch):
    """RIEL with adapters on a MEF start (--init), killed after step 2: the resumed run rebuilds
    base (OUT/lora_base, not the merged weights) + adapters + their AdamW state, and ends where the
    uninterrupted run does, bit for bit. The kl-beta reference is the policy with its adapters off:
    checkpoint.reference_model (a second model) is never called. Under autocast (the CUDA default),
    so the bf16 base is rebuilt from OUT/lora_base's fp32 start as the fresh run built it."""
    run(tmp_path / "start", "--stages", "mef")
    monkeypatch.setattr(train.checkpoint, "reference_model",
                        lambda *a, **k: pytest.fail("a second model was built"))
    args = ("--checkpoint-every", "1", "--stages", "riel", "--lora-rank", "2", "--init",
            str(latest(tmp_path / "start")), "--riel.kl-beta", "0.05", "--precision", "autocast")
    run(tmp_path / "full", *args)
    out = tmp_path / "killed"
    # after step 2, the first that moves the adapters (a buffer flush: L_sft; step 1 has no signal)
    killed_after_checkpoint(monkeypatch, lambda: run(out, *args), gstep=2)
    moments = train.checkpoint.load_state(str(latest(out)))["optimizer"]["state"]
    assert len(moments) == 2 * 7 * tiny_config().n_layers  # AdamW state of the adapters only
    run(out, "--resume", *args)
    full, again = latest(tmp_path / "full"), latest(out)
    assert full.name == again.name == "ckpt-000004"
    for file in (lora.ADAPTER_FILE, "model.safetensors"):
        a, b = load(full / file), load(again / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    # merged into the run's dtype
    assert {v.dtype for v in load(again / "model.safetensors").values()} == {torch.float32}
    lines = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
             for d in (tmp_path / "full", out)]
    keys = ("loss", "grad_norm", "reward", "kl", "loss_sft", "flushed")
    picked = [[[m.get(k) for k in keys] for m in run] for run in lines]
    assert picked[0] == picked[1]
    assert max(m["kl"] for m in lines[0] if m["stage"] == "riel") > 0
    assert not (out / "reference").exists()
    # its checkpoints hold merged weights
    with pytest.raises(train.UserError, match="--lora-rank"):
        run(out, "--resume", "--stages", "riel", "--init", str(latest(tmp_path / "start")))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    with pytest.warns(UserWarning, match="randomly initialised"):
        run(out, "--lora-rank", "2", "--stages", "mef")
    return out


def test_weights_are_written_with_the_mode_the_umask_gives_as_config_json(lora_run, tmp_path):
    import os
    mask = os.umask(0o22)
    os.umask(mask)
    checkpoint = train.checkpoint
    checkpoint.reference_model(str(tmp_path), Transformer.from_config(tiny_config()))
    files = [latest(lora_run) / f for f in ("config.json", "model.safetensors", lora.ADAPTER_FILE,
                                            lora.PEFT_WEIGHTS, lora.PEFT_CONFIG)]
    files += [lora_run / lora.BASE_DIR / "model.safetensors", tmp_path / "reference" /
              "model.safetensors"]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {
        f.name: oct(0o666 & ~mask) for f in files}


@pytest.mark.parametrize("change", [["--lora-rank", "4"],
                                    ["--lora-rank", "2", "--lora-alpha", "4"]])
def test_a_lora_runs_rank_and_alpha_cannot_change_on_resume_even_when_allowed(lora_run, change):
    for allow in ((), ("--resume-allow-change", change[-2][2:])):
        with pytest.raises(train.UserError, match=f"cannot change {change[-2]} ") as err:
            run(lora_run, "--resume", "--stages", "mef", *change, *allow)
        assert "--resume-allow-change" not in str(err.value)


@pytest.mark.parametrize("what", ["damaged", "missing"])
def test_a_damaged_or_missing_lora_base_is_named_with_the_way_on(lora_run, tmp_path, what):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    base = out / lora.BASE_DIR
    if what == "missing":
        shutil.rmtree(base)
    else:
        (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:-50])
    with pytest.raises(train.UserError, match=f"LoRA base .* {what}.*--init .*ckpt-"):
        run(out, "--resume", "--lora-rank", "2", "--stages", "mef")


def test_lora_options_parse():
    cfg = train.cli(["--lora-rank", "1"])
    assert (cfg.lora_rank, cfg.lora_alpha) == (1, 32.0)
    assert train.cli([]).lora_rank == 0


def test_checkpoint_holds_peft_adapters_that_peft_loads_onto_the_base_as_the_merged_model(
        tmp_path):
    """PEFT's files beside ours: peft.PeftModel.from_pretrained(OUT/lora_base, ckpt/peft) takes
    every adapter as trained, at scale alpha / r (5 / 2, not 1), and computes the merged
    checkpoint's logits (transformers' and ours). peft is test-only: skipped without it."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="randomly initialised"):  # MEF: trained adapters, fast
        run(out, "--lora-rank", "2", "--lora-alpha", "5", "--stages", "mef")
    ckpt = latest(out)
    config = json.loads((ckpt / lora.PEFT_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(out / lora.BASE_DIR)
    assert sorted(config["target_modules"]) == sorted(NAMES)
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).eval()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(ids).logits
    policy = peft.PeftModel.from_pretrained(base, str(ckpt / lora.PEFT_DIR)).eval()  # wraps base
    written, loaded = load(ckpt / lora.PEFT_WEIGHTS), policy.state_dict()
    assert len(written) == 2 * 7 * tiny_config().n_layers == sum("lora_" in k for k in loaded)
    assert all(torch.equal(loaded[k.replace(".weight", ".default.weight")], v)
               for k, v in written.items())
    layers = [m for m in policy.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(layers) == 7 * tiny_config().n_layers
    assert {m.scaling["default"] for m in layers} == {2.5}
    merged_hf = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    ours = Transformer.from_pretrained(str(ckpt))
    with torch.no_grad():
        theirs = policy(ids).logits
        torch.testing.assert_close(theirs, merged_hf(ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs, ours(ids), atol=1e-5, rtol=0)
        assert (theirs - before).abs().max() > 1e-2  # the adapters moved the model
