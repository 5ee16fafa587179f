"""Shared fixtures for distill tests: offline, one CPU thread (the machine has 2 cores shared with
other jobs; oversubscribed threads make tiny models dozens of times slower), the stories260K model
as the target."""

from __future__ import annotations

import pytest

from tests.distill.helpers import STORIES


@pytest.fixture(autouse=True)
def offline_one_thread(monkeypatch, tmp_path_factory):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def stories_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(STORIES))


@pytest.fixture(scope="session")
def stories_target(stories_model):
    from dspark.distill.collect import target_from_model

    return target_from_model(*stories_model, name="stories260K")
