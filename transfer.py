"""
transfer.py: who teaches whom in RIEL's inter-expert transfer (METHOD.md 4(d)); riel.py backpropagates the pairs.

Per question: E+ = the expert with the highest mean reward, E- = the lowest (ties: the lowest index, or at random
with random_ties); nothing moves when all means are equal or E+ has no correct answer. O+ = one correct response of
E+ drawn at random from the step's generator (or all of them). Each transfer is a (P+ prompt, P- prompt, O+) pair.
"""
from buffer import uniform
from verify import CORRECT


def choose_transfer(rewards, generator=None, random_ties=False):
    """rewards (N, G) of one question -> (E+, E-) expert indices, or None when there is nothing to move.
    Ties go to the lowest index on both sides, or (random_ties) to one of the tied experts at random."""
    means = rewards.mean(-1).tolist()
    plus = min(range(len(means)), key=lambda i: (-means[i], i))
    minus = min(range(len(means)), key=lambda i: (means[i], i))
    if means[plus] == means[minus] or not bool((rewards[plus] >= CORRECT).any()):
        return None
    if random_ties:  # otherwise expert 0 would be E- of every question that all but one expert fails alike
        plus = pick([i for i, m in enumerate(means) if m == means[plus]], generator)
        minus = pick([i for i, m in enumerate(means) if m == means[minus]], generator)
    return plus, minus


def pick(items: list, generator=None):
    """One of items, uniformly, from the step's generator."""
    return items[min(int(uniform(generator) * len(items)), len(items) - 1)]


def choose_teacher_samples(rewards_plus, generator=None, all_correct=False) -> list:
    """rewards_plus (G,) of E+ -> indices of the O+ to transfer: one correct response at random, or all."""
    correct = (rewards_plus >= CORRECT).nonzero().flatten().tolist()
    if all_correct or not correct:
        return correct
    return [pick(correct, generator)]


def transfer_pairs(rewards, prompts, completions, generator=None, all_correct=False, random_ties=False):
    """rewards (Q, N, G) -> ([(P+ prompt, P- prompt, O+ ids)], [(E+, E-) per question with a transfer])."""
    Q, N, G = rewards.shape
    pairs, chosen = [], []
    for q in range(Q):
        choice = choose_transfer(rewards[q], generator, random_ties)
        if choice is None:
            continue
        plus, minus = choice
        chosen.append(choice)
        for g in choose_teacher_samples(rewards[q, plus], generator, all_correct):
            pairs.append((prompts[q * N + plus], prompts[q * N + minus], completions[(q * N + plus) * G + g]))
    return pairs, chosen
