"""A real pretrained chat model end to end, offline: SmolLM2-135M-Instruct (../shared/data's GGUF,
de-quantised once per session by the `smollm2_dir` fixture) against transformers, which we did
not write.

- fp32 logits equal LlamaForCausalLM's on chat prompts rendered with every expert of GSM8K, MathQA
  and StrategyQA;
- greedy rollout.generate equals transformers' greedy generate token for token on a
  left-padded batch;
- tokenizer.render_chat equals apply_chat_template for every expert of every task, and the expert
  prompt REPLACES the template's default system prompt ("You are a helpful AI assistant named
  SmolLM, ...");
- bf16 autocast (the CUDA default precision, run here as CPU autocast) equals transformers' own bf16
  autocast, and stays close to fp32: the next-token argmax and the log-probs of a sampled completion
  (tolerances measured below);
- train.py on GSM8K (MEF on one question, one RIEL step with an inter-expert transfer, eval) writes
  a checkpoint AutoModelForCausalLM and AutoTokenizer load, chat template intact, with our logits.
Skips without ../shared/data or the gguf/accelerate packages.
"""

import json
from types import SimpleNamespace

import pytest
import torch

import data
import model as ours
from plumbing import tokenizer
import train
from conftest import SHARED
from rollout import generate, token_logprobs
from test_rollout import hf_greedy

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TASKS = ("gsm8k", "mathqa", "strategyqa")


@pytest.fixture(scope="module")
def real(smollm2_dir):
    """The converted model in transformers and in ours, chat prompts, our greedy answers and our
    fp32 logits."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    hf = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    mine = ours.Transformer.from_pretrained(str(smollm2_dir)).eval()
    # one chat prompt per (task, expert): expert i asks held-out question i, so the lengths differ
    # (74-141 tokens)
    prompts = []
    for task in TASKS:
        records = data.load(task, data.SPLITS[task].eval, data_dir=str(SHARED))
        prompts += [tokenizer.render_chat(tok, e.system_prompt, records[i].question)
                    for i, e in enumerate(data.experts(task))]
    # greedy answers: 4 of the 9 end with <|im_end|> within 32 tokens (MathQA and StrategyQA answer
    # briefly)
    greedy = generate(mine, prompts, max_new_tokens=32, temperature=0,
                      stop_ids=tokenizer.stop_token_ids(tok))
    ids, prompt_pos, answer_pos = right_padded(prompts, greedy.completions, tok.pad_token_id)
    with torch.no_grad():
        fp32 = mine(ids)
    return SimpleNamespace(dir=smollm2_dir, tok=tok, hf=hf, ours=mine, prompts=prompts,
                           greedy=greedy, ids=ids, valid=prompt_pos | answer_pos, fp32=fp32)


def right_padded(prompts, completions, pad):
    """(B, L) ids of prompt + completion rows padded on the right, and the masks of the positions
    whose logits predict a prompt token and an answer token."""
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), longest), pad)
    prompt_pos = torch.zeros_like(ids, dtype=torch.bool)
    answer_pos = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        prompt_pos[i, :len(p) - 1] = True
        answer_pos[i, len(p) - 1:len(p) + len(c) - 1] = True
    return ids, prompt_pos, answer_pos


def test_fp32_logits_equal_transformers_on_every_expert_prompt(real):
    with torch.no_grad():
        # right padding: the causal mask alone keeps pads out of real positions
        theirs = real.hf(real.ids).logits
    # the same fp32 operations in the same order: bit for bit here (logits up to 43). 1e-4 allows
    # another CPU's summing order (~1e-5 over 30 layers); a wrong eps, theta or cast is > 1e-2.
    diff = (real.fp32 - theirs)[real.valid].abs().max().item()
    assert diff < 1e-4, diff


def test_greedy_generate_equals_transformers_and_stops_at_im_end(real):
    stop = tokenizer.stop_token_ids(real.tok)
    # transformers' own greedy decoding of the same left-padded batch (prompts of 74-141 tokens),
    # same stop ids
    assert real.greedy.completions == hf_greedy(real.hf, real.prompts, 32, set(stop),
                                                pad=real.tok.pad_token_id)
    ends = [c[-1] for c, f in zip(real.greedy.completions, real.greedy.finish) if f == "stop"]
    assert set(ends) == {2}  # rows stop at <|im_end|>, at different steps
    assert len({len(c) for c, f in zip(real.greedy.completions, real.greedy.finish)
                if f == "stop"}) >= 2


def test_render_chat_equals_apply_chat_template_and_replaces_the_default_system_prompt(real):
    tok = real.tok
    question = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"
    for task in data.TASKS:
        for e in data.experts(task):
            ids = tokenizer.render_chat(tok, e.system_prompt, question)
            messages = [{"role": "system", "content": e.system_prompt},
                        {"role": "user", "content": question}]
            theirs = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
            assert ids == theirs, (task, e.name)
            text = tok.decode(ids)
            assert DEFAULT_SYSTEM not in text and text.count("<|im_start|>system\n") == 1
            assert text == (f"<|im_start|>system\n{e.system_prompt}<|im_end|>\n"
                            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    # the check can fail: without a system message the template inserts its default
    assert DEFAULT_SYSTEM in tok.decode(tokenizer.render_chat(tok, None, question))


def test_stop_ids_end_the_turn_at_im_end(real):
    tok = real.tok
    # <|im_end|> (2) ends every ChatML turn (SFT targets, sampling). <|endoftext|> (0), the corpus'
    # document separator (and unk), ends the text: a stop too; BPE never makes it: no prompt has it.
    assert tokenizer.end_of_turn_id(tok) == 2 and tok.convert_ids_to_tokens(2) == "<|im_end|>"
    assert (tokenizer.stop_token_ids(tok) == [2, 0]
            and tok.convert_ids_to_tokens(0) == "<|endoftext|>")
    assert all(0 not in p for p in real.prompts)


@pytest.fixture(scope="module")
def bf16(real):
    """One expert per task (3 of the 9 prompts) with a sampled completion (seed 0): fp32 and
    bf16-autocast (the CUDA default precision, CPU autocast here) log-probs from our token_logprobs,
    transformers' bf16 logits and our fp32 logits of the same right-padded rows. bf16 matmuls take
    ~9x fp32's time on a CPU without bf16 units (~17 s of CPU per forward of these rows), so the two
    tests below share these two bf16 forwards."""
    prompts = real.prompts[::3]
    out = generate(real.ours, prompts, max_new_tokens=32, temperature=1.0, seed=0,
                   stop_ids=tokenizer.stop_token_ids(real.tok))
    completions = out.completions
    # id 0: as token_logprobs pads
    ids, prompt_pos, answer_pos = right_padded(prompts, completions, pad=0)
    with torch.no_grad():
        fp32_logp, mask = token_logprobs(real.ours, prompts, completions)
        fp32 = real.ours(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_logp, _ = token_logprobs(real.ours, prompts, completions)
            theirs = real.hf(ids).logits.float()
    return SimpleNamespace(prompts=prompts, completions=completions, mask=mask.bool(),
                           fp32_logp=fp32_logp, bf16_logp=bf16_logp, hf_bf16=theirs, fp32=fp32,
                           answer_pos=answer_pos, prompt_pos=prompt_pos)


def test_bf16_logprobs_of_sampled_completions_equal_transformers_bf16_and_stay_close_to_fp32(bf16):
    # transformers' bf16 log-probs: our bf16 path is theirs (same casts, same places). Measured max
    # |diff| 3e-5 (fp32 sums in another order); one cast moved (e.g. the head in fp32) gives 1e-2..1
    logp = bf16.hf_bf16.log_softmax(-1)
    theirs = torch.zeros_like(bf16.bf16_logp)
    for i, (p, c) in enumerate(zip(bf16.prompts, bf16.completions)):
        theirs[i, :len(c)] = logp[i, torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)]
    assert (bf16.bf16_logp - theirs)[bf16.mask].abs().max() < 1e-3
    # bf16 vs fp32 on these 81 sampled tokens (seed 0; seed 1's 96 in brackets): mean |error| 0.027
    # (0.025), max 0.12 (0.13) nats; tolerances ~3x that: this bounds bf16's cost (exact: above)
    err = (bf16.bf16_logp - bf16.fp32_logp).abs()[bf16.mask]
    assert err.mean() < 0.1 and err.max() < 0.4, (err.mean(), err.max())


def test_bf16_keeps_fp32s_choices(bf16):
    # the bf16 logits are transformers' (the test above shows ours are the same), the fp32 ones ours
    # (equal to transformers' bit for bit: test_fp32_logits_...)
    same = bf16.hf_bf16.argmax(-1) == bf16.fp32.argmax(-1)
    # along the sampled answers bf16 picks fp32's token at 95% of positions here (77 of 81; along
    # the greedy answers, which leave fewer near-ties, 77 of 79)
    assert same[bf16.answer_pos].float().mean() >= 0.9
    # along the prompts many positions are near-ties (the question's next word): 97.5% here. bf16
    # moves these logits by up to 1.1, so it cannot change a top token leading by over twice that
    top2 = bf16.fp32.topk(2, dim=-1).values
    clear = bf16.prompt_pos & (top2[..., 0] - top2[..., 1] > 2.5)
    assert same[clear].all() and clear.sum() > 0.15 * bf16.prompt_pos.sum()  # 69 of 320 here
    assert same[bf16.prompt_pos].float().mean() >= 0.95


def test_train_run_on_gsm8k_writes_a_checkpoint_transformers_loads(real, tmp_path):
    """One GSM8K question (Natalia's clips), two experts (the short traces: a 135M forward costs
    ~140 prompt tokens per row, so every row counts on a CPU). The 135M model solves ~0% of GSM8K
    zero-shot (0 of 60 samples of 48 tokens on 5 short questions here), so a reward needs MEF first:
    3 steps at lr 1e-4 on the question's 2 expert traces teach its answer (MEF loss 1.16 -> 0.16),
    and RIEL's 4 samples per expert are then right 2 and 4 times here, which makes a transfer
    (E+ program -> E- equations). Eval: 2 held-out questions x 2 experts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "run"
    experts = ["equations", "program"]
    train.main(train.cli([
        "--no-curves", "--model", str(real.dir), "--data", "gsm8k", "--data-dir", str(SHARED),
        "--out-dir", str(out), "--experts", *experts, "--train-size", "1", "--mef.epochs", "3",
        "--mef.lr", "1e-4", "--mef.batch-size", "2", "--mef.micro-batch-size", "2",
        "--riel.steps", "1", "--riel.questions-per-step", "1", "--riel.group-size", "4",
        "--riel.max-new-tokens", "48", "--riel.micro-batch-size", "4", "--riel.buffer-size", "2",
        "--riel.buffer-k", "2", "--eval.size", "2", "--eval.max-new-tokens", "16"]))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    mef = [m for m in lines if m["stage"] == "mef"]
    (rl,) = [m for m in lines if m["stage"] == "riel"]
    assert len(mef) == 3 and mef[-1]["loss"] < 0.5 * mef[0]["loss"]
    means = [rl[f"reward/{name}"] for name in experts]
    assert max(means) > 0
    # one question per step: a transfer happens exactly when the experts' mean rewards differ
    # (E+ != E-), so this holds whatever the samples are; with these it is a transfer
    assert rl["transfers"] == int(max(means) > min(means))
    summary = json.loads((out / "summary.json").read_text())
    questions = {name: res["questions"] for name, res in summary["evals"].items()}
    assert questions == {"after_mef": 2, "after_riel": 2}

    ckpt = summary["checkpoint"]
    hf = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    mine = ours.Transformer.from_pretrained(ckpt).eval()
    ids = real.ids[:2, :60]
    with torch.no_grad():
        trained = mine(ids)
        assert (hf(ids).logits - trained).abs().max() < 1e-4  # the tolerance of the fp32 test above
        assert (trained - real.fp32[:2, :60]).abs().max() > 1e-2  # it saved the trained weights
    tok = AutoTokenizer.from_pretrained(ckpt)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 3?"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == \
        real.tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert tok.chat_template == real.tok.chat_template
    assert tokenizer.stop_token_ids(tok) == tokenizer.stop_token_ids(real.tok)
