"""Fine-tune a LoRA copy of the model on a selection and test it on held-out chats: the
measurement after selection of ``forvalue eval --task targeted``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def fine_tune(model: Any, chats: list[dict], steps: int, seed: int, lora_rank: int) -> Any:
    """A LoRA copy of the model after ``steps`` steps on ``chats``."""
    from forvalue.engine.warmup import lora_copy, train_lora

    lora = lora_copy(model, rank=lora_rank, seed=seed)
    with torch.enable_grad():
        train_lora(model, lora, encode(model, chats), steps=steps, lr=1e-3, seed=seed)
    return lora


def encode(model: Any, chats: list[dict]) -> list[Any]:
    from forvalue.engine.inputs.samples import encode_sample

    return [encode_sample(s, model.tokenizer, where=f"chat {i}", context_length=model.context_length)
            for i, s in enumerate(chats)]


def held_out_scores(model: Any, lora: Any, held_out: list[dict], batch: int = 16) -> dict[str, float]:
    """The mean NLL of the held-out answers and the exact match of the greedy answers. A chat
    whose every answer token (its end of turn included) is the argmax under teacher forcing
    is answered exactly by greedy decoding, so only the others are decoded, in batches."""
    from forvalue.engine.warmup import label_logits

    nlls, decode = [], []
    encoded = encode(model, held_out)
    for first in range(0, len(encoded), batch):
        scored = label_logits(model, lora.backbone, encoded[first:first + batch])
        for row, (logits, labels) in enumerate(scored):
            nlls.append(float(torch.nn.functional.cross_entropy(logits, labels)))
            if not bool((logits.argmax(-1) == labels).all()):
                decode.append(first + row)
    answers = [answer for first in range(0, len(decode), batch)
               for answer in greedy_answers(model, lora, [held_out[i] for i in decode[first:first + batch]])]
    right = sum(answer == held_out[i]["messages"][-1]["content"]
                for i, answer in zip(decode, answers, strict=True))
    exact = (len(held_out) - len(decode) + right) / len(held_out)
    return {"exact_match": exact, "nll": float(np.mean(nlls))}


def greedy_answers(model: Any, lora: Any, chats: list[dict]) -> list[str]:
    """The fine-tuned model's greedy replies to the chats without their last (assistant)
    message, each up to the end of its turn or line (prompts left-padded into one batch)."""
    from forvalue.engine.inputs.chat import render

    tokenizer = model.tokenizer
    texts = [render(tokenizer, chat["messages"][:-1], prompt=True) for chat in chats]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    limit = max(len(tokenizer(chat["messages"][-1]["content"], add_special_tokens=False)["input_ids"])
                for chat in chats) + 4
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    output = lora.peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=limit,
                                      do_sample=False, pad_token_id=pad)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip().split("\n")[0].strip()
            for row in output]
