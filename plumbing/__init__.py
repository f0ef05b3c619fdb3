"""plumbing/: what the training loop needs to run (checkpoints, processes, LoRA, logs, guards,
tokenizer, optimizer mechanics, presets); it decides nothing about the method, which lives at the
top level."""
