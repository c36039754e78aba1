"""A run not found: the message suggests the close names, short ones and other cases too."""

from __future__ import annotations

from pathlib import Path

import pytest

import flowsdk
from flowsdk.errors import RunNotFoundError
from flowsdk.store import MemoryStore, Store, open_store

env = flowsdk.TaskEnvironment("nf")


@env.task
async def noop() -> None:
    return None


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "memory":
        return MemoryStore()
    return open_store(f"sqlite:///{tmp_path / 'runs.db'}")


@pytest.mark.parametrize(
    ("asked", "suggested"),
    [("L2", "'L1'"), ("HPO-1", "'hpo-1'"), ("hpo-l", "'hpo-1'"), ("train-modle", "'train-model'")],
)
def test_a_run_not_found_suggests_close_names(store: Store, asked: str, suggested: str) -> None:
    for name in ("L1", "hpo-1", "train-model"):
        flowsdk.run(noop, name=name, store=store)
    with flowsdk.Client(store) as client, pytest.raises(RunNotFoundError) as caught:
        client.get_run(asked)
    _, hint, names = str(caught.value).partition("; did you mean ")
    assert hint
    assert suggested in names
    store.close()


def test_nothing_close_suggests_nothing(store: Store) -> None:
    flowsdk.run(noop, name="L1", store=store)
    with flowsdk.Client(store) as client, pytest.raises(RunNotFoundError) as caught:
        client.get_run("completely-different")
    assert "did you mean" not in str(caught.value)
    store.close()
