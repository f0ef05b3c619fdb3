"""rollout.py against transformers' generate and against naive log-softmax: the sampler and the
scorer."""

import pytest
import torch
import torch.nn.functional as F

import model as ours
from rollout import generate, token_logprobs, top_p_filter

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 1], [100, 23, 4, 77], [9]]


def hf_greedy(hf, prompts, max_new, stop, pad=0):
    """transformers' own greedy decoding on a left-padded batch, cut after the first stop token."""
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=max_new,
                      eos_token_id=list(stop) or None, pad_token_id=pad)[:, T:].tolist()
    rows = []
    for row in out:
        end = next((i for i, x in enumerate(row) if x in stop), len(row) - 1)
        rows.append(row[:end + 1])
    return rows


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_equals_transformers_generate_with_stop_tokens(hf_pair, kind):
    hf, m = hf_pair(kind=kind)
    free = generate(m, PROMPTS, max_new_tokens=20, temperature=0)
    # pick stop ids that greedy decoding really emits mid-answer, so rows stop at different steps
    stop = {free.completions[0][6], free.completions[2][3]}
    ours_out = generate(m, PROMPTS, max_new_tokens=20, temperature=0, stop_ids=stop)
    assert ours_out.completions == hf_greedy(hf, PROMPTS, 20, stop)
    assert "stop" in ours_out.finish
    for c, why in zip(ours_out.completions, ours_out.finish):
        assert (why == "stop") == (c[-1] in stop) and not any(x in stop for x in c[:-1])
        assert why == "stop" or len(c) == 20


def test_each_padded_row_equals_its_prompt_decoded_alone(hf_pair):
    _, m = hf_pair(kind="llama")
    batch = generate(m, PROMPTS, max_new_tokens=12, temperature=0).completions
    for p, c in zip(PROMPTS, batch):
        assert generate(m, [p], max_new_tokens=12, temperature=0).completions[0] == c


def test_stop_token_inside_the_prompt_does_not_stop_the_row(hf_pair):
    _, m = hf_pair(kind="llama")
    stop_id = 42
    out = generate(m, [[3, stop_id, 5], [stop_id]], max_new_tokens=8, temperature=0,
                   stop_ids=[stop_id])
    for c, why in zip(out.completions, out.finish):
        assert len(c) >= 1 and (why == "length") == (stop_id not in c)
        assert why == "stop" or len(c) == 8


def test_shared_prefix_prefill_equals_prefilling_every_copy(hf_pair):
    _, m = hf_pair(kind="qwen2")
    shared = generate(m, PROMPTS, num_samples=3, max_new_tokens=10, temperature=0)
    repeated = generate(m, [p for p in PROMPTS for _ in range(3)], max_new_tokens=10, temperature=0)
    assert shared.completions == repeated.completions
    # and with sampling, the same seed gives the same rows either way
    s1 = generate(m, PROMPTS, num_samples=3, max_new_tokens=10, seed=3)
    s2 = generate(m, [p for p in PROMPTS for _ in range(3)], max_new_tokens=10, seed=3)
    assert s1.completions == s2.completions


def test_fixed_seed_gives_identical_samples_and_seeds_differ():
    m = ours.Transformer.from_pretrained("tiny")
    a = generate(m, PROMPTS, num_samples=4, max_new_tokens=16, seed=7)
    b = generate(m, PROMPTS, num_samples=4, max_new_tokens=16,
                 generator=torch.Generator().manual_seed(7))
    c = generate(m, PROMPTS, num_samples=4, max_new_tokens=16, seed=8)
    assert a.completions == b.completions
    assert a.completions != c.completions
    # G samples of one prompt are not copies of each other (the cache copy must not copy the RNG)
    assert len({tuple(x) for x in a.completions[:4]}) > 1


def test_length_finish_and_max_new_tokens():
    m = ours.Transformer.from_pretrained("tiny")
    out = generate(m, PROMPTS, max_new_tokens=5, temperature=0)
    assert all(len(c) == 5 for c in out.completions) and set(out.finish) == {"length"}


def test_vocab_limit_is_never_sampled(hf_pair):
    _, m = hf_pair(kind="qwen2")
    out = generate(m, PROMPTS, num_samples=8, max_new_tokens=16, temperature=2.0, seed=0,
                   vocab_limit=50)
    assert max(max(c) for c in out.completions) < 50


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    # sorted: 0.5, 0.3, 0.15, 0.05; mass before each: 0, 0.5, 0.8, 0.95
    assert (top_p_filter(probs, 0.5)[0] > 0).tolist() == [False, True, False, False]
    assert (top_p_filter(probs, 0.8)[0] > 0).tolist() == [False, True, False, True]
    assert (top_p_filter(probs, 0.81)[0] > 0).tolist() == [False, True, True, True]
    torch.testing.assert_close(top_p_filter(probs, 0.8), torch.tensor([[0, 0.625, 0, 0.375]]))
    torch.testing.assert_close(top_p_filter(probs, 1.0), probs)


def test_top_p_sampling_draws_only_nucleus_tokens_in_proportion():
    from rollout import sample_next
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log().expand(20000, 4)
    draws = sample_next(logits, 1.0, 0.8, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / 20000
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1].item() - 0.625) < 0.02


def naive_logprobs(m, prompt, completion, temperature=1.0):
    ids = torch.tensor([prompt + completion])
    logp = F.log_softmax(m(ids).float() / temperature, dim=-1)[0]
    return torch.stack([logp[len(prompt) + j - 1, t] for j, t in enumerate(completion)])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equals_naive_log_softmax(hf_pair, temperature):
    _, m = hf_pair(kind="llama")
    comps = [[3, 4, 5], [6] * 9, [1], [8, 9]]
    with torch.no_grad():
        logp, mask = token_logprobs(m, PROMPTS, comps, temperature=temperature, chunk_size=4)
    assert mask.tolist() == [[1.0] * len(c) + [0.0] * (9 - len(c)) for c in comps]
    for i, (p, c) in enumerate(zip(PROMPTS, comps)):
        with torch.no_grad():
            naive = naive_logprobs(m, p, c, temperature)
            torch.testing.assert_close(logp[i, :len(c)], naive, atol=1e-5, rtol=0)
        assert torch.all(logp[i, len(c):] == 0)


def test_token_logprobs_gradient_equals_naive_gradient(hf_pair):
    _, m = hf_pair(kind="qwen2")
    comps = [[3, 4, 5], [6] * 9, [1], [8, 9]]
    weights = torch.randn(4, 9)
    m.zero_grad()
    logp, mask = token_logprobs(m, PROMPTS, comps, chunk_size=5)
    (logp * mask * weights).sum().backward()
    ours_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    sum(naive_logprobs(m, p, c) @ weights[i, :len(c)]
        for i, (p, c) in enumerate(zip(PROMPTS, comps))).backward()
    for a, b in zip(ours_grads, [p.grad for p in m.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_mask_counts_a_completion_token_equal_to_pad(hf_pair):
    # pad == EOS (Qwen base): the EOS a row ended with must still be scored and trained
    _, m = hf_pair(kind="llama")
    with torch.no_grad():
        logp, mask = token_logprobs(m, [[5, 6], [7]], [[0], [3, 0, 0]], pad_id=0)
    assert mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert logp[0, 0] < 0 and logp[1, 2] < 0


def test_sampled_tokens_are_scored_at_the_positions_they_were_sampled_at(hf_pair):
    # greedy tokens must be the scorer's argmax at every step: sampler and trainer agree
    _, m = hf_pair(kind="llama")
    out = generate(m, PROMPTS, max_new_tokens=10, temperature=0)
    with torch.no_grad():
        logp, mask = token_logprobs(m, PROMPTS, out.completions)
    for i, (p, c) in enumerate(zip(PROMPTS, out.completions)):
        with torch.no_grad():
            logits = m(torch.tensor([p + c]))[0, len(p) - 1:len(p) + len(c) - 1]
        assert logits.argmax(-1).tolist() == c


def test_chunked_logprobs_backward_passes_gradcheck():
    from rollout import ChunkedLogProbs
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=g)
    # the forward is fp32 by design, so check the hand-written backward against a float64 reference
    ref = lambda h, w: torch.log_softmax(h @ w.T / 0.7, -1).gather(-1, targets[:, None]).squeeze(-1)
    out = ChunkedLogProbs.apply(h, w, targets, 0.7, 3)
    torch.testing.assert_close(out, ref(h, w).float(), atol=1e-5, rtol=0, check_dtype=False)
    gh, gw = torch.autograd.grad(out, (h, w), torch.arange(7.0, dtype=torch.float32))
    rh, rw = torch.autograd.grad(ref(h, w), (h, w), torch.arange(7.0, dtype=torch.float64))
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-5)


def test_sampling_frequencies_match_the_distribution_and_skip_zero_probability_tokens():
    from rollout import sample_next
    probs = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])
    draws = sample_next(probs.log().expand(50000, 6), 1.0, 1.0, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=6).float() / 50000
    assert freq[0] == freq[2] == freq[5] == 0
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)


def test_a_zero_probability_token_is_never_drawn_even_from_a_rounding_wide_cdf_step(monkeypatch):
    """On CUDA a single row's cumsum is a parallel scan whose sums may differ in the last bit across
    a run of zero probabilities, giving a zero-probability token a CDF step one rounding wide.
    Emulated here by a cumsum that adds such a step; uniforms aimed into it must still not draw the
    token."""
    import rollout
    from rollout import sample_next
    probs = torch.tensor([[0.25, 0.0, 0.75, 0.0]])
    real = torch.Tensor.cumsum
    # steps at ids 1 and 3
    wide = lambda self, dim: real(self, dim) + torch.tensor([0.0, 1e-6, 1e-6, 2e-6])
    monkeypatch.setattr(torch.Tensor, "cumsum", wide)
    # take the path of devices with a parallel scan
    monkeypatch.setattr(rollout, "SEQUENTIAL_CUMSUM", ())
    total = 1.0 + 2e-6
    for target in (0.25 + 5e-7, 1.0 + 1.5e-6):  # inside the steps of ids 1 and 3
        u = torch.tensor([1.0 - target / total])  # sample_next maps u to (1 - u) * total
        assert sample_next(probs.log(), u=u).item() in (0, 2)


def test_token_entropy_matches_the_reference_vectors():
    from rollout import token_entropy
    logits = torch.tensor([[2.0, 1.0, 0.1, -1.0]])  # REFERENCES.md 3.4
    assert token_entropy(logits, 1.0).item() == pytest.approx(0.960673, abs=1e-6)
    assert token_entropy(logits, 0.7).item() == pytest.approx(0.717774, abs=1e-6)


@pytest.mark.parametrize("drop_finished", [False, True])
def test_sampler_entropy_is_the_mean_entropy_of_a_full_forward_along_each_completion(
        hf_pair, drop_finished):
    """Each row's entropy, recomputed from a plain forward of prompt + completion (not the sampler's
    cache): the mean over the row's tokens of -sum p log p, p = softmax(logits / T)."""
    _, m = hf_pair(kind="llama")
    T = 0.7
    kw = dict(num_samples=3, max_new_tokens=10, temperature=T, seed=3, stop_ids=(2, 5))
    out = generate(m, PROMPTS, **kw, drop_finished=drop_finished, sync_every=2, entropy=True)
    plain = generate(m, PROMPTS, **kw)
    # off by default, same tokens on
    assert out.completions == plain.completions and plain.entropy is None
    assert any(f == "stop" for f in out.finish) and any(f == "length" for f in out.finish)
    for r, c in enumerate(out.completions):
        p = PROMPTS[r // 3]
        with torch.no_grad():
            logits = m(torch.tensor([p + c])).float()[0, len(p) - 1:-1]
            logp = F.log_softmax(logits / T, dim=-1)  # (C, V)
        expected = -(logp.exp() * logp).sum(-1).mean().item()
        assert out.entropy[r] == pytest.approx(expected, abs=1e-4)
