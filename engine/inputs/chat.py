"""Chat messages: their structure, the rendering of a chat template and where the assistant
turns (the labels) lie in it, in characters (docs/design.md, "Contracts": samples).

The renderer is a tokenizer, or an image-text model's processor (engine/inputs/vision.py): both
have ``apply_chat_template``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

IMAGE_KEYS = frozenset({"image", "images", "pixel_values"})
MESSAGE_KEYS = frozenset({"role", "content"})
TEXT_ONLY = "image-text samples need an image-text model loaded with its processor; this model is text-only"


class InvalidSample(Exception):
    """A mistake in one sample; encode_sample adds the sample's id and place."""


def quoted(keys: Iterable[Any]) -> str:
    return ", ".join(repr(k) for k in sorted(keys, key=str))


def assistant_spans(renderer: Any, messages: list[dict[str, Any]], full: str) -> list[tuple[int, int]]:
    """Characters [start, end) of each assistant turn in ``full``, the render of ``messages``."""
    return [_assistant_span(renderer, messages, i, full)
            for i, message in enumerate(messages) if message["role"] == "assistant"]


def check_messages(messages: Any, *, need_assistant: bool, parts: bool = False) -> None:
    """The messages' structure; ``parts``: contents may be lists of parts (checked by the
    image encoder), else each content is a string."""
    if not isinstance(messages, list) or not messages:
        raise InvalidSample('"messages" must be a non-empty list of {"role", "content"} dicts')
    for n, message in enumerate(messages):
        _check_message(message, f"messages[{n}]", parts)
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise InvalidSample("nothing to value: no assistant message (its turns are the labels)")


def _check_message(message: Any, name: str, parts: bool) -> None:
    if not isinstance(message, dict):
        raise InvalidSample(f'{name} must be a dict with "role" and "content", got {type(message).__name__}')
    if not parts and (isinstance(message.get("content"), list) or set(message) & IMAGE_KEYS):
        raise InvalidSample(f"{TEXT_ONLY} ({name} has a list of content parts or an image)")
    unknown = set(message) - MESSAGE_KEYS
    if unknown:
        raise InvalidSample(f'{name} has unknown key(s) {quoted(unknown)}; '
                            'a message is {"role", "content"}')
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not role:
        raise InvalidSample(f'{name}["role"] must be a non-empty string')
    if not isinstance(content, (str, list) if parts else str):
        kinds = "a string or a list of parts" if parts else "a string"
        raise InvalidSample(f'{name}["content"] must be {kinds}, got {type(content).__name__}')
    if role == "assistant" and not content:
        raise InvalidSample(f"{name} is an empty assistant message")


def render(renderer: Any, messages: list[dict[str, Any]], prompt: bool = False) -> str:
    try:
        return renderer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    except Exception as error:  # the template is the model author's code: any failure is this sample's
        raise InvalidSample(f"the chat template failed on this conversation: {error}") from error


def _assistant_span(renderer: Any, messages: list[dict[str, Any]], i: int, full: str) -> tuple[int, int]:
    """Characters [start, end) of assistant message i in the full render, end-of-turn included.

    start: where render(messages[:i], generation prompt) and render(messages[:i+1]) part.
    end: the end of render(messages[:i+1]) without trailing whitespace (the newline after
    an end-of-turn token is not the assistant's).
    """
    upto = render(renderer, messages[: i + 1])
    if not full.startswith(upto):
        raise InvalidSample(
            f"the chat template does not render prefixes consistently (the first {i + 1} messages "
            "do not render as a prefix of the whole conversation), so assistant turns cannot be located"
        )
    if i == 0:
        # Templates refuse an empty conversation: compare with the same turn holding a
        # sentinel instead, which parts from the real one where its content starts.
        before = render(renderer, [{**messages[0], "content": "\x00"}])
    else:
        before = render(renderer, messages[:i], prompt=True)
    return common_prefix_length(before, upto), len(upto.rstrip())


def common_prefix_length(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):  # stops at the shorter string
        if x != y:
            break
        n += 1
    return n
