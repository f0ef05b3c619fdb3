"""
checkpoint.py: atomic checkpoints that transformers can load, and resuming from the last complete one.

A checkpoint is a directory `out_dir/ckpt-<global step>` holding
    config.json, model.safetensors, tokenizer files   Hugging Face format: AutoModelForCausalLM loads it
    trainer_state.pt                                  stage, step, optimizer, RNG and buffer state
    adapters.safetensors                              --lora-rank only: the adapters (lora.py; the weights
                                                      above are then base + adapters merged)

Why a run killed at ANY moment loses nothing:
1. everything is written into `ckpt-<step>.tmp` first, files fsynced;
2. the finished directory is renamed to `ckpt-<step>` (a rename is atomic on POSIX file systems);
3. the small file `latest` is replaced atomically (write `latest.tmp`, fsync, os.replace) to name it;
4. only then are older checkpoints deleted.
A kill before step 3 leaves `latest` naming the previous complete checkpoint, and the half-written
`.tmp` directory is swept away on the next start.

Reading weights back is model.Transformer.from_pretrained's (model.py), which this file imports: never the reverse.
"""

import glob
import os
import shutil

import torch

import dist
from model import Transformer

STATE_FILE = "trainer_state.pt"


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(out_dir: str, model, tok, state: dict, weights: dict | None = None, keep: int = 1,
         files: dict | None = None) -> str:
    """Write a checkpoint for state['gstep'] atomically and make it the latest. Returns its directory.
    weights: the model's state dict when model.state_dict() does not hold it whole (FSDP, dist.full_state) or is
    not what Hugging Face loads (LoRA: the merged weights). files: {name: tensors} written beside it as safetensors
    (LoRA's adapters)."""
    from safetensors.torch import save_file
    name = f"ckpt-{state['gstep']:06d}"
    final, tmp = os.path.join(out_dir, name), os.path.join(out_dir, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state=weights)  # in the parameters' own dtype: a resumed run continues bit for bit
    tok.save_pretrained(tmp)
    torch.save(state, os.path.join(tmp, STATE_FILE))
    for file, tensors in (files or {}).items():
        save_file(tensors, os.path.join(tmp, file))
    for f in os.listdir(tmp):
        _fsync(os.path.join(tmp, f))
    if os.path.exists(final):  # the same step saved twice (e.g. end of stage right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(out_dir)
    with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
    _fsync(out_dir)
    complete = sorted(d for d in glob.glob(os.path.join(out_dir, "ckpt-*")) if not d.endswith(".tmp"))
    for old in complete[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(out_dir: str) -> str | None:
    """The last complete checkpoint directory of a run, or None. Sweeps half-written ones away."""
    for tmp in glob.glob(os.path.join(out_dir, "ckpt-*.tmp")):
        shutil.rmtree(tmp, ignore_errors=True)
    pointer = os.path.join(out_dir, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(out_dir, f.read().strip())
    if not os.path.exists(os.path.join(path, STATE_FILE)):
        raise RuntimeError(f"{pointer} names {path}, which is incomplete: the run directory was edited by hand")
    return path


def load_state(path: str) -> dict:
    # weights_only=False: the state holds plain Python containers (RNG states, buffer entries) we wrote ourselves
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)


def reference_model(out_dir: str, model, dtype=None):
    """--riel.kl-beta's frozen pi_ref: the policy as RIEL starts (after MEF, or --init), written once to
    out_dir/reference (atomically: a .tmp directory, then a rename) so that a resumed run compares with the same
    weights, not with its resumed ones. Under torchrun every rank calls it; rank 0 writes. dtype: what it is held
    in (default: the policy's); under autocast bf16, which is what autocast would cast fp32 weights to anyway, at
    half the memory (plan.py counts it)."""
    path = os.path.join(out_dir, "reference")
    # rank 0 decides for all: a rank that looked after rank 0 had written would skip the collectives below (hang)
    if dist.from_main(lambda: not os.path.exists(os.path.join(path, "config.json"))):
        weights, _ = dist.full_state(model)  # under FSDP every rank gathers, rank 0 gets them
        if dist.is_main():
            shutil.rmtree(path + ".tmp", ignore_errors=True)
            model.save_pretrained(path + ".tmp", state=weights)
            os.rename(path + ".tmp", path)
        dist.barrier()
    ref = Transformer.from_pretrained(path, model.embed_tokens.weight.device, dtype or model.embed_tokens.weight.dtype)
    return ref.eval().requires_grad_(False)
