"""Generator of school-level arithmetic and algebra question/answer pairs in the style of the Pile's
`DM Mathematics` domain (DeepMind's mathematics dataset): each question on one line, its answer on
the next. Every answer is computed, not looked up, and the output is a pure function of the seed.
"""
from __future__ import annotations

import math
import random
from fractions import Fraction


def _poly(coeffs: list[int], var: str) -> str:
    """coeffs[k] is the coefficient of var**k; rendered highest power first, e.g. '3*x**2 - x + 4'."""
    terms = []
    for power in range(len(coeffs) - 1, -1, -1):
        c = coeffs[power]
        if c == 0:
            continue
        magnitude = abs(c)
        if power == 0:
            body = str(magnitude)
        else:
            base = var if power == 1 else f"{var}**{power}"
            body = base if magnitude == 1 else f"{magnitude}*{base}"
        sign = "-" if c < 0 else "+"
        terms.append((sign, body))
    if not terms:
        return "0"
    first_sign, first_body = terms[0]
    text = ("-" if first_sign == "-" else "") + first_body
    for sign, body in terms[1:]:
        text += f" {sign} {body}"
    return text


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def add_sub(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(-999, 999), rng.randint(-999, 999)
    form = rng.randrange(3)
    if form == 0:
        return f"What is {a} + {b}?", str(a + b)
    if form == 1:
        return f"Calculate {a} - {b}.", str(a - b)
    return f"Sum {a} and {b}.", str(a + b)


def mul_div(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(-99, 99), rng.choice([n for n in range(-40, 41) if n != 0])
    if rng.random() < 0.5:
        return f"Multiply {a} and {b}.", str(a * b)
    return f"Divide {a * b} by {b}.", str(a)


def linear_equation(rng: random.Random) -> tuple[str, str]:
    var = rng.choice("abcdfghjkmnpqrstuvwxyz")
    x = rng.randint(-20, 20)
    k = rng.choice([n for n in range(-12, 13) if n != 0])
    c = rng.randint(-60, 60)
    rhs = k * x + c
    return f"Solve {_poly([c, k], var)} = {rhs} for {var}.", str(x)


def linear_system(rng: random.Random) -> tuple[str, str]:
    u, v = rng.sample("abcdfghjkmnpqrstuvwxyz", 2)
    x, y = rng.randint(-9, 9), rng.randint(-9, 9)
    while True:
        a, b, c, d = (rng.choice([n for n in range(-6, 7) if n != 0]) for _ in range(4))
        if a * d - b * c != 0:
            break
    first = f"{_poly([0, a], u)} + {_poly([0, b], v)}".replace("+ -", "- ")
    second = f"{_poly([0, c], u)} + {_poly([0, d], v)}".replace("+ -", "- ")
    return f"Solve {first} = {a * x + b * y}, {second} = {c * x + d * y} for {u}.", str(x)


def remainder(rng: random.Random) -> tuple[str, str]:
    n, d = rng.randint(20, 5000), rng.randint(2, 60)
    return f"What is the remainder when {n} is divided by {d}?", str(n % d)


def gcd(rng: random.Random) -> tuple[str, str]:
    g = rng.randint(1, 40)
    a, b = g * rng.randint(1, 60), g * rng.randint(1, 60)
    return f"Calculate the greatest common divisor of {a} and {b}.", str(math.gcd(a, b))


def is_prime(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(2, 20000)
    return f"Is {n} a prime number?", str(_is_prime(n))


def evaluate_polynomial(rng: random.Random) -> tuple[str, str]:
    name, var = rng.choice("fghjklmnpqrstuvw"), rng.choice("abcdxyz")
    coeffs = [rng.randint(-9, 9) for _ in range(rng.randint(2, 4))]
    coeffs[-1] = coeffs[-1] or 1
    x = rng.randint(-6, 6)
    value = sum(c * x**p for p, c in enumerate(coeffs))
    return f"Let {name}({var}) = {_poly(coeffs, var)}. What is {name}({x})?", str(value)


def derivative(rng: random.Random) -> tuple[str, str]:
    var = rng.choice("abcdfghjklmnpqrstuvwxyz")
    coeffs = [rng.randint(-30, 30) for _ in range(rng.randint(2, 5))]
    coeffs[-1] = coeffs[-1] or 2
    derived = [p * c for p, c in enumerate(coeffs)][1:]
    return f"What is the derivative of {_poly(coeffs, var)} wrt {var}?", _poly(derived, var)


def sort_numbers(rng: random.Random) -> tuple[str, str]:
    values = rng.sample(range(-100, 101), rng.randint(3, 6))
    if rng.random() < 0.5:
        return f"Sort {', '.join(map(str, values))} in ascending order.", ", ".join(map(str, sorted(values)))
    return f"Sort {', '.join(map(str, values))} in decreasing order.", ", ".join(map(str, sorted(values, reverse=True)))


def simplify_fraction(rng: random.Random) -> tuple[str, str]:
    num, den = rng.randint(1, 99), rng.randint(2, 99)
    k = rng.randint(2, 12)
    f = Fraction(num, den)
    answer = str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"
    return f"Reduce {num * k}/{den * k} to lowest terms.", answer


def unit_conversion(rng: random.Random) -> tuple[str, str]:
    hours = Fraction(rng.randint(1, 80), rng.choice([1, 2, 4]))
    minutes = hours * 60
    return f"How many minutes are there in {float(hours):g} hours?", str(int(minutes))


GENERATORS = [add_sub, mul_div, linear_equation, linear_system, remainder, gcd, is_prime,
              evaluate_polynomial, derivative, sort_numbers, simplify_fraction, unit_conversion]


def question_answer_pairs(rng: random.Random, count: int) -> list[tuple[str, str]]:
    return [rng.choice(GENERATORS)(rng) for _ in range(count)]


def dm_math_documents(num_documents: int, pairs_per_document: int = 40, seed: int = 0) -> list[str]:
    """Documents of `pairs_per_document` question/answer pairs, one per line, as in the Pile."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_documents):
        pairs = question_answer_pairs(rng, pairs_per_document)
        docs.append("".join(f"{q}\n{a}\n" for q, a in pairs))
    return docs
