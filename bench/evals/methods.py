"""The methods ``forvalue eval`` compares, and what they share in one run.

Names: ``forvalue-{all,response}`` is exact For-Value as the paper defines it (pairwise on
identification tasks, a Reference of the validation set otherwise); ``forvalue-pairwise-...``
the pairwise route where that differs; ``forvalue-mean-...`` / ``forvalue-...-cosine`` the
same with ``normalize="mean"`` (each G divided by its label count, like the per-token mean
loss of the LoRA baselines) or ``"cosine"``;
``forvalue-<loss_on>-precond-<source>[-cosine][-warm]`` the preconditioned value with ``A``
from the validation set (``valid``) or the training pool (``train``: a full extra forward
pass), optionally cosine-normalised, optionally on the model after a one-epoch LoRA warm-up on
the training pool (``-warm``: a backward pass; its time is reported as warm-up); a ``-skip``
suffix adds the skip readout at three quarters of the depth (engine/model/skip.py);
``-cold-plus-warm`` is the sum of a value on the base model and on the warmed-up one (the two
methods' values of the same run, LESS's sum over checkpoints with two checkpoints);
``official-...`` the official code's approximations; the rest are baselines
(bench/evals/baselines.py).
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from forvalue.engine import config

from . import baselines
from .tasks import Task, sample_text

# Both label rules, "all" first (the order of the paper's tables).
LABEL_RULES = tuple(sorted(config.LOSS_ON))
SOURCES = ("valid", "train")
# Depth of the ``-skip`` variants' readout: select's (the scan of docs/design.md, "Skip
# readout", found three quarters of the layers best among 1/4, 1/2, 3/4 and the one before last).
SKIP_DEPTH = config.DATA_SELECTION["skip_depth"]


@dataclass
class Context:
    """What the methods of one run share: the model, the task, the LoRA gradients and the
    warmed-up model."""

    model: Any
    task: Task
    loss_on: str  # objective of the official code and the gradient baselines
    lora_rank: int
    progress: bool
    damping: float | None = None  # None: each source's default
    per_class: str = "all"  # "free": no extra pairwise pass for the per-class mislabel metric
    lora: baselines.LoraGradients | None = None
    lora_cost: dict[str, float] = field(default_factory=dict)
    warm: Any = None
    warm_seconds: float = 0.0
    reference_seconds: float | None = None  # the last method's reference build, if it built one
    raw: dict[str, np.ndarray] = field(default_factory=dict)  # this round's values, per method

    @property
    def by_reference(self) -> bool:
        """Mislabeled and selection value against the validation set as a whole."""
        return self.task.kind != "identification"

    def reduce(self, values: np.ndarray) -> np.ndarray:
        """Values as the task needs them: per pair, or averaged over validation (a method
        that ran the reference route has them averaged already)."""
        return values.mean(axis=1) if values.ndim == 2 and self.by_reference else values

    def valuator(self, loss_on: str, normalize: str = "none", precondition: str | None = None,
                 source: str = "valid", warm: bool = False, skip: bool = False) -> Any:
        from forvalue.engine import Valuator

        options: dict[str, Any] = {"skip_depth": SKIP_DEPTH if skip else None}
        if precondition is not None:
            options |= {"precondition": precondition, "damping": self.damping,
                        "covariance": self.task.train if source == "train" else None}
        model = self.warm_model() if warm else self.model
        return Valuator(model, loss_on=loss_on, normalize=normalize, progress=self.progress, **options)

    def warm_model(self) -> Any:
        """The model after a one-epoch LoRA warm-up on the training pool (built once, on the
        objective of the gradient baselines)."""
        if self.warm is None:
            from forvalue.engine import ValuationConfig, load_model
            from forvalue.engine.warmup import warmup

            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as folder:
                result = warmup(self.model, self.task.train, f"{folder}/adapter", rank=self.lora_rank,
                                config=ValuationConfig(loss_on=self.loss_on), progress=self.progress)
                base = copy.deepcopy(self.model.causal_lm)  # merging changes the module it is given
                self.warm = load_model(base, tokenizer=self.model.tokenizer, device=self.model.device,
                                       dtype=self.model.dtype, adapter=result.adapter)
            self.warm_seconds = time.perf_counter() - start
        return self.warm


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[Context], np.ndarray]
    group: str  # "exact" | "official" | "gradient" | "similarity"
    loss_on: str | None = None  # None: the context's
    uses_lora: bool = False
    uses_warm: bool = False
    reference_only: bool = False  # only where the task values against the whole set
    # Untimed pairwise values of a method that runs the reference route, for metrics that need
    # one value per validation sample (the paper's per-class mislabel AUC).
    pairwise: Callable[[Context], np.ndarray] | None = None
    text_only: bool = False  # reads the samples' text only
    by_default: bool = True  # run when no method is named
    # Methods whose values (of the same run, run first) this one combines; its seconds are theirs
    sources: tuple[str, ...] = ()

    @property
    def takes_images(self) -> bool:
        """Whether the method sees the images of image-text samples: the LoRA warm-up and
        gradients run the language model on the token ids alone."""
        return not (self.text_only or self.uses_lora or self.uses_warm)


# ----------------------------------------------------------------- the methods


def _forvalue(loss_on: str, route: str, normalize: str = "none", precondition: str | None = None,
              source: str = "valid", warm: bool = False,
              skip: bool = False) -> Callable[[Context], np.ndarray]:
    def run(ctx: Context) -> np.ndarray:
        valuator = ctx.valuator(loss_on, normalize, precondition, source, warm, skip)
        if route == "reference" and ctx.by_reference:
            start = time.perf_counter()
            reference = valuator.reference(ctx.task.valid)
            ctx.reference_seconds = time.perf_counter() - start
            return valuator.score(ctx.task.train, reference)
        return valuator.pairwise(ctx.task.train, ctx.task.valid)

    return run


def _exact(name: str, loss_on: str, normalize: str = "none", precondition: str | None = None,
           source: str = "valid", warm: bool = False, skip: bool = False) -> Method:
    """A For-Value method on the reference route, with its pairwise twin for the metrics."""
    options = dict(normalize=normalize, precondition=precondition, source=source, warm=warm, skip=skip)
    return Method(name, _forvalue(loss_on, "reference", **options), "exact", loss_on=loss_on,
                  uses_warm=warm, pairwise=_forvalue(loss_on, "pairwise", **options))


def _preconditioned() -> tuple[Method, ...]:
    return tuple(
        _exact(f"forvalue-{loss_on}-precond-{source}{'-cosine' * cosine}{'-warm' * warm}", loss_on,
               "cosine" if cosine else "none", "input", source, warm)
        for loss_on in LABEL_RULES for source in SOURCES
        for cosine in (False, True) for warm in (False, True))


def _skip() -> tuple[Method, ...]:
    """The skip readout with the paper's value, and with the validation-side preconditioner;
    by default only with both (forvalue select's default), to keep ``--task all`` short; and
    select's default on the warmed-up model (``-warm``, when named)."""
    plain = tuple(
        replace(
            _exact(f"forvalue-{loss_on}{'-precond-valid' * precond}{'-cosine' * cosine}-skip", loss_on,
                   "cosine" if cosine else "none", "input" if precond else None, skip=True),
            by_default=precond and cosine)
        for loss_on in LABEL_RULES for precond in (False, True) for cosine in (False, True))
    warm = tuple(replace(_exact(f"forvalue-{loss_on}-precond-valid-cosine-skip-warm", loss_on, "cosine",
                                "input", warm=True, skip=True), by_default=False)
                 for loss_on in LABEL_RULES)
    both = tuple(_checkpoint_sum(f"forvalue-{loss_on}-precond-valid-cosine-skip") for loss_on in LABEL_RULES)
    return plain + warm + both


def _checkpoint_sum(cold: str) -> Method:
    """``cold``'s value plus its value on the warmed-up model: LESS sums cosines over its
    checkpoints; here the base model and one warm-up epoch, weighted alike (the base model's
    values find what resembles the target, the warmed one's what the pool's majority contradicts)."""
    sources = (cold, f"{cold}-warm")
    return Method(f"{cold}-cold-plus-warm", lambda ctx: sum(ctx.raw[s] for s in sources), "exact",
                  loss_on=cold.split("-")[1], uses_warm=True, by_default=False, sources=sources)


def _official(**options: Any) -> Callable[[Context], np.ndarray]:
    def run(ctx: Context) -> np.ndarray:
        from .parity import official_values

        return official_values(ctx.valuator(ctx.loss_on), ctx.task.train, ctx.task.valid, **options)

    return run


def _autograd(ctx: Context) -> np.ndarray:
    return baselines.autograd_values(ctx.model, ctx.task.train, ctx.task.valid, loss_on=ctx.loss_on,
                                     reference=ctx.by_reference)


def _lora(score: Callable[[baselines.LoraGradients], np.ndarray]) -> Callable[[Context], np.ndarray]:
    return lambda ctx: score(ctx.lora)


def _datainf(grads: baselines.LoraGradients) -> np.ndarray:
    return baselines.datainf_values(grads.blocks(grads.train), grads.blocks(grads.valid))


def _representation(ctx: Context) -> np.ndarray:
    return baselines.representation_similarity(ctx.model, ctx.task.train, ctx.task.valid)


def _rds_plus(pairs: bool) -> Callable[[Context], np.ndarray]:
    def run(ctx: Context) -> np.ndarray:
        return baselines.rds_plus_values(ctx.model, ctx.task.train, ctx.task.valid,
                                         reference=ctx.by_reference and not pairs)

    return run


def _tfidf(ctx: Context) -> np.ndarray:
    texts = [sample_text(s) for s in ctx.task.train], [sample_text(s) for s in ctx.task.valid]
    return baselines.tfidf_similarity(*texts)


METHODS: tuple[Method, ...] = (
    _exact("forvalue-all", "all"),
    _exact("forvalue-response", "response"),
    Method("forvalue-pairwise-all", _forvalue("all", "pairwise"), "exact", loss_on="all",
           reference_only=True),
    Method("forvalue-pairwise-response", _forvalue("response", "pairwise"), "exact",
           loss_on="response", reference_only=True),
    # Each G divided by its label count: the per-token mean loss the LoRA baselines use.
    _exact("forvalue-mean-all", "all", "mean"),
    _exact("forvalue-mean-response", "response", "mean"),
    _exact("forvalue-all-cosine", "all", "cosine"),
    _exact("forvalue-response-cosine", "response", "cosine"),
    *_preconditioned(),
    *_skip(),
    Method("official-total", _official(vocabulary="total_unique"), "official"),
    Method("official-topk5", _official(vocabulary="topk_unique", top_k=5), "official"),
    Method("official-llr0.1", _official(vocabulary="total_unique", lowest_likelihood_ratio=0.1),
           "official"),
    Method("autograd-lastlayer", _autograd, "gradient"),
    Method("lora-tracin", _lora(baselines.tracin_values), "gradient", uses_lora=True),
    Method("lora-less", _lora(baselines.less_values), "gradient", uses_lora=True),
    Method("datainf", _lora(_datainf), "gradient", uses_lora=True),
    Method("repr-cosine", _representation, "similarity"),
    Method("rds-plus", _rds_plus(pairs=False), "similarity", pairwise=_rds_plus(pairs=True)),
    Method("tfidf-cosine", _tfidf, "similarity", text_only=True),
)
METHOD_NAMES = tuple(m.name for m in METHODS)
# What an image task runs by default: the paper's value, the preconditioned variants
# `forvalue select` uses, and the baselines that take images.
IMAGE_TASK_METHODS = ("forvalue-response", "forvalue-response-precond-valid",
                      "forvalue-response-precond-valid-cosine", "autograd-lastlayer", "repr-cosine")


def methods_for(task: Task, names: list[str] | None, *, images: bool = False) -> list[Method]:
    """The methods to run on ``task`` (all that apply when ``names`` is None; on a task
    whose samples hold images, ``IMAGE_TASK_METHODS``)."""
    if names:
        unknown = sorted(set(names) - set(METHOD_NAMES))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHOD_NAMES)}")
    names = names or (list(IMAGE_TASK_METHODS) if images else None)
    chosen = [m for m in METHODS if m.name in names] if names else [m for m in METHODS if m.by_default]
    text_only = [m.name for m in chosen if images and not m.takes_images]
    if text_only:
        raise ValueError(f"{text_only} cannot value samples with images (they read the text only); "
                         f"choose from {[m.name for m in METHODS if m.takes_images]}")
    chosen = [m for m in chosen if task.kind != "identification" or not m.reference_only]
    chosen = _with_sources(chosen)
    if any(m.uses_lora or m.uses_warm for m in chosen):
        _require_peft()
    return chosen


def _with_sources(chosen: list[Method]) -> list[Method]:
    """``chosen`` with the sources of a combined method ahead of it (each method once)."""
    by_name = {m.name: m for m in METHODS}
    ordered: list[Method] = []
    for method in chosen:
        ordered += [by_name[s] for s in method.sources if by_name[s] not in ordered] + [method]
    return list(dict.fromkeys(ordered))


def _require_peft() -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        lora = ", ".join(m.name for m in METHODS if m.uses_lora or m.uses_warm)
        raise ValueError(f"the LoRA baselines and warm-up variants ({lora}) need peft: pip install "
                         f"peft, or leave them out with --methods")
