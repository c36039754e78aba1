"""The store URL a detached runner is given (`ControlService`'s launches): the same file."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import pytest

from flowsdk._launch import portable_url
from flowsdk.store import SQLiteStore, open_store


@pytest.mark.parametrize("name", ["runs.db", "run #1.db", "100%.db", "what?.db", "é ü.db"])
def test_a_relative_sqlite_url_names_the_same_file_from_another_directory(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    here = open_store("sqlite:///" + quote(name))
    assert isinstance(here, SQLiteStore)
    assert here.path == name
    url = portable_url(here.url)
    monkeypatch.chdir("/")
    there = open_store(url)
    assert isinstance(there, SQLiteStore)
    assert there.path == os.path.join(tmp_path, name)


def test_the_busy_timeout_goes_along() -> None:
    url = portable_url("sqlite:///rel/runs.db?busy_timeout=9")
    assert url.endswith("?busy_timeout=9")
    store = open_store(url)
    assert isinstance(store, SQLiteStore)
    assert store.path == os.path.abspath("rel/runs.db")
