"""
mel.py: Meta-Experience Learning (MEL, arXiv 2602.10224; METHOD.md section 7), an optional extra
loss inside the RIEL step (`python train.py --mel`).

RLVR rewards say only *whether* an answer is right. MEL adds a knowledge-level signal from the same
rollouts: the policy compares one of its wrong answers with one of its right ones, writes down
where and why the wrong one went astray as abstract heuristics (the "meta-experience" M), keeps M
only if it helps the policy re-solve the problem, and is then trained to *write* such analyses:

  1. candidates   questions whose rollouts hold both a correct (y+) and a wrong (y-) answer; up to
                  `pairs_per_question` (y+, y-) pairs each, drawn without replacement.
  2. analysis     the policy itself writes M for each pair, batched, from the analysis prompt: the
                  instruction, the question x, the INCORRECT solution first, then the correct one.
  3. replay       M goes into a hint prompt and the policy answers x once more; M is kept only if
                  the checker accepts that answer (retention = kept / candidates).
  4. NLL          L_NLL = mean over kept M of  -(1/|M|) sum_t log pi(M_t | C_retro, M_<t),
                  C_retro = the analysis prompt [instruction, x, y-, y+]. Only M's tokens carry
                  loss; the model learns to write the analysis, not to solve with M in context.
  5. joint        L = L_RL + weight * L_NLL, in the same optimizer step (weight 1 in the paper).

Our readings of what the paper leaves open (all options of MELConfig):
- With several experts, a question's answers are pooled over all experts: it is a candidate when
  any answer is right and any is wrong, and a pair may contrast two experts. The replay is answered
  under the system prompt of the expert that wrote y-: the one that needs the lesson, and whose
  answer format the checker reads.
- The analysis is sampled at temperature 1 (a policy sample, as the rollouts); the replay is greedy
  (keep M only if the policy's most likely answer with M in context is right).
- Analyses that are empty after decoding are dropped before the replay; a truncated analysis is
  kept if its replay verifies.
- Every analysis is generated with the current policy before the update, so M is on-policy like y.
- Under torchrun every rank holds the whole step's rollouts (riel.py gathers them), so every rank
  draws the same pairs; each rank writes and replays its share of them and the results are gathered
  (the same tokens as one process: see rollout.generate's rng_rows); each rank backpropagates its
  share of the kept M.
The wording of both prompts is ours (ANALYSIS_INSTRUCTION, HINT_TEMPLATE).
"""
import time
from dataclasses import dataclass

import torch

from losses import CORRECT, rng_device
from plumbing import dist
from plumbing.optim import length_sorted_micro_batches, micro_backward, read_sum
from plumbing.tokenizer import render_chat, stop_token_ids
from rollout import generate, token_logprobs


@dataclass
class MELConfig:
    enabled: bool = False  # `--mel` is short for `--mel.enabled`
    weight: float = 1.0  # lambda of L_NLL in the joint loss (paper: 1)
    pairs_per_question: int = 1  # contrastive (y+, y-) pairs per candidate question
    max_analysis_tokens: int = 512
    analysis_temperature: float = 1.0
    replay_temperature: float = 0.0  # 0 = greedy replay
    max_replay_tokens: int | None = None  # None: RIEL's max_new_tokens

    def __post_init__(self):
        if self.pairs_per_question < 1 or self.max_analysis_tokens < 1:
            raise ValueError("mel.pairs_per_question and mel.max_analysis_tokens must be >= 1")


ANALYSIS_INSTRUCTION = (
    "Below are a question and two attempts at it. "
    "The first attempt is INCORRECT; the second is CORRECT.\n"
    "Compare them and write a short analysis with five parts:\n"
    "1. Failure point: the first step where the incorrect attempt goes wrong.\n"
    "2. Error pattern: the general mistake behind it, beyond this one problem.\n"
    "3. Success factor: what the correct attempt did that avoided it.\n"
    "4. Summary: one or two sentences in the first person (\"I should ...\").\n"
    "5. Heuristics: if-then rules for similar problems, "
    "with no numbers or names from this problem.")
HINT_TEMPLATE = ("Lessons from earlier attempts at problems like this one:\n{analysis}\n\n"
                 "Now solve:\n{question}")


def analysis_message(question: str, wrong: str, right: str) -> str:
    """The user turn that asks for M: instruction, question, wrong attempt, then the right one."""
    return (f"{ANALYSIS_INSTRUCTION}\n\nQuestion:\n{question}\n\n"
            f"Incorrect attempt:\n{wrong.strip()}\n\nCorrect attempt:\n{right.strip()}")


def hint_message(question: str, analysis: str) -> str:
    return HINT_TEMPLATE.format(analysis=analysis.strip(), question=question)


# ---- 1. candidates -------------------------------------------------------------------------------

def contrastive_pairs(rewards, pairs_per_question, generator=None) -> list:
    """rewards (Q, N, G) -> [(q, wrong row, right row)], rows indexing the step's Q*N*G completions.
    Mixed questions only; up to pairs_per_question distinct (wrong, right) pairs each, at random."""
    Q, N, G = rewards.shape
    out = []
    for q in range(Q):
        flat = rewards[q].flatten()  # (N*G,) all experts' answers to question q
        right = (flat >= CORRECT).nonzero().flatten().tolist()
        wrong = (flat < CORRECT).nonzero().flatten().tolist()
        if not right or not wrong:
            continue  # no contrast: an all-right or all-wrong question teaches MEL nothing
        n_pairs = len(wrong) * len(right)
        order = torch.randperm(n_pairs, generator=generator, device=rng_device(generator)).tolist()
        for k in order[:pairs_per_question]:
            w, r = divmod(k, len(right))
            out.append((q, q * N * G + wrong[w], q * N * G + right[r]))
    return out


# ---- 2 + 3. analysis and replay ------------------------------------------------------------------

def collect(model, tok, records, experts, completions, rewards, cfg: MELConfig, max_new_tokens,
            top_p, generator, reward_fn) -> tuple[list, dict]:
    """Steps 1-3 on one RL step's rollouts -> ([(context ids, analysis ids)] kept, metrics).
    completions: the Q*N*G rows of riel.sample_groups, rewards (Q, N, G);
    reward_fn(record, text) -> float."""
    t0 = time.perf_counter()
    N, G = rewards.shape[1], rewards.shape[2]
    pairs = contrastive_pairs(rewards, cfg.pairs_per_question, generator)
    text = lambda ids: tok.decode(ids, skip_special_tokens=True)
    messages = [analysis_message(records[q].question, text(completions[w]), text(completions[r]))
                for q, w, r in pairs]
    contexts = [render_chat(tok, None, m) for m in messages]
    sample = lambda prompts, temperature, max_tokens: sample_shared(  # noqa: E731
        model, prompts, temperature=temperature, max_new_tokens=max_tokens, top_p=top_p,
        stop_ids=stop_token_ids(tok), generator=generator, vocab_limit=len(tok))
    analyses = sample(contexts, cfg.analysis_temperature, cfg.max_analysis_tokens)
    written = [i for i, a in enumerate(analyses) if text(a).strip()]
    hints = [render_chat(tok, experts[(pairs[i][1] // G) % N].system_prompt,
                         hint_message(records[pairs[i][0]].question, text(analyses[i])))
             for i in written]
    replays = sample(hints, cfg.replay_temperature, cfg.max_replay_tokens or max_new_tokens)
    kept = [i for i, ids in zip(written, replays)
            if reward_fn(records[pairs[i][0]], text(ids)) >= CORRECT]
    examples = [(contexts[i], analyses[i]) for i in kept]
    metrics = {"mel/candidates": len(pairs), "mel/written": len(written), "mel/kept": len(kept),
               "mel/retention": len(kept) / len(pairs) if pairs else 0.0,
               "mel/analysis_len": sum(len(a) for a in analyses) / max(1, len(analyses)),
               "mel/collect_s": time.perf_counter() - t0}
    return examples, metrics


def sample_shared(model, prompts, *, generator, temperature, max_new_tokens, **kw) -> list:
    """One completion per prompt, every rank writing its share; all ranks get all of them (one
    process: just generate). A rank with no share still draws the batch's uniforms, so every
    generator stays in the same state."""
    if not prompts:
        return []
    lo, hi = dist.shard_range(len(prompts))
    # FSDP: decoding runs on the whole weights, gathered by every rank, busy or not
    with dist.unsharded(model):
        if hi == lo:
            if temperature > 0:
                torch.rand(max_new_tokens, len(prompts), generator=generator,
                           device=rng_device(generator))
            return dist.gather([])
        out = generate(model, prompts[lo:hi], generator=generator, temperature=temperature,
                       max_new_tokens=max_new_tokens, rng_rows=(lo, len(prompts)), **kw)
    return dist.gather(out.completions)


# ---- 4. the NLL of the kept analyses -------------------------------------------------------------

def nll_loss(model, contexts, analyses, n_examples):
    """Sum over this micro-batch of each analysis's token-mean NLL given its context, / n_examples
    (the count of the whole step, so micro-batch losses add up to the step's mean). Context tokens
    get no loss."""
    logp, mask = token_logprobs(model, contexts, analyses)  # (B, T) each, T = longest analysis
    per_sample = (logp * mask).sum(-1) / mask.sum(-1)  # (B,) mean log-prob of each M's own tokens
    return -per_sample.sum() / n_examples


def nll_backward(model, examples, micro_batch_size, weight=1.0) -> float:
    """Backprop weight * L_NLL over the kept (context, analysis) pairs, this rank's share of them
    (all in one process) over the count of all; returns the unweighted L_NLL of the whole step."""
    mine, losses = dist.shard(examples), []
    mbs = length_sorted_micro_batches([len(c) + len(a) for c, a in mine], micro_batch_size)
    for mb in dist.lockstep(model, mbs):  # FSDP: as many passes as the busiest rank
        loss = nll_loss(model, [mine[i][0] for i in mb], [mine[i][1] for i in mb], len(examples))
        micro_backward(weight * loss)
        losses.append(loss.detach())  # not the graph: its nodes die with the backward
    return dist.sum_floats([read_sum(losses)])[0]
