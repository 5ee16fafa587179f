"""Load any draft dspark can score: a plain or transformers-quantized folder (torchao,
bitsandbytes) through `dspark.models.load_model`, a quanto or GPTQ checkpoint through its backend.
Also the size accounting `quantize` and `select` report (weights on disk, weights in memory)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from dspark.errors import DsparkError
from dspark.memory import MB
from dspark.quantize.backends import BACKENDS, QUANT_EXTRA, avoid_bnb_cpu_repack, checkpoint_backend, is_available


def load_draft(name_or_path: str, device: str = "cpu", dtype: str = "float32", offline: bool | None = None):
    """A `dspark.models.LoadedModel` for `name_or_path`. Quantized layers keep their stored
    precision (`dtype` applies to what the format lets transformers cast; a quanto checkpoint
    keeps the dtype it was quantized in: the decoder compares logits in float32 either way)."""
    from dspark.decode.run import quiet_transformers
    from dspark.models import load_model
    from dspark.models.loading import LoadedModel, _load_tokenizer, parse_device, parse_dtype
    from dspark.models.registry import resolve_model

    r = resolve_model(name_or_path)
    kind = checkpoint_backend(r.local_path) if r.local_path is not None else None
    if kind is None:
        with quiet_transformers():
            loaded = load_model(name_or_path, device=device, dtype=dtype, offline=offline)
        avoid_bnb_cpu_repack(loaded.model)
        return loaded
    backend = BACKENDS[kind]
    if not is_available(backend):
        raise DsparkError(f"draft {name_or_path!r} is a {kind} checkpoint: loading it needs {backend.requirement} "
                          f"({QUANT_EXTRA})")
    device = parse_device(device)
    torch_dtype = parse_dtype(dtype, device)
    folder = r.local_path
    with quiet_transformers():
        tokenizer = _load_tokenizer(str(folder), True, r)
        try:
            model = backend.load(folder, device, torch_dtype)
        except DsparkError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise DsparkError(f"could not load the {kind} checkpoint {str(folder)!r}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    # the decoder looks for an acceptance head next to the weights via name_or_path
    model.config._name_or_path = str(folder)
    emb = model.get_input_embeddings()
    param = next(model.parameters())
    return LoadedModel(model=model, tokenizer=tokenizer, resolved=r, device=device,
                       dtype=str(param.dtype).removeprefix("torch."), config=model.config,
                       vocab_size=int(emb.weight.shape[0]), tokenizer_size=len(tokenizer),
                       num_parameters=count_parameters(model))


def is_plain_linear(module) -> bool:
    """An unquantized nn.Linear: exactly that class, with a plain floating-point weight tensor.
    quanto (QLinear) and bitsandbytes (Linear8bitLt, Linear4bit) subclass nn.Linear; torchao keeps
    nn.Linear but stores its weight as a tensor subclass (Int8Tensor, ...)."""
    import torch

    if type(module) is not torch.nn.Linear:
        return False
    w = module.weight
    return type(w) in (torch.Tensor, torch.nn.Parameter) and type(w.data) is torch.Tensor and w.is_floating_point()


def is_quantized_linear(module) -> bool:
    """A quantized linear layer: an nn.Linear that is not plain (quanto, bitsandbytes, torchao; see
    `is_plain_linear`), or a packed-weight module that is no nn.Linear at all (GPTQ kernels such as
    gptqmodel's TorchAtenLinear hold `qweight` and have no `.weight`)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return not is_plain_linear(module)
    return hasattr(module, "qweight")


def has_quantized_linears(model) -> bool:
    """True when any linear layer of `model` is quantized (see `is_quantized_linear`). Code that
    reads `.weight` as a dense matrix (fusing projections, say) must not run on such a model."""
    return any(is_quantized_linear(m) for m in model.modules())


def _leaves(t) -> list:
    """The plain tensors that hold a (possibly quantized, wrapper-subclass) tensor's data."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None or type(t).__name__ in ("Tensor", "Parameter"):
        return [t]
    names, _ctx = t.__tensor_flatten__()
    out = []
    for n in names:
        inner = getattr(t, n, None)
        if inner is not None:
            out.extend(_leaves(inner))
    return out


def tensor_bytes(tensors) -> int:
    """Bytes the tensors occupy, counting quantized tensor subclasses (torchao, quanto) by their
    stored int data and scales, and shared storage (tied weights) once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        for leaf in _leaves(t):
            if leaf.device.type == "meta":
                continue
            key = (leaf.untyped_storage().data_ptr(), leaf.storage_offset()) if leaf.numel() else (id(leaf), 0)
            if key in seen:
                continue
            seen.add(key)
            total += leaf.numel() * leaf.element_size()
    return total


def model_bytes(model) -> int:
    """Weights in memory: parameters and buffers (quantized ones by their stored size)."""
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


def deployment_bytes(model) -> int:
    """Weight bytes as deployed on an accelerator: unquantized floating tensors at 2 bytes (bf16),
    quantized ones (tensor subclasses, packed integer storage) at their stored size. Used to
    project cost ratios onto other hardware, where both models would run in bf16."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or t.device.type == "meta":
            continue
        seen.add(id(t))
        leaves = _leaves(t)
        if len(leaves) == 1 and leaves[0] is t and t.is_floating_point():
            total += t.numel() * 2
        else:
            total += tensor_bytes(leaves)
    return total


def draft_tokenizer(name_or_path: str):
    """A draft's tokenizer without loading its weights (quanto / GPTQ folders included)."""
    from dspark.models import load_tokenizer
    from dspark.models.loading import _load_tokenizer
    from dspark.models.registry import resolve_model

    r = resolve_model(name_or_path)
    if r.local_path is not None and checkpoint_backend(r.local_path) is not None:
        return _load_tokenizer(str(r.local_path), True, r)
    return load_tokenizer(name_or_path)


def count_parameters(model) -> int:
    """Logical parameter count (a quantized weight counts its full shape, tied weights once)."""
    import torch

    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        state = getattr(p, "quant_state", None)  # bitsandbytes 4-bit packs two weights per byte
        shape = getattr(state, "shape", None) if state is not None else None
        n += int(torch_prod(shape)) if shape is not None else p.numel()
    # GPTQ layers keep their packed weight (and bias) as buffers, not parameters
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear) and is_quantized_linear(m):
            n += int(getattr(m, "in_features", 0)) * int(getattr(m, "out_features", 0))
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.Tensor) and not isinstance(bias, torch.nn.Parameter):
                n += bias.numel()
    return n


def torch_prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def weights_on_disk(folder: str | os.PathLike) -> int:
    """Bytes of a model folder's weight files (*.safetensors, the acceptance head excluded)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors") if p.name != "acceptance_head.safetensors")


def describe_size(nbytes: int) -> str:
    return f"{nbytes / MB:.2f} MB" if nbytes >= 0.1 * MB else f"{nbytes / 1024:.1f} KB"


def stored_dtype(folder: str | os.PathLike) -> str | None:
    """The dtype a model folder's config says its weights are stored in (float32, bfloat16,
    float16), or None."""
    import json

    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = cfg.get("dtype") or cfg.get("torch_dtype") if isinstance(cfg, dict) else None
    return value if value in ("float32", "bfloat16", "float16") else None


@contextlib.contextmanager
def quiet_quant_libraries():
    """Silence the quantization libraries' per-call chatter (bitsandbytes logs a warning on every
    int8 matmul of a float32 input on CPU); restored afterwards."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("bitsandbytes", "torchao", "optimum.quanto", "gptqmodel")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="bitsandbytes")
            warnings.filterwarnings("ignore", module="torchao")
            warnings.filterwarnings("ignore", module="optimum")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def model_summary(model: Any) -> dict[str, Any]:
    return {"parameters": count_parameters(model), "memory_bytes": model_bytes(model)}
