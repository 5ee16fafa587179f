"""Training checkpoints that resume an interrupted distillation, written and read without pickle.

A checkpoint is a folder `step-NNNNNNNN/` inside a draft's checkpoint folder:
    model.safetensors        every trainable-or-not parameter of the (possibly LoRA-wrapped) draft,
                             by `named_parameters()` name (tied weights appear once)
    optimizer.safetensors    the optimizer's tensor state, keys "state.<param index>.<name>"
    head.safetensors         the acceptance head's parameters (only with --acceptance-head)
    head_optimizer.safetensors
    state.json               step, the run's settings (compared on resume), history, and the
                             optimizer's non-tensor state (param_groups, scalars)
The folder is written under a temp name and renamed; then `latest.json` (atomic) points at it and
older step folders are removed. A crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dspark.errors import DataError
from dspark.io import atomic_write_bytes, atomic_write_json

LATEST = "latest.json"
STATE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
HEAD_FILE = "head.safetensors"
HEAD_OPTIMIZER_FILE = "head_optimizer.safetensors"


def params_to_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of `named_parameters()` (tied parameters once), detached, on CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in module.named_parameters()}


def load_params(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved parameters into `module` in place; the names and shapes must match exactly."""
    params = dict(module.named_parameters())
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise DataError(f"checkpoint {where} does not match this model (missing {missing[:3]}, unexpected "
                        f"{extra[:3]}): it was made with other settings; delete it to start over")
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if t.shape != p.shape:
                raise DataError(f"checkpoint {where}: parameter {name} has shape {tuple(t.shape)}, the model "
                                f"{tuple(p.shape)}; delete it to start over")
            p.copy_(t.to(device=p.device, dtype=p.dtype))


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into safetensors-able tensors and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict[str, Any], where: str) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise DataError(f"checkpoint {where}: optimizer state does not match this model ({e}); delete it to "
                        "start over") from None


@dataclass
class Checkpoint:
    """What `load_latest` returns: the step folder and its state.json content."""

    folder: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors))


def _load_file(path: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DataError(f"checkpoint file {str(path)!r} is unreadable ({e}); delete {where} to start over") from None


def save_checkpoint(root: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, state: dict[str, Any], head: torch.nn.Module | None = None,
                    head_optimizer: torch.optim.Optimizer | None = None, keep: int = 1) -> Path:
    """Write `root/step-<step>/` atomically, point `root/latest.json` at it, prune older ones.
    `optimizer` None: weights only (DeepSpeed ZeRO partitions its optimizer state across ranks)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_file(params_to_tensors(model), tmp / MODEL_FILE)
    full = {**state, "step": step, "optimizer": None}
    if optimizer is not None:
        opt_tensors, full["optimizer"] = optimizer_to_tensors(optimizer)
        _save_file(opt_tensors, tmp / OPTIMIZER_FILE)
    if head is not None and head_optimizer is not None:
        _save_file(params_to_tensors(head), tmp / HEAD_FILE)
        head_tensors, head_meta = optimizer_to_tensors(head_optimizer)
        _save_file(head_tensors, tmp / HEAD_OPTIMIZER_FILE)
        full["head_optimizer"] = head_meta
    atomic_write_json(tmp / STATE, full)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_json(root / LATEST, {"step": step, "folder": name})
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for old in steps[: max(0, len(steps) - (keep - 1))] if keep >= 1 else steps:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(root: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint `latest.json` points at, or None when there is none yet."""
    root = Path(root)
    for tmp in root.glob(".step-*.tmp"):  # a save killed half-way
        shutil.rmtree(tmp, ignore_errors=True)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    try:
        folder = root / json.loads(pointer.read_text(encoding="utf-8"))["folder"]
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"checkpoint folder {str(root)!r} is damaged ({type(e).__name__}: {e}); delete it to "
                        "start over") from None
    return Checkpoint(folder=folder, state=state)


def restore(ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
            head: torch.nn.Module | None = None, head_optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a checkpoint's parameters and optimizer states into the given objects (optimizer None:
    weights only)."""
    where = str(ckpt.folder)
    load_params(model, _load_file(ckpt.folder / MODEL_FILE, where), where)
    if optimizer is not None and ckpt.state.get("optimizer") is not None:
        optimizer_from_tensors(optimizer, _load_file(ckpt.folder / OPTIMIZER_FILE, where), ckpt.state["optimizer"],
                               where)
    if head is not None and head_optimizer is not None:
        if not (ckpt.folder / HEAD_FILE).is_file():
            raise DataError(f"checkpoint {where} has no acceptance head: it was made without --acceptance-head; "
                            "delete it to start over")
        load_params(head, _load_file(ckpt.folder / HEAD_FILE, where), where)
        optimizer_from_tensors(head_optimizer, _load_file(ckpt.folder / HEAD_OPTIMIZER_FILE, where),
                               ckpt.state["head_optimizer"], where)


__all__ = ["Checkpoint", "load_latest", "load_params", "optimizer_from_tensors", "optimizer_to_tensors",
           "params_to_tensors", "restore", "save_checkpoint"]
