"""Shared test fixtures: where the real data lives, and tiny random Hugging Face models to compare against."""

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
requires_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def hf_tiny(kind="llama", tied=True, scaling=True, n_kv=2, vocab=128, seed=0):
    """A random transformers model: Llama (GQA, llama3 rope scaling factor 32) or Qwen2 (q/k/v bias)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=n_kv, vocab_size=vocab, tie_word_embeddings=tied,
                  max_position_embeddings=131072, initializer_range=0.2)
    if kind == "llama":
        rope = dict(rope_theta=500000.0)
        if scaling:
            rope["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        model = LlamaForCausalLM(LlamaConfig(**common, rms_norm_eps=1e-5, **rope))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, rms_norm_eps=1e-6, rope_theta=1e6))
        with torch.no_grad():  # transformers inits biases to zero: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(std=0.5)
    return model.eval()


GGUF_FILE = SHARED / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT_SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "convert_gguf.py"
_conversion = {}  # the background conversion: its process and output directory


def pytest_collection_finish(session):
    """Start de-quantising the GGUF (experiments/convert_gguf.py, ~35 s of single-threaded file parsing) in a
    background process as soon as the tests are known, so that it overlaps the tests before test_real_model*."""
    import importlib.util
    import subprocess
    import sys
    import tempfile
    uses = any("smollm2_dir" in getattr(item, "fixturenames", ()) for item in session.items)
    if not uses or not GGUF_FILE.is_file() or any(importlib.util.find_spec(p) is None for p in ("gguf", "accelerate")):
        return
    root = Path(tempfile.mkdtemp(prefix="smollm2-135m-"))
    _conversion.update(root=root, out=root / "model", log=open(root / "convert.log", "w+"))  # a file, not a pipe:
    # nobody reads the output until the fixture asks, and a full pipe would stall the converter
    _conversion["proc"] = subprocess.Popen([sys.executable, str(CONVERT_SCRIPT), str(root / "model"), str(GGUF_FILE)],
                                           stdout=_conversion["log"], stderr=subprocess.STDOUT)


def pytest_unconfigure(config):
    import shutil
    if "proc" in _conversion:
        _conversion["proc"].kill()
        _conversion["proc"].wait()
        _conversion["log"].close()
        shutil.rmtree(_conversion["root"], ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct: ../shared/data's GGUF de-quantised ONCE per session into a Hugging Face
    directory (experiments/convert_gguf.py, started in the background when collection ends). Skips without the
    file or the gguf/accelerate packages."""
    if not GGUF_FILE.is_file():
        pytest.skip(f"{GGUF_FILE} is absent")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    if "proc" not in _conversion:  # e.g. the fixture requested in a way collection did not see
        pytest.fail("the GGUF conversion was not started at collection time")
    proc, log = _conversion["proc"], _conversion["log"]
    proc.wait(timeout=900)
    log.seek(0)
    assert proc.returncode == 0, log.read()[-3000:]
    return _conversion["out"]


@pytest.fixture
def hf_pair(tmp_path):
    """(transformers model, our model loaded from its saved checkpoint) for a given config."""
    import model as ours

    def make(**kw):
        hf = hf_tiny(**kw)
        hf.save_pretrained(tmp_path / "ckpt")
        return hf, ours.Transformer.from_pretrained(str(tmp_path / "ckpt")).eval()
    return make


def wait_for_checkpoint(proc, out_dir, name, timeout):
    """Poll until `latest` in out_dir names checkpoint `name` or a later one (names sort by step), or proc ends;
    then assert the run is still going, so that killing it now really interrupts it."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        latest = out_dir / "latest"
        if latest.exists() and latest.read_text().strip() >= name:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"


def free_port() -> int:
    """A TCP port nobody listens on, for a test's own process group (mp.spawn)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
