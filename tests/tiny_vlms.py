"""Tiny random image-text models of five families, each with a locally built tokenizer and
processor (nothing is downloaded): Qwen2-VL and Qwen2.5-VL (M-RoPE), LLaVA (CLIP tower, Llama
backbone), Idefics3 (image splitting into tiles with row/column tokens) and Gemma 3 (tied
head, image tokens attending both ways). Images of 28 to 56 pixels a side give 1 to 5 image
tokens.

The chat template is ChatML; an image part renders as the family's placeholder.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import torch
from conftest import SPECIAL, WORDS
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "idefics3", "gemma3")
TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=256)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
# Every token of each family that stands for an image (placeholders, markers, tiles, rows).
QWEN_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
IMAGE_TOKENS = {
    "qwen2_vl": QWEN_TOKENS,
    "qwen2_5_vl": QWEN_TOKENS,
    "llava": ["<image>"],
    "idefics3": ["<fake_token_around_image>", "<image>", "<global-img>",
                 *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))],
    "gemma3": ["<start_of_image>", "<image_soft_token>", "<end_of_image>"],
}
QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
PLACEHOLDER = {"qwen2_vl": QWEN_PLACEHOLDER, "qwen2_5_vl": QWEN_PLACEHOLDER, "llava": "<image>",
               "idefics3": "<image>", "gemma3": "<start_of_image>"}


def chat_template(placeholder: str) -> str:
    return (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '" + placeholder + "' }}"
        "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def vlm_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The tests' word-level vocabulary plus the family's image tokens (special)."""
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", WORDS)))
    special = SPECIAL + ["<end_of_utterance>"] + IMAGE_TOKENS[family]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(special)
    backend.add_tokens(["\n"])
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
             "image_token": "<image_soft_token>"} if family == "gemma3" else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens=named)


class _NoVideo:
    """Without torchvision there is no video processor; images need none."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


class _Qwen2VLProcessor(_NoVideo, Qwen2VLProcessor):
    pass


class _Qwen2_5_VLProcessor(_NoVideo, Qwen2_5_VLProcessor):
    pass


def tiny_processor(family: str):
    tokenizer, template = vlm_tokenizer(family), chat_template(PLACEHOLDER[family])
    if family.startswith("qwen"):
        images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)
        processor = _Qwen2VLProcessor if family == "qwen2_vl" else _Qwen2_5_VLProcessor
        return processor(images, tokenizer, None, chat_template=template)
    if family == "llava":
        images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        return LlavaProcessor(images, tokenizer, patch_size=14, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=template)
    if family == "idefics3":
        # 56-pixel images are split into 2 x 2 tiles of 28 plus the whole image: 5 image tokens.
        images = Idefics3ImageProcessorPil(size={"longest_edge": 56}, max_image_size={"longest_edge": 28})
        return Idefics3Processor(images, tokenizer, image_seq_len=1, chat_template=template)
    images = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    return Gemma3Processor(images, tokenizer, image_seq_length=4, chat_template=template)


def _config(family: str, tokenizer: PreTrainedTokenizerFast):
    ids = tokenizer.convert_tokens_to_ids
    text = dict(TEXT, vocab_size=len(tokenizer), bos_token_id=ids("<s>"), eos_token_id=ids("</s>"),
                pad_token_id=ids("<unk>"))
    if family.startswith("qwen"):
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
        tokens = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                      vision_start_token_id=ids("<|vision_start|>"),
                      vision_end_token_id=ids("<|vision_end|>"))
        patches = dict(num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        if family == "qwen2_vl":
            vision = dict(patches, depth=1, embed_dim=16, hidden_size=16, mlp_ratio=2)
            return Qwen2VLForConditionalGeneration, Qwen2VLConfig(text_config=text, vision_config=vision,
                                                                  **tokens)
        # A windowed block (windows of one merged patch) and a full-attention one.
        vision = dict(patches, depth=2, hidden_size=16, intermediate_size=32, out_hidden_size=16,
                      window_size=28, fullatt_block_indexes=[1])
        return Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                                    **tokens)
    if family == "llava":
        vision = dict(VISION, model_type="clip_vision_model", image_size=28, patch_size=14)
        return LlavaForConditionalGeneration, LlavaConfig(
            text_config=dict(text, model_type="llama"), vision_config=vision,
            image_token_index=ids("<image>"))
    if family == "idefics3":
        return Idefics3ForConditionalGeneration, Idefics3Config(
            text_config=dict(text, model_type="llama"), scale_factor=2, image_token_id=ids("<image>"),
            vision_config=dict(VISION, image_size=28, patch_size=14))
    return Gemma3ForConditionalGeneration, Gemma3Config(
        text_config=dict(text, head_dim=8, sliding_window=8), mm_tokens_per_image=4,
        vision_config=dict(VISION, image_size=28, patch_size=7), boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"))


@dataclass
class TinyVLM:
    family: str
    model: torch.nn.Module  # float64, eval
    processor: object

    def image_token_ids(self) -> set[int]:
        return set(self.processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[self.family]))


def tiny_vlm(family: str, seed: int = 0) -> TinyVLM:
    processor = tiny_processor(family)
    model_class, config = _config(family, processor.tokenizer)
    torch.manual_seed(seed)
    model = model_class(config)
    # Random init gives near-uniform predictions; larger head weights give peaked ones.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    return TinyVLM(family, model.double().eval(), processor)


def image(seed: int, size: tuple[int, int] = (56, 56)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def image_sample(sample_id: str, source, question: str = "what is the cat ?",
                 answer: str = "it is a cat") -> dict:
    return {"id": sample_id, "messages": [
        {"role": "user", "content": [{"type": "image", "image": source}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": answer}]}
