"""Image-text models: what they add to a text model, and chat samples with images
(docs/design.md, "Image-text models").

A conversation is rendered by the processor's chat template, one placeholder per image; the
processor expands each placeholder into the image's tokens (with the markers, tiles and rows
of its family) and reports where (``text_replacement_offsets``). Character offsets then give
each token's place in the render, and the labels follow the text rules (assistant turns with
their end-of-turn token, or every position for loss_on="all"), except that a token the
processor inserted, or an image marker the template wrote, is never a label.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .chat import InvalidSample, assistant_spans, check_messages, common_prefix_length, quoted, render
from .images import ImageError, ImageLimits, describe, load_image

# What the processor returns that is not a model input of the backbone.
_NOT_MODEL_INPUTS = frozenset({"input_ids", "attention_mask", "offset_mapping", "text_replacement_offsets"})
_PART_KEYS = {"text": frozenset({"type", "text"}), "image": frozenset({"type", "image"})}
_PARTS_HELP = '{"type": "text", "text": ...} or {"type": "image", "image": PATH_BYTES_OR_DATA_URI}'


@dataclass(frozen=True, eq=False)  # tensors: compared by identity
class ImageInputs:
    """What the backbone takes besides the token ids for one sample (batch of one): pixel
    values and the family's extras (image grids, token types, pixel masks)."""

    tensors: dict[str, torch.Tensor]
    num_images: int
    last_image_token: int  # the position of the sample's last image token


@dataclass(frozen=True)
class Vision:
    """An image-text model's processor, the tokens that stand for images (never labels) and
    the limits an image must keep."""

    processor: Any
    image_token_ids: frozenset[int]
    limits: ImageLimits

    @classmethod
    def of(cls, processor: Any, limits: ImageLimits | None = None) -> Vision:
        return cls(processor, _image_token_ids(processor), limits or ImageLimits())

    def fingerprint(self) -> str:
        """A digest of the image processor's settings and the chat template (what turns a
        sample into inputs besides the tokenizer)."""
        digest = hashlib.sha256(self.processor.image_processor.to_json_string().encode())
        digest.update(str(getattr(self.processor, "chat_template", None)).encode())
        return digest.hexdigest()[:32]

    def probe(self) -> tuple[list[int], ImageInputs]:
        """Token ids and image inputs of a one-image conversation (the load-time probe)."""
        gradient = np.add.outer(np.arange(48), np.arange(64)).astype(np.uint8)
        image = Image.fromarray(np.stack([gradient, 255 - gradient, gradient // 2], axis=-1))
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "Describe the image."}]},
                    {"role": "assistant", "content": "An image."}]
        ids, _, inputs = ImageSamples(self, None).encode(messages, find_assistant=False)
        if inputs is None:
            raise InvalidSample("the processor gave no image inputs for an image")
        return ids, inputs


@dataclass(frozen=True)
class ImageSamples:
    """Encodes chat samples with images for one model; relative image paths start at ``root``."""

    vision: Vision
    root: Path | None

    def encode(self, messages: Any, *,
               find_assistant: bool) -> tuple[list[int], list[bool], ImageInputs | None]:
        """Token ids, label mask and image inputs (None when the conversation has no image)."""
        check_messages(messages, need_assistant=find_assistant, parts=True)
        conversation, images = self._load_images(messages)
        processor = self.vision.processor
        full = render(processor, conversation)
        placeholders = full.count(processor.image_token)
        if placeholders != len(images):
            raise InvalidSample(f"the sample has {len(images)} image(s) but its render holds {placeholders} "
                                f"image placeholder(s) {processor.image_token!r}; each image needs one")
        out = _process(processor, full, images)
        ids = [int(token) for token in out["input_ids"][0]]
        spans = assistant_spans(processor, conversation, full) if find_assistant else None
        replaced = [(*item["new_span"], len(item["replacement"]) - len(item["text"]))
                    for item in out.get("text_replacement_offsets", [[]])[0]]
        mask, image_tokens = _label_mask(ids, out["offset_mapping"][0], replaced, spans,
                                         self.vision.image_token_ids)
        if not images:
            return ids, mask, None
        tensors = {key: torch.as_tensor(np.asarray(value)) for key, value in out.items()
                   if key not in _NOT_MODEL_INPUTS}
        return ids, mask, ImageInputs(tensors, len(images), max(image_tokens, default=0))

    def _load_images(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        """The conversation with image parts reduced to {"type": "image"} (what templates
        render), and the images in order."""
        conversation, images = [], []
        for n, message in enumerate(messages):
            content = message["content"]
            if isinstance(content, list):
                content = [self._part(part, f"messages[{n}].content[{k}]", images)
                           for k, part in enumerate(content)]
            conversation.append({**message, "content": content})
        return conversation, images

    def _part(self, part: Any, name: str, images: list[Image.Image]) -> dict[str, Any]:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _PART_KEYS:
            raise InvalidSample(f"{name} must be {_PARTS_HELP}")
        if kind == "image" and "url" in part:
            raise InvalidSample(f"image {len(images) + 1} ({name}): URLs are refused (forvalue reads nothing "
                                "from the network); give a local path, bytes or a base64 data URI")
        if set(part) != _PART_KEYS[kind]:
            raise InvalidSample(f"{name} has key(s) {quoted(part)}; a part is {_PARTS_HELP}")
        if kind == "text":
            if not isinstance(part["text"], str):
                raise InvalidSample(f'{name}["text"] must be a string, got {type(part["text"]).__name__}')
            return part
        source = part["image"]
        try:
            images.append(load_image(source, root=self.root, limits=self.vision.limits))
        except ImageError as error:
            raise InvalidSample(f"image {len(images) + 1} ({name}, {describe(source)}): {error}") from None
        return {"type": "image"}


def _process(processor: Any, full: str, images: list[Image.Image]) -> Any:
    try:
        return processor(text=[full], images=images or None, add_special_tokens=False,
                         return_offsets_mapping=True, return_text_replacement_offsets=True)
    except Exception as error:  # the processor is the model author's code: any failure is this sample's
        raise InvalidSample(f"the processor refused this sample: {error}") from error


def _label_mask(ids: list[int], offsets: list[tuple[int, int]], replaced: list[tuple[int, int, int]],
                spans: list[tuple[int, int]] | None,
                image_ids: frozenset[int]) -> tuple[list[bool], list[int]]:
    """Each token's label flag, and the positions of image tokens. ``replaced``: (start, end)
    of each expansion in the processed text and how many characters it added; a token inside
    one was inserted by the processor. Any other token is mapped back into the render (minus
    the growth of the expansions before it) and is a label inside an assistant span (every
    token when ``spans`` is None)."""
    mask, image_tokens = [], []
    for k, (token, (start, end)) in enumerate(zip(ids, offsets, strict=True)):
        inserted = any(start < new_end and end > new_start for new_start, new_end, _ in replaced)
        if inserted or token in image_ids:
            image_tokens.append(k)
            mask.append(False)
            continue
        at = start - sum(growth for _, new_end, growth in replaced if new_end <= start)
        mask.append(spans is None or any(s <= at < e for s, e in spans))
    return mask, image_tokens


def _image_token_ids(processor: Any) -> frozenset[int]:
    """The processor's image tokens, and the special tokens its chat template writes around an
    image placeholder (vision start/end markers): never labels, wherever they appear."""
    tokenizer = processor.tokenizer
    ids = {i for i in getattr(processor, "image_token_ids", ()) if i is not None}
    text = {"type": "text", "text": "\x00"}
    try:
        plain = render(processor, [{"role": "user", "content": [text]}])
        with_image = render(processor, [{"role": "user", "content": [{"type": "image"}, text]}])
    except InvalidSample:
        return frozenset(ids)
    start = common_prefix_length(plain, with_image)
    end = len(with_image) - common_prefix_length(plain[start:][::-1], with_image[start:][::-1])
    special = set(tokenizer.added_tokens_decoder)
    marker = tokenizer(with_image[start:end], add_special_tokens=False)["input_ids"]
    ids |= {i for i in marker if i in special}
    return frozenset(ids)
