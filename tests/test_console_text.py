r"""Stored text on the console's pages: shown as the CLI shows it, and never wider than the page.

A run is recorded whose error type, error message, log record, logger name,
progress name, abort reason and stop reason hold ESC sequences, BEL, CR LF,
a right-to-left override and a C1 character; another one holds texts of
10,000 and 20,000 characters without a space. In Debian's Chromium (one
browser and one console, without tokens, for the module), every text the
pages show must follow `flowsdk._text.visible` (line breaks only where the CLI
keeps them too: a traceback, a log record), and no page may get wider than
the window. A run that does not exist gets a page that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import flowsdk
from flowsdk._text import MAX_REASON, visible, visible_lines
from flowsdk.errors import ActionAbortedError, RuntimeUserError
from tests.console_support import CHROMIUM, Console, console_and_browser
from tests.runners.harness import sqlite_url

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

MS = 30_000  # how long a page may take to show what a test waits for
WIDTH = 1300

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.xdist_group("browser_text"),
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason="the browser tests need Debian's Chromium at /usr/bin/chromium",
    ),
]

HOSTILE = "a\x1b[31mred\x07bell\r\nfake row\u202eRTL\u009bC1"
SHOWN = "a\\x1b[31mred\\x07bell\\r\\nfake row\\u202eRTL\\x9bC1"
LOGGER = "worker\x1b]0;title\x07"
# An exception type whose name is hostile: a type name is stored text too.
HostileError = type("Hostile\x1b[5mError\x07", (Exception,), {})

env = flowsdk.TaskEnvironment("c_text")
_started: asyncio.Event | None = None
_release: asyncio.Event | None = None


@env.task
async def broken(message: str) -> None:
    logging.getLogger(LOGGER).warning("log %s\nsecond line", message)
    await flowsdk.report(1.0, step=0, name="loss " + message[:100])
    await flowsdk.report(0.5, step=1, name="loss " + message[:100])
    raise HostileError(message)


@env.task
async def blocked() -> None:
    assert _started is not None
    _started.set()
    await asyncio.Event().wait()


@env.task
async def root(message: str) -> None:
    assert _release is not None
    with contextlib.suppress(RuntimeUserError):
        await broken(message)
    with contextlib.suppress(ActionAbortedError):
        await blocked()
    await _release.wait()


async def record(store: str, name: str, message: str, reason: str) -> None:
    """Record run `name`: a1 fails with `message`; a2 is aborted, the run stopped, for `reason`."""
    global _started, _release
    _started, _release = asyncio.Event(), asyncio.Event()
    handle = await flowsdk.start(root, message, name=name, store=store)
    await _started.wait()
    await handle.abort("a2", reason=reason)
    await handle.stop(reason=reason)
    _release.set()
    await handle.wait()


class Site:
    def __init__(self, console: Console, worker: ThreadPoolExecutor) -> None:
        self.console = console
        self.worker = worker
        self.browser: Any = None

    def run(self, body: Callable[[], None]) -> None:
        """Run `body` in the browser's thread (where every Playwright call must be made)."""
        self.worker.submit(body).result(timeout=110)

    def page(self, path: str, *, requests: list[str] | None = None) -> Any:
        """Open `path` in a new context; `requests` gets the path of each request it makes."""
        context = self.browser.new_context(viewport={"width": WIDTH, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.errors = errors
        if requests is not None:
            page.on(
                "request",
                lambda r: requests.append(urllib.parse.unquote(urllib.parse.urlsplit(r.url).path)),
            )
        page.goto(self.console.url + path)
        return page


LONG_REASON = "y" * MAX_REASON
LONG_MESSAGE = "z" * 20_000


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("text")
    store = sqlite_url(tmp / "s.db")

    async def record_all() -> None:
        await record(store, "c-hostile", "err " + HOSTILE, HOSTILE)
        await record(store, "c-long", LONG_MESSAGE, LONG_REASON)

    asyncio.run(record_all())
    with console_and_browser(store, tmp / "console.log", "browser-text") as (c, worker, browser):
        site = Site(c, worker)
        site.browser = browser
        yield site


# Every text a page shows: its text nodes (an SVG <title> too; not the line breaks and
# spaces between the tags of its HTML), its `title` attributes and its document title,
# each with whether it is in an element that shows several lines.
SCAN = r"""() => {
  const found = [[document.title, false]];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (parent.closest("script, style, textarea") || /^[\n ]*$/.test(node.data)) continue;
    found.push([node.data, parent.closest("pre, .logs .msg") !== null]);
  }
  for (const e of document.querySelectorAll("[title]")) {
    found.push([e.getAttribute("title"), false]);
  }
  return found;
}"""


def raw_controls(page: Any) -> list[str]:
    """The texts shown with a control character in them (but a line break where one is kept)."""
    bad = []
    for text, multiline in page.evaluate(SCAN):
        lines = text.split("\n") if multiline else [text]
        bad += [repr(line) for line in lines if visible(line) != line]
    return bad


def utf16(text: str) -> list[int]:
    data = text.encode("utf-16-le", "surrogatepass")
    return [int.from_bytes(data[i : i + 2], "little") for i in range(0, len(data), 2)]


SAMPLES = [
    HOSTILE,
    "".join(map(chr, range(0x3000))),  # C0, DEL, C1, the separators and bidi controls
    "Grüße, 東京 ✓ \U0001f600 \ufeffbom \ud800lone \udfffsurrogates \u2066isolate\u2069",
    "tab\there\r\n\\x1b stays as it is",
]


def test_the_pages_make_text_visible_by_the_clis_rule(site: Site) -> None:
    def body() -> None:
        page = site.page("/")
        for sample in SAMPLES:
            shown = page.evaluate(
                "(units) => window.flowsdk.visible(String.fromCharCode(...units))", utf16(sample)
            )
            assert shown == visible(sample)
            lines = page.evaluate(
                "(units) => window.flowsdk.lines(String.fromCharCode(...units)).data",
                utf16(sample),
            )
            assert lines == "\n".join(visible_lines(sample))
        page.context.close()

    site.run(body)


def test_the_run_page_and_the_history_show_control_characters_as_escapes(site: Site) -> None:
    def body() -> None:
        page = site.page("/runs/c-hostile")
        expect(page.locator("#run-stop .reason")).to_have_text(f"“{SHOWN}”", timeout=MS)
        a1 = page.locator('.action[data-action="a1"] .error')
        expect(a1).to_contain_text(visible(HostileError.__name__) + ": err " + SHOWN, timeout=MS)
        abort = page.locator('.action[data-action="a2"] .abort .reason')
        expect(abort).to_have_text(f"“{SHOWN}”", timeout=MS)
        # A log record keeps its line breaks, as `flowsdk logs` does: each line made visible.
        record = page.locator(".logs .log")
        expect(record).to_contain_text(visible(LOGGER), timeout=MS)
        message = "\n".join(visible_lines(f"log err {HOSTILE}\nsecond line"))
        expect(record.locator(".msg")).to_have_text(message, timeout=MS)
        assert record.locator(".msg").text_content() == message
        curve = page.locator("svg.curves polyline.curve title")
        expect(curve).to_contain_text(f"loss err {SHOWN}", timeout=MS)
        expect(page.locator("#events .event .reason").first).to_have_text(f"“{SHOWN}”")
        expect(page.locator("#events .event .cause").first).to_be_attached(timeout=MS)
        page.locator('.action[data-action="a1"] summary').click()  # the traceback, shown
        traceback = "\n".join(visible_lines(f"{HostileError.__name__}: err {HOSTILE}"))
        expect(page.locator(".error pre")).to_contain_text(traceback, timeout=MS)
        assert raw_controls(page) == []
        assert page.errors == []
        page.context.close()

        history = site.page("/")
        stop = history.locator('tr[data-run="c-hostile"] td').nth(6)
        expect(stop).to_have_text(f"wait: {SHOWN}", timeout=MS)
        expect(stop).to_have_attribute("title", f"wait: {SHOWN}")
        assert raw_controls(history) == []
        assert history.errors == []
        history.context.close()

    site.run(body)


def fits(page: Any) -> None:
    """Assert that the page is no wider than its window (no sideways scrolling)."""
    wide, window = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert wide <= window


def test_long_stored_text_wraps_or_is_cut_and_no_page_gets_wider_than_the_window(
    site: Site,
) -> None:
    def body() -> None:
        page = site.page("/runs/c-long")
        expect(page.locator("#run-stop .reason")).to_have_text(f"“{LONG_REASON}”", timeout=MS)
        # Everything drawn (the logs and the chart are read once the run is known to
        # have ended): the error, the abort, the events, a log record and a curve.
        # (The store keeps the first 2,000 characters of a message, a log record's 8 KiB.)
        expect(page.locator(".error")).to_contain_text(LONG_MESSAGE[:1000], timeout=MS)
        expect(page.locator(".abort .reason")).to_have_text(f"“{LONG_REASON}”", timeout=MS)
        expect(page.locator("#events .event .reason").first).to_be_attached(timeout=MS)
        expect(page.locator(".logs .log .msg")).to_contain_text(LONG_MESSAGE[:1000], timeout=MS)
        expect(page.locator("svg.curves polyline.curve")).to_have_count(1, timeout=MS)
        page.locator('.action[data-action="a1"] summary').click()
        expect(page.locator(".error pre")).to_be_visible(timeout=MS)
        fits(page)
        page.context.close()

        # In the history's table the text is cut, whole in the cell's title.
        history = site.page("/")
        stop = history.locator('tr[data-run="c-long"] td').nth(6)
        expect(stop).to_have_text(re.compile("^wait: y+…$"), timeout=MS)
        expect(stop).to_have_attribute("title", f"wait: {LONG_REASON}")
        fits(history)
        history.context.close()

        missing = site.page("/runs/" + "n" * 3000)
        expect(missing.locator("#missing")).to_contain_text("no run named", timeout=MS)
        fits(missing)
        missing.context.close()

    site.run(body)


# Each fact of the run's head: its top, and whether its value is on one line (as tall as
# its name).
FACTS = """() => [...document.querySelectorAll("#run-facts .fact")].map((fact) => {
  const [dt, dd] = [fact.querySelector("dt"), fact.querySelector("dd")];
  return [dt.textContent, Math.round(fact.getBoundingClientRect().top),
          dd.getBoundingClientRect().height === dt.getBoundingClientRect().height];
})"""


def test_the_runs_facts_wrap_between_facts_never_inside_one_that_fits(site: Site) -> None:
    def body() -> None:
        page = site.page("/runs/c-hostile")
        expect(page.locator("#run-facts dd").first).to_have_text(re.compile("root$"), timeout=MS)
        facts = page.evaluate(FACTS)
        assert [name for name, _, _ in facts] == ["task", "attempt", "started", "duration"]
        assert len({top for _, top, _ in facts}) == 1  # one row: there is room
        assert all(one_line for _, _, one_line in facts), facts
        page.set_viewport_size({"width": 480, "height": 900})
        page.wait_for_function(f"({FACTS})().some(([, top]) => top !== {facts[0][1]})")
        narrow = page.evaluate(FACTS)
        assert len({top for _, top, _ in narrow}) > 1  # the row wrapped ...
        assert all(one_line for _, _, one_line in narrow), narrow  # ... between facts
        page.context.close()

    site.run(body)


def test_the_page_of_a_run_that_does_not_exist_says_so_and_draws_no_run(site: Site) -> None:
    name = "NOPE\u202eevil\x1b[2J"

    def body() -> None:
        requests: list[str] = []
        page = site.page("/runs/" + urllib.parse.quote(name, safe=""), requests=requests)
        missing = page.locator("#missing")
        expect(missing).to_contain_text(f"no run named {name!r} in ", timeout=MS)
        expect(missing.get_by_role("link")).to_have_attribute("href", "/")
        for frame in ("#run-phase", "#run-facts", "#tree", "#timeline", "#events"):
            expect(page.locator(frame)).to_be_hidden()
        expect(page.locator("#crumb")).to_have_text(visible(name))
        assert page.title() == "flowsdk · " + visible(name)
        # A request made now comes after any the page made when it learned the run is
        # missing: it asked for the run once, and for nothing more.
        assert page.evaluate("fetch('/api/whoami').then((r) => r.status)") == 200
        api = [path for path in requests if path.startswith("/api/")]
        assert api == ["/api/whoami", f"/api/runs/{name}/stream", "/api/whoami"]
        assert raw_controls(page) == []
        assert page.errors == []
        page.context.close()

    site.run(body)


def test_a_run_address_with_a_malformed_escape_says_not_found(site: Site) -> None:
    """`/runs/100%` (a `%` that starts no escape): the page says so, it is not left blank."""

    def body() -> None:
        page = site.page("/runs/100%25zz%")
        expect(page.locator("#missing")).to_contain_text("no run named", timeout=MS)
        assert page.errors == []
        page.context.close()

    site.run(body)
