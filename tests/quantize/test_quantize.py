"""`dspark quantize` end to end on the built-in family: each backend whose library is installed
(tests skip only when it is not importable), the written checkpoint reloads and decodes losslessly,
the candidate file is valid, and the acceptance guard flags a broken draft."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dspark.cli import app
from dspark.config.candidate import load_candidate, resolve_relative
from dspark.errors import DsparkError
from dspark.quantize import backends as B
from dspark.quantize.loading import is_quantized_linear
from dspark.quantize.run import CANDIDATE_FILE, QuantizeOptions, quantize_draft

from tests.common import isolated
from tests.quantize.conftest import BUILTIN, DRAFT, TARGET, have, need_builtins

runner = CliRunner()
GUARD = {"guard_prompts": 2, "guard_tokens": 8}


def _logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def _lossless(draft_model, n_tokens: int = 8) -> None:
    """Greedy speculative decoding with the quantized draft equals the target's own greedy output."""
    from dspark.decode import GenerationConfig, SpeculativeDecoder
    from dspark.models import load_model

    t = load_model(TARGET)
    ids = [t.tokenizer("def main():\n    ")["input_ids"]]
    cfg = GenerationConfig(max_new_tokens=n_tokens, ignore_eos=True)
    want = SpeculativeDecoder(t.model, None, t.tokenizer).generate(ids, cfg)[0].token_ids
    dec = SpeculativeDecoder(t.model, draft_model, t.tokenizer, "3")
    # the fused fast path would read quantized weights as dense matrices: it must not be taken
    assert dec.draft.lean is None and dec.target.lean is not None
    got = dec.generate(ids, cfg)[0]
    assert got.token_ids == want
    assert got.stats.drafted > 0


@pytest.fixture(scope="module")
def source():
    need_builtins(TARGET, DRAFT)
    from dspark.models import load_model

    d = load_model(DRAFT)
    ids = d.tokenizer("import os\nclass A:\n    def f(self")["input_ids"]
    return d, ids


@pytest.mark.skipif(not have("optimum.quanto"), reason="optimum-quanto is not installed")
@isolated
def test_quanto_int8_with_guard(tmp_path, source):
    from dspark.models import load_model
    from dspark.quantize.loading import has_quantized_linears, load_draft

    out = tmp_path / "s-int8"
    r = quantize_draft(out, QuantizeOptions(method="int8", backend="quanto", target=TARGET, **GUARD), draft=DRAFT)
    assert r.backend == "quanto" and r.backend_reason == "--backend quanto"
    assert {"quanto.safetensors", B.QUANTO_QMAP, "config.json", "tokenizer.json", CANDIDATE_FILE} <= \
        {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".s-int8.tmp-*"))  # built aside, renamed into place
    cand = load_candidate(out / CANDIDATE_FILE)
    assert cand.quantization == "int8" and cand.target == TARGET and cand.name == f"{DRAFT}-int8"
    assert resolve_relative(cand.draft, out / CANDIDATE_FILE) == str(out.resolve())
    m = cand.measured
    assert m.guard_passed is True and not cand.warnings
    assert m.expected_acceptance_before is not None and abs(m.acceptance_drop) < 0.05
    assert m.guard_positions == 2 * 8
    assert m.memory_mb < m.memory_mb_before and m.size_on_disk_mb < m.size_on_disk_mb_before
    assert cand.provenance.backend == "quanto" and cand.provenance.source_draft == DRAFT

    d, ids = source
    q = load_draft(str(out))
    assert q.tokenizer_size == d.tokenizer_size
    assert has_quantized_linears(q.model) and not has_quantized_linears(d.model)
    diff = (_logits(q.model, ids) - _logits(d.model, ids)).abs().max().item()
    assert 0 < diff < 0.5  # quantized: close to the original, not identical
    _lossless(q.model)
    # the weights file is not model.safetensors, so a plain load fails loudly instead of initialising at random
    with pytest.raises(DsparkError, match="no model.safetensors"):
        load_model(str(out))


@pytest.mark.skipif(not have("optimum.quanto"), reason="optimum-quanto is not installed")
def test_quanto_int4_is_smaller_than_int8(tmp_path, source):
    from dspark.quantize.loading import load_draft, model_bytes

    r4 = quantize_draft(tmp_path / "i4", QuantizeOptions(method="int4", target=None), draft=DRAFT)
    assert r4.backend == "quanto"  # the only int4 backend on CPU
    assert "no --target: acceptance guard skipped" in r4.notes and r4.verdict is None
    r8 = quantize_draft(tmp_path / "i8", QuantizeOptions(method="int8", backend="quanto"), draft=DRAFT)
    assert r4.memory_bytes < r8.memory_bytes
    q4 = load_draft(str(tmp_path / "i4"))
    assert model_bytes(q4.model) == r4.memory_bytes
    _lossless(q4.model)


@pytest.mark.skipif(not have("torchao"), reason="torchao is not installed")
def test_torchao_int8_loads_with_plain_transformers(tmp_path, source):
    from dspark.models import load_model

    out = tmp_path / "ao"
    r = quantize_draft(out, QuantizeOptions(method="int8", backend="torchao"), draft=DRAFT)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "torchao"
    m = load_model(str(out))  # no dspark-specific loader needed
    d, ids = source
    assert (_logits(m.model, ids) - _logits(d.model, ids)).abs().max().item() < 0.5
    assert r.memory_bytes < r.memory_bytes_before
    _lossless(m.model)


@pytest.mark.skipif(not have("bitsandbytes"), reason="bitsandbytes is not installed")
@pytest.mark.parametrize("method", ["nf4", "int8"])
@isolated
def test_bitsandbytes(tmp_path, source, method):
    from dspark.quantize.loading import has_quantized_linears, load_draft

    out = tmp_path / method
    r = quantize_draft(out, QuantizeOptions(method=method, backend="bitsandbytes"), draft=DRAFT)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    q = load_draft(str(out))
    assert r.memory_bytes < r.memory_bytes_before and r.disk_bytes < r.disk_bytes_before
    assert has_quantized_linears(q.model)
    if method == "nf4":
        # the tiny draft's widths (96, 48) do not fit bitsandbytes' AVX512-BF16 CPU kernel: only the
        # down projections (256 -> 96) are 4-bit, the rest is kept and reported
        kept = r.candidate.provenance.extra["unquantized_layers"].split(", ")
        assert len(kept) == 12 and "model.layers.0.self_attn.q_proj" in kept
        assert any(n.startswith("nf4 kept 12 of 14 linear layers unquantized") for n in r.notes)
        assert set(cfg["quantization_config"]["llm_int8_skip_modules"]) == set(kept) | {
            "lm_head", "model.embed_tokens", "model.norm"}
        assert sorted(n for n, m in q.model.named_modules() if is_quantized_linear(m)) == [
            "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    d, ids = source
    assert 0 < (_logits(q.model, ids) - _logits(d.model, ids)).abs().max().item() < 1.0
    _lossless(q.model)


@pytest.mark.skipif(not have("bitsandbytes"), reason="bitsandbytes is not installed")
@isolated
def test_nf4_checkpoint_without_the_skip_list_still_decodes(tmp_path, source):
    # an nf4 checkpoint quantized before dspark kept misfit layers unquantized (or by another tool):
    # on an AVX512-BF16 CPU its first forward used to fail in bitsandbytes' weight repack
    from transformers import BitsAndBytesConfig

    from dspark.quantize.backends import _hf_load_quantized
    from dspark.quantize.loading import load_draft

    d, ids = source
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    m = _hf_load_quantized(BUILTIN / DRAFT, torch.bfloat16, "cpu", qc)
    m.save_pretrained(str(tmp_path / "old"), safe_serialization=True)
    d.tokenizer.save_pretrained(str(tmp_path / "old"))
    q = load_draft(str(tmp_path / "old"))
    assert sum(1 for m in q.model.modules() if is_quantized_linear(m)) == 14  # every layer stays 4-bit
    assert 0 < (_logits(q.model, ids) - _logits(d.model, ids)).abs().max().item() < 3.0  # all 14 in 4 bits
    _lossless(q.model)


@pytest.mark.skipif(not have("gptqmodel"), reason="gptqmodel is not installed")
@isolated
def test_gptq4_with_calibration(tmp_path, source, capsys, monkeypatch):
    import os

    from dspark.quantize.loading import count_parameters, has_quantized_linears, load_draft

    out = tmp_path / "gptq"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    env = {k: os.environ.get(k) for k in ("PYTORCH_ALLOC_CONF", "CUDA_DEVICE_ORDER")}
    r = quantize_draft(out, QuantizeOptions(method="gptq4", calibration="code", calibration_samples=8, target=TARGET,
                                            **GUARD), draft=DRAFT)
    # gptqmodel's banner and progress log go to stderr (stdout carries --json), its env changes are undone,
    # and its per-layer log files do not land in the user's working folder
    assert capsys.readouterr().out == ""
    assert list(cwd.iterdir()) == []
    assert {k: os.environ.get(k) for k in env} == env
    assert r.backend == "gptqmodel" and r.backend_reason == "the only gptq4 backend on cpu"
    assert r.candidate.provenance.calibration_samples == 8
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and B.checkpoint_backend(out) == "gptqmodel"
    assert r.disk_bytes < r.disk_bytes_before and r.memory_bytes < r.memory_bytes_before
    assert r.verdict is not None and r.verdict.passed and r.candidate.measured.guard_positions == 2 * 8
    q = load_draft(str(out))
    assert has_quantized_linears(q.model) and q.tokenizer_size == source[0].tokenizer_size
    d, ids = source
    # the packed layers are buffers: still counted at their logical size
    assert r.candidate.measured.parameters == count_parameters(d.model) == count_parameters(q.model)
    assert 0 < (_logits(q.model, ids) - _logits(d.model, ids)).abs().max().item() < 1.0
    _lossless(q.model)  # the fused fast path must not read GPTQ's packed layers as dense weights


# -- the guard on a deliberately broken "quantization" -------------------------------------------------------

class ShuffledBackend:
    """Writes the draft with every weight tensor's elements shuffled: a quantizer gone wrong."""

    name = "shuffled-test"
    methods = ("int8",)
    module = ""
    requirement = "nothing"
    devices = ("cpu",)
    needs_calibration = False

    def quantize(self, request):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(request.source), dtype=torch.float32)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                flat = p.data.view(-1)
                flat.copy_(flat[torch.randperm(flat.numel(), generator=g)])
        model.save_pretrained(str(request.out))

    def load(self, folder, device, dtype):  # plain transformers folder: dspark.models.load_model reads it
        raise AssertionError("not used")


@pytest.fixture
def shuffled():
    B.register_backend(ShuffledBackend())
    yield
    B.unregister_backend("shuffled-test")


def test_guard_flags_a_broken_draft_loudly(tmp_path, shuffled):
    need_builtins(TARGET, DRAFT)
    out = tmp_path / "broken"
    result = runner.invoke(app, ["quantize", "--draft", DRAFT, "--method", "int8", "--backend", "shuffled-test",
                                 "--target", TARGET, "--out", str(out), "--guard-prompts", "2", "--guard-tokens", "8",
                                 "--guard-threshold", "0.05"])
    assert result.exit_code == 0, result.output
    assert "WARNING: ACCEPTANCE DROP" in result.stderr
    cand = load_candidate(out / CANDIDATE_FILE)
    assert cand.measured.guard_passed is False
    assert cand.measured.acceptance_drop > 0.05
    assert cand.measured.expected_acceptance < cand.measured.expected_acceptance_before
    assert len(cand.warnings) == 1 and cand.warnings[0].startswith("ACCEPTANCE DROP")
    assert "backend: shuffled-test (--backend shuffled-test)" in result.stdout


def test_guard_target_from_the_candidate_file_and_no_guard(tmp_path, shuffled):
    need_builtins(TARGET, DRAFT)
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: small\ntarget: {TARGET}\ndraft: {DRAFT}\ndraft_length: 3\n")
    r = quantize_draft(tmp_path / "a", QuantizeOptions(method="int8", backend="shuffled-test", guard=False),
                       candidate=spec)
    assert r.verdict is None and "--no-guard: acceptance guard skipped" in r.notes
    assert r.candidate.name == "small-int8" and r.candidate.draft_length == "3" and r.candidate.target == TARGET


def test_bad_inputs_fail_before_any_work(tmp_path):
    need_builtins(DRAFT)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    cases = [
        (["--method", "int3", "--draft", DRAFT], "unknown quantization method 'int3'"),
        (["--method", "int8"], "give exactly one of --draft D or --candidate FILE"),
        (["--method", "int8", "--draft", DRAFT, "--candidate", "c.yaml"], "give exactly one of"),
        (["--method", "int8", "--draft", "no/such/folder/x"], "does not exist"),
        (["--method", "int8", "--draft", DRAFT, "--guard-threshold", "2"], "--guard-threshold must be in [0, 1]"),
        (["--method", "int8", "--draft", DRAFT, "--backend", "awq"], "unknown quantization backend 'awq'"),
    ]
    for args, msg in cases:
        result = runner.invoke(app, ["quantize", *args, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, (args, result.output)
        assert msg in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.output
    if any(B.is_available(B.BACKENDS[n]) for n in B.PREFERENCES["int8"]["cpu"]):
        result = runner.invoke(app, ["quantize", "--method", "int8", "--draft", DRAFT, "--out", str(tmp_path / "full")])
        assert result.exit_code == 2 and "already exists and is not empty" in result.stderr
        assert (tmp_path / "full" / "x").read_text() == "keep me"


@pytest.mark.skipif(not have("optimum.quanto"), reason="optimum-quanto is not installed")
def test_quantizing_a_quantized_draft_is_refused(tmp_path):
    need_builtins(DRAFT)
    quantize_draft(tmp_path / "q", QuantizeOptions(method="int8", backend="quanto"), draft=DRAFT)
    with pytest.raises(DsparkError, match="already quantized"):
        quantize_draft(tmp_path / "qq", QuantizeOptions(method="int8", backend="quanto"), candidate=tmp_path / "q" /
                       CANDIDATE_FILE)
