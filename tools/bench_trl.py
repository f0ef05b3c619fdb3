"""
tools/bench_trl.py: one RL step of TRL's GRPOTrainer, timed, for tools/bench.py's side-by-side
RIEL step comparison.

TRL is a benchmark-only dependency (requirements-bench.txt): nothing outside this file imports it.

The trainer is set up to do the same work as our riel_step with one expert and no buffer:
- the same weights (our checkpoint, saved with save_pretrained and loaded by transformers), the
  same tokenizer and chat prompts (system = the expert prompt), the same reward function;
- G = num_generations samples per prompt, Q prompts per step: per_device_train_batch_size = Q * G
  rows, one optimizer step per generation (steps_per_generation = gradient_accumulation_steps = 1),
  so each trainer step is sample -> reward -> advantages -> one forward/backward -> AdamW step;
- sampling at temperature 1, top-p 1, top-k off, the same stop ids, max_completion_length = our
  max_new_tokens; beta = 0 (no reference model), num_iterations = 1 (on-policy, no old log-probs
  pass);
- fp32 (bf16=False), like our CPU default; on CUDA both sides run bf16.
Per-step wall time comes from a callback (on_step_begin -> on_step_end); trainer construction and
the first (warm-up) step are excluded. The reward calls also count, per step, the rows whose
group's rewards are not all equal (a nonzero advantage): TRL trains every row anyway, riel_step
only those.
"""

import statistics
import tempfile
import time


def trl_step_times(model_dir, tok, records, system_prompt, reward_fn, *, questions, group,
                   max_new_tokens, steps, lr, stop_ids, bf16=False):
    """(seconds per GRPOTrainer step, rows with a nonzero advantage per step), all steps after the
    first. records: >= questions * steps records."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    n = questions * steps
    by_question = {r.question: r for r in records[:n]}
    ds = Dataset.from_list([{"prompt": [{"role": "system", "content": system_prompt},
                                        {"role": "user", "content": r.question}]}
                            for r in records[:n]])

    signal_rows = []

    def reward(prompts, completions, **_):  # conversational: [{"role": "assistant", ...}]
        r = [float(reward_fn(by_question[p[-1]["content"]], c[0]["content"]))
             for p, c in zip(prompts, completions)]
        groups = [r[i:i + group] for i in range(0, len(r), group)]  # TRL repeats a prompt G times
        signal_rows.append(sum(len(g) for g in groups if max(g) != min(g)))
        return r

    class StepTimer(TrainerCallback):
        times = []

        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=questions * group, num_generations=group,
            gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, beta=0.0,
            max_completion_length=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
            learning_rate=lr, max_steps=steps, shuffle_dataset=False, bf16=bf16,
            logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True,
            gradient_checkpointing=False,
            generation_kwargs={"eos_token_id": list(stop_ids)},
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0)
        dtype = torch.bfloat16 if bf16 else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        timer = StepTimer()
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds,
                              processing_class=tok, callbacks=[timer])
        trainer.train()
    return timer.times[1:], signal_rows[1:]


def median(xs):
    return statistics.median(xs) if xs else float("nan")
