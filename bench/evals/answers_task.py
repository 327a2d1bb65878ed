"""The ``answers`` tasks: low-quality answers among short general-knowledge chats.

A pool of one-sentence chats on facts a small model knows (the colour of things, the young of
animals, what a tool is for, the material of things, the sound an animal makes), in a chat
template with a system line. 30% of the training answers are corrupted, a third each way:

- ``misaligned``: a fluent answer that is right, but for another question of the pool (another
  domain when possible), so its words are wrong about the question only;
- ``shuffled``: the right answer's words in a random order;
- ``truncated``: the right answer cut after its first two words.

``answers`` has 16 clean validation chats and ``answers-64`` has 64; for a seed both share the
same training pool (the validation draw is the only difference), so the two measure what the
validation set's size changes. ``answers-near`` is ``answers`` (the same questions, corrupted
positions and kinds, and the same 16 validation chats) but each misaligned answer is another
item's of the *same* domain ("What colour is a lemon?" answered "Fresh grass is green, as
anyone who has seen one knows."): the template fits the question, only its subject and fact
do not. Items, templates and domains are none of the other tasks'.
Each training sample keeps ``clean_label`` (1 = untouched) and ``corruption`` under ``"meta"``.
"""

from __future__ import annotations

import random

# (question template, answer template, items): the answer's "{1}" is what the question asks for.
DOMAINS = (
    ("What colour is {0}?", "{0} is {1}, as anyone who has seen one knows.",
     (("a ripe banana", "yellow"), ("fresh grass", "green"), ("a clear daytime sky", "blue"),
      ("fresh snow", "white"), ("a ripe tomato", "red"), ("coal", "black"), ("an orange", "orange"),
      ("a pink flamingo", "pink"), ("a lemon", "yellow"), ("a lime", "green"), ("milk", "white"),
      ("a strawberry", "red"))),
    ("What is a young {0} called?", "A young {0} is called a {1}, and it stays close to its mother.",
     (("cat", "kitten"), ("dog", "puppy"), ("cow", "calf"), ("sheep", "lamb"), ("horse", "foal"),
      ("frog", "tadpole"), ("goat", "kid"), ("bear", "cub"), ("duck", "duckling"), ("pig", "piglet"),
      ("deer", "fawn"), ("kangaroo", "joey"))),
    ("What do people use {0} for?", "People use {0} to {1}, which makes the job much easier.",
     (("a hammer", "drive nails"), ("scissors", "cut paper"), ("a broom", "sweep the floor"),
      ("a spoon", "eat soup"), ("a key", "open a lock"), ("an umbrella", "stay dry in the rain"),
      ("a pen", "write on paper"), ("a ladder", "reach high places"), ("a saw", "cut wood"),
      ("a towel", "dry their hands"), ("a map", "find the way"), ("a clock", "tell the time"))),
    ("What is {0} usually made of?", "{0} is usually made of {1}, which suits what it is for.",
     (("a window pane", "glass"), ("a candle", "wax"), ("a tyre", "rubber"), ("a sweater", "wool"),
      ("a book", "paper"), ("a coin", "metal"), ("a brick", "clay"), ("a table", "wood"),
      ("a shoe", "leather"), ("a nail", "steel"), ("a shirt", "cotton"), ("a balloon", "rubber"))),
    ("What sound does {0} make?", "{0} makes a sound we call a {1}, often when it wants attention.",
     (("a dog", "bark"), ("a cat", "meow"), ("a cow", "moo"), ("a duck", "quack"), ("a lion", "roar"),
      ("a snake", "hiss"), ("an owl", "hoot"), ("a horse", "neigh"), ("a pig", "oink"),
      ("a sheep", "baa"), ("a bee", "buzz"), ("a wolf", "howl"))),
)
SYSTEM = "You answer general knowledge questions in one full sentence."
CORRUPTIONS = ("misaligned", "shuffled", "truncated")
CORRUPT_SHARE = 0.3
POOL = {"small": 60, "full": 150}  # training chats
VALID = {"answers": 16, "answers-64": 64, "answers-near": 16}  # validation chats per task
NEAR = {"answers-near": "answers"}  # misaligned within the domain; the validation draw of the other


def answer_chat(domain: int, item: int) -> tuple[str, str]:
    """The question and the right answer about item ``item`` of domain ``domain``."""
    question, answer, items = DOMAINS[domain]
    subject, fact = items[item]
    sentence = answer.format(subject, fact)
    return question.format(subject), sentence[0].upper() + sentence[1:]


def corrupted(kind: str, answer: str, other_answer: str, rng: random.Random) -> str:
    """``answer`` corrupted by ``kind`` (``other_answer``: the answer of another question)."""
    if kind == "misaligned":
        return other_answer
    words = answer.split()
    if kind == "truncated":
        return " ".join(words[:2])
    shuffled = words[:]
    while shuffled == words:
        rng.shuffle(shuffled)
    return " ".join(shuffled)


def make_answers(name: str, size: str, seed: int) -> tuple[list[dict], list[dict]]:
    """The training pool (shared by both tasks of a seed) and the validation chats of ``name``."""
    pool_rng = random.Random(f"answers/{size}/{seed}")  # the pool: the same for both sizes
    cells = [(d, i) for d in range(len(DOMAINS)) for i in range(len(DOMAINS[d][2]))]
    drawn = [pool_rng.choice(cells) for _ in range(POOL[size])]
    bad = pool_rng.sample(range(len(drawn)), round(CORRUPT_SHARE * len(drawn)))
    kinds = {position: CORRUPTIONS[n % len(CORRUPTIONS)] for n, position in enumerate(bad)}
    train = []
    for position, (domain, item) in enumerate(drawn):
        question, answer = answer_chat(domain, item)
        kind = kinds.get(position)
        if kind is not None:
            if name in NEAR:  # another item of the same domain
                others = [c for c in cells if c[0] == domain and c[1] != item]
            else:  # another domain
                others = [c for c in cells if c[0] != domain]
            answer = corrupted(kind, answer, answer_chat(*pool_rng.choice(others))[1], pool_rng)
        train.append(_sample(question, answer, kind))
    valid_rng = random.Random(f"{NEAR.get(name, name)}/{size}/{seed}")
    valid = [_sample(*answer_chat(*valid_rng.choice(cells)), None) for _ in range(VALID[name])]
    return train, valid


def _sample(question: str, answer: str, corruption: str | None) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}],
            "meta": {"clean_label": int(corruption is None), "corruption": corruption or "none"}}
