"""
The loss math of RIEL (METHOD.md section 4) as small pure functions on plain tensors.

riel.py decides *what* to score (which rows, which prompts); this file only turns log-probs, rewards
and masks into numbers, and rewards into decisions: who teaches whom (d), which groups the buffer
admits (e). Nothing here knows about models, tokenizers or experts.

Notation: one group = the G responses of one expert to one question, rewards r_1..r_G in {0, 1}.
logp (B, T) = log pi(token) of each completion token, right-padded; mask (B, T) = 1 on real tokens
(including the stop token).

Group advantage (one number per response, broadcast to its tokens), METHOD.md 4(b)/(c):
    meml     A = max(r - mean(r), 0)              the paper: only above-mean ones get gradient
    grpo     A = (r - mean(r)) / (std(r) + 1e-4)  baseline; Bessel std, eps as TRL "group" scaling
    dr_grpo  A = r - mean(r)                      baseline (Dr.GRPO): both signs, no std

Per-token policy-gradient loss (TRL's clipped surrogate; no clamp on the log-ratio):
    ratio = exp(logp - logp_old)
    l     = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)   [+ beta * k3]
    k3    = exp(d) - d - 1,  d = logp_ref - logp        (Schulman's estimator, >= 0)
On-policy (the default, one update per batch) logp_old = logp.detach(): ratio == 1, the clip is
inactive, l = -A and dl/dlogp = -A.

Aggregation over the tokens of a whole optimizer step (S_i = sum_t mask*l, n_i = sum_t mask):
    token    sum_i S_i / N_tokens           N_tokens counted over the WHOLE step (TRL "dapo")
    seq      sum_i (S_i / n_i) / N_seqs     each response weighs the same (TRL "grpo")
    dr_grpo  sum_i S_i / (N_seqs * L_max)   constant normaliser, L_max = max_new_tokens (Dr.GRPO)
Every normaliser is a count for the whole step, passed in by the caller, so the losses of the
micro-batches simply add up to the full-batch loss (and so do their gradients). Normalising each
micro-batch by its own token count is the bug GRPO-Zero fixed in 8ca8b08 (REFERENCES 5.3).

Inter-expert transfer, METHOD.md 4(d) (our reading: the stated intent, teacher side stop-gradient):
    sampled     L_KL = sum_t mask * (sg[logp(o_t | P+)] - logp(o_t | P-)) / N_tokens
    full_vocab  L_KL = sum_t mask * KL(sg[pi(. | P+, o_<t)] || pi(. | P-, o_<t)) / N_tokens
Who teaches whom (METHOD.md 4(d)), per question: E+ = the expert with the highest mean reward,
E- = the lowest (ties: the lowest index, or at random); nothing moves when all means are equal or
E+ has no correct answer. O+ = one correct response of E+ drawn from the step's generator (or all).

Hard examples (METHOD.md 4(e)): expert i with more than K of its G answers wrong on a question is
admitted to the buffer with probability K/G.
"""
import torch

CORRECT = 1.0  # a reward this high is a right answer (verify.py's checkers give 1.0 or 0.0)

ADVANTAGE_MODES = ("meml", "grpo", "dr_grpo")
AGGREGATIONS = ("token", "seq", "dr_grpo")


def group_advantages(rewards: torch.Tensor, mode: str = "meml", eps: float = 1e-4) -> torch.Tensor:
    """rewards (..., G) -> advantages (..., G); the last dimension is one group.

    >>> group_advantages(torch.tensor([1., 0., 0., 0.]), "meml")
    tensor([0.7500, 0.0000, 0.0000, 0.0000])
    """
    centred = rewards - rewards.mean(-1, keepdim=True)  # (..., G)
    if mode == "meml":
        return centred.clamp(min=0)
    if mode == "dr_grpo":
        return centred
    if mode == "grpo":
        # Bessel std is undefined for G == 1; the centred reward is 0 there anyway.
        std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(centred)
        return centred / (std + eps)
    raise ValueError(f"unknown advantage mode {mode!r}; choose one of {ADVANTAGE_MODES}")


def policy_gradient_loss(logp, adv, old_logp=None, eps_low=0.2, eps_high=None):
    """Per-token clipped surrogate: logp, old_logp (B, T); adv (B,) -> loss (B, T), unmasked."""
    old_logp = logp.detach() if old_logp is None else old_logp
    eps_high = eps_low if eps_high is None else eps_high
    ratio = torch.exp(logp - old_logp)  # (B, T)
    adv = adv.unsqueeze(-1)  # (B, 1): one advantage per response
    return -torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)


def clipped_tokens(logp, old_logp, adv, mask, eps_low=0.2, eps_high=None):
    """How many real tokens have the clipped term active, as a 0-dim tensor (read once a step)."""
    eps_high = eps_low if eps_high is None else eps_high
    ratio = torch.exp(logp - old_logp).detach()
    adv = adv.unsqueeze(-1)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv < ratio * adv  # (B, T) bool
    return (clipped * mask).sum()


def clip_fraction(logp, old_logp, adv, mask, eps_low=0.2, eps_high=None) -> float:
    """Fraction of real tokens where the clipped term is the active one (verl's pg_clipfrac)."""
    clipped = clipped_tokens(logp, old_logp, adv, mask, eps_low, eps_high)
    return float(clipped / mask.sum().clamp(min=1))


def k3_kl(logp, ref_logp):
    """Per-token k3 estimate of KL(pi || pi_ref), (B, T) -> (B, T); d/dlogp = 1 - exp(ref-logp)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, mode="token", n_tokens=None, n_seqs=None, max_len=None):
    """(B, T) per-token losses -> scalar. n_tokens / n_seqs are counts of the whole optimizer step;
    left as None they default to this batch's own counts (correct only without micro-batching)."""
    sums = (per_token * mask).sum(-1)  # (B,) S_i
    if mode == "token":
        n_tokens = mask.sum() if n_tokens is None else n_tokens
        return sums.sum() / n_tokens
    n_seqs = per_token.shape[0] if n_seqs is None else n_seqs
    if mode == "seq":
        return (sums / mask.sum(-1).clamp(min=1)).sum() / n_seqs
    if mode == "dr_grpo":
        max_len = per_token.shape[1] if max_len is None else max_len
        return sums.sum() / (n_seqs * max_len)
    raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}")


def transfer_loss(student_logp, teacher_logp, mask, n_tokens=None):
    """Sampled inter-expert loss: token sum of sg[logp(O+|P+)] - logp(O+|P-), / N_tokens.
    student_logp, teacher_logp, mask (B, T). Gradient flows only through the student (P-) side."""
    return aggregate(teacher_logp.detach() - student_logp, mask, "token", n_tokens)


def full_vocab_kl(teacher_logits, student_logits, mask, n_tokens=None):
    """Full-vocabulary token KL(sg[p+] || p-) along O+; logits (B, T, V), mask (B, T) -> scalar."""
    t = teacher_logits.detach().float().log_softmax(-1)  # (B, T, V) log p+
    s = student_logits.float().log_softmax(-1)  # (B, T, V) log p-
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T)
    return aggregate(kl, mask, "token", n_tokens)


# ---- (d) who teaches whom ------------------------------------------------------------------------

def rng_device(generator):
    """Where a generator draws: a CUDA one fills only CUDA tensors (None: the global CPU stream)."""
    return generator.device if generator is not None else "cpu"


def uniform(generator) -> float:
    """One draw in [0, 1) on the generator's device: the step's random choices share one stream."""
    return torch.rand((), generator=generator, device=rng_device(generator)).item()


def pick(items: list, generator=None):
    """One of items, uniformly, from the step's generator."""
    return items[min(int(uniform(generator) * len(items)), len(items) - 1)]


def choose_transfer(rewards, generator=None, random_ties=False):
    """rewards (N, G) of one question -> (E+, E-) expert indices, or None when nothing moves.
    Ties go to the lowest index on both sides, or (random_ties) to a tied expert at random."""
    means = rewards.mean(-1).tolist()
    plus = min(range(len(means)), key=lambda i: (-means[i], i))
    minus = min(range(len(means)), key=lambda i: (means[i], i))
    if means[plus] == means[minus] or not bool((rewards[plus] >= CORRECT).any()):
        return None
    # otherwise expert 0 would be E- of every question that all but one expert fails alike
    if random_ties:
        plus = pick([i for i, m in enumerate(means) if m == means[plus]], generator)
        minus = pick([i for i, m in enumerate(means) if m == means[minus]], generator)
    return plus, minus


def choose_teacher_samples(rewards_plus, generator=None, all_correct=False) -> list:
    """rewards_plus (G,) of E+ -> indices of the O+ to move: one correct one at random, or all."""
    correct = (rewards_plus >= CORRECT).nonzero().flatten().tolist()
    if all_correct or not correct:
        return correct
    return [pick(correct, generator)]


def transfer_pairs(rewards, prompts, completions, generator=None, all_correct=False,
                   random_ties=False):
    """rewards (Q, N, G) -> ([(P+ prompt, P- prompt, O+ ids)], [(E+, E-) per moving question])."""
    Q, N, G = rewards.shape
    pairs, chosen = [], []
    for q in range(Q):
        choice = choose_transfer(rewards[q], generator, random_ties)
        if choice is None:
            continue
        plus, minus = choice
        chosen.append(choice)
        for g in choose_teacher_samples(rewards[q, plus], generator, all_correct):
            pairs.append((prompts[q * N + plus], prompts[q * N + minus],
                          completions[(q * N + plus) * G + g]))
    return pairs, chosen


# ---- (e) which groups the buffer admits ----------------------------------------------------------

def admit_hard_example(group_rewards, k, generator=None) -> bool:
    """group_rewards (G,): more than k wrong -> admit with probability k / G."""
    G = group_rewards.numel()
    if int((group_rewards < CORRECT).sum()) <= k:
        return False
    return uniform(generator) < k / G
