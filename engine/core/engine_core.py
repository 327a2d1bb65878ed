"""The engine core: admission, and one step = schedule, run, postprocess.

Modelled on nano-vllm's ``LLMEngine.step()`` and vLLM v1's ``EngineCore``: the scheduler
picks a step (engine/core/scheduler.py), the runner forwards it and gathers label states
(engine/core/runner.py), the scheduler takes the runner's output and settles failures itself
(``update_from_output``), and the kernels run for the requests the step completed, according
to each request's task: scored against a resident reference (``ScoreTask``), accumulated into
a reference being built (``BuildTask``), or handed back as label states (no task: pairwise and
self-values, which need several samples' states at once).

Both front ends are loops over ``step()``: the offline Valuator (``run_to_completion``) and the
serving AsyncEngine, which calls ``step()`` in a worker thread; the lock keeps the scheduler
consistent while the event loop admits and cancels requests during a forward.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import ValuationConfig
from ..inputs.samples import EncodedSample, encode_sample
from ..inputs.vision import ImageSamples
from ..model.loading import ValuationModel
from ..model.skip import with_skip_readout
from ..outputs import Finished, RunnerOutput, StepOutput
from ..valuation.label_math import LabelMath
from ..valuation.scoring import ReferenceBuilder, ResidentReference
from .request import Request
from .runner import ModelRunner
from .scheduler import Scheduler


@dataclass(frozen=True)
class ScoreTask:
    """Value the request against a resident reference (optionally keeping per-token values)."""

    reference: ResidentReference
    token_values: bool = False


@dataclass(frozen=True)
class BuildTask:
    """Add the request's ``G(b)`` (and moments) to a reference being built."""

    builder: ReferenceBuilder


class EngineCore:
    """One resident model, its scheduler and runner, and the step that drives them."""

    def __init__(self, model: ValuationModel, config: ValuationConfig) -> None:
        # Made ready here, once for both front ends: the skip readout, when asked for, is part
        # of the model every route values with (its states [h, r] and head [W, 0]).
        self.model = model = with_skip_readout(model, config.skip_depth)
        self.config = config
        self.runner = ModelRunner(model, attention=config.attention, batch_tokens=config.batch_tokens)
        self.scheduler = Scheduler(config, split_long=self.runner.splits_long)
        self.math = LabelMath(model, config.backend)
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Drop every queued request (what a run that raised midway left behind)."""
        with self._lock:
            self.scheduler = Scheduler(self.config, split_long=self.runner.splits_long)

    # ------------------------------------------------------------------ admission

    def encode(self, sample: Any, *, where: str, index: int | None = None,
               root: Path | None = None) -> EncodedSample:
        """Every check of a sample, once: its form and labels, its images (an image-text
        model; relative paths start at ``root``, else the current directory), its length
        against the model's context, its token ids against the embedding table. Raises
        SampleError."""
        images = None if self.model.vision is None else ImageSamples(self.model.vision, root)
        encoded = encode_sample(sample, self.model.tokenizer, where=where, index=index,
                                loss_on=self.config.loss_on, append_eos=self.config.append_eos,
                                max_length=self.config.max_length,
                                context_length=self.model.context_length, images=images)
        self.runner.check_sample(encoded, index)
        return encoded

    def add_request(self, request: Request) -> None:
        """Queue a request of an encoded sample; raises QueueFull when the queue is full."""
        with self._lock:
            self.scheduler.add(request)

    def cancel(self, request: Request) -> bool:
        with self._lock:
            return self.scheduler.cancel(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_room(self) -> bool:
        return self.scheduler.has_room()

    # ------------------------------------------------------------------ the step

    def step(self) -> StepOutput:
        """Schedule, run and postprocess one step. A failure of the forward or the kernels (a
        bug, out of memory) fails that step's requests and leaves the engine serving."""
        with self._lock:
            scheduled = self.scheduler.schedule()
        output = StepOutput(expired=scheduled.expired, num_tokens=scheduled.num_tokens)
        if not scheduled.chunks:
            return output
        started = time.monotonic()
        try:
            result = self.runner.execute(scheduled)
        except Exception as error:
            result = RunnerOutput(failed=[(chunk.request, _internal(error)) for chunk in scheduled.chunks])
        with self._lock:
            completed, failed = self.scheduler.update_from_output(scheduled, result)
        reasons = {id(request): str(error) for request, error in result.failed}
        output.failed = [(request, reasons[id(request)]) for request in failed]
        done = {id(request) for request in completed}
        output.finished = [Finished(request, states) for request, states in result.finished
                           if id(request) in done]
        try:
            _postprocess(output.finished)
        except Exception as error:
            output.failed += [(item.request, str(_internal(error))) for item in output.finished]
            output.finished = []
        output.seconds = time.monotonic() - started
        return output

    def run_to_completion(self, *, progress: bool = False, desc: str = "forward") -> Iterator[StepOutput]:
        """Step until every queued request is done (the offline loop), with a progress bar."""
        total = self.scheduler.num_waiting_tokens()
        with tqdm(total=total, desc=desc, unit="tok", disable=not progress or None, leave=False) as bar:
            while self.has_unfinished():
                output = self.step()
                bar.update(output.num_tokens)
                yield output


def _postprocess(finished: list[Finished]) -> None:
    """The kernels for the completed requests, one call per reference or builder."""
    for group in _grouped(finished, lambda item: item.request.task, ScoreTask, lambda t: t.reference):
        scores = group[0].request.task.reference.token_scores([item.states for item in group])
        for item, token_scores in zip(group, scores, strict=True):
            item.token_scores = token_scores
    for group in _grouped(finished, lambda item: item.request.task, BuildTask, lambda t: t.builder):
        group[0].request.task.builder.add([item.states for item in group])


def _grouped(items: list[Finished], task_of: Callable[[Finished], Any], kind: type,
             key: Callable[[Any], Any]) -> list[list[Finished]]:
    groups: dict[int, list[Finished]] = {}
    for item in items:
        task = task_of(item)
        if isinstance(task, kind):
            groups.setdefault(id(key(task)), []).append(item)
    return list(groups.values())


def _internal(error: Exception) -> RuntimeError:
    return RuntimeError(f"internal error: {error!r}")
