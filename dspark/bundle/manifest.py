"""The bundle manifest (`BUNDLE/dspark-bundle.yaml`) and the selection file `dspark export` reads.

A bundle is a folder:

    BUNDLE/dspark-bundle.yaml   this manifest (the only file not listed in `files`)
    BUNDLE/draft/               the draft, exactly a model folder an engine loads: config, safetensors
                                weights, tokenizer (vLLM and SGLang load every top-level *.safetensors of
                                a model folder without an index, so nothing else with that suffix)
    BUNDLE/acceptance_head/     acceptance_head.json + .safetensors, when the draft has one (schema 1
                                bundles kept them inside draft/: still read from there)
    BUNDLE/target/              only with --include-target: a copy of a small local target
    BUNDLE/vllm.json            vLLM engine arguments (speculative_config with method "draft_model";
                                `use_heterogeneous_vocab` for a draft with its own tokenizer)
    BUNDLE/sglang.sh            SGLang launch command (--speculative-algorithm STANDALONE), only when
                                the draft shares the target's vocabulary
                                (neither engine file for a draft quantized with optimum-quanto, which
                                neither engine loads)
    BUNDLE/README.md            model card with the measured numbers

`files` maps every other file's bundle-relative POSIX path to its sha256 and size, so a missing, extra
or modified file is found by name. Both schemas are strict: an unknown key is an error listing the
valid keys.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from dspark.config.base import StrictModel, clip, read_yaml
from dspark.errors import DsparkError

MANIFEST_NAME = "dspark-bundle.yaml"
# 2: the acceptance head moved out of draft/ into acceptance_head/ (1 is still read)
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
DRAFT_DIR = "draft"
HEAD_DIR = "acceptance_head"
TARGET_DIR = "target"
VLLM_FILE = "vllm.json"
SGLANG_FILE = "sglang.sh"
README_FILE = "README.md"

QUANTIZATIONS = ("none", "int8", "int4", "nf4", "gptq4")
# The longest string a manifest or selection field may hold (a path is at most 4096 bytes on Linux):
# names from a manifest reach error messages, so none is unbounded.
MAX_TEXT = 4096


class BundleModel(StrictModel):
    model_config = ConfigDict(str_max_length=MAX_TEXT)


class Metrics(BundleModel):
    """Measured numbers for the pair, as `dspark select` reports them (all optional: a bundle exported
    from --target/--draft has none). Definitions follow dspark.decode.types (mean accepted tokens per
    target forward includes the bonus token; acceptance rate = accepted / drafted)."""

    acceptance_rate: float | None = Field(None, ge=0, le=1)
    mean_accepted_tokens: float | None = Field(None, ge=0)
    acceptance_per_position: list[float] | None = None
    draft_cost_ratio: float | None = Field(None, ge=0)
    tokens_per_s: float | None = Field(None, ge=0)
    baseline_tokens_per_s: float | None = Field(None, ge=0)
    speedup: float | None = Field(None, ge=0)
    best_draft_length: int | None = Field(None, ge=1)
    auto_speedup: float | None = Field(None, ge=0)
    peak_memory_mb: float | None = Field(None, ge=0)
    projected: bool = False
    task: str | None = None
    prompts: int | None = Field(None, ge=0)
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    objective: str | None = None
    device: str | None = None
    hardware: str | None = None
    measured_at: str | None = None

    def measured(self) -> dict[str, Any]:
        """Only the fields that carry a value (for tables and the model card)."""
        return {k: v for k, v in self.model_dump().items() if v is not None and not (k == "projected" and not v)}


class SelectionSpec(BundleModel):
    """What `dspark export --selection FILE` reads: the winning candidate written by `dspark select`
    (its candidate spec plus the measured numbers). `draft` (and `target`, when it is a path) may be
    relative to the selection file's folder."""

    name: str | None = None
    target: str
    draft: str
    draft_length: str | int
    quantization: str = "none"
    device: str | None = None
    dtype: str | None = None
    notes: str | None = None
    warnings: list[str] = Field(default_factory=list)
    metrics: Metrics = Field(default_factory=Metrics)

    @field_validator("quantization")
    @classmethod
    def _known_quantization(cls, v: str) -> str:
        if v not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization (allowed: {', '.join(QUANTIZATIONS)})")
        return v


class TargetRef(BundleModel):
    """The target the draft was made for. It is referenced, not shipped (unless `included`)."""

    name: str
    kind: Literal["builtin", "alias", "local", "hub"]
    resolves_to: str
    revision: str | None = None
    weight_sha256: str | None = None
    tokenizer_sha256: str
    vocab_size: int = Field(ge=1)
    context_length: int | None = Field(None, ge=1)
    architecture: str | None = None
    included: bool = False


class DraftInfo(BundleModel):
    name: str
    source: str
    path: str = DRAFT_DIR
    architecture: str | None = None
    parameters: int | None = Field(None, ge=0)
    vocab_size: int = Field(ge=1)
    context_length: int | None = Field(None, ge=1)
    tokenizer_sha256: str
    weight_sha256: str
    weight_files: list[str]
    acceptance_head: bool = False
    quantization: str = "none"
    # the checkpoint's own format (dspark.quantize.backends.quantization_of: "quanto", "bitsandbytes",
    # "gptq", "torchao", ...; None: not quantized): which engines can load the draft depends on it
    quantization_format: str | None = None
    # dspark.models.compat mode of (target, draft): "different" means the draft ships its own tokenizer
    # (in draft/) and is decoded cross-tokenizer (dspark.decode.cross)
    tokenizer: Literal["same", "same-padded", "different"] = "same"


class DecodingPolicy(BundleModel):
    """How dspark drafts (`draft_length`, a `dspark.decode.parse_draft_length` form) and the fixed K
    that engines without adaptive drafting (vLLM, SGLang) get."""

    draft_length: str
    kind: str
    params: dict[str, float | int] = Field(default_factory=dict)
    num_speculative_tokens: int = Field(ge=1)
    num_speculative_tokens_source: Literal["measured", "static policy", "default"]


class SelectionRef(BundleModel):
    file: str
    sha256: str
    candidate: str | None = None
    warnings: list[str] = Field(default_factory=list)


class FileEntry(BundleModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class BundleManifest(BundleModel):
    schema_version: int
    name: str
    created_at: str
    target: TargetRef
    draft: DraftInfo
    policy: DecodingPolicy
    metrics: Metrics = Field(default_factory=Metrics)
    selection: SelectionRef | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    files: dict[str, FileEntry]

    @field_validator("schema_version")
    @classmethod
    def _supported(cls, v: int) -> int:
        if v not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(f"unsupported schema_version {v} (this dspark reads "
                             f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))})")
        return v

    @property
    def head_dir(self) -> str | None:
        """The bundle folder holding the acceptance head: acceptance_head/, or draft/ in a schema 1
        bundle (migrated on read: the head is loaded from where that bundle hashed it); None without
        a head."""
        if not self.draft.acceptance_head:
            return None
        return DRAFT_DIR if self.schema_version == 1 else HEAD_DIR

    @field_validator("files")
    @classmethod
    def _safe_paths(cls, v: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for rel in v:
            check_relative_path(rel)
        return v


def check_relative_path(rel: str) -> str:
    """A manifest path must stay inside the bundle: relative, POSIX, no '..', not the manifest."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or rel == MANIFEST_NAME:
        raise ValueError(f"file path {clip(repr(rel))} must be a relative path inside the bundle")
    return rel


def read_manifest(bundle: str | os.PathLike) -> BundleManifest:
    """Load and validate BUNDLE/dspark-bundle.yaml; DsparkError naming the file on any problem (a
    file over 4 MiB, or one whose YAML aliases expand it past 100k nodes, is refused unread:
    `dspark.config.base.read_yaml`)."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise DsparkError(f"bundle {str(bundle)!r} is not a folder (make one with `dspark export`)")
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise DsparkError(f"bundle {str(bundle)!r} has no {MANIFEST_NAME}: not a dspark bundle, or incomplete")
    return BundleManifest.parse(read_yaml(path), where=str(path))


def load_selection(path: str | os.PathLike) -> SelectionSpec:
    return SelectionSpec.load_yaml(path)


def resolve_selection_path(value: str, selection_file: Path) -> str:
    """A path in a selection file is relative to the file's folder when it exists there; anything
    else (a built-in name, an alias, a hub id, an absolute path) passes through."""
    candidate = (selection_file.parent / value)
    if not Path(value).is_absolute() and candidate.exists():
        return str(candidate.resolve())
    return value
