"""
rollout.py: hand-written batched sampling with a KV cache, and batched per-token log-probs.

generate(model, prompts, num_samples=G, ...)
    Samples G completions for each of P distinct prompts (rows are prompt-major: row p*G + g).
    - Shared-prefix prefill: each distinct prompt is prefilled ONCE (batch P), then its KV cache is
      copied G times, since GRPO samples G answers for the same prompt (as nanochat's engine does).
    - Prompts of different lengths are LEFT-padded so that every row writes the same cache slot at
      every step; each row gets its own positions (0..len-1, pads excluded) and a key mask hides
      the pads, so a row's tokens see exactly what they would see alone.
    - Only GENERATED stop tokens end a row (an EOS inside a prompt must not: GRPO-Zero a3a8963). A
      finished row is frozen; whether all rows are done is asked every `sync_every` steps, not
      every token, so a GPU does not wait on the host per token.
    - temperature 0 = greedy; otherwise softmax(logits / T), optional top-p (nucleus) filtering,
      drawn from a seeded torch.Generator so a fixed seed gives identical samples. All uniforms are
      drawn up front, one per (step, row): row r's sample never depends on how many other rows are
      still running, or on how the batch is split into calls, so skipping finished rows or
      sharding the rows cannot change a single token.
    Returns each row's completion ids (up to and including the first stop token) and why it
    stopped, and with entropy=True the mean entropy of the distribution each token was drawn from
    (softmax(logits / T), before top-p): the entropy-collapse signal of RL, from logits the
    sampler has anyway (no extra forward).

token_logprobs(model, prompts, completions)
    log pi(c_t | prompt, c_<t) for every completion token, for a batch of rows in one forward.
    - Rows are RIGHT-padded: pads come after the real tokens, so a causal mask is all that is
      needed and the positions 0..L-1 equal the ones used while sampling (the same token sees the
      same position).
    - The LM head runs only on the hidden states that predict completion tokens, in chunks of
      `chunk_size` tokens, so the full-vocabulary fp32 logits of the whole batch never exist at
      once (a 128k vocabulary makes them the largest tensor of an RL step: REFERENCES.md 5.2).
      Backward recomputes each chunk's logits instead of keeping them (ChunkedLogProbs, a
      hand-written autograd function).
    - The mask comes from the completion lengths, never from `ids != pad` (pad can equal EOS:
      REFERENCES 5.5).
    - Logits are divided by the sampling temperature first: sampler and trainer must use the same T.
"""

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Rollout:
    completions: list  # list[list[int]], per row, up to and including the stop token
    finish: list  # list[str], "stop" or "length"
    entropy: list | None = None  # per row: mean sampling entropy (nats) over its tokens


SEQUENTIAL_CUMSUM = ("cpu",)  # devices whose cumsum adds left to right


def sample_next(logits, temperature=1.0, top_p=1.0, generator=None, u=None):
    """logits (B, V) -> next token ids (B,). temperature 0 means greedy. u (B,): the rows' uniforms
    in [0, 1), drawn here from `generator` when not given."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    # inverse-CDF sampling: one uniform per row, not torch.multinomial's one per vocabulary entry;
    # u lies in (0, total], so a zero-probability token (an empty CDF step) is never drawn
    cdf = probs.cumsum(dim=-1)  # (B, V)
    if cdf.device.type not in SEQUENTIAL_CUMSUM:
        # a parallel scan (CUDA, one row) may leave a zero-probability step one rounding wide: a
        # running max closes it (not on the CPU: sequential sums keep it empty; it cost 9% there)
        cdf = torch.where(probs > 0, cdf, 0.0).cummax(dim=-1).values
    if u is None:
        u = torch.rand(cdf.shape[0], generator=generator, device=cdf.device)
    u = (1.0 - u[:, None]) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def top_p_filter(probs, top_p):
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one),
    renormalise. probs (B, V) -> (B, V)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the strictly more likely tokens
    keep_sorted = mass_before < top_p  # kept while the mass before it is still short of top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum(dim=-1, keepdim=True)


def _without_autograd(fn):
    """Run fn under inference_mode (no autograd bookkeeping: cheaper per op than no_grad), except
    under autocast, which caches its bf16 copy of each fp32 weight only outside inference_mode:
    there every decode step would cast every weight afresh (CPU: a 2048^2 linear on one row 3.3x
    slower; CUDA, 3B: 12.8 GB of fp32 weights re-read per token). Under no_grad the copies are made
    once; a caller that trains next drops them first (riel.riel_step: before torch 2.11 a copy
    cast under no_grad gave its weight no gradient)."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        autocast = torch.is_autocast_enabled(model.embed_tokens.weight.device.type)
        with torch.no_grad() if autocast else torch.inference_mode():
            return fn(model, *args, **kwargs)
    return wrapper


@_without_autograd
def generate(model, prompts, *, num_samples=1, max_new_tokens=256, temperature=1.0, top_p=1.0,
             stop_ids=(), generator=None, seed=None, vocab_limit=None, pad_id=0, sync_every=8,
             rng_rows=None, drop_finished=False, static_cache=False, compile=False,
             cuda_graphs=False, entropy=False) -> Rollout:
    """prompts: P lists of token ids -> Rollout with P * num_samples rows (prompt-major).
    rng_rows=(offset, total): these rows are rows offset.. of a batch of `total` rows sampled by
    several processes, and get the whole batch's tokens. Speed options, each giving the plain path's
    tokens (tests/test_speed.py): drop_finished (stopped rows leave the decode batch), static_cache
    (fixed-shape decode steps: KVCache static mode), compile (torch.compile the decode step) and
    cuda_graphs (the decode step replayed from a DecodeGraph); the last two imply static_cache."""
    assert prompts and all(len(p) > 0 for p in prompts), "every prompt needs at least one token"
    device = model.embed_tokens.weight.device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    P, G = len(prompts), num_samples
    lens = torch.tensor([len(p) for p in prompts], device=device)
    Tp = int(lens.max())
    # left-pad: (P, Tp) ids, valid marks real prompt tokens
    ids = torch.full((P, Tp), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, Tp - len(p):] = torch.tensor(p, device=device)
    valid = torch.arange(Tp, device=device)[None, :] >= (Tp - lens)[:, None]
    positions = (valid.cumsum(dim=1) - 1).clamp(min=0)

    # prefill the P distinct prompts once. A pad query would see no key at all (NaN in softmax):
    # let it see itself; its output is never used.
    causal = torch.ones(Tp, Tp, dtype=torch.bool, device=device).tril()
    mask = (causal[None] & valid[:, None, :]) | torch.eye(Tp, dtype=torch.bool, device=device)[None]
    cache = model.new_cache(P, Tp)
    hidden = model.trunk(ids, positions, cache, mask[:, None])  # (P, Tp, dim)
    logits = model.lm_head(hidden[:, -1]).float()  # (P, V)

    # copy each prompt's cache G times, with room for the answers: (P*G, Hkv, Tp + new, d)
    S = Tp + max_new_tokens
    big = model.new_cache(P * G, S)
    for src, dst in ((cache.k, big.k), (cache.v, big.v)):
        for layer in range(len(src)):
            dst[layer][:, :, :Tp] = src[layer].repeat_interleave(G, dim=0)
    big.pos = Tp
    del cache
    logits = logits.repeat_interleave(G, dim=0)  # (B, V)
    # a slot becomes visible once written
    key_mask = torch.zeros(P * G, S, dtype=torch.bool, device=device)
    key_mask[:, :Tp] = valid.repeat_interleave(G, dim=0)
    next_pos = lens.repeat_interleave(G)  # (B,) position of the next token of each row
    if static_cache or compile or cuda_graphs:
        big.slot = torch.tensor([Tp], device=device)  # advanced in place: fixed step shapes
    # a graph replays on the same buffers: the batch stays whole, finished rows frozen in it
    drop_finished = drop_finished and not cuda_graphs
    step = DecodeGraph() if cuda_graphs else _compiled_decode_step() if compile else decode_step

    B = P * G
    offset, total = rng_rows or (0, B)
    assert 0 <= offset and offset + B <= total, f"rng_rows {rng_rows}: {B} rows do not fit"
    # all `total` rows' uniforms, of which this call uses its own: every process's generator agrees
    uniforms = None if temperature == 0 else torch.rand(
        max_new_tokens, total, generator=generator, device=device)[:, offset:offset + B]
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # (B,) nats summed over each row's tokens
    ent_sum = torch.zeros(B, device=device) if entropy and temperature > 0 else None
    alive = None  # drop_finished: (b,) original ids of the rows still decoding; None: all rows
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        if vocab_limit is not None:  # rows past the tokenizer (Qwen pads 151665 -> 151936)
            logits = logits[:, :vocab_limit]
        # a row's uniform is picked by its ORIGINAL id: dropping other rows cannot change its tokens
        u = None if uniforms is None else uniforms[t] if alive is None else uniforms[t, alive]
        tok = sample_next(logits, temperature, top_p, u=u)
        # counted for rows still running: the tokens this step adds to a completion
        if ent_sum is not None:
            ent = token_entropy(logits, temperature) * ~done  # (b,)
            if alive is None:
                ent_sum += ent
            else:
                ent_sum.index_add_(0, alive, ent)
        tok = torch.where(done, pad_id, tok)  # finished rows are frozen
        if alive is None:
            out[:, t] = tok
        else:
            out[alive, t] = tok
        done = done | torch.isin(tok, stop)
        if t == max_new_tokens - 1:
            break
        if (t + 1) % sync_every == 0:  # the only host syncs: at most one per sync_every tokens
            if bool(done.all()):
                break
            if drop_finished and bool(done.any()):
                keep = (~done).nonzero().squeeze(1)  # (b,)
                alive = keep if alive is None else alive[keep]
                tok, done, next_pos = tok[keep], done[keep], next_pos[keep]
                key_mask = key_mask[keep]
                # layer by layer: each old layer is freed before the next is copied
                for cache in (big.k, big.v):
                    for i in range(len(cache)):
                        cache[i] = cache[i][keep]
        key_mask[:, big.pos] = True
        width = None if big.slot is not None else big.pos + 1  # static: the whole, fixed-size cache
        step_mask = key_mask[:, None, None, :width]
        logits = step(model, tok, next_pos, big, step_mask)  # (b, V)
        if big.slot is not None:  # static mode: trunk leaves the fill to us
            big.pos += 1
            big.slot += 1
        next_pos += 1  # in place: a graph reads the positions from this very tensor
    rollout = _collect(out[:, :t + 1].tolist(), set(stop.tolist()))
    if ent_sum is not None:
        sums = ent_sum.tolist()
        rollout.entropy = [e / max(1, len(c)) for e, c in zip(sums, rollout.completions)]
    return rollout


def token_entropy(logits, temperature=1.0):
    """logits (b, V) -> entropy (b,) in nats of softmax(logits / T):
    -sum p log p = logsumexp(z) - sum p z."""
    z = logits.float() / temperature
    p = F.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


def decode_step(model, tok, positions, cache, mask):
    """One token per row through the model: tok, positions (b,), mask (b, 1, 1, S) -> fp32 logits
    (b, V). With a static cache this is a fixed-shape function of tensors only, which is what
    torch.compile traces."""
    hidden = model.trunk(tok[:, None], positions[:, None], cache, mask)
    return model.lm_head(hidden[:, -1]).float()


class DecodeGraph:
    """decode_step as a CUDA graph: captured at the first call, then replayed, one launch per token
    instead of ~40 per layer (a 3B decode step is ~1,100 small kernels; launched one by one from
    Python the GPU waits on the host, ~7-11 ms per token at 96 rows against a ~3.6 ms memory floor
    on an H100: issue 31). The graph replays exactly the eager step's kernels, so its tokens are the
    eager path's. Off CUDA the same fixed-buffer step runs eagerly: the CPU tests check that path
    (tests/test_speed.py)."""

    def __init__(self):
        self.tok = self.inputs = self.graph = self.logits = None

    def __call__(self, model, tok, positions, cache, mask):
        if self.tok is None:
            self.tok, self.inputs = tok.clone(), (positions, cache, mask.data_ptr())
            if tok.is_cuda:
                self._capture(model, positions, cache, mask)
        # a graph replays fixed addresses: the cache (its slot advanced in place), key mask and
        # positions (generate advances them in place) must be the same tensors; `tok` is copied in
        same = (positions is self.inputs[0] and cache is self.inputs[1]
                and mask.data_ptr() == self.inputs[2])
        assert same, "a graph's inputs must stay the same tensors, changed in place"
        self.tok.copy_(tok)
        if self.graph is None:
            return decode_step(model, self.tok, positions, cache, mask)
        self.graph.replay()
        return self.logits

    def _capture(self, model, positions, cache, mask):
        # warm-up on a side stream, as torch.cuda.graphs' docs ask: no lazy init (cuBLAS handles and
        # workspaces) in a capture. It writes this step's keys/values, which the step rewrites.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                decode_step(model, self.tok, positions, cache, mask)
        torch.cuda.current_stream().wait_stream(stream)
        # it reads autocast's bf16 weight copies, all cached by the prefill (hence no_grad): none is
        # first cached DURING the capture, the case PyTorch's cache_enabled=False advice is for
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decode_step(model, self.tok, positions, cache, mask)


_COMPILED = {}


def _compiled_decode_step():
    """decode_step under torch.compile, built once per process. dynamic=True: the batch shrinks as
    rows are dropped and prompt lengths change the cache length between calls; one trace serves
    them all."""
    if "step" not in _COMPILED:
        _COMPILED["step"] = torch.compile(decode_step, dynamic=True)
    return _COMPILED["step"]


def _collect(rows, stop):
    completions, finish = [], []
    for row in rows:
        end = next((i for i, x in enumerate(row) if x in stop), None)
        completions.append(row if end is None else row[:end + 1])
        finish.append("length" if end is None else "stop")
    return Rollout(completions, finish)


def completion_logits(model, prompt, completion):
    """(C, V) logits that predict each completion token, from one forward of prompt + completion."""
    ids = torch.tensor([prompt + completion], device=next(model.parameters()).device)
    return model(ids)[0, len(prompt) - 1:-1]


def token_logprobs(model, prompts, completions, temperature=1.0, chunk_size=256, pad_id=0):
    """Per-token log-probs of completions given prompts.

    prompts, completions: B lists of ids. Returns logp (B, C) float32 (0 past each row's end) and
    mask (B, C) float32 (1 on the completion tokens), C = longest completion. Differentiable when
    grad is on."""
    device = model.embed_tokens.weight.device
    B = len(prompts)
    plen = [len(p) for p in prompts]
    clen = [len(c) for c in completions]
    C = max(clen)
    L = max(p + c for p, c in zip(plen, clen))
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :plen[i] + clen[i]] = torch.tensor(p + c, device=device)
    hidden = model(ids, hidden_only=True)  # (B, L, dim): right-padded rows need only a causal mask

    # the hidden state at position t predicts token t+1: completion token j of row i is
    # ids[i, P_i + j], predicted by hidden[i, P_i + j - 1]
    rows = torch.tensor([i for i in range(B) for _ in range(clen[i])], device=device)
    cols = torch.tensor([j for i in range(B) for j in range(clen[i])], device=device)
    pos = torch.tensor([plen[i] + j for i in range(B) for j in range(clen[i])], device=device)
    h = hidden[rows, pos - 1]  # (N, dim), N = all completion tokens of the batch
    targets = ids[rows, pos]  # (N,)
    flat = ChunkedLogProbs.apply(h, model.lm_head.weight, targets, temperature, chunk_size)
    logp = torch.zeros(B, C, dtype=torch.float32, device=device).index_put((rows, cols), flat)
    mask = torch.zeros(B, C, dtype=torch.float32, device=device)
    mask[rows, cols] = 1.0
    return logp, mask


class ChunkedLogProbs(torch.autograd.Function):
    """log p(target) = logit[target] - logsumexp(logits) for N hidden states, in fp32 chunks.

    Forward keeps only h and one logsumexp per token; backward recomputes each chunk's logits and
    turns them in place into the gradient  d logp / d logits = onehot(target) - softmax(logits),
    so at any moment one (chunk, V) fp32 block exists instead of the (N, V) logits plus autograd's
    copies of them."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # backward then runs under forward's autocast state
    def forward(ctx, h, weight, targets, temperature, chunk_size):
        # h (N, dim), weight (V, dim), targets (N,)
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(out)
        for s in range(0, h.shape[0], chunk_size):
            e = s + chunk_size
            logits = _logits(h[s:e], weight, temperature)  # (n, V) fp32
            lse[s:e] = logits.logsumexp(dim=-1)
            out[s:e] = logits.gather(-1, targets[s:e, None]).squeeze(-1) - lse[s:e]
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):  # grad_out (N,)
        h, weight, targets, lse = ctx.saved_tensors
        T, n = ctx.temperature, ctx.chunk_size
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], n):
            g = grad_out[s:s + n, None].float()  # (n, 1)
            logits = _logits(h[s:s + n], weight, T)
            grad = logits.sub_(lse[s:s + n, None]).exp_().mul_(-g)  # -g * softmax, in place: (n, V)
            grad.scatter_add_(-1, targets[s:s + n, None], g)  # + g * onehot(target)
            grad = grad.div_(T).to(h.dtype)
            if grad_h is not None:
                grad_h[s:s + n] = grad @ weight
            # in place, so autocast leaves it in fp32: TF32 under autocast (see tf32_if)
            if grad_w is not None:
                with tf32_if(h.is_cuda and torch.is_autocast_enabled("cuda")):
                    grad_w.addmm_(grad.T, h[s:s + n])
        return grad_h, grad_w, None, None, None


@contextlib.contextmanager
def tf32_if(enabled):
    """Within: fp32 matmuls on CUDA may use TF32 (10-bit mantissa in, fp32 accumulate) if `enabled`.
    The LM head's weight gradient sums chunk products into fp32 .grad with an in-place addmm_, which
    escapes autocast: the step's one full-fp32 matmul (2 x tokens x vocab x dim FLOPs: 23 TFLOP for
    a 3B RIEL step, ~0.35 s at an H100's 67 fp32 TFLOP/s, ~0.05 s in TF32). Its inputs come from
    bf16 matmuls, so TF32 loses nothing they had; a bf16 product would cost a (vocab, dim) temporary
    at the backward's peak. Only here: a `--precision fp32` run keeps true fp32 everywhere."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = before or enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _logits(h, weight, temperature):
    # F.linear, not h @ weight.T: autocast caches a bf16 copy of `weight`, not of a transposed view
    logits = F.linear(h, weight).float()  # fresh: the in-place division below copies nothing
    return logits.div_(temperature) if temperature != 1.0 else logits
