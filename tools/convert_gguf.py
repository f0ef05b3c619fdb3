"""
tools/convert_gguf.py: a GGUF chat model -> a Hugging Face directory that train.py, model.py and
transformers load, offline. Made for SmolLM2-135M-Instruct (the GGUF in ../shared/data/models,
README "Real model").

    python tools/convert_gguf.py out/smollm2-135m          # ~25 s on one CPU core, 514 MB of fp32
    python train.py --model out/smollm2-135m --data gsm8k --data-dir ../shared/data

How: transformers reads GGUF itself and de-quantises it to fp32 (it needs the `gguf` and
`accelerate` packages, test/tool-only: requirements-dev.txt; the training code never imports
them). A model loaded that way refuses `save_pretrained`, so its state dict is copied into a fresh
LlamaForCausalLM built from the same config. The config loses `quantization_config` first: left
in, every later from_pretrained of the directory (and of train.py's checkpoints, which copy
config.json) would look for a GGUF file again. The tokenizer is saved with its chat template
(chat_template.jinja), the model's own, default system prompt included; render_chat replaces that
prompt with the expert's (plumbing/tokenizer.py).
The de-quantised weights are not the bf16 release (Q4_1 blocks), but they are a working instruct
model.
"""

import contextlib
import functools
import os
import sys
import time

DEFAULT_GGUF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                            "data", "models", "smollm2-135m-instruct",
                            "SmolLM2-135M-Instruct.Q4_1.gguf")


@contextlib.contextmanager
def cached(module, name: str):
    """module.name replaced by a memoised version of itself inside the block."""
    original = getattr(module, name)
    setattr(module, name, functools.lru_cache(maxsize=None)(original))
    try:
        yield
    finally:
        setattr(module, name, original)


def convert(gguf_file: str, out_dir: str) -> str:
    """De-quantise `gguf_file` into `out_dir` (fp32 safetensors, config, tokenizer, chat
    template). Returns out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    for package in ("gguf", "accelerate"):  # transformers' GGUF reader needs both: say so early
        try:
            __import__(package)
        except ImportError as e:
            raise SystemExit(f"reading GGUF needs the `{package}` package: "
                             "pip install -r requirements-dev.txt") from e
    if not os.path.isfile(gguf_file):
        raise FileNotFoundError(f"{gguf_file} not found (the GGUF file of the model to convert)")
    src, name = os.path.split(os.path.abspath(gguf_file))
    import gguf
    # transformers parses the file 3 times and rebuilds gguf's tensor-name map per tensor (397x):
    # over half the CPU time. Both are pure, so cached here (looked up in gguf at each call).
    with cached(gguf, "GGUFReader"), cached(gguf, "get_tensor_name_map"):
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if config.model_type != "llama":
        raise ValueError(f"{gguf_file}: model_type {config.model_type!r}; "
                         "this script builds a LlamaForCausalLM")
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())  # strict: no weight is left at its random init
    fresh.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1].startswith("-"):
        raise SystemExit("usage: python tools/convert_gguf.py OUT_DIR [GGUF_FILE] "
                         f"(default: {DEFAULT_GGUF})")
    t0 = time.time()
    out = convert(sys.argv[2] if len(sys.argv) == 3 else DEFAULT_GGUF, sys.argv[1])
    print(f"{out}: converted in {time.time() - t0:.0f}s")
