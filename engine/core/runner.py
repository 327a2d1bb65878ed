"""The model runner: a resident model, one forward pass per scheduled step, label states out.

A packed step runs as one ragged batch without padding and without an ``N x N`` mask, in one
of three ways, chosen per model family by a capability check on a probe and per device:

- ``varlen``: the requests are concatenated into one row, positions restart at 0 per request,
  and a registered attention function runs causal attention per segment (engine/model/attention.py):
  torch's flash varlen kernel on CUDA in half precision where torch has it, else sdpa per
  segment;
- ``flex``: the same row, with FlexAttention and a document block mask (engine/model/attention.py);
- ``buckets``: length-sorted padded sub-batches (right padding), for a family whose packed
  hidden states do not equal its per-sample ones (or which refuses the packed functions,
  e.g. attention logit softcapping), and for every image-text model: there a sample with
  images runs alone, with its own pixel values and the position ids its family computes
  (Qwen2-VL's 3-D M-RoPE ids), and samples without images run in buckets.

A chunk step runs one chunk of a long request alone, with the model's own attention and a
``DynamicCache`` carried between chunks, positions continuing. Labels never cross request
boundaries: a request's label at position k is predicted by its own hidden state k - 1.

Host synchronisation: a packed step's token ids, positions and segments go to the device in
one transfer (from pinned memory on CUDA), its label rows in another, and the label states of
all its requests are gathered at once. The runner then waits for the device once per step,
for the non-finite check that decides which requests failed (a bucket step once per bucket).
The flash varlen and flex paths read nothing back (``create_block_mask`` reads nothing back
in torch 2.13's source; not yet measured on a GPU); the per-segment sdpa loop reads the
boundaries once per layer, which is why auto never takes it on CUDA.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..config import ATTENTION_MODES
from ..inputs.samples import EncodedSample, SampleError
from ..model.attention import PackedSegments, PackingUnsupported, has_flash_varlen, packed_kwargs, register
from ..model.loading import ValuationModel
from ..outputs import LabelStates, RunnerOutput
from .request import PartialStates, Request
from .scheduler import ScheduledChunk, SchedulerOutput

PACKED_MODES = ("varlen", "flex")
# Probe lengths: ragged, and one longer than a small sliding window.
_PROBE_LENGTHS = (9, 3, 14, 37)

# Forwards toggle the attention implementation of a shared config: one at a time.
_FORWARD_LOCK = threading.Lock()
_PACKING_CHECKS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, str | None]] = \
    weakref.WeakKeyDictionary()


# ---------------------------------------------------------------- capability check


def packing_unsupported_reason(model: ValuationModel, mode: str = "varlen") -> str | None:
    """None when packed hidden states (``mode``: "varlen" or "flex") equal per-sample ones on a
    probe for this model (checked once per backbone and mode); otherwise why not."""
    checks = _PACKING_CHECKS.setdefault(model.backbone, {})
    if mode not in checks:
        checks[mode] = _probe_packing(model, mode)
    return checks[mode]


@torch.inference_mode()
def _probe_packing(model: ValuationModel, mode: str) -> str | None:
    limit = model.context_length or max(_PROBE_LENGTHS)
    lengths = [min(length, limit) for length in _PROBE_LENGTHS]
    generator = torch.Generator().manual_seed(0)
    vocab = model.backbone.get_input_embeddings().num_embeddings
    samples = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
    expected = torch.cat([_forward_single(model, ids) for ids in samples])
    try:
        packed = _forward_row(model, samples, mode)
    except Exception as error:
        # PackingUnsupported, a kernel refusing these shapes, or a compilation failing in this
        # torch (of several exception types): each means "run buckets", not "stop".
        return f"{type(error).__name__}: {next(iter(str(error).splitlines()), '')}"
    # A leak across segments or a wrong window moves states by ~1e-2 or more; the tolerance
    # only absorbs rounding (eager attention takes its softmax in float32 even for float64).
    tolerance = {torch.float64: 1e-6, torch.float32: 1e-4}.get(model.dtype, 3e-2)
    error = float((packed.float() - expected.float()).abs().max()) / max(1.0, float(expected.abs().max()))
    if not error <= tolerance:
        return f"packed hidden states differ from per-sample ones (relative error {error:.1e})"
    return None


def _choose_attention(model: ValuationModel, requested: str) -> tuple[str, str | None]:
    """The attention mode, and why no packed mode was taken (None when one was)."""
    if requested == "buckets":
        return "buckets", "buckets requested"
    if requested in PACKED_MODES:
        reason = packing_unsupported_reason(model, requested)
        if reason is not None:
            raise PackingUnsupported(f"{model.name}: {requested}: {reason}")
        return requested, None
    reasons = []
    for mode in _auto_modes(model):
        reason = packing_unsupported_reason(model, mode)
        if reason is None:
            return mode, None
        reasons.append(f"{mode}: {reason}")
    return "buckets", "; ".join(reasons)


def _image_text_attention(model: ValuationModel, requested: str) -> tuple[str, str]:
    """Buckets: packing image samples would need a per-family check of image features and
    positions in a packed row, which is not built (docs/design.md, "Image-text models")."""
    if requested in PACKED_MODES:
        raise PackingUnsupported(f"{model.name}: image-text models run in buckets, not {requested}")
    return "buckets", "image-text models run in buckets"


def _vllm_attention(model: ValuationModel, requested: str) -> tuple[str, str]:
    if requested != "auto":
        raise PackingUnsupported(f"{model.name}: the vLLM backbone batches the samples with its own "
                                 f"attention; attention={requested} does not apply")
    return "vllm", "the vLLM backbone batches the samples itself"


def _auto_modes(model: ValuationModel) -> tuple[str, ...]:
    """The packed modes "auto" tries on this model's device, best first; buckets follow."""
    if model.device.type != "cuda":
        # CPU: the per-segment sdpa loop has no launch cost to hide, while flex runs eagerly here
        # (engine/model/attention.py: why not compiled), computing N x N scores: measured at a quarter
        # of varlen's tokens/s (bench/results/attention-modes-cpu.md).
        return ("varlen",)
    if has_flash_varlen(model.head_weight):
        return ("varlen", "flex")
    # No flash varlen in this torch (2.11): a Python loop of per-segment sdpa is launch-bound,
    # measured on an H200 (smollm2-135m shapes, bf16) at 106k tokens/s against 143k for
    # buckets. Flex is one fused kernel per layer that computes no padding; it is tried before
    # buckets without a GPU measurement yet (bench/perf/gpu_e2e.py compares the modes).
    return ("flex",)


# ---------------------------------------------------------------- forwards


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device; on CUDA through pinned memory, without blocking the host."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _forward_single(model: ValuationModel, ids: list[int]) -> torch.Tensor:
    with _FORWARD_LOCK:
        return model.backbone_states(input_ids=torch.tensor([ids], device=model.device), use_cache=False)[0]


def _packed_inputs(samples: Sequence[Sequence[int]],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, PackedSegments]:
    """Token ids and positions ``(1, N)`` of the concatenated samples (positions restart at 0
    per sample) and their segments, sent to the device in one transfer."""
    lengths = torch.tensor([len(ids) for ids in samples])
    total = int(lengths.sum())
    segment = torch.repeat_interleave(torch.arange(len(samples)), lengths, output_size=total)
    ends = lengths.cumsum(0)
    positions = torch.arange(total) - (ends - lengths)[segment]
    ids = torch.tensor(list(itertools.chain.from_iterable(samples)), dtype=torch.long)
    host = torch.cat([ids, positions, segment, torch.cat([ends.new_zeros(1), ends])])
    ids, positions, segment, bounds = _to_device(host, device).split([total, total, total, len(samples) + 1])
    return ids[None], positions[None], PackedSegments(bounds.to(torch.int32), segment, int(lengths.max()))


def _forward_row(model: ValuationModel, samples: Sequence[Sequence[int]], mode: str) -> torch.Tensor:
    """Hidden states of the concatenated samples, ``(sum of lengths, d)``, with the packed
    attention ``mode``."""
    ids, positions, segments = _packed_inputs(samples, model.device)
    name = register(mode)
    with _FORWARD_LOCK, _attention_implementation(model.backbone, name):
        return model.backbone_states(input_ids=ids, position_ids=positions, use_cache=False,
                                     **packed_kwargs(mode, segments))[0]


def _vllm_row(model: ValuationModel, samples: Sequence[Sequence[int]], _mode: str) -> torch.Tensor:
    """The samples' states from the vLLM backbone, concatenated like a packed row, on the device."""
    skip_layer = None if model.skip is None else model.skip.layer
    return torch.cat(model.vllm.states(samples, skip_layer)).to(model.device, model.dtype)


@contextmanager
def _attention_implementation(backbone: torch.nn.Module, name: str) -> Iterator[None]:
    config = backbone.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def right_padded(samples: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(batch, longest)`` padded on the right with 0, and the attention mask."""
    longest = max(len(ids) for ids in samples)
    ids = torch.zeros((len(samples), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(samples):
        ids[row, :len(sample)] = torch.tensor(sample)
        mask[row, :len(sample)] = 1
    return ids, mask


def _forward_padded(model: ValuationModel, samples: Sequence[Sequence[int]]) -> torch.Tensor:
    """``(batch, longest, d)``; right padding, so real tokens never attend to the pads."""
    ids, mask = _to_device(torch.stack(right_padded(samples)), model.device)
    with _FORWARD_LOCK:
        return model.hidden_states(ids, mask)


def _forward_images(model: ValuationModel, sample: EncodedSample) -> torch.Tensor:
    """``(length, d)`` of one sample with images, alone (its pixel values and grids are its own)."""
    ids = torch.tensor([sample.input_ids])
    with _FORWARD_LOCK:
        return model.hidden_states(ids, torch.ones_like(ids), sample.images)[0]


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


# ---------------------------------------------------------------- the runner

# (sample, row of its first token in the hidden states, first token, number of tokens)
Piece = tuple[EncodedSample, int, int, int]


class ModelRunner:
    """Runs scheduled steps on a resident model and values label states with the kernels.

    ``attention``: "auto" (per device, the first packed mode whose capability check passes,
    else buckets), or force "varlen" / "flex" / "buckets". ``batch_tokens`` bounds the padded
    size of a bucket.
    """

    def __init__(self, model: ValuationModel, *, attention: str = "auto", batch_tokens: int = 4096) -> None:
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.model = model
        self.batch_tokens = batch_tokens
        choose = (_vllm_attention if model.vllm is not None
                  else _choose_attention if model.vision is None else _image_text_attention)
        self.attention, self.why_not_packed = choose(model, attention)
        # vLLM runs a long sample whole (its own scheduler, no cache carried between our steps)
        self.splits_long = self.attention != "vllm"
        if model.backbone is None:
            self.vocab_size = model.vocab_size
            return
        self.vocab_size = model.backbone.get_input_embeddings().num_embeddings
        parameters = inspect.signature(model.backbone.forward).parameters
        self._cache_keyword = "cache" if "cache" in parameters else "past_key_values"

    def check_sample(self, sample: EncodedSample, index: int | None = None) -> None:
        """Raise SampleError for a sample the model cannot run: ids outside its embedding
        table, or a sample of an image-text model longer than a step (never chunked, so that
        no chunk ends inside an image)."""
        largest = max(sample.input_ids)
        if largest >= self.vocab_size:
            raise SampleError(f"token id {largest} is outside the model's vocabulary ({self.vocab_size})",
                              sample_id=sample.id, where=sample.where, index=index)
        if self.model.vision is not None and len(sample.input_ids) > self.batch_tokens:
            raise SampleError(f"the sample has {len(sample.input_ids)} tokens (image tokens included), more "
                              f"than batch_tokens={self.batch_tokens}; samples of an image-text model are "
                              "never split into chunks: raise batch_tokens",
                              sample_id=sample.id, where=sample.where, index=index)

    # ------------------------------------------------------------ forward

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        """Run one step: the requests it completed, with their label states, and those it
        failed (non-finite hidden states); a chunk that is not the last gives neither."""
        result = RunnerOutput()
        if not output.chunks:
            return result
        if output.is_chunk_step and self.splits_long:
            self._run_chunk(output.chunks[0], result)
            return result
        requests = [chunk.request for chunk in output.chunks]
        for request, (partial, finite) in zip(requests, self._whole_states([r.sample for r in requests]),
                                              strict=True):
            request.partial_states.append(partial)
            self._finish(request, result, finite)
        return result

    def _whole_states(self, samples: list[EncodedSample]) -> list[tuple[PartialStates, bool]]:
        """Label states of whole samples, and whether they are finite, in sample order."""
        if self.attention == "buckets":
            return self._bucket_states(samples)
        forward = _vllm_row if self.attention == "vllm" else _forward_row
        hidden = forward(self.model, [sample.input_ids for sample in samples], self.attention)
        starts = itertools.accumulate((len(sample.input_ids) for sample in samples), initial=0)
        return _gather(hidden, [(sample, start, 0, len(sample.input_ids))
                                for sample, start in zip(samples, starts, strict=False)])

    def _bucket_states(self, samples: list[EncodedSample]) -> list[tuple[PartialStates, bool]]:
        lengths = [len(sample.input_ids) for sample in samples]
        states: dict[int, tuple[PartialStates, bool]] = {}
        text = [i for i, sample in enumerate(samples) if sample.images is None]
        for i in sorted(set(range(len(samples))) - set(text)):
            states[i] = _gather(_forward_images(self.model, samples[i]), [(samples[i], 0, 0, lengths[i])])[0]
        for bucket in length_batches([lengths[i] for i in text], self.batch_tokens):
            bucket = [text[j] for j in bucket]
            padded = _forward_padded(self.model, [samples[i].input_ids for i in bucket])
            width = padded.shape[1]
            pieces = [(samples[i], row * width, 0, lengths[i]) for row, i in enumerate(bucket)]
            for i, (partial, finite) in zip(bucket, _gather(padded.flatten(0, 1), pieces), strict=True):
                if not finite and len(bucket) > 1:
                    # Fully masked pad rows can give NaN that reaches real rows through
                    # 0 * NaN (Gemma2 eager attention, float64, sliding window): run it alone.
                    alone = _forward_padded(self.model, [samples[i].input_ids])[0]
                    partial, finite = _gather(alone, [(samples[i], 0, 0, lengths[i])])[0]
                states[i] = (partial, finite)
        return [states[i] for i in range(len(samples))]

    def _run_chunk(self, chunk: ScheduledChunk, result: RunnerOutput) -> None:
        request = chunk.request
        if request.kv_cache is None:
            from transformers import DynamicCache

            request.kv_cache = DynamicCache(config=self.model.backbone.config)
        device = self.model.device
        ids = _to_device(torch.tensor([request.sample.input_ids[chunk.start:chunk.end]]), device)
        positions = torch.arange(chunk.start, chunk.end, device=device).unsqueeze(0)
        with _FORWARD_LOCK:
            hidden = self.model.backbone_states(input_ids=ids, position_ids=positions, use_cache=True,
                                                **{self._cache_keyword: request.kv_cache})
        piece = (request.sample, 0, chunk.start, chunk.num_tokens)
        partial, finite = _gather(hidden[0], [piece])[0]
        request.partial_states.append(partial)
        # The earlier chunks were finite, or the request would have finished with them.
        if not finite or chunk.is_last:
            self._finish(request, result, finite)

    def _finish(self, request: Request, result: RunnerOutput, finite: bool) -> None:
        sample = request.sample
        if not finite:
            result.failed.append((request, SampleError(
                "the model produced non-finite hidden states (NaN or inf) for this sample",
                sample_id=sample.id, where=sample.where, index=request.index)))
            return
        parts = request.partial_states
        hidden = _joined([part.hidden for part in parts])
        labels = _joined([part.labels for part in parts])
        positions = [k for part in parts for k in part.positions]
        result.finished.append((request, LabelStates(request.index, sample, hidden, labels, positions)))


def _gather(hidden: torch.Tensor, pieces: Sequence[Piece]) -> list[tuple[PartialStates, bool]]:
    """Each piece's label states in ``hidden`` (``(rows, d)``), and whether they are finite.

    A piece of tokens ``first .. first + n - 1`` holds labels ``first + 1 .. first + n``
    (label k is predicted by token k - 1). One transfer of the rows and labels, one gather,
    and one wait for the device: the finite flags."""
    rows: list[int] = []
    labels: list[int] = []
    owners: list[int] = []
    positions: list[list[int]] = []
    for index, (sample, row, first, n) in enumerate(pieces):
        last = min(first + n, len(sample.input_ids) - 1)
        mine = [k for k in range(first + 1, last + 1) if sample.label_mask[k]]
        rows += [row + k - 1 - first for k in mine]
        labels += [sample.input_ids[k] for k in mine]
        owners += [index] * len(mine)
        positions.append(mine)
    index = _to_device(torch.tensor([rows, labels, owners], dtype=torch.long), hidden.device)
    states = hidden[index[0]]
    bad = (~torch.isfinite(states).all(dim=1)).int()
    finite = (torch.zeros(len(pieces), dtype=torch.int, device=states.device)
              .index_add_(0, index[2], bad) == 0).tolist()
    sizes = [len(mine) for mine in positions]
    parts = [PartialStates(h, y, mine)
             for h, y, mine in zip(states.split(sizes), index[1].split(sizes), positions, strict=True)]
    return list(zip(parts, finite, strict=True))


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
