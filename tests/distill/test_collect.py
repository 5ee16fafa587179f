"""Collection: the cache holds the target's own continuations and its distributions; resumes after
SIGKILL to the same cache; shards merge to the unsharded cache; bad input fails early and clearly."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dspark.cli import app
from dspark.distill.cache import MANIFEST, LogitsCache, merge_caches, read_manifest
from dspark.distill.collect import (collect, get_engine_class, parse_shard, prompt_seed,
                                    target_from_model)
from dspark.errors import DataError, DsparkError
from tests.distill.helpers import REPO, STOP, STORIES, story_prompts

runner = CliRunner()
SMALL = dict(k=8, max_new_tokens=10, stop_token_ids=STOP)


def rows_by_id(path):
    return {r.prompt_id: r for r in LogitsCache(path).rows()}


def assert_same_rows(a, b, exact=True):
    assert a.keys() == b.keys()
    for pid in a:
        x, y = a[pid], b[pid]
        assert x.prompt_index == y.prompt_index
        for f in ("prompt_ids", "continuation_ids", "topk_ids", "topk_logprobs", "tail"):
            if exact or f in ("prompt_ids", "continuation_ids"):
                assert np.array_equal(getattr(x, f), getattr(y, f)), (pid, f)
            else:
                assert np.allclose(getattr(x, f).astype(np.float32), getattr(y, f).astype(np.float32), atol=1e-2)


def test_greedy_continuation_is_the_targets_own_generate(tmp_path, stories_model, stories_target):
    model, tok = stories_model
    prompts = story_prompts(6)
    res = collect(stories_target, prompts, tmp_path / "c", batch_size=4, prompts_per_part=4, **SMALL)
    assert res.status == "collected" and res.new_rows == 6
    cache = LogitsCache(tmp_path / "c")
    assert cache.manifest.generation.k == 8 and cache.manifest.target.name == "stories260K"
    for row in cache.rows():
        ref = model.generate(torch.tensor([row.prompt_ids.tolist()]), max_new_tokens=10, do_sample=False,
                             eos_token_id=STOP, pad_token_id=0)[0, len(row.prompt_ids):].tolist()
        assert row.continuation_ids.tolist() == ref, row.prompt_id
        # the stored distributions are the target's, at the right positions: direct unpadded forward
        seq = torch.tensor([row.prompt_ids.tolist() + row.continuation_ids.tolist()])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits[0].float(), -1)
        p = len(row.prompt_ids)
        want = logp[p - 1:p - 1 + row.num_positions]
        got_ids = torch.from_numpy(row.topk_ids.astype(np.int64))
        assert torch.allclose(want.gather(-1, got_ids), torch.from_numpy(row.topk_logprobs.astype(np.float32)),
                              atol=1e-2)
        assert torch.allclose(want.topk(8, -1).values, torch.from_numpy(row.topk_logprobs.astype(np.float32)),
                              atol=1e-2)
        assert np.all(np.diff(row.topk_logprobs.astype(np.float32), axis=-1) <= 0)
        assert np.allclose(np.exp(row.topk_logprobs.astype(np.float64)).sum(-1) + row.tail, 1.0, atol=5e-3)
        assert np.array_equal(row.topk_ids[:, 0], row.continuation_ids)  # greedy: top-1 is the next token


def test_sampling_is_seeded_per_prompt(tmp_path, stories_target):
    prompts = story_prompts(5)
    args = dict(k=4, max_new_tokens=8, temperature=1.0, stop_token_ids=STOP)
    collect(stories_target, prompts, tmp_path / "b1", batch_size=1, seed=7, **args)
    collect(stories_target, prompts, tmp_path / "b3", batch_size=3, seed=7, **args)
    collect(stories_target, prompts, tmp_path / "s8", batch_size=3, seed=8, **args)
    a, b, c = rows_by_id(tmp_path / "b1"), rows_by_id(tmp_path / "b3"), rows_by_id(tmp_path / "s8")
    # the batch composition does not change what a prompt samples
    assert all(a[p].continuation_ids.tolist() == b[p].continuation_ids.tolist() for p in a)
    assert any(a[p].continuation_ids.tolist() != c[p].continuation_ids.tolist() for p in a)
    assert prompt_seed(7, "x") == prompt_seed(7, "x") != prompt_seed(8, "x")


CHILD = """
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer
import dspark.distill.cache as cache_module
from dspark.distill.collect import collect, target_from_model
from tests.distill.helpers import STOP, STORIES, story_prompts
model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32)
target = target_from_model(model, AutoTokenizer.from_pretrained(str(STORIES)), name="stories260K")
real_write, parts = cache_module.atomic_write_bytes, []
def write_then_die(path, data):
    # Two parts commit; the third dies with SIGKILL half-way through writing its temp file.
    parts.append(path)
    if len(parts) == 3:
        Path(path).parent.joinpath("." + Path(path).name + ".x1y2.tmp").write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(path, data)
cache_module.atomic_write_bytes = write_then_die
collect(target, story_prompts(8), sys.argv[1], k=8, max_new_tokens=10, stop_token_ids=STOP, batch_size=2,
        prompts_per_part=2)
"""


def test_resume_after_sigkill_gives_the_same_cache(tmp_path, stories_target):
    """A real SIGKILL (the child kills itself mid-write of its third part, so no timing is
    involved), then the same collect call finishes it: byte-identical to an uninterrupted run."""
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, "-c", CHILD, str(out)], cwd=REPO, env=env, capture_output=True,
                           timeout=1800)  # a guard against a hung child only
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    assert read_manifest(out).status == "collecting"
    written = len(list((out / "data").glob("*.parquet")))
    assert written == 2 and len(list((out / "data").glob(".*.tmp"))) == 1
    with pytest.raises(DataError, match="incomplete"):
        LogitsCache(out)

    args = dict(k=8, max_new_tokens=10, stop_token_ids=STOP, batch_size=2, prompts_per_part=2)
    res = collect(stories_target, story_prompts(8), out, **args)
    assert res.status == "resumed" and res.chunks_done_before == written and res.new_rows == 8 - 2 * written
    assert not list((out / "data").glob(".*.tmp"))
    ref = collect(stories_target, story_prompts(8), tmp_path / "whole", **args)
    assert_same_rows(rows_by_id(out), rows_by_id(tmp_path / "whole"))
    # byte-identical parts, identical manifests
    assert [p.sha256 for p in LogitsCache(out).manifest.parts] == [p.sha256 for p in ref.manifest.parts]
    assert json.loads((out / MANIFEST).read_text()) == json.loads((tmp_path / "whole" / MANIFEST).read_text())


def test_resume_cleans_temp_files_and_rebuilds_lost_sidecars(tmp_path, stories_target):
    args = dict(batch_size=2, prompts_per_part=2, **SMALL)
    out = tmp_path / "c"
    collect(stories_target, story_prompts(4), out, **args)
    m = json.loads((out / MANIFEST).read_text())
    m["status"] = "collecting"  # as if killed before the final manifest
    (out / MANIFEST).write_text(json.dumps(m))
    part = out / m["parts"][0]["file"]
    os.unlink(str(part) + ".json")  # as if killed between the part's rename and its sidecar's
    (out / "data" / ".s00000-of-00001-c000001.parquet.abc.tmp").write_bytes(b"half a part")
    res = collect(stories_target, story_prompts(4), out, **args)
    assert res.status == "resumed" and res.new_rows == 0 and res.chunks_done_before == 2
    assert not list((out / "data").glob(".*.tmp"))
    assert LogitsCache(out).manifest.parts[0].sha256 == m["parts"][0]["sha256"]


def test_complete_cache_is_not_redone(tmp_path, stories_target):
    out = tmp_path / "c"
    collect(stories_target, story_prompts(3), out, **SMALL)
    before = (out / MANIFEST).read_bytes()
    res = collect(stories_target, story_prompts(3), out, **SMALL)
    assert res.status == "already-complete" and res.new_rows == 0
    assert (out / MANIFEST).read_bytes() == before


def test_arguments_mismatch_is_a_data_error(tmp_path, stories_model, stories_target):
    out = tmp_path / "c"
    collect(stories_target, story_prompts(3), out, **SMALL)
    with pytest.raises(DataError, match="generation.k: cache has 8, this run 16"):
        collect(stories_target, story_prompts(3), out, **{**SMALL, "k": 16})
    with pytest.raises(DataError, match="source"):
        collect(stories_target, story_prompts(4), out, **SMALL)
    with pytest.raises(DataError, match="shard: cache has '0/1', this run '0/2'"):
        collect(stories_target, story_prompts(3), out, shard="0/2", **SMALL)
    model, tok = stories_model
    other = type(model)(model.config)  # same architecture, different (random) weights
    with pytest.raises(DataError, match="target.weight_hash"):
        collect(target_from_model(other, tok, name="stories260K"), story_prompts(3), out, **SMALL)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(DsparkError, match="not a logits cache"):
        collect(stories_target, story_prompts(3), tmp_path / "junk", **SMALL)


def test_shards_merge_to_the_unsharded_cache(tmp_path, stories_target):
    prompts = story_prompts(7)
    args = dict(batch_size=1, prompts_per_part=2, **SMALL)  # batch 1: no padding, identical numerics
    whole = collect(stories_target, prompts, tmp_path / "whole", **args)
    s0 = collect(stories_target, prompts, tmp_path / "s0", shard="0/2", **args)
    s1 = collect(stories_target, prompts, tmp_path / "s1", shard=(1, 2), **args)
    assert s0.manifest.counts.rows == 4 and s1.manifest.counts.rows == 3
    assert s0.manifest.source.prompts_sha256 == whole.manifest.source.prompts_sha256
    merged = merge_caches([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    assert merged.counts.positions == whole.manifest.counts.positions
    assert_same_rows(rows_by_id(tmp_path / "merged"), rows_by_id(tmp_path / "whole"))
    with pytest.raises(DataError, match="missing"):
        merge_caches([tmp_path / "s0"], tmp_path / "m2")


def test_batched_and_unbatched_agree(tmp_path, stories_target):
    prompts = story_prompts(5)
    collect(stories_target, prompts, tmp_path / "b1", batch_size=1, **SMALL)
    collect(stories_target, prompts, tmp_path / "b5", batch_size=5, **SMALL)
    assert_same_rows(rows_by_id(tmp_path / "b1"), rows_by_id(tmp_path / "b5"), exact=False)


def test_bad_options_fail_before_work(tmp_path, stories_target):
    for kwargs, match in [({"k": 0}, "top-k must be >= 1"), ({"k": 600}, "larger than the target's vocabulary"),
                          ({"max_new_tokens": 0}, "max-new-tokens"), ({"temperature": -1.0}, "temperature"),
                          ({"batch_size": 0}, "batch-size"), ({"shard": "2/2"}, "bad shard 2/2"),
                          ({"shard": "x"}, "bad shard 'x'"), ({"engine": "trt"}, "valid engines: hf, vllm"),
                          ({"max_new_tokens": 600}, "does not fit the target's context of 512")]:
        with pytest.raises(DsparkError, match=match):
            collect(stories_target, story_prompts(2), tmp_path / "c", **{**SMALL, **kwargs})
    with pytest.raises(DataError, match="no prompts"):
        collect(stories_target, [], tmp_path / "c", **SMALL)
    assert not (tmp_path / "c").exists()
    assert parse_shard("1/3") == (1, 3)


def test_vllm_engine_needs_vllm():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here; this test checks the error without it")
    with pytest.raises(DsparkError, match="needs the vllm package.*valid engines: hf, vllm"):
        get_engine_class("vllm")


# -- CLI -----------------------------------------------------------------------------------------

def test_cli_offline_70b_fails_at_once(tmp_path):
    out = tmp_path / "c"
    result = runner.invoke(app, ["collect", "--target", "llama3-70b", "--task", "code", "--out", str(out)])
    assert result.exit_code == 2
    assert "error:" in result.output and "llama3-70b" in result.output and "not available" in result.output
    assert not out.exists()


def test_cli_out_file_fails_before_loading_and_ctrl_c_says_resume(tmp_path, monkeypatch):
    """--out naming a file was found only after the target had loaded; Ctrl-C printed "Aborted!"."""
    import dspark.distill.collect as collect_mod

    def must_not_load(*_a, **_k):
        raise AssertionError("loaded the target before checking --out")

    monkeypatch.setattr(collect_mod, "load_target", must_not_load)
    f = tmp_path / "cache.txt"
    f.write_text("keep")
    res = runner.invoke(app, ["collect", "--target", str(STORIES), "--task", "code", "--out", str(f)])
    assert res.exit_code == 2 and f"--out {str(f)!r} is a file" in res.output and f.read_text() == "keep"

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(collect_mod, "run_collect", interrupted)
    out = tmp_path / "c"
    res = runner.invoke(app, ["collect", "--target", str(STORIES), "--task", "code", "--out", str(out)])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 130 and len(lines) == 1, res.output
    assert f"interrupted: {out} keeps the work finished so far; run the same command again to resume" == lines[0]


def test_cli_collect_json_resume_and_mismatch(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": s}) + "\n"
                            for i, s in enumerate(["Once upon a time", "The dog", "A little bird", "Sam and Mia",
                                                   "The sun was", "There was a", "Tom saw a big", "One day, a"])))
    out = tmp_path / "c"
    base = ["collect", "--target", str(STORIES), "--data", str(data), "--out", str(out), "--split", "all",
            "--max-new-tokens", "6", "--top-k", "4", "--batch-size", "4", "--device", "cpu", "--dtype", "float32"]
    result = runner.invoke(app, base + ["--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "collected" and summary["rows"] == 8 and summary["k"] == 4
    assert summary["bytes_per_position"] > 0 and summary["tokens_per_s"] > 0
    assert "storage estimate" in result.output
    cache = LogitsCache(out)
    assert cache.manifest.source.data == str(data) and cache.manifest.target.kind == "local"
    assert cache.manifest.target.weight_hash and len(cache.manifest.tokenizer_hash) == 64
    again = runner.invoke(app, base + ["--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["status"] == "already-complete"
    bad = runner.invoke(app, base[:-4] + ["--top-k", "5", "--device", "cpu", "--dtype", "float32"])
    assert bad.exit_code == 2 and "different arguments" in bad.output and "generation.k" in bad.output
    vllm = runner.invoke(app, base + ["--engine", "vllm"])
    assert vllm.exit_code == 2 and "vllm" in vllm.output


def test_cli_shard_and_merge(tmp_path):
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(["Once upon a time", "The dog", "A little bird", "Sam and Mia", "The sun was"]) + "\n")
    common = ["--target", str(STORIES), "--data", str(data), "--split", "all", "--max-new-tokens", "4",
              "--top-k", "4", "--device", "cpu", "--dtype", "float32"]
    for i in range(2):
        r = runner.invoke(app, ["collect", *common, "--out", str(tmp_path / f"s{i}"), "--shard", f"{i}/2"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["merge-caches", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                            str(tmp_path / "m"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"] == 5 and len(LogitsCache(tmp_path / "m")) == 5
    bad = runner.invoke(app, ["collect", *common, "--out", str(tmp_path / "x"), "--shard", "2/2"])
    assert bad.exit_code == 2 and "bad shard" in bad.output


def test_cli_collect_code_task_uses_the_train_split(tmp_path):
    from dspark.distill.collect import safetensors_hash
    from dspark.models.registry import builtin_path
    from dspark.tasks import resolve_prompts

    folder = builtin_path("tiny-code-draft-s")
    if not folder.is_dir():
        pytest.skip("built-in tiny-code-draft-s is not built here")
    out = tmp_path / "c"
    r = runner.invoke(app, ["collect", "--target", "tiny-code-draft-s", "--task", "code", "--num-prompts", "3",
                            "--max-new-tokens", "4", "--top-k", "4", "--device", "cpu", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    m = LogitsCache(out).manifest
    assert (m.source.task, m.source.split, m.source.num_prompts) == ("code", "train", 3)
    assert m.target.kind == "builtin" and m.target.weight_hash == safetensors_hash(folder)
    assert m.generation.dtype == "float32"
    want = [p.id for p in resolve_prompts("code", None, "train", 3)]
    assert [row.prompt_id for row in LogitsCache(out).rows()] == want


def test_cli_empty_data_and_unknown_task_fail_without_writing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "c"
    for source in (["--data", str(empty)], ["--task", "nope"]):
        r = runner.invoke(app, ["collect", "--target", str(STORIES), *source, "--out", str(out), "--device", "cpu"])
        assert r.exit_code == 2 and "error:" in r.output, r.output
    assert not out.exists()
