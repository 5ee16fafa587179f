"""Strict schemas: every config object rejects unknown keys and names the valid ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dspark.errors import DsparkError

M = TypeVar("M", bound="StrictModel")

# A dspark YAML file (manifest, selection, recipe) is small; these bound what one may make the
# parser and everything after it walk: its bytes, and its nodes once every alias is expanded (a
# 1 KB "billion laughs" file otherwise expands to gigabytes in whatever renders it).
MAX_YAML_BYTES = 4 * 1024 * 1024
MAX_YAML_NODES = 100_000
# At most this much of a user's input is echoed in an error message.
SHOWN_CHARS = 200


def clip(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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
        return cls.parse(read_yaml(path), where=str(path))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def expanded_nodes(root: yaml.Node, limit: int) -> int:
    """How many nodes a composed YAML document has once every alias is expanded, counted up to
    limit + 1 (an alias cycle counts as limit + 1). Linear in the distinct nodes (each is sized once)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # the nodes whose subtree is being sized: the current path
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = min(limit + 1, 1 + sum(sizes[id(c)] for c in _children(node)))
        elif key in open_nodes:
            return limit + 1
        elif key not in sizes:
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def read_yaml(path: str | Path, max_bytes: int = MAX_YAML_BYTES, max_nodes: int = MAX_YAML_NODES) -> Any:
    """Parse a YAML file (safe loader), refusing one larger than `max_bytes` or one whose anchors
    and aliases expand it past `max_nodes` nodes, before anything walks the result."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as e:
        raise DsparkError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if len(raw) > max_bytes:
        raise DsparkError(f"{path}: larger than {max_bytes // 1024} KiB, the most a dspark YAML file may be")
    try:
        loader = yaml.SafeLoader(raw.decode("utf-8"))
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if expanded_nodes(node, max_nodes) > max_nodes:
                raise DsparkError(f"{path}: its anchors and aliases expand it past {max_nodes} YAML nodes: "
                                  "refused (write the values out)")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DsparkError(f"{path}: not valid YAML ({clip(str(e).splitlines()[0] if str(e) else type(e).__name__)})") \
            from None
    except RecursionError:
        raise DsparkError(f"{path}: nested too deeply to be a dspark YAML file") from None


def format_validation_error(cls: type[BaseModel], err: ValidationError) -> str:
    """The first error as one line; the key path, value and message each clipped (`clip`): they
    echo the user's input."""
    first = err.errors(include_url=False)[0]
    loc = clip(".".join(str(p) for p in first["loc"]) or "<root>")
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
    return f"bad value for {loc!r}: {clip(repr(value))} ({clip(first['msg'])})"
