"""Arithmetic problems with step-by-step solutions: the data semantic blotching was designed for.

`802+203=2+800+203=3+2+800+200=5+800+200=805+200=1005`: each step rewrites the expression by one
elementary operation, so every step is a separator-terminated segment that a model can learn to skip.
First every term is broken into single order-of-magnitude parts, one operation a step:
  1. distribute a product whose left factor has several parts (`23*4` -> `3*4+20*4`);
  2. evaluate a product whose left factor is a single part (`3*4` -> `12`);
  3. split the first term with several parts: its lowest part moves to the front (`802` -> `2+...+800`).
Then the first two terms are added until one number, the answer, is left.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Term = int | tuple[int, int]  # a number, or a product (a, b)


@dataclass(frozen=True)
class ArithmeticParams:
    n_train: int = 20000
    n_val: int = 1000
    min_ents: int = 2
    max_ents: int = 3
    p_more_ents: float | None = None  # each operand beyond min_ents with this probability; None: a uniform count
    max_num: int = 1000  # summed values are drawn from [0, max_num)
    p_mult: float = 0.0
    max_mult_num: int = 10  # right factors of products are drawn from [0, max_mult_num)
    max_mult_left: int | None = None  # left factors from [0, max_mult_left); None: max_num


def lowest_part(n: int) -> int:
    """The lowest nonzero order-of-magnitude part: 802 -> 2, 230 -> 30, 7 -> 7, 0 -> 0."""
    place = 1
    while n and n % (place * 10) == 0:
        place *= 10
    return n % (place * 10)


def is_single_part(n: int) -> bool:
    return lowest_part(n) == n


def render(terms: list[Term]) -> str:
    return "+".join(f"{t[0]}*{t[1]}" if isinstance(t, tuple) else str(t) for t in terms)


def next_split(terms: list[Term]) -> list[Term] | None:
    """Apply one breaking-down operation, or return None when every term is a single-part number."""
    for i, t in enumerate(terms):
        if isinstance(t, tuple) and not is_single_part(t[0]):
            low = lowest_part(t[0])
            return terms[:i] + [(low, t[1]), (t[0] - low, t[1])] + terms[i + 1 :]
    for i, t in enumerate(terms):
        if isinstance(t, tuple):
            return terms[:i] + [t[0] * t[1]] + terms[i + 1 :]
    for i, t in enumerate(terms):
        if not is_single_part(t):
            low = lowest_part(t)
            return [low] + terms[:i] + [t - low] + terms[i + 1 :]
    return None


def solve(terms: list[Term]) -> list[str]:
    """The solution steps after the problem, the last one being the answer."""
    steps = []
    while (split := next_split(terms)) is not None:
        terms = split
        steps.append(render(terms))
    while len(terms) > 1:
        terms = [terms[0] + terms[1]] + terms[2:]
        steps.append(render(terms))
    return steps or [render(terms)]


def n_operands(rng: np.random.Generator, p: ArithmeticParams) -> int:
    if p.p_more_ents is None:
        return int(rng.integers(p.min_ents, p.max_ents + 1))
    n = p.min_ents
    while n < p.max_ents and rng.random() < p.p_more_ents:
        n += 1
    return n


def sample_problem(rng: np.random.Generator, p: ArithmeticParams) -> list[Term]:
    terms: list[Term] = []
    for _ in range(n_operands(rng, p)):
        a = int(rng.integers(0, p.max_num))
        if p.p_mult > 0 and rng.random() < p.p_mult:
            if p.max_mult_left is not None:
                a = int(rng.integers(0, p.max_mult_left))
            terms.append((a, int(rng.integers(0, p.max_mult_num))))
        else:
            terms.append(a)
    return terms


def generate(p: ArithmeticParams, seed: int):
    """Yield (split, problem, solution) with val problems first; no val problem appears in train.

    Val problems are distinct; train problems are drawn from the same distribution minus the val set.
    Fails loudly if the problem space is too small to fill the val set.
    """
    rng = np.random.default_rng([seed, 0x4A11])
    val: set[str] = set()
    attempts = 0
    while len(val) < p.n_val:
        attempts += 1
        if attempts > 100 * p.n_val + 1000:
            raise ValueError(f"only {len(val)} distinct problems for n_val={p.n_val}: raise max_num or max_ents")
        terms = sample_problem(rng, p)
        problem = render(terms)
        if problem not in val:
            val.add(problem)
            yield "val", problem, "=".join(solve(terms))
    made = 0
    while made < p.n_train:
        terms = sample_problem(rng, p)
        problem = render(terms)
        if problem not in val:
            made += 1
            yield "train", problem, "=".join(solve(terms))
