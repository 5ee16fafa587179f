"""Training one draft on a logits cache: the loop behind `dspark distill`.

Per step: a batch of cached rows (prompt + the target's continuation, with the target's top-K
log-probs and tail mass at each continuation position) -> the draft's logits at those positions ->
the chosen objective over the top-K + tail buckets (`losses.topk_loss`; how the tail is treated is
documented there) -> AdamW step with a linear-warmup cosine learning-rate schedule and gradient
clipping. Optional parts: LoRA adapters instead of full fine-tuning (`--lora`), on-policy batches
(`--on-policy`, see `onpolicy`), and the acceptance head trained alongside (`--acceptance-head`, see
`acceptance`). Every `eval_every` steps the held-out cache rows are scored (`evaluate.evaluate_heldout`:
expected acceptance without decoding); every `checkpoint_every` steps, and at the end, a checkpoint is
written (`checkpoint`), from which a re-run resumes exactly: same batches, same learning rates, same
on-policy draws.

A draft with another tokenizer (`cross`, a `dspark.distill.cross.CrossDistill`): each cached batch is
re-tokenized for the draft and the loss is the sequence-level cross-entropy plus the token-level term
on the vocabularies' intersection; the held-out metrics are the cross decoder's (see that module).

Data parallel: with a `DistContext` of world size N (torchrun), every rank reads a disjoint 1/N of
each window of cache rows (`LogitsCache.batches(rank=, world_size=)`, same number of batches on every
rank), the forward module and the head are wrapped in DistributedDataParallel (gradients averaged, so
every rank holds the same weights after every step); rank 0 evaluates and writes checkpoints; at
the end the ranks compare a digest of their weights and fail loudly if they differ. Launch commands
for multi-GPU and multi-node runs are in `dspark.distill.parallel`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dspark.distill import checkpoint as ckpt
from dspark.distill.acceptance import DEFAULT_HEAD_LR, HeadLogits, acceptance_targets, head_loss, init_head
from dspark.distill.cache import identity_diff
from dspark.distill.evaluate import DraftForward, evaluate_heldout
from dspark.distill.losses import expected_acceptance, full_loss, full_support, parse_objective, topk_loss
from dspark.distill.onpolicy import (batch_prompts, is_onpolicy_step, onpolicy_batch, sample_continuations,
                                     target_logits)
from dspark.errors import DataError, DsparkError

DEFAULT_LR = 5e-4
DEFAULT_LORA_LR = 2e-3
DEFAULT_BATCH_SIZE = 8
DEFAULT_HELDOUT_PERCENT = 10.0
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ProgressFn = Callable[[int, int, dict[str, Any]], None]  # (step, total steps, latest numbers)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one draft's training. Exactly one of `steps` / `epochs` (None for both: one epoch).
    lr None: DEFAULT_LR for full fine-tuning, DEFAULT_LORA_LR with LoRA."""

    objective: str = "fkl"
    steps: int | None = None
    epochs: float | None = None
    lr: float | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int | None = None  # None: about 10 evaluations per run
    checkpoint_every: int | None = None  # None: same as eval_every
    heldout_percent: float = DEFAULT_HELDOUT_PERCENT
    eval_max_rows: int | None = None
    max_length: int | None = None  # None: the draft's context
    seed: int = 0
    lora_rank: int | None = None
    lora_alpha: float | None = None  # None: 2 * rank
    on_policy: float = 0.0
    on_policy_max_new_tokens: int = 64
    on_policy_temperature: float = 1.0
    acceptance_head: bool = False
    head_lr: float = DEFAULT_HEAD_LR
    head_mlp_hidden: int = 0

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LORA_LR if self.lora_rank else DEFAULT_LR

    def identity(self) -> dict[str, Any]:
        """What decides the trained weights (compared when resuming): everything but how often we
        look at them."""
        d = asdict(self)
        for k in ("eval_every", "checkpoint_every", "eval_max_rows"):
            d.pop(k)
        d["objective"] = parse_objective(self.objective).spec
        d["lr"] = self.learning_rate
        return d


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """Raise DsparkError naming the first bad setting (checked before any data or model is loaded)."""
    parse_objective(cfg.objective)
    if cfg.steps is not None and cfg.epochs is not None:
        raise DsparkError(f"give --steps or --epochs, not both (got steps {cfg.steps} and epochs {cfg.epochs})")
    if cfg.steps is not None and cfg.steps < 1:
        raise DsparkError(f"--steps must be >= 1, got {cfg.steps}")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise DsparkError(f"--epochs must be > 0, got {cfg.epochs}")
    if not (cfg.learning_rate > 0 and math.isfinite(cfg.learning_rate)):
        raise DsparkError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.batch_size < 1:
        raise DsparkError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if not 0.0 < cfg.heldout_percent < 100.0:
        raise DsparkError(f"--heldout-percent must be in (0, 100), got {cfg.heldout_percent}")
    if cfg.lora_rank is not None and cfg.lora_rank < 1:
        raise DsparkError(f"--lora rank must be >= 1, got {cfg.lora_rank}")
    if not (0.0 <= cfg.on_policy <= 1.0):
        raise DsparkError(f"--on-policy LAMBDA must be in [0, 1], got {cfg.on_policy}")
    if cfg.on_policy_max_new_tokens < 1:
        raise DsparkError(f"on-policy continuation length must be >= 1, got {cfg.on_policy_max_new_tokens}")
    if not 0.0 <= cfg.warmup_fraction < 1.0 or not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise DsparkError(f"warmup fraction must be in [0, 1) and min lr ratio in [0, 1], got "
                          f"{cfg.warmup_fraction} and {cfg.min_lr_ratio}")
    for name in ("eval_every", "checkpoint_every", "eval_max_rows"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise DsparkError(f"{name.replace('_', '-')} must be >= 1, got {v}")
    if cfg.head_mlp_hidden < 0 or not cfg.head_lr > 0:
        raise DsparkError(f"acceptance head needs mlp hidden >= 0 and lr > 0, got {cfg.head_mlp_hidden}, "
                          f"{cfg.head_lr}")
    return cfg


def cosine_lr(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    """Learning rate of step `step` (0-based): linear warmup over `warmup` steps to `base`, then
    cosine decay to `base * min_ratio` at the last step."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------

def apply_lora(model: torch.nn.Module, rank: int, alpha: float | None = None) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters (peft) on the attention and MLP projections present in it;
    only the adapters train."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in LORA_TARGET_MODULES if t in names]
    if not targets:
        raise DsparkError(f"--lora: the draft ({type(model).__name__}) has none of the projections LoRA targets "
                          f"({', '.join(LORA_TARGET_MODULES)})")
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                     target_modules=targets, bias="none", task_type="CAUSAL_LM")
    from dspark.contain import third_party_contained

    with third_party_contained():  # peft imports gptqmodel when installed: a banner on stdout, env changes
        return get_peft_model(model, cfg)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """A LoRA-wrapped model -> the plain model with the adapters merged into its weights."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    model: torch.nn.Module  # plain (LoRA merged) draft, eval mode
    head: Any | None
    steps: int
    resumed_from: int | None
    heldout_before: dict[str, float]
    heldout_after: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    onpolicy_steps: int = 0
    seconds: float = 0.0
    positions_seen: int = 0
    weights_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "resumed_from": self.resumed_from, "heldout_before": self.heldout_before,
                "heldout_after": self.heldout_after, "onpolicy_steps": self.onpolicy_steps,
                "seconds": round(self.seconds, 2), "positions_seen": self.positions_seen,
                "weights_sha256": self.weights_sha256,
                "history": self.history}


def _batch_stream(cache, cfg: TrainConfig, start_step: int, per_epoch: int, rank: int, world_size: int,
                  pad_id: int, max_length: int | None) -> Iterator:
    """Training batches from step `start_step` on, epoch after epoch (each epoch reshuffled by its
    number), exactly the batches an uninterrupted run would have seen."""
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        it = cache.batches(cfg.batch_size, split="train", heldout_percent=cfg.heldout_percent, shuffle=True,
                           seed=cfg.seed, epoch=epoch, rank=rank, world_size=world_size, pad_id=pad_id,
                           max_length=max_length)
        for i, batch in enumerate(it):
            if i >= skip:
                yield batch
        skip = 0
        epoch += 1


def total_steps(cache, cfg: TrainConfig, world_size: int = 1) -> tuple[int, int]:
    """(steps to run, batches per epoch per rank)."""
    per_epoch = cache.count_batches(cfg.batch_size, split="train", heldout_percent=cfg.heldout_percent,
                                    shuffle=True, seed=cfg.seed, world_size=world_size)
    if per_epoch == 0:
        raise DataError(f"the logits cache {str(cache.path)!r} has no training rows for {world_size} process(es) "
                        f"at --heldout-percent {cfg.heldout_percent:g} ({cache.num_rows} rows in all)")
    if cfg.steps is not None:
        return cfg.steps, per_epoch
    return max(1, math.ceil((cfg.epochs if cfg.epochs is not None else 1.0) * per_epoch)), per_epoch


def train_draft(model: torch.nn.Module, cache, cfg: TrainConfig, checkpoint_dir: str | Path, *,
                vocab_size: int | None, pad_id: int = 0, target_model: torch.nn.Module | None = None,
                stop_token_ids: tuple[int, ...] = (), run_identity: dict[str, Any] | None = None,
                dist=None, deepspeed_config: dict[str, Any] | None = None, progress: ProgressFn | None = None,
                log: Callable[[str], None] | None = None, cross=None) -> TrainResult:
    """Train `model` (a float32 HF causal LM) on `cache`; resume from `checkpoint_dir` if it holds a
    checkpoint of the same run (same `run_identity` and settings), else start fresh there.

    `deepspeed_config` (validated by `parallel.load_deepspeed_config`; needs a process group, even
    of one: `parallel.init_distributed(..., single_process_group=True)`): the forward module and
    AdamW go through `deepspeed.initialize` (ZeRO 0-2). ZeRO partitions the optimizer state across
    ranks, so its checkpoints hold the weights and the step only; a resumed DeepSpeed run restarts
    the Adam moments (logged).

    `cross` (`dspark.distill.cross.CrossDistill`): the draft has another tokenizer (module docstring);
    its `max_length` defaults to the draft's context."""
    validate_config(cfg)
    log = log or (lambda _m: None)
    t0 = time.perf_counter()
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    main = rank == 0
    obj = parse_objective(cfg.objective)
    if cfg.on_policy > 0 and target_model is None:
        raise DsparkError("on-policy training needs the target model loaded")
    device = next(model.parameters()).device
    context = getattr(model.config, "max_position_embeddings", None)
    max_length = cfg.max_length or context
    if cross is not None:
        from dspark.distill.cross import check_cross_config

        check_cross_config(cfg)
        cross = replace(cross, max_length=cross.max_length or max_length)
        max_length = None  # the cached rows are re-tokenized first, then fitted to the draft's context
    steps, per_epoch = total_steps(cache, cfg, world)
    eval_every = cfg.eval_every or max(1, steps // 10)
    ckpt_every = cfg.checkpoint_every or eval_every
    warmup = int(cfg.warmup_fraction * steps)

    torch.manual_seed(cfg.seed)
    if cfg.lora_rank:
        model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
    model.train()
    forward = DraftForward(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    head = head_opt = None
    if cfg.acceptance_head:
        head = init_head(int(model.config.hidden_size), cfg.head_mlp_hidden, seed=cfg.seed).to(device)
        head_opt = torch.optim.Adam(head.parameters(), lr=cfg.head_lr)

    # JSON round trip: compared with what state.json holds (tuples become lists there)
    identity = {"run": run_identity or {}, "config": cfg.identity(), "world_size": world,
                "deepspeed": deepspeed_config}
    if cross is not None:
        identity["cross"] = cross.identity()
    identity = json.loads(json.dumps(identity))
    root = Path(checkpoint_dir)
    latest = ckpt.load_latest(root)
    start, resumed_from, history, before = 0, None, [], None
    onpolicy_steps = positions_seen = 0
    if latest is not None:
        diff = identity_diff(latest.state.get("identity", {}), identity)
        if diff:
            key, old, new = diff[0]
            raise DataError(f"checkpoint {str(root)!r} belongs to another run ({key}: {old!r} there, {new!r} now): "
                            "re-run with the same arguments to resume, or delete it / choose another --out")
        ckpt.restore(latest, model, None if deepspeed_config is not None else optimizer, head, head_opt)
        if deepspeed_config is not None:
            log("DeepSpeed checkpoints hold weights only: the optimizer moments restart")
        start = resumed_from = latest.step
        history = list(latest.state.get("history", []))
        before = latest.state.get("heldout_before")
        onpolicy_steps = int(latest.state.get("onpolicy_steps", 0))
        positions_seen = int(latest.state.get("positions_seen", 0))
        log(f"resuming from step {start} of {steps} ({latest.folder})")

    train_fwd: torch.nn.Module = forward
    train_head = HeadLogits(head) if head is not None else None
    engine = None
    if deepspeed_config is not None:
        from dspark.distill.parallel import deepspeed_initialize, deepspeed_settings

        if not torch.distributed.is_initialized():
            raise DsparkError("training with a DeepSpeed config needs a process group, even for one process: call "
                              "dspark.distill.parallel.init_distributed(device, single_process_group=True) first")
        ds_cfg = deepspeed_settings(deepspeed_config, cfg.batch_size, world, cfg.grad_clip)
        engine, optimizer = deepspeed_initialize(forward, optimizer, ds_cfg, str(device))
        train_fwd = engine
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_fwd = DDP(forward, device_ids=[device.index] if device.type == "cuda" else None)
    if world > 1 and train_head is not None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_head = DDP(train_head, device_ids=[device.index] if device.type == "cuda" else None)

    def evaluate() -> dict[str, float]:
        if cross is not None:
            return cross.evaluate(forward, cache, obj, heldout_percent=cfg.heldout_percent,
                                  batch_size=cfg.batch_size, max_rows=cfg.eval_max_rows)
        return evaluate_heldout(forward, cache, obj, heldout_percent=cfg.heldout_percent, batch_size=cfg.batch_size,
                                vocab_size=vocab_size, pad_id=pad_id, max_length=max_length, head=head,
                                max_rows=cfg.eval_max_rows)

    def save(step: int) -> None:
        if not main:
            return
        state = {"identity": identity, "history": history, "heldout_before": before, "total_steps": steps,
                 "onpolicy_steps": onpolicy_steps, "positions_seen": positions_seen}
        ckpt.save_checkpoint(root, step, model, None if engine is not None else optimizer, state, head, head_opt)

    if before is None and main:
        before = evaluate()
        history.append({"step": 0, **{k: v for k, v in before.items() if k != "positions"}})
    if progress and main:
        progress(start, steps, {"expected_acceptance": (history[-1] if history else {}).get("expected_acceptance")})

    stream = _batch_stream(cache, cfg, start, per_epoch, rank, world, pad_id, max_length)
    loss_ema = None
    last_eval = history[-1] if history else {}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    for step in range(start, steps):
        lr = cosine_lr(step, steps, cfg.learning_rate, warmup, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = next(stream)
        onpolicy = is_onpolicy_step(cfg.seed + rank, step, cfg.on_policy)
        if onpolicy:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 31 + rank)
            prompts = batch_prompts(batch)
            conts = sample_continuations(model, prompts, cfg.on_policy_max_new_tokens,
                                         temperature=cfg.on_policy_temperature, generator=gen,
                                         stop_token_ids=stop_token_ids, pad_id=pad_id, vocab_size=vocab_size)
            batch = onpolicy_batch(prompts, conts, pad_id=pad_id, max_length=max_length)
            onpolicy_steps += 1
        b = cross.batch(batch).to(device) if cross is not None else batch.to(device)
        with autocast:
            hidden, logits = train_fwd(b.input_ids, b.attention_mask, b.positions)
            if cross is not None:
                loss = cross.loss(obj, logits, b)
            elif onpolicy:
                t_logits = target_logits(target_model, b)
                loss = full_loss(obj, t_logits, logits, mask=b.loss_mask, vocab_size=vocab_size)
            else:
                loss = topk_loss(obj, b.topk_logprobs, b.topk_ids, logits, b.tail, mask=b.loss_mask,
                                 vocab_size=vocab_size)
        if engine is not None:  # DeepSpeed clips (gradient_clipping), steps and zeroes itself
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        positions_seen += int(b.loss_mask.sum())
        if head is not None:
            if onpolicy:
                with torch.no_grad():
                    lp, lq = full_support(t_logits[b.loss_mask].float(), logits.detach()[b.loss_mask].float(),
                                          vocab_size=vocab_size)
                    targets = expected_acceptance(lp, lq).clamp(0.0, 1.0)
            else:
                targets = acceptance_targets(b.topk_logprobs, b.topk_ids, logits, b.tail, b.loss_mask, vocab_size)
            h_loss = head_loss(train_head, hidden.detach()[b.loss_mask], targets)
            h_loss.backward()
            head_opt.step()
            head_opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
        done = step + 1
        if main and (done % eval_every == 0 or done == steps):
            last_eval = {"step": done, "loss": round(loss_ema, 6), "lr": lr,
                         **{k: v for k, v in evaluate().items() if k != "positions"}}
            history.append(last_eval)
        if done % ckpt_every == 0 or done == steps:
            save(done)
        if progress and main:
            progress(done, steps, {"loss": loss_ema, "expected_acceptance": last_eval.get("expected_acceptance"),
                                   "onpolicy": onpolicy})

    weights_sha256 = ranks_agree(model, head, dist)
    after = history[-1] if main and history else {}
    final = merge_lora(model) if is_lora(model) else model
    final.eval()
    if head is not None:
        head.eval()
    return TrainResult(model=final, head=head, steps=steps, resumed_from=resumed_from,
                       heldout_before=before or {}, heldout_after={k: v for k, v in after.items()
                                                                    if k not in ("step", "loss", "lr")},
                       history=history, onpolicy_steps=onpolicy_steps, seconds=time.perf_counter() - t0,
                       positions_seen=positions_seen, weights_sha256=weights_sha256)


def weights_digest(*modules: torch.nn.Module | None) -> str:
    """sha256 over the parameters of the given modules (name, shape, bytes), in name order."""
    import hashlib

    h = hashlib.sha256()
    for i, m in enumerate(modules):
        if m is None:
            continue
        for name, p in sorted(m.named_parameters()):
            t = p.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{i}:{name}:{tuple(t.shape)}\n".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def ranks_agree(model: torch.nn.Module, head: torch.nn.Module | None, dist) -> str:
    """The digest of the trained weights; with several ranks, checks that every rank holds the
    same weights (data parallel must keep them identical) and raises if not."""
    digest = weights_digest(model, head)
    if dist is None or dist.world_size <= 1:
        return digest
    import torch.distributed as tdist

    digests: list[str | None] = [None] * dist.world_size
    tdist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise DsparkError(f"data-parallel ranks ended with different weights ({', '.join(d[:12] for d in digests)}): "
                          "check that every process got the same arguments and cache")
    return digest


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_HELDOUT_PERCENT", "DEFAULT_LORA_LR", "DEFAULT_LR", "TrainConfig",
           "TrainResult", "apply_lora", "cosine_lr", "is_lora", "merge_lora", "ranks_agree", "total_steps",
           "train_draft", "validate_config", "weights_digest"]
