"""A console without tokens acts for its own pages and for programs, never for another site's page.

Without tokens the console asks for no credentials, so a request that another
web page makes the operator's browser send would act as the operator (SPEC
§8: "no cross-site request can act"). One console on a store that never had a
token and one Debian Chromium serve the module; runs are real runner
processes (tests/runners/console.py). Each refused request is answered before
the test lets the run go on, so a run that then ends SUCCEEDED, with no
cancellation printed, was not touched.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import pytest

import flowsdk
from tests.console_support import CHROMIUM, Console, console_and_browser, start_held
from tests.runners.harness import Runner, sqlite_url

playwright_api = pytest.importorskip("playwright.sync_api")

MS = 30_000  # how long a page may take to show what a test waits for

# One worker runs the module (`--dist loadgroup`): one console and one browser for it.
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.xdist_group("browser_origin"),
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason="the browser tests need Debian's Chromium at /usr/bin/chromium",
    ),
]

ABORT_A3 = json.dumps({"action": "a3", "reason": "sent by another site"}).encode()


class Site:
    def __init__(self, console: Console, worker: ThreadPoolExecutor, browser: Any) -> None:
        self.console = console
        self.worker = worker
        self.browser = browser
        self.store = console.store
        port = urlsplit(console.url).port
        assert port is not None
        self.port = port

    def run(self, body: Callable[[], None]) -> None:
        """Run `body` in the browser's thread (where every Playwright call must be made)."""
        self.worker.submit(body).result(timeout=110)

    def page(self, url: str) -> Any:
        """Open `url` in a new context, its page errors collected in `page.errors`."""
        page = self.browser.new_context(viewport={"width": 1300, "height": 900}).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.errors = errors
        page.goto(url)
        return page


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("origin")
    store = sqlite_url(tmp / "s.db")
    with console_and_browser(store, tmp / "console.log", "browser-origin") as (c, worker, b):
        yield Site(c, worker, b)
    assert "Traceback" not in c.log.read_text()


def _went_on(site: Site, runner: Runner) -> None:
    """Let the held run end; it must end SUCCEEDED with a3 never cancelled nor asked to be."""
    runner.send("go")
    runner.expect("RESULT", "SUCCEEDED")
    runner.finish()
    assert "CANCELLED" not in runner.output
    with flowsdk.Client(site.store) as client:
        run = client.get_run(runner.run)
    assert run.record.stop is None
    assert [e for e in run.events if e.kind.value == "request"] == []
    assert {a.name: a.phase.value for a in run.actions}["a3"] == "SUCCEEDED"


def test_a_text_plain_abort_is_refused_415_and_the_run_goes_on(site: Site) -> None:
    with start_held(site.store, "o-plain") as runner:
        path = "/api/runs/o-plain/abort"
        # The types a form or a no-cors fetch may send without asking first.
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            reply = site.console.call("POST", path, raw=ABORT_A3, headers={"Content-Type": kind})
            assert (reply.status, reply.json["error"]) == (415, "UnsupportedMediaTypeError")
            assert f"this one says {kind!r}" in reply.json["message"]
        # A body with no Content-Type at all (urllib would add one: http.client does not).
        connection = http.client.HTTPConnection("127.0.0.1", site.port, timeout=30)
        try:
            connection.request("POST", path, body=ABORT_A3)
            answer = connection.getresponse()
            assert answer.status == 415
            assert "this one has none" in json.loads(answer.read())["message"]
        finally:
            connection.close()
        _went_on(site, runner)
    assert f"refused POST {path}: 415" in site.console.logged()


def test_a_post_from_another_origin_is_refused_403_and_one_from_the_consoles_own_acts(
    site: Site,
) -> None:
    with start_held(site.store, "o-origin") as runner:
        path = "/api/runs/o-origin/abort"
        for foreign in (
            {"Origin": "http://evil.example"},
            {"Origin": f"http://localhost:{site.port + 1}"},  # this machine, another port
            {"Origin": f"https://127.0.0.1:{site.port}"},  # another scheme
            {"Origin": "null"},  # a sandboxed frame, a file
            {"Sec-Fetch-Site": "cross-site"},
        ):
            reply = site.console.call("POST", path, raw=ABORT_A3, headers=foreign)
            assert (reply.status, reply.json["error"]) == (403, "CrossOriginError"), foreign
        assert "'http://evil.example'" in site.console.logged()
        own = {"Origin": site.console.url, "Sec-Fetch-Site": "same-origin"}
        reply = site.console.call("POST", path, raw=ABORT_A3, headers=own)
        assert (reply.status, reply.json["outcome"]) == (200, "applied"), reply
        runner.expect("CANCELLED", "a3")
        runner.finish()


def test_without_tokens_a_host_that_names_no_loopback_address_is_refused_400(
    site: Site,
) -> None:
    """DNS rebinding: a page whose own name now points at 127.0.0.1 sends that name."""
    for path in ("/api/runs", "/", "/static/console.js"):
        for host in ("evil.example", f"evil.example:{site.port}", f"127.0.0.1:{site.port + 1}"):
            reply = site.console.call("GET", path, headers={"Host": host})
            assert (reply.status, reply.json["error"]) == (400, "BadRequestError"), (path, host)
            assert "DNS rebinding" in reply.json["message"]
    assert "refused GET /api/runs: 400 the Host header 'evil.example'" in site.console.logged()
    for host in ("localhost", f"localhost:{site.port}", f"[::1]:{site.port}", "127.0.0.1"):
        assert site.console.call("GET", "/api/runs", headers={"Host": host}).status == 200, host


def test_the_console_page_aborts_an_action_without_tokens(site: Site) -> None:
    with start_held(site.store, "o-page") as runner:

        def body() -> None:
            page = site.page(f"{site.console.url}/runs/o-page")
            row = page.locator('.action[data-action="a3"]')
            row.locator(".phase").filter(has_text="RUNNING").wait_for(timeout=MS)
            row.get_by_role("button", name="Abort action").click()
            page.locator("dialog#confirm textarea").fill("from the console's own page")
            page.get_by_role("button", name="Confirm").click()
            row.locator(".phase").filter(has_text="ABORTED").wait_for(timeout=MS)
            playwright_api.expect(page.locator("#outcome")).to_contain_text("applied", timeout=MS)
            assert page.errors == []
            page.context.close()

        site.run(body)
        words = " ".join(runner.expect("CANCELLED", "a3"))
        assert "from the console's own page" in words
        runner.finish()


# A page of another origin trying what a page can send without asking first (no-cors:
# a "simple" content type) and, once, what needs a CORS preflight (JSON). The title
# says when every try has had its answer (or its refusal by the browser).
ATTACK = """<!doctype html><html><body><h1>cute cats</h1><script>
const target = %(target)s;
const body = JSON.stringify({action: "a3", reason: "sent by another site"});
Promise.allSettled([
  fetch(target + "/abort", {method: "POST", mode: "no-cors",
    headers: {"Content-Type": "text/plain"}, body}),
  fetch(target + "/abort", {method: "POST", mode: "no-cors", body}),
  fetch(target + "/stop", {method: "POST", mode: "no-cors",
    headers: {"Content-Type": "application/x-www-form-urlencoded"}, body: "abandon=true"}),
  fetch(target + "/abort", {method: "POST", headers: {"Content-Type": "application/json"}, body}),
]).then((tries) => { document.title = "tried: " + tries.map((t) => t.status).join(" "); });
</script></body></html>"""


def _serve(page: bytes) -> http.server.ThreadingHTTPServer:
    """An HTTP server on another loopback port that answers every GET with `page`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the test says what it needs

    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)


# The page's host: 127.0.0.1 (another port: the same site, another origin) or localhost
# (another site). The console is at 127.0.0.1.
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_page_of_another_origin_cannot_abort_or_stop_a_run(site: Site, host: str) -> None:
    run = f"o-attacked-{host}"
    target = f"{site.console.url}/api/runs/{run}"
    server = _serve((ATTACK % {"target": json.dumps(target)}).encode())
    thread = threading.Thread(target=server.serve_forever, name="attacker-page", daemon=True)
    thread.start()
    try:
        with start_held(site.store, run) as runner:

            def body() -> None:
                page = site.page(f"http://{host}:{server.server_address[1]}/")
                page.wait_for_function("document.title.startsWith('tried: ')", timeout=MS)
                # The three no-cors tries were sent (and refused); the JSON one never was.
                assert page.title() == "tried: fulfilled fulfilled fulfilled rejected"
                page.context.close()

            site.run(body)
            logged = site.console.logged()
            assert logged.count(f"refused POST /api/runs/{run}/abort: 403") == 2
            assert logged.count(f"refused POST /api/runs/{run}/stop: 403") == 1
            _went_on(site, runner)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)
