"""User samples -> token ids and a label mask (docs/design.md, "Contracts": samples).

A sample is a dict with an optional "id", an optional "meta" (ignored) and exactly one form:
{"prompt", "response"}, {"messages"}, {"text"}, {"input_ids", "loss_mask"} or
{"input_ids", "labels"}. `label_mask[k]` says token k is a label, predicted from position
k - 1, so `label_mask[0]` is always False.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMS: dict[str, frozenset[str]] = {
    "prompt/response": frozenset({"prompt", "response"}),
    "messages": frozenset({"messages"}),
    "text": frozenset({"text"}),
    "input_ids/loss_mask": frozenset({"input_ids", "loss_mask"}),
    "input_ids/labels": frozenset({"input_ids", "labels"}),
}
OPTIONAL_KEYS = frozenset({"id", "meta"})
IMAGE_KEYS = frozenset({"image", "images", "pixel_values"})
MESSAGE_KEYS = frozenset({"role", "content"})
LOSS_ON = ("response", "all")
IGNORE_INDEX = -100  # Hugging Face's "not a label"

_FORM_KEYS = frozenset().union(*FORMS.values())
_FORMS_HELP = (
    "a sample is one of "
    + ", ".join("{" + ", ".join(f'"{k}"' for k in sorted(keys)) + "}" for keys in FORMS.values())
    + ', with an optional "id" and "meta"'
)
_NO_IMAGES = "image-text samples are not supported yet"


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


class _Invalid(Exception):
    """Raised by the helpers below; encode_sample adds the sample's id and place."""


@dataclass(frozen=True)
class EncodedSample:
    id: str
    where: str
    input_ids: tuple[int, ...]
    label_mask: tuple[bool, ...]
    truncated: bool

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

    def where(self, index: int) -> str:
        # Samples appended after reading have no line: fall back to their position.
        if index < len(self.lines):
            return f"{self.source} {self.unit} {self.lines[index]}"
        return f"index {index}"


def where_of(samples: Sequence[Any], index: int) -> str:
    if isinstance(samples, SampleList):
        return samples.where(index)
    return f"index {index}"


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
) -> EncodedSample:
    """Tokenise one sample and mark its labels; a bad sample raises SampleError.

    `tokenizer` may be None for pre-tokenised samples (then ids are not range-checked).
    Without an "id", the sample is named str(index), or `where` when no index is given.
    """
    _check_options(loss_on, max_length)
    sample_id = _sample_id(sample)
    try:
        input_ids, label_mask = _encode_form(sample, tokenizer, loss_on=loss_on, append_eos=append_eos)
        if not input_ids:
            raise _Invalid("the sample has no tokens")
        if loss_on == "all":
            label_mask = [True] * len(input_ids)
        label_mask[0] = False  # nothing predicts the first token
        input_ids, label_mask, truncated = _fit(input_ids, label_mask, max_length, context_length)
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
    )


def _check_options(loss_on: str, max_length: int | None) -> None:
    # Caller mistakes (not sample mistakes): plain ValueError, never collected.
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be 'response' or 'all', got {loss_on!r}")
    if max_length is not None and (not _is_int(max_length) or max_length < 2):
        raise ValueError(f"max_length must be an integer >= 2 (one token has no label), got {max_length!r}")


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
    sample: Any, tokenizer: PreTrainedTokenizerBase | None, *, loss_on: str, append_eos: bool
) -> tuple[list[int], list[bool]]:
    if not isinstance(sample, dict):
        raise _Invalid(f"expected a dict, got {type(sample).__name__}; {_FORMS_HELP}")
    if "id" in sample and not _valid_id(sample["id"]):
        raise _Invalid(f'"id" must be a string or an integer, got {type(sample["id"]).__name__}')
    form = _form_of(sample)
    if form == "prompt/response":
        return _encode_prompt_response(sample, tokenizer, append_eos)
    if form == "messages":
        return _encode_messages(sample["messages"], tokenizer, find_assistant=loss_on == "response")
    if form == "text":
        ids = _tokenize(_need_tokenizer(tokenizer, form), _text_field(sample, "text"), special=True)
        return ids, [True] * len(ids)
    if form == "input_ids/loss_mask":
        return _encode_loss_mask(sample, tokenizer)
    return _encode_hf_labels(sample, tokenizer)


def _form_of(sample: dict[Any, Any]) -> str:
    keys = set(sample) - OPTIONAL_KEYS
    if keys & IMAGE_KEYS:
        raise _Invalid(_NO_IMAGES)
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


def _quoted(keys: Iterable[Any]) -> str:
    return ", ".join(repr(k) for k in sorted(keys, key=str))


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
    _check_messages(messages, need_assistant=find_assistant)
    tokenizer = _need_tokenizer(tokenizer, "messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise _Invalid("the tokenizer has no chat template; give prompt/response or text instead")
    if not getattr(tokenizer, "is_fast", False):
        raise _Invalid("messages need a fast tokenizer (character offsets locate the assistant turns)")
    full = _render(tokenizer, messages)
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    if not find_assistant:
        return list(encoding["input_ids"]), [True] * len(encoding["input_ids"])
    spans = [
        _assistant_span(tokenizer, messages, i, full)
        for i, message in enumerate(messages)
        if message["role"] == "assistant"
    ]
    mask = [any(start <= offset < end for start, end in spans) for offset, _ in encoding["offset_mapping"]]
    return list(encoding["input_ids"]), mask


def _check_messages(messages: Any, *, need_assistant: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise _Invalid('"messages" must be a non-empty list of {"role", "content"} dicts')
    for n, message in enumerate(messages):
        _check_message(message, f"messages[{n}]")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise _Invalid("nothing to value: no assistant message (its turns are the labels)")


def _check_message(message: Any, name: str) -> None:
    if not isinstance(message, dict):
        raise _Invalid(f'{name} must be a dict with "role" and "content", got {type(message).__name__}')
    if isinstance(message.get("content"), list) or set(message) & IMAGE_KEYS:
        raise _Invalid(f"{_NO_IMAGES} ({name} has a list of content parts or an image)")
    unknown = set(message) - MESSAGE_KEYS
    if unknown:
        raise _Invalid(f'{name} has unknown key(s) {_quoted(unknown)}; a message is {{"role", "content"}}')
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not role:
        raise _Invalid(f'{name}["role"] must be a non-empty string')
    if not isinstance(content, str):
        raise _Invalid(f'{name}["content"] must be a string, got {type(content).__name__}')
    if role == "assistant" and not content:
        raise _Invalid(f"{name} is an empty assistant message")


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    except Exception as error:  # the template is the model author's code: any failure is this sample's
        raise _Invalid(f"the chat template failed on this conversation: {error}") from error


def _assistant_span(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], i: int, full: str
) -> tuple[int, int]:
    """Characters [start, end) of assistant message i in the full render, end-of-turn included.

    start: where render(messages[:i], generation prompt) and render(messages[:i+1]) part.
    end: the end of render(messages[:i+1]) without trailing whitespace (the newline after
    an end-of-turn token is not the assistant's).
    """
    upto = _render(tokenizer, messages[: i + 1])
    if not full.startswith(upto):
        raise _Invalid(
            f"the chat template does not render prefixes consistently (the first {i + 1} messages "
            "do not render as a prefix of the whole conversation), so assistant turns cannot be located"
        )
    if i == 0:
        # Templates refuse an empty conversation: compare with the same turn holding a
        # sentinel instead, which parts from the real one where its content starts.
        before = _render(tokenizer, [{**messages[0], "content": "\x00"}])
    else:
        before = _render(tokenizer, messages[:i], prompt=True)
    return _common_prefix_length(before, upto), len(upto.rstrip())


def _common_prefix_length(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):  # stops at the shorter string
        if x != y:
            break
        n += 1
    return n


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
