"""verify.py: turn a model's free text into a 0/1 reward, one small rule per task.

    reward(task, completion, gold) -> 0.0 or 1.0
    check(task, completion, gold, flexible=False) -> (reward, parsed answer or None)

Every expert prompt (data/) asks for the final answer behind a fixed *marker*, so a checker only has
to find markers, parse what follows and compare it with the gold answer:

| task       | marker               | comparison                                                  |
|------------|----------------------|-------------------------------------------------------------|
| gsm8k      | `#### x`             | numeric: `$1,000.50` = `1000.5`, `50%` = `50`               |
| mathqa     | `Answer: (c)`        | the letter; else the option text behind it (gold `(c) 625`) |
| strategyqa | `Answer: yes` / `no` | yes/no (gold may also be true/false)                        |
| math500    | `\\boxed{x}`         | light LaTeX normalisation, then string or numeric equality  |
| synthetic  | `#### x`             | exact string                                                |

Choices (see ../shared/docs/REFERENCES.md section 6 for what others do):
- **The last marker is the answer.** A model that corrects itself (`#### 17 ... wait ... #### 18`)
  is scored on its final answer, as verl's strict GSM8K rule and MATH's `last_boxed_only_string` do
  (REFERENCES.md 6; the official GSM8K script takes the first). Hedging stays worthless: listing
  `#### 1 #### 2 #### 3` earns exactly what writing `#### 3` alone earns, since only one answer
  counts. A last marker with nothing parseable behind it (output cut at `####`) scores 0 even when
  an earlier marker was right.
- **Strict by default.** With no marker the reward is 0, which also covers empty output and output
  cut at max length before the answer. `flexible=True` falls back to the last number (gsm8k), the
  last `(x)` letter (mathqa) or the last yes/no word (strategyqa); log it as a separate score.
- **Text after the answer is allowed** (`#### 42 apples.`): the marker already selects one answer,
  and the text is never clipped.
- Numbers are compared exactly as fractions, never as floats, so `0.1+0.2`-style noise cannot flip
  a reward. Numbers longer than 60 characters are not parsed (no pathological int conversions).
- **Never raises on any completion or gold** (tests/test_verify.py checks this with hypothesis). An
  unknown task name is a programming error and does raise.
verify.py knows nothing about tensors or tokenizers: strings in, floats out.
"""

import re
from fractions import Fraction

TASKS = ("synthetic", "gsm8k", "mathqa", "strategyqa", "math500")


def reward(task: str, completion: str, gold: str) -> float:
    """1.0 if the completion's final answer matches gold under the task's rule, else 0.0."""
    return check(task, completion, gold)[0]


def check(task: str, completion: str, gold: str,
          flexible: bool = False) -> tuple[float, str | None]:
    """(reward, parsed answer as written in the completion, or None when no single answer)."""
    if task not in _CHECKERS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if not isinstance(completion, str) or not isinstance(gold, str):
        return 0.0, None
    try:
        return _CHECKERS[task](completion, gold, flexible)
    except Exception:  # a last guard: the rules are written not to raise; a reward never crashes RL
        return 0.0, None


def _last(candidates: list):
    """The final answer: the last marker's candidate (None when there is no marker)."""
    return candidates[-1] if candidates else None


# ----------------------------------------------------------------------------- numbers

_NUM = re.compile(r"[-+]?\s*\$?\s*[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:\s*/\s*\d+)?")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def parse_number(text: str) -> Fraction | None:
    """The number at the start of text: `-$1,000.50`, `18.00`, `50%`, `7.`, `3/4`; else None.

    Commas must be thousands separators (`1,5` is not a number); a trailing `.`/`%` is dropped."""
    m = _NUM.match(text.strip())
    if m is None or len(m.group()) > 60:
        return None
    s = m.group().replace("$", "").replace(" ", "").rstrip(",")
    sign = -1 if s.count("-") % 2 else 1
    s = s.lstrip("+-")
    num, _, den = s.partition("/")
    if "," in num:
        if not _THOUSANDS.fullmatch(num):
            return None
        num = num.replace(",", "")
    num = num.rstrip(".") or "0"
    if num.count(".") > 1:
        return None
    value = Fraction(num)
    if den:
        if int(den) == 0:
            return None
        value /= int(den)
    return sign * value


def _last_number(text: str) -> Fraction | None:
    for m in reversed(list(re.finditer(r"[-$]?\d[\d,]*(?:\.\d+)?", text))):
        value = parse_number(m.group())
        if value is not None:
            return value
    return None


# ----------------------------------------------------------------------------- gsm8k / synthetic

_HASH_MARKER = re.compile(r"####([^\n]*?)(?=####|\n|$)")  # up to the next marker or line end


def _check_gsm8k(completion: str, gold: str, flexible: bool) -> tuple[float, str | None]:
    target = parse_number(gold.split("####")[-1])
    found = [m.group(1).strip() for m in _HASH_MARKER.finditer(completion)]
    if found:
        value = parse_number(found[-1])
        parsed = found[-1] if value is not None else None
    elif flexible:
        value = _last_number(completion)
        parsed = None if value is None else str(value)
    else:
        return 0.0, None
    ok = value is not None and target is not None and value == target
    return float(ok), parsed


def _check_synthetic(completion: str, gold: str, flexible: bool) -> tuple[float, str | None]:
    # exact: the first word after the marker, character for character (`042` and `42.0` are wrong)
    found = [(m.group(1).split() or [""])[0] for m in _HASH_MARKER.finditer(completion)]
    answer = _last(found)
    if not answer:
        return 0.0, None
    return float(answer == gold.strip()), answer


# ----------------------------------------------------------------------------- mathqa

# "Answer: (c)", "answer is c.", "the answer : c";
# a bare letter must not run into a word ("answer is a prime")
_LETTER_MARKER = re.compile(
    r"\banswer\b\s*(?:is\s*)?[:=]?\s*(?:\(\s*([a-e])\s*\)|\b([a-e])\b(?!\s*[\w(]))", re.IGNORECASE
)
_TEXT_MARKER = re.compile(r"\banswer\b\s*(?:is\s*)?[:=]\s*([^\n]+)", re.IGNORECASE)


def _option_value(text: str) -> str:
    """Option text in a comparable form: `Rs. 400` -> `400`, `1 / 2` -> `1/2`, `38 %` -> `38`."""
    s = text.lower().strip().rstrip(".").replace("rs .", "").replace("rs.", "").replace("%", "")
    s = re.sub(r"\s+", "", s)
    value = parse_number(s) if re.fullmatch(r"[-$\d.,/]+", s) else None
    return str(value) if value is not None else s


def _check_mathqa(completion: str, gold: str, flexible: bool) -> tuple[float, str | None]:
    m = re.match(r"\s*\(?\s*([a-eA-E])\s*\)?\s*(.*)", gold, re.DOTALL)
    if m is None:
        return 0.0, None
    gold_letter, gold_text = m.group(1).lower(), m.group(2).strip()
    letters = [(a or b).lower() for a, b in _LETTER_MARKER.findall(completion)]
    if not letters and flexible:
        letters = [x.lower() for x in re.findall(r"\(([a-eA-E])\)", completion)[-1:]]
    if letters:
        letter = _last(letters)
        return float(letter == gold_letter), letter
    # no letter: accept the option's text itself ("Answer: 625" for option "c ) 625")
    texts = [t.strip() for t in _TEXT_MARKER.findall(completion)]
    text = _option_value(texts[-1]) if texts else None
    if not text or not gold_text:
        return 0.0, None
    return float(text == _option_value(gold_text)), texts[-1]


# ----------------------------------------------------------------------------- strategyqa

_YESNO_MARKER = re.compile(r"\banswer\b\s*(?:is\s*)?[:=]?\s*\**\s*(yes|no)\b", re.IGNORECASE)
_GOLD_YESNO = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}


def _check_strategyqa(completion: str, gold: str, flexible: bool) -> tuple[float, str | None]:
    words = [w.lower() for w in _YESNO_MARKER.findall(completion)]
    if not words and flexible:
        words = [w.lower() for w in re.findall(r"\b(yes|no)\b", completion, re.IGNORECASE)[-1:]]
    answer = _last(words)
    if answer is None:
        return 0.0, None
    return float(answer == _GOLD_YESNO.get(gold.strip().lower())), answer


# ----------------------------------------------------------------------------- math500

def boxed_contents(text: str) -> list[str]:
    """Contents of every complete `\\boxed{...}` / `\\fbox{...}`, braces balanced;
    an unclosed one is dropped."""
    # one pass pairs every `{` with its `}`, so 10k unclosed boxes stay linear
    closing, stack = {}, []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            closing[stack.pop()] = i
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        end = closing.get(m.end() - 1)
        if end is not None:
            out.append(text[m.end() : end])
    return out


def _unwrap(s: str, command: str) -> str:
    r"""`\text{abc}` -> `abc` for one command name (no nested braces inside)."""
    return re.sub(r"\\" + command + r"\s*\{([^{}]*)\}", r"\1", s)


def normalize_latex(s: str) -> str:
    """Light normalisation: the forms in which equal MATH answers most often differ."""
    s = s.strip().strip("$").strip()
    s = re.sub(r"^\\text\{([^{}]*)\}$", r"\1", s)
    # `5.4 \text{ cents}` -> 5.4
    s = re.sub(r"(\d)\s*\\(?:text|mbox|mathrm)\{[a-zA-Z ]+\}$", r"\1", s)
    for command in ("text", "textbf", "mbox", "mathrm", "mathbf"):
        s = _unwrap(s, command)
    # \left( \right\} but never \rightarrow
    s = re.sub(r"\\(?:left|right)(?=[()\[\]{}|.\\])", "", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\\circ|\\degree", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"(?<!\\)\\[!,;:> ]|\\q?quad|~", "", s)  # thin spaces, but not the `\\` row break
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)  # \frac1{2}
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = re.sub(r"\\sqrt(\d+|[a-z])", r"\\sqrt{\1}", s)  # \sqrt2
    s = re.sub(r"^[a-zA-Z]=(?!.*=)", "", s)  # `x=5` -> 5 (a single assignment)
    s = re.sub(r"^\(([A-Za-z])\)$", r"\1", s)  # `(C)` -> C
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s.rstrip(".")


def _latex_number(s: str) -> Fraction | None:
    """Value of a normalised answer that is a plain number or a (signed) \\frac{a}{b}."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m:
        den = int(m.group(3))
        if den == 0 or len(s) > 60:
            return None
        return (-1 if m.group(1) else 1) * Fraction(int(m.group(2)), den)
    if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)(/\d+)?", s):
        return parse_number(s)
    return None


def latex_equal(a: str, b: str) -> bool:
    na, nb = normalize_latex(a), normalize_latex(b)
    if na == nb:
        return bool(na)
    va, vb = _latex_number(na), _latex_number(nb)
    return va is not None and va == vb


def _check_math500(completion: str, gold: str, flexible: bool) -> tuple[float, str | None]:
    answer = _last(boxed_contents(completion))
    if answer is None:
        return 0.0, None
    return float(latex_equal(answer, gold)), answer


_CHECKERS = {
    "synthetic": _check_synthetic,
    "gsm8k": _check_gsm8k,
    "mathqa": _check_mathqa,
    "strategyqa": _check_strategyqa,
    "math500": _check_math500,
}
