"""The `calculator` tool: exact arithmetic on a whitelisted Python expression syntax.

The expression is parsed with `ast` and walked node by node; nothing is ever `eval`ed. Only
number literals, `+ - * / // % **`, unary minus/plus and parentheses are allowed; a name, call,
attribute, string, comparison, lambda, comprehension... is refused with "not allowed".

Why exact: a model asks a calculator because it cannot trust its own digits, so the tool must
not introduce float error. Integers have any size, `/` gives a Fraction, and a decimal literal
such as 1.25 is read from its source text as the Fraction 5/4 (never through a float).

Bounds, so a request cannot hang or exhaust the host: the input is at most 1,000 characters,
and every intermediate result must have at most 10,000 digits. Sizes are checked BEFORE a
number is built: a literal's exponent is read from its text (1e9999999 is refused without
making 10**9999999), products by the bits of their factors, powers by exponent x digits of the
base, so 9**9**9 is refused instantly. On top, the whole evaluation has a CPU-time budget
(MAX_CPU_SECONDS of this thread's time, checked between operations), so the calculator stops
itself rather than relying on its caller's timeout (a timed-out thread cannot be killed).
"""

from __future__ import annotations

import ast
import math
import re
import time
import warnings
from decimal import Context, Decimal
from fractions import Fraction

from chatforge.errors import ChatforgeError

MAX_INPUT_CHARS = 1000
MAX_DIGITS = 10_000
_LIMIT = 10**MAX_DIGITS  # the smallest integer with too many digits
_MAX_BITS = _LIMIT.bit_length() + 4  # estimates in bits get a little slack; _check is exact
MAX_DEPTH = 500  # nested operations (a 1,000-character sum is 499 deep); its own limit, not Python's recursion limit, which torch.compile raises
MAX_CPU_SECONDS = 1.0  # this thread's CPU time for one evaluation; bounded operations take milliseconds
SHOWN_DIGITS = 15  # significant digits of the decimal rendering of a non-integer

SCHEMA = {
    "type": "object",
    "properties": {
        "expression": {
            "type": "string",
            "description": "arithmetic with + - * / // % ** and parentheses, e.g. (17 * 23 + 1) / 4",
        }
    },
    "required": ["expression"],
    "additionalProperties": False,
}
DESCRIPTION = (
    "Exact arithmetic: integers of any size, fractions and decimals, + - * / // % ** and "
    "parentheses. Returns an integer, or an exact fraction with its decimal value."
)
# The calculator as the world's SFT conversations show it: the same parameters with a two-word
# description, short enough for a 128-token context.
CALCULATOR_TOOL = {
    "type": "function",
    "function": {"name": "calculator", "description": "exact arithmetic", "parameters": SCHEMA},
}


class CalculatorError(ChatforgeError):
    """The expression is malformed, uses something not allowed, or its result is out of bounds."""


_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%"}


def evaluate(expression: str) -> Fraction:
    """The exact value of `expression` (a Fraction; an integer result has denominator 1)."""
    if not isinstance(expression, str):
        raise CalculatorError(f"the expression must be a string, got {type(expression).__name__}")
    text = expression.strip()
    if not text:
        raise CalculatorError("the expression is empty: give one such as 2 + 2")
    if len(text) > MAX_INPUT_CHARS:
        raise CalculatorError(f"the expression is {len(text)} characters; the limit is {MAX_INPUT_CHARS}")
    try:
        with warnings.catch_warnings():  # "3d" warns "invalid decimal literal" on stderr before failing
            warnings.simplefilter("error", SyntaxWarning)
            tree = ast.parse(text, mode="eval")
    except SyntaxWarning as e:
        raise CalculatorError(f"could not parse the expression ({e})") from None
    except SyntaxError as e:
        raise CalculatorError(f"could not parse the expression ({e.msg})") from None
    except (RecursionError, MemoryError, ValueError):
        raise CalculatorError("the expression is nested too deeply") from None
    deadline = time.thread_time() + MAX_CPU_SECONDS
    try:
        return _eval(tree.body, text, deadline)
    except RecursionError:
        raise CalculatorError("the expression is nested too deeply") from None


def calculate(expression: str) -> str:
    """The tool's answer: "42", or "7/3 ≈ 2.33333333333333", or "1/4 = 0.25" when the decimal is exact."""
    return format_value(evaluate(expression))


def format_value(value: Fraction) -> str:
    if value.denominator == 1:
        return _digits(value.numerator)
    fraction = f"{_digits(value.numerator)}/{_digits(value.denominator)}"
    exact = _exact_decimal(value)
    if exact is not None:
        return f"{fraction} = {exact}"
    approx = Context(prec=SHOWN_DIGITS).divide(Decimal(value.numerator), Decimal(value.denominator))
    return f"{fraction} ≈ {approx}"


# ---- the walk -------------------------------------------------------------------------------
def _eval(node: ast.AST, text: str, deadline: float, depth: int = 0) -> Fraction:
    if depth > MAX_DEPTH:
        raise CalculatorError("the expression is nested too deeply")
    if time.thread_time() > deadline:
        raise CalculatorError(
            f"the expression took more than {MAX_CPU_SECONDS:g} s of CPU time, so it is refused; simplify it"
        )
    if isinstance(node, ast.Constant):
        return _literal(node, text)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _eval(node.operand, text, deadline, depth + 1)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, _BINOPS):
        a, b = _eval(node.left, text, deadline, depth + 1), _eval(node.right, text, deadline, depth + 1)
        if isinstance(node.op, ast.Pow):
            return _power(a, b)
        return _check(_arith(type(node.op), a, b))
    raise CalculatorError(f"{_describe(node)} is not allowed: use numbers, + - * / // % ** and parentheses")


def _literal(node: ast.Constant, text: str) -> Fraction:
    v = node.value
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise CalculatorError(
            f"{_describe(node)} is not allowed: use numbers, + - * / // % ** and parentheses"
        )
    if isinstance(v, int):
        return Fraction(v)
    # a float literal: re-read its source text so 0.1 is exactly 1/10, not the nearest double
    source = ast.get_source_segment(text, node) or ""
    m = _FLOAT.fullmatch(source.replace("_", ""))
    if m is None:
        raise CalculatorError(f"could not read the number {_short(source)}")
    whole, frac, exp = m.group(1), m.group(2) or "", m.group(3) or "0"
    # value = int(whole + frac) * 10**scale: bound the scale from the text before building 10**scale
    # (the mantissa has at most MAX_INPUT_CHARS digits, so a larger |scale| is always out of bounds)
    scale, mantissa = int(exp) - len(frac), int(whole + frac)
    too_big = f"the number {_short(source)} has more than {MAX_DIGITS:,} digits, so it is refused"
    if abs(scale) > MAX_DIGITS + MAX_INPUT_CHARS:
        raise CalculatorError(too_big)
    value = Fraction(mantissa * 10**scale) if scale >= 0 else Fraction(mantissa, 10**-scale)
    if max(abs(value.numerator), value.denominator) >= _LIMIT:
        raise CalculatorError(too_big)
    return value


# a Python float literal without underscores: digits, an optional fraction, an optional exponent
_FLOAT = re.compile(r"(\d*)\.?(\d*)(?:[eE]([+-]?\d+))?")


def _arith(op: type, a: Fraction, b: Fraction) -> Fraction:
    if op is ast.Add:
        return a + b
    if op is ast.Sub:
        return a - b
    if op is ast.Mult:
        _bound(_bits(a) + _bits(b), "the product")
        return a * b
    if b == 0:
        raise CalculatorError(f"division by zero (in x {_SYMBOL[op]} 0)")
    if op is ast.Div:
        return a / b
    if op is ast.FloorDiv:
        return Fraction(a // b)
    return a % b  # Mod: same sign as b, as in Python


def _power(base: Fraction, exp: Fraction) -> Fraction:
    if exp.denominator != 1:
        return _root_power(base, exp)
    n = exp.numerator
    if base == 0:
        if n < 0:
            raise CalculatorError("division by zero (0 to a negative power)")
        return Fraction(1 if n == 0 else 0)
    if base in (1, -1):  # any exponent size is fine: the result is +-1
        return Fraction(1) if base == 1 or n % 2 == 0 else Fraction(-1)
    if n == 0:
        return Fraction(1)
    if n.bit_length() > 64:  # |base| != 0, 1 and |n| >= 2**64: far past any limit (and past a float)
        raise CalculatorError(
            f"the power would have more than 10**18 digits; the limit is {MAX_DIGITS:,}, so it is refused"
        )
    # digits of the result ~ |n| * log10 of the larger of numerator/denominator: refuse before computing
    digits = abs(n) * math.log10(max(abs(base.numerator), base.denominator))
    if digits > MAX_DIGITS + 1:
        raise CalculatorError(
            f"the power would have about {int(digits):,} digits; the limit is {MAX_DIGITS:,}, so it is refused"
        )
    return _check(base**n)


def _root_power(base: Fraction, exp: Fraction) -> Fraction:
    """base ** (p/q): exact only when base is a perfect q-th power; otherwise refused."""
    p, q = exp.numerator, exp.denominator
    if base < 0:
        raise CalculatorError("a negative number to a fractional power is not a real number here; rewrite it")
    if base == 0:
        if p < 0:
            raise CalculatorError("division by zero (0 to a negative power)")
        return Fraction(0)
    if q > _MAX_BITS:
        raise CalculatorError(f"the root of degree {_short(_digits(q))} is too large to check exactly")
    num, den = _exact_root(base.numerator, q), _exact_root(base.denominator, q)
    if num is None or den is None:
        raise CalculatorError(
            f"{_short(format_value(base))} ** ({_short(_digits(p))}/{_short(_digits(q))}) is irrational, so it has no exact value; "
            "this calculator only gives exact results"
        )
    return _power(Fraction(num, den), Fraction(p))


def _exact_root(n: int, q: int) -> int | None:
    """The integer r >= 0 with r**q == n, or None (n >= 0)."""
    if n < 2:
        return n
    r = _iroot(n, q)
    return r if r**q == n else None


def _iroot(n: int, q: int) -> int:
    """floor(n ** (1/q)) for n >= 1, by Newton's method on integers (exact for any size)."""
    if q == 1:
        return n
    x = 1 << -(-n.bit_length() // q)  # an upper bound: 2**ceil(bits/q) >= n**(1/q)
    while True:
        y = ((q - 1) * x + n // x ** (q - 1)) // q
        if y >= x:
            return x
        x = y


# ---- bounds and formatting -------------------------------------------------------------------
def _bits(v: Fraction) -> int:
    return max(v.numerator.bit_length(), v.denominator.bit_length())


def _bound(bits: int, what: str) -> None:
    if bits > _MAX_BITS:
        digits = int(bits * math.log10(2))
        raise CalculatorError(
            f"{what} would have about {digits:,} digits; the limit is {MAX_DIGITS:,}, so it is refused"
        )


def _check(v: Fraction) -> Fraction:
    """The exact bound, after the cheap estimates: numerator and denominator below 10**MAX_DIGITS."""
    if max(abs(v.numerator), v.denominator) >= _LIMIT:
        raise CalculatorError(f"the result has more than {MAX_DIGITS:,} digits, so it is refused")
    return v


def _short(text: str, keep: int = 40) -> str:
    """text, or its start and end around "..." when long, so an error message stays one short line."""
    return text if len(text) <= keep else f"{text[: keep // 2]}...{text[-keep // 2 :]}"


def _digits(n: int) -> str:
    # Decimal formats any size without Python's int->str digit limit (4,300 by default)
    return str(Decimal(n))


def _exact_decimal(v: Fraction) -> str | None:
    """The terminating decimal of v when its denominator is 2**a * 5**b (and it is short), else None."""
    d = v.denominator
    twos = (d & -d).bit_length() - 1  # trailing zero bits, without a loop over a 33,000-bit number
    d, fives = d >> twos, 0
    while d % 5 == 0 and fives <= 30:
        d, fives = d // 5, fives + 1
    places = max(twos, fives)
    if d != 1 or places > 30:
        return None
    scaled = v.numerator * 10**places // v.denominator  # exact: the denominator divides 10**places
    # _digits, not str(): str() refuses ints past 4,300 digits
    sign, digits = ("-" if scaled < 0 else ""), _digits(abs(scaled)).rjust(places + 1, "0")
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Constant):
        return f"the {type(node.value).__name__} literal {_short(repr(node.value))}"
    names = {
        ast.Name: "a name",
        ast.Call: "a function call",
        ast.Attribute: "an attribute",
        ast.Lambda: "a lambda",
        ast.Compare: "a comparison",
        ast.BoolOp: "and/or",
        ast.Subscript: "indexing",
        ast.ListComp: "a comprehension",
        ast.GeneratorExp: "a comprehension",
        ast.SetComp: "a comprehension",
        ast.DictComp: "a comprehension",
        ast.JoinedStr: "a string",
    }
    if isinstance(node, ast.BinOp):
        return f"the operator {type(node.op).__name__}"
    if isinstance(node, ast.UnaryOp):
        return f"the operator {type(node.op).__name__}"
    return names.get(type(node), f"{type(node).__name__} syntax")
