"""The built-in tiny model family: a byte-level BPE tokenizer and three Llama models trained on CPU.

`build_family(recipe)` trains, deterministically (fixed seeds, fixed data order, fixed thread
count), a tokenizer on the recipe task's train split and then every model in the recipe, and
writes each as a Hugging Face folder (safetensors + tokenizer + config + `dspark_model.json` with
parameters, training tokens, time and held-out loss). Models already present with the same recipe
hash are skipped, so an interrupted build resumes at model granularity.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from pydantic import Field

from dspark.config import StrictModel
from dspark.io import atomic_write_json

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>"]


class TokenizerSpec(StrictModel):
    vocab_size: int = Field(4096, ge=300)
    min_frequency: int = 2


class TinyModelSpec(StrictModel):
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    train_tokens: int = Field(gt=0)
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0


class TinyFamilyRecipe(StrictModel):
    task: str = "code"
    block_size: int = 256
    max_position_embeddings: int = 1024
    eval_blocks: int = 128
    threads: int = 2
    storage_dtype: str = "bfloat16"
    tokenizer: TokenizerSpec = TokenizerSpec()
    models: list[TinyModelSpec]

    def hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


def train_tokenizer(texts: list[str], spec: TokenizerSpec, block_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenizer), BOS prepended on encode like Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B",
                                                      special_tokens=[("<|bos|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", model_max_length=block_size * 4)


def encode_corpus(tokenizer, texts: list[str]) -> torch.Tensor:
    """One long id stream: <bos> doc <eos> <bos> doc <eos> ..."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    # The backend tokenizer: whole files exceed model_max_length, which is fine for a stream.
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=True):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def llama_config(spec: TinyModelSpec, tokenizer, max_pos: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                       intermediate_size=spec.intermediate_size,
                       num_hidden_layers=spec.num_hidden_layers,
                       num_attention_heads=spec.num_attention_heads,
                       num_key_value_heads=spec.num_key_value_heads,
                       max_position_embeddings=max_pos, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5)


@torch.no_grad()
def heldout_loss(model, eval_ids: torch.Tensor, block: int, n_blocks: int) -> float:
    """Mean next-token cross-entropy (nats/token) over the first n_blocks contiguous blocks."""
    model.eval()
    n = min(n_blocks, (len(eval_ids) - 1) // block)
    total, count = 0.0, 0
    for i in range(0, n, 16):
        rows = [eval_ids[j * block:(j + 1) * block + 1] for j in range(i, min(n, i + 16))]
        x = torch.stack([r[:-1] for r in rows])
        y = torch.stack([r[1:] for r in rows])
        logits = model(input_ids=x).logits
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                                   reduction="sum").item()
        count += y.numel()
    model.train()
    return total / max(count, 1)


def train_model(spec: TinyModelSpec, recipe: TinyFamilyRecipe, tokenizer, train_ids: torch.Tensor,
                eval_ids: torch.Tensor, progress: Callable[[str, int, int, float], None] | None = None):
    from transformers import LlamaForCausalLM

    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(llama_config(spec, tokenizer, recipe.max_position_embeddings))
    block = recipe.block_size
    tokens_per_step = spec.batch_size * block
    steps = max(1, spec.train_tokens // tokens_per_step)
    warmup = max(1, steps // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()
    t0 = time.perf_counter()
    loss_ema = None
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - block - 1, (spec.batch_size,), generator=gen)
        x = torch.stack([train_ids[s:s + block] for s in starts.tolist()])
        y = torch.stack([train_ids[s + 1:s + block + 1] for s in starts.tolist()])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if progress:
            progress(spec.name, step + 1, steps, loss_ema)
    elapsed = time.perf_counter() - t0
    stats = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": steps * tokens_per_step,
        "train_steps": steps,
        "train_seconds": round(elapsed, 1),
        "train_tokens_per_s": round(steps * tokens_per_step / elapsed, 1),
        "final_train_loss_ema": round(loss_ema, 4),
        "heldout_loss": round(heldout_loss(model, eval_ids, block, recipe.eval_blocks), 4),
    }
    return model, stats


def save_model_folder(model, tokenizer, out: Path, meta: dict, storage_dtype: str) -> None:
    """Write the HF folder into a temp sibling and rename it into place (atomic per model)."""
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    dtype = getattr(torch, storage_dtype)
    model.to(dtype).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / "dspark_model.json", meta)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def build_family(recipe: TinyFamilyRecipe, out_dir: str | Path, only: list[str] | None = None,
                 progress: Callable[[str, int, int, float], None] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, dict]:
    from dspark.tasks import get_task

    torch.set_num_threads(recipe.threads)
    out_dir = Path(out_dir)
    task = get_task(recipe.task)
    t0 = time.perf_counter()
    train_texts = list(task.documents("train"))
    eval_texts = list(task.documents("eval"))
    log(f"task {recipe.task}: {len(train_texts)} train docs, {len(eval_texts)} eval docs "
        f"({sum(map(len, train_texts)) / 1e6:.1f} MB train text)")
    tokenizer = train_tokenizer(train_texts, recipe.tokenizer, recipe.block_size)
    train_ids = encode_corpus(tokenizer, train_texts)
    eval_ids = encode_corpus(tokenizer, eval_texts)
    log(f"tokenizer: vocab {len(tokenizer)}, {len(train_ids):,} train tokens, {len(eval_ids):,} eval "
        f"tokens ({time.perf_counter() - t0:.0f}s)")
    rhash = recipe.hash()
    results = {}
    for spec in recipe.models:
        if only and spec.name not in only:
            continue
        target = out_dir / spec.name
        meta_path = target / "dspark_model.json"
        if meta_path.exists() and json.loads(meta_path.read_text()).get("recipe_hash") == rhash:
            log(f"{spec.name}: already built with this recipe, skipping")
            results[spec.name] = json.loads(meta_path.read_text())
            continue
        model, stats = train_model(spec, recipe, tokenizer, train_ids, eval_ids, progress)
        meta = {"name": spec.name, "family": "tiny-code", "recipe_hash": rhash, "task": recipe.task,
                "task_source": task.describe_source(), "corpus_train_tokens": len(train_ids),
                "corpus_eval_tokens": len(eval_ids), **stats, "spec": spec.model_dump()}
        save_model_folder(model, tokenizer, target, meta, recipe.storage_dtype)
        log(f"{spec.name}: {stats}")
        results[spec.name] = meta
    return results
