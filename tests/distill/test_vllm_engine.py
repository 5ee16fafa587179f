"""The vllm engine's glue, against a FAKE `vllm` module (vLLM itself needs a CUDA GPU and is not
installed here, so the real engine is untested). The fake answers like vLLM's documented API
(`LLM.generate` with per-prompt `SamplingParams`; `prompt_logprobs` = a list with None for the
first prompt token, then per token a dict id -> Logprob holding the top-K plus the actual token),
computed with the transformers model. This checks the engine's parsing and position alignment:
it must produce the same cache as the hf engine."""

import sys
import types
from dataclasses import dataclass
from importlib.machinery import ModuleSpec

import numpy as np
import pytest
import torch

from dspark.distill.cache import LogitsCache
from dspark.distill.collect import collect, load_target
from tests.distill.helpers import STOP, STORIES, story_prompts


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class SamplingParams:
    temperature: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: list | None = None
    prompt_logprobs: int | None = None
    logprobs: int | None = None


@dataclass
class TokensPrompt:
    prompt_token_ids: list


class FakeLLM:
    instances: list = []

    def __init__(self, model, dtype="auto", seed=0, max_logprobs=20, tensor_parallel_size=1):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.max_logprobs = max_logprobs
        FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        params = params if isinstance(params, list) else [params] * len(prompts)
        return [self._one(p["prompt_token_ids"] if isinstance(p, dict) else p.prompt_token_ids, sp)
                for p, sp in zip(prompts, params)]

    @torch.no_grad()
    def _one(self, ids, sp):
        assert sp.temperature == 0.0, "the fake only does greedy"
        out = types.SimpleNamespace(prompt_logprobs=None, outputs=[])
        if sp.prompt_logprobs is not None:
            assert sp.prompt_logprobs <= self.max_logprobs
            logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)
            pl = [None]
            for j in range(1, len(ids)):
                row = logp[j - 1]
                ranks = torch.argsort(row, descending=True)
                entry = {int(t): Logprob(float(row[t]), r + 1) for r, t in enumerate(ranks[:sp.prompt_logprobs])}
                actual = ids[j]
                if actual not in entry:
                    entry[actual] = Logprob(float(row[actual]), int((ranks == actual).nonzero()) + 1)
                pl.append(entry)
            out.prompt_logprobs = pl
        gen = self.model.generate(torch.tensor([ids]), max_new_tokens=sp.max_tokens, do_sample=False,
                                  eos_token_id=sp.stop_token_ids or None, pad_token_id=0)[0, len(ids):].tolist()
        out.outputs = [types.SimpleNamespace(token_ids=gen)]
        return out


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.__spec__ = ModuleSpec("vllm", None)
    vllm.LLM, vllm.SamplingParams = FakeLLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.__spec__ = ModuleSpec("vllm.inputs", None)
    inputs.TokensPrompt = TokensPrompt
    vllm.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    FakeLLM.instances = []
    return vllm


def test_vllm_engine_glue_matches_hf_engine(tmp_path, fake_vllm):
    args = dict(k=8, max_new_tokens=8, stop_token_ids=STOP, batch_size=3)
    prompts = story_prompts(5)
    tv = load_target(str(STORIES), device="cpu", dtype="float32", engine="vllm")
    assert tv.model is None  # the engine loads the model itself; collect only loaded the tokenizer
    collect(tv, prompts, tmp_path / "vllm", engine="vllm", **args)
    assert FakeLLM.instances and FakeLLM.instances[0].max_logprobs == 8
    th = load_target(str(STORIES), device="cpu", dtype="float32", engine="hf")
    assert th.identity == tv.identity and th.tokenizer_hash == tv.tokenizer_hash
    collect(th, prompts, tmp_path / "hf", **args)
    a = {r.prompt_id: r for r in LogitsCache(tmp_path / "vllm").rows()}
    b = {r.prompt_id: r for r in LogitsCache(tmp_path / "hf").rows()}
    assert a.keys() == b.keys()
    for pid in a:
        assert a[pid].continuation_ids.tolist() == b[pid].continuation_ids.tolist()
        assert np.array_equal(a[pid].topk_ids, b[pid].topk_ids)
        assert np.allclose(a[pid].topk_logprobs.astype(np.float32), b[pid].topk_logprobs.astype(np.float32), atol=1e-2)
        assert np.allclose(a[pid].tail, b[pid].tail, atol=1e-3)
    assert LogitsCache(tmp_path / "vllm").manifest.generation.engine == "vllm"
