"""Warm-up: a short LoRA fine-tune on the training pool, saved in PEFT's format.

The official selection pipeline values data with such an adapter (a model that has seen the
task a little predicts its format, so that what remains in the prediction errors is the
content). ``load_model(..., adapter=DIR)`` merges it; the valuation itself stays forward-only.
This is the one place where forvalue runs a backward pass; it needs the ``peft`` extra.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import ValuationConfig
from .core.runner import right_padded
from .inputs.samples import EncodedSample, encode_sample, where_of
from .model.loading import ModelError, ValuationModel

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LoraCopy:
    """A copy of the model with LoRA adapters: the PEFT model (to save), its backbone (to run)
    and the trainable parameters by name. The valuation model is untouched."""

    peft_model: Any
    backbone: torch.nn.Module
    params: list[tuple[str, torch.Tensor]]


@dataclass
class WarmupResult:
    adapter: Path
    epochs: int
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean label NLL per epoch, during training


def lora_copy(model: ValuationModel, *, rank: int = 8, alpha: int = 16, seed: int = 0,
              target_modules: Sequence[str] = LORA_TARGETS) -> LoraCopy:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModelError("the warm-up needs the peft package: pip install 'forvalue[lora]'") from None
    if model.causal_lm is None:
        raise ModelError(f"{model.name}: the warm-up needs the whole causal LM")
    torch.manual_seed(seed)  # LoRA's A factors are initialised at random
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules))
    try:
        peft_model = get_peft_model(copy.deepcopy(model.causal_lm), config)
    except ValueError as exc:  # target modules absent from this family
        raise ModelError(f"{model.name}: cannot add LoRA adapters: {exc}") from None
    base = peft_model.get_base_model()
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"))
    params = [(name, p) for name, p in backbone.named_parameters() if "lora_" in name]
    for _, p in params:
        p.requires_grad_(True)
    return LoraCopy(peft_model, backbone, params)


def label_logits(model: ValuationModel, backbone: torch.nn.Module,
                 samples: list[EncodedSample]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample the logits that predict its labels, ``(n_labels, vocab)``, and the labels."""
    ids, mask = right_padded([s.input_ids for s in samples])
    hidden = backbone(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                      use_cache=False).last_hidden_state
    out = []
    for row, s in enumerate(samples):
        positions = torch.tensor(s.label_positions(), device=model.device)
        labels = torch.tensor([s.input_ids[k] for k in s.label_positions()], device=model.device)
        out.append((model.logits(hidden[row, positions - 1], model.head_weight), labels))
    return out


def label_nll(model: ValuationModel, backbone: torch.nn.Module, samples: list[EncodedSample]) -> torch.Tensor:
    """Per-sample mean negative log-likelihood of the labels, ``(batch,)``, with grad."""
    return torch.stack([torch.nn.functional.cross_entropy(logits, labels)
                        for logits, labels in label_logits(model, backbone, samples)])


def train_lora(model: ValuationModel, lora: LoraCopy, samples: list[EncodedSample], *, epochs: int = 1,
               steps: int | None = None, lr: float = 3e-4, batch_size: int = 4, seed: int = 0,
               progress: bool = False) -> tuple[torch.optim.AdamW, list[float]]:
    """AdamW on the mean label NLL, shuffled batches, for ``epochs`` passes or exactly
    ``steps`` steps (as many passes as that takes); the optimiser (its moments) and the mean
    loss of each pass."""
    optimizer = torch.optim.AdamW([p for _, p in lora.params], lr=lr)
    order = list(range(len(samples)))
    rng = random.Random(seed)
    per_epoch = -(-len(order) // batch_size)
    total_steps = epochs * per_epoch if steps is None else steps
    losses: list[float] = []
    done = 0
    with tqdm(total=total_steps, desc="LoRA", unit="step", disable=not progress or None, leave=False) as bar:
        while done < total_steps:
            rng.shuffle(order)
            total, seen = 0.0, 0
            for first in range(0, len(order), batch_size):
                if done == total_steps:
                    break
                batch = [samples[i] for i in order[first:first + batch_size]]
                optimizer.zero_grad()
                loss = label_nll(model, lora.backbone, batch).mean()
                loss.backward()
                optimizer.step()
                total, seen, done = total + float(loss.detach()) * len(batch), seen + len(batch), done + 1
                bar.update(1)
            losses.append(total / seen)
    return optimizer, losses


def warmup(model: ValuationModel, samples: Sequence[dict], out: str | Path, *,
           config: ValuationConfig | None = None, epochs: int = 1, rank: int = 8, alpha: int = 16,
           lr: float = 3e-4, batch_size: int = 4, seed: int = 0, progress: bool = True) -> WarmupResult:
    """Fine-tune LoRA adapters on ``samples`` (labelled as ``config`` says: ``loss_on``,
    ``max_length``, ``append_eos``) and save them (PEFT format) in ``out``."""
    if epochs < 1 or rank < 1 or batch_size < 1 or not lr > 0:
        raise ValueError("epochs, rank and batch_size must be positive and lr > 0")
    config = config or ValuationConfig()
    encoded = [encode_sample(s, model.tokenizer, where=where_of(samples, i), index=i, loss_on=config.loss_on,
                             append_eos=config.append_eos, max_length=config.max_length,
                             context_length=model.context_length) for i, s in enumerate(samples)]
    if not encoded:
        raise ValueError("no training sample to warm up on")
    start = time.perf_counter()
    lora = lora_copy(model, rank=rank, alpha=alpha, seed=seed)
    with torch.enable_grad():
        _, losses = train_lora(model, lora, encoded, epochs=epochs, lr=lr, batch_size=batch_size,
                               seed=seed, progress=progress)
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    lora.peft_model.save_pretrained(partial)
    (partial / "forvalue_warmup.json").write_text(json.dumps(
        {"base_model": model.name, "model_hash": model.identity.get("model_hash", ""), "epochs": epochs,
         "rank": rank, "alpha": alpha, "lr": lr, "batch_size": batch_size, "loss_on": config.loss_on,
         "seed": seed, "samples": len(encoded), "losses": losses}, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    partial.replace(out)  # a half-written adapter never sits under the final name
    steps = epochs * -(-len(encoded) // batch_size)
    return WarmupResult(out, epochs, steps, time.perf_counter() - start, losses)
