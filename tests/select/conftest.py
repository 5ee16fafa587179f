"""Select test settings: offline, one torch thread, the built-in family (see tests/common.py)."""

from tests.common import BUILTIN, REPO, STORIES, have, need_builtins, offline, one_thread  # noqa: F401

TARGET = "tiny-code"
