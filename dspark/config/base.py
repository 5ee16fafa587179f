"""Strict schemas: every config object rejects unknown keys and names the valid ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dspark.errors import DsparkError

M = TypeVar("M", bound="StrictModel")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)

    @classmethod
    def valid_keys(cls) -> list[str]:
        return list(cls.model_fields)

    @classmethod
    def parse(cls: type[M], data: Any, where: str = "config") -> M:
        """Validate `data`, turning pydantic's multi-line report into one clear line."""
        if not isinstance(data, dict):
            raise DsparkError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise DsparkError(f"{where}: {format_validation_error(cls, e)}") from None

    @classmethod
    def load_yaml(cls: type[M], path: str | Path) -> M:
        path = Path(path)
        if not path.is_file():
            raise DsparkError(f"{cls.__name__} file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise DsparkError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        return cls.parse(data, where=str(path))


def format_validation_error(cls: type[BaseModel], err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        parent = cls
        for part in first["loc"][:-1]:
            field = parent.model_fields.get(str(part)) if isinstance(parent, type) else None
            ann = getattr(field, "annotation", None)
            parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        valid = ", ".join(parent.model_fields) if parent else "see the documentation"
        return f"unknown key {loc!r} (valid keys: {valid})"
    if first["type"] == "missing":
        return f"missing required key {loc!r}"
    value = first.get("input")
    return f"bad value for {loc!r}: {value!r} ({first['msg']})"
