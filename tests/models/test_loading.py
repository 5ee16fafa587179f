import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from dspark.errors import DsparkError, ModelNotAvailableError
from dspark.models import DEVICES, DTYPES, is_offline, load_model, load_tokenizer
from dspark.models.loading import model_info

from .conftest import BUILTIN, STORIES, builtin_ready

LILY = "Once upon a time, there was a little girl named Lily"


def test_stories260k_loads_and_tells_its_story(stories):
    assert stories.resolved.kind == "local"
    assert not stories.model.training
    assert stories.dtype == "float32" and next(stories.model.parameters()).dtype == torch.float32
    assert (stories.vocab_size, stories.tokenizer_size) == (512, 512)
    assert stories.config.model_type == "llama"
    assert stories.num_parameters == sum(p.numel() for p in stories.model.parameters())
    bos = torch.tensor([[stories.tokenizer.bos_token_id]])
    out = stories.model.generate(bos, max_new_tokens=16, do_sample=False)
    text = stories.tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith(LILY), text


def test_load_in_bfloat16():
    m = load_model(str(STORIES), dtype="bfloat16")
    assert m.dtype == "bfloat16"
    assert {p.dtype for p in m.model.parameters()} == {torch.bfloat16}


def test_load_tokenizer_prepends_bos():
    tok = load_tokenizer(str(STORIES))
    ids = tok("Once upon a time").input_ids
    assert ids[0] == 1 and len(ids) > 1


@pytest.mark.parametrize("dtype", ["fp8", "float64", "half", ""])
def test_bad_dtype_lists_allowed_values(dtype):
    with pytest.raises(DsparkError) as e:
        load_model(str(STORIES), dtype=dtype)
    msg = str(e.value)
    assert repr(dtype) in msg and all(d in msg for d in DTYPES) and "\n" not in msg


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", "cuda:", "mps"])
def test_bad_device_lists_allowed_values(device):
    with pytest.raises(DsparkError) as e:
        load_model(str(STORIES), device=device)
    msg = str(e.value)
    assert repr(device) in msg and all(d in msg for d in DEVICES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_clear_error(device):
    with pytest.raises(DsparkError, match="CUDA is not available"):
        load_model(str(STORIES), device=device)


def test_auto_device_and_dtype_follow_the_machine():
    m = load_model(str(STORIES), device="auto", dtype="auto")
    if torch.cuda.is_available():
        assert m.device == "cuda" and m.dtype in ("bfloat16", "float16")
    else:
        assert (m.device, m.dtype) == ("cpu", "float32")
    assert str(next(m.model.parameters()).device).startswith(m.device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_out_of_range():
    with pytest.raises(DsparkError, match="does not exist"):
        load_model(str(STORIES), device=f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("name", ["llama3-70b", "qwen2.5-0.5b-instruct", "someone/private-model"])
def test_missing_model_is_one_line(name):
    with pytest.raises(ModelNotAvailableError) as e:
        load_model(name)
    msg = str(e.value)
    assert "\n" not in msg and "not available locally" in msg
    assert "pass a local folder path" in msg


def test_missing_alias_message_names_alias_and_hub_id():
    with pytest.raises(ModelNotAvailableError) as e:
        load_tokenizer("llama3-70b")
    assert str(e.value) == (
        "model 'llama3-70b' (meta-llama/Meta-Llama-3-70B) is not available locally: download it with "
        "`hf download meta-llama/Meta-Llama-3-70B` (needs network and access) or pass a local folder path")


def test_offline_flag_and_environment(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    assert not is_offline()
    # An explicit offline=True refuses before any hub call even with the environment online.
    with pytest.raises(ModelNotAvailableError):
        load_model("gemma2-2b", offline=True)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert is_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "ON")
    assert is_offline()


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))


class _Tripwire:
    """Unpickling this would create the marker file: proves the .bin was never unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bin_only_folder_is_refused_without_unpickling(tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(STORIES / f, folder / f)
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))
    for load in (load_model, load_tokenizer):
        with pytest.raises(DsparkError, match="safetensors only") as e:
            load(str(folder))
        assert "\n" not in str(e.value)
    assert not marker.exists()


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(DsparkError, match="no config.json"):
        load_model(str(tmp_path))
    shutil.copy(STORIES / "config.json", tmp_path / "config.json")
    with pytest.raises(DsparkError, match="no model.safetensors"):
        load_model(str(tmp_path))


def test_corrupt_safetensors_is_one_line(tmp_path):
    for f in STORIES.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(DsparkError) as e:
        load_model(str(tmp_path))
    assert "could not load the model" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(not builtin_ready("tiny-code-draft-s"), reason="tiny-code-draft-s not built")
def test_builtin_bf16_checkpoint_loads_as_float32():
    stored = json.loads((BUILTIN / "tiny-code-draft-s" / "config.json").read_text())
    assert stored.get("dtype", stored.get("torch_dtype")) == "bfloat16"
    m = load_model("tiny-code-draft-s")
    assert m.resolved.kind == "builtin"
    assert {p.dtype for p in m.model.parameters()} == {torch.float32}
    assert m.vocab_size == m.tokenizer_size == len(m.tokenizer)


def test_model_info(tmp_path):
    info = model_info(str(STORIES), load=True)
    assert (info["kind"], info["vocab_size"], info["architecture"]) == ("local", 512, "LlamaForCausalLM")
    assert len(info["tokenizer_hash"]) == 64
    assert model_info(str(STORIES))["available"] is True
    with pytest.raises(ModelNotAvailableError):
        model_info("mistral-7b")
