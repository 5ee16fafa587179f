"""Quantization backends: one small interface, an explicit registry, and the per-device choice.

A backend turns a full-precision draft folder into a quantized checkpoint folder (`quantize`) and
loads such a folder back (`load`). Which checkpoint format each one writes, and how it is loaded:

- `torchao` (int8 weight-only, `Int8WeightOnlyConfig`): transformers' own torchao integration;
  `model.safetensors` holds torchao's flattened tensors and config.json a `quantization_config`, so
  a plain `AutoModelForCausalLM.from_pretrained` (hence `dspark.models.load_model`, bundles and the
  server) loads it unchanged. The default for int8: it is the one format every dspark stage reads.
- `quanto` (optimum-quanto, int8 / int4 weights): `quanto.safetensors` (quanto's own state dict:
  `<module>.weight._data`, `._scale`, ...) plus `quanto_qmap.json` (which module has which qtype).
  Loaded only by `dspark.quantize.load_draft` (config on the meta device, `requantize`, every key
  checked). The weights file is deliberately not called model.safetensors: a plain transformers
  load would silently initialise every quantized layer at random.
- `bitsandbytes` (int8 = LLM.int8, nf4): transformers' integration (`BitsAndBytesConfig`);
  `model.safetensors` + `quantization_config`, loads with plain transformers. Runs on CPU with
  bitsandbytes 0.50 (slowly: its CPU int8 matmul casts to float16). nf4 keeps unquantized every
  linear layer whose shape bitsandbytes' AVX512-BF16 CPU kernel cannot take (`bnb_cpu_4bit_fits`;
  listed in the checkpoint's `llm_int8_skip_modules`), so the checkpoint runs on every CPU.
- `gptqmodel` (gptq4: GPTQ 4-bit with calibration text; runs on CPU with gptqmodel 7.6.0):
  GPTQModel's own save format (`quantization_config.quant_method == "gptq"`), loaded through
  `GPTQModel.load`; its layers are packed `qweight` modules, not nn.Linear. gptqmodel prints its
  banner and progress to stdout and sets allocator variables on import: both are contained
  (`dspark.contain`).

Tied input/output embeddings stay tied and unquantized in every backend (quantizing the output
head would untie it and store the vocabulary matrix twice).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from dspark.errors import DsparkError

METHODS: tuple[str, ...] = ("int8", "int4", "nf4", "gptq4")
QUANT_EXTRA = "pip install 'dspark[quant]'"

QUANTO_WEIGHTS = "quanto.safetensors"
QUANTO_QMAP = "quanto_qmap.json"


@dataclass
class QuantRequest:
    """What a backend needs. `source`: a full-precision HF model folder; `out`: an empty folder to
    write the checkpoint into (weights + config; the caller adds the tokenizer and metadata);
    `device`: a concrete torch device string; `dtype`: a torch dtype for the unquantized parts;
    `calibration`: texts (GPTQ only)."""

    source: Path
    out: Path
    method: str
    device: str
    dtype: Any
    calibration: list[str] | None = None
    tokenizer: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    # filled by the backend: what the user should know (shown as notes) and the linear layers it left
    # unquantized beyond the tied output head (recorded in the candidate's provenance)
    notes: list[str] = field(default_factory=list)
    unquantized: list[str] = field(default_factory=list)


@runtime_checkable
class QuantBackend(Protocol):
    name: str
    methods: tuple[str, ...]
    module: str            # import name whose presence makes the backend available
    requirement: str       # what to pip install for it
    devices: tuple[str, ...]
    needs_calibration: bool

    def quantize(self, request: QuantRequest) -> None: ...

    def load(self, folder: Path, device: str, dtype: Any): ...


def _import_error(backend: "QuantBackend", e: BaseException) -> DsparkError:
    return DsparkError(f"quantization backend {backend.name} could not import {backend.module} "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): {QUANT_EXTRA}")


def _hf_load_quantized(source: Path, dtype, device: str, quantization_config):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "quantization_config": quantization_config, "use_safetensors": True,
                              "local_files_only": True}
    if device != "cpu":
        kwargs["device_map"] = device
    return AutoModelForCausalLM.from_pretrained(str(source), **kwargs).eval()


def _hf_load(folder: Path, device: str, dtype):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "local_files_only": True}
    if device != "cpu":
        kwargs["device_map"] = device
    return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).eval()


class _TransformersConfigBackend:
    """A backend whose quantization is a transformers `quantization_config` applied while loading
    the source (its quantizer does the work), saved with `save_pretrained` and loaded back by plain
    `from_pretrained`. Subclasses only say which config."""

    devices = ("cpu", "cuda")
    needs_calibration = False

    def config(self, request: QuantRequest):
        raise NotImplementedError

    def quantize(self, request: QuantRequest) -> None:
        try:
            qc = self.config(request)
        except ImportError as e:
            raise _import_error(self, e) from None
        model = _hf_load_quantized(request.source, request.dtype, request.device, qc)
        model.save_pretrained(str(request.out), safe_serialization=True)

    def load(self, folder: Path, device: str, dtype):
        return _hf_load(folder, device, dtype)


class TorchAoBackend(_TransformersConfigBackend):
    name = "torchao"
    methods = ("int8",)
    module = "torchao"
    requirement = "torchao==0.18.0"

    def config(self, request: QuantRequest):
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig())


class BitsAndBytesBackend(_TransformersConfigBackend):
    name = "bitsandbytes"
    methods = ("int8", "nf4")
    module = "bitsandbytes"
    requirement = "bitsandbytes==0.50.2"

    def config(self, request: QuantRequest):
        from transformers import BitsAndBytesConfig

        # a shape the CPU kernel cannot take is refused before the import: it needs no library to say so
        skip = self.nf4_skip_list(request) if request.method == "nf4" else None
        import bitsandbytes  # noqa: F401  (a missing library fails here, with the install hint)

        if request.method == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        # the skip list replaces transformers' default one (tied / output head): `skip` includes it
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=request.dtype,
                                  llm_int8_skip_modules=skip)

    @staticmethod
    def nf4_skip_list(request: QuantRequest) -> list[str]:
        """The modules nf4 leaves unquantized (see `bnb_4bit_plan`), noted on `request`; a one-line
        DsparkError when no linear layer can be quantized."""
        skip, misfits, fitting = bnb_4bit_plan(request.source)
        rule = (f"bitsandbytes' CPU 4-bit kernel (AVX512-BF16) needs out_features % {BNB_CPU_BLOCK_N} == 0 and "
                f"in_features % {BNB_4BIT_BLOCKSIZE} == 0")
        if not fitting:
            raise DsparkError(f"nf4 (bitsandbytes) cannot quantize any linear layer of {str(request.source)!r}: {rule} "
                              f"(shapes here: {_shapes(misfits)}); use --method int4 (quanto) or gptq4")
        if misfits:
            request.unquantized.extend(misfits)
            request.notes.append(f"nf4 kept {len(misfits)} of {len(misfits) + len(fitting)} linear layers unquantized: "
                                 f"{rule} ({_shapes(misfits)})")
        return skip


# bitsandbytes 0.50's 4-bit CPU kernel (used on CPUs with AVX512-BF16, `functional.has_avx512bf16`)
# repacks each layer's weight at its first inference forward (`nn.Linear4bit.forward` ->
# `functional._convert_weight_packed_for_cpu`): output rows in tiles of 32 (`block_n`), absmax reshaped
# to [out, in / blocksize]; its C++ kernel walks the input in whole quantization blocks. Other shapes
# fail there (RuntimeError), or crash natively. transformers quantizes 4-bit with bitsandbytes'
# default blocksize.
BNB_CPU_BLOCK_N = 32
BNB_4BIT_BLOCKSIZE = 64


def bnb_cpu_4bit_fits(out_features: int, in_features: int, blocksize: int = BNB_4BIT_BLOCKSIZE) -> bool:
    """Whether bitsandbytes' AVX512-BF16 CPU kernel can run a 4-bit linear layer of this shape."""
    return out_features % BNB_CPU_BLOCK_N == 0 and in_features % blocksize == 0


def _shapes(names: dict[str, tuple[int, int]], shown: int = 3) -> str:
    """'q_proj [96 x 96], ...' for the first few layers (out x in)."""
    items = [f"{n.rsplit('.', 1)[-1]} [{o} x {i}]" for n, (o, i) in names.items()]
    unique = list(dict.fromkeys(items))
    return ", ".join(unique[:shown]) + (f", ... ({len(names)} layers)" if len(unique) > shown else "")


def bnb_4bit_plan(source: Path) -> tuple[list[str], dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """(skip list for BitsAndBytesConfig, layers kept unquantized because the CPU kernel cannot take
    them, layers that will be quantized), each layer as name -> (out_features, in_features), from the
    model that source/config.json describes (built on the meta device: no weights read). The skip
    list also holds transformers' default exclusions (tied embeddings, the output head), which a
    user skip list would otherwise replace."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    default_skip = set(get_keys_to_not_convert(model))
    linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n not in default_skip}
    misfits = {n: s for n, s in linears.items() if not bnb_cpu_4bit_fits(*s)}
    fitting = {n: s for n, s in linears.items() if n not in misfits}
    return sorted(default_skip) + list(misfits), misfits, fitting


def avoid_bnb_cpu_repack(model) -> list[str]:
    """Route 4-bit layers the AVX512-BF16 CPU kernel cannot take (`bnb_cpu_4bit_fits`) through
    bitsandbytes' generic dequantize-and-matmul path, by clearing the per-layer flag that triggers
    the repack. Only checkpoints quantized without dspark's skip list have such layers. Returns their
    names."""
    names = []
    for name, m in model.named_modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if getattr(m, "support_avx512bf16_for_cpu", False) and state is not None \
                and not bnb_cpu_4bit_fits(m.out_features, m.in_features, int(state.blocksize)):
            m.support_avx512bf16_for_cpu = False
            names.append(name)
    return names


class QuantoBackend:
    name = "quanto"
    methods = ("int8", "int4")
    module = "optimum.quanto"
    requirement = "optimum-quanto==0.2.7"
    devices = ("cpu", "cuda")
    needs_calibration = False

    def quantize(self, request: QuantRequest) -> None:
        try:
            from optimum.quanto import freeze, qint4, qint8, quantization_map, quantize
        except ImportError as e:
            raise _import_error(self, e) from None
        from safetensors.torch import save_file

        model = _hf_load(request.source, request.device, request.dtype)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        # the output head shares the embedding matrix: quantizing it would store the matrix twice
        quantize(model, weights=qint8 if request.method == "int8" else qint4, exclude=["lm_head"] if tied else None)
        freeze(model)
        # quanto's state dict is already flat (`<module>.weight._data`, `._scale`, ...); safetensors
        # refuses shared storage, and the tied head is re-tied on load
        flat = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                if not (tied and k == "lm_head.weight")}
        save_file(flat, str(request.out / QUANTO_WEIGHTS), metadata={"format": "pt", "dspark": "quanto"})
        (request.out / QUANTO_QMAP).write_text(json.dumps(quantization_map(model), indent=2) + "\n", encoding="utf-8")
        model.config.save_pretrained(str(request.out))
        # marks the folder as quantized for tools that read config.json (transformers' own quanto
        # config; a plain from_pretrained still fails loudly: there is no model.safetensors)
        cfg_path = request.out / "config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["quantization_config"] = {"quant_method": "quanto", "weights": request.method, "activations": None}
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(request.out))

    def load(self, folder: Path, device: str, dtype):
        try:
            from optimum.quanto import requantize
        except ImportError as e:
            raise _import_error(self, e) from None
        from accelerate import init_empty_weights
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        qmap_path, weights = folder / QUANTO_QMAP, folder / QUANTO_WEIGHTS
        if not weights.is_file():
            raise DsparkError(f"quanto checkpoint {str(folder)!r} has no {QUANTO_WEIGHTS}")
        try:
            qmap = json.loads(qmap_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DsparkError(f"quanto checkpoint {str(folder)!r}: {QUANTO_QMAP} is unreadable ({e})") from None
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        # safetensors hands out tensors at their offsets in the file (8-byte aligned) and requantize
        # keeps them: torch's int8 weight-pack matmul (quanto's bf16 CPU path) segfaults on such a
        # weight on AVX512 CPUs. A copy lives in torch's own (64-byte aligned) memory.
        state = {k: v.clone() for k, v in load_file(str(weights)).items()}
        requantize(model, state_dict=state, quantization_map=qmap, device=device)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if tied:
            model.tie_weights()
        # requantize loads with strict=False: check every key here instead of trusting it
        expected = set(model.state_dict())
        missing = sorted(k for k in expected - set(state) if not (tied and k == "lm_head.weight"))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise DsparkError(f"quanto checkpoint {str(folder)!r} does not match its config "
                              f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
        _inference_safe_int4(model)
        return model.eval()


def _dequantized_linear(self, input):
    import torch.nn.functional as F

    return F.linear(input, self.weight.dequantize().to(input.dtype), self.bias)


def _inference_safe_int4(model) -> int:
    """quanto's 4-bit linear goes through an autograd Function that fails under
    torch.inference_mode ("Cannot set version_counter for inference tensor"), which is how dspark's
    decoder runs. Such layers compute F.linear on the dequantized weight instead (what quanto's CPU
    path amounts to anyway); the weight stays stored in 4 bits. Returns the layers patched."""
    import types

    from optimum.quanto import QLinear
    from optimum.quanto.tensor.weights import WeightQBitsTensor

    n = 0
    for m in model.modules():
        if isinstance(m, QLinear) and isinstance(m.weight, WeightQBitsTensor):
            m.forward = types.MethodType(_dequantized_linear, m)
            n += 1
    return n


class GptqModelBackend:
    name = "gptqmodel"
    methods = ("gptq4",)
    module = "gptqmodel"
    requirement = "gptqmodel==7.6.0"
    devices = ("cpu", "cuda")
    needs_calibration = True

    @staticmethod
    def _cpu_workers() -> None:
        # gptqmodel sizes its CPU worker pool from the core count and fails on a 2-core machine
        # unless told how many workers to use
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))

    def quantize(self, request: QuantRequest) -> None:
        from dspark.contain import third_party_contained

        self._cpu_workers()
        if not request.calibration:
            raise DsparkError("gptq4 needs calibration text: pass --calibration TASK_OR_DATA")
        cfg = json.loads((request.source / "config.json").read_text(encoding="utf-8"))
        group = int(request.options.get("group_size") or gptq_group_size(cfg))
        # gptqmodel logs its banner and progress to stdout, where dspark prints --json
        with third_party_contained():
            try:
                from gptqmodel import GPTQModel, QuantizeConfig
            except ImportError as e:
                raise _import_error(self, e) from None
            model = GPTQModel.load(str(request.source), QuantizeConfig(bits=4, group_size=group),
                                   device=request.device)
            with _gptq_logs_in_temp_dir():
                model.quantize(list(request.calibration), batch_size=1)
            model.save(str(request.out))

    def load(self, folder: Path, device: str, dtype):
        from dspark.contain import third_party_contained

        self._cpu_workers()
        with third_party_contained():
            try:
                from gptqmodel import GPTQModel
            except ImportError as e:
                raise _import_error(self, e) from None
            return GPTQModel.load(str(folder), device=device).model.eval()


@contextlib.contextmanager
def _gptq_logs_in_temp_dir():
    """gptqmodel 7.6 writes a per-layer log file into ./logs of whatever folder the user runs from
    (`looper.loop_processor._PROJECT_LOG_DIR`); point it at a temp folder that is removed after."""
    try:
        from gptqmodel.looper import loop_processor
    except ImportError:  # another layout: leave it alone
        yield
        return
    before = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    with tempfile.TemporaryDirectory(prefix="dspark-gptq-logs-") as tmp:
        loop_processor._PROJECT_LOG_DIR = Path(tmp)
        try:
            yield
        finally:
            if before is not None:
                loop_processor._PROJECT_LOG_DIR = before


def gptq_group_size(config: dict, preferred: int = 128) -> int:
    """The largest of 128, 64, 32, 16 that divides every linear layer's input width (hidden and
    intermediate sizes): GPTQ groups input channels."""
    widths = [int(config.get(k) or 0) for k in ("hidden_size", "intermediate_size")]
    for g in (preferred, 64, 32, 16):
        if all(w % g == 0 for w in widths if w):
            return g
    return -1


BACKENDS: dict[str, QuantBackend] = {b.name: b for b in (TorchAoBackend(), QuantoBackend(),
                                                          BitsAndBytesBackend(), GptqModelBackend())}

# Preference per method and device type: the first available backend is used. int8 prefers torchao
# because its checkpoint loads with plain transformers everywhere (bundles, the server).
PREFERENCES: dict[str, dict[str, tuple[str, ...]]] = {
    "int8": {"cpu": ("torchao", "quanto", "bitsandbytes"), "cuda": ("torchao", "bitsandbytes", "quanto")},
    "int4": {"cpu": ("quanto",), "cuda": ("quanto",)},
    "nf4": {"cpu": ("bitsandbytes",), "cuda": ("bitsandbytes",)},
    "gptq4": {"cpu": ("gptqmodel",), "cuda": ("gptqmodel",)},
}


def register_backend(backend: QuantBackend, prefer_for: tuple[str, ...] = ()) -> None:
    """Add a backend (a plug-in, or a test double). `prefer_for`: methods it becomes the first
    choice for."""
    if not isinstance(backend, QuantBackend):
        raise DsparkError(f"{type(backend).__name__} is not a quantization backend (needs name, methods, module, "
                          "requirement, devices, needs_calibration, quantize(), load())")
    BACKENDS[backend.name] = backend
    for m in backend.methods:
        if m not in METHODS:
            raise DsparkError(f"backend {backend.name!r} claims unknown method {m!r} (valid: {', '.join(METHODS)})")
        for dev in backend.devices:
            prefs = PREFERENCES[m].setdefault(dev, ())
            rest = tuple(n for n in prefs if n != backend.name)
            PREFERENCES[m][dev] = ((backend.name,) + rest) if m in prefer_for else (rest + (backend.name,))


def unregister_backend(name: str) -> None:
    BACKENDS.pop(name, None)
    for per_dev in PREFERENCES.values():
        for dev, names in per_dev.items():
            per_dev[dev] = tuple(n for n in names if n != name)


def is_available(backend: QuantBackend) -> bool:
    """The backend's library is installed (found without importing it: imports are slow)."""
    if not backend.module:
        return True
    try:
        return importlib.util.find_spec(backend.module) is not None
    except (ImportError, ValueError):
        return False


def check_method(method: str) -> str:
    if method not in METHODS:
        raise DsparkError(f"unknown quantization method {method!r} (valid: {', '.join(METHODS)})")
    return method


def device_type(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def choose_backend(method: str, device: str, backend: str | None = None) -> QuantBackend:
    """The backend for `method` on `device` ('cpu', 'cuda', 'cuda:N'): `backend` if named (it must
    implement the method, run on the device and be installed), else the first installed one in
    PREFERENCES. One-line DsparkError otherwise, naming what to install."""
    check_method(method)
    dev = device_type(device)
    if backend is not None:
        b = BACKENDS.get(backend)
        if b is None:
            raise DsparkError(f"unknown quantization backend {backend!r} (valid: {', '.join(BACKENDS)})")
        if method not in b.methods:
            able = [n for n, x in BACKENDS.items() if method in x.methods]
            raise DsparkError(f"backend {backend} does not implement {method} (backends for {method}: "
                              f"{', '.join(able)})")
        if dev not in b.devices:
            raise DsparkError(f"backend {backend} does not run on {dev} (it runs on: {', '.join(b.devices)})")
        if not is_available(b):
            raise DsparkError(f"backend {backend} needs {b.requirement} ({method} on {dev}): {QUANT_EXTRA}")
        return b
    names = PREFERENCES[method].get(dev, ())
    for n in names:
        b = BACKENDS.get(n)
        if b is not None and is_available(b):
            return b
    reqs = [BACKENDS[n].requirement for n in names if n in BACKENDS]
    if not reqs:
        raise DsparkError(f"no quantization backend implements {method} on {dev}")
    need = reqs[0] if len(reqs) == 1 else "one of " + ", ".join(reqs)
    raise DsparkError(f"quantization method {method} on {dev} needs {need} (not installed): {QUANT_EXTRA}")


def checkpoint_backend(folder: str | os.PathLike) -> str | None:
    """Which loader a model folder needs: 'quanto' (quanto_qmap.json), 'gptqmodel' (a GPTQ
    quantization_config), or None (plain transformers, including its torchao / bitsandbytes formats)."""
    folder = Path(folder)
    if (folder / QUANTO_QMAP).is_file():
        return "quanto"
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "gptq":
        return "gptqmodel"
    return None


def quantization_of(folder: str | os.PathLike) -> str | None:
    """The quantization a folder's checkpoint carries ('quanto', 'torchao', 'bitsandbytes', 'gptq',
    ...) or None for a full-precision one."""
    folder = Path(folder)
    if (folder / QUANTO_QMAP).is_file():
        return "quanto"
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return str(qc.get("quant_method", "unknown")) if isinstance(qc, dict) else None
