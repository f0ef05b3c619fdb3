"""
premise.py: what one RL step's rewards say, and the premise meter of MEML-GRPO.

MEML-GRPO's claim (METHOD.md 4) rests on a premise: different experts solve DIFFERENT questions, so a question
on which one expert's G answers are all wrong (no reward spread: GRPO learns nothing from that group) may still
have a right answer from another expert, which the inter-expert transfer can move across. The meter counts
exactly those questions, from the rewards (Q, N, G) of a step:

    rescue_rate          share of the questions where some expert's group is all wrong AND another expert of
                         the same question has a right answer (what the transfer can use)
    rescued/<expert>     share of the questions where THIS expert's group is all wrong and another expert has a
                         right answer: questions that expert learns nothing from on its own, that the pool can
                         teach it. rescued/<the deployed expert> is the number that matters.

Near 0, pooling experts spends budget on weaker prompts and rescues almost nothing; the method then has little
to transfer on that model and task. riel.py logs it every step; experiments/premise.py measures it on any
checkpoint before RL (the same sampler and checker), so a user can read it before spending a GPU-day.
"""
from verify import CORRECT


def rescue(rewards, experts) -> dict:
    """rewards (Q, N, G) -> {"rescue_rate", "rescued/<expert>"} (shares of the Q questions)."""
    wrong = rewards.amax(-1) < CORRECT  # (Q, N) the expert's whole group is wrong
    any_right = (~wrong).any(-1)  # (Q,) some expert has a right answer
    m = {"rescue_rate": (wrong.any(-1) & any_right).float().mean().item()}
    for i, ex in enumerate(experts):
        # with expert i all wrong, a right answer anywhere is another expert's
        m[f"rescued/{ex.name}"] = (wrong[:, i] & any_right).float().mean().item()
    return m


def step_metrics(rewards, experts, chosen) -> dict:
    """Reward, reward-spread and premise metrics of one step; rewards (Q, N, G), chosen = [(E+, E-)]."""
    zero = rewards.amax(-1) == rewards.amin(-1)  # (Q, N) groups with no reward spread: no signal
    wrong, right = rewards.amax(-1) < CORRECT, rewards.amin(-1) >= CORRECT
    flat = rewards.flatten(1)  # (Q, N*G): all experts of a question together
    m = {"reward": rewards.mean().item(), "reward_std": rewards.std(-1, correction=int(rewards.shape[-1] > 1)).mean().item(),
         "zero_spread": zero.float().mean().item(),
         "all_wrong": wrong.float().mean().item(), "all_right": right.float().mean().item(),
         "zero_signal_questions": (flat.amax(-1) == flat.amin(-1)).float().mean().item(),
         "transfers": len(chosen), **rescue(rewards, experts)}
    for i, ex in enumerate(experts):
        m[f"reward/{ex.name}"] = rewards[:, i].mean().item()
        m[f"zero_spread/{ex.name}"] = zero[:, i].float().mean().item()
        m[f"all_wrong/{ex.name}"] = wrong[:, i].float().mean().item()
        m[f"e_plus/{ex.name}"] = sum(p == i for p, _ in chosen)
        m[f"e_minus/{ex.name}"] = sum(n == i for _, n in chosen)
    return m
