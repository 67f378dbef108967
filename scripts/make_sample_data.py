#!/usr/bin/env python3
"""Generate the bundled demo dataset ``src/trainer_core/sample_data/train.jsonl``.

Every conversation is produced here from templates and a small hand-written fact list: simple
arithmetic, unit conversions, capital cities and a few two-turn follow-ups. Answers are short
so the CPU demo trains fast. Generation is deterministic: a seeded ``random.Random`` (no global
random state), so rerunning the script reproduces the file byte for byte.

Usage: ``python scripts/make_sample_data.py [--out PATH] [--seed N] [--rows N]``
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

Example = dict[str, Any]

DEFAULT_SEED = 20261126
DEFAULT_ROWS = 400
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/trainer_core/sample_data/train.jsonl"

#: (country, capital) pairs; uncontested capitals only.
CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"),
    ("the United Kingdom", "London"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Iceland", "Reykjavik"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Hungary", "Budapest"),
    ("Greece", "Athens"),
    ("Romania", "Bucharest"),
    ("Ukraine", "Kyiv"),
    ("Russia", "Moscow"),
    ("Turkey", "Ankara"),
    ("Egypt", "Cairo"),
    ("Morocco", "Rabat"),
    ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"),
    ("Ghana", "Accra"),
    ("Ethiopia", "Addis Ababa"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("South Korea", "Seoul"),
    ("India", "New Delhi"),
    ("Pakistan", "Islamabad"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("the Philippines", "Manila"),
    ("Australia", "Canberra"),
    ("New Zealand", "Wellington"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Cuba", "Havana"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
)

OPS: dict[str, tuple[str, Callable[[int, int], int]]] = {
    "+": ("plus", lambda a, b: a + b),
    "-": ("minus", lambda a, b: a - b),
    "×": ("times", lambda a, b: a * b),
}

ARITH_TEMPLATES = (
    "What is {a} {sym} {b}?",
    "What is {a} {word} {b}?",
    "Compute {a} {sym} {b}.",
    "Calculate {a} {word} {b}.",
    "How much is {a} {word} {b}?",
    "{a} {sym} {b} = ?",
    "Quick math: {a} {sym} {b}",
)

#: (from unit, to unit, factor, from-unit words, to-unit words)
LINEAR_UNITS: tuple[tuple[str, str, int, str, str], ...] = (
    ("km", "m", 1000, "kilometers", "meters"),
    ("kg", "g", 1000, "kilograms", "grams"),
    ("h", "min", 60, "hours", "minutes"),
)

UNIT_TEMPLATES = (
    "Convert {x} {fu} to {tw}.",
    "How many {tw} are in {x} {fw}?",
    "What is {x} {fu} in {tw}?",
    "{x} {fw} is how many {tw}?",
)

TEMP_TEMPLATES = (
    "Convert {c} °C to Fahrenheit.",
    "What is {c} degrees Celsius in Fahrenheit?",
    "{c} °C in °F?",
    "How warm is {c} °C in Fahrenheit?",
)

CAPITAL_TEMPLATES = (
    "What is the capital of {country}?",
    "Name the capital city of {country}.",
    "Which city is the capital of {country}?",
    "Capital of {country}?",
    "Tell me the capital of {country}.",
)

CAPITAL_ANSWERS = (
    "The capital of {country} is {capital}.",
    "{capital} is the capital of {country}.",
)


def fmt_num(x: float) -> str:
    """Format a number without a trailing ``.0`` (``2.5`` stays, ``3.0`` becomes ``3``)."""
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.4f}".rstrip("0").rstrip(".")


def chat(*turns: str) -> list[dict[str, str]]:
    """Alternate user/assistant messages from ``turns`` (user first)."""
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def arithmetic(rng: random.Random) -> tuple[str, str, int]:
    """One arithmetic question, its answer and the numeric result."""
    sym = rng.choice(tuple(OPS))
    word, fn = OPS[sym]
    if sym == "×":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    elif sym == "+":
        a, b = rng.randint(1, 60), rng.randint(1, 60)
    else:
        a = rng.randint(5, 80)
        b = rng.randint(1, a)
    q = rng.choice(ARITH_TEMPLATES).format(a=a, b=b, sym=sym, word=word)
    r = fn(a, b)
    return q, f"{a} {sym} {b} = {r}.", r


def unit_conversion(rng: random.Random) -> tuple[str, str]:
    """One unit-conversion question and its answer."""
    if rng.random() < 0.25:
        c = rng.choice([-40, -10, 0, 5, 10, 15, 20, 25, 30, 35, 37, 40, 100])
        f = c * 9 / 5 + 32
        q = rng.choice(TEMP_TEMPLATES).format(c=c)
        return q, f"{c} °C = {fmt_num(f)} °F."
    fu, tu, factor, fw, tw = rng.choice(LINEAR_UNITS)
    if rng.random() < 0.5:  # big unit -> small unit
        x: float = rng.choice([1, 2, 3, 4, 5, 6, 8, 10, 12, 1.5, 2.5, 0.5])
        y = x * factor
    else:  # small unit -> big unit
        fu, tu, fw, tw = tu, fu, tw, fw
        y = rng.choice([1, 2, 3, 4, 5, 7, 9, 1.5, 2.5, 0.5])
        x = y * factor
    q = rng.choice(UNIT_TEMPLATES).format(x=fmt_num(x), fu=fu, fw=fw, tw=tw)
    return q, f"{fmt_num(x)} {fu} = {fmt_num(y)} {tu}."


def capital(rng: random.Random) -> tuple[str, str, str]:
    """One capital-city question, its answer and the country asked about."""
    country, city = rng.choice(CAPITALS)
    q = rng.choice(CAPITAL_TEMPLATES).format(country=country)
    a = rng.choice(CAPITAL_ANSWERS).format(country=country, capital=city)
    return q, a[0].upper() + a[1:], country


def follow_up(rng: random.Random) -> Example:
    """A two-turn conversation: arithmetic with a follow-up, or two capitals."""
    if rng.random() < 0.5:
        q1, a1, r = arithmetic(rng)
        b = rng.randint(1, 9)
        sym = rng.choice(("+", "-"))
        word, fn = OPS[sym]
        q2 = rng.choice(("And {word} {b}?", "Now {word} {b}.", "Then {sym} {b}?")).format(
            word=word, b=b, sym=sym
        )
        return {"messages": chat(q1, a1, q2, f"{r} {sym} {b} = {fn(r, b)}."),
                "metadata": {"task": "arithmetic_followup"}}
    (c1, k1), (c2, k2) = rng.sample(CAPITALS, 2)
    q1 = rng.choice(CAPITAL_TEMPLATES).format(country=c1)
    a1 = f"The capital of {c1} is {k1}."
    q2 = rng.choice(("And of {c}?", "What about {c}?", "And {c}?")).format(c=c2)
    a2 = f"The capital of {c2} is {k2}."
    return {"messages": chat(q1, a1, q2, a2), "metadata": {"task": "capitals_followup"}}


def one_example(rng: random.Random) -> Example:
    """One conversation: ~40% arithmetic, ~25% units, ~25% capitals, ~10% two-turn."""
    kind = rng.random()
    if kind < 0.40:
        q, a, _r = arithmetic(rng)
        return {"messages": chat(q, a), "metadata": {"task": "arithmetic"}}
    if kind < 0.65:
        q, a = unit_conversion(rng)
        return {"messages": chat(q, a), "metadata": {"task": "unit_conversion"}}
    if kind < 0.90:
        q, a, _c = capital(rng)
        return {"messages": chat(q, a), "metadata": {"task": "capitals"}}
    return follow_up(rng)


def generate(seed: int = DEFAULT_SEED, rows: int = DEFAULT_ROWS) -> list[Example]:
    """``rows`` distinct conversations drawn from a ``random.Random(seed)``."""
    rng = random.Random(seed)
    out: list[Example] = []
    seen: set[str] = set()
    while len(out) < rows:
        ex = one_example(rng)
        key = json.dumps(ex["messages"], ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def render(examples: list[Example]) -> str:
    """The JSONL text of ``examples`` (UTF-8 characters kept, one object per line)."""
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(generate(args.seed, args.rows)), encoding="utf-8")
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
