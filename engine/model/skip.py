"""The skip readout: For-Value's ``G`` with the residual stream at a chosen depth beside the
final hidden states (docs/design.md, "Skip readout").

``G(x) = sum_t e_t h_t^T`` is the gradient of the sample's log-likelihood with respect to the
output head. Add to the model a linear readout from the residual stream after layer ``k`` to
the logits, initialised at zero: the model's outputs, so every ``e_t``, are unchanged, and the
gradient with respect to the pair (head, readout) is

    G(x) = [sum_t e_t h_t^T, sum_t e_t r_t^T],   r_t = norm(residual stream after layer k),

the final norm applied as the logit lens reads intermediate states. The value is still an
exact gradient inner product from one forward pass, and it also sees mid-depth states, which
carry more of a token's context than the last layer's (those are nearly a function of the
logits, so they add little to the errors they are paired with).

The derived model returns ``[h_t, r_t]`` as its states (``2d`` features) and ``[W, 0]`` as its
head, so that every route of the engine (kernels, preconditioner, references, serving) runs on
it unchanged, at twice the kernels' contraction width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .loading import ValuationModel


@dataclass(frozen=True)
class SkipStates:
    """Where the skip readout reads: decoder layer ``layer`` (1-based) of ``num_layers``; the
    block and norm of the native backbone (None with the vLLM backbone, whose worker reads them:
    engine/model/vllm_backbone.py)."""

    depth: float
    layer: int
    num_layers: int
    block: torch.nn.Module | None = None
    norm: torch.nn.Module | None = None

    @contextmanager
    def capture(self) -> Iterator[Callable[[], torch.Tensor]]:
        """While open, the block's output of the last forward is kept; the callable returns it
        through the final norm."""
        outputs: list[torch.Tensor] = []

        def keep(_module: torch.nn.Module, _inputs: object, output: object) -> None:
            outputs.append(output[0] if isinstance(output, tuple) else output)

        handle = self.block.register_forward_hook(keep)
        try:
            yield lambda: self.norm(outputs[-1])
        finally:
            handle.remove()


def skip_layer(depth: float, num_layers: int) -> int:
    """The decoder layer at ``depth`` (a fraction of the network, checked by ValuationConfig),
    1-based; never the last, whose normed output is the final state itself."""
    if num_layers < 2:
        raise ValueError(f"skip_depth needs a model of two layers or more, this one has {num_layers}")
    return min(max(1, round(depth * num_layers)), num_layers - 1)


def find_skip_states(backbone: torch.nn.Module, depth: float) -> SkipStates:
    """The decoder block and final norm of ``backbone`` (``...layers`` and the ``norm`` beside
    it, as in Llama, Qwen, Mistral, Gemma and their image-text language models; a vision
    tower's layers differ in number from the language model's, or have no ``norm`` beside)."""
    text_config = backbone.config.get_text_config()
    for name, module in backbone.named_modules():
        if name.split(".")[-1] != "layers" or not isinstance(module, torch.nn.ModuleList):
            continue
        parent = backbone.get_submodule(name.rpartition(".")[0]) if "." in name else backbone
        norm = getattr(parent, "norm", None)
        if isinstance(norm, torch.nn.Module) and len(module) == text_config.num_hidden_layers:
            layer = skip_layer(depth, len(module))
            return SkipStates(depth, layer, len(module), module[layer - 1], norm)
    raise ValueError(f"skip_depth needs a decoder with a list of `layers` and a final `norm`; "
                     f"{type(backbone).__name__} has none")


def with_skip_readout(model: ValuationModel, depth: float | None) -> ValuationModel:
    """``model`` with the skip readout at ``depth`` (the model itself for None). Built once per
    depth and kept by the model: the head ``[W, 0]`` is a ``V x 2d`` copy."""
    if depth is None:
        return model
    derived = model.derived.get(("skip", depth))
    if derived is None:
        if model.vllm is None:
            skip = find_skip_states(model.backbone, depth)
        else:
            num_layers = model.vllm.num_layers
            skip = SkipStates(depth, skip_layer(depth, num_layers), num_layers)
        head = torch.cat([model.head_weight, torch.zeros_like(model.head_weight)], dim=1)
        identity = {**model.identity, "hidden_size": str(head.shape[1]), "skip_depth": str(depth),
                    "skip_layer": f"{skip.layer}/{skip.num_layers}"}
        derived = dataclasses.replace(model, head_weight=head, identity=identity, skip=skip, derived={})
        model.derived[("skip", depth)] = derived
    return derived
