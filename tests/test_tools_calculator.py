"""The calculator: exact against Python on random expressions, bounded, and closed to everything but arithmetic."""

import random
import time
from fractions import Fraction

import pytest

from chatforge.tools.calculator import MAX_DIGITS, CalculatorError, calculate, evaluate
from chatforge.tools.registry import ToolRegistry


def random_expression(rng: random.Random, depth: int) -> tuple[str, Fraction, bool]:
    """(source, exact value computed with Fractions, whether Python's int arithmetic gives it too)."""
    if depth == 0 or rng.random() < 0.25:
        kind = rng.choice(["small", "big", "decimal"])
        if kind == "small":
            v = rng.randint(-30, 30)
            return (f"({v})" if v < 0 else str(v)), Fraction(v), True
        if kind == "big":
            v = rng.randint(10**15, 10**40) * rng.choice([1, -1])
            return (f"({v})" if v < 0 else str(v)), Fraction(v), True
        s = f"{rng.randint(0, 999)}.{rng.randint(0, 999):03d}"
        return s, Fraction(s), False
    op = rng.choice(["+", "-", "*", "/", "//", "%", "**"])
    if op == "**":  # a small base and exponent, so results stay inside the digit limit
        base, exp = rng.randint(-12, 12), rng.randint(-4, 6)
        if base == 0 and exp < 0:
            exp = -exp
        src = f"({base})**({exp})" if base < 0 else f"{base}**({exp})"
        return f"({src})", Fraction(base) ** exp, exp >= 0
    a_src, a, a_int = random_expression(rng, depth - 1)
    b_src, b, b_int = random_expression(rng, depth - 1)
    if op in ("/", "//", "%") and b == 0:
        b_src, b = f"({b_src} + 1)", b + 1
    value = {
        "+": lambda: a + b,
        "-": lambda: a - b,
        "*": lambda: a * b,
        "/": lambda: a / b,
        "//": lambda: Fraction(a // b),
        "%": lambda: a % b,
    }[op]()
    return f"({a_src} {op} {b_src})", value, a_int and b_int and op != "/"


def test_random_expressions_are_exact():
    rng = random.Random(1234)
    n_int = n_frac = 0
    for _ in range(600):
        src, expected, int_only = random_expression(rng, 4)
        got = evaluate(src)
        assert got == expected, src
        if int_only:  # Python's own integer arithmetic agrees, // and % of negatives included
            assert got == eval(src), src
            n_int += 1
        text = calculate(src)
        if expected.denominator == 1:
            assert text == str(expected.numerator)
        else:
            n_frac += 1
            assert text.split(" ")[0] == f"{expected.numerator}/{expected.denominator}"
            approx = float(text.split(" ")[2])  # the decimal rendering is right to its digits
            assert approx == pytest.approx(float(expected), rel=1e-13)
    assert n_int > 100 and n_frac > 100  # both kinds really were drawn


@pytest.mark.parametrize(
    "expr, text",
    [
        ("7/3", "7/3 ≈ 2.33333333333333"),
        ("1/4", "1/4 = 0.25"),
        ("0.1 + 0.2", "3/10 = 0.3"),  # decimals are read exactly, not as floats
        ("-1.5 * 2", "-3"),
        ("1e-5", "1/100000 = 0.00001"),
        ("2**100", str(2**100)),
        ("2**-3", "1/8 = 0.125"),
        ("(-2)**3", "-8"),
        ("-7 // 2", "-4"),
        ("-7 % 3", "2"),
        ("4**0.5", "2"),  # a perfect root is exact
        ("(8/27)**(2/3)", "4/9 ≈ 0.444444444444444"),
        ("(-1)**(10**100)", "1"),
        ("0**0", "1"),
        ("1_000 + 1", "1001"),
        ("  ((2)) ", "2"),
    ],
)
def test_known_results(expr, text):
    assert calculate(expr) == text


@pytest.mark.parametrize(
    "expr, message",
    [
        ("1/0", "division by zero"),
        ("5 % (3 - 3)", "division by zero"),
        ("7 // 0.0", "division by zero"),
        ("0**-1", "division by zero"),
        ("9**9**9", "would have about 369,693,099 digits"),
        ("2**(10**100)", "digits; the limit is 10,000"),
        ("10**10000", f"more than {MAX_DIGITS:,} digits"),
        ("(10**5000) * (10**5000)", f"more than {MAX_DIGITS:,} digits"),
        ("2**0.5", "irrational"),
        ("(-8)**(1/3)", "negative number to a fractional power"),
        ("", "empty"),
        ("2 +", "could not parse"),
        ("(1", "could not parse"),
        ("1 2", "could not parse"),
        ("x + 1", "a name is not allowed"),
        ("__import__('os').system('true')", "a function call is not allowed"),
        ("(1).real", "an attribute is not allowed"),
        ("'ab' * 3", "str literal 'ab' is not allowed"),
        ("lambda: 1", "a lambda is not allowed"),
        ("[i for i in range(3)]", "a comprehension is not allowed"),
        ("1 < 2", "a comparison is not allowed"),
        ("1 and 2", "and/or is not allowed"),
        ("True + 1", "bool literal True is not allowed"),
        ("2j", "complex literal 2j is not allowed"),
        ("(y := 3)", "NamedExpr syntax is not allowed"),
        ("[1][0]", "indexing is not allowed"),
        ("~5", "the operator Invert is not allowed"),
        ("1 << 5", "the operator LShift is not allowed"),
        ("1 + " * 400 + "1", "limit is 1000"),
        ("(" * 250 + "1" + ")" * 250, "too many nested parentheses"),
        ("-" * 999 + "1", "nested too deeply"),
        # literals are bounded from their text, before 10**exponent is built (minutes before)
        ("1e9999999", "the number 1e9999999 has more than 10,000 digits"),
        ("1e99999", "the number 1e99999 has more than 10,000 digits"),  # returned 100,001 digits before
        ("1e-99999", "the number 1e-99999 has more than 10,000 digits"),
        ("1e10000", "the number 1e10000 has more than 10,000 digits"),
        ("1.5e1" + "0" * 900, "has more than 10,000 digits"),
        # exponents too big for a float, and numbers too long for str() in messages (tracebacks before)
        ("(10**5000)**(10**5000)", "more than 10**18 digits"),
        ("2**(1/10**5000)", "the root of degree 10000000000000000000...00000000000000000000 is too large"),
        ("(10**9999)**(1/2)", "10000000000000000000...00000000000000000000 ** (1/2) is irrational"),
    ],
)
def test_refused(expr, message):
    t0 = time.perf_counter()
    with pytest.raises(
        CalculatorError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")
    ) as refusal:
        calculate(expr)
    assert time.perf_counter() - t0 < 1  # decided before any big computation (which would take hours)
    assert "\n" not in str(refusal.value) and len(str(refusal.value)) < 200  # one short line


def test_limit_edges():
    assert calculate("10**9999") == "1" + "0" * 9999  # exactly 10,000 digits is allowed
    assert len(calculate("2**33000")) == 9934  # floor(33000 * log10(2)) + 1 digits
    text = calculate("3**(-20000)")  # a 9,543-digit denominator is fine, and so is its decimal
    assert text.startswith("1/") and len(text.split(" ")[0]) == 2 + 9543 and text.endswith("E-9543")
    with pytest.raises(CalculatorError, match="digits"):
        calculate("3**(-21000)")
    assert calculate("+".join(["1"] * 500)) == "500"  # long (but not deep) input is fine
    assert calculate("1e9999") == "1" + "0" * 9999 and calculate("0.0001e10003") == "1" + "0" * 9999
    assert calculate("1_0.5e1_0") == "105000000000"
    # a terminating decimal past 4,300 digits (str() refuses those: a ValueError before)
    assert calculate("10**5000 + 1/4") == f"4{'0' * 4999}1/4 = 1{'0' * 5000}.25"
    # its denominator's 33,000 twos are not counted one by one
    assert calculate("2**-33000").endswith("E-9934")


def test_as_a_tool():
    reg = ToolRegistry()
    from chatforge.tools.calculator import DESCRIPTION, SCHEMA

    reg.add(calculate, SCHEMA, name="calculator", description=DESCRIPTION)
    assert reg.call("calculator", '{"expression": "2**64"}').content == "18446744073709551616"
    res = reg.call("calculator", {"expression": "1/0"})
    assert res.error and res.content == "error: division by zero (in x / 0)"
    res = reg.call("calculator", {"expression": 5})
    assert res.error and "arguments.expression must be string, got integer" in res.content


def test_cpu_budget(monkeypatch):
    """The calculator stops itself between operations once its CPU budget is spent (a caller's timeout
    cannot stop a thread): with a budget of a nanosecond, the first big operation uses it up."""
    monkeypatch.setattr("chatforge.tools.calculator.MAX_CPU_SECONDS", 1e-9)
    with pytest.raises(CalculatorError, match="took more than 1e-09 s of CPU time"):
        calculate("(3**20000 + 1) % (7**11000 + 3) + 1")


def test_heavy_expressions_stay_fast():
    """The most expensive operations the bounds allow, repeated to the input limit, take well under a second."""
    x, y = "(3**20000+1)/(7**11000+3)", "(7**11000+5)/(3**20000-1)"
    for expr in ["+".join([f"({x})%({y})"] * 17), "%".join([x, y] * 19)]:
        assert len(expr) <= 1000
        t0 = time.perf_counter()
        try:
            calculate(expr)
        except CalculatorError as e:
            assert "digits" in str(e)  # refused for size, not for syntax
        assert time.perf_counter() - t0 < 1


def test_a_malformed_literal_is_refused_without_a_warning_on_stderr(capfd):
    # "3d" made Python print "SyntaxWarning: invalid decimal literal" to stderr mid-run
    for text in ("3d + 4", "12if 3"):
        with pytest.raises(CalculatorError, match="could not parse"):
            evaluate(text)
    assert "SyntaxWarning" not in capfd.readouterr().err
