"""schemathesis against the console's served OpenAPI document (SPEC §8).

A real `flowsdk ui` on a store holding one SUCCEEDED run (so a generated
retry is refused rather than started). Every operation gets a bounded number
of generated requests: no answer may be a 5xx, and every answer must match
the document (status code, content type, schema, headers).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.console_support import Console, start_held
from tests.runners.harness import sqlite_url

# One worker runs the module (`--dist loadgroup`): one console for it.
pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group("console_openapi")]

EXAMPLES = 30  # generated requests per operation and phase: bounded, so the suite stays fast
# Checks left out, and why:
# - positive_data_acceptance: SPEC §8 answers 422 to requests the schema cannot rule
#   out (an unknown task, an action and a group at once); 422 is the contract.
# - use_after_free / ensure_resource_availability: stateful checks for resources that
#   the API creates and deletes; runs are never deleted through it.
EXCLUDED = "positive_data_acceptance,use_after_free,ensure_resource_availability"


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    tmp = tmp_path_factory.mktemp("openapi")
    store = sqlite_url(tmp / "s.db")
    with start_held(store, "done") as runner:
        runner.send("go")
        runner.expect("RESULT", "SUCCEEDED")
        runner.finish()
    console = Console(store, tmp / "console.log")
    try:
        yield console
    finally:
        assert console.close() == 0


def test_the_document_describes_every_path_itself_included(console: Console) -> None:
    document = console.call("GET", "/api/openapi.json").json
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/api/runs",
        "/api/runs/{run}",
        "/api/runs/{run}/stream",
        "/api/runs/{run}/abort",
        "/api/runs/{run}/stop",
        "/api/runs/{run}/fail",
        "/api/runs/{run}/retry",
        "/api/runs/{run}/progress",
        "/api/runs/{run}/logs",
        "/api/whoami",
        "/api/openapi.json",
    }
    reason = document["components"]["schemas"]["AbortBody"]["properties"]["reason"]
    assert {"type": "string", "maxLength": 10000} in reason["anyOf"]


def test_every_time_is_a_date_time(console: Console) -> None:
    """A time in an answer is an RFC 3339 date-time (with its offset), and the document says so."""
    document = console.call("GET", "/api/openapi.json").json
    schemas = document["components"]["schemas"]
    times = {
        (name, field): prop
        for name, schema in schemas.items()
        for field, prop in schema.get("properties", {}).items()
        if field == "at" or field.endswith("_at")
    }
    expected = {
        ("RunRecord", "started_at"),
        ("RunRecord", "ended_at"),
        ("ActionRecord", "started_at"),
        ("ActionRecord", "ended_at"),
        ("AbortInfo", "requested_at"),
        ("StopInfo", "requested_at"),
        ("Event", "at"),
        ("Progress", "at"),
        ("QueuedRequest", "at"),
    }
    assert expected <= set(times)
    for (name, field), prop in times.items():
        kinds = prop.get("anyOf", [prop])
        assert {"type": "string", "format": "date-time"} in kinds, (name, field, prop)
    run = console.call("GET", "/api/runs").json[0]
    assert run["started_at"].endswith("Z"), run


def test_schemathesis_finds_no_5xx_and_no_answer_off_the_schema(
    console: Console, tmp_path: Path
) -> None:
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is in the dev extra"
    done = subprocess.run(
        [
            st,
            "run",
            console.url + "/api/openapi.json",
            f"--max-examples={EXAMPLES}",
            "--generation-deterministic",
            "--phases=examples,coverage,fuzzing",
            "--checks=all",
            f"--exclude-checks={EXCLUDED}",
        ],
        cwd=tmp_path,  # where schemathesis keeps its own files
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "Traceback" not in console.logged()
