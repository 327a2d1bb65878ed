"""``forvalue demo``: the whole pipeline on a small mislabelled chat task, no input needed.

A seeded generator writes short question/answer chats where a fifth of the training answers
are wrong; For-Value scores every training sample against a clean validation set of the same
task, and the demo reports how well low values find the wrong answers (ROC AUC), the most and
least valuable samples with the tokens that drove their values, and a plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from forvalue.engine.atomic import write_atomically
from forvalue.engine.valuation.ranking import roc_auc

MODEL = "smollm2-135m"
# The options of forvalue select (ValuationConfig.for_command): the preconditioned value with
# cosine normalisation and the skip readout on response tokens. AUC of this task on seeds 0-4:
# 0.92-0.97 (without the readout 0.93-0.97); cosine alone 0.95-1.00, preconditioned alone
# 0.72-0.89, the paper's value 0.54-0.87 (bench/results/quality/demo_variants.json); across the
# quality tasks the combination is best.
N_TRAIN, N_VALID, WRONG_SHARE = 60, 15, 0.2
SHOWN = 3  # samples shown at each end of the ranking
SHOWN_TOKENS = 3  # tokens shown per sample

# The task: "What is the opposite of X?", answered in a full sentence. Every word appears once
# and no two pairs are near-synonyms (win/lose but not victory/defeat), so a wrong answer
# (another pair's opposite) is never also right. Measured against sentiment, colours,
# continents, capitals and sums, and one-word answers: this task and answer form gave the
# best AUC with the 135M model.
OPPOSITES: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("old", "young"),
    ("tall", "short"), ("rich", "poor"), ("wet", "dry"), ("open", "closed"), ("early", "late"),
    ("hard", "soft"), ("loud", "quiet"), ("full", "empty"), ("thick", "thin"), ("strong", "weak"),
    ("clean", "dirty"), ("good", "bad"), ("left", "right"), ("day", "night"), ("black", "white"),
    ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("first", "last"), ("high", "low"),
    ("near", "far"), ("true", "false"), ("love", "hate"), ("cheap", "expensive"), ("heavy", "light"),
    ("easy", "difficult"), ("alive", "dead"), ("inside", "outside"), ("above", "below"),
    ("north", "south"), ("east", "west"), ("sweet", "sour"), ("friend", "enemy"),
    ("question", "answer"), ("boy", "girl"), ("king", "queen"), ("father", "mother"),
    ("brother", "sister"), ("summer", "winter"), ("come", "go"), ("give", "take"), ("laugh", "cry"),
    ("smooth", "rough"), ("deep", "shallow"), ("sharp", "blunt"), ("brave", "cowardly"),
    ("asleep", "awake"), ("before", "after"), ("always", "never"), ("on", "off"),
    ("accept", "refuse"), ("polite", "rude"), ("safe", "dangerous"), ("public", "private"),
    ("forward", "backward"), ("start", "finish"), ("remember", "forget"), ("add", "subtract"),
    ("increase", "decrease"), ("entrance", "exit"), ("war", "peace"), ("together", "apart"),
    ("generous", "selfish"), ("wild", "tame"), ("guilty", "innocent"), ("import", "export"),
    ("attack", "defend"), ("minimum", "maximum"), ("floor", "ceiling"), ("sunrise", "sunset"),
    ("visible", "invisible"), ("pass", "fail"), ("lend", "borrow"), ("teacher", "student"),
    ("hero", "villain"), ("plus", "minus"), ("odd", "even"), ("inhale", "exhale"),
    ("vertical", "horizontal"), ("arrival", "departure"), ("major", "minor"),
    ("temporary", "permanent"), ("include", "exclude"), ("host", "guest"), ("freeze", "melt"),
    ("sink", "float"), ("catch", "throw"), ("positive", "negative"), ("urban", "rural"),
    ("wise", "foolish"), ("shout", "whisper"), ("optimist", "pessimist"),
)


@dataclass(frozen=True)
class DemoTask:
    """Chat samples ``{"id", "messages", "meta"}``; ``meta`` (ignored by the engine) keeps the
    ground truth: ``mislabelled`` and the ``correct`` answer."""

    train: list[dict[str, Any]]
    valid: list[dict[str, Any]]

    @property
    def mislabelled(self) -> np.ndarray:
        return np.array([s["meta"]["mislabelled"] for s in self.train], dtype=bool)


def make_task(seed: int = 0, n_train: int = N_TRAIN, n_valid: int = N_VALID,
              wrong_share: float = WRONG_SHARE) -> DemoTask:
    """``n_train`` training chats, ``round(wrong_share * n_train)`` of them answered with another
    item's answer, and ``n_valid`` clean validation chats on other items; seeded."""
    if n_train + n_valid > len(OPPOSITES):
        raise ValueError(f"the demo task has {len(OPPOSITES)} items, {n_train + n_valid} asked for")
    rng = random.Random(seed)
    items = rng.sample(OPPOSITES, n_train + n_valid)
    wrong = set(rng.sample(range(n_train), round(wrong_share * n_train)))
    train = [_chat(f"train-{i:02d}", item, _wrong_answer(rng, item) if i in wrong else None)
             for i, item in enumerate(items[:n_train])]
    valid = [_chat(f"valid-{i:02d}", item) for i, item in enumerate(items[n_train:])]
    return DemoTask(train, valid)


def _chat(sample_id: str, item: tuple[str, str], wrong: str | None = None) -> dict[str, Any]:
    word, opposite = item
    return {
        "id": sample_id,
        "messages": [
            {"role": "user", "content": f'What is the opposite of "{word}"?'},
            {"role": "assistant", "content": f'The opposite of "{word}" is "{wrong or opposite}".'},
        ],
        "meta": {"mislabelled": wrong is not None, "correct": opposite},
    }


def _wrong_answer(rng: random.Random, item: tuple[str, str]) -> str:
    return rng.choice([opposite for _, opposite in OPPOSITES if opposite != item[1]])


@dataclass(frozen=True)
class DemoResult:
    """What a run measured: the AUC, the value of each training sample, stage timings, files."""

    auc: float
    values: np.ndarray
    seconds: dict[str, float]
    files: list[Path]


def run_demo(out: str | os.PathLike[str], *, seed: int = 0, model_name: str = MODEL,
             stream: IO[str] | None = None) -> DemoResult:
    """Load the model, value a generated task, print a report and write its files to ``out``."""
    from forvalue.engine import Valuator, load_model
    from forvalue.engine.config import ValuationConfig

    stream = stream or sys.stdout
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # early: a bad --out fails before minutes of work
    seconds: dict[str, float] = {}
    hint = " (the first load converts the embedded model: about a minute)" if model_name == MODEL else ""
    print(f"Loading {model_name}{hint} ...", file=stream, flush=True)
    with _timed(seconds, "load"):
        model = load_model(model_name)
    task = make_task(seed)
    valuator = Valuator(model, config=ValuationConfig.for_command("demo"))
    with _timed(seconds, "reference"):
        reference = valuator.reference(task.valid)
    with _timed(seconds, "score"):
        values, tokens = valuator.score(task.train, reference, token_values=True)
    # Low value = suspicious, so the AUC ranks the mislabelled samples by -value.
    auc = roc_auc(-values, task.mislabelled)
    rows = [_row(sample, value, token_values, model.tokenizer)
            for sample, value, token_values in zip(task.train, values, tokens, strict=True)]
    options = _options(valuator.config)
    files = _write_outputs(out, task, rows, auc, _summary(model_name, seed, task, auc, seconds, options))
    _report(stream, model_name, seed, task, rows, auc, seconds, files, options)
    return DemoResult(auc, values, seconds, files)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``forvalue demo`` (none is needed)."""
    parser.description = ("Build a small seeded chat task with a fifth of the answers wrong, value every "
                          "training sample against a clean validation set, and report how well low "
                          "values find the wrong answers. Needs no arguments and no network.")
    parser.add_argument("--out", type=Path, default=Path("forvalue-demo"),
                        help="folder for values.jsonl, train.jsonl, valid.jsonl, summary.json and "
                             "values.png (default: ./forvalue-demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated task (default: 0)")
    parser.add_argument("--model", default=MODEL,
                        help=f"embedded model name or local Hugging Face model folder (default: {MODEL})")


def run_demo_command(args: argparse.Namespace) -> int:
    """``forvalue demo``; returns the exit status."""
    run_demo(args.out, seed=args.seed, model_name=args.model)
    return 0


@contextmanager
def _timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    """Record the block's wall time as ``seconds[key]``."""
    start = time.perf_counter()
    yield
    seconds[key] = time.perf_counter() - start


# ------------------------------------------------------------------------------ results


def _row(sample: dict[str, Any], value: float, token_values: Any, tokenizer: Any) -> dict[str, Any]:
    """One line of values.jsonl: the value, the ground truth and every label token's share."""
    texts = [tokenizer.decode([int(t)]) for t in token_values.token_ids]
    return {
        "id": sample["id"],
        "value": float(value),
        "mislabelled": sample["meta"]["mislabelled"],
        "num_tokens": len(texts),
        "question": sample["messages"][0]["content"],
        "answer": sample["messages"][1]["content"],
        "token_values": [[text, float(v)] for text, v in zip(texts, token_values.values, strict=True)],
    }


def _options(config: Any) -> dict[str, Any]:
    """How the demo valued (its ValuationConfig): the options of forvalue select, on response
    tokens."""
    from forvalue.engine.config import COMMAND_DEFAULTS

    return {"loss_on": config.loss_on, **{key: getattr(config, key) for key in COMMAND_DEFAULTS["demo"]}}


def _summary(model_name: str, seed: int, task: DemoTask, auc: float, seconds: dict[str, float],
             options: dict[str, Any]) -> dict[str, Any]:
    return {"model": model_name, "seed": seed, **options,
            "auc": auc, "n_train": len(task.train), "n_valid": len(task.valid),
            "n_mislabelled": int(task.mislabelled.sum()),
            "seconds": {key: round(value, 2) for key, value in seconds.items()}}


def _write_outputs(out: Path, task: DemoTask, rows: list[dict[str, Any]], auc: float,
                   summary: dict[str, Any]) -> list[Path]:
    outputs: list[tuple[str, Callable[[IO[Any]], None], bool]] = [
        ("values.jsonl", lambda f: _write_jsonl(f, rows), False),
        ("train.jsonl", lambda f: _write_jsonl(f, task.train), False),
        ("valid.jsonl", lambda f: _write_jsonl(f, task.valid), False),
        ("summary.json", lambda f: f.write(json.dumps(summary, indent=2) + "\n"), False),
        ("values.png", lambda f: _plot(f, rows, auc, summary), True),
    ]
    for name, write, binary in outputs:
        write_atomically(out / name, write, binary=binary)
    return [out / name for name, _, _ in outputs]


def _write_jsonl(file: IO[str], records: list[dict[str, Any]]) -> None:
    for record in records:
        file.write(json.dumps(record, ensure_ascii=False) + "\n")


def _plot(file: IO[bytes], rows: list[dict[str, Any]], auc: float, summary: dict[str, Any]) -> None:
    """A strip of values, right answers above wrong ones; the lowest few labelled."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe before pyplot is imported
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)  # jitter only, so the plot is the same on every run
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=120)
    heights = {r["id"]: (0.0 if r["mislabelled"] else 1.0) + rng.uniform(-0.18, 0.18) for r in rows}
    ticks = []
    for wrong, color in ((False, "#1f77b4"), (True, "#d62728")):
        group = [r for r in rows if r["mislabelled"] == wrong]
        ax.scatter([r["value"] for r in group], [heights[r["id"]] for r in group], s=36, color=color,
                   alpha=0.8, edgecolor="white", linewidth=0.5)
        ticks.append(f"{'wrong' if wrong else 'right'} answers ({len(group)})")
    # The lowest few, labelled on staggered lines below the strip so that labels never overlap.
    for k, r in enumerate(sorted(rows, key=lambda r: r["value"])[:SHOWN]):
        ax.annotate(_quoted_answer(r["answer"]), (r["value"], heights[r["id"]]),
                    xytext=(r["value"], -0.45 - 0.17 * k), va="center", fontsize=8, color="#444444",
                    arrowprops={"arrowstyle": "-", "color": "#999999", "linewidth": 0.6,
                                "relpos": (0, 0.5), "shrinkB": 3})
    ax.set_yticks([1, 0], ticks)
    ax.set_ylim(-0.5 - 0.17 * SHOWN, 1.5)
    ax.set_xlabel(f"value (normalize={summary['normalize']}, loss_on={summary['loss_on']}); "
                  "lower = more suspicious")
    ax.set_title(f"For-Value of {summary['n_train']} training chats, {summary['model']}: "
                 f"AUC {auc:.3f} for finding the wrong answers", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, format="png")
    plt.close(fig)


def _quoted_answer(answer: str) -> str:
    """'The opposite of "hot" is "cold".' -> '"hot" -> "cold"' (a short plot label)."""
    words = answer.split('"')[1::2]
    return " → ".join(f'"{w}"' for w in words) if len(words) == 2 else answer


# ------------------------------------------------------------------------------ report


def _report(stream: IO[str], model_name: str, seed: int, task: DemoTask, rows: list[dict[str, Any]],
            auc: float, seconds: dict[str, float], files: list[Path], options: dict[str, Any]) -> None:
    n_wrong = int(task.mislabelled.sum())
    ranked = sorted(rows, key=lambda r: r["value"], reverse=True)
    lines = [
        "",
        f"For-Value on {model_name}, " + ", ".join(f"{k}={v}" for k, v in options.items()),
        f"Task (seed {seed}): {len(task.train)} training chats 'What is the opposite of X?', "
        f"{n_wrong} of them with a wrong answer; {len(task.valid)} clean validation chats.",
        "",
        f"AUC of finding the wrong answers by low value: {auc:.3f}"
        "  (1 = every wrong answer below every right one, 0.5 = chance)",
        f"Wrong answers among the {n_wrong} lowest values: "
        f"{sum(r['mislabelled'] for r in ranked[-n_wrong:])} of {n_wrong}",
        "",
        "Most valuable:",
        *_describe(ranked[:SHOWN]),
        "Least valuable:",
        *_describe(ranked[::-1][:SHOWN]),
        "Token contributions sum to the value. The hidden states (the last layer's, and those at 3/4",
        "of the depth: skip_depth) are whitened by the validation set's covariance",
        "(precondition=input), so values follow content rather than the direction all states share;",
        "with normalize=cosine each G(x) is divided by its norm: a wrong answer's surprising token",
        "adds much to the norm but matches nothing in the validation set.",
        "",
        "Time: " + ", ".join(f"{key} {value:.1f} s" for key, value in seconds.items())
        + f", total {math.fsum(seconds.values()):.1f} s",
        f"Wrote to {files[0].parent}: " + ", ".join(path.name for path in files),
    ]
    print("\n".join(lines), file=stream, flush=True)


def _describe(rows: list[dict[str, Any]]) -> list[str]:
    """Two lines per sample: value, verdict and text; its largest token contributions."""
    lines = []
    for r in rows:
        verdict = "WRONG" if r["mislabelled"] else "right"
        tokens = sorted(r["token_values"], key=lambda tv: abs(tv[1]), reverse=True)[:SHOWN_TOKENS]
        shown = ", ".join(f"{text!r} {value:+.4f}" for text, value in tokens)
        lines.append(f"  {r['value']:+.4f}  {r['id']}  [{verdict}]  {r['question']}  ->  {r['answer']}")
        lines.append(f"           top tokens: {shown}")
    return lines
