"""Data-parallel distillation: `torchrun --nproc_per_node 2 -m dspark distill` on CPU (gloo). Both
ranks train on disjoint halves of the cache; at the end every rank's weights digest is compared
(all_gather) and the run fails if they differ; rank 0 writes the outputs, which must hold exactly
those agreed weights (draft and acceptance head), changed by training.

The same run with `--deepspeed dspark/recipes/deepspeed-zero2.json` (ZeRO-2: optimizer state and
gradients partitioned across the two ranks) must train the same model: same losses and held-out
numbers step by step, same final weights up to float rounding."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dspark.distill.train import weights_digest
from tests.distill.helpers import REPO
from tests.distill.train_helpers import DRAFT, HELDOUT, TARGET, collect_small_cache, load_float32

ZERO2 = REPO / "dspark" / "recipes" / "deepspeed-zero2.json"


@pytest.fixture(scope="module")
def cache():
    """The shared small cache (collected once per test process)."""
    return collect_small_cache()


def _torchrun_distill(cache, out, *extra: str) -> dict:
    """Two gloo processes of `dspark distill --json`; returns the summary (stdout must be only it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dspark", "distill", "--target", TARGET, "--draft", DRAFT, "--cache", str(cache), "--out", str(out),
           "--epochs", "1", "--batch-size", "2", "--lr", "1e-3", "--heldout-percent", str(HELDOUT),
           "--acceptance-head", "--eval-prompts", "2", "--eval-max-new-tokens", "8", "--device", "cpu",
           "--dtype", "float32", "--json", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # rank 0 alone prints the summary, nothing else goes to stdout


def _history(draft_summary: dict) -> list[dict]:
    return json.loads((Path(draft_summary["path"]) / "dspark_distill.json").read_text())["history"]


@pytest.fixture(scope="module")
def ddp_run(cache, tmp_path_factory):
    return _torchrun_distill(cache, tmp_path_factory.mktemp("ddp") / "run")


def test_two_gloo_processes_train_and_agree(ddp_run, cache):
    from dspark.decode.acceptance_head import load_acceptance_head

    summary = ddp_run
    assert summary["world_size"] == 2
    (d,) = summary["drafts"]
    prov = d["provenance"]
    from dspark.distill.cache import LogitsCache

    lc = LogitsCache(cache)
    per_rank = lc.count_batches(2, "train", HELDOUT, world_size=2)
    assert prov["world_size"] == 2 and prov["steps"] == per_rank < lc.count_batches(2, "train", HELDOUT)
    assert prov["deepspeed_zero_stage"] is None
    # what rank 0 saved is what both ranks agreed on, and training moved it
    saved = load_float32(d["path"]).model
    head = load_acceptance_head(d["path"], saved.config.hidden_size)
    assert weights_digest(saved, head) == prov["weights_sha256"]
    assert weights_digest(saved) != weights_digest(load_float32(DRAFT).model)
    # one epoch split between two ranks: rank 0 read only its share of the training positions
    train_positions = sum(r.num_positions for r in lc.rows("train", HELDOUT))
    assert 0 < prov["positions_seen"] < train_positions


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (the `train` extra): the --deepspeed path "
                                            "cannot run")


@needs_deepspeed
def test_deepspeed_zero2_in_two_processes_matches_ddp(ddp_run, cache, tmp_path):
    from dspark.decode.acceptance_head import load_acceptance_head

    summary = _torchrun_distill(cache, tmp_path / "ds", "--deepspeed", str(ZERO2))
    assert summary["world_size"] == 2
    (d,) = summary["drafts"]
    (ref,) = ddp_run["drafts"]
    prov = d["provenance"]
    assert prov["deepspeed_zero_stage"] == 2 and prov["steps"] == ref["provenance"]["steps"] >= 2
    # rank 0 wrote the weights both ranks agreed on (ranks_agree all_gathers the digests in the run)
    saved = load_float32(d["path"]).model
    head = load_acceptance_head(d["path"], saved.config.hidden_size)
    assert weights_digest(saved, head) == prov["weights_sha256"]
    # ZeRO-2 is data parallelism with partitioned state: the same training as DDP, step by step
    hist, ref_hist = _history(d), _history(ref)
    assert [h["step"] for h in hist] == [h["step"] for h in ref_hist] and len(hist) >= 3
    for h, r in zip(hist, ref_hist):
        assert h.get("loss") == pytest.approx(r.get("loss"), abs=1e-4)
        assert h["objective"] == pytest.approx(r["objective"], abs=1e-4)
        assert h["expected_acceptance"] == pytest.approx(r["expected_acceptance"], abs=1e-4)
    ref_model = load_float32(ref["path"]).model
    ref_params = dict(ref_model.named_parameters())
    moved = 0.0
    base = dict(load_float32(DRAFT).model.named_parameters())
    for name, p in saved.named_parameters():
        assert torch.allclose(p, ref_params[name], atol=1e-5), name
        moved = max(moved, (p - base[name]).abs().max().item())
    assert moved > 1e-4  # and the weights did change
    # the training lowered the held-out objective and raised the expected acceptance
    assert hist[-1]["objective"] < hist[0]["objective"]
    assert hist[-1]["expected_acceptance"] > hist[0]["expected_acceptance"]


@needs_deepspeed
def test_deepspeed_checkpoints_hold_the_weights_and_resume(cache, tmp_path, monkeypatch):
    """One process (its own one-process group), ZeRO-2: interrupted after step 3, the checkpoint of
    step 2 holds the weights but no optimizer state (ZeRO partitions it); the re-run resumes there
    and its last checkpoint holds the weights it returns."""
    from safetensors.torch import load_file

    from dspark.distill import checkpoint as ckpt
    from dspark.distill import parallel
    from dspark.distill.cache import LogitsCache
    from dspark.distill.train import TrainConfig, train_draft

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("DS_ACCELERATOR", "cpu")):
        monkeypatch.setenv(key, value)  # what init_distributed / deepspeed would set, undone afterwards
    lc = LogitsCache(cache)
    ds = parallel.load_deepspeed_config(ZERO2)
    settings = TrainConfig(objective="fkl", steps=4, lr=2e-3, batch_size=4, heldout_percent=HELDOUT, eval_every=100,
                           checkpoint_every=2)

    class Killed(Exception):
        pass

    def die_at_3(step, total, info):
        if step == 3:
            raise Killed

    ctx = parallel.init_distributed("cpu", single_process_group=True)
    try:
        assert ctx is not None and ctx.world_size == 1
        with pytest.raises(Killed):
            train_draft(load_float32(DRAFT).model, lc, settings, tmp_path / "ck", vocab_size=4096, dist=ctx,
                        deepspeed_config=ds, progress=die_at_3)
        latest = ckpt.load_latest(tmp_path / "ck")
        assert latest is not None and latest.step == 2
        files = {p.name for p in latest.folder.iterdir()}
        assert ckpt.MODEL_FILE in files and ckpt.OPTIMIZER_FILE not in files
        logs: list[str] = []
        resumed = train_draft(load_float32(DRAFT).model, lc, settings, tmp_path / "ck", vocab_size=4096, dist=ctx,
                              deepspeed_config=ds, log=logs.append)
        assert resumed.resumed_from == 2 and resumed.steps == 4
        assert any("optimizer moments restart" in m for m in logs)
        final = ckpt.load_latest(tmp_path / "ck")
        assert final.step == 4
        saved = load_file(str(final.folder / ckpt.MODEL_FILE))
        base = dict(load_float32(DRAFT).model.named_parameters())
        for name, p in resumed.model.named_parameters():
            assert torch.equal(saved[name], p.detach()), name
        assert any(not torch.equal(p.detach(), base[n]) for n, p in resumed.model.named_parameters())
    finally:
        parallel.shutdown(ctx)
