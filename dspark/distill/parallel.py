"""Scale-out for `dspark distill`: data-parallel training with torchrun, DeepSpeed passthrough.

Data parallel (DDP). Launch the same `dspark distill` command under torchrun; every process trains
the same draft on a disjoint shard of the cache's rows (`LogitsCache.batches(rank=, world_size=)`),
gradients are averaged every step (DistributedDataParallel), so all ranks hold identical weights.
Rank 0 collects the cache first (the others wait), evaluates, writes checkpoints and the outputs.
All processes must see the same --out folder (a shared filesystem across nodes).

    # one machine, 8 GPUs (one process per GPU, NCCL)
    torchrun --standalone --nproc_per_node 8 -m dspark distill --target llama3-70b --task code \\
        --draft llama3.2-1b --out runs/l70 --device cuda
    # two nodes x 8 GPUs: run on each node (node_rank 0 and 1), MASTER on node 0
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint $MASTER_HOST:29500 -m dspark distill ... --device cuda
    # CPU only (gloo), e.g. two processes on one machine
    torchrun --standalone --nproc_per_node 2 -m dspark distill ... --device cpu

For a 70B target, collect the cache separately first (`dspark collect --engine vllm`, sharded with
`--shard I/N` across nodes and joined with `dspark merge-caches`) and pass it with `--cache`: the
distill processes then only hold the drafts (and the target only for --on-policy).

`accelerate launch --multi_gpu --num_processes N -m dspark distill ...` sets the same environment
variables as torchrun and works the same way (on a CPU-only machine it runs MULTI_CPU over gloo;
`accelerate launch --cpu --num_processes 2` starts ONE process, see ../shared/notes).

DeepSpeed: `--deepspeed ds_config.json` hands the forward module and dspark's AdamW to
`deepspeed.initialize` (ZeRO stages 0-2: optimizer state, and from stage 2 the gradients, are
partitioned across ranks; the weights stay whole on every rank). Launch it like DDP:

    # one machine, 8 GPUs
    torchrun --standalone --nproc_per_node 8 -m dspark distill ... --device cuda \\
        --deepspeed dspark/recipes/deepspeed-zero2.json
    # or DeepSpeed's own launcher (same environment variables; --no_local_rank: dspark reads
    # LOCAL_RANK from the environment, not an argument; the launcher itself logs to stdout);
    # several nodes: --hostfile
    deepspeed --num_gpus 8 --no_local_rank --module dspark distill ... --deepspeed dspark/recipes/deepspeed-zero2.json
    # CPU only: two processes over gloo (DS_ACCELERATOR=cpu is set for --device cpu)
    torchrun --standalone --nproc_per_node 2 -m dspark distill ... --device cpu --deepspeed CONFIG

A single process (no launcher) also works: dspark opens a one-process group for DeepSpeed.
The config must not name an "optimizer" (dspark passes its AdamW; a DeepSpeed optimizer block would
also JIT-compile fused_adam) nor a "scheduler" (dspark sets the learning rate per step). dspark fills
`train_micro_batch_size_per_gpu` (= --batch-size), `gradient_accumulation_steps` (1: one optimizer
step per batch), `train_batch_size` (batch x processes) and `gradient_clipping` where they are absent
or "auto"; a conflicting value is an error, and so is any other "auto" (Hugging Face-style configs:
set those values explicitly). On CPU dspark keeps DeepSpeed from JIT-compiling its shared-memory
all-reduce op, which training does not use (`_skip_shm_comm_build`); nothing is compiled. DeepSpeed
is in the `train` extra (`pip install 'dspark[train]'`); tests/distill/test_train_ddp.py runs ZeRO-2
in two CPU processes and checks it against plain DDP.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark.errors import DsparkError

# Rank 0 collects and measures while the others wait in a barrier: allow long waits.
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DsparkError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from None


def init_distributed(device: str, single_process_group: bool = False) -> DistContext | None:
    """Join the process group torchrun / accelerate / the deepspeed launcher describe in the
    environment. A single process gets None, or with `single_process_group` (DeepSpeed needs a
    process group even alone) a one-process group of its own. gloo on CPU, nccl on CUDA."""
    world = world_size_from_env()
    if world <= 1 and not single_process_group:
        return None
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "gloo"
    if not dist.is_initialized():
        if world <= 1:  # no launcher: an in-memory store instead of MASTER_ADDR / MASTER_PORT
            world, rank, local = 1, 0, 0
            # what a launcher would have set; DeepSpeed's engine reads LOCAL_RANK from the environment
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=BARRIER_TIMEOUT)
        else:
            dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
    if backend == "nccl":
        torch.cuda.set_device(local)
    return DistContext(rank=rank, world_size=world, local_rank=local, backend=backend)


def rank_device(ctx: DistContext | None, device: str) -> str:
    """The device of this process: cuda:LOCAL_RANK under NCCL, else the one asked for."""
    if ctx is not None and ctx.backend == "nccl":
        return f"cuda:{ctx.local_rank}"
    return device


def barrier(ctx: DistContext | None) -> None:
    if ctx is not None:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(ctx: DistContext | None, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (e.g. an error message, so all ranks fail together)."""
    if ctx is None:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(ctx: DistContext | None) -> None:
    if ctx is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def load_deepspeed_config(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Validate `--deepspeed CONFIG` before any work: deepspeed importable, the file a JSON object
    without an optimizer/scheduler block (dspark owns both), ZeRO stage 0-2, no "auto" but in the
    keys dspark fills. Top-level keys starting with "_" are documentation (a recipe's `_command`)
    and are dropped."""
    if path is None:
        return None
    if not deepspeed_installed():
        raise DsparkError("--deepspeed needs the deepspeed package, which is not installed: install dspark's "
                          "`train` extra (it pins deepspeed==0.19.8 and trl), or drop --deepspeed to train with "
                          "plain DDP under torchrun")
    p = Path(path)
    if not p.is_file():
        raise DsparkError(f"--deepspeed config {str(p)!r} does not exist")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DsparkError(f"--deepspeed config {str(p)!r} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise DsparkError(f"--deepspeed config {str(p)!r} must be a JSON object")
    cfg = {k: v for k, v in cfg.items() if not str(k).startswith("_")}
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise DsparkError(f"--deepspeed config {str(p)!r} has a {key!r} block: remove it (dspark passes its own "
                              "AdamW and sets the learning rate every step)")
    zero = cfg.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise DsparkError(f"--deepspeed config {str(p)!r}: zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2):
        raise DsparkError(f"--deepspeed ZeRO stage {stage!r} is not supported (valid: 0, 1, 2): stage 3 partitions "
                          "the parameters, which dspark's checkpoints and evaluation read whole")
    off = zero.get("offload_optimizer") or {}
    offload = off.get("device", "none") if isinstance(off, dict) else off
    if offload not in (None, "none") and cfg.get("zero_force_ds_cpu_optimizer", True) is not False:
        raise DsparkError(f"--deepspeed config {str(p)!r} offloads the optimizer to {offload!r}, which DeepSpeed allows "
                          "only with its own CPU Adam; dspark passes torch's AdamW: drop offload_optimizer, or set "
                          "\"zero_force_ds_cpu_optimizer\": false to offload anyway (slower steps)")
    gas = cfg.get("gradient_accumulation_steps", "auto")
    if gas not in (1, "auto"):
        raise DsparkError(f"--deepspeed config {str(p)!r} sets gradient_accumulation_steps = {gas!r}: dspark steps the "
                          "optimizer once per batch (valid: 1 or \"auto\"); raise --batch-size instead")
    autos = [k for k in _auto_keys(cfg) if k not in DS_FILLED]
    if autos:
        raise DsparkError(f"--deepspeed config {str(p)!r} leaves {autos[0]} \"auto\": dspark fills only "
                          f"{', '.join(sorted(DS_FILLED))}; give {autos[0]} a value")
    return cfg


# The keys dspark owns: its batches and clipping (see `deepspeed_settings`).
DS_FILLED = frozenset({"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                       "gradient_clipping"})


def _auto_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the values "auto" in a (nested) DeepSpeed config."""
    if isinstance(cfg, dict):
        return [k for key, v in cfg.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if cfg == "auto" else []


def deepspeed_settings(user: dict[str, Any], batch_size: int, world_size: int, grad_clip: float) -> dict[str, Any]:
    """The config `deepspeed.initialize` gets: the user's (validated by `load_deepspeed_config`)
    with dspark's batch geometry filled in (one optimizer step per batch of `batch_size` rows per
    process) and its gradient clipping where the user left it out or "auto". A batch value that
    contradicts the run is an error, not something to silently override."""
    ours: dict[str, Any] = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
                            "train_batch_size": batch_size * world_size}
    cfg = dict(user)
    for key, value in ours.items():
        given = cfg.get(key, "auto")
        if given == "auto":
            cfg[key] = value
        elif given != value:
            raise DsparkError(f"--deepspeed config sets {key} = {given!r}, this run needs {value} (--batch-size "
                              f"{batch_size} x {world_size} process(es), one optimizer step per batch): remove it or "
                              "set it to \"auto\"")
    if cfg.get("gradient_clipping", "auto") == "auto":
        cfg["gradient_clipping"] = grad_clip
    return cfg


def _deepspeed_logs_to_stderr() -> None:
    """DeepSpeed's logger writes to stdout, where `--json` prints the summary: move it to stderr."""
    import logging

    for h in logging.getLogger("DeepSpeed").handlers:
        if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.__stdout__):
            h.setStream(sys.stderr)


def _skip_shm_comm_build(deepspeed) -> None:
    """On CPU, DeepSpeed's communication layer JIT-compiles a shared-memory all-reduce op (one to
    three minutes of g++ on a fresh machine) that only its inference path (`inference_all_reduce`)
    uses; ZeRO training reduces through torch.distributed (gloo). Marking the op incompatible in
    DeepSpeed's own table (a dict that keeps edits, by design) makes it fall back without building."""
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def deepspeed_initialize(module, optimizer, config: dict[str, Any], device: str):
    """`deepspeed.initialize(model=module, optimizer=optimizer, config=config)` -> (engine, the
    ZeRO-wrapped optimizer). On CPU DeepSpeed is pointed at its CPU accelerator (gloo) up front;
    what it prints goes to stderr; a config DeepSpeed rejects (offload without its CPU Adam, a bad
    key) is a one-line DsparkError."""
    if not str(device).startswith("cuda"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed

        _deepspeed_logs_to_stderr()
        if not str(device).startswith("cuda"):
            _skip_shm_comm_build(deepspeed)
        try:
            engine, ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        except Exception as e:  # DeepSpeed raises assorted types (AssertionError, ZeRORuntimeException, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DsparkError(f"deepspeed.initialize failed with the --deepspeed config ({type(e).__name__}: "
                              f"{first})") from e
    return engine, ds_optimizer


__all__ = ["DS_FILLED", "DistContext", "barrier", "broadcast_object", "deepspeed_initialize", "deepspeed_installed",
           "deepspeed_settings", "init_distributed", "load_deepspeed_config", "rank_device", "shutdown", "world_size_from_env"]
