"""The candidate spec: one draft that `dspark select` can score against a target.

A candidate file is YAML, strict (an unknown key is an error that lists the valid keys):

    name: tiny-code-draft-s-int8        # unique among the candidates of one `select` run
    target: tiny-code                   # the target it was made for (optional: select gets --target)
    draft: .                            # folder (relative to this file's folder), hub id, alias or built-in
    quantization: int8                  # none | int8 | int4 | nf4 | gptq4
    draft_length: auto                  # auto | K | static:K | confidence:T[:KMAX] | goodput[:KMAX] | learned[:T]
    device: cpu                         # optional preference (cpu | cuda | cuda:N | auto)
    dtype: float32                      # optional preference (float32 | bfloat16 | float16 | auto)
    notes: free text                    # optional
    warnings: [...]                     # written by quantize (acceptance guard) and select; shown loudly
    measured: {...}                     # numbers the writing stage measured (see `Measured`)
    provenance: {...}                   # how the draft was made (see `Provenance`)

Writers: `dspark distill` (DIR/candidates/<name>.yaml), `dspark quantize` (DIR/candidate.yaml), and
users. Readers: `dspark select` and `dspark quantize --candidate`. Relative draft/target paths are
resolved against the candidate file's folder (`resolve_relative`), so a run folder can be moved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Union

from pydantic import Field, field_validator

from dspark.config.base import StrictModel
from dspark.errors import DsparkError

QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "int4", "nf4", "gptq4")
CANDIDATE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "auto")

Quantization = Literal["none", "int8", "int4", "nf4", "gptq4"]
Scalar = Union[str, int, float, bool, None]


class Measured(StrictModel):
    """Numbers measured by the stage that wrote the candidate. `*_before` fields are the same
    measurement on the draft this candidate was made from (the unquantized draft for quantize; the
    draft before training for distill). Definitions follow dspark.decode.types: expected acceptance
    = mean over positions of sum_x min(p(x), q(x)), teacher-forced on the target's greedy
    continuations of held-out prompts; greedy agreement = fraction of those positions where the
    draft's argmax equals the target's."""

    expected_acceptance: float | None = Field(None, ge=0, le=1)
    expected_acceptance_before: float | None = Field(None, ge=0, le=1)
    acceptance_drop: float | None = None
    greedy_agreement: float | None = Field(None, ge=0, le=1)
    greedy_agreement_before: float | None = Field(None, ge=0, le=1)
    guard_threshold: float | None = Field(None, ge=0, le=1)
    guard_passed: bool | None = None
    guard_positions: int | None = Field(None, ge=0)
    acceptance_rate: float | None = Field(None, ge=0, le=1)
    mean_accepted_tokens: float | None = Field(None, ge=0)
    mean_accepted_tokens_before: float | None = Field(None, ge=0)
    heldout_loss: float | None = None
    heldout_loss_before: float | None = None
    speedup: float | None = Field(None, ge=0)
    tokens_per_s: float | None = Field(None, ge=0)
    draft_cost_ratio: float | None = Field(None, ge=0)
    best_draft_length: int | None = Field(None, ge=1)
    peak_memory_mb: float | None = Field(None, ge=0)
    size_on_disk_mb: float | None = Field(None, ge=0)
    size_on_disk_mb_before: float | None = Field(None, ge=0)
    memory_mb: float | None = Field(None, ge=0)
    memory_mb_before: float | None = Field(None, ge=0)
    parameters: int | None = Field(None, ge=0)
    prompts: int | None = Field(None, ge=0)
    task: str | None = None


class Provenance(StrictModel):
    """How the draft was made. `extra` holds stage-specific scalars that have no field here."""

    made_by: str | None = None
    created_at: str | None = None
    source_draft: str | None = None
    target: str | None = None
    method: str | None = None
    backend: str | None = None
    calibration: str | None = None
    calibration_samples: int | None = Field(None, ge=0)
    objective: str | None = None
    steps: int | None = Field(None, ge=0)
    cache_manifest_sha256: str | None = None
    dspark_version: str | None = None
    extra: dict[str, Scalar] = Field(default_factory=dict)


class Candidate(StrictModel):
    name: str = Field(min_length=1)
    target: str | None = None
    draft: str = Field(min_length=1)
    quantization: Quantization = "none"
    draft_length: str = "auto"
    device: str | None = None
    dtype: str | None = None
    notes: str | None = None
    warnings: list[str] = Field(default_factory=list)
    measured: Measured = Field(default_factory=Measured)
    provenance: Provenance = Field(default_factory=Provenance)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        v = v.strip()
        if not v or any(c in v for c in "/\\\n\t") or v in (".", ".."):
            raise ValueError("a candidate name is one non-empty line without slashes")
        return v

    @field_validator("draft_length", mode="before")
    @classmethod
    def _draft_length(cls, v):
        from dspark.decode.policy import parse_draft_length

        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError("expected auto, K, static:K, confidence:T[:KMAX], goodput[:KMAX] or learned[:T]")
        try:
            return parse_draft_length(v).spec
        except DsparkError as e:
            raise ValueError(str(e)) from None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from dspark.models.loading import check_device_name

        try:
            return check_device_name(v)
        except DsparkError as e:
            raise ValueError(str(e)) from None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in CANDIDATE_DTYPES:
            raise ValueError(f"allowed: {', '.join(CANDIDATE_DTYPES)}")
        return v

    def to_yaml_dict(self) -> dict:
        """The YAML body: unset optional fields and empty blocks left out, so files stay readable."""
        body = self.model_dump(mode="json", exclude_none=True)
        for block in ("measured", "provenance"):
            inner = {k: v for k, v in body.get(block, {}).items() if v not in ({}, None)}
            if inner:
                body[block] = inner
            else:
                body.pop(block, None)
        if not body.get("warnings"):
            body.pop("warnings", None)
        return body


def _quantization_hint(data) -> None:
    """Pydantic's Literal error lists the values, but name the key plainly for the common typo."""
    if isinstance(data, dict) and "quantization" in data and data["quantization"] not in QUANTIZATIONS:
        raise DsparkError(f"bad value for 'quantization': {data['quantization']!r} "
                          f"(allowed: {', '.join(QUANTIZATIONS)})")


def parse_candidate(data, where: str = "candidate") -> Candidate:
    """Validate a candidate mapping; DsparkError (one line, naming `where`) if it is not one."""
    if isinstance(data, dict) and "draft" not in data:
        raise DsparkError(f"{where}: missing required key 'draft' (the draft model: a folder, hub id, alias "
                          "or built-in name)")
    try:
        _quantization_hint(data)
    except DsparkError as e:
        raise DsparkError(f"{where}: {e}") from None
    return Candidate.parse(data, where=where)


def load_candidate(path: str | os.PathLike) -> Candidate:
    """Read and validate one candidate file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DsparkError(f"candidate file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DsparkError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_candidate(data, where=str(path))


def resolve_relative(value: str, candidate_file: str | os.PathLike | None) -> str:
    """A path in a candidate file is relative to the file's folder when it exists there (returned
    absolute); anything else (a built-in name, alias, hub id, absolute path) is returned as is."""
    if candidate_file is None or os.path.isabs(value):
        return value
    here = Path(candidate_file).resolve().parent / value
    return str(here.resolve()) if here.exists() else value


def write_candidate(path: str | os.PathLike, candidate: Candidate, header: str | None = None) -> Path:
    """Write a candidate atomically (validated again on the way out)."""
    from dspark.io import atomic_write_yaml

    Candidate.model_validate(candidate.model_dump())
    return atomic_write_yaml(path, candidate.to_yaml_dict(), header=header)
