"""The ``targeted`` task's data: a pool of many kinds of short chats, a few clean examples of a
target kind, and held-out questions of it (the selection-then-fine-tuning experiment of LESS,
RDS+ and the For-Value paper, at the embedded model's scale).

Six kinds of skill, each one a format or a rule a small model can pick up from a short LoRA
fine-tune, on items built from two-word phrases (``WORDS`` of bench/evals/tasks.py, ordered
pairs: 9,120 phrases) or from numbers written in words:

- ``capitals``: the phrase in capital letters;
- ``swap``: the phrase's two words in the other order;
- ``initials``: the phrase's initials, each followed by a full stop;
- ``quote``: the phrase between double angle brackets (a fixed answer template);
- ``plus``: the sum of two numbers from zero to twenty, in words;
- ``minus``: the difference of two numbers from zero to thirty (the first not smaller), in words.

Per kind the pool holds ``POOL[size]`` chats, 30% of them corrupted, half each way: ``wrong``
(the right answer of another item of the same kind: fluent, well formed, false) and
``broken`` (the right answer cut to its first half of characters, at least one dropped). Every
kind in ``TARGETS`` also gets ``VALID[size]`` clean validation chats and ``HELD_OUT[size]``
clean held-out questions; pool, validation and held-out items of a kind never share an item.
Each pool chat keeps ``kind``, ``clean_label`` and ``corruption`` under ``"meta"``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .tasks import WORDS

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
           "fifteen sixteen seventeen eighteen nineteen twenty").split()
TENS = {20: "twenty", 30: "thirty", 40: "forty"}


def in_words(n: int) -> str:
    """``n`` (0-40) in English words: "twenty-three"."""
    if n <= 20:
        return NUMBERS[n]
    tens, units = divmod(n, 10)
    return TENS[10 * tens] + (f"-{NUMBERS[units]}" if units else "")


@dataclass(frozen=True)
class Kind:
    items: list[tuple]  # pairs of words or of numbers
    question: Callable[[tuple], str]
    answer: Callable[[tuple], str]


PHRASES = [(a, b) for a in WORDS for b in WORDS if a != b]
KINDS = {
    "capitals": Kind(PHRASES, lambda p: f"Write '{p[0]} {p[1]}' in capital letters.",
                     lambda p: f"{p[0]} {p[1]}".upper()),
    "swap": Kind(PHRASES, lambda p: f"Swap the two words of '{p[0]} {p[1]}'.", lambda p: f"{p[1]} {p[0]}"),
    "initials": Kind(PHRASES, lambda p: f"What are the initials of '{p[0]} {p[1]}'?",
                     lambda p: f"{p[0][0].upper()}. {p[1][0].upper()}."),
    "quote": Kind(PHRASES, lambda p: f"Quote '{p[0]} {p[1]}' in the house style.",
                  lambda p: f"<<{p[0]} {p[1]}>>"),
    "plus": Kind([(a, b) for a in range(21) for b in range(21)],
                 lambda p: f"What is {in_words(p[0])} plus {in_words(p[1])}? Answer in words.",
                 lambda p: in_words(p[0] + p[1])),
    "minus": Kind([(a, b) for a in range(31) for b in range(a + 1)],
                  lambda p: f"What is {in_words(p[0])} minus {in_words(p[1])}? Answer in words.",
                  lambda p: in_words(p[0] - p[1])),
}
# The kinds selected for, each in turn: those where a clean-target selection measurably beats a
# random one after the fine-tune (calibration: bench/results/quality.md, "Targeted selection").
TARGETS = ("swap", "initials", "quote")
SYSTEM = "You follow the instruction exactly and answer with the result only."
CORRUPT_SHARE = 0.3
POOL = {"small": 30, "full": 150}  # chats per kind
VALID = {"small": 8, "full": 16}  # clean validation chats per target kind
HELD_OUT = {"small": 20, "full": 100}  # clean held-out questions per target kind


@dataclass(frozen=True)
class TargetedTask:
    pool: list[dict]  # every kind, shuffled; "meta": kind, clean_label, corruption
    valid: dict[str, list[dict]]  # target kind: clean chats
    held_out: dict[str, list[dict]]  # target kind: clean chats, scored after fine-tuning


def make_targeted(size: str, seed: int) -> TargetedTask:
    """The pool, validation chats and held-out questions of ``seed``."""
    rng = random.Random(f"targeted/{size}/{seed}")
    pool, valid, held_out = [], {}, {}
    for name, kind in KINDS.items():
        items = rng.sample(kind.items, len(kind.items))
        count = POOL[size]
        bad = rng.sample(range(count), round(CORRUPT_SHARE * count))
        corruption = {position: ("wrong", "broken")[n % 2] for n, position in enumerate(bad)}
        for position, item in enumerate(items[:count]):
            broken = corruption.get(position)
            meta = {"kind": name, "clean_label": int(broken is None), "corruption": broken or "none"}
            pool.append(_chat(kind.question(item), _reply(kind, item, broken, items, rng), meta))
        if name in TARGETS:
            rest = items[count:count + VALID[size] + HELD_OUT[size]]
            chats = [_chat(kind.question(i), kind.answer(i), {"kind": name}) for i in rest]
            valid[name], held_out[name] = chats[:VALID[size]], chats[VALID[size]:]
    rng.shuffle(pool)
    return TargetedTask([{"id": f"pool-{i}", **s} for i, s in enumerate(pool)], valid, held_out)


def _reply(kind: Kind, item: tuple, corruption: str | None, items: list[tuple], rng: random.Random) -> str:
    right = kind.answer(item)
    if corruption == "wrong":  # another item's right answer: fluent, well formed, false
        return next(a for a in (kind.answer(rng.choice(items)) for _ in range(1000)) if a != right)
    if corruption == "broken":  # cut to its first half, at least one character dropped
        return right[:len(right) // 2]
    return right


def _chat(question: str, answer: str, meta: dict) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}], "meta": meta}
