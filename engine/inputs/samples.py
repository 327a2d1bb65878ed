"""User samples -> token ids and a label mask (docs/design.md, "Contracts": samples).

A sample is a dict with an optional "id", an optional "meta" (ignored) and exactly one form:
{"prompt", "response"}, {"messages"}, {"text"}, {"input_ids", "loss_mask"} or
{"input_ids", "labels"}. `label_mask[k]` says token k is a label, predicted from position
k - 1, so `label_mask[0]` is always False. Messages may hold images when the model is an
image-text one (engine/inputs/vision.py encodes them).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import LOSS_ON, check_max_length
from .chat import IMAGE_KEYS, assistant_spans, check_messages, render
from .chat import InvalidSample as _Invalid
from .chat import quoted as _quoted

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .vision import ImageInputs, ImageSamples

FORMS: dict[str, frozenset[str]] = {
    "prompt/response": frozenset({"prompt", "response"}),
    "messages": frozenset({"messages"}),
    "text": frozenset({"text"}),
    "input_ids/loss_mask": frozenset({"input_ids", "loss_mask"}),
    "input_ids/labels": frozenset({"input_ids", "labels"}),
}
OPTIONAL_KEYS = frozenset({"id", "meta"})
IGNORE_INDEX = -100  # Hugging Face's "not a label"

_FORM_KEYS = frozenset().union(*FORMS.values())
_FORMS_HELP = (
    "a sample is one of "
    + ", ".join("{" + ", ".join(f'"{k}"' for k in sorted(keys)) + "}" for keys in FORMS.values())
    + ', with an optional "id" and "meta"'
)
_IMAGE_FORM = ('image-text samples are chat messages whose content holds the image: '
               '{"type": "image", "image": PATH_BYTES_OR_DATA_URI}')


class SampleError(ValueError):
    """A user mistake in one sample; str() names the sample and where it came from."""

    def __init__(self, message: str, *, sample_id: str | None, where: str,
                 index: int | None = None) -> None:
        self.message = message
        self.sample_id = sample_id
        self.where = where
        self.index = index  # the sample's position in the caller's list, when known
        name = "sample" if sample_id is None else f"sample {sample_id!r}"
        super().__init__(f"{name} ({where}): {message}")

    def __reduce__(self) -> tuple[Callable[..., SampleError], tuple[Any, ...]]:
        # Keyword-only arguments defeat the default exception pickling (worker processes).
        return _rebuild_error, (type(self), self.message, self.sample_id, self.where, self.index)


def _rebuild_error(cls: type[SampleError], message: str, sample_id: str | None, where: str,
                   index: int | None) -> SampleError:
    return cls(message, sample_id=sample_id, where=where, index=index)


@dataclass(frozen=True)
class EncodedSample:
    id: str
    where: str
    input_ids: tuple[int, ...]
    label_mask: tuple[bool, ...]
    truncated: bool
    images: ImageInputs | None = None  # what the model takes besides the ids (pixel values, ...)

    @property
    def num_labels(self) -> int:
        return sum(self.label_mask)

    def label_positions(self) -> list[int]:
        return [k for k, is_label in enumerate(self.label_mask) if is_label]


class SampleList(list):
    """A list of sample dicts read from a file, which remembers where each came from."""

    def __init__(self, samples: Iterable[Any] = (), *, source: str, lines: Sequence[int] = (),
                 unit: str = "line") -> None:
        super().__init__(samples)
        self.source = source
        self.lines = list(lines)
        self.unit = unit  # "line" of a text file, "row" of a table
        if len(self.lines) != len(self):
            raise ValueError(f"{len(self)} samples but {len(self.lines)} line numbers")

    @property
    def root(self) -> Path | None:
        """Where relative image paths start: the folder of the file (or the folder) read."""
        path = Path(self.source)
        return path.parent if path.is_file() else path if path.is_dir() else None

    def where(self, index: int) -> str:
        # Samples appended after reading have no line: fall back to their position.
        if index < len(self.lines):
            return f"{self.source} {self.unit} {self.lines[index]}"
        return f"index {index}"


def subset_of(samples: Sequence[Any], indices: Sequence[int]) -> SampleList:
    """Some of the samples, keeping their file and line for error messages."""
    if isinstance(samples, SampleList) and samples.lines:
        return SampleList([samples[i] for i in indices], source=samples.source,
                          lines=[samples.lines[i] for i in indices], unit=samples.unit)
    return SampleList([samples[i] for i in indices], source="input", lines=list(indices), unit="sample")


def sample_fingerprint(samples: Sequence[Any]) -> str:
    """A digest of the samples' content, in order (what a stored result was computed from)."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps(sample, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


def where_of(samples: Sequence[Any], index: int) -> str:
    if isinstance(samples, SampleList):
        return samples.where(index)
    return f"index {index}"


def root_of(samples: Sequence[Any]) -> Path | None:
    """The folder relative image paths of ``samples`` start from (None: the current one)."""
    return samples.root if isinstance(samples, SampleList) else None


def encode_sample(
    sample: Any,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    where: str,
    index: int | None = None,
    loss_on: str = "response",
    append_eos: bool = False,
    max_length: int | None = None,
    context_length: int | None = None,
    images: ImageSamples | None = None,
) -> EncodedSample:
    """Tokenise one sample and mark its labels; a bad sample raises SampleError.

    `tokenizer` may be None for pre-tokenised samples (then ids are not range-checked).
    `images`: the image-text model's encoder of messages with images (None: text-only).
    Without an "id", the sample is named str(index), or `where` when no index is given.
    """
    _check_options(loss_on, max_length)
    sample_id = _sample_id(sample)
    try:
        input_ids, label_mask, pixels = _encode_form(sample, tokenizer, loss_on=loss_on,
                                                     append_eos=append_eos, images=images)
        if not input_ids:
            raise _Invalid("the sample has no tokens")
        if loss_on == "all" and pixels is None:  # an image sample's encoder never labels images
            label_mask = [True] * len(input_ids)
        label_mask[0] = False  # nothing predicts the first token
        input_ids, label_mask, truncated = _fit(input_ids, label_mask, max_length, context_length)
        if truncated and pixels is not None and len(input_ids) <= pixels.last_image_token:
            raise _Invalid(f"max_length={max_length} would cut an image (its tokens end at position "
                           f"{pixels.last_image_token}); image samples are cut after their last image only")
        if not any(label_mask):
            kept = f" in the first {len(input_ids)} tokens kept by max_length" if truncated else ""
            raise _Invalid(f"nothing to value (no label tokens{kept})")
    except _Invalid as error:
        raise SampleError(str(error), sample_id=sample_id, where=where, index=index) from None
    return EncodedSample(
        id=sample_id_of(sample, where if index is None else str(index)),
        where=where,
        input_ids=tuple(input_ids),
        label_mask=tuple(label_mask),
        truncated=truncated,
        images=pixels,
    )


def _check_options(loss_on: str, max_length: int | None) -> None:
    # Caller mistakes (not sample mistakes): plain ValueError, never collected.
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    check_max_length(max_length)


def _sample_id(sample: Any) -> str | None:
    """The sample's own id, or None when it has none (or an invalid one)."""
    if isinstance(sample, dict) and _valid_id(sample.get("id")):
        return str(sample["id"])
    return None


def sample_id_of(sample: Any, fallback: str) -> str:
    """The name results carry: the sample's own "id", else ``fallback`` (its position)."""
    own = _sample_id(sample)
    return fallback if own is None else own


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) or _is_int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fit(
    input_ids: list[int], label_mask: list[bool], max_length: int | None, context_length: int | None
) -> tuple[list[int], list[bool], bool]:
    if max_length is None:
        if context_length is not None and len(input_ids) > context_length:
            raise _Invalid(
                f"the sample has {len(input_ids)} tokens but the model's context is {context_length}; "
                "pass max_length= to truncate it (keeps the start)"
            )
        return input_ids, label_mask, False
    limit = max_length if context_length is None else min(max_length, context_length)
    return input_ids[:limit], label_mask[:limit], len(input_ids) > limit


# ---- forms ----------------------------------------------------------------------------


def _encode_form(
    sample: Any, tokenizer: PreTrainedTokenizerBase | None, *, loss_on: str, append_eos: bool,
    images: ImageSamples | None,
) -> tuple[list[int], list[bool], ImageInputs | None]:
    """Token ids, label mask and (image samples only) the model's image inputs."""
    if not isinstance(sample, dict):
        raise _Invalid(f"expected a dict, got {type(sample).__name__}; {_FORMS_HELP}")
    if "id" in sample and not _valid_id(sample["id"]):
        raise _Invalid(f'"id" must be a string or an integer, got {type(sample["id"]).__name__}')
    form = _form_of(sample)
    if form == "messages" and images is not None:  # rendered by the processor, images or not
        return images.encode(sample["messages"], find_assistant=loss_on == "response")
    if form == "prompt/response":
        ids, mask = _encode_prompt_response(sample, tokenizer, append_eos)
    elif form == "messages":
        ids, mask = _encode_messages(sample["messages"], tokenizer, find_assistant=loss_on == "response")
    elif form == "text":
        ids = _tokenize(_need_tokenizer(tokenizer, form), _text_field(sample, "text"), special=True)
        mask = [True] * len(ids)
    elif form == "input_ids/loss_mask":
        ids, mask = _encode_loss_mask(sample, tokenizer)
    else:
        ids, mask = _encode_hf_labels(sample, tokenizer)
    return ids, mask, None


def _form_of(sample: dict[Any, Any]) -> str:
    keys = set(sample) - OPTIONAL_KEYS
    if keys & IMAGE_KEYS:
        raise _Invalid(f"{_quoted(keys & IMAGE_KEYS)} is not a sample key; {_IMAGE_FORM}")
    unknown = keys - _FORM_KEYS
    if unknown:
        raise _Invalid(_unknown_keys_message(unknown))
    for name, form_keys in FORMS.items():
        if keys == form_keys:
            return name
    if not keys:
        raise _Invalid(f"the sample has no content; {_FORMS_HELP}")
    completions = [form_keys - keys for form_keys in FORMS.values() if keys < form_keys]
    if completions:
        missing = " or ".join(_quoted(c) for c in completions)
        raise _Invalid(f"has {_quoted(keys)} but not {missing}; {_FORMS_HELP}")
    raise _Invalid(f"mixes several forms ({_quoted(keys)}); give exactly one: {_FORMS_HELP}")


def _unknown_keys_message(unknown: set[Any]) -> str:
    hints = []
    for key in sorted(unknown, key=str):
        close = difflib.get_close_matches(str(key), sorted(_FORM_KEYS | OPTIONAL_KEYS), n=1)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    return f'unknown key(s) {", ".join(hints)}; {_FORMS_HELP}; put your own fields under "meta"'


def _need_tokenizer(tokenizer: PreTrainedTokenizerBase | None, form: str) -> PreTrainedTokenizerBase:
    if tokenizer is None:
        raise _Invalid(f"a {form} sample needs a tokenizer (only pre-tokenised samples work without one)")
    return tokenizer


def _text_field(sample: dict[str, Any], key: str) -> str:
    value = sample[key]
    if not isinstance(value, str):
        raise _Invalid(f'"{key}" must be a string, got {type(value).__name__}')
    if not value:
        raise _Invalid(f'"{key}" is empty')
    return value


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _encode_prompt_response(
    sample: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None, append_eos: bool
) -> tuple[list[int], list[bool]]:
    prompt, response = _text_field(sample, "prompt"), _text_field(sample, "response")
    tokenizer = _need_tokenizer(tokenizer, "prompt/response")
    prompt_ids = _tokenize(tokenizer, prompt, special=True)
    response_ids = _tokenize(tokenizer, response, special=False)
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise _Invalid("append_eos=True but the tokenizer has no EOS token")
        response_ids.append(tokenizer.eos_token_id)
    return prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids)


# ---- chat messages --------------------------------------------------------------------


def _encode_messages(
    messages: Any, tokenizer: PreTrainedTokenizerBase | None, *, find_assistant: bool
) -> tuple[list[int], list[bool]]:
    """Render the chat template; with find_assistant, label the assistant turns' tokens."""
    check_messages(messages, need_assistant=find_assistant)
    tokenizer = _need_tokenizer(tokenizer, "messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise _Invalid("the tokenizer has no chat template; give prompt/response or text instead")
    if not getattr(tokenizer, "is_fast", False):
        raise _Invalid("messages need a fast tokenizer (character offsets locate the assistant turns)")
    full = render(tokenizer, messages)
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    if not find_assistant:
        return list(encoding["input_ids"]), [True] * len(encoding["input_ids"])
    spans = assistant_spans(tokenizer, messages, full)
    mask = [any(start <= offset < end for start, end in spans) for offset, _ in encoding["offset_mapping"]]
    return list(encoding["input_ids"]), mask


# ---- pre-tokenised --------------------------------------------------------------------


def _int_list(value: Any, key: str, *, allow_bool: bool = False) -> list[int]:
    if hasattr(value, "tolist"):  # numpy arrays and torch tensors from Python callers
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise _Invalid(f'"{key}" must be a list of integers, got {type(value).__name__}')
    for k, item in enumerate(value):
        if not isinstance(item, int) or (isinstance(item, bool) and not allow_bool):
            raise _Invalid(f'"{key}" must hold integers; position {k} is {item!r}')
    return list(value)


def _token_ids(sample: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    ids = _int_list(sample["input_ids"], "input_ids")
    vocab_size = None if tokenizer is None else len(tokenizer)
    for k, token in enumerate(ids):
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            bound = "" if vocab_size is None else f" [0, {vocab_size})"
            raise _Invalid(f'"input_ids" position {k} is {token}, outside the tokenizer\'s vocabulary{bound}')
    return ids


def _same_length(ids: list[int], other: list[int], key: str) -> None:
    if len(ids) != len(other):
        raise _Invalid(f'"input_ids" has {len(ids)} tokens but "{key}" has {len(other)} values')


def _encode_loss_mask(
    sample: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None
) -> tuple[list[int], list[bool]]:
    ids = _token_ids(sample, tokenizer)
    mask = _int_list(sample["loss_mask"], "loss_mask", allow_bool=True)
    _same_length(ids, mask, "loss_mask")
    if any(value not in (0, 1) for value in mask):
        raise _Invalid('"loss_mask" values must be 0 or 1 (or booleans)')
    return ids, [bool(value) for value in mask]


def _encode_hf_labels(
    sample: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None
) -> tuple[list[int], list[bool]]:
    ids = _token_ids(sample, tokenizer)
    labels = _int_list(sample["labels"], "labels")
    _same_length(ids, labels, "labels")
    for k, (token, label) in enumerate(zip(ids, labels, strict=True)):
        if label not in (IGNORE_INDEX, token):
            raise _Invalid(
                f'"labels" must equal "input_ids" where not -100 (position {k}: label {label}, '
                f"input id {token}); forvalue shifts labels itself"
            )
    return ids, [label != IGNORE_INDEX for label in labels]
