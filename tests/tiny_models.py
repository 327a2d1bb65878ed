"""Tiny random causal LMs of several families, and G(x) by autograd through their own forward."""

from __future__ import annotations

import torch
from torch.func import functional_call
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97
SIZES = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


def tiny_model(kind: str, seed: int = 0, sizes: dict | None = None) -> torch.nn.Module:
    """``kind``: tied | untied | bias (untied head with a bias) | softcap | scale | qwen (Qwen2,
    tied, biases in the attention projections); ``sizes`` overrides some of SIZES."""
    torch.manual_seed(seed)
    sizes = {**SIZES, **(sizes or {})}
    if kind == "softcap":
        head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
        config = Gemma2Config(**sizes, head_dim=head_dim, final_logit_softcapping=2.0,
                              attn_implementation="eager")
        model = Gemma2ForCausalLM(config)
    elif kind == "qwen":
        model = Qwen2ForCausalLM(Qwen2Config(**sizes, tie_word_embeddings=True))
    elif kind == "scale":
        model = GraniteForCausalLM(GraniteConfig(**sizes, logits_scaling=0.4))
    else:
        model = LlamaForCausalLM(LlamaConfig(**sizes, tie_word_embeddings=kind == "tied"))
        if kind == "bias":
            old = model.lm_head
            model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    # Random init gives near-uniform predictions; larger head weights give peaked ones.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
        if model.get_output_embeddings().bias is not None:
            model.get_output_embeddings().bias.normal_()
    return model.double().eval()


def autograd_gradient(model: torch.nn.Module, input_ids: list[int], label_mask: list[bool],
                      inputs: dict | None = None) -> torch.Tensor:
    """``d/dW sum_k m_k log p_{k-1}[x_k]`` with the output projection as its own parameter;
    ``inputs``: more keyword arguments of the model's forward (an image-text model's pixels)."""
    head_weight = model.get_output_embeddings().weight.detach().clone().requires_grad_(True)
    ids = torch.tensor([input_ids])
    # tie_weights=False: only the head is replaced, a tied embedding keeps the original.
    logits = functional_call(model, {"lm_head.weight": head_weight}, args=(), strict=False, tie_weights=False,
                             kwargs={"input_ids": ids, "use_cache": False, **(inputs or {})}).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    positions = [k for k, m in enumerate(label_mask) if m]
    objective = sum(logp[k - 1, input_ids[k]] for k in positions)
    (gradient,) = torch.autograd.grad(objective, head_weight)
    return gradient


def frob(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Frobenius inner product <a, b>: what a value is of two head gradients."""
    return float((a * b).sum())


def random_samples(n: int, seed: int, min_len: int = 2, max_len: int = 20) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = torch.randint(0, VOCAB, (length,), generator=gen).tolist()
        mask = (torch.rand(length, generator=gen) < 0.6).tolist()
        mask[-1] = True  # at least one label
        samples.append({"id": f"s{seed}-{i}", "input_ids": ids, "loss_mask": [int(m) for m in mask]})
    return samples
