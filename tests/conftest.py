"""Tiny offline tokenizers: whole-word vocabulary, BOS prepended, "\\n" a token of its own."""

import os
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# Triton reads this when kernels are defined, so it must be set before forvalue.kernels is
# imported: without a GPU, the Triton kernels run in the interpreter on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = """system user assistant you are a helpful bot . hello there how are you i am fine
thanks what is two plus it four the cat sat on mat ? ! , good bye see"""

# SmolLM2-style ChatML, no generation markers.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same rendering, with {% generation %} markers around assistant content.
CHATML_GENERATION = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", WORDS)))
    vocab = {token: i for i, token in enumerate(SPECIAL + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIAL)
    backend.add_tokens(["\n"])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=chat_template,
    )


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(CHATML)


@pytest.fixture
def generation_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(CHATML_GENERATION)


@pytest.fixture(params=["chatml", "generation"])
def chat_tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return make_tokenizer(CHATML if request.param == "chatml" else CHATML_GENERATION)


@pytest.fixture
def no_template_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(None)
