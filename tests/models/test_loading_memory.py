"""Loading a checkpoint in another dtype than it is stored in holds the weights once (issue 12,
section 2): transformers maps safetensors files by default, and every page it read for the
conversion stayed resident beside the converted weights until loading ended."""

from __future__ import annotations

import shutil

import pytest
import torch

from dspark.memory import RssWindow, release_memory, reset_peak, status_bytes
from dspark.models import load_model
from dspark.quantize.loading import model_bytes

from .conftest import BUILTIN, builtin_ready

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _bf16_checkpoint(folder, seed: int, layers: int):
    """A random Llama (~56 MiB in float32 at 6 layers) stored in bf16, with the built-in tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(BUILTIN / "tiny-code" / name, folder / name)
    return folder


@pytest.mark.skipif(status_bytes("VmRSS") is None or not reset_peak(),
                    reason="needs Linux /proc/self/status and /proc/self/clear_refs")
@pytest.mark.skipif(not builtin_ready("tiny-code"), reason="built-in models not built")
def test_a_bf16_checkpoint_loads_in_float32_with_one_copy_resident(tmp_path):
    warm = _bf16_checkpoint(tmp_path / "warm", seed=0, layers=1)
    big = _bf16_checkpoint(tmp_path / "big", seed=1, layers=6)
    load_model(str(warm), dtype="float32")  # the first load's imports and caches are not this load's
    release_memory()
    window = RssWindow().start()
    loaded = load_model(str(big), dtype="float32")
    weights = model_bytes(loaded.model)
    assert next(loaded.model.parameters()).dtype == torch.float32
    # the float32 weights, the tokenizer and one tensor in flight; reading through a mapping kept the
    # bf16 file's pages too (1.5x)
    assert window.growth_bytes() < 1.25 * weights
