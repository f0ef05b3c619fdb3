"""data/mathqa_program.py: parse and run MathQA's `annotated_formula` programs, and print them.

A program is a nested call over numbers from the problem and named constants:
    subtract(divide(multiply(add(const_100, 31.1), const_100), subtract(const_100, 5)), const_100)
`steps` prints it bottom-up, one operation per line with its value (the `program` expert):
    100 + 31.1 = 131.1
    131.1 * 100 = 13110
    100 - 5 = 95
    13110 / 95 = 138
    138 - 100 = 38
and `infix` prints it as one formula (the `formula` expert): (100 + 31.1) * 100 / (100 - 5) - 100.

The operations are the ones in the dataset's operation_list.txt (plus `choose`, which the programs
use for `combination`); their meaning follows the MathQA authors' definitions as re-implemented in
google/trax `trax/data/tf_inputs.py` (compute_single_result), written out again here. Constants are
`const_<number>` with `_` for the decimal point (`const_0_25` = 0.25), plus `const_pi` and
`const_deg_to_rad`. An operation that fails (division by zero, overflow, complex root) makes the
whole program fail: `evaluate` returns None and the record simply gets no program trace.
"""

import math
import re
from dataclasses import dataclass


@dataclass
class Node:
    op: str | None  # None for a leaf
    value: float | None = None  # leaves: the number
    text: str = ""  # leaves: how the number is printed
    args: tuple["Node", ...] = ()


OPS = {  # name -> function over floats; arity is the function's
    "add": lambda a, b: a + b,
    "subtract": lambda a, b: a - b,
    "multiply": lambda a, b: a * b,
    "divide": lambda a, b: a / b,
    "power": lambda a, b: a**b,
    "log": lambda a: math.log(a),
    "sqrt": lambda a: math.sqrt(a),
    "factorial": lambda a: (float(math.factorial(int(a))) if 0 <= a <= 170 and a == int(a)
                            else math.nan),
    "gcd": lambda a, b: float(math.gcd(int(a), int(b))),
    "lcm": lambda a, b: float(math.lcm(int(a), int(b))),
    "max": lambda a, b: max(a, b),
    "min": lambda a, b: min(a, b),
    "reminder": lambda a, b: a % b,
    "negate": lambda a: -a,
    "inverse": lambda a: 1 / a,
    "round": lambda a: float(round(a)),
    "floor": lambda a: float(math.floor(a)),
    "sine": lambda a: math.sin(a),
    "cosine": lambda a: math.cos(a),
    "tangent": lambda a: math.tan(a),
    "radians_to_degree": lambda a: a * 180 / math.pi,
    "degree_to_radians": lambda a: a * math.pi / 180,
    "sum_consecutive_number": lambda a: a * (a + 1) / 2,
    "circle_area": lambda r: math.pi * r**2,
    "circumface": lambda r: 2 * math.pi * r,
    "circle_arc": lambda angle, r: angle / 360 * 2 * math.pi * r,
    "semi_circle_perimiter": lambda r: math.pi * r + 2 * r,
    "circle_sector_area": lambda r, angle: angle / 360 * math.pi * r**2,
    "rectangle_perimeter": lambda a, b: 2 * (a + b),
    "rectangle_area": lambda a, b: a * b,
    "square_perimeter": lambda a: 4 * a,
    "square_area": lambda a: a**2,
    "trapezium_area": lambda h, a, b: h * (a + b) / 2,
    "rhombus_perimeter": lambda a: 4 * a,
    "rhombus_area": lambda d1, d2: d1 * d2 / 2,
    "quadrilateral_area": lambda d, h1, h2: d * (h1 + h2) / 2,
    "volume_cone": lambda r, h: math.pi * r**2 * h / 3,
    "volume_rectangular_prism": lambda a, b, c: a * b * c,
    "volume_cube": lambda a: a**3,
    "volume_sphere": lambda r: 4 / 3 * math.pi * r**3,
    "volume_cylinder": lambda r, h: math.pi * r**2 * h,
    "surface_cone": lambda r, slant: math.pi * r * (r + slant),
    "surface_cylinder": lambda r, h: 2 * math.pi * r * (r + h),
    "surface_cube": lambda a: 6 * a**2,
    "surface_rectangular_prism": lambda a, b, c: 2 * (a * b + a * c + b * c),
    "surface_sphere": lambda r: 4 * math.pi * r**2,
    "side_by_diagonal": lambda d: d / math.sqrt(2),
    "cube_edge_by_volume": lambda v: v ** (1 / 3),
    "diagonal": lambda a, b: math.sqrt(a**2 + b**2),
    "square_edge_by_perimeter": lambda p: p / 4,
    "square_edge_by_area": lambda s: math.sqrt(s),
    "triangle_perimeter": lambda a, b, c: a + b + c,
    "triangle_area": lambda b, h: b * h / 2,
    "triangle_area_three_edges": lambda a, b, c: _heron(a, b, c),
    "union_prob": lambda a, b, both: a + b - both,
    "negate_prob": lambda p: 1 - p,
    "combination": lambda n, k: float(math.comb(int(n), int(k))),
    "choose": lambda n, k: float(math.comb(int(n), int(k))),
    "permutation": lambda n, k: float(math.perm(int(n), int(k))),
    "count_interval": lambda a, b: a - b + 1,
    "percent": lambda a, b: a / 100 * b,
    "p_after_gain": lambda pct, a: (1 + pct / 100) * a,
    "p_after_loss": lambda pct, a: (1 - pct / 100) * a,
    "price_after_gain": lambda pct, a: (1 + pct / 100) * a,
    "price_after_loss": lambda pct, a: (1 - pct / 100) * a,
    "from_percent": lambda a: a / 100,
    "to_percent": lambda a: a * 100,
    "gain_percent": lambda a: 100 + a,
    "loss_percent": lambda a: 100 - a,
    "negate_percent": lambda a: 100 - a,
    "original_price_before_gain": lambda pct, a: a * 100 / (100 + pct),
    "original_price_before_loss": lambda pct, a: a * 100 / (100 - pct),
    "speed": lambda distance, time: distance / time,
    # work problems give either times or rates; min(x, 1/x) reads both as a rate (as trax does)
    "combined_work": lambda a, b: 1 / (min(a, 1 / a) + min(b, 1 / b)),
    "find_work": lambda a, b: 1 / abs(min(a, 1 / a) - min(b, 1 / b)),
    "speed_ratio_steel_to_stream": lambda down, up: (down + up) / (down - up),
    "speed_in_still_water": lambda down, up: (down + up) / 2,
    "stream_speed": lambda down, up: (down - up) / 2,
}
INFIX = {"add": ("+", 1), "subtract": ("-", 1), "multiply": ("*", 2), "divide": ("/", 2),
         "power": ("^", 3)}


def _heron(a: float, b: float, c: float) -> float:
    s = (a + b + c) / 2
    return math.sqrt(s * (s - a) * (s - b) * (s - c))


def constant(name: str) -> float | None:
    """`const_100` -> 100, `const_0_25` -> 0.25, `const_pi` -> pi, `const_deg_to_rad` -> pi/180."""
    body = name.lower().removeprefix("const_")
    if body == "pi":
        return math.pi
    if body == "deg_to_rad":
        return math.pi / 180
    if re.fullmatch(r"\d+(?:[._]\d+)?", body):
        return float(body.replace("_", "."))
    return None


_TOKEN = re.compile(r"\s*([A-Za-z_][\w.]*\s*\(|[^\s(),]+|[(),])")


def parse_program(formula: str) -> Node | None:
    """Parse one nested call into a tree; None if it is not a well-formed program over known ops."""
    tokens = [t.replace(" ", "") for t in _TOKEN.findall(formula or "")]
    pos = 0

    def parse() -> Node | None:
        nonlocal pos
        if pos >= len(tokens):
            return None
        tok = tokens[pos]
        pos += 1
        if tok.endswith("("):
            args = []
            while pos < len(tokens) and tokens[pos] != ")":
                arg = parse()
                if arg is None:
                    return None
                args.append(arg)
                if pos < len(tokens) and tokens[pos] == ",":
                    pos += 1
            pos += 1  # the closing ")"
            op = tok[:-1]
            if op not in OPS or OPS[op].__code__.co_argcount != len(args):
                return None
            return Node(op, args=tuple(args))
        value = constant(tok) if tok.lower().startswith("const_") else _number(tok)
        return None if value is None else Node(None, value, fmt(value))

    tree = parse()
    return tree if tree is not None and pos == len(tokens) else None


def _number(tok: str) -> float | None:
    return float(tok) if re.fullmatch(r"-?\d+(?:\.\d+)?", tok) else None


def evaluate(node: Node) -> float | None:
    """The program's value, or None if any step fails or is not a finite real number."""
    if node.op is None:
        return node.value
    args = [evaluate(a) for a in node.args]
    if any(a is None for a in args):
        return None
    if node.op == "power" and abs(args[1]) > 64:  # keeps exact-looking steps and bounded numbers
        return None
    try:
        value = OPS[node.op](*args)
    except (ArithmeticError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def fmt(value: float) -> str:
    """Print a value as a person would: 13110, 131.1, 0.3333, 1.2e-05."""
    if value == round(value) and abs(value) < 1e15:
        return str(int(round(value)))
    if abs(value) >= 0.01:
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return f"{value:.4g}"


def steps(tree: Node) -> list[str]:
    """Post-order lines `a op b = value` (or `name(a, b) = value`) with values substituted."""
    lines: list[str] = []

    def walk(node: Node) -> str:
        if node.op is None:
            return node.text
        args = [walk(a) for a in node.args]
        if node.op in INFIX:
            expr = f" {INFIX[node.op][0]} ".join(args)
        else:
            expr = f"{node.op}({', '.join(args)})"
        value = fmt(evaluate(node))
        lines.append(f"{expr} = {value}")
        return value

    walk(tree)
    return lines


def infix(node: Node, parent: int = 0) -> str:
    """One formula with the fewest parentheses: an operand is bracketed when its operator binds
    less tightly than its parent's, or equally on the right of - and / (and on the left of ^)."""
    if node.op is None:
        return node.text if not node.text.startswith("-") or parent == 0 else f"({node.text})"
    if node.op not in INFIX:
        return f"{node.op}({', '.join(infix(a) for a in node.args)})"
    symbol, prec = INFIX[node.op]
    left = infix(node.args[0], prec + (symbol == "^"))
    rhs = infix(node.args[1], prec + (symbol in "-/"))
    text = f"{left} {symbol} {rhs}"
    return f"({text})" if prec < parent else text
