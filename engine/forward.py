"""Offline forward: encoded samples through the scheduler and the model runner, the same path
the async engine serves from, with the label states yielded step by step."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tqdm.auto import tqdm

from .model import ValuationModel
from .request import Request, RequestStatus
from .runner import LabelStates, ModelRunner
from .samples import EncodedSample, SampleError
from .scheduler import Scheduler, SchedulerConfig

__all__ = ["LabelStates", "label_states"]

# Packed steps of short samples hold this many at most (per-segment attention is a Python loop).
OFFLINE_MAX_SEQS = 256


def label_states(model: ValuationModel, encoded: Sequence[EncodedSample | None], *,
                 batch_tokens: int, progress: bool = True, desc: str = "forward",
                 attention: str = "auto") -> Iterator[list[LabelStates | SampleError]]:
    """Yield, per step, the label states of the samples it completed, or a SampleError for
    each sample whose ids the model does not know or whose hidden states are not finite.
    ``None`` entries (samples that failed to encode) are skipped."""
    runner = ModelRunner(model, attention=attention, batch_tokens=batch_tokens)
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=batch_tokens, max_seqs=OFFLINE_MAX_SEQS))
    unknown_ids: list[LabelStates | SampleError] = []
    total = 0
    for index, sample in enumerate(encoded):
        if sample is None:
            continue
        error = runner.check_sample(sample)
        if error is not None:
            unknown_ids.append(error)
        else:
            scheduler.add(Request(sample, index=index))
            total += len(sample.input_ids)
    if unknown_ids:
        yield unknown_ids
    with tqdm(total=total, desc=desc, unit="tok", disable=not progress or None, leave=False) as bar:
        while scheduler.has_unfinished():
            step = scheduler.schedule()
            outcomes = runner.execute(step)
            for request, outcome in outcomes:
                if isinstance(outcome, SampleError):
                    scheduler.cancel(request, RequestStatus.FAILED)
            scheduler.update(step)
            bar.update(step.num_tokens)
            if outcomes:
                yield [outcome for _, outcome in outcomes]
