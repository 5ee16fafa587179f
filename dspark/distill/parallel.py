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

DeepSpeed: `--deepspeed ds_config.json` hands the forward module and the optimizer to
`deepspeed.initialize` (ZeRO stages 1-2: optimizer state and gradients partitioned across ranks);
launch with `deepspeed --num_gpus 8 -m dspark distill ... --deepspeed ds_config.json` or torchrun.
The config should not name an "optimizer" (dspark passes its AdamW) nor a "scheduler" (dspark sets
the learning rate per step). DeepSpeed is the `train` extra (`pip install 'dspark[train]'`); it is not
installed on dspark's development machines, so that path is NOT covered by the test suite.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
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


def init_distributed(device: str) -> DistContext | None:
    """Join the process group torchrun / accelerate describe in the environment (None when this is
    a single process). gloo on CPU, nccl on CUDA."""
    world = world_size_from_env()
    if world <= 1:
        return None
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "gloo"
    if not dist.is_initialized():
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


def load_deepspeed_config(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Validate `--deepspeed CONFIG` before any work: deepspeed importable, the file a JSON object
    without an optimizer/scheduler block (dspark owns both)."""
    if path is None:
        return None
    if importlib.util.find_spec("deepspeed") is None:
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
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise DsparkError(f"--deepspeed config {str(p)!r} has a {key!r} block: remove it (dspark passes its own "
                              "AdamW and sets the learning rate every step)")
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise DsparkError(f"--deepspeed ZeRO stage {stage!r} is not supported (valid: 0, 1, 2): stage 3 partitions "
                          "the parameters, which dspark's checkpoints and evaluation read whole")
    return cfg


__all__ = ["DistContext", "barrier", "broadcast_object", "init_distributed", "load_deepspeed_config",
           "rank_device", "shutdown", "world_size_from_env"]
