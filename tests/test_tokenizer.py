"""Real tokenizers and chat templates from ../shared/data, and a really pretrained Llama (llama2.c
stories260K)."""

import json
import re
import struct

import numpy as np
import pytest
import torch
from conftest import SHARED, requires_shared

import model as ours
from plumbing import tokenizer
from plumbing.errors import UserError
from rollout import generate

EXPERT = "You are Expert 1. Solve step by step and end with '#### <number>'."
QUESTION = "Janet has 3 apples and buys 4 more. How many apples does she have?"


def llama3_tokenizer():
    """HF fast tokenizer from Meta's tiktoken ranks + the 256 special tokens (data README
    section 5a)."""
    pytest.importorskip("tiktoken")
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
             "<|python_tag|>", "<|image|>"]
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(names))]
    conv = TikTokenConverter(vocab_file=str(SHARED / "tokenizers/llama3/tokenizer.model"),
                             extra_special_tokens=names)
    tok = PreTrainedTokenizerFast(tokenizer_object=conv.converted(), bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>")
    tok.chat_template = (SHARED / "chat_templates/llama-3.2-instruct.jinja").read_text()
    return tok


def qwen25_tokenizer(template="qwen2.5-instruct.jinja"):
    from transformers import AddedToken, Qwen2Tokenizer
    tok = Qwen2Tokenizer(vocab=str(SHARED / "tokenizers/qwen2.5/vocab.json"),
                         merges=str(SHARED / "tokenizers/qwen2.5/merges.txt"), unk_token=None)
    # Qwen2.5's added tokens 151643-151664 (data README section 5b)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                "<|image_pad|>", "<|video_pad|>"]
    plain = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
             "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
    tok.add_tokens([AddedToken(t, special=True) for t in specials]
                   + [AddedToken(t, special=False) for t in plain])
    # Instruct: a turn ends with <|im_end|> (set after the ids are fixed)
    tok.eos_token = "<|im_end|>"
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|file_sep|>"])
    assert ids == [151643, 151644, 151664]
    tok.chat_template = (SHARED / "chat_templates" / template).read_text()
    return tok


@requires_shared
def test_llama3_chat_prompt_and_stop_ids():
    tok = llama3_tokenizer()
    assert tok.encode("This is a test", add_special_tokens=False) == [2028, 374, 264, 1296]
    ids = tokenizer.render_chat(tok, EXPERT, QUESTION)
    text = tok.decode(ids)
    assert re.fullmatch(
        r"<\|begin_of_text\|><\|start_header_id\|>system<\|end_header_id\|>\n\n"
        r"Cutting Knowledge Date: December 2023\nToday Date: \d\d \w{3} \d{4}\n\n"
        + re.escape(EXPERT)
        + r"<\|eot_id\|><\|start_header_id\|>user<\|end_header_id\|>\n\n" + re.escape(QUESTION)
        + r"<\|eot_id\|><\|start_header_id\|>assistant<\|end_header_id\|>\n\n", text), text
    assert ids[0] == 128000 and ids.count(128000) == 1  # the template's BOS, never a second one
    assert set(tokenizer.stop_token_ids(tok)) == {128001, 128008, 128009}
    assert tokenizer.end_of_turn_id(tok) == 128009


@requires_shared
@pytest.mark.parametrize("template", ["qwen2.5-instruct.jinja", "qwen2.5-math-instruct.jinja"])
def test_qwen25_chat_prompt_and_stop_ids(template):
    tok = qwen25_tokenizer(template)
    assert tok.encode("Hello world!", add_special_tokens=False) == [9707, 1879, 0]
    ids = tokenizer.render_chat(tok, EXPERT, QUESTION)
    # the expert prompt replaces Qwen's default system
    assert tok.decode(ids) == (f"<|im_start|>system\n{EXPERT}<|im_end|>\n"
                               f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
                               "<|im_start|>assistant\n")
    assert ids[0] == 151644 and ids.count(151644) == 3
    assert set(tokenizer.stop_token_ids(tok)) == {151643, 151645}
    assert tokenizer.end_of_turn_id(tok) == 151645


def test_tiny_tokenizer_is_byte_level_with_chat_template():
    tok = tokenizer.load_tokenizer("tiny")
    text = "Q: 12+7=? é"
    assert tok.encode(text, add_special_tokens=False) == list(text.encode())
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    ids = tokenizer.render_chat(tok, "be brief", "1+1")
    assert tok.decode(ids) == ("<|im_start|>system\nbe brief<|im_end|>\n"
                               "<|im_start|>user\n1+1<|im_end|>\n"
                               "<|im_start|>assistant\n")
    # each role name is one token (260-262), as in a BPE vocabulary; the rest is spelled bytewise
    start, end, nl = (tok.get_vocab()[t] for t in ("<|im_start|>", "<|im_end|>", "Ċ"))
    assert ids == [start, 260, nl, *b"be brief", end, nl,
                   start, 261, nl, *b"1+1", end, nl,
                   start, 262, nl]
    roles = "the user's assistant"
    assert tok.decode(tok.encode(roles, add_special_tokens=False)) == roles
    eot = tokenizer.end_of_turn_id(tok)
    assert eot in tokenizer.stop_token_ids(tok) and tok.decode([eot]) == "<|im_end|>"
    assert len(tok) == ours.tiny_config().vocab_size


def test_tiny_tokenizer_saved_is_the_transformers_tokenizer_it_loads_as(tmp_path):
    """TinyTokenizer saves what AutoTokenizer loads, and that tokenizer encodes, decodes, renders
    the chat template and names its special ids as ours does; load_tokenizer reads such a directory
    back as ours (no transformers import), any other as transformers'."""
    from transformers import AutoTokenizer
    tok = tokenizer.TinyTokenizer()
    tok.save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(ours.tiny_config().to_hf()))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(tokenizer.load_tokenizer(str(tmp_path)), tokenizer.TinyTokenizer)
    assert (len(hf), hf.get_vocab()) == (len(tok), tok.get_vocab())
    assert [hf.bos_token_id, hf.eos_token_id, hf.pad_token_id] == \
        [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [256, 258, 257]
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1 é"},
            {"role": "assistant", "content": "2"}]
    for generation in (True, False):
        assert tok.apply_chat_template(chat, add_generation_prompt=generation) == \
            hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)
    rng = np.random.default_rng(0)
    for n in range(300):  # every id, special ones among them, in random runs
        ids = rng.integers(0, len(tok), size=n % 40).tolist()
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == \
                hf.decode(ids, skip_special_tokens=skip)
        text = hf.decode(ids)
        assert tok.encode(text, add_special_tokens=False) == \
            hf.encode(text, add_special_tokens=False)
    (tmp_path / "special_tokens_map.json").write_text('{"eos_token": "<|endoftext|>"}')
    assert tokenizer.load_tokenizer(str(tmp_path)).eos_token_id == 257  # as transformers reads it
    (tmp_path / "special_tokens_map.json").unlink()
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert not isinstance(tokenizer.load_tokenizer(str(tmp_path)), tokenizer.TinyTokenizer)
    # damaged files: one line that names the directory, before any training
    (tmp_path / "chat_template.jinja").write_text("")
    with pytest.raises(UserError, match=f"{tmp_path}: the tokenizer has no chat template"):
        tokenizer.load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text((tmp_path / "tokenizer.json").read_text()[:2000])
    with pytest.raises(UserError, match=f"{tmp_path}: its tokenizer files do not load"):
        tokenizer.load_tokenizer(str(tmp_path))


# ---- a really pretrained model: llama2.c stories260K, converted to HF format inside the test ---


def stories260k_to_hf(out_dir):
    """llama2.c legacy layout (data README section 7) -> HF Llama checkpoint. Meta's RoPE rotates
    adjacent pairs (2i, 2i+1); HF rotates (i, i + d/2), so q/k rows are permuted per head, as
    transformers' converter does."""
    from safetensors.torch import save_file
    raw = (SHARED / "models/stories260K/stories260K.bin").read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    w = np.frombuffer(raw[28:], dtype=np.float32)
    hd = dim // n_heads
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        t = torch.from_numpy(w[off:off + n].copy()).view(*shape)
        off += n
        return t

    def to_rotate_half(t, heads):
        return t.view(heads, hd // 2, 2, dim).transpose(1, 2).reshape(heads * hd, dim)

    emb = take(vocab, dim)
    L = n_layers  # the tensors in the file's order
    attn_norm, wq, wk = take(L, dim), take(L, dim, dim), take(L, n_kv * hd, dim)
    wv, wo, ffn_norm = take(L, n_kv * hd, dim), take(L, dim, dim), take(L, dim)
    w1, w2, w3, final = take(L, hidden, dim), take(L, dim, hidden), take(L, hidden, dim), take(dim)
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": final}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": attn_norm[i],
                   p + "post_attention_layernorm.weight": ffn_norm[i],
                   p + "self_attn.q_proj.weight": to_rotate_half(wq[i], n_heads),
                   p + "self_attn.k_proj.weight": to_rotate_half(wk[i], n_kv),
                   p + "self_attn.v_proj.weight": wv[i], p + "self_attn.o_proj.weight": wo[i],
                   p + "mlp.gate_proj.weight": w1[i], p + "mlp.down_proj.weight": w2[i],
                   p + "mlp.up_proj.weight": w3[i]})
    out_dir.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=dim,
               intermediate_size=hidden, num_hidden_layers=n_layers, num_attention_heads=n_heads,
               num_key_value_heads=n_kv, vocab_size=vocab, max_position_embeddings=seq_len,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=vocab > 0,
               bos_token_id=1, eos_token_id=2, hidden_act="silu")
    (out_dir / "config.json").write_text(json.dumps(cfg))


def stories_pieces():
    raw = (SHARED / "models/stories260K/tok512.bin").read_bytes()
    pieces, off = [], 4
    for _ in range(512):
        _, n = struct.unpack("<fi", raw[off:off + 8])
        pieces.append(raw[off + 8:off + 8 + n])
        off += 8 + n
    return pieces


def stories_decode(ids):
    pieces, out = stories_pieces(), b""
    for i in ids:
        m = re.fullmatch(rb"<0x([0-9A-F]{2})>", pieces[i])
        out += bytes([int(m.group(1), 16)]) if m else pieces[i]
    return out.decode("utf-8", errors="replace")


@requires_shared
def test_pretrained_stories260k_greedy_equals_transformers_and_reads_as_english(tmp_path):
    from transformers import AutoModelForCausalLM
    stories260k_to_hf(tmp_path)
    m = ours.Transformer.from_pretrained(str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ours_ids = generate(m, [[1]], max_new_tokens=60, temperature=0, stop_ids=[2]).completions[0]
    hf_out = hf.generate(torch.tensor([[1]]), do_sample=False, max_new_tokens=60, eos_token_id=2)
    hf_ids = hf_out[0, 1:].tolist()
    assert ours_ids == hf_ids[:len(ours_ids)]
    text = stories_decode(ours_ids).lstrip()  # llama2.c pieces carry the leading space
    assert text.startswith("Once upon a time, there was a little girl named Lily."), text
