"""vLLM-named speculative metrics: the per-request fields of the `speculative` block and the
`vllm:spec_decode_*` Prometheus counters, read back with prometheus_client's own text parser."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dspark.decode.types import DecodeStats
from dspark.serve.metrics import (ServerMetrics, acceptance_histogram, merge_spec_decode_metrics,
                                  spec_decode_request_metrics)

MODEL = "tiny-pair"
VLLM_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens_per_pos")


def _stats(steps: list[tuple[int, int]]) -> DecodeStats:
    """DecodeStats of verify steps given as (drafted, accepted), counted the way the decoder counts
    them (every drafted position; accepted ones are a prefix)."""
    st = DecodeStats()
    for d, a in steps:
        for j in range(d):
            st.record_position(j, j < a)
        st.drafted += d
        st.accepted += a
        st.verify_steps += 1
    return st


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_histogram_and_request_fields_follow_vllm_definitions():
    # 5 verify steps: one drafted nothing (a plain target step), four drafted 3, 3, 2, 4
    st = _stats([(0, 0), (3, 0), (3, 3), (2, 1), (4, 2)])
    assert acceptance_histogram(st.drafted_per_position, st.accepted_per_position) == [1, 1, 1, 1, 0]
    m = spec_decode_request_metrics(st.drafted_per_position, st.accepted_per_position)
    assert m["num_spec_steps"] == 4  # the step without drafts is not a "draft" (vLLM omits it)
    assert m["num_draft_tokens"] == 12 and m["num_accepted_draft_tokens"] == 6
    assert m["mean_acceptance_length"] == pytest.approx(1 + 6 / 4)
    assert m["draft_acceptance_rate"] == pytest.approx(0.5)
    assert m["accepted_per_position"] == [3, 2, 1, 0]
    assert sum(m["acceptance_histogram"]) == m["num_spec_steps"]
    nothing = spec_decode_request_metrics([], [])
    assert nothing["acceptance_histogram"] == [0] and nothing["mean_acceptance_length"] == 1.0


def test_merged_choices_equal_the_pooled_stats():
    a, b = _stats([(2, 2), (4, 1)]), _stats([(1, 0), (3, 3), (3, 2)])
    parts = [spec_decode_request_metrics(s.drafted_per_position, s.accepted_per_position) for s in (a, b)]
    pooled = a.merge(b)
    assert merge_spec_decode_metrics(parts) == spec_decode_request_metrics(pooled.drafted_per_position,
                                                                           pooled.accepted_per_position)
    assert set(merge_spec_decode_metrics([parts[0], {"partial": True}]).values()) == {None}


def test_counters_parse_with_vllm_names_and_labels():
    m = ServerMetrics("auto", model_name="my-bundle")
    empty = _families(m.render())
    for name in VLLM_COUNTERS:
        assert empty[name].type == "counter"
    assert [s.value for s in empty["vllm:spec_decode_num_drafts"].samples] == [0]  # present before any request
    requests = [_stats([(3, 1), (3, 3), (0, 0)]), _stats([(2, 0), (5, 4)])]
    for st in requests:
        m.observe_spec_decode(st.drafted_per_position, st.accepted_per_position)
    fams = _families(m.render())
    labels = {"model_name": "my-bundle", "engine": "0"}
    one = {name: fams[name].samples for name in VLLM_COUNTERS}
    for name in VLLM_COUNTERS[:3]:
        (sample,) = one[name]
        assert sample.name == name + "_total" and sample.labels == labels
    per_request = [spec_decode_request_metrics(s.drafted_per_position, s.accepted_per_position) for s in requests]
    value = {name: one[name][0].value for name in VLLM_COUNTERS[:3]}
    assert value["vllm:spec_decode_num_drafts"] == sum(r["num_spec_steps"] for r in per_request) == 4
    assert value["vllm:spec_decode_num_draft_tokens"] == 13
    assert value["vllm:spec_decode_num_accepted_tokens"] == 8
    per_pos = {s.labels["position"]: s.value for s in one["vllm:spec_decode_num_accepted_tokens_per_pos"]}
    assert all(s.labels.items() >= labels.items() for s in one["vllm:spec_decode_num_accepted_tokens_per_pos"])
    assert per_pos == {"0": 3, "1": 2, "2": 2, "3": 1, "4": 0}
    # vLLM's documented PromQL: mean acceptance length = 1 + accepted / drafts
    assert 1 + value["vllm:spec_decode_num_accepted_tokens"] / value["vllm:spec_decode_num_drafts"] == 3.0
    # the dspark_* series parse with the same parser
    assert fams["dspark_requests"].type == "counter" and fams["dspark_request_latency_seconds"].type == "histogram"


@pytest.fixture(scope="module")
def static_runtime(tmp_path_factory):
    """The serve fixtures' pair exported with a static draft length: `auto` may decide from measured
    costs that plain target steps are faster and draft nothing, and this test needs drafts to count."""
    from dspark.bundle.export import export_bundle
    from dspark.serve.runtime import runtime_from_bundle
    from tests.common import offline_env
    from tests.serve.conftest import DRAFT, TARGET, _need_pair

    _need_pair()
    out = tmp_path_factory.mktemp("vllm-metrics") / "bundle"
    with offline_env():
        export_bundle(out, target=TARGET, draft=DRAFT, name=MODEL, draft_length=2)
        return runtime_from_bundle(out, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def vllm_server(static_runtime):
    from dspark.serve.app import create_app
    from dspark.serve.runner import start_in_thread

    running = start_in_thread(create_app(static_runtime, max_batch_size=4), "127.0.0.1", 0)
    yield running
    running.stop()


def test_live_scrape_reconciles_with_per_request_fields(vllm_server):
    from openai import OpenAI

    client = OpenAI(base_url=vllm_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    specs = [client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0).speculative
             for p in ("def add(a, b):", "class Stack:\n")]
    specs.append(client.completions.create(model=MODEL, prompt="x = [", max_tokens=8, temperature=0.8, seed=3,
                                           n=1).speculative)
    for s in specs:
        assert s["num_draft_tokens"] == s["drafted"] and s["num_accepted_draft_tokens"] == s["accepted"]
        assert s["draft_acceptance_rate"] == pytest.approx(s["acceptance_rate"])
        assert sum(s["acceptance_histogram"]) == s["num_spec_steps"] <= s["verify_steps"]
        assert s["mean_acceptance_length"] == pytest.approx(
            1 + s["accepted"] / s["num_spec_steps"] if s["num_spec_steps"] else 1.0)
    assert sum(s["num_draft_tokens"] for s in specs) > 0
    fams = _families(httpx.get(vllm_server.base_url + "/metrics").text)
    labels = {"model_name": MODEL, "engine": "0"}

    def total(name):
        (sample,) = fams[name].samples
        assert sample.labels == labels
        return sample.value

    assert total("vllm:spec_decode_num_drafts") == sum(s["num_spec_steps"] for s in specs)
    assert total("vllm:spec_decode_num_draft_tokens") == sum(s["num_draft_tokens"] for s in specs)
    assert total("vllm:spec_decode_num_accepted_tokens") == sum(s["num_accepted_draft_tokens"] for s in specs)
    per_pos = {int(x.labels["position"]): x.value for x in fams["vllm:spec_decode_num_accepted_tokens_per_pos"].samples}
    width = max(len(s["accepted_per_position"]) for s in specs)
    assert per_pos == {i: sum(s["accepted_per_position"][i] for s in specs if i < len(s["accepted_per_position"]))
                       for i in range(width)}
