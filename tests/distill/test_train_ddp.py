"""Data-parallel distillation: `torchrun --nproc_per_node 2 -m dspark distill` on CPU (gloo). Both
ranks train on disjoint halves of the cache; at the end every rank's weights digest is compared
(all_gather) and the run fails if they differ; rank 0 writes the outputs, which must hold exactly
those agreed weights (draft and acceptance head), changed by training."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dspark.distill.train import weights_digest
from tests.distill.train_helpers import DRAFT, HELDOUT, TARGET, collect_small_cache, load_float32


@pytest.fixture(scope="module")
def cache():
    """The shared small cache (collected once per test process)."""
    return collect_small_cache()


def test_two_gloo_processes_train_and_agree(tmp_path, cache):
    from dspark.decode.acceptance_head import load_acceptance_head

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dspark", "distill", "--target", TARGET, "--draft", DRAFT, "--cache", str(cache), "--out", str(out),
           "--epochs", "1", "--batch-size", "2", "--lr", "3e-3", "--heldout-percent", str(HELDOUT),
           "--acceptance-head", "--eval-prompts", "2", "--eval-max-new-tokens", "8", "--device", "cpu",
           "--dtype", "float32", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])  # rank 0 alone prints the summary
    assert summary["world_size"] == 2
    (d,) = summary["drafts"]
    prov = d["provenance"]
    from dspark.distill.cache import LogitsCache

    lc = LogitsCache(cache)
    per_rank = lc.count_batches(2, "train", HELDOUT, world_size=2)
    assert prov["world_size"] == 2 and prov["steps"] == per_rank < lc.count_batches(2, "train", HELDOUT)
    # what rank 0 saved is what both ranks agreed on, and training moved it
    saved = load_float32(d["path"]).model
    head = load_acceptance_head(d["path"], saved.config.hidden_size)
    assert weights_digest(saved, head) == prov["weights_sha256"]
    assert weights_digest(saved) != weights_digest(load_float32(DRAFT).model)
    # one epoch split between two ranks: rank 0 read only its share of the training positions
    train_positions = sum(r.num_positions for r in lc.rows("train", HELDOUT))
    assert 0 < prov["positions_seen"] < train_positions
