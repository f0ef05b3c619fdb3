"""data/synthetic.py: the embedded default task, multi-operand addition, sized for a tiny byte-level
model trained from scratch on a CPU in minutes.

    question: 47+385+9+126=?        answer: 567

Why addition: the answer is exact, any amount of data comes from a seed, and one knob moves the task
from trivial to out of reach of a small model, so the reward sparsity that MEML-GRPO attacks (a
group of samples with no correct answer teaches GRPO nothing) is real at the hard end.

**Difficulty** d = 1, 2, 3, ...: `2 + (d-1)//2` terms of up to `1 + d//2` digits (each term uniform
in 1 .. 10^digits - 1): d1 `3+5`, d2 `47+38`, d3 `47+38+91`, d4 three 3-digit terms, d5 four, d6
four 4-digit terms, d8 five 5-digit terms. `difficulty=(lo, hi)` draws each question's level
uniformly.

**Experts**: three ways to write the same sum, chosen because a transformer finds them differently
hard, so on a given question one expert can succeed where another fails:
- `chain`: a running total, left to right (`47+385=432` / `432+9=441` / `441+126=567`). Few lines,
  but each line is a full multi-digit addition written most-significant digit first, where every
  digit depends on carries the model has not written yet. Good on few, short terms; fails first as d
  grows.
- `columns`: schoolbook addition, one line per digit column from the ones, the carry first
  (`7+5+9+6=27` / `c2+4+8+2=16` / `c1+3+1=5`); the answer is the last line's sum followed by the
  other lines' last digits, bottom-up. Longest trace, but every step is a sum of single digits:
  the most robust on many terms and digits.
- `reverse`: the answer's digits least-significant first, then flipped (`rev 765` / `#### 567`).
  Shortest trace; writing the ones digit first means each digit needs only carries already produced
  (the trick that makes addition learnable for small transformers), but each digit still adds a
  whole column in one step: between the other two.
All end with `#### <sum>`, which verify.py compares exactly. Questions stay under 40 bytes and
traces under 150 bytes at d <= 8, since the tokenizer spends one token per byte.

**Calibration** (our run: the `tiny` preset, 0.8M params, trained from scratch by MEF on d1-d2 with
all three experts, AdamW lr 1e-3, 2500 steps of 32 examples, 10 minutes on 2 shared CPU cores; then
16 test questions per level, 8 samples each at T=1; share of samples correct, [share of groups with
none]):
    d1: chain 0.87 [0.12], columns 0.91 [0.00], reverse 0.89 [0.00]   learnable
    d2: chain 0.15 [0.38], columns 0.84 [0.00], reverse 0.60 [0.19]   the experts differ
    d3: 0.00 [1.00] for all three                                      sparse
So `SFT_DIFFICULTY` = (1, 2) and `RL_DIFFICULTY` = (2, 3): RL sees groups that some expert can solve
and groups nobody can, and an expert that fails where another succeeds (chain vs columns at d2),
which is what MEML-GRPO's inter-expert learning is for. The default mix of `load` is (1, 3).

**Testbeds** (`testbed=`, train.py `--testbed`): three versions of the task from this one generator,
to tell when MEML-GRPO's mechanism (experts that solve DIFFERENT questions) has anything to work
with:
- `nested` (the default, everything above): three formats of one algorithm on one difficulty axis;
  the experts rank (columns > reverse > chain) more than they complement each other.
- `complementary`: two question shapes that suit different algorithms, half and half. `many`: 4 + 2d
  one-digit terms (`3+5+7+2+9+4=?`), where chain's running total is a chain of small additions and
  columns/reverse must add every digit of the one column in a single step; `long`: two terms of d
  digits each, leading digit non-zero (`47+38=?`), where columns adds one digit column per line and
  chain must write a whole multi-digit sum at once. Every expert is trained on the same questions:
  the difference comes from the algorithms, not the data. Sized by measurement
  (docs/when_meml_helps.md): three-digit pairs were out of reach of every expert, and with 5-6 terms
  columns still summed one column in one line well enough to lead on both shapes. chain's trace for
  8 terms is ~63 tokens: train.py gives this testbed 64 new tokens (48 elsewhere).
- `placebo`: the nested questions, three expert names (`alpha`, `beta`, `gamma`) and ONE trace
  format (columns) for all of them. What MEML gains here over plain GRPO is not the mechanism the
  paper claims.
- `disjoint`: the positive control, where the premise holds by construction of the DATA. Two shapes,
  half and half: `many` = 3 + d one-digit terms (5 at the RL level: shorter than complementary's, so
  that chain learns it) and `long` = two d-digit terms; two experts, `chain` (owns `many`) and
  `columns` (owns `long`). MEF sees an expert's trace only on its own shape; the other shape's trace
  is kept with probability `sft_cross` p, decided by a stable hash of the question id
  (`cross_kept`), so at p = 0 each expert can learn only its half and at p = 1 this is an ordinary
  two-expert MoE-SFT. RL, the buffer and evaluation see every trace of every question.
- `disjoint_same`: the same, free of the algorithm confound: ONE trace format (columns) under two
  names, `alpha` (owns `many`) and `beta` (owns `long`): at p = 0 the names split the questions, at
  p = 1 a two-name placebo.

**Splits** are disjoint by construction: a question belongs to `test` if the CRC32 of its text is
0 mod 10, to `val` (choices such as the lr or the deployed prompt are made there, never on test)
if it is 5 mod 10, else to `train`, so no seed, size or difficulty can leak a held-out question
into training.
Questions may repeat within a split (they are i.i.d. draws; at d=1 there are only 81 questions).
Generation is deterministic for (split, n, seed, difficulty).
"""

import random
import zlib

from .common import Expert, Record, UserError

SPLITS = ("train", "val", "test")
TESTBEDS = ("nested", "complementary", "placebo", "disjoint", "disjoint_same")
DISJOINT = ("disjoint", "disjoint_same")
SFT_DIFFICULTY = (1, 2)  # see Calibration above
RL_DIFFICULTY = (2, 3)
DEFAULT_N = {"train": 4000, "val": 400, "test": 400}

# One word on purpose: the tiny tokenizer spends a token per byte, and every prompt byte costs
# compute in every SFT and RL row ("Add: running total." was 19 of a 39-token prompt). The prompt
# names a style; the expert's traces are what teach it.
EXPERTS = [
    Expert("chain", "chain", description="running total, one addition per line"),
    Expert("columns", "columns", description="schoolbook column addition with carries"),
    Expert("reverse", "reverse",
           description="answer digits least-significant first, then reversed"),
]
PLACEBO_EXPERTS = [Expert(name, name, description="the columns trace, under another name")
                   for name in ("alpha", "beta", "gamma")]
# disjoint testbeds: the expert that owns each shape (at sft_cross 0 its MEF traces cover only it)
OWNERS = {"disjoint": {"many": "chain", "long": "columns"},
          "disjoint_same": {"many": "alpha", "long": "beta"}}


def experts(testbed: str = "nested") -> list:
    check_testbed(testbed)
    if testbed in DISJOINT:  # in the order of OWNERS: the owner of `many`, then of `long`
        return [next(e for e in EXPERTS + PLACEBO_EXPERTS[:2] if e.name == name)
                for name in OWNERS[testbed].values()]
    return PLACEBO_EXPERTS if testbed == "placebo" else EXPERTS


def check_testbed(testbed: str):
    if testbed not in TESTBEDS:
        raise UserError(f"unknown synthetic testbed {testbed!r}; known: {', '.join(TESTBEDS)}")


def shape(difficulty: int) -> tuple[int, int]:
    """(number of terms, maximum digits per term) for a difficulty level >= 1."""
    if difficulty < 1:
        raise UserError(f"difficulty must be >= 1, got {difficulty}")
    return 2 + (difficulty - 1) // 2, 1 + difficulty // 2


def split_of(question: str) -> str:
    h = zlib.crc32(question.encode()) % 10
    return "test" if h == 0 else "val" if h == 5 else "train"


def cross_kept(question_id: str, p: float) -> bool:
    """Does MEF keep the trace of a non-owner expert on this question? A stable hash of the id,
    uniform in [0, 1), below p: the same decision in every run, and a question kept at p is kept at
    every larger p."""
    return zlib.crc32(f"{question_id}/cross".encode()) / 2**32 < p


def load(split: str, data_dir: str | None = None, n: int | None = None, seed: int = 0,
         difficulty: int | tuple[int, int] = (1, 3), testbed: str = "nested",
         sft_cross: float | None = None) -> list[Record]:
    """n questions of `split`; data_dir is ignored (nothing is read from disk). sft_cross (disjoint
    testbeds, MEF only): keep a non-owner expert's trace with this probability (cross_kept); None
    keeps every trace."""
    if split not in SPLITS:
        raise ValueError(f"synthetic has splits {SPLITS}, not {split!r}")
    check_testbed(testbed)
    n = DEFAULT_N[split] if n is None else n
    lo, hi = (difficulty, difficulty) if isinstance(difficulty, int) else difficulty
    shape(lo), shape(hi)  # validates the range
    # str seeds are hashed with sha512: stable across runs; nested draws the stream it always drew,
    # and so does placebo: the nested questions themselves
    if sft_cross is not None and not (testbed in DISJOINT and 0.0 <= sft_cross <= 1.0):
        raise UserError(f"sft_cross {sft_cross} needs a disjoint testbed ({', '.join(DISJOINT)}) "
                        "and 0 <= p <= 1")
    rng = random.Random(f"synthetic/{split}/{seed}"
                        + {"complementary": "/complementary", "disjoint": "/disjoint",
                           "disjoint_same": "/disjoint"}.get(testbed, ""))
    records = []
    while len(records) < n:
        level = rng.randint(lo, hi)
        kind = rng.choice(("many", "long")) if testbed not in ("nested", "placebo") else "nested"
        terms = make_terms(rng, level, kind, few=testbed in DISJOINT)
        question = "+".join(map(str, terms)) + "=?"
        if split_of(question) != split:
            continue
        answer = str(sum(terms))
        rid = f"synthetic-{split}-{seed}-{len(records)}"
        if testbed in ("placebo", "disjoint_same"):
            traces = {e.name: columns_trace(terms) for e in experts(testbed)}
        else:
            traces = {"chain": chain_trace(terms), "columns": columns_trace(terms),
                      "reverse": reverse_trace(terms)}
            traces = {e.name: traces[e.name] for e in experts(testbed)}
        if sft_cross is not None:  # a disjoint MEF: the owner's trace, others with probability p
            traces = {name: t for name, t in traces.items()
                      if name == OWNERS[testbed][kind] or cross_kept(rid, sft_cross)}
        meta = {"difficulty": level, "terms": terms, "shape": kind}
        if testbed in DISJOINT:  # whose MEF traces cover this shape (eval.py's unseen counts)
            meta["owner"] = OWNERS[testbed][kind]
        records.append(Record(rid, question, answer, traces, meta))
    return records


def make_terms(rng: random.Random, difficulty: int, kind: str = "nested",
               few: bool = False) -> list[int]:
    """nested: shape(difficulty); `many` = 4 + 2d one-digit terms (3 + d with few: the disjoint
    testbeds), `long` = two d-digit terms."""
    if kind == "many":
        return [rng.randint(1, 9) for _ in range(3 + difficulty if few else 4 + 2 * difficulty)]
    if kind == "long":
        return [rng.randint(10**(difficulty - 1), 10**difficulty - 1) for _ in range(2)]
    count, digits = shape(difficulty)
    return [rng.randint(1, 10**digits - 1) for _ in range(count)]


def chain_trace(terms: list[int]) -> str:
    lines, total = [], terms[0]
    for t in terms[1:]:
        lines.append(f"{total}+{t}={total + t}")
        total += t
    return "\n".join(lines) + f"\n#### {total}"


def columns_trace(terms: list[int]) -> str:
    """One line per column, ones first: `c<carry>+` (when the carry is not 0), then that column's
    digits of the terms long enough to have one, `=` the column sum."""
    lines, carry, col = [], 0, 0
    width = max(len(str(t)) for t in terms)
    while col < width:
        digits = [str(t)[::-1][col] for t in terms if len(str(t)) > col]
        total = carry + sum(map(int, digits))
        lines.append(("c" + str(carry) + "+" if carry else "") + "+".join(digits) + f"={total}")
        carry, col = total // 10, col + 1
    return "\n".join(lines) + f"\n#### {sum(terms)}"


def reverse_trace(terms: list[int]) -> str:
    total = str(sum(terms))
    return f"rev {total[::-1]}\n#### {total}"
