"""`dspark.contain.third_party_contained`: stdout printed inside lands on stderr, and the
environment variables it guards are restored (set, changed or removed inside)."""

import os
import sys

from dspark.contain import third_party_contained


def test_prints_go_to_stderr_and_env_is_restored(capsys, monkeypatch):
    monkeypatch.setenv("DSPARK_TEST_KEEP", "before")
    monkeypatch.delenv("DSPARK_TEST_NEW", raising=False)
    with third_party_contained(("DSPARK_TEST_KEEP", "DSPARK_TEST_NEW")):
        print("banner")
        sys.stdout.write("progress\n")
        os.environ["DSPARK_TEST_KEEP"] = "changed"
        os.environ["DSPARK_TEST_NEW"] = "set"
    print("after")
    out, err = capsys.readouterr()
    assert out == "after\n" and err == "banner\nprogress\n"
    assert os.environ["DSPARK_TEST_KEEP"] == "before" and "DSPARK_TEST_NEW" not in os.environ


def test_restores_on_error(monkeypatch):
    monkeypatch.delenv("DSPARK_TEST_NEW", raising=False)
    stdout = sys.stdout
    try:
        with third_party_contained(("DSPARK_TEST_NEW",)):
            os.environ["DSPARK_TEST_NEW"] = "set"
            raise KeyError("boom")
    except KeyError:
        pass
    assert "DSPARK_TEST_NEW" not in os.environ and sys.stdout is stdout
