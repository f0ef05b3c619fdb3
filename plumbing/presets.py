"""
presets.py: which model a name means, and where its files come from.

    PRESETS          short name -> hub repo of an instruct checkpoint (`--model llama3.2-3b`)
    PRESET_CONFIGS   each preset's config.json shapes, so that plan.py can size a run offline
    resolve_checkpoint(name_or_path) -> a local directory in Hugging Face format

Choices: a preset, a local directory or any `org/name` hub id is accepted; the hub is asked only
for what model.py and tokenizer.py read (config, safetensors, tokenizer files, chat template), never
for .bin/.gguf copies. Every way this can fail on a user's machine (unknown name, gated repo,
offline without a cached copy) is a UserError whose message says what to do, so train.py ends with
that message and exit code 2.
"""
import os

from plumbing.errors import UserError

# Instruct checkpoints on the Hugging Face hub. Llama repos are gated: accept the license first.
PRESETS = {
    "tiny": None,  # built in code, see tiny_config() and tokenizer.tiny_tokenizer()
    "llama3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-math-1.5b": "Qwen/Qwen2.5-Math-1.5B-Instruct",
    # SmolLM2: Llama architecture, ChatML; ungated. The 135M one runs offline from the GGUF in
    # ../shared/data (tools/convert_gguf.py, README "Real model")
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}

# From ../shared/docs/REFERENCES.md 4.5 (Llama-3.2, Qwen2.5) and, for Qwen2.5-Math and SmolLM2, the
# hub's config.json files as we know them (SmolLM2-135M checked against the GGUF in ../shared/data).
_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "vocab_size", "rope_theta", "rms_norm_eps",
               "max_position_embeddings")
_LLAMA32 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
PRESET_CONFIGS = {name: dict(zip(_SHAPE_KEYS, shape), model_type=kind, tie_word_embeddings=True,
                             **extra)
                  for name, kind, shape, extra in [
    ("llama3.2-1b", "llama", (2048, 16, 32, 8, 8192, 128256, 5e5, 1e-5, 131072),
     dict(head_dim=64, rope_scaling=_LLAMA32)),
    ("llama3.2-3b", "llama", (3072, 28, 24, 8, 8192, 128256, 5e5, 1e-5, 131072),
     dict(head_dim=128, rope_scaling=_LLAMA32)),
    ("qwen2.5-0.5b", "qwen2", (896, 24, 14, 2, 4864, 151936, 1e6, 1e-6, 32768), {}),
    ("qwen2.5-1.5b", "qwen2", (1536, 28, 12, 2, 8960, 151936, 1e6, 1e-6, 32768), {}),
    ("qwen2.5-math-1.5b", "qwen2", (1536, 28, 12, 2, 8960, 151936, 1e4, 1e-6, 4096), {}),
    ("smollm2-135m", "llama", (576, 30, 9, 3, 1536, 49152, 1e5, 1e-5, 8192), {}),
    ("smollm2-360m", "llama", (960, 32, 15, 5, 2560, 49152, 1e5, 1e-5, 8192), {}),
    ("smollm2-1.7b", "llama", (2048, 24, 32, 32, 8192, 49152, 1.3e5, 1e-5, 8192), {})]}


def check_name(name_or_path: str):
    """A --model that can name nothing (no preset, directory or 'org/name' hub id): refused before
    anything else is checked or loaded (guard.check_options)."""
    if (name_or_path in PRESETS or os.path.isdir(name_or_path)
            or (name_or_path.count("/") == 1 and not os.path.exists(name_or_path))):
        return
    raise unknown_model(name_or_path)


def unknown_model(name: str) -> UserError:
    return UserError(f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}), a local "
                     "directory in Hugging Face format, or a hub repo id like 'org/name'")


def resolve_checkpoint(name_or_path: str) -> str:
    """Preset name or repo id -> local directory (downloading from the hub if needed)."""
    if os.path.isdir(name_or_path):
        if not os.path.exists(os.path.join(name_or_path, "config.json")):
            raise UserError(f"{name_or_path} is not a checkpoint in Hugging Face format: "
                            "it has no config.json")
        return name_or_path
    check_name(name_or_path)
    repo = PRESETS.get(name_or_path) or name_or_path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)
    try:
        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "merges.txt", "vocab.json"]
        return snapshot_download(repo, allow_patterns=patterns)
    except GatedRepoError as e:
        raise UserError(f"{repo} is gated: accept its license on https://huggingface.co/{repo}, "
                        "then log in with `hf auth login` (or set HF_TOKEN=<your token>) and run "
                        "again") from e
    except RepositoryNotFoundError as e:
        raise UserError(f"{repo} was not found on the hub (or is private: log in with "
                        f"`hf auth login`). Presets: {', '.join(PRESETS)}") from e
    except HFValidationError as e:  # e.g. '/no/such/dir': neither a directory nor a valid repo id
        raise unknown_model(name_or_path) from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:  # offline, or no hub reachable
        why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise UserError(f"{repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                        f"{why}: download it where there is internet (`hf download {repo}`) and "
                        "copy the cache here, or pass --model <local directory>") from e
