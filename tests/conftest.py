"""Shared test fixtures: where the real data lives, and tiny random Hugging Face models to compare against."""

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
requires_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")

# pytest-xdist runs the suite in two workers, a file at a time (pytest.ini): each worker then gets one thread, so
# that they do not fight over the two cores. Run in one process (`-n 0`), it gets two.
# TEST_THREADS overrides both (tests/mutate.py runs two one-thread pytest processes at once).
torch.set_num_threads(int(os.environ.get("TEST_THREADS", 0)) or
                      (1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1)))
# The longest files first (CPU seconds measured on 2 cores: 180, 180, 70, 50, 45, 35, 30, 30, 25, 15, 10; the other
# 16 files take 50 together): the workers take whole files in this order (pytest.ini: --dist loadfile
# --no-loadscope-reorder), so the short files fill in at the end instead of a long one running alone.
LONGEST_FIRST = ("test_real_model.py", "test_dist.py", "test_fsdp.py", "test_options.py", "test_speed.py", "test_plan.py", "test_cli.py",
                 "test_ablation.py", "test_plan_time.py", "test_verify_math500.py", "test_train.py", "test_gpu_check.py",
                 "test_mel.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


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
CONVERT_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "convert_gguf.py"
CONVERSION_ENV = "SMOLLM2_CONVERSION_DIR"  # where the background conversion writes; inherited by xdist's workers
_conversion = {}  # the background conversion this process started: its process and directory


def _may_use_smollm2(config) -> bool:
    """Whether the run may reach test_real_model*: a directory argument or one of those files (cheap to be wrong:
    an unused conversion is killed at the end)."""
    paths = [Path(str(a).split("::")[0]) for a in config.args] or [Path("tests")]
    return any(p.is_dir() or p.name.startswith("test_real_model") for p in paths)


def pytest_configure(config):
    """Start de-quantising the GGUF (tools/convert_gguf.py, ~25 s of one core) in a
    background process when the run starts, so that it overlaps the tests before test_real_model*. Only the main
    process does: under pytest-xdist the workers find its directory in the environment and wait for its `rc` file."""
    import importlib.util
    import shlex
    import subprocess
    import sys
    import tempfile
    if hasattr(config, "workerinput") or CONVERSION_ENV in os.environ or not _may_use_smollm2(config):
        return
    if not GGUF_FILE.is_file() or any(importlib.util.find_spec(p) is None for p in ("gguf", "accelerate")):
        return
    root = Path(tempfile.mkdtemp(prefix="smollm2-135m-"))
    # the exit status goes to a file, so that a worker process (not this one's child) can tell that it finished
    cmd = (f"{shlex.join([sys.executable, str(CONVERT_SCRIPT), str(root / 'model'), str(GGUF_FILE)])} "
           f"> {shlex.quote(str(root / 'convert.log'))} 2>&1; echo $? > {shlex.quote(str(root / 'rc'))}")
    _conversion.update(root=root, proc=subprocess.Popen(["sh", "-c", cmd], start_new_session=True))
    os.environ[CONVERSION_ENV] = str(root)


def pytest_unconfigure(config):
    import shutil
    import signal
    if "proc" in _conversion:  # the whole process group: the shell and the converter it started
        try:
            os.killpg(_conversion["proc"].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _conversion["proc"].wait()
        shutil.rmtree(_conversion["root"], ignore_errors=True)
        os.environ.pop(CONVERSION_ENV, None)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct: ../shared/data's GGUF de-quantised ONCE per run into a Hugging Face
    directory (tools/convert_gguf.py, started in the background by pytest_configure). Skips without the
    file or the gguf/accelerate packages."""
    import time
    if not GGUF_FILE.is_file():
        pytest.skip(f"{GGUF_FILE} is absent")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    if CONVERSION_ENV not in os.environ:  # e.g. a run whose arguments _may_use_smollm2 misjudged
        pytest.fail("the GGUF conversion was not started when the run began")
    root = Path(os.environ[CONVERSION_ENV])
    deadline = time.time() + 900
    while not (root / "rc").is_file() or not (root / "rc").read_text().strip():
        assert time.time() < deadline, "the GGUF conversion did not finish in 15 minutes"
        time.sleep(0.2)
    assert (root / "rc").read_text().strip() == "0", (root / "convert.log").read_text()[-3000:]
    return root / "model"


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
