"""
checkpoint.py: atomic checkpoints that transformers can load; resuming from the last complete one.

A checkpoint is a directory `out_dir/ckpt-<global step>` holding
    config.json, model.safetensors, tokenizer files   Hugging Face format (AutoModelForCausalLM)
    trainer_state.pt                                  stage, step, optimizer, RNG and buffer state
    adapters.safetensors                              --lora-rank only: the adapters (lora.py; the
                                                      weights above are then base + adapters merged)
    peft/adapter_config.json, adapter_model.safetensors  --lora-rank only: the same in PEFT's format
                                                      (a folder: beside model.safetensors they would
                                                      make transformers load base + adapters)

Why a run killed at ANY moment loses nothing:
1. everything is written into `ckpt-<step>.tmp` first, files fsynced;
2. the finished directory is renamed to `ckpt-<step>` (a rename is atomic on POSIX file systems);
3. the small file `latest` that names it is replaced atomically (`latest.tmp`, fsync, os.replace);
4. only then are older checkpoints deleted.
A kill before step 3 leaves `latest` naming the previous complete checkpoint (before the first
one's `latest`, no `latest`: the newest complete checkpoint is the latest), and the half-written
`.tmp` directory is swept away on the next start. A write the file system refuses (a full disk) is
an OSError, whichever library wrote. Evaluations run after a checkpoint are added to its
trainer_state.pt (record_evals, atomically), so that a resume does not run them again.

Reading weights back is model.Transformer.from_pretrained's (model.py); this file never imports it.
"""

import errno
import glob
import json
import os
import re
import shutil
from contextlib import contextmanager

import torch

from plumbing import dist
from plumbing.errors import UserError

STATE_FILE = "trainer_state.pt"


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(out_dir: str, model, tok, state: dict, weights: dict | None = None, keep: int = 1,
         files: dict | None = None) -> str:
    """Write a checkpoint for state['gstep'] atomically, make it the latest; returns its directory.
    weights: the model's state dict when model.state_dict() does not hold it whole (FSDP,
    dist.full_state) or is not what Hugging Face loads (LoRA: the merged weights).
    files: {name: tensors} written beside it as safetensors, {name.json: dict} as json (LoRA's
    adapters, ours and PEFT's)."""
    from safetensors.torch import save_file
    name = f"ckpt-{state['gstep']:06d}"
    final, tmp = os.path.join(out_dir, name), os.path.join(out_dir, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _writing(out_dir):
        # in the parameters' own dtype: a resumed run continues bit for bit
        model.save_pretrained(tmp, state=weights)
        tok.save_pretrained(tmp)
        torch.save(state, os.path.join(tmp, STATE_FILE))
        for file, content in (files or {}).items():
            os.makedirs(os.path.dirname(os.path.join(tmp, file)), exist_ok=True)
            if file.endswith(".json"):
                with open(os.path.join(tmp, file), "w") as f:
                    json.dump(content, f, indent=2)
            else:  # format pt: as PEFT writes its own; transformers' loaders check it
                save_file(content, os.path.join(tmp, file), metadata={"format": "pt"})
    shareable(tmp)
    for root, dirs, names in os.walk(tmp):
        for f in names + dirs:
            _fsync(os.path.join(root, f))
    if os.path.exists(final):
        # the same step saved twice (a resume with fewer steps, a stage ending right after a
        # periodic save): the old one is set aside, not deleted, until the new one is in place
        shutil.rmtree(final + ".prev", ignore_errors=True)
        os.rename(final, final + ".prev")
    os.rename(tmp, final)
    _fsync(out_dir)
    with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
    _fsync(out_dir)
    shutil.rmtree(final + ".prev", ignore_errors=True)
    prune(out_dir, keep, final)
    return final


def shareable(directory: str):
    """Give the files under directory the mode open() gives (0666 less the umask, as config.json's):
    safetensors writes through a private temporary file and leaves its files 0600."""
    mask = os.umask(0o22)
    os.umask(mask)
    for root, _, names in os.walk(directory):
        for name in names:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


@contextmanager
def _writing(out_dir: str):
    """A write that fails for the file system is an OSError, which train.py's command line ends
    with one line (process.py): safetensors reports a full disk as SafetensorError('... (os error
    28)'), torch.save as RuntimeError('... unexpected pos ...'), without an errno."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:
        code = re.search(r"\(os error (\d+)\)", str(err))
        n = int(code.group(1)) if code else None
        if n is None and shutil.disk_usage(out_dir).free < 1 << 20:  # under 1 MiB left
            n = errno.ENOSPC
        if n is None:
            raise
        raise OSError(n, os.strerror(n), out_dir) from err


def record_evals(out_dir: str, evals: dict):
    """Evaluations run after the latest checkpoint, added to it (its trainer_state.pt replaced
    atomically): a resume then neither runs them again nor logs them twice. Rank 0 writes; no
    checkpoint (an eval-only run): nothing to add to."""
    path = latest(out_dir) if dist.is_main() else None
    if path is None:
        return
    state = load_state(path)
    state["evals"] = dict(evals)
    tmp = os.path.join(path, STATE_FILE + ".tmp")
    with _writing(out_dir):
        torch.save(state, tmp)
    _fsync(tmp)
    os.replace(tmp, os.path.join(path, STATE_FILE))
    _fsync(path)


def complete_checkpoints(out_dir: str) -> list:
    """The run's complete checkpoint directories, oldest first."""
    return sorted(d for d in glob.glob(os.path.join(out_dir, "ckpt-*"))
                  if not d.endswith((".tmp", ".prev"))
                  and os.path.exists(os.path.join(d, STATE_FILE)))


def prune(out_dir: str, keep: int, current: str):
    """Delete all but the newest `keep` complete checkpoints (never `current`)."""
    for old in complete_checkpoints(out_dir)[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def latest(out_dir: str) -> str | None:
    """The last complete checkpoint directory of a run, or None. Sweeps half-written ones away and
    puts back a checkpoint set aside by a save of the same step that was killed before its
    replacement was in place."""
    for tmp in glob.glob(os.path.join(out_dir, "ckpt-*.tmp")):
        shutil.rmtree(tmp, ignore_errors=True)
    for prev in glob.glob(os.path.join(out_dir, "ckpt-*.prev")):
        if os.path.exists(os.path.join(prev[:-5], STATE_FILE)):
            shutil.rmtree(prev, ignore_errors=True)
        else:
            shutil.rmtree(prev[:-5], ignore_errors=True)
            os.rename(prev, prev[:-5])
    pointer = os.path.join(out_dir, "latest")
    if not os.path.exists(pointer):  # none, or a kill between the rename of the first checkpoint
        done = complete_checkpoints(out_dir)  # and `latest` (save, step 3): it is complete
        return done[-1] if done else None
    with open(pointer, "rb") as f:
        name = f.read().decode(errors="replace").strip()
    path = os.path.join(out_dir, name)
    if (not name.startswith("ckpt-") or "/" in name
            or not os.path.exists(os.path.join(path, STATE_FILE))):
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:56] + "...'"  # binary junk
        raise UserError(f"{pointer} names {shown}, which is not a complete checkpoint of this "
                        "run. " + fallback_hint(out_dir, path))
    return path


def fallback_hint(out_dir: str, bad: str) -> str:
    """What to do when `bad` cannot be used: the newest other complete checkpoint, and how to point
    `latest` at it."""
    others = [d for d in complete_checkpoints(out_dir)
              if os.path.abspath(d) != os.path.abspath(bad)]
    if not others:
        return "No other complete checkpoint is kept: start the run again in a new --out-dir."
    name = os.path.basename(others[-1])
    return (f"The previous complete checkpoint is {others[-1]}: to fall back to it, "
            f"`echo {name} > {os.path.join(out_dir, 'latest')}` and --resume.")


def check(path: str, out_dir: str | None = None):
    """Refuse a damaged checkpoint with a message naming the file, what is wrong and the checkpoint
    to fall back to (out_dir: the run's directory; None: a checkpoint on its own). Checks what a
    resume reads: config.json (against the weights' shapes), the safetensors headers and sizes,
    trainer_state.pt (when the directory is a train.py checkpoint), tokenizer."""
    hint = fallback_hint(out_dir, path) if out_dir else ""

    def damaged(file, what):
        raise UserError(f"checkpoint {path} is damaged: {file} {what}. {hint}".strip())
    if problem := model_problem(path):
        damaged(*problem)
    tokenizers = ("tokenizer.json", "tokenizer.model")
    if not any(os.path.exists(os.path.join(path, f)) for f in tokenizers):
        damaged("tokenizer.json", "is missing")
    state = os.path.join(path, STATE_FILE)
    if out_dir is not None or os.path.exists(state):
        try:
            load_state(path)
        except Exception as err:  # noqa: BLE001
            damaged(STATE_FILE, f"cannot be read ({type(err).__name__})")


def model_problem(path: str) -> tuple | None:
    """(file, what is wrong) of the first file of a model directory that loading it would fail on:
    config.json missing, not JSON or not the weights' shapes; weights missing, unreadable or
    truncated. None: it loads."""
    from safetensors import safe_open
    try:
        with open(os.path.join(path, "config.json"), "rb") as f:
            config = json.loads(f.read())
    except FileNotFoundError:
        return "config.json", "is missing"
    except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError
        return "config.json", f"cannot be read ({type(err).__name__}: {str(err)[:80]})"
    weights = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not any(os.path.basename(w).startswith("model") for w in weights):
        return "model.safetensors", "is missing"
    shapes = {}
    for w in weights:
        try:
            with safe_open(w, framework="pt") as f:  # parses the header
                f.keys()
            header, whole = _header(w)  # ... and the data it promises must be on disk
        except Exception as err:  # noqa: BLE001 (any parse failure means the same thing here)
            return os.path.basename(w), f"cannot be read ({type(err).__name__}: {err})"
        if not whole:
            return os.path.basename(w), "is shorter than its header says (truncated)"
        if os.path.basename(w).startswith("model"):
            shapes.update({k.removeprefix("model."): v["shape"] for k, v in header.items()
                           if k != "__metadata__"})
    return ("config.json", why) if (why := _unlike(config, shapes)) else None


def _unlike(config, shapes: dict) -> str | None:
    """How config.json disagrees with the weights' shapes ({name: shape}), or None: the sizes
    Transformer.from_pretrained builds from it (a Hugging Face Llama/Qwen2 config)."""
    need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size")
    lacks = [k for k in need if not isinstance(config, dict) or not isinstance(config.get(k), int)]
    if lacks:
        return f"is not a model config (no integer {lacks[0]})"
    n, dim = config["num_hidden_layers"], config["hidden_size"]
    heads = config["num_attention_heads"]
    layers = {int(k.split(".")[1]) for k in shapes if k.split(".")[0] == "layers"}
    if layers != set(range(n)):
        return f"says {n} layers, the weights hold {len(layers)}"
    head = config.get("head_dim") or dim // max(1, heads)
    want = {"embed_tokens.weight": [config["vocab_size"], dim],
            "layers.0.mlp.gate_proj.weight": [config["intermediate_size"], dim],
            "layers.0.self_attn.q_proj.weight": [heads * head, dim],
            "layers.0.self_attn.k_proj.weight":
                [config.get("num_key_value_heads", heads) * head, dim]}
    for key, shape in want.items():
        if key in shapes and list(shapes[key]) != shape:
            return f"gives {key} the shape {shape}, the weights {list(shapes[key])}"
    return None


def _header(file: str) -> tuple:
    """(the JSON header, whether the file holds the data it promises): a safetensors file is 8
    bytes of header length, the header, then the data its offsets name."""
    import struct
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return header, size >= 8 + n + max(ends, default=0)


def load_state(path: str) -> dict:
    # weights_only=False: the state holds Python containers (RNG states, buffer entries) we wrote
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)


def reference_model(out_dir: str, model, dtype=None):
    """--riel.kl-beta's frozen pi_ref: the policy as RIEL starts (after MEF, or --init), written
    once to out_dir/reference (atomically: .tmp, then a rename) so that a resumed run compares with
    the same weights, not its resumed ones. Under torchrun every rank calls it; rank 0 writes.
    dtype: what it is held in (default: the policy's); under autocast bf16, what autocast would cast
    fp32 weights to anyway, at half the memory (plan.py counts it)."""
    path = os.path.join(out_dir, "reference")
    # rank 0 decides for all: a rank that looked after rank 0 wrote would skip the collectives
    # below (a hang)
    if dist.from_main(lambda: not os.path.exists(os.path.join(path, "config.json"))):
        weights, _ = dist.full_state(model)  # under FSDP every rank gathers, rank 0 gets them
        if dist.is_main():
            shutil.rmtree(path + ".tmp", ignore_errors=True)
            with _writing(out_dir):
                model.save_pretrained(path + ".tmp", state=weights)
            shareable(path + ".tmp")
            os.rename(path + ".tmp", path)
        dist.barrier()
    w = model.embed_tokens.weight
    ref = type(model).from_pretrained(path, w.device, dtype or w.dtype)  # the policy's class
    return ref.eval().requires_grad_(False)
