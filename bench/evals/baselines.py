"""The methods For-Value is measured against (bench only; never the serving path).

Every function returns values where higher means more helpful, as For-Value's do:
``(n_train, n_valid)`` matrices, or ``(n_train,)`` against the validation mean.

- ``autograd_values``: ``<dW_a, dW_b>`` of the output layer by backprop, one sample at a
  time (the same number as For-Value, paid for with explicit ``V x d`` gradients).
- ``lora_gradients`` + ``tracin_values`` / ``less_values`` / ``datainf_values``: per-sample
  gradients of LoRA adapters on the attention projections after a one-epoch warm-up
  fine-tune (at initialisation one LoRA factor is zero and its gradients vanish).
- ``representation_similarity``: cosine of mean final hidden states.
- ``rds_plus_values``: RDS+ (Ivison et al., 2025): the cosine of position-weighted means of
  the final states, each pool sample scored by its best match among the target's samples.
- ``tfidf_similarity``: cosine of TF-IDF vectors of the samples' words.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from forvalue.engine import ValuationModel, Valuator
from forvalue.engine.core.runner import right_padded
from forvalue.engine.inputs.samples import EncodedSample, encode_sample
from forvalue.engine.inputs.vision import ImageSamples
from forvalue.engine.outputs import LabelStates
from forvalue.engine.warmup import LORA_TARGETS, label_nll, lora_copy, train_lora


def encode(model: ValuationModel, samples: Sequence[dict], loss_on: str) -> list[EncodedSample]:
    """Token ids, label masks and (image-text models) image inputs exactly as the Valuator
    builds them."""
    images = None if model.vision is None else ImageSamples(model.vision, None)
    return [encode_sample(s, model.tokenizer, where=f"index {i}", index=i, loss_on=loss_on,
                          context_length=model.context_length, images=images) for i, s in enumerate(samples)]


def log_probs(model: ValuationModel, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Log-softmax of the model's transformed logits ``f(W h + b)``, materialised (T x V)."""
    return torch.log_softmax(model.logits(hidden, weight), dim=-1)


# ------------------------------------------------------------ last layer, autograd


def _states(model: ValuationModel, samples: Sequence[dict], loss_on: str,
            batch_tokens: int) -> list[LabelStates]:
    return Valuator(model, loss_on=loss_on, batch_tokens=batch_tokens, progress=False).label_states(samples)


def _head_gradient(model: ValuationModel, weight: torch.Tensor, states: LabelStates) -> torch.Tensor:
    """``d/dW sum_t log p_t[y_t]`` by backprop, flattened; the hidden states are copied out of
    inference mode so that autograd may save them."""
    logp = log_probs(model, states.hidden.clone(), weight)
    objective = logp.gather(1, states.labels.clone()[:, None]).sum()
    (gradient,) = torch.autograd.grad(objective, weight)
    return gradient.reshape(-1)


def autograd_values(model: ValuationModel, train: Sequence[dict], valid: Sequence[dict], *,
                    loss_on: str, reference: bool = False, memory_gb: float = 4.0,
                    train_chunk: int = 8, batch_tokens: int = 4096) -> np.ndarray:
    """Output-layer gradient inner products by autograd: ``(n_train, n_valid)``, or with
    ``reference=True`` ``(n_train,)`` against the mean validation gradient.

    Validation gradients are held in blocks of at most ``memory_gb``; training gradients are
    recomputed once per block and multiplied ``train_chunk`` at a time (one GEMM, not one
    pass over the block per sample).
    """
    weight = model.head_weight.detach().clone().requires_grad_(True)
    rows = _states(model, train, loss_on, batch_tokens)
    cols = _states(model, valid, loss_on, batch_tokens)
    if reference:
        mean = sum(_head_gradient(model, weight, s) for s in cols) / len(cols)
        return np.array([float(_head_gradient(model, weight, s).double() @ mean.double()) for s in rows])
    per_block = max(1, int(memory_gb * 2**30 // (weight.numel() * weight.element_size())))
    values = np.zeros((len(rows), len(cols)))
    for start in range(0, len(cols), per_block):
        block = _stacked(model, weight, cols[start:start + per_block])
        for first in range(0, len(rows), train_chunk):
            chunk = _stacked(model, weight, rows[first:first + train_chunk])
            values[first:first + len(chunk), start:start + len(block)] = _inner_products(chunk, block)
    return values


def _inner_products(a: torch.Tensor, b: torch.Tensor, slice_size: int = 1 << 18) -> np.ndarray:
    """``a @ b.T`` in float32 GEMMs over slices of the long axis, summed in float64: a single
    float32 GEMM over ``V * d`` (28M) terms drifts by ~1e-4 relative on SmolLM2."""
    out = torch.zeros((len(a), len(b)), dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], slice_size):
        out += (a[:, start:start + slice_size] @ b[:, start:start + slice_size].T).double()
    return out.cpu().numpy()


def _stacked(model: ValuationModel, weight: torch.Tensor, states: list[LabelStates]) -> torch.Tensor:
    out = torch.empty((len(states), weight.numel()), dtype=weight.dtype, device=weight.device)
    for row, s in enumerate(states):
        out[row] = _head_gradient(model, weight, s)
    return out


# ------------------------------------------------------------------------ LoRA


@dataclass
class LoraGradients:
    """Per-sample gradients of the LoRA parameters (of the mean label NLL, as LESS and DataInf
    use), one row per sample, the parameters of ``names`` laid out one after another."""

    names: list[str]
    sizes: list[int]
    train: torch.Tensor  # (n_train, P) float32
    valid: torch.Tensor  # (n_valid, P)
    adam_avg: torch.Tensor  # (P,) Adam's first moment after the warm-up
    adam_avg_sq: torch.Tensor  # (P,) second moment
    warmup_seconds: float
    gradient_seconds: float
    gradient_cpu_seconds: float = 0.0

    def blocks(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """The columns of each parameter tensor (DataInf works per parameter)."""
        return list(matrix.split(self.sizes, dim=1))


def lora_gradients(model: ValuationModel, train: Sequence[dict], valid: Sequence[dict], *,
                   loss_on: str, rank: int = 8, alpha: int = 16, lr: float = 3e-4,
                   batch_size: int = 4, seed: int = 0,
                   target_modules: Sequence[str] = LORA_TARGETS) -> LoraGradients:
    """Warm up LoRA adapters (a copy of the backbone; the model is untouched) for one epoch
    with AdamW, then take every sample's gradient by its own backward pass."""
    lora = lora_copy(model, rank=rank, alpha=alpha, seed=seed, target_modules=target_modules)
    backbone, params = lora.backbone, lora.params
    train_encoded, valid_encoded = encode(model, train, loss_on), encode(model, valid, loss_on)
    if any(s.images is not None for s in [*train_encoded, *valid_encoded]):
        raise ValueError("the LoRA baselines run the language model on token ids alone: "
                         "samples with images are not supported")

    start = time.perf_counter()
    optimizer, _ = train_lora(model, lora, train_encoded, lr=lr, batch_size=batch_size, seed=seed)
    warmup_seconds = time.perf_counter() - start

    start, start_cpu = time.perf_counter(), time.process_time()
    train_grads = _per_sample_gradients(model, backbone, params, train_encoded)
    valid_grads = _per_sample_gradients(model, backbone, params, valid_encoded)
    gradient_seconds = time.perf_counter() - start
    gradient_cpu_seconds = time.process_time() - start_cpu
    state = [optimizer.state[p] for _, p in params]
    return LoraGradients(
        names=[name for name, _ in params], sizes=[p.numel() for _, p in params],
        train=train_grads, valid=valid_grads,
        adam_avg=torch.cat([s["exp_avg"].reshape(-1) for s in state]).float().cpu(),
        adam_avg_sq=torch.cat([s["exp_avg_sq"].reshape(-1) for s in state]).float().cpu(),
        warmup_seconds=warmup_seconds, gradient_seconds=gradient_seconds,
        gradient_cpu_seconds=gradient_cpu_seconds)


def _per_sample_gradients(model: ValuationModel, backbone: torch.nn.Module,
                          params: list[tuple[str, torch.Tensor]],
                          samples: list[EncodedSample]) -> torch.Tensor:
    tensors = [p for _, p in params]
    out = torch.empty((len(samples), sum(p.numel() for p in tensors)), dtype=torch.float32)
    for row, sample in enumerate(samples):
        grads = torch.autograd.grad(label_nll(model, backbone, [sample])[0], tensors)
        out[row] = torch.cat([g.reshape(-1) for g in grads]).float().cpu()
    return out


def tracin_values(grads: LoraGradients) -> np.ndarray:
    """TracIn at one checkpoint: ``<g_a, g_b>`` (learning rate dropped: it only scales)."""
    valid = grads.valid.double()
    return np.concatenate([(rows.double() @ valid.T).numpy() for rows in grads.train.split(_ROWS)])


_ROWS = 64  # training rows per float64 block: a full-size (900 x 0.9M) copy would take 6.6 GB


def less_values(grads: LoraGradients, beta1: float = 0.9, beta2: float = 0.999,
                eps: float = 1e-8) -> np.ndarray:
    """LESS: cosine of the Adam update direction of each training gradient (LESS's formula,
    with the warm-up optimiser's moments) with each plain validation gradient. LESS then
    projects both to 8192 random dimensions to save memory; here the cosine is exact."""
    valid = torch.nn.functional.normalize(grads.valid.double(), dim=1)
    blocks = []
    for rows in grads.train.split(_ROWS):
        rows = rows.double()
        avg = beta1 * grads.adam_avg.double() + (1 - beta1) * rows
        avg_sq = beta2 * grads.adam_avg_sq.double() + (1 - beta2) * rows.square()
        update = torch.nn.functional.normalize(avg / torch.sqrt(avg_sq + eps), dim=1)
        blocks.append((update @ valid.T).numpy())
    return np.concatenate(blocks)


def datainf_values(train_blocks: Sequence[torch.Tensor], valid_blocks: Sequence[torch.Tensor],
                   damping: float = 0.1) -> np.ndarray:
    """DataInf's closed-form influence, as helpfulness ``g_b^T H^-1 g_a`` (DataInf reports
    minus this), summed over parameter blocks.

    Per block, ``H = mean_i (g_i g_i^T + lam I)`` is inverted as ``mean_i (g_i g_i^T + lam
    I)^-1`` (DataInf's swap of mean and inverse), each term by Sherman-Morrison:
    ``(I - g_i g_i^T / (lam + |g_i|^2)) / lam``, with ``lam = damping * mean_i |g_i|^2``
    (DataInf's default: the mean divided by 10). In matrices: ``(M - K diag(c) M / n) / lam``
    with ``M = G V^T``, ``K = G G^T``, ``c_i = 1 / (lam + |g_i|^2)``.
    """
    total = None
    for train, valid in zip(train_blocks, valid_blocks, strict=True):
        train, valid = train.double(), valid.double()
        squared = train.square().sum(dim=1)
        lam = damping * float(squared.mean())
        cross = train @ valid.T
        gram = train @ train.T
        block = (cross - (gram / (lam + squared)[None, :]) @ cross / len(train)) / lam
        total = block if total is None else total + block
    return total.numpy()


# --------------------------------------------------------------- similarities


@torch.inference_mode()
def mean_hidden_states(model: ValuationModel, samples: Sequence[dict], batch_size: int = 16,
                       weighted: bool = False) -> torch.Tensor:
    """Each sample's final (post-norm) hidden states averaged over all its tokens (image
    tokens included), ``(n, d)`` float64; ``weighted``: token ``i`` (1-based, real tokens
    only) weighted ``i / sum_j j``, RDS+'s ``weighted_mean`` pooling."""
    encoded = encode(model, samples, "all")
    step = batch_size if model.vision is None else 1  # image inputs are a batch of one
    out = torch.empty((len(encoded), model.hidden_size), dtype=torch.float64)
    for first in range(0, len(encoded), step):
        batch = encoded[first:first + step]
        ids, mask = right_padded([s.input_ids for s in batch])
        hidden = model.hidden_states(ids, mask, batch[0].images if step == 1 else None).double().cpu()
        weights = (mask.double().cumsum(1) * mask if weighted else mask.double())[:, :, None]  # right padded
        out[first:first + len(batch)] = (hidden * weights).sum(1) / weights.sum(1)
    return out


def representation_similarity(model: ValuationModel, train: Sequence[dict],
                              valid: Sequence[dict]) -> np.ndarray:
    """Cosine of mean final hidden states, ``(n_train, n_valid)``."""
    a = torch.nn.functional.normalize(mean_hidden_states(model, train), dim=1)
    b = torch.nn.functional.normalize(mean_hidden_states(model, valid), dim=1)
    return (a @ b.T).numpy()


def rds_plus_values(model: ValuationModel, train: Sequence[dict], valid: Sequence[dict], *,
                    reference: bool) -> np.ndarray:
    """RDS+ as its authors' code computes it (``compute_influence_cosinesim.py --pooling
    weighted_mean``, then ``get_top_aggregated_influences.py``): the cosines of the samples'
    L2-normalised position-weighted mean states, ``(n_train, n_valid)``; against the validation
    set as a whole (``reference``), each training sample's best cosine over it, ``(n_train,)``."""
    a = torch.nn.functional.normalize(mean_hidden_states(model, train, weighted=True), dim=1)
    b = torch.nn.functional.normalize(mean_hidden_states(model, valid, weighted=True), dim=1)
    cosines = (a @ b.T).numpy()
    return cosines.max(axis=1) if reference else cosines


def words_of(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def tfidf_similarity(train_texts: Sequence[str], valid_texts: Sequence[str]) -> np.ndarray:
    """Cosine of TF-IDF vectors (raw counts times smooth idf ``ln((1 + n) / (1 + df)) + 1``,
    fitted on both sets, rows L2-normalised: scikit-learn's defaults), ``(n_train, n_valid)``."""
    documents = [words_of(t) for t in [*train_texts, *valid_texts]]
    vocabulary = {w: k for k, w in enumerate(sorted({w for d in documents for w in d}))}
    counts = np.zeros((len(documents), len(vocabulary)))
    for row, words in enumerate(documents):
        for w in words:
            counts[row, vocabulary[w]] += 1
    df = (counts > 0).sum(axis=0)
    tfidf = counts * (np.log((1 + len(documents)) / (1 + df)) + 1)
    norms = np.linalg.norm(tfidf, axis=1, keepdims=True)
    tfidf /= np.where(norms > 0, norms, 1.0)
    return tfidf[:len(train_texts)] @ tfidf[len(train_texts):].T
