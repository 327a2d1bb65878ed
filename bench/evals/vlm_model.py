"""A small real image-text model, built on the CPU in a few minutes, and its throughput.

No VLM weights can be fetched here, and random weights measure nothing, so this builds one,
LLaVA style: the embedded SmolLM2-135M-Instruct (frozen; one ``<image>`` token added) reads
64 image tokens from a small CLIP vision tower and the LLaVA projector, trained on synthetic
scenes (bench/evals/vlm_task.py) with their captions in two stages:

1. alignment, without the language model: the image tokens regress onto the LM's input
   embeddings of the caption's words (count, colour, shape, repeated over the 64 slots), so
   that the LM reads an image as those words (cheap: no LM forward);
2. captioning through the frozen LM, LLaVA's pretraining objective ("Describe the image."
   -> "Two red circles."), a few dozen steps that backpropagate through the LM into the
   tower and projector.

The zero-shot accuracy of the result (questions never trained on: "What shape is in the
image?" answered "It is a ...", "What colour is it?" answered "It is ...", on held-out
scenes) is measured and saved with the model. The model and its processor are saved with
``save_pretrained`` under the embedded model's cache, keyed by the build recipe, so that
``load_model(folder)`` loads them as any local VLM.

    python -m forvalue.bench.evals.vlm_model --out bench/results/vlm   # build (cached) + throughput
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .vlm_task import COLOURS, COUNT_WORDS, SHAPES, Scene, image_message, make_vlm_task, scenes

BASE = "smollm2-135m"
IMAGE_TOKEN = "<image>"
_BUILD_FORMAT = 1  # part of the cache key: bump when the code changes what a recipe builds
# SmolLM2-Instruct's own ChatML template (with its default system turn), an image part
# rendered as the image token on its own line, LLaVA style.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "\n' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CAPTION_QUESTION = "Describe the image."
# Zero-shot probes: (attribute, question, answer prefix, candidate words).
PROBES = (("shape", "What shape is in the image?", "It is a", SHAPES),
          ("colour", "What colour is it?", "It is", tuple(COLOURS)))
_HELD_OUT = 1_000_000  # held-out scenes start here in the training stream


@dataclass(frozen=True)
class Recipe:
    """Everything the build depends on; its digest names the cached folder."""

    image_size: int = 64
    patch_size: int = 8  # (64 / 8)^2 = 64 image tokens
    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    align_pool: int = 3000  # scenes of stage 1 (pixels held in memory)
    align_steps: int = 1500
    align_batch: int = 32
    align_lr: float = 2e-3
    caption_steps: int = 32
    caption_batch: int = 4
    caption_lr: float = 1e-4
    probe_scenes: int = 48  # held-out scenes of the zero-shot accuracy (0: not measured)
    seed: int = 0

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def key(self) -> str:
        text = json.dumps({"recipe": asdict(self), "base": BASE, "format": _BUILD_FORMAT}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# ------------------------------------------------------------------ building


def vlm_folder(recipe: Recipe = Recipe(), cache: Path | None = None) -> Path:
    """Where the model of ``recipe`` is (or will be) cached."""
    from forvalue.engine.model.embedded import cache_dir

    return (cache or cache_dir() / "models") / f"vlm-{BASE}-{recipe.key()}"


def build_vlm(recipe: Recipe = Recipe(), cache: Path | None = None,
              log: Callable[[str], None] = print) -> Path:
    """The folder of the model built by ``recipe``: cached, or built now (a few minutes)."""
    folder = vlm_folder(recipe, cache)
    if (folder / "build.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forvalue.engine.model.embedded import embedded_path

    log(f"building the small VLM into {folder}")
    start = time.perf_counter()
    path = embedded_path(BASE)
    processor = make_processor(AutoTokenizer.from_pretrained(path, local_files_only=True), recipe)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    model = assemble(base, processor.tokenizer, recipe)
    del base
    record: dict[str, Any] = {"recipe": asdict(recipe), "base": BASE, "threads": torch.get_num_threads()}
    for stage, train in (("align", align), ("caption", caption)):
        stage_start = time.perf_counter()
        losses = train(model, processor, recipe)
        accuracy = zero_shot_accuracy(model, processor, recipe) if recipe.probe_scenes else {}
        record[stage] = {"seconds": time.perf_counter() - stage_start, "loss_first": losses[0],
                         "loss_last": losses[-1], "zero_shot": accuracy}
        log(f"  {stage}: {record[stage]['seconds']:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
            f"zero-shot {json.dumps(accuracy)}")
    record["build_seconds"] = time.perf_counter() - start
    _save(model, processor, record, folder)
    return folder


def make_processor(tokenizer: Any, recipe: Recipe) -> Any:
    """A LLaVA processor over ``tokenizer`` (which gains the image token): CLIP's image
    processing at the recipe's size, the chat template above."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    side = {"height": recipe.image_size, "width": recipe.image_size}
    images = CLIPImageProcessorPil(size={"shortest_edge": recipe.image_size}, crop_size=side)
    return LlavaProcessor(images, tokenizer, patch_size=recipe.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def assemble(lm: torch.nn.Module, tokenizer: Any, recipe: Recipe) -> torch.nn.Module:
    """A LlavaForConditionalGeneration whose language model holds ``lm``'s weights (frozen;
    the image token's embedding is the mean embedding) and whose tower and projector are new."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    text = dict(lm.config.to_dict(), vocab_size=len(tokenizer))
    vision = CLIPVisionConfig(hidden_size=recipe.hidden_size, intermediate_size=4 * recipe.hidden_size,
                              num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                              image_size=recipe.image_size, patch_size=recipe.patch_size)
    config = LlavaConfig(text_config=text, vision_config=vision, vision_feature_layer=-1,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", image_seq_length=recipe.image_tokens)
    torch.manual_seed(recipe.seed)
    model = LlavaForConditionalGeneration(config)
    state = lm.model.state_dict()
    embed = state["embed_tokens.weight"]
    state["embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True)])
    model.model.language_model.load_state_dict(state)
    model.tie_weights()
    model.model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    return model


def _save(model: torch.nn.Module, processor: Any, record: dict[str, Any], folder: Path) -> None:
    """Save under a temporary name and rename, so that a folder with build.json is whole."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    (partial / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


# ------------------------------------------------------------------ stage 1: alignment


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    parts = (model.model.vision_tower, model.model.multi_modal_projector)
    return [p for part in parts for p in part.parameters()]


def _optimiser(model: torch.nn.Module, lr: float, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW on the tower and projector, the learning rate decaying linearly to zero."""
    params = _trainable(model)
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(params, lr=lr)
    return optimiser, torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 - step / steps)


def image_features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The projected image tokens, ``(images, image_tokens, d)``, as the model inserts them."""
    config = model.config
    out = model.model.get_image_features(pixels, vision_feature_layer=config.vision_feature_layer,
                                         vision_feature_select_strategy=config.vision_feature_select_strategy)
    return torch.stack(list(out.pooler_output))


def _word_ids(tokenizer: Any, scene_list: Sequence[Scene]) -> torch.Tensor:
    """Per scene, the ids of " two", " red", " circle" (each one token in SmolLM2's vocabulary)."""
    def one(word: str) -> int:
        (token,) = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        return token

    return torch.tensor([[one(COUNT_WORDS[s.count]), one(s.colour), one(s.shape)] for s in scene_list])


def align(model: torch.nn.Module, processor: Any, recipe: Recipe) -> list[float]:
    """Stage 1: image token ``j`` regresses onto the embedding of caption word ``j mod 3``;
    squared error over the mean squared norm of an embedding. Losses per step."""
    pool = scenes(recipe.align_pool, recipe.seed)
    pixels = pixel_values(processor, [s.image() for s in pool])
    embed = model.get_input_embeddings().weight.detach()
    targets = _word_ids(processor.tokenizer, pool)[:, torch.arange(recipe.image_tokens) % 3]
    scale = embed.pow(2).sum(1).mean()
    optimiser, schedule = _optimiser(model, recipe.align_lr, recipe.align_steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    losses = []
    for _ in range(recipe.align_steps):
        batch = torch.randint(len(pool), (recipe.align_batch,), generator=generator)
        loss = (image_features(model, pixels[batch]) - embed[targets[batch]]).pow(2).sum(-1).mean() / scale
        losses.append(_step(optimiser, schedule, loss))
    return losses


def _step(optimiser: torch.optim.Optimizer, schedule: Any, loss: torch.Tensor) -> float:
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    schedule.step()
    return float(loss.detach())


def pixel_values(processor: Any, images: list[Any]) -> torch.Tensor:
    return torch.as_tensor(np.asarray(processor.image_processor(images)["pixel_values"]))


# ------------------------------------------------------------------ stage 2: captioning


def caption(model: torch.nn.Module, processor: Any, recipe: Recipe) -> list[float]:
    """Stage 2: the caption's NLL (the assistant turn, as the engine labels it) through the
    frozen LM, into the tower and projector. Losses per step."""
    from forvalue.engine.inputs.vision import ImageSamples, Vision

    encoder = ImageSamples(Vision.of(processor), None)
    pool = scenes(recipe.caption_steps * recipe.caption_batch, recipe.seed + 1)
    optimiser, schedule = _optimiser(model, recipe.caption_lr, recipe.caption_steps)
    losses = []
    for first in range(0, len(pool), recipe.caption_batch):
        encoded = [encoder.encode([image_message(s.image(), CAPTION_QUESTION),
                                   {"role": "assistant", "content": s.caption()}], find_assistant=True)
                   for s in pool[first:first + recipe.caption_batch]]
        losses.append(_step(optimiser, schedule, _caption_loss(model, encoded)))
    return losses


def _caption_loss(model: torch.nn.Module, encoded: list[tuple[list[int], list[bool], Any]]) -> torch.Tensor:
    from forvalue.engine.core.runner import right_padded

    ids, mask = right_padded([e[0] for e in encoded])
    pixels = torch.cat([e[2].tensors["pixel_values"] for e in encoded])
    hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                         use_cache=False).last_hidden_state
    rows, cols = zip(*[(r, k) for r, e in enumerate(encoded) for k, label in enumerate(e[1]) if label],
                     strict=True)
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    logits = model.lm_head(hidden[rows_t, cols_t - 1])
    return torch.nn.functional.cross_entropy(logits, ids[rows_t, cols_t])


# ------------------------------------------------------------------ zero-shot accuracy


@torch.inference_mode()
def zero_shot_accuracy(model: torch.nn.Module, processor: Any, recipe: Recipe,
                       batch: int = 8) -> dict[str, float]:
    """Per probe, on held-out scenes: the share whose most likely next word after the answer
    prefix, among the candidates, is the right one (chance: one over their number), and the
    share whose most likely token over the whole vocabulary is (greedy)."""
    held_out = scenes(recipe.probe_scenes, recipe.seed, start=_HELD_OUT)
    found = {}
    for attribute, question, prefix, candidates in PROBES:
        ids = [processor.tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]
               for word in candidates]
        logits = torch.cat([_next_logits(model, processor, held_out[k:k + batch], question, prefix)
                            for k in range(0, len(held_out), batch)])
        truth = torch.tensor([candidates.index(getattr(s, attribute)) for s in held_out])
        found[attribute] = float((logits[:, ids].argmax(1) == truth).float().mean())
        found[f"{attribute}_greedy"] = float((logits.argmax(1) == torch.tensor(ids)[truth]).float().mean())
        found[f"{attribute}_chance"] = 1 / len(candidates)
    return found


def _next_logits(model: torch.nn.Module, processor: Any, batch: Sequence[Scene], question: str,
                 prefix: str) -> torch.Tensor:
    """Next-token logits after ``prefix`` in the assistant turn (every row has the same length)."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    text = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False) + prefix
    inputs = processor(text=[text] * len(batch), images=[s.image() for s in batch], return_tensors="pt")
    return model(**inputs, use_cache=False).logits[:, -1].float()


# ------------------------------------------------------------------ throughput


def throughput(model: Any, samples: list[dict], valid: list[dict], rounds: int = 3) -> dict[str, Any]:
    """Valuation (``Valuator.score`` against a reference of ``valid``, the paper's value) in
    samples per second against the same model's own forward (the Hugging Face module, with
    logits) on the same samples, each alone as the engine runs image samples; rounds
    alternate and each side keeps its fastest round. The plain forward is timed with its
    inputs encoded beforehand, and again with the processor call included."""
    from forvalue.engine import Valuator
    from forvalue.engine.inputs.vision import ImageSamples

    valuator = Valuator(model, loss_on="response", progress=False)
    reference = valuator.reference(valid)
    encoder = ImageSamples(model.vision, None)
    encode = lambda sample: encoder.encode(sample["messages"], find_assistant=True)  # noqa: E731
    encoded = [encode(s) for s in samples]
    sides = {"valuation": lambda: valuator.score(samples, reference),
             "plain_forward": lambda: [_forward(model, e[0], e[2]) for e in encoded],
             "plain_forward_with_processing": lambda: [_forward(model, e[0], e[2])
                                                       for e in map(encode, samples)]}
    sides["valuation"]()  # warm both paths once
    sides["plain_forward"]()
    seconds = {name: min(_timed(run) for _ in range(rounds)) for name, run in sides.items()}
    rates = {name: len(samples) / s for name, s in seconds.items()}
    return {"samples": len(samples), "tokens_per_sample": float(np.mean([len(e[0]) for e in encoded])),
            "image_tokens_per_sample": len([t for t in encoded[0][0] if t in model.vision.image_token_ids]),
            "seconds": seconds, "samples_per_s": rates,
            "ratio": rates["valuation"] / rates["plain_forward"],
            "ratio_with_processing": rates["valuation"] / rates["plain_forward_with_processing"]}


@torch.inference_mode()
def _forward(model: Any, ids: list[int], images: Any) -> torch.Tensor:
    tensor = torch.tensor([ids], device=model.device)
    return model.causal_lm(input_ids=tensor, attention_mask=torch.ones_like(tensor), use_cache=False,
                           **model.image_inputs(images)).logits


def _timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def write_throughput(out: Path, found: dict[str, Any], command: str) -> None:
    from ..common import machine

    found = {**found, "machine": machine(), "threads": torch.get_num_threads(), "command": command}
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(found, indent=2) + "\n")
    rate, seconds = found["samples_per_s"], found["seconds"]
    rows = "\n".join(f"| {name.replace('_', ' ')} | {seconds[name]:.2f} | {rate[name]:.2f} |"
                     for name in rate)
    (out / "throughput.md").write_text(
        f"# Small VLM: valuation against its own forward\n\n`{command}` on {found['machine']}, "
        f"{found['threads']} threads; {found['samples']} samples of {found['tokens_per_sample']:.0f} tokens "
        f"({found['image_tokens_per_sample']} image tokens), one per forward, fastest of 3 alternating "
        "rounds.\n\n"
        f"| | seconds | samples/s |\n|---|---|---|\n{rows}\n\n"
        f"Valuation / plain forward: **{found['ratio']:.2f}** "
        f"({found['ratio_with_processing']:.2f} when the forward also pays for the processor).\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m forvalue.bench.evals.vlm_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for model.json and throughput.{json,md}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from forvalue.engine import load_model

    folder = build_vlm()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "build.json", out / "model.json")
    task = make_vlm_task("small")
    found = throughput(load_model(str(folder), device="cpu"), task.train, task.valid)
    write_throughput(out, found, " ".join(["python -m forvalue.bench.evals.vlm_model", *sys.argv[1:]]))
    print((out / "throughput.md").read_text())


if __name__ == "__main__":
    main()
