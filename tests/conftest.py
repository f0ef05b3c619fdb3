"""Shared test fixtures: where the real data lives, and tiny random Hugging Face models to compare
against."""

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
requires_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")

# Under pytest-xdist (two workers, pytest.ini) each worker gets one thread; `-n 0`
# gets two. TEST_THREADS overrides both (tests/mutate.py runs two).
torch.set_num_threads(int(os.environ.get("TEST_THREADS", 0)) or
                      (1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1)))
# Longest first (wall s, one worker of two: 130, 160, 60; 230, 60, 55, 55, 50, 40, 30, 25, 25):
# workers take whole files in this order (pytest.ini), so the short ones fill in at the end;
# test_real_model.py comes 4th so that the GGUF conversion started with the run is done by then.
LONGEST_FIRST = ("test_dist.py", "test_plan.py", "test_options.py", "test_real_model.py",
                 "test_fair_ablation.py", "test_lora_vs_full.py", "test_disjoint.py",
                 "test_lora.py", "test_plan_time.py", "test_fsdp.py", "test_speed.py",
                 "test_ablation.py", "test_faults.py", "test_verify_math500.py",
                 "test_gpu_check.py", "test_process.py", "test_train.py", "test_cli.py",
                 "test_gpu_memory.py", "test_mutate.py", "test_mel.py")


# What `python -m pytest` leaves to `python -m pytest -m slow` (pytest.ini deselects them): the
# studies' --quick grids, multi-process and real-model runs, the memory plan against measured peaks,
# the end-to-end runs of more than a few seconds. CI runs both (README's test command).
SLOW = {"test_dist.py", "test_fsdp.py", "test_real_model.py", "test_fair_ablation.py",
        "test_lora_vs_full.py", "test_ablation.py", "test_plan.py", "test_gpu_check.py",
        "test_gpu_memory.py", "test_options.py", "test_process.py", "test_verify_math500.py",
        "test_real_rl.py",
        "test_disjoint.py::test_dose_response_quick_writes_the_contrast_per_dose",
        "test_speed.py::test_bench_quick_runs_end_to_end",
        "test_speed.py::test_compiled_decode_gives_the_plain_paths_tokens",
        "test_lora.py::test_killed_lora_run_with_a_reference_resumes_bit_exact_from_its_base",
        "test_plan_time.py::test_micro_batch_auto_through_train_py_fits_and_one_more_does_not",
        "test_plan_time.py::test_plan_gpu_through_train_py_prints_the_estimate_with_its_assumptions",
        "test_plan_time.py::test_a_decode_step_counts_its_matmuls_and_reads_its_weights_and_kv_cache",
        "test_mutate.py::test_the_copy_fails_under_a_mutation_and_passes_without_it",
        "test_faults.py::test_a_fault_inside_a_save_loses_nothing_complete_and_resumes_to_the_same_weights",
        "test_faults.py::test_ctrl_c_ends_with_one_line_naming_the_checkpoint_and_the_resume_command",
        "test_faults.py::test_a_full_disk_mid_run_ends_with_one_line_naming_what_is_safe",
        "test_train.py::test_killed_mid_riel_with_a_non_empty_buffer_and_a_reference_resumes_bit_exact",
        "test_train.py::test_placebo_testbed_with_a_validation_eval_rl_warmup_and_every_fairness_switch",
        "test_cli.py::test_user_mistakes_end_with_the_message_alone_and_a_bug_keeps_its_traceback"}


def is_slow(item) -> bool:
    return item.path.name in SLOW or f"{item.path.name}::{item.originalname}" in SLOW


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection reads the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_slow(item):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # stable: the rest keep their order
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def hf_tiny(kind="llama", tied=True, scaling=True, n_kv=2, vocab=128, seed=0):
    """A random transformers model: Llama (GQA, llama3 rope scaling factor 32) or Qwen2
    (q/k/v bias)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=n_kv, vocab_size=vocab,
                  tie_word_embeddings=tied,
                  max_position_embeddings=131072, initializer_range=0.2)
    if kind == "llama":
        rope = dict(rope_theta=500000.0)
        if scaling:
            rope["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}
        model = LlamaForCausalLM(LlamaConfig(**common, rms_norm_eps=1e-5, **rope))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, rms_norm_eps=1e-6, rope_theta=1e6))
        with torch.no_grad():  # transformers inits biases to zero: make them matter
            for layer in model.model.layers:
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.bias.normal_(std=0.5)
    return model.eval()


GGUF_FILE = SHARED / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "convert_gguf.py"
# where the background conversion writes; inherited by xdist's workers
CONVERSION_ENV = "SMOLLM2_CONVERSION_DIR"
_conversion = {}  # the background conversion this process started: its process and directory


def _may_use_smollm2(config) -> bool:
    """Whether the run may reach test_real_model*: a directory argument or one of those files
    (cheap to be wrong: an unused conversion is killed at the end)."""
    if config.option.markexpr == "not slow":  # pytest.ini's default: test_real_model.py is slow
        return False
    paths = [Path(str(a).split("::")[0]) for a in config.args] or [Path("tests")]
    return any(p.is_dir() or p.name.startswith("test_real_model") for p in paths)


def pytest_configure(config):
    """Start de-quantising the GGUF (tools/convert_gguf.py, ~25 s of one core) in a
    background process when the run starts, so that it overlaps the tests before test_real_model*.
    Only the main process does: under pytest-xdist the workers find its directory in the environment
    and wait for its `rc` file."""
    import importlib.util
    import shlex
    import subprocess
    import sys
    import tempfile
    if (hasattr(config, "workerinput") or CONVERSION_ENV in os.environ
            or not _may_use_smollm2(config)):
        return
    missing = any(importlib.util.find_spec(p) is None for p in ("gguf", "accelerate"))
    if not GGUF_FILE.is_file() or missing:
        return
    root = Path(tempfile.mkdtemp(prefix="smollm2-135m-"))
    # the exit status goes to a file, so that a worker (not this one's child) can tell it finished
    convert = shlex.join([sys.executable, str(CONVERT_SCRIPT), str(root / 'model'), str(GGUF_FILE)])
    cmd = (f"{convert} > {shlex.quote(str(root / 'convert.log'))} 2>&1; "
           f"echo $? > {shlex.quote(str(root / 'rc'))}")
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
    """The real SmolLM2-135M-Instruct: ../shared/data's GGUF de-quantised ONCE per run into a
    Hugging Face directory (tools/convert_gguf.py, started in the background by pytest_configure).
    Skips without the file or the gguf/accelerate packages."""
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


@pytest.fixture(scope="session")
def quick_starts(tmp_path_factory):
    """copy(dest, seeds): experiments/fair_ablation.py's --quick MoE-SFT starts on the nested
    testbed (an MEF run and the premise probe each, fa.run_sft) copied into dest, as fa.run_dir
    lays them out. Each seed is trained once per run, under a lock, whichever xdist worker asks
    first: test_fair_ablation and test_lora_vs_full start from the same seed-0 run."""
    import fcntl
    import shutil
    from experiments import fair_ablation as fa
    base = tmp_path_factory.getbasetemp()
    # under xdist: the run's directory, above each worker's own
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "quick_starts"
    root.mkdir(exist_ok=True)

    def copy(dest, seeds):
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            for seed in seeds:
                fa.run_sft(fa.Config(out_dir=str(root), quick=True), "nested", seed)
                shutil.copytree(fa.run_dir(fa.Config(out_dir=str(root)), "nested", fa.SFT, seed),
                                fa.run_dir(fa.Config(out_dir=str(dest)), "nested", fa.SFT, seed))
        return str(dest)
    return copy


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
    """Poll until `latest` in out_dir names checkpoint `name` or a later one (names sort by
    step), or proc ends; then assert the run is still going, so that killing it now really
    interrupts it."""
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
