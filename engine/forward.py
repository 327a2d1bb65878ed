"""Run the backbone over encoded samples and gather each sample's label-token states."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .model import ValuationModel
from .samples import EncodedSample, SampleError


@dataclass
class LabelStates:
    """A sample's label tokens: the hidden state predicting each one, and the label."""

    index: int
    sample: EncodedSample
    hidden: torch.Tensor  # (n, d), model dtype, on the model's device
    labels: torch.Tensor  # (n,) int64
    positions: list[int]  # token positions k of the labels (predicted from k - 1)
    squared_norm: float | None = None  # ||G(x)||^2, filled in when a normalisation needs it


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group indices, longest first, so that ``len(batch) * longest <= batch_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def label_states(model: ValuationModel, encoded: Sequence[EncodedSample | None], *,
                 batch_tokens: int, progress: bool = True,
                 desc: str = "forward") -> Iterator[list[LabelStates | SampleError]]:
    """Yield, per forward batch, the label states of its samples or a SampleError for each
    sample whose hidden states are not finite or whose ids the model does not know."""
    present = [i for i, sample in enumerate(encoded) if sample is not None]
    lengths = [len(encoded[i].input_ids) for i in present]
    batches = length_batches(lengths, batch_tokens)
    vocab = model.backbone.get_input_embeddings().num_embeddings
    with tqdm(total=sum(lengths), desc=desc, unit="tok", disable=not progress or None,
              leave=False) as bar:
        for batch in batches:
            samples = [(present[i], encoded[present[i]]) for i in batch]
            yield _run_batch(model, samples, vocab)
            bar.update(sum(lengths[i] for i in batch))


def _run_batch(model: ValuationModel, samples: list[tuple[int, EncodedSample]],
               vocab: int) -> list[LabelStates | SampleError]:
    results: dict[int, LabelStates | SampleError] = {}
    runnable = []
    for index, sample in samples:
        if max(sample.input_ids) >= vocab:
            results[index] = SampleError(
                f"token id {max(sample.input_ids)} is outside the model's vocabulary ({vocab})",
                sample_id=sample.id, where=sample.where)
        else:
            runnable.append((index, sample))
    if runnable:
        hidden = _forward_padded(model, [sample for _, sample in runnable])
        for row, (index, sample) in enumerate(runnable):
            results[index] = _gather(index, sample, hidden[row])
    return [results[index] for index, _ in samples]


def _forward_padded(model: ValuationModel, samples: list[EncodedSample]) -> torch.Tensor:
    # Right padding: with a causal mask, real tokens never attend to the pads after them.
    longest = max(len(sample.input_ids) for sample in samples)
    ids = torch.zeros((len(samples), longest), dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, :len(sample.input_ids)] = torch.tensor(sample.input_ids)
        mask[row, :len(sample.input_ids)] = 1
    return model.hidden_states(ids, mask)


def _gather(index: int, sample: EncodedSample, hidden: torch.Tensor) -> LabelStates | SampleError:
    positions = sample.label_positions()
    predicting = torch.tensor(positions, device=hidden.device) - 1
    states = hidden[predicting]
    if not torch.isfinite(states).all():
        return SampleError("the model produced non-finite hidden states (NaN or inf) for this sample",
                           sample_id=sample.id, where=sample.where)
    labels = torch.tensor([sample.input_ids[k] for k in positions], device=hidden.device)
    return LabelStates(index, sample, states, labels, positions)
