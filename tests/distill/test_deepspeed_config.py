"""`--deepspeed CONFIG` validation and the settings dspark hands to `deepspeed.initialize` (pure
functions; deepspeed itself is not needed: its presence is faked). The 2-process ZeRO-2 run is in
test_train_ddp.py; the shipped recipe's `_command` is parsed by the real CLI parser here."""

import json
import shlex
from pathlib import Path

import pytest

from dspark.cli import app
from dspark.distill import parallel
from dspark.errors import DsparkError
from tests.distill.helpers import REPO

RECIPE = REPO / "dspark" / "recipes" / "deepspeed-zero2.json"


@pytest.fixture
def installed(monkeypatch):
    monkeypatch.setattr(parallel, "deepspeed_installed", lambda: True)


def _write(tmp_path: Path, cfg) -> Path:
    p = tmp_path / "ds.json"
    p.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return p


def test_recipe_loads_and_its_notes_are_dropped(installed):
    cfg = parallel.load_deepspeed_config(RECIPE)
    assert cfg["zero_optimization"]["stage"] == 2 and not any(k.startswith("_") for k in cfg)
    filled = parallel.deepspeed_settings(cfg, batch_size=4, world_size=2, grad_clip=1.0)
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["train_batch_size"] == 8
    assert filled["gradient_accumulation_steps"] == 1 and filled["gradient_clipping"] == 1.0
    assert "auto" not in json.dumps(filled)


def test_recipe_command_parses_with_the_cli():
    import typer.main

    words = shlex.split(json.loads(RECIPE.read_text())["_command"])
    i = words.index("dspark")
    assert words[:2] == ["torchrun", "--standalone"] and words[i - 1] == "-m" and words[i + 1] == "distill"
    cmd = typer.main.get_command(app).commands["distill"]
    params = cmd.make_context("distill", list(words[i + 2:])).params
    assert Path(params["deepspeed"]) == Path("dspark/recipes/deepspeed-zero2.json") and params["device"] == "cpu"


def test_user_values_are_kept_when_they_agree_and_refused_when_they_do_not():
    user = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 4, "gradient_clipping": 0.5}
    got = parallel.deepspeed_settings(user, batch_size=2, world_size=2, grad_clip=1.0)
    assert got["gradient_clipping"] == 0.5 and got["gradient_accumulation_steps"] == 1
    assert user == {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 4, "gradient_clipping": 0.5}
    with pytest.raises(DsparkError, match=r"train_batch_size = 4, this run needs 8 \(--batch-size 2 x 4 process"):
        parallel.deepspeed_settings(user, batch_size=2, world_size=4, grad_clip=1.0)
    with pytest.raises(DsparkError, match="train_micro_batch_size_per_gpu = 2, this run needs 8"):
        parallel.deepspeed_settings(user, batch_size=8, world_size=1, grad_clip=1.0)


@pytest.mark.parametrize("cfg, match", [
    ({"optimizer": {"type": "AdamW"}}, "has a 'optimizer' block"),
    ({"scheduler": {"type": "WarmupLR"}}, "has a 'scheduler' block"),
    ({"zero_optimization": {"stage": 3}}, r"ZeRO stage 3 is not supported \(valid: 0, 1, 2\)"),
    ({"zero_optimization": "2"}, "zero_optimization must be an object"),
    ({"gradient_accumulation_steps": 4}, r"gradient_accumulation_steps = 4.*valid: 1 or \"auto\""),
    ({"bf16": {"enabled": "auto"}}, r"leaves bf16.enabled \"auto\""),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offloads the optimizer to 'cpu'"),
    ([1, 2], "must be a JSON object"),
    ("{not json", "is not valid JSON"),
])
def test_bad_configs_are_one_line_errors(installed, tmp_path, cfg, match):
    with pytest.raises(DsparkError, match=match) as e:
        parallel.load_deepspeed_config(_write(tmp_path, cfg))
    assert "\n" not in str(e.value)


def test_offload_is_allowed_when_asked_for_explicitly(installed, tmp_path):
    cfg = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": False}
    assert parallel.load_deepspeed_config(_write(tmp_path, cfg)) == cfg


def test_missing_file(installed, tmp_path):
    with pytest.raises(DsparkError, match="does not exist"):
        parallel.load_deepspeed_config(tmp_path / "nope.json")
