import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from dspark.cli import app
from dspark.models import ALIASES, BUILTINS

from .conftest import REPO, STORIES, builtin_ready

runner = CliRunner()


def test_models_json_lists_aliases_and_builtins():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(ALIASES) | set(BUILTINS)
    for r in rows:
        assert {"name", "resolves_to", "available"} <= set(r)
        assert isinstance(r["available"], bool)
    assert by_name["llama3-70b"]["resolves_to"] == "meta-llama/Meta-Llama-3-70B"
    for name in BUILTINS:
        assert by_name[name]["available"] == builtin_ready(name)


def test_models_table():
    result = runner.invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("llama3-70b", "gemma2-2b", "tiny-code-draft-m", "meta-llama/Meta-Llama-3-70B"):
        assert name in result.stdout


def test_models_one_local_model_loaded():
    result = runner.invoke(app, ["models", str(STORIES), "--load", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["kind"], info["vocab_size"], info["dtype"], info["device"]) == ("local", 512, "float32", "cpu")


def test_missing_model_via_cli_is_one_line_exit_2():
    result = runner.invoke(app, ["models", "llama3-70b", "--load"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: model 'llama3-70b' (meta-llama/Meta-Llama-3-70B) is not available locally: "
                     "download it with `hf download meta-llama/Meta-Llama-3-70B` (needs network and access) "
                     "or pass a local folder path"]


def test_bad_dtype_via_cli():
    result = runner.invoke(app, ["models", str(STORIES), "--load", "--dtype", "fp8"])
    assert result.exit_code == 2
    assert "unknown dtype 'fp8'" in result.stderr and "Traceback" not in result.output


def test_missing_model_in_a_real_process(offline_hub):
    # The full `python -m dspark` path: real stderr, real exit code, offline, empty cache.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(offline_hub), "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-m", "dspark", "models", "qwen2.5-72b", "--load"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model 'qwen2.5-72b' (Qwen/Qwen2.5-72B)")
