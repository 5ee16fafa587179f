"""Greedy losslessness on real models: the speculative decoder's output is token-identical to HF
`generate(do_sample=False)` of the target, for several drafts, every policy, batch sizes 1 and 4.

- stories260K (a real Llama, vocab 512) with two drafts made from it: a noised copy (high
  acceptance) and its first 2 layers (low acceptance).
- The built-in pair tiny-code / tiny-code-draft-s (skipped only while the target folder does not
  exist: it is built by `dspark build-tiny-family`).
The decoders run on the `decode_device` fixture's device (DSPARK_TEST_DEVICE, default cpu; the HF
references are computed on the CPU first), so a GPU session runs the same checks on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from dspark.decode import AcceptanceHead, GenerationConfig, SpeculativeDecoder, save_acceptance_head
from tests.decode.decode_models import single_thread  # noqa: F401  (autouse fixture)
from tests.decode.decode_models import (STORIES, STORY_PROMPTS, TINY_DRAFT, TINY_TARGET, hf_greedy, load_hf,
                                        noised_copy, truncated_copy)

POLICIES = ["1", "3", "6", "confidence:0.5", "goodput", "auto", "learned"]
MAX_NEW = 32


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    if not STORIES.is_dir():
        pytest.skip("../shared/models/stories260K missing")
    tok, target = load_hf(STORIES)
    prompts = [tok(p).input_ids for p in STORY_PROMPTS[:5]]  # batch size 4 -> a batch of 4 and one of 1
    refs = [hf_greedy(target, p, MAX_NEW, [1, 2]) for p in prompts]
    drafts = {"noised": noised_copy(target, 0.02), "truncated": truncated_copy(target, 2)}
    # a random acceptance head per draft, so `learned` (and `auto` picking it) run on real models
    heads = {}
    for name in drafts:
        folder = tmp_path_factory.mktemp(f"head-{name}")
        torch.manual_seed(0)
        save_acceptance_head(AcceptanceHead(target.config.hidden_size, 8), folder)
        heads[name] = folder
    return tok, target, drafts, heads, prompts, refs


@pytest.mark.parametrize("draft_name", ["noised", "truncated"])
@pytest.mark.parametrize("policy", POLICIES)
def test_stories_greedy_equals_hf(stories, decode_device, draft_name, policy):
    tok, target, drafts, heads, prompts, refs = stories
    head = heads[draft_name] if policy == "learned" else None
    dec = SpeculativeDecoder(target, drafts[draft_name], tok, draft_length=policy, acceptance_head=head,
                             device=decode_device)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, stop_token_ids=(1, 2))
    for batch_size in (1, 4):
        res = dec.generate(prompts, cfg, batch_size=batch_size)
        assert [r.token_ids for r in res] == refs, (policy, batch_size)
        for r in res:
            st = r.stats
            assert st.accepted + st.recovered + st.bonus == st.generated == len(r.token_ids)
            assert r.finish_reason == ("stop" if r.token_ids[-1] in (1, 2) else "length")
    if draft_name == "noised" and policy in ("3", "6"):
        assert sum(r.stats.accepted for r in res) / sum(r.stats.drafted for r in res) > 0.3


def test_stories_auto_with_head_uses_learned(stories, decode_device):
    tok, target, drafts, heads, prompts, refs = stories
    dec = SpeculativeDecoder(target, drafts["noised"], tok, acceptance_head=heads["noised"], device=decode_device)
    assert dec.policy_factory.resolved_kind(dec.policy_context) == "learned"
    res = dec.generate(prompts[:4], GenerationConfig(max_new_tokens=MAX_NEW, stop_token_ids=(1, 2)))
    assert [r.token_ids for r in res] == refs[:4]


def test_stories_target_only_equals_hf(stories, decode_device):
    tok, target, _, _, prompts, refs = stories
    dec = SpeculativeDecoder(target, None, tok, device=decode_device)
    res = dec.generate(prompts, GenerationConfig(max_new_tokens=MAX_NEW, stop_token_ids=(1, 2)), batch_size=4)
    assert [r.token_ids for r in res] == refs
    assert all(r.stats.mean_accepted_tokens == 1.0 for r in res)


def test_stories_default_stop_is_the_tokenizer_eos(stories, decode_device):
    tok, target, drafts, _, prompts, _ = stories
    dec = SpeculativeDecoder(target, drafts["noised"], tok, draft_length=4, device=decode_device)
    assert dec.default_stop_ids == (2,)
    ref = hf_greedy(target, prompts[0], 60, [2])
    assert dec.generate(prompts[:1], GenerationConfig(max_new_tokens=60))[0].token_ids == ref


def test_stories_padded_target_vocab(stories, decode_device):
    """A target whose lm_head has 8 padded rows (copies of <unk>'s, never the argmax) still decodes
    exactly like HF, and the draft is the unpadded model."""
    import copy

    tok, target, drafts, _, prompts, refs = stories
    padded = copy.deepcopy(target)
    padded.config.tie_word_embeddings = False
    old = padded.lm_head.weight.data
    head = torch.nn.Linear(old.shape[1], old.shape[0] + 8, bias=False, device=old.device)
    with torch.no_grad():
        head.weight[: old.shape[0]] = old
        head.weight[old.shape[0]:] = old[0]
    padded.lm_head = head
    dec = SpeculativeDecoder(padded, drafts["noised"], tok, draft_length=3, device=decode_device)
    assert dec.vocab == 512
    res = dec.generate(prompts, GenerationConfig(max_new_tokens=MAX_NEW, stop_token_ids=(1, 2)), batch_size=4)
    assert [r.token_ids for r in res] == refs


TINY_PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):\n",
                "    for i in range(len(items)):\n", "# Copyright", "def _check_args(self, args, kwargs):\n    if "]


@pytest.fixture(scope="module")
def tiny_pair():
    if not TINY_TARGET.is_dir():
        pytest.skip("built-in tiny-code target not built yet (dspark build-tiny-family)")
    tok, target = load_hf(TINY_TARGET)
    _, draft = load_hf(TINY_DRAFT)
    prompts = [tok(p).input_ids for p in TINY_PROMPTS[:5]]
    refs = [hf_greedy(target, p, MAX_NEW, [tok.eos_token_id]) for p in prompts]
    return tok, target, draft, prompts, refs


@pytest.mark.parametrize("policy", ["2", "5", "confidence:0.4", "auto"])
def test_builtin_pair_greedy_equals_hf(tiny_pair, decode_device, policy):
    tok, target, draft, prompts, refs = tiny_pair
    dec = SpeculativeDecoder(target, draft, tok, draft_length=policy, device=decode_device)
    for batch_size in (1, 4):
        res = dec.generate(prompts, GenerationConfig(max_new_tokens=MAX_NEW), batch_size=batch_size)
        assert [r.token_ids for r in res] == refs, (policy, batch_size)
