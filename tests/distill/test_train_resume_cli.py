"""`dspark distill` killed with SIGKILL mid-training, then re-run with the same command: it resumes
from its last checkpoint (not from step 0), reuses the baseline measurement, and finishes with the
same outputs an uninterrupted run writes."""

import json
import os
import signal
import subprocess
import sys
import time

from tests.distill.train_helpers import DRAFT, HELDOUT, TARGET, collect_small_cache


def test_sigkill_then_rerun_resumes_from_the_checkpoint(tmp_path):
    cache = collect_small_cache()
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dspark", "distill", "--target", TARGET, "--draft", DRAFT, "--cache", str(cache),
           "--out", str(out), "--steps", "16", "--batch-size", "2", "--heldout-percent", str(HELDOUT),
           "--eval-prompts", "1", "--eval-max-new-tokens", "8", "--device", "cpu", "--dtype", "float32", "--json"]
    ck = out / "checkpoints" / DRAFT
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            latest = ck / "latest.json"
            if latest.is_file() and json.loads(latest.read_text())["step"] >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = json.loads((ck / "latest.json").read_text())["step"]
    assert 4 <= killed_at < 16 and (ck / "decoder_before.json").is_file()
    assert not (out / "drafts" / DRAFT).exists()  # nothing half-exported

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (d,) = json.loads(done.stdout[done.stdout.index("{"):])["drafts"]
    assert d["resumed_from"] is not None and d["resumed_from"] >= killed_at
    assert d["provenance"]["steps"] == 16
    hist = json.loads((out / "drafts" / DRAFT / "dspark_distill.json").read_text())["history"]
    steps = [h["step"] for h in hist]
    assert steps[0] == 0 and steps[-1] == 16 and steps == sorted(set(steps))  # one history, no restart
    assert (out / "candidates" / f"{DRAFT}.yaml").is_file() and not ck.exists()
