"""
premise.py: what one RL step's rewards say, and the premise meter of MEML-GRPO.

MEML-GRPO's claim (METHOD.md 4) rests on a premise: different experts solve DIFFERENT questions, so
a question on which one expert's G answers are all wrong (no reward spread: GRPO learns nothing from
that group) may still have a right answer from another expert, which the inter-expert transfer can
move across. The meter counts exactly those questions, from the rewards (Q, N, G) of a step:

    rescue_rate       share of the questions where some expert's group is all wrong AND another
                      expert of the same question has a right answer (what the transfer can use)
    rescued/<expert>  share of the questions where THIS expert's group is all wrong and another
                      expert has a right answer: questions that expert learns nothing from on its
                      own, that the pool can teach it. rescued/<the deployed expert> is the number
                      that matters.

Near 0, pooling experts spends budget on weaker prompts and rescues almost nothing; the method then
has little to transfer on that model and task. Beside it, what the transfer really acts on:

    taught/<expert>   share of the questions where THIS expert is E- of a transfer (losses.py): the
                      questions on which it is taught. With two experts every rescue of one is a
                      transfer to it; with three, E- is the weakest, so the deployed (best) prompt
                      is rarely taught.

riel.py logs both every step; experiments/premise.py measures them on any checkpoint before RL (the
same sampler and checker) next to two nulls, so a user can read them before spending a GPU-day.
Every function takes `correct`, the reward of a right answer (losses.CORRECT), from its caller.
"""
import numpy as np


def rescue(rewards, experts, *, correct) -> dict:
    """rewards (Q, N, G) -> {"rescue_rate", "rescued/<expert>"} (shares of the Q questions)."""
    wrong = rewards.amax(-1) < correct  # (Q, N) the expert's whole group is wrong
    any_right = (~wrong).any(-1)  # (Q,) some expert has a right answer
    m = {"rescue_rate": (wrong.any(-1) & any_right).float().mean().item()}
    for i, ex in enumerate(experts):
        # with expert i all wrong, a right answer anywhere is another expert's
        m[f"rescued/{ex.name}"] = (wrong[:, i] & any_right).float().mean().item()
    return m


def step_metrics(rewards, experts, chosen, *, correct) -> dict:
    """Reward, reward-spread and premise metrics of one step.
    rewards (Q, N, G), chosen = [(E+, E-)]."""
    zero = rewards.amax(-1) == rewards.amin(-1)  # (Q, N) groups with no reward spread: no signal
    wrong, right = rewards.amax(-1) < correct, rewards.amin(-1) >= correct
    flat = rewards.flatten(1)  # (Q, N*G): all experts of a question together
    reward_std = rewards.std(-1, correction=int(rewards.shape[-1] > 1)).mean().item()
    m = {"reward": rewards.mean().item(), "reward_std": reward_std,
         "zero_spread": zero.float().mean().item(),
         "all_wrong": wrong.float().mean().item(), "all_right": right.float().mean().item(),
         "zero_signal_questions": (flat.amax(-1) == flat.amin(-1)).float().mean().item(),
         "transfers": len(chosen), **rescue(rewards, experts, correct=correct)}
    for i, ex in enumerate(experts):
        m[f"reward/{ex.name}"] = rewards[:, i].mean().item()
        m[f"zero_spread/{ex.name}"] = zero[:, i].float().mean().item()
        m[f"all_wrong/{ex.name}"] = wrong[:, i].float().mean().item()
        m[f"e_plus/{ex.name}"] = sum(p == i for p, _ in chosen)
        m[f"e_minus/{ex.name}"] = sum(n == i for _, n in chosen)
        # the questions where this expert is E-, the one taught; rescued/ is what the pool COULD
        # teach it (with 3+ experts E- is the weakest, so the two can differ a lot)
        m[f"taught/{ex.name}"] = m[f"e_minus/{ex.name}"] / max(1, rewards.shape[0])
    return m


# ---- what the meter would read by chance: two nulls from the same per-question counts ----------

def beta_binomial_fit(k, G):
    """Method of moments: per-question correct counts k (Q,) out of G -> (alpha, beta) of the Beta
    its success probability follows, or None when there is no extra-binomial spread (then every
    question has p = k.mean()/G)."""
    m = k.mean() / G
    if m <= 0 or m >= 1:
        return None
    # intra-question correlation, from Var = G m (1-m) (1 + (G-1) rho)
    rho = (k.var() / (G * m * (1 - m)) - 1) / (G - 1)
    if rho <= 1e-6:
        return None
    rho = min(rho, 1 - 1e-6)
    return m * (1 / rho - 1), (1 - m) * (1 / rho - 1)


def rescue_nulls(rewards, experts, *, correct, draws=20000, seed=0) -> dict:
    """rescued/<expert> expected by chance, from the step's own rewards (Q, N, G):
    - `independent`: experts fail independently: P(i all wrong) * (1 - prod_j P(j all wrong));
    - `same_difficulty`: all fail the SAME questions as far as their accuracy allows: each expert's
      per-question success probability a Beta fitted to its counts (beta_binomial_fit), all experts
      at the same quantile of question difficulty (comonotone), rescue averaged over that quantile.
    Rescues far above `same_difficulty` mean the experts fail different questions: the premise."""
    Q, N, G = rewards.shape
    k = (rewards >= correct).sum(-1).double().numpy()  # (Q, N)
    wrong = (k == 0).mean(0)  # (N,) share of all-wrong groups
    p = np.empty((N, draws))
    rng = np.random.default_rng(seed)
    for i in range(N):
        fit = beta_binomial_fit(k[:, i], G)
        # sorted, easiest first: column d is the same difficulty quantile for every expert
        p[i] = k[:, i].mean() / G if fit is None else np.sort(rng.beta(*fit, size=draws))[::-1]
    all_wrong = (1 - p) ** G  # (N, draws)
    out = {}
    for i, ex in enumerate(experts):
        others = [j for j in range(N) if j != i]
        out[f"independent/{ex.name}"] = float(wrong[i] * (1 - np.prod(wrong[others])))
        rescued = all_wrong[i] * (1 - np.prod(all_wrong[others], 0))  # (draws,)
        out[f"same_difficulty/{ex.name}"] = float(rescued.mean())
    return out
