"""Task generators (seeded, sized right, well-formed samples) and quality metrics."""

import hashlib
import random

import numpy as np
import pytest

from forvalue.bench.evals import metrics
from forvalue.bench.evals.answers_task import DOMAINS, answer_chat
from forvalue.bench.evals.downstream import fact_sample, make_downstream
from forvalue.bench.evals.sport_terms import SPORT_TEMPLATES, SPORT_TERMS, SPORTS
from forvalue.bench.evals.targeted_task import HELD_OUT as TARGETED_HELD_OUT
from forvalue.bench.evals.targeted_task import KINDS, TARGETS, in_words, make_targeted
from forvalue.bench.evals.targeted_task import POOL as TARGETED_POOL
from forvalue.bench.evals.targeted_task import VALID as TARGETED_VALID
from forvalue.bench.evals.tasks import (
    CORRUPT_SHARE,
    FILLERS,
    FLIP_SHARE,
    TASKS,
    TOPICS,
    TRANSFORMATIONS,
    corrupt,
    make_task,
    qa_pair,
    sample_text,
)
from forvalue.engine.inputs.samples import encode_sample

# (train, valid) counts per class at each size; selection: totals.
SIZES = {
    "sentence": {"small": (4, 1), "full": (90, 10)},
    "math": {"small": (4, 1), "full": (90, 10)},
    "math-reason": {"small": (4, 1), "full": (90, 10)},
    "mislabeled": {"small": (8, 2), "full": (90, 10)},
    "mislabeled-sport": {"small": (8, 3), "full": (90, 10)},
}


@pytest.mark.parametrize("name", TASKS)
def test_same_seed_same_samples_other_seed_other_samples(name):
    assert make_task(name, "small", seed=3) == make_task(name, "small", seed=3)
    assert make_task(name, "small", seed=3).train != make_task(name, "small", seed=4).train


@pytest.mark.parametrize("name", [*SIZES])
@pytest.mark.parametrize("size", ["small", "full"])
def test_sizes_per_class(name, size):
    task = make_task(name, size)
    n_train, n_valid = SIZES[name][size]
    n_classes = len(task.classes)
    assert np.bincount(task.train_meta("class")).tolist() == [n_train] * n_classes
    assert np.bincount(task.valid_meta("class")).tolist() == [n_valid] * n_classes


@pytest.mark.parametrize(("size", "counts"), [("small", (32, 8)), ("full", (400, 40))])
def test_selection_sizes(size, counts):
    task = make_task("selection", size)
    assert (len(task.train), len(task.valid)) == counts


@pytest.mark.parametrize("name", TASKS)
def test_samples_are_valid_forms_with_unique_ids(name, tiny_tokenizer):
    task = make_task(name, "small")
    for i, sample in enumerate(task.train + task.valid):
        encoded = encode_sample(sample, tiny_tokenizer, where=f"index {i}", loss_on="response")
        assert encoded.num_labels > 0
    ids = [s["id"] for s in task.train + task.valid]
    assert len(set(ids)) == len(ids)


def test_transformations_on_an_example():
    expected = ["cat red big", "bIg ReD cAt", "big 1 red 1 cat", "b*g r*d c*t", "bbigg rredd ccatt",
                "Big Red Cat", "bg rd ct", "bigly redly catly", "i e a", "big big red red cat cat"]
    assert [transform("big red cat") for _, _, transform in TRANSFORMATIONS] == expected


def test_sentence_prompt_names_its_chatbot_and_response_is_the_transformation():
    task = make_task("sentence", "small")
    for sample in task.train:
        name, description, transform = TRANSFORMATIONS[sample["meta"]["class"]]
        assert sample["prompt"].startswith(f"{name} is a chatbot that {description}. For example: ")
        phrase = sample["prompt"].split("For example: ")[1].removesuffix(" -> ")
        assert 3 <= len(phrase.split()) <= 5
        assert sample["response"] == transform(phrase)


def test_math_answers_are_right():
    for name in ("math", "math-reason"):
        for sample in make_task(name, "small").train:
            assert sample["prompt"].startswith("Solve the following math problem. ")
            answer = int(sample["response"].rsplit("Answer: ", 1)[1])
            if name == "math-reason":
                formula = sample["response"].removeprefix("Reason: ").split(" = ")[0]
                assert eval(formula) == answer  # the formula holds only integers and + - * //
                assert all(1 <= int(n) <= 99 for n in formula.split() if n.isdigit() and n != "100")
            assert answer >= 0


def test_mislabeled_flips_forty_percent_to_a_wrong_class():
    task = make_task("mislabeled", "full")
    flipped = task.train_meta("flipped").astype(bool)
    assert flipped.sum() == round(FLIP_SHARE * len(task.train))
    given, true = task.train_meta("given"), task.train_meta("class")
    assert np.all((given != true) == flipped)
    assert [s["messages"][1]["content"] for s in task.train] == [TOPICS[g] for g in given]
    assert not task.valid_meta("flipped").any()


@pytest.mark.parametrize(("size", "n_flipped"), [("small", 13), ("full", 144)])
def test_mislabeled_sport_flips_forty_percent_to_another_class(size, n_flipped):
    # round(0.4 n): 13 of 32 at small (12.8 rounds up), 144 of 360 at full.
    task = make_task("mislabeled-sport", size)
    flipped = task.train_meta("flipped").astype(bool)
    assert flipped.sum() == n_flipped == round(FLIP_SHARE * len(task.train))
    given, true = task.train_meta("given"), task.train_meta("class")
    assert np.all((given != true) == flipped)
    assert [s["messages"][1]["content"] for s in task.train] == [SPORTS[g] for g in given]
    assert not task.valid_meta("flipped").any()
    assert np.array_equal(task.valid_meta("given"), task.valid_meta("class"))


def test_mislabeled_sport_flips_reach_every_other_class():
    task = make_task("mislabeled-sport", "full")
    given, true = task.train_meta("given"), task.train_meta("class")
    for cls in range(len(SPORTS)):
        wrong = given[(true == cls) & (given != true)]
        assert set(wrong.tolist()) == set(range(len(SPORTS))) - {cls}


@pytest.mark.parametrize("size", ["small", "full"])
def test_mislabeled_sport_validation_terms_are_unseen_in_training(size):
    task = make_task("mislabeled-sport", size)
    train_terms, valid_terms = set(task.train_meta("term")), task.valid_meta("term").tolist()
    assert len(set(valid_terms)) == len(valid_terms)
    assert not train_terms & set(valid_terms)
    assert not any(f'"{t}"' in s["messages"][0]["content"] for s in task.train for t in valid_terms)
    for sample in task.train + task.valid:
        assert sample["meta"]["term"] in SPORT_TERMS[SPORTS[sample["meta"]["class"]]]


def test_mislabeled_sport_small_training_terms_are_distinct_per_class():
    task = make_task("mislabeled-sport", "small")
    terms, classes = task.train_meta("term"), task.train_meta("class")
    assert all(len(set(terms[classes == c])) == 8 for c in range(len(SPORTS)))


def test_mislabeled_sport_questions_come_from_the_templates():
    task = make_task("mislabeled-sport", "full")
    choices = "football, tennis, basketball or golf"
    used = set()
    for sample in task.train + task.valid:
        question = sample["messages"][0]["content"]
        forms = [t.format(term=sample["meta"]["term"], choices=choices) for t in SPORT_TEMPLATES]
        assert question in forms
        used.add(forms.index(question))
    assert used == set(range(len(SPORT_TEMPLATES)))


def test_sport_terms_are_distinct_and_name_no_sport():
    terms = [t.lower() for sport in SPORTS for t in SPORT_TERMS[sport]]
    assert all(len(SPORT_TERMS[sport]) >= 15 for sport in SPORTS)
    assert len(set(terms)) == len(terms)
    assert not any(sport in t for sport in SPORTS for t in terms)


def test_selection_corrupts_forty_percent_and_leaves_the_rest():
    task = make_task("selection", "full")
    clean = task.train_meta("clean_label").astype(bool)
    assert (~clean).sum() == round(CORRUPT_SHARE * len(task.train))
    assert task.valid_meta("clean_label").all()
    # A clean answer ends with a full stop; a corrupted one has lost words or gained fillers.
    fillers = [any(w in FILLERS for w in s["response"].split()) for s in task.train]
    assert not any(f for f, c in zip(fillers, clean, strict=True) if c)
    assert any(f for f, c in zip(fillers, clean, strict=True) if not c)


def test_corrupt_deletes_or_inserts_a_span():
    rng = random.Random(0)
    answer = "one two three four five six seven eight"
    for _ in range(200):
        out = corrupt(answer, rng).split()
        fillers = [w for w in out if w in FILLERS]
        if fillers:
            assert [w for w in out if w not in FILLERS] == answer.split()
        else:
            assert 1 <= len(out) < 8 and len(out) == len(set(out))


def test_a_wrong_pair_keeps_the_question_and_the_words_and_changes_one_fact():
    for seed in range(60):
        (question, right), (same_question, wrong) = (qa_pair(random.Random(seed), wrong=flag)
                                                      for flag in (False, True))
        assert same_question == question and wrong != right
        right_words, wrong_words = ({w.strip(".,") for w in text.split()} for text in (right, wrong))
        # One stated fact (a capital may be two words): the rest of the answer is the same.
        assert 1 <= len(right_words - wrong_words) <= 2 and 1 <= len(wrong_words - right_words) <= 2, \
            (right, wrong)


def test_right_pairs_are_drawn_as_before_wrong_answers_existed():
    # The digest of the first 50 pairs of seed 7 and the generator's next draw, from qa_pair as
    # it was before the ``wrong`` flag: the selection and downstream tasks must not change.
    rng = random.Random(7)
    pairs = [qa_pair(rng) for _ in range(50)]
    digest = hashlib.sha256(repr((pairs, rng.random())).encode()).hexdigest()
    assert digest == "922fae36c171fa698e63a09b51d4e2c19910ebed750fb829795986a5058808c9"


@pytest.mark.parametrize("corruption", ["words", "facts"])
def test_downstream_pools_corrupt_forty_percent(corruption):
    task = make_downstream("full", 1, corruption)
    clean = np.array([s["meta"]["clean_label"] for s in task.pool], dtype=bool)
    assert (~clean).sum() == round(CORRUPT_SHARE * len(task.pool))
    fillers = [any(w in FILLERS for w in s["response"].split()) for s in task.pool]
    if corruption == "facts":  # fluent answers: no filler words, every one a whole sentence
        assert not any(fillers) and all(s["response"].endswith(".") for s in task.pool)
    else:
        assert any(fillers)


@pytest.mark.parametrize("question,fact", [("What is the capital of India?", "New Delhi"),
                                           ("How many legs does a crab have?", "10"),
                                           ("What is 29 plus 60?", "89"),
                                           ("What is the opposite of loud?", "quiet"),
                                           ("How many centimeters are in 7 meters?", "700")])
def test_the_fact_sample_ends_at_the_stated_fact(question, fact):
    answer = next(a for q, a in (qa_pair(random.Random(seed)) for seed in range(500)) if q == question)
    sample = {"id": "x", "prompt": f"Question: {question}\nAnswer: ", "response": answer}
    found = fact_sample(sample)
    assert found["response"] == f" {fact}"
    assert found["prompt"] + found["response"] == sample["prompt"] + answer[:answer.index(fact) + len(fact)]


def test_every_downstream_answer_states_a_fact():
    for corruption in ("words", "facts"):
        task = make_downstream("full", 2, corruption)
        for sample in task.valid + task.held_out:
            assert fact_sample(sample)["response"].strip()


def test_sample_text_covers_every_form():
    assert sample_text({"prompt": "a ", "response": "b"}) == "a b"
    assert sample_text({"messages": [{"role": "user", "content": "x"},
                                     {"role": "assistant", "content": "y"}]}) == "x\ny"
    assert sample_text({"text": "t"}) == "t"


def test_unknown_task_or_size_is_refused():
    with pytest.raises(ValueError, match="unknown task"):
        make_task("nope")
    with pytest.raises(ValueError, match="unknown size"):
        make_task("math", "huge")


# ------------------------------------------------------------------- metrics


def test_roc_auc_by_hand():
    # Positives 0.9, 0.4; negatives 0.8, 0.1: pairs won 2 (0.9 > both), 1 (0.4 > 0.1) of 4.
    assert metrics.roc_auc([0.9, 0.8, 0.4, 0.1], [1, 0, 1, 0]) == pytest.approx(0.75)
    assert metrics.roc_auc([1, 1, 0], [1, 0, 0]) == pytest.approx(0.75)  # a tie counts one half
    assert metrics.roc_auc([3, 2, 1], [1, 1, 0]) == 1.0
    with pytest.raises(ValueError, match="one positive and one negative"):
        metrics.roc_auc([1, 2], [1, 1])


def test_roc_auc_equals_the_area_under_roc_curve():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 50).astype(float)  # many ties
    labels = rng.random(50) < 0.4
    fpr, tpr = metrics.roc_curve(scores, labels)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc(scores, labels))


def test_identification_metrics_by_hand():
    train_classes = np.array([0, 0, 1, 1])
    valid_classes = np.array([0, 1])
    values = np.array([[5.0, 0.0],
                       [1.0, 3.0],
                       [2.0, 4.0],
                       [0.0, 1.0]])
    # Column 0 (class 0): positives 5, 1 vs negatives 2, 0: 3 of 4 pairs -> 0.75; top 2 = rows 0, 2.
    # Column 1 (class 1): positives 4, 1 vs negatives 0, 3: 3 of 4 -> 0.75; top 2 = rows 2, 1.
    result = metrics.identification_metrics(values, train_classes, valid_classes)
    assert result["auc_mean"] == pytest.approx(0.75)
    assert result["auc_std"] == pytest.approx(0.0)
    assert result["recall_mean"] == pytest.approx(0.5)
    assert result["recall_n"] == 2


def test_mislabel_metrics_use_minus_the_value():
    values = np.array([-3.0, 2.0, -1.0, 4.0, 0.5])
    flipped = np.array([1, 0, 0, 0, 1])
    # -values of flipped: 3, -0.5; of clean: -2, 1, -4 -> wins 3 + 2 of 6.
    result = metrics.mislabel_metrics(values, flipped)
    assert result["auc_mean"] == pytest.approx(5 / 6)
    assert result["recall_mean"] == pytest.approx(0.5)  # lowest two: -3 (flipped), -1 (clean)
    assert result["clean_share_top"] == pytest.approx(2 / 3)  # highest three: 4, 2 clean; 0.5 flipped


def test_clean_share_of_a_selection():
    values = np.arange(10.0)  # highest values last
    clean = np.array([0, 0, 0, 0, 0, 0, 0, 1, 0, 1])
    assert metrics.clean_share(values, clean, 0.1) == 1.0  # top 1: index 9
    assert metrics.clean_share(values, clean, 0.3) == pytest.approx(2 / 3)  # 9, 8, 7
    result = metrics.selection_metrics(values, clean)
    assert result["clean_share_0.1"] == 1.0 and result["recall_mean"] == 1.0
    assert result["clean_share_all"] == pytest.approx(0.2)


@pytest.mark.parametrize("size", ["small", "full"])
def test_answers_tasks_share_their_pool_and_corrupt_it_three_ways(size):
    small_valid, large_valid = make_task("answers", size, 2), make_task("answers-64", size, 2)
    assert small_valid.train == large_valid.train
    assert (len(small_valid.valid), len(large_valid.valid)) == (16, 64)
    rights = {answer_chat(d, i)[0]: answer_chat(d, i)[1]
              for d in range(len(DOMAINS)) for i in range(len(DOMAINS[d][2]))}
    kinds = [s["meta"]["corruption"] for s in small_valid.train]
    assert kinds.count("none") == len(kinds) - round(0.3 * len(kinds))
    assert {k: kinds.count(k) for k in ("misaligned", "shuffled", "truncated")} == {
        k: round(0.3 * len(kinds)) // 3 for k in ("misaligned", "shuffled", "truncated")}
    for sample in small_valid.train:
        question, answer = (m["content"] for m in sample["messages"][1:])
        right, kind = rights[question], sample["meta"]["corruption"]
        assert sample["meta"]["clean_label"] == int(kind == "none")
        if kind == "none":
            assert answer == right
        elif kind == "truncated":
            assert answer == " ".join(right.split()[:2])
        elif kind == "shuffled":
            assert answer != right and sorted(answer.split()) == sorted(right.split())
        else:
            assert answer != right and answer in rights.values()
    assert all(s["meta"]["clean_label"] == 1 for s in large_valid.valid)


def test_answers_near_misaligns_within_the_questions_domain():
    far, near = make_task("answers", "full", 1), make_task("answers-near", "full", 1)
    assert near.valid == far.valid
    domain_of = {answer_chat(d, i)[1]: d for d in range(len(DOMAINS)) for i in range(len(DOMAINS[d][2]))}
    domain_of |= {answer_chat(d, i)[0]: d for d in range(len(DOMAINS)) for i in range(len(DOMAINS[d][2]))}
    misaligned = 0
    for a, b in zip(far.train, near.train, strict=True):
        assert a["messages"][1] == b["messages"][1] and a["meta"] == b["meta"]
        question, answer = (m["content"] for m in b["messages"][1:])
        if b["meta"]["corruption"] == "misaligned":
            misaligned += 1
            assert domain_of[answer] == domain_of[question] != domain_of[a["messages"][2]["content"]]
            assert answer != answer_chat(*next((d, i) for d in range(len(DOMAINS))
                                               for i in range(len(DOMAINS[d][2]))
                                               if answer_chat(d, i)[0] == question))[1]
    assert misaligned == round(0.3 * len(near.train)) // 3


@pytest.mark.parametrize("size", ["small", "full"])
def test_targeted_pool_corrupts_each_kind_and_keeps_targets_out_of_it(size):
    task = make_targeted(size, 3)
    right = {kind.question(i): kind.answer(i) for kind in KINDS.values() for i in kind.items}
    assert [s["id"] for s in task.pool] == [f"pool-{i}" for i in range(len(task.pool))]
    for name in KINDS:
        mine = [s for s in task.pool if s["meta"]["kind"] == name]
        kinds = [s["meta"]["corruption"] for s in mine]
        bad = round(0.3 * TARGETED_POOL[size])
        assert len(mine) == TARGETED_POOL[size] and kinds.count("none") == len(mine) - bad
        assert (kinds.count("wrong"), kinds.count("broken")) == ((bad + 1) // 2, bad // 2)
        for sample in mine:
            question, answer = (m["content"] for m in sample["messages"][1:])
            corruption = sample["meta"]["corruption"]
            assert sample["meta"]["clean_label"] == int(corruption == "none")
            if corruption == "none":
                assert answer == right[question]
            elif corruption == "broken":
                assert answer == right[question][:len(right[question]) // 2]
            else:
                assert answer != right[question] and answer in right.values()
    asked = {s["messages"][1]["content"] for s in task.pool}
    assert set(task.valid) == set(task.held_out) == set(TARGETS)
    for name in TARGETS:
        questions = [s["messages"][1]["content"] for s in task.valid[name] + task.held_out[name]]
        counts = (len(task.valid[name]), len(task.held_out[name]))
        assert counts == (TARGETED_VALID[size], TARGETED_HELD_OUT[size])
        assert len(set(questions)) == len(questions) and not asked.intersection(questions)
        assert all(s["messages"][2]["content"] == right[s["messages"][1]["content"]]
                   for s in task.valid[name] + task.held_out[name])
    assert in_words(37) == "thirty-seven" and in_words(40) == "forty" and in_words(13) == "thirteen"


def test_targeted_generator_is_pinned():
    # Committed before any method ran on it, then its targets chosen by the calibration (the
    # plus kind was not learned in the steps given): a change of the generator changes this.
    task = make_targeted("full", 0)
    digest = hashlib.sha256(repr((task.pool, task.valid, task.held_out)).encode()).hexdigest()
    assert digest == "aafa13ac0abfaec6870da1911f25d56e422cb7774ec37d8a25f7ea18896febb0"
