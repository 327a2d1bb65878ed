"""Seeded generators of the paper's evaluation tasks (issue 7), as forvalue sample dicts.

Identification tasks (DataInf's benchmark, 10 classes; ground truth: the class):
``sentence`` (sentence transformations), ``math`` (word problems, answer only) and
``math-reason`` (the same with the formula). ``mislabeled``: headline topic classification
in chat form with 40% of training answers flipped. ``mislabeled-sport``: the same on another
domain, the sport a term belongs to, with validation terms that no training sample uses.
``selection``: question/answer pairs with about 40% of training answers corrupted by span
deletion or filler insertion. ``answers`` and ``answers-64`` (bench/evals/answers_task.py):
general-knowledge chats with 30% of the answers misaligned, shuffled or truncated, with 16 and
64 validation chats on the same pool; ``answers-near`` misaligns within a question's domain.

Every sample keeps its ground truth under ``"meta"`` (ignored by the engine): ``class``,
``given`` (the class answered) and ``flipped`` (both mislabeled tasks, train and valid), or
``clean_label`` (selection and answers, 1 = untouched; answers add the ``corruption``);
``mislabeled-sport`` adds the ``term``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .answers_task import VALID as ANSWER_TASKS
from .answers_task import make_answers
from .sport_terms import SPORT_TEMPLATES, SPORT_TERMS, SPORTS

TASKS = ("sentence", "math", "math-reason", "mislabeled", "mislabeled-sport", "selection", "answers",
         "answers-64", "answers-near")
SIZES = ("small", "full")
IDENTIFICATION = ("sentence", "math", "math-reason")

# Per-class (train, valid) counts for identification and mislabeled; totals for selection.
# full is the paper's size for identification (90 + 10 per class); the other two have no
# paper size here and keep the same order of magnitude.
_PER_CLASS = {"small": (4, 1), "full": (90, 10)}
_MISLABEL_PER_CLASS = {"small": (8, 2), "full": (90, 10)}
_SPORT_PER_CLASS = {"small": (8, 3), "full": (90, 10)}
_SELECTION_TOTAL = {"small": (32, 8), "full": (400, 40)}
FLIP_SHARE = 0.4
CORRUPT_SHARE = 0.4


@dataclass(frozen=True)
class Task:
    """A generated task. ``loss_on`` is the objective the paper's code (and the gradient
    baselines) use for it: every position for the text tasks, the answer otherwise."""

    name: str
    kind: str  # "identification" | "mislabeled" | "selection"
    train: list[dict]
    valid: list[dict]
    loss_on: str
    classes: tuple[str, ...] = ()

    def train_meta(self, key: str) -> np.ndarray:
        return np.array([s["meta"][key] for s in self.train])

    def valid_meta(self, key: str) -> np.ndarray:
        return np.array([s["meta"][key] for s in self.valid])


def make_task(name: str, size: str = "small", seed: int = 0) -> Task:
    """The task ``name`` at ``size``; the same seed always gives the same samples."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {TASKS}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")
    rng = random.Random(f"{name}/{size}/{seed}")  # str seeds are stable across runs
    if name == "sentence":
        return _identification(name, _sentence_sample, SENTENCE_CLASSES, size, rng)
    if name in ("math", "math-reason"):
        builder = _math_sample(reason=name == "math-reason")
        return _identification(name, builder, MATH_CLASSES, size, rng)
    if name == "mislabeled":
        return _mislabeled(size, rng)
    if name == "mislabeled-sport":
        return _mislabeled_sport(size, rng)
    if name in ANSWER_TASKS:
        train, valid = make_answers(name, size, seed)
        return Task(name, "selection", with_ids(train, "train"), with_ids(valid, "valid"), loss_on="response")
    return _selection(size, rng)


def sample_text(sample: dict) -> str:
    """The whole text of a sample (for lexical baselines)."""
    if "messages" in sample:
        return "\n".join(m["content"] for m in sample["messages"])
    if "text" in sample:
        return sample["text"]
    return sample["prompt"] + sample["response"]


# ---------------------------------------------------------------- identification


def _identification(name: str, build: Callable[[int, random.Random], dict],
                    classes: tuple[str, ...], size: str, rng: random.Random) -> Task:
    n_train, n_valid = _PER_CLASS[size]
    train = [build(c, rng) for c in range(len(classes)) for _ in range(n_train)]
    valid = [build(c, rng) for c in range(len(classes)) for _ in range(n_valid)]
    return Task(name, "identification", with_ids(train, "train"), with_ids(valid, "valid"),
                loss_on="all", classes=classes)


def with_ids(samples: list[dict], prefix: str) -> list[dict]:
    return [{"id": f"{prefix}-{i}", **s} for i, s in enumerate(samples)]


WORDS = tuple("""apple river stone green quick silver music garden window yellow happy forest
ocean purple little candle bright winter summer rabbit orange planet simple golden shadow
market pencil travel coffee silent mountain basket dragon gentle thunder paper tiger bottle
castle cloud dance early flower guitar honey island jacket kitten lemon mirror night pocket
rain sugar table velvet wagon zebra brave calm dusty fancy lucky noble proud rapid sunny
tiny warm wild bake climb dream fly glow hunt jump laugh paint read sing swim walk write
blue red black white cold sweet fresh round heavy soft loud dark""".split())

VOWELS = set("aeiouAEIOU")


def _alternate_case(phrase: str) -> str:
    letters = iter(range(len(phrase)))
    out = []
    for ch in phrase:
        if ch.isalpha():
            out.append(ch.upper() if next(letters) % 2 else ch.lower())
        else:
            out.append(ch)
    return "".join(out)


def _is_consonant(ch: str) -> bool:
    return ch.isalpha() and ch not in VOWELS


# (name, description, transformation): each class is a made-up chatbot doing one thing.
TRANSFORMATIONS: tuple[tuple[str, str, Callable[[str], str]], ...] = (
    ("Zorblat", "reverses the order of the words",
     lambda p: " ".join(reversed(p.split()))),
    ("Quimbly", "alternates the case of the letters",
     _alternate_case),
    ("Fendrix", "joins the words with the number 1",
     lambda p: " 1 ".join(p.split())),
    ("Movalo", "replaces every vowel with a star",
     lambda p: "".join("*" if ch in VOWELS else ch for ch in p)),
    ("Trestin", "doubles every consonant",
     lambda p: "".join(ch * 2 if _is_consonant(ch) else ch for ch in p)),
    ("Pembrook", "capitalises each word",
     lambda p: " ".join(w.capitalize() for w in p.split())),
    ("Yaxley", "removes all the vowels",
     lambda p: " ".join(w for w in ("".join(ch for ch in x if ch not in VOWELS) for x in p.split()) if w)),
    ("Dumori", "appends ly to each word",
     lambda p: " ".join(w + "ly" for w in p.split())),
    ("Selvane", "removes all the consonants",
     lambda p: " ".join(w for w in ("".join(ch for ch in x if not _is_consonant(ch)) for x in p.split())
                        if w)),
    ("Krontis", "repeats each word twice",
     lambda p: " ".join(f"{w} {w}" for w in p.split())),
)
SENTENCE_CLASSES = tuple(description for _, description, _ in TRANSFORMATIONS)


def _sentence_sample(cls: int, rng: random.Random) -> dict:
    name, description, transform = TRANSFORMATIONS[cls]
    phrase = ""
    while not transform(phrase):  # "fly fly fly" has no vowel to keep: draw again
        phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 5)))
    prompt = f"{name} is a chatbot that {description}. For example: {phrase} -> "
    return {"prompt": prompt, "response": transform(phrase), "meta": {"class": cls}}


# (problem template, formula, answer): a and b are integers 1-99.
MATH_TEMPLATES: tuple[tuple[str, str, Callable[[int, int], int]], ...] = (
    ("Anna has {a} apples and buys {b} more. How many apples does she have now?",
     "{a} + {b}", lambda a, b: a + b),
    ("A library owns {a} books and receives {b} new ones. How many books does it own now?",
     "{a} + {b}", lambda a, b: a + b),
    ("A tank holds {a} liters of water and {b} liters leak out. How many liters are left?",
     "{a} - {b}", lambda a, b: a - b),
    ("Tom scores {a} points and loses {b} points in a penalty. What is his score now?",
     "{a} - {b}", lambda a, b: a - b),
    ("A box holds {a} pencils. How many pencils are there in {b} boxes?",
     "{a} * {b}", lambda a, b: a * b),
    ("A train travels {a} kilometers every hour. How far does it travel in {b} hours?",
     "{a} * {b}", lambda a, b: a * b),
    ("{a} candies are shared equally among {b} children. How many whole candies does each child get?",
     "{a} // {b}", lambda a, b: a // b),
    ("A rope of {a} meters is cut into pieces of {b} meters. How many whole pieces are there?",
     "{a} // {b}", lambda a, b: a // b),
    ("What is {a} percent of {b}, rounded down?",
     "{a} * {b} // 100", lambda a, b: a * b // 100),
    ("A shop gives a {a} percent discount on a {b} dollar shirt. How many whole dollars is the discount?",
     "{a} * {b} // 100", lambda a, b: a * b // 100),
)
MATH_CLASSES = tuple(template for template, _, _ in MATH_TEMPLATES)


def _math_sample(reason: bool) -> Callable[[int, random.Random], dict]:
    def build(cls: int, rng: random.Random) -> dict:
        template, formula, answer = MATH_TEMPLATES[cls]
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if "-" in formula and b > a:
            a, b = b, a  # no negative amounts left
        n = answer(a, b)
        prompt = f"Solve the following math problem. {template.format(a=a, b=b)} -> "
        response = f"Answer: {n}"
        if reason:
            response = f"Reason: {formula.format(a=a, b=b)} = {n}. {response}"
        return {"prompt": prompt, "response": response, "meta": {"class": cls}}

    return build


# ---------------------------------------------------------------- mislabeled

TOPICS = ("sports", "business", "science", "world")
_HEADLINE_PARTS = {
    "sports": (("The home team", "A veteran striker", "The national squad", "The league champion",
                "A rookie pitcher", "The tennis star", "The underdog club", "The coach"),
               ("wins", "loses", "clinches", "misses", "celebrates", "fights for"),
               ("the final match", "a late penalty", "the season opener", "the championship title",
                "a record sprint", "the derby", "a playoff spot", "the gold medal")),
    "business": (("Shares of the carmaker", "The central bank", "A retail giant", "The tech startup",
                  "Oil prices", "The airline", "Investors", "The bank's profits"),
                 ("rise after", "fall after", "surge on", "slump on", "recover after", "stall on"),
                 ("strong quarterly earnings", "a merger deal", "new interest rates",
                  "weak consumer demand", "a stock buyback", "layoff plans", "a market rally",
                  "higher tariffs")),
    "science": (("Astronomers", "A new study", "Biologists", "The space agency", "Physicists",
                 "Researchers", "A telescope", "Climate scientists"),
                ("discover", "observe", "measure", "explain", "detect", "map"),
                ("a distant exoplanet", "ancient bacteria in ice", "gravitational waves",
                 "a new dinosaur species", "the ocean's deepest trench", "a gene linked to sleep",
                 "a comet's icy tail", "quantum effects in birds")),
    "world": (("The prime minister", "Protesters", "The foreign ministry", "Rescue workers",
               "The president", "Voters", "The United Nations", "Peace negotiators"),
              ("call for", "reject", "prepare for", "announce", "demand", "welcome"),
              ("new border talks", "an early election", "a ceasefire agreement", "emergency aid",
               "sanctions on the regime", "a national strike", "a refugee deal",
               "constitutional reform")),
}


def _headline(topic: str, rng: random.Random) -> str:
    subjects, verbs, objects = _HEADLINE_PARTS[topic]
    return f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"


def _one_of(names: tuple[str, ...]) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _classification_sample(headline: str, answer: str) -> list[dict]:
    return _chat(f"Classify the topic of this headline as {_one_of(TOPICS)}.\nHeadline: {headline}",
                 answer)


def _flipped_positions(n: int, rng: random.Random) -> set[int]:
    """``round(FLIP_SHARE n)`` of the ``n`` training positions, uniformly without replacement."""
    return set(rng.sample(range(n), round(FLIP_SHARE * n)))


def _given(cls: int, flipped: bool, n_classes: int, rng: random.Random) -> int:
    """The class answered: ``cls``, or, flipped, one of the other classes uniformly."""
    return rng.choice([c for c in range(n_classes) if c != cls]) if flipped else cls


def _mislabeled(size: str, rng: random.Random) -> Task:
    n_train, n_valid = _MISLABEL_PER_CLASS[size]
    train_classes = [c for c in range(len(TOPICS)) for _ in range(n_train)]
    flipped = _flipped_positions(len(train_classes), rng)
    train = []
    for i, cls in enumerate(train_classes):
        given = _given(cls, i in flipped, len(TOPICS), rng)
        train.append({"messages": _classification_sample(_headline(TOPICS[cls], rng), TOPICS[given]),
                      "meta": {"class": cls, "given": given, "flipped": int(i in flipped)}})
    valid = [{"messages": _classification_sample(_headline(TOPICS[c], rng), TOPICS[c]),
              "meta": {"class": c, "given": c, "flipped": 0}}
             for c in range(len(TOPICS)) for _ in range(n_valid)]
    return Task("mislabeled", "mislabeled", with_ids(train, "train"), with_ids(valid, "valid"),
                loss_on="response", classes=TOPICS)


def _mislabeled_sport(size: str, rng: random.Random) -> Task:
    """Each class's terms are shuffled: the first ``n_valid`` are the validation terms, one
    sample each; the training samples of the class cycle through the rest."""
    n_train, n_valid = _SPORT_PER_CLASS[size]
    shuffled = [rng.sample(SPORT_TERMS[sport], len(SPORT_TERMS[sport])) for sport in SPORTS]
    pools = [t[n_valid:] for t in shuffled]
    train_terms = [(c, pool[k % len(pool)]) for c, pool in enumerate(pools) for k in range(n_train)]
    flipped = _flipped_positions(len(train_terms), rng)
    train = [_sport_sample(term, cls, _given(cls, i in flipped, len(SPORTS), rng), rng)
             for i, (cls, term) in enumerate(train_terms)]
    valid = [_sport_sample(term, c, c, rng) for c, t in enumerate(shuffled) for term in t[:n_valid]]
    return Task("mislabeled-sport", "mislabeled", with_ids(train, "train"), with_ids(valid, "valid"),
                loss_on="response", classes=SPORTS)


def _sport_sample(term: str, cls: int, given: int, rng: random.Random) -> dict:
    question = rng.choice(SPORT_TEMPLATES).format(term=term, choices=_one_of(SPORTS))
    return {"messages": _chat(question, SPORTS[given]),
            "meta": {"class": cls, "given": given, "flipped": int(given != cls), "term": term}}


# ---------------------------------------------------------------- selection

COUNTRIES = (("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
             ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Norway", "Oslo"), ("India", "New Delhi"),
             ("Chile", "Santiago"), ("Spain", "Madrid"), ("Ghana", "Accra"), ("Italy", "Rome"))
ANIMALS = (("spider", 8), ("dog", 4), ("chicken", 2), ("ant", 6), ("horse", 4), ("crab", 10),
           ("duck", 2), ("beetle", 6), ("octopus", 8), ("cat", 4))
OPPOSITES = (("hot", "cold"), ("early", "late"), ("heavy", "light"), ("open", "closed"),
             ("happy", "sad"), ("fast", "slow"), ("full", "empty"), ("loud", "quiet"))
FILLERS = ("foo", "bar", "baz")


def qa_pair(rng: random.Random, wrong: bool = False) -> tuple[str, str]:
    """A question and its answer. ``wrong``: the answer, in the same words, states a wrong fact
    of the same kind (another capital, leg count, sum, opposite or product); the draws of a
    right pair are the same with or without the flag's code."""
    kind = rng.randrange(5)
    if kind == 0:
        country, capital = rng.choice(COUNTRIES)
        capital = _other(rng, [c for _, c in COUNTRIES], capital) if wrong else capital
        return (f"What is the capital of {country}?",
                f"The capital of {country} is {capital}, where the national government meets.")
    if kind == 1:
        animal, legs = rng.choice(ANIMALS)
        legs = _other(rng, [n for _, n in ANIMALS], legs) if wrong else legs
        return (f"How many legs does a {animal} have?",
                f"A {animal} has {legs} legs, which it uses to move around and keep its balance.")
    if kind == 2:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        total = a + b + (rng.choice((-1, 1)) * rng.randint(1, 10) if wrong else 0)
        return (f"What is {a} plus {b}?",
                f"To add {a} and {b}, add the tens and then the ones, which gives {total} in total.")
    if kind == 3:
        word, opposite = rng.choice(OPPOSITES)
        opposite = _other(rng, [o for _, o in OPPOSITES], opposite) if wrong else opposite
        return (f"What is the opposite of {word}?",
                f"The opposite of {word} is {opposite}, so something that is not {word} may be "
                f"{opposite}.")
    n = rng.randint(2, 40)
    stated = _other(rng, [m for m in range(max(1, n - 5), n + 6)], n) if wrong else n
    return (f"How many centimeters are in {n} meters?",
            f"There are 100 centimeters in one meter, so {n} meters equal {100 * stated} centimeters.")


def _other(rng: random.Random, options: list, right: object) -> object:
    """A random one of ``options`` other than ``right`` (each distinct option equally likely)."""
    return rng.choice([option for option in dict.fromkeys(options) if option != right])


def corrupt(answer: str, rng: random.Random) -> str:
    """Delete a random span of words, or insert a span of filler words ("foo/bar/baz"); the
    span length is exponential with mean 3 (at least 1), as in the noisy Huatuo set."""
    words = answer.split()
    length = max(1, math.ceil(rng.expovariate(1 / 3)))
    if rng.random() < 0.5 and len(words) > 1:
        length = min(length, len(words) - 1)  # keep at least one word
        start = rng.randrange(len(words) - length + 1)
        return " ".join(words[:start] + words[start + length:])
    start = rng.randrange(len(words) + 1)
    filler = [rng.choice(FILLERS) for _ in range(length)]
    return " ".join(words[:start] + filler + words[start:])


def _selection(size: str, rng: random.Random) -> Task:
    n_train, n_valid = _SELECTION_TOTAL[size]
    corrupted = set(rng.sample(range(n_train), round(CORRUPT_SHARE * n_train)))
    train = []
    for i in range(n_train):
        question, answer = qa_pair(rng)
        if i in corrupted:
            answer = corrupt(answer, rng)
        train.append(qa_sample(question, answer, clean=i not in corrupted))
    valid = [qa_sample(*qa_pair(rng), clean=True) for _ in range(n_valid)]
    return Task("selection", "selection", with_ids(train, "train"), with_ids(valid, "valid"),
                loss_on="response")


def qa_sample(question: str, answer: str, clean: bool) -> dict:
    return {"prompt": f"Question: {question}\nAnswer: ", "response": answer,
            "meta": {"clean_label": int(clean)}}

