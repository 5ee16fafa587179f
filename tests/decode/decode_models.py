"""Model builders shared by the decoder tests (no test functions here).

- `bigram_llama(table)`: a real LlamaForCausalLM whose next-token logits are exactly `table[last token]`
  (identity embeddings, zeroed attention/MLP outputs, lm_head = table^T / sqrt(V)), so a stub with
  fixed logits still goes through the real HF forward, KV cache and masks.
- `random_llama(vocab, seed)`: a small random Llama for distribution tests.
- stories260K (a real model) and drafts made from it: a noised copy and a 2-layer truncation.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STORIES = REPO.parent / "shared" / "models" / "stories260K"
BUILTIN = REPO / "dspark" / "models" / "builtin"
TINY_TARGET = BUILTIN / "tiny-code"
TINY_DRAFT = BUILTIN / "tiny-code-draft-s"

STORY_PROMPTS = ["Once upon a time", "The little dog", "Lily went to the park and", "Tom had a red ball.",
                 "One day, a big", "She was sad because"]


def bigram_llama(table: torch.Tensor, max_positions: int = 256):
    """table: [V, V] float, V even: logits after token i are table[i] (up to a factor 1 - O(1e-6))."""
    from transformers import LlamaConfig, LlamaForCausalLM

    v = table.shape[0]
    cfg = LlamaConfig(vocab_size=v, hidden_size=v, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions,
                      rms_norm_eps=1e-12, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(v))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.copy_(table.t() / math.sqrt(v))
    return model


def chain_table(v: int, step: int = 1, scale: float = 10.0) -> torch.Tensor:
    """Logits that make token i always followed by (i + step) % v (greedy)."""
    t = torch.zeros(v, v)
    t[torch.arange(v), (torch.arange(v) + step) % v] = scale
    return t


def random_llama(vocab: int = 8, seed: int = 0, hidden: int = 16, layers: int = 1, scale: float = 1.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                      initializer_range=0.5 * scale, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return tok, model


def noised_copy(model, std: float = 0.02, seed: int = 0):
    torch.manual_seed(seed)
    d = copy.deepcopy(model)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn_like(p) * std)
    return d.eval()


def truncated_copy(model, layers: int = 2):
    """The first `layers` decoder layers of `model` (same embeddings, norm and lm_head)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    d = AutoModelForCausalLM.from_config(cfg)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    d.load_state_dict(state, strict=False)
    d.tie_weights()
    return d.eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: list[int] | None) -> list[int]:
    """The target's own greedy continuation via HF generate (generated ids only)."""
    dev = next(model.parameters()).device
    out = model.generate(torch.tensor([prompt], device=dev),
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=dev),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=(eos or [0])[0])
    return out[0, len(prompt):].tolist()


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP barriers
    with a preempted thread slow every op down by an order of magnitude: run these tests on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
