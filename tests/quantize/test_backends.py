"""Backend registry and choice, and the guard's pure maths (no models)."""

from __future__ import annotations

import math

import pytest
import torch

from dspark.errors import DsparkError
from dspark.quantize import backends as B
from dspark.quantize.guard import fit_prompts, guard_verdict, position_acceptance

from tests.quantize.conftest import BUILTIN, DRAFT, need_builtins


class _Missing:
    """A backend whose library is not installed."""

    name = "missing-lib"
    methods = ("int8",)
    module = "dspark_test_no_such_module"
    requirement = "no-such-package==1.0"
    devices = ("cpu",)
    needs_calibration = False

    def quantize(self, request):  # pragma: no cover - never chosen
        raise AssertionError

    def load(self, folder, device, dtype):  # pragma: no cover
        raise AssertionError


@pytest.fixture
def missing_backend():
    B.register_backend(_Missing(), prefer_for=("int8",))
    yield B.BACKENDS["missing-lib"]
    B.unregister_backend("missing-lib")


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(DsparkError, match=r"unknown quantization method 'int3' \(valid: int8, int4, nf4, gptq4\)"):
        B.choose_backend("int3", "cpu")


def test_unknown_backend_lists_the_registry():
    with pytest.raises(DsparkError, match=r"unknown quantization backend 'awq' \(valid: torchao, quanto, "
                                          r"bitsandbytes, gptqmodel"):
        B.choose_backend("int8", "cpu", "awq")


def test_backend_that_lacks_the_method_names_those_that_have_it():
    with pytest.raises(DsparkError, match=r"backend quanto does not implement nf4 \(backends for nf4: bitsandbytes\)"):
        B.choose_backend("nf4", "cpu", "quanto")


def test_missing_library_is_one_line_naming_the_extra(missing_backend):
    with pytest.raises(DsparkError) as e:
        B.choose_backend("int8", "cpu", "missing-lib")
    assert "no-such-package==1.0" in str(e.value) and "pip install 'dspark[quant]'" in str(e.value)
    assert "\n" not in str(e.value)


def test_preference_skips_uninstalled_backends(missing_backend):
    assert B.PREFERENCES["int8"]["cpu"][0] == "missing-lib"
    installed = [n for n in B.PREFERENCES["int8"]["cpu"] if B.is_available(B.BACKENDS[n])]
    if not installed:
        pytest.skip("no int8 backend library is installed")
    assert B.choose_backend("int8", "cpu").name == installed[0] != "missing-lib"


def test_nothing_installed_names_every_option(monkeypatch):
    monkeypatch.setattr(B, "is_available", lambda b: False)
    with pytest.raises(DsparkError, match=r"int8 on cpu needs one of torchao==0.18.0, optimum-quanto==0.2.7, "
                                          r"bitsandbytes==0.50.2 \(not installed\): pip install 'dspark\[quant\]'"):
        B.choose_backend("int8", "cpu")
    with pytest.raises(DsparkError, match=r"gptq4 on cpu needs gptqmodel==7.6.0 \(not installed\)"):
        B.choose_backend("gptq4", "cpu")


def test_cuda_device_types_map():
    assert B.device_type("cuda:1") == "cuda" and B.device_type("cpu") == "cpu"


def test_gptq_group_size_divides_every_width():
    assert B.gptq_group_size({"hidden_size": 4096, "intermediate_size": 11008}) == 128
    assert B.gptq_group_size({"hidden_size": 4096, "intermediate_size": 11040}) == 32
    assert B.gptq_group_size({"hidden_size": 96, "intermediate_size": 256}) == 32
    assert B.gptq_group_size({"hidden_size": 100, "intermediate_size": 256}) == -1


def test_checkpoint_kind_detection(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert B.checkpoint_backend(tmp_path) is None and B.quantization_of(tmp_path) is None
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "gptq"}}')
    assert B.checkpoint_backend(tmp_path) == "gptqmodel" and B.quantization_of(tmp_path) == "gptq"
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "torchao"}}')
    assert B.checkpoint_backend(tmp_path) is None and B.quantization_of(tmp_path) == "torchao"
    (tmp_path / B.QUANTO_QMAP).write_text("{}")
    assert B.checkpoint_backend(tmp_path) == "quanto"


def test_register_rejects_non_backends_and_unknown_methods():
    with pytest.raises(DsparkError, match="is not a quantization backend"):
        B.register_backend(object())

    class Odd(_Missing):
        name = "odd"
        methods = ("int3",)

    with pytest.raises(DsparkError, match="claims unknown method 'int3'"):
        B.register_backend(Odd())
    B.unregister_backend("odd")


# -- the guard's maths -----------------------------------------------------------------------------------

def test_position_acceptance_identities():
    torch.manual_seed(0)
    logits = torch.randn(5, 11)
    acc, agree = position_acceptance(logits, logits.clone())
    assert torch.allclose(acc, torch.ones(5), atol=1e-6) and agree.eq(1).all()
    # disjoint supports: nothing is ever accepted
    big = torch.full((2, 4), -1e9)
    p, q = big.clone(), big.clone()
    p[:, 0], q[:, 1] = 0, 0
    acc, agree = position_acceptance(p, q)
    assert torch.allclose(acc, torch.zeros(2), atol=1e-6) and agree.eq(0).all()


def test_position_acceptance_equals_one_minus_tvd():
    p = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    q = torch.tensor([[math.log(0.2), math.log(0.3), math.log(0.5)]])
    acc, agree = position_acceptance(p, q)
    # sum min = 0.2 + 0.3 + 0.2; TVD = 0.3
    assert acc.item() == pytest.approx(0.7, abs=1e-6) and agree.item() == 0.0
    with pytest.raises(DsparkError, match="logit shapes differ"):
        position_acceptance(p, q[:, :2])


def test_guard_verdict():
    ok = guard_verdict(0.60, 0.58, 0.05)
    assert ok.passed and ok.drop == pytest.approx(0.02) and "ok" in ok.message
    bad = guard_verdict(0.60, 0.40, 0.05)
    assert not bad.passed and "ACCEPTANCE DROP" in bad.message and "0.600" in bad.message and "0.400" in bad.message
    assert guard_verdict(0.5, 0.6, 0.0).passed  # a gain is never flagged
    assert not guard_verdict(0.5, 0.449, 0.05).passed
    with pytest.raises(DsparkError, match="threshold must be in"):
        guard_verdict(0.5, 0.5, 1.5)


def test_fit_prompts_keeps_the_first_token():
    out = fit_prompts([[1, 2, 3, 4, 5, 6], [7, 8]], context=6, new_tokens=2)
    assert out == [[1, 4, 5, 6], [7, 8]]
    with pytest.raises(DsparkError, match="do not fit"):
        fit_prompts([[1]], context=4, new_tokens=3)


# -- bitsandbytes' AVX512-BF16 CPU kernel and the tiny drafts' shapes (no bitsandbytes needed) ------------

def test_bnb_cpu_kernel_shape_rule():
    # out_features in tiles of 32 rows, in_features in whole quantization blocks (64 by default)
    assert B.bnb_cpu_4bit_fits(96, 256) and B.bnb_cpu_4bit_fits(4096, 4096)
    assert not B.bnb_cpu_4bit_fits(96, 96)  # absmax [96 * 96 / 64] cannot be [96, 1]: the failure seen
    assert not B.bnb_cpu_4bit_fits(48, 128)
    assert B.bnb_cpu_4bit_fits(96, 96, blocksize=32)


def test_bnb_4bit_plan_keeps_misfits_and_the_default_skips():
    need_builtins(DRAFT)
    skip, misfits, fitting = B.bnb_4bit_plan(BUILTIN / DRAFT)
    assert sorted(fitting) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert fitting["model.layers.0.mlp.down_proj"] == (96, 256)
    assert len(misfits) == 12 and misfits["model.layers.1.self_attn.k_proj"] == (48, 96)
    # the tied output head stays unquantized: a user skip list replaces transformers' default one
    assert {"lm_head", "model.embed_tokens"} <= set(skip) and set(misfits) <= set(skip)
    assert not set(fitting) & set(skip)


def test_nf4_refuses_in_one_line_when_no_layer_fits(tmp_path):
    import json

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 40, "intermediate_size": 72,
           "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 128,
           "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    req = B.QuantRequest(source=tmp_path, out=tmp_path / "out", method="nf4", device="cpu", dtype=torch.float32)
    with pytest.raises(DsparkError) as e:
        B.BACKENDS["bitsandbytes"].config(req)
    msg = str(e.value)
    assert "\n" not in msg and "cannot quantize any linear layer" in msg and "out_features % 32 == 0" in msg
    assert "q_proj [40 x 40]" in msg and "--method int4" in msg


_CRASHING_TESTS = """
import os
import signal

from tests.common import isolated


@isolated
def test_native_crash():
    os.kill(os.getpid(), signal.SIGSEGV)


def test_after_it():
    pass
"""


def test_a_native_crash_fails_one_isolated_test_not_the_suite(tmp_path):
    import os
    import subprocess
    import sys

    from tests.common import CHILD_ENV, REPO

    (tmp_path / "test_crash.py").write_text(_CRASHING_TESTS)
    env = {k: v for k, v in os.environ.items() if k not in (CHILD_ENV, "PYTEST_CURRENT_TEST")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "pytest", "test_crash.py", "-q", "-o", "addopts=", "-p",
                           "no:cacheprovider"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # failures reported, the runner itself alive
    assert "1 failed, 1 passed" in proc.stdout
    assert "crashed the child process with SIGSEGV" in proc.stdout
