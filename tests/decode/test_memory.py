"""The decoder keeps no second copy of a model's weights (issue 12, section 2): decoders built the
way `dspark bench` and `dspark select` build them (several per model) leave the resident memory
where loading the weights put it, and the lean forward reads the model's own parameters."""

from __future__ import annotations

import pytest
import torch

from dspark.decode import GenerationConfig, SpeculativeDecoder
from dspark.decode.engine import _Runner
from dspark.decode.fastpath import LeanLlama
from dspark.memory import RssWindow, reset_peak, status_bytes
from dspark.quantize.loading import model_bytes
from tests.decode.decode_models import random_llama, single_thread  # noqa: F401  (autouse fixture)


needs_rss = pytest.mark.skipif(status_bytes("VmRSS") is None or not reset_peak(),
                               reason="needs Linux /proc/self/status and /proc/self/clear_refs")


@needs_rss
def test_decoders_add_no_copy_of_the_weights():
    small = random_llama(vocab=512, seed=1, hidden=64, layers=1)
    SpeculativeDecoder(small, small, None, draft_length="2").generate([[1, 2, 3]], GenerationConfig(max_new_tokens=4))
    model = random_llama(vocab=512, seed=0, hidden=512, layers=4)  # ~40 MiB of float32 weights
    weights = model_bytes(model)
    window = RssWindow().start()  # after a warm-up: the runtime's one-time allocations are not the decoder's
    decoders = [SpeculativeDecoder(model, model, None, draft_length="2") for _ in range(2)]
    runner = _Runner(model, "target")  # as bench's forward-cost microbenchmark makes one per model
    for dec in decoders:
        dec.generate([[1, 2, 3]], GenerationConfig(max_new_tokens=4))
    assert all(dec.target.lean is not None for dec in decoders) and runner.lean is not None
    # KV buffers (4 layers x 2 x 256 slots x 256 wide x 4 bytes = 2 MiB per model and decoder, 8 MiB
    # in all: a fifth of the weights) and activations stay under half the weights; before, every
    # decoder's lean forward kept a transposed copy of each model's projections and LM head (~1x each)
    assert window.growth_bytes() < 0.5 * weights


def test_lean_forward_reads_the_models_current_weights():
    model = random_llama(vocab=32, seed=2, hidden=32, layers=2)
    lean = LeanLlama(model)
    model.load_state_dict(random_llama(vocab=32, seed=5, hidden=32, layers=2).state_dict())  # in place
    ids = torch.randint(0, 32, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
        logits, _ = lean(ids, torch.arange(6)[None], causal, lean.new_cache(1), 6, False)
        ref = model(ids).logits
    assert torch.allclose(logits, ref, atol=1e-5)


@needs_rss
def test_a_batch_holds_its_kv_cache_once():
    """Each prompt is prefilled alone, then merged into the batch's cache: the one-row caches are
    sized to their prompts, so the merge does not hold a second batch-sized cache."""
    model = random_llama(vocab=64, seed=0, hidden=512, layers=8)
    dec = SpeculativeDecoder(model, None, None)
    dec.generate([[1, 2]], GenerationConfig(max_new_tokens=2))  # warm-up: the runtime's one-time allocations
    prompts = [[1 + i, 2, 3, 4, 5] for i in range(8)]
    kv = 8 * 2 * 8 * 256 * 256 * 4  # rows x (k, v) x layers x slots x (1 kv head x head_dim 256) x bytes: 32 MiB
    window = RssWindow().start()
    dec.generate(prompts, GenerationConfig(max_new_tokens=4))
    assert window.growth_bytes() < 1.5 * kv  # a full-size one-row cache per prompt made it 2x


def test_a_draft_with_the_targets_tokenizer_shares_it():
    from dspark.decode.run import load_pair
    from tests.decode.decode_models import BUILTIN

    if not all((BUILTIN / n).is_dir() for n in ("tiny-code", "tiny-code-draft-s", "tiny-code-draft-xbpe")):
        pytest.skip("built-in models not built")
    same = load_pair("tiny-code", "tiny-code-draft-s", "cpu", "float32")
    assert same.compat.compatible and same.draft.tokenizer is same.target.tokenizer  # one copy in memory
    other = load_pair("tiny-code", "tiny-code-draft-xbpe", "cpu", "float32")
    assert not other.compat.compatible and other.draft.tokenizer is not other.target.tokenizer
