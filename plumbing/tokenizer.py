"""
tokenizer.py: the tokenizer next to the model: load it, render chat prompts, know when a turn ends.

- `load_tokenizer(name_or_path)`: the checkpoint's own transformers tokenizer (presets as in
  model.py).
- `render_chat(tok, system, user)`: prompt ids from the checkpoint's OWN chat template with
  system = the expert prompt and user = the question, ending with the assistant header. The template
  already emits any BOS (Llama's <|begin_of_text|>), so we never add a second one. A template's
  default system prompt (Qwen's, SmolLM2's "You are a helpful AI assistant named SmolLM...") is
  replaced by the expert's, never kept.
- `stop_token_ids(tok)`: every id that ends generation (Llama-3.x-Instruct: <|eot_id|>, <|eom_id|>,
  <|end_of_text|>; Qwen: <|im_end|>, <|endoftext|>; REFERENCES.md 4.8; SmolLM2: <|im_end|> = 2, and
  <|endoftext|> = 0, its pretraining document separator: text after it would be a new document).
  `end_of_turn_id(tok)`: the one an SFT target ends with, so that trained answers stop the way
  sampled ones do.
- The `tiny` preset's tokenizer is byte-level (ids 0-255 are the bytes, then 4 special tokens, the
  three ChatML role names and one reserved id) with a ChatML template: built in code on the
  `tokenizers` library alone (TinyTokenizer), nothing to download or train; it spells any text.
  The role names are single tokens as in a real BPE vocabulary (Qwen's "assistant" is one token):
  spelled byte by byte they made up 16 of a 55-token synthetic prompt, compute spent on every SFT
  and RL row for nothing the model has to learn.
"""

import json
import os

from plumbing.errors import UserError
from plumbing.presets import resolve_checkpoint

# Every id that ends an assistant turn, by token text (REFERENCES.md 4.8). The first one present is
# the end-of-turn token an SFT target ends with; all present ones stop sampling.
END_OF_TURN = ["<|eot_id|>", "<|im_end|>"]
STOP_TOKENS = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>"]

# ChatML for the tiny preset (Qwen's format, without Qwen's default system prompt).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


TINY_ROLES = ["system", "user", "assistant"]  # ids 260-262: one token each, wherever in the text


class TinyTokenizer:
    """The tiny preset's tokenizer: a `tokenizers` byte-level BPE without merges, behind the few
    methods of transformers' interface the code calls (importing transformers costs ~1.2 s of CPU
    a process). Saved, it is a PreTrainedTokenizerFast that AutoTokenizer loads as the same."""
    bos_token, eos_token, pad_token = "<|begin_of_text|>", "<|im_end|>", "<|endoftext|>"
    chat_template = TINY_CHAT_TEMPLATE

    def __init__(self):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}  # token id == byte value
        tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens(["<|begin_of_text|>", "<|endoftext|>", "<|im_end|>", "<|im_start|>"])
        # plain (not special) added tokens: decoding keeps them, as it keeps any text
        tk.add_tokens([AddedToken(r, normalized=False, special=False) for r in TINY_ROLES])
        tk.add_special_tokens(["<|reserved_0|>"])
        self.backend = tk
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            tk.token_to_id(t) for t in (self.bos_token, self.eos_token, self.pad_token))

    def __len__(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict:
        return self.backend.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens=True) -> list:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        """TINY_CHAT_TEMPLATE, written out in Python (equal to transformers' rendering of it)."""
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        text += "<|im_start|>assistant\n" if add_generation_prompt else ""
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save_pretrained(self, path: str):
        self.backend.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(self.chat_template)
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(self._config(), f, indent=2)

    def _config(self) -> dict:
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                "eos_token": self.eos_token, "pad_token": self.pad_token}

    @classmethod
    def saved_in(cls, path: str) -> bool:
        """Whether the checkpoint directory holds this tokenizer, as save_pretrained wrote it."""
        if any(os.path.exists(os.path.join(path, f)) for f in OTHER_FILES):
            return False  # transformers would read these too
        try:
            with open(os.path.join(path, "tokenizer_config.json")) as f:
                config = json.load(f)
            with open(os.path.join(path, "chat_template.jinja")) as f:
                template = f.read()
            from tokenizers import Tokenizer
            saved = Tokenizer.from_file(os.path.join(path, "tokenizer.json")).to_str()
        except Exception:  # missing, unreadable or another kind: not this tokenizer
            return False
        tiny = cls()
        return (config == tiny._config() and template == tiny.chat_template
                and saved == tiny.backend.to_str())


tiny_tokenizer = TinyTokenizer
OTHER_FILES = ("special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json")


def _byte_alphabet():
    """GPT-2's byte -> printable character map (the ByteLevel pre-tokenizer's alphabet), in byte
    order: printable bytes stand for themselves, the 68 others take the characters 256, 257, ... in
    turn."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    out, n = [], 0
    for b in range(256):
        out.append(chr(b) if b in printable else chr(256 + n))
        n += b not in printable
    return out


def load_tokenizer(name_or_path: str):
    if name_or_path == "tiny" or TinyTokenizer.saved_in(name_or_path):
        return TinyTokenizer()
    from transformers import AutoTokenizer
    path = resolve_checkpoint(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError, TypeError, AttributeError, KeyError) as e:
        raise UserError(f"{path}: its tokenizer files do not load ({type(e).__name__}: "
                        f"{str(e)[:200]}): restore them from the model's source") from None
    if not (tok.chat_template or "").strip():  # render_chat would give every prompt no tokens
        raise UserError(f"{path}: the tokenizer has no chat template (chat_template.jinja, or "
                        "tokenizer_config.json's chat_template)")
    return tok


def render_chat(tok, system: str | None, user: str) -> list:
    """Prompt ids for (system = expert prompt, user = question), through the assistant header."""
    messages = (([{"role": "system", "content": system}] if system else [])
                + [{"role": "user", "content": user}])
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)  # the template already holds any BOS


def _present_ids(tok, tokens):
    vocab = tok.get_vocab()
    return [vocab[t] for t in tokens if t in vocab]


def stop_token_ids(tok) -> list:
    """Every id that ends generation: the chat turn ends plus the tokenizer's eos."""
    ids = _present_ids(tok, STOP_TOKENS)
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def end_of_turn_id(tok) -> int:
    """The id that closes an assistant turn: what an SFT target ends with."""
    ids = _present_ids(tok, END_OF_TURN)
    return ids[0] if ids else tok.eos_token_id
