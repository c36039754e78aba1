"""The console in a real browser: Debian's Chromium driven by Playwright (SPEC §8).

One console (token mode: an operator and a viewer token) and one browser serve
the module; each test opens a fresh browser context (its own sessionStorage).
Runs are real runner processes (tests/runners/console.py).

Playwright's sync API runs an event loop in the thread that uses it, so the
browser lives in a worker thread of its own (`Site.run`), away from the
asyncio loops of the rest of the suite.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import flowsdk
from tests.console_support import (
    CHROMIUM,
    Console,
    console_and_browser,
    create_token,
    queue_abort,
    start_held,
    start_stuck,
)
from tests.runners.harness import sqlite_url
from tests.workflows import deep

playwright_api = pytest.importorskip("playwright.sync_api")

MS = 30_000  # how long a page may take to show what a test waits for

# One worker runs the module (`--dist loadgroup`): one console and one browser for it.
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.xdist_group("browser"),
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason="the browser tests need Debian's Chromium at /usr/bin/chromium "
        "(apt-get install chromium; `make test` installs it when run as root)",
    ),
]


class Site:
    def __init__(
        self, console: Console, tokens: dict[str, str], worker: ThreadPoolExecutor
    ) -> None:
        self.console = console
        self.tokens = tokens
        self.worker = worker
        self.browser: Any = None
        self.store = console.store

    def run(self, body: Callable[[], None]) -> None:
        """Run `body` in the browser's thread (where every Playwright call must be made)."""
        self.worker.submit(body).result(timeout=110)

    def page(self, path: str, role: str | None) -> Any:
        """Open `path` in a new context; with `role`, its token is already in sessionStorage."""
        context = self.browser.new_context(viewport={"width": 1300, "height": 1000})
        if role is not None:
            secret = self.tokens[role]
            context.add_init_script(f"sessionStorage.setItem('flowsdk-token', {secret!r});")
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.errors = errors
        page.goto(self.console.url + path)
        return page


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("browser")
    store = sqlite_url(tmp / "s.db")
    tokens = {role: create_token(store, role, role) for role in ("viewer", "operator")}
    with console_and_browser(store, tmp / "console.log", "browser") as (console, worker, browser):
        site = Site(console, tokens, worker)
        site.browser = browser
        yield site


def _row(page: Any, action: str) -> Any:
    return page.locator(f'.action[data-action="{action}"]')


def _confirm(page: Any, reason: str) -> None:
    dialog = page.locator("dialog#confirm")
    dialog.locator("textarea").fill(reason)
    dialog.get_by_role("button", name="Confirm").click()


def test_the_token_prompt_then_abort_action_with_a_reason_live(site: Site) -> None:
    with start_held(site.store, "b-abort") as runner:

        def body() -> None:
            page = site.page("/runs/b-abort", role=None)
            page.locator("#token-input").fill(site.tokens["operator"])
            page.get_by_role("button", name="Use token").click()
            row = _row(page, "a3")
            row.locator(".phase").filter(has_text="RUNNING").wait_for(timeout=MS)
            reason = "<b>bad</b> data <script>document.title='x'</script>"
            row.get_by_role("button", name="Abort action").click()
            # a3 has no live descendant: the sentence says so in words, not "its 0 ...".
            text = page.locator("#confirm-text").text_content() or ""
            assert text.endswith("): it gets CancelledError and ends ABORTED."), text
            _confirm(page, reason)
            row.locator(".phase").filter(has_text="ABORTED").wait_for(timeout=MS)
            words = " ".join(runner.expect("CANCELLED", "a3"))
            assert "token:operator" in words
            # The reason is shown as the text it is: no element was made from it.
            row.locator(".reason").filter(has_text="<b>bad</b>").wait_for(timeout=MS)
            assert row.locator(".reason b, .reason script").count() == 0
            token = page.evaluate("sessionStorage.getItem('flowsdk-token')")
            assert token == site.tokens["operator"]
            # The answer to the request can come after the stream showed its effect.
            playwright_api.expect(page.locator("#outcome")).to_have_text(
                re.compile("^applied"), timeout=MS
            )
            # The failed action's markup-laden message is text too.
            error = _row(page, "a2").locator(".error")
            assert "<img src=x" in error.text_content()
            assert error.locator("img, b").count() == 0
            assert page.title() != "1"
            assert page.errors == []
            page.context.close()

        site.run(body)
        runner.finish()


def test_stop_and_wait_then_stop_and_abandon_on_the_same_run(site: Site) -> None:
    with start_held(site.store, "b-stop") as runner:

        def body() -> None:
            page = site.page("/runs/b-stop", role="operator")
            _row(page, "a3").locator(".phase").filter(has_text="RUNNING").wait_for(timeout=MS)
            # The stage's dialog counts its live actions when it opens; cancelled here.
            page.get_by_role("button", name="Abort stage").click()
            confirm = page.locator("#confirm-text")
            playwright_api.expect(confirm).to_contain_text(
                "Abort stage train: its 1 live action gets CancelledError and ends ABORTED.",
                timeout=MS,
            )
            page.locator("#confirm-cancel").click()
            page.get_by_role("button", name="Stop and wait").click()
            _confirm(page, "maintenance window")
            page.locator("#run-phase").filter(has_text="STOPPING").wait_for(timeout=MS)
            # A stop-and-wait is under way: no second one is offered, abandon is.
            assert page.get_by_role("button", name="Stop and wait").count() == 0
            page.get_by_role("button", name="Stop and abandon").click()
            assert "ABANDONED" in page.locator("#confirm-text").text_content()
            _confirm(page, "taking too long")
            row = _row(page, "a3")
            row.locator(".phase").filter(has_text="ABANDONED").wait_for(timeout=MS)
            runner.expect("CANCELLED", "a3")
            runner.finish()
            page.locator("#run-phase").filter(has_text="STOPPED").wait_for(timeout=MS)
            assert "token:operator" in page.locator("#run-stop").text_content()
            page.context.close()

        site.run(body)


def test_a_viewer_sees_the_run_but_no_control_buttons(site: Site) -> None:
    with start_held(site.store, "b-view") as runner:

        def body() -> None:
            page = site.page("/runs/b-view", role="viewer")
            _row(page, "a3").locator(".phase").filter(has_text="RUNNING").wait_for(timeout=MS)
            page.locator("#who").filter(has_text="viewer").wait_for(timeout=MS)
            for label in (
                "Abort run",
                "Abort action",
                "Abort stage",
                "Stop and wait",
                "Stop and abandon",
                "Mark as failed",
                "Retry",
            ):
                assert page.get_by_role("button", name=label).count() == 0, label
            runner.send("go")
            page.locator("#run-phase").filter(has_text="SUCCEEDED").wait_for(timeout=MS)
            page.context.close()

        site.run(body)
        runner.finish()


def test_a_queued_abort_is_a_line_of_text_under_the_header_until_the_runner_applies_it(
    site: Site, tmp_path: Path
) -> None:
    """A page open before the request sees it come (the stream); one opened after, at once."""
    reason = "<b>x</b> disk full"
    pages: list[Any] = []

    def open_page() -> None:
        page = site.page("/runs/b-queued", role="viewer")
        page.locator("#run-phase").filter(has_text="RUNNING").wait_for(timeout=MS)
        pages.append(page)

    def queued_line(page: Any) -> Any:
        return page.locator("#run-queued .queued-request")

    with start_stuck(site.store, "b-queued", tmp_path / "released") as runner:
        site.run(open_page)
        number = queue_abort(site.store, "b-queued", "a1", reason)

        def shown() -> None:
            open_page()  # its first picture holds the request
            for page in pages:
                line = queued_line(page)
                playwright_api.expect(line).to_have_count(1, timeout=MS)
                playwright_api.expect(line).to_contain_text(
                    "taken by the runner, not yet applied", timeout=MS
                )
                text = line.text_content() or ""
                assert text.startswith(f"queued #{number} abort of action a1 by "), text
                assert " pid " in text
                assert f'(reason: "{reason}"), taken by the runner' in text
                assert line.locator("b, .reason b").count() == 0  # the reason's markup is text
                assert line.locator(".reason").text_content() == f'"{reason}"'

        site.run(shown)
        (tmp_path / "released").touch()
        runner.expect("CANCELLED", "a1")

        def gone() -> None:
            for page in pages:
                _row(page, "a1").locator(".phase").filter(has_text="ABORTED").wait_for(timeout=MS)
                playwright_api.expect(queued_line(page)).to_have_count(0, timeout=MS)
                assert page.errors == []
                page.context.close()

        site.run(gone)
        assert runner.finish() == 0


def test_the_history_lists_runs_and_filters_by_name(site: Site) -> None:
    with start_held(site.store, "b-hist") as runner:
        runner.send("go")
        runner.expect("RESULT", "SUCCEEDED")
        runner.finish()

    def body() -> None:
        page = site.page("/", role="viewer")
        page.locator('tr[data-run="b-hist"]').wait_for(timeout=MS)
        page.locator("#name").fill("b-hist")
        # (Playwright's string predicates are eval, which the page's CSP forbids.)
        playwright_api.expect(page.locator("tbody tr")).to_have_count(1, timeout=MS)
        assert page.locator('tr[data-run="b-hist"] .phase').text_content() == "SUCCEEDED"
        # The list is refreshed every two seconds; a row that did not change keeps its
        # nodes (a link being clicked stays). The refresh removes a row the test added.
        page.evaluate(
            "document.querySelector('tr[data-run=b-hist] a').kept = true;"
            "document.getElementById('runs').append(document.createElement('tr'));"
        )
        playwright_api.expect(page.locator("tbody tr")).to_have_count(1, timeout=MS)
        assert page.evaluate("document.querySelector('tr[data-run=b-hist] a').kept === true")
        page.context.close()

    site.run(body)


def test_the_history_says_a_crashed_runs_runner_is_gone(site: Site) -> None:
    """As `flowsdk runs` does: a run whose runner died is CRASHED, reason `runner gone`."""
    with start_held(site.store, "b-gone") as runner:
        runner.proc.kill()
        runner.proc.wait(timeout=60)

    def body() -> None:
        page = site.page("/", role="viewer")
        row = page.locator('tr[data-run="b-gone"]')
        # The console's read finds the runner gone and records the crash.
        playwright_api.expect(row.locator(".phase")).to_have_text("CRASHED", timeout=MS)
        playwright_api.expect(row.locator("td.stop")).to_have_text("runner gone", timeout=MS)
        assert page.errors == []
        page.context.close()

    site.run(body)


def test_abort_run_then_retry_follows_the_new_attempt(site: Site) -> None:
    with start_held(site.store, "b-retry") as runner:

        def abort() -> None:
            page = site.page("/runs/b-retry", role="operator")
            _row(page, "a3").locator(".phase").filter(has_text="RUNNING").wait_for(timeout=MS)
            page.get_by_role("button", name="Abort run").click()
            _confirm(page, "wrong parameters")
            runner.expect("CANCELLED", "a3")
            runner.finish()
            page.locator("#run-phase").filter(has_text="ABORTED").wait_for(timeout=MS)
            # The next attempt runs detached, with no stdin: a3's gate opens at once.
            page.get_by_role("button", name="Retry").click()
            assert page.locator("#confirm-reason").is_hidden()
            page.locator("dialog#confirm").get_by_role("button", name="Confirm").click()
            page.locator("#run-facts dd").filter(has_text="2").first.wait_for(timeout=MS)
            page.locator("#run-phase").filter(has_text="SUCCEEDED").wait_for(timeout=MS)
            assert _row(page, "a1").locator(".tag").filter(has_text="replayed").count() == 1
            assert page.errors == []
            page.context.close()

        site.run(abort)


def test_an_action_that_reported_once_is_plotted_as_a_dot(site: Site) -> None:
    """A line needs two points: a single report is a dot, with the same hover text."""
    env = flowsdk.TaskEnvironment("b_dots")

    @env.task
    async def once(i: int) -> int:
        await flowsdk.report(i * 0.5, step=i)
        return i

    @env.task
    async def twice() -> None:
        await flowsdk.report(1.0, step=0)
        await flowsdk.report(0.5, step=1)

    @env.task
    async def main() -> None:
        await asyncio.gather(once(1), once(2), twice())

    flowsdk.run(main, name="b-dots", store=site.store)

    def body() -> None:
        page = site.page("/runs/b-dots", role="viewer")
        dots = page.locator("svg.curves circle.point")
        playwright_api.expect(dots).to_have_count(2, timeout=MS)
        # The chart is drawn again as the run's actions and reports arrive: the assertions
        # below retry, so that none reads a dot of a chart being replaced.
        first = page.locator('svg.curves circle.point[data-action="a1"]')
        playwright_api.expect(first).to_have_count(1, timeout=MS)
        playwright_api.expect(dots.and_(page.locator('[data-action="a2"]'))).to_have_count(
            1, timeout=MS
        )
        playwright_api.expect(first.locator("title")).to_contain_text(
            "last 0.5 at step 1", timeout=MS
        )
        playwright_api.expect(page.locator("svg.curves polyline.curve")).to_have_count(
            1, timeout=MS
        )
        playwright_api.expect(first).to_be_visible(timeout=MS)  # a box of non-zero size
        assert page.errors == []
        page.context.close()

    site.run(body)


def test_a_live_page_keeps_the_parts_that_did_not_change_when_it_draws_again(
    site: Site,
) -> None:
    """A live page drawn again keeps the nodes of what did not change.

    The page follows a live run and draws itself every second: a finished action's
    row (its error, say, being selected), a chart under the pointer and a running
    action's button must stay the same nodes, while the running action's duration
    advances.
    """
    env = flowsdk.TaskEnvironment("b_live")
    reported, release = threading.Event(), threading.Event()

    @env.task
    async def prepare() -> int:
        return 1

    @env.task
    async def trial() -> None:
        await flowsdk.report(0.5, step=1)
        reported.set()
        await asyncio.to_thread(release.wait, 110)

    @env.task
    async def main() -> None:
        await prepare()
        await trial()

    def body() -> None:
        page = site.page("/runs/b-live", role="operator")
        title = page.locator("svg.curves circle.point title")
        # The page as it stays: the chart drawn with the action's record (its task in the
        # title), the finished action's row shown, the running one's buttons drawn.
        playwright_api.expect(title).to_contain_text("trial · value · RUNNING", timeout=MS)
        playwright_api.expect(_row(page, "a1")).to_have_attribute(
            "data-phase", "SUCCEEDED", timeout=MS
        )
        button = _row(page, "a2").get_by_role("button", name="Abort action")
        playwright_api.expect(button).to_have_count(1, timeout=MS)
        duration = _row(page, "a2").locator(".dur")
        before = duration.text_content()
        # Mark what is shown now: the root's row by an attribute (an element whose
        # attributes differ from its new drawing's is replaced), the rest by a property
        # (which neither node comparison nor the redrawing sees).
        page.evaluate(
            "document.querySelector('#tree .action[data-action=a0]')"
            ".setAttribute('data-mark', '');"
            "for (const node of [document.querySelector('#tree .action[data-action=a1]'),"
            " document.querySelector('#tree .action[data-action=a2] button'),"
            " document.querySelector('svg.curves')]) node.kept = true;"
        )
        # Drawn again: the marked row is replaced, the running action's duration advances.
        playwright_api.expect(page.locator("#tree .action[data-mark]")).to_have_count(0, timeout=MS)
        playwright_api.expect(duration).not_to_have_text(before or "", timeout=MS)
        kept = page.evaluate(
            "[document.querySelector('#tree .action[data-action=a1]').kept === true,"
            " document.querySelector('#tree .action[data-action=a2] button').kept === true,"
            " document.querySelector('svg.curves').kept === true]"
        )
        # The finished row, the running action's button (a click is not lost to a
        # redrawing) and the chart are the same nodes.
        assert kept == [True, True, True]
        assert page.errors == []
        page.context.close()

    with ThreadPoolExecutor(1, thread_name_prefix="b-live") as runner:
        done = runner.submit(flowsdk.run, main, name="b-live", store=site.store)
        try:
            assert reported.wait(60), "the run did not report"
            site.run(body)
        finally:
            release.set()
        run = done.result(timeout=60)
    assert run.phase is flowsdk.RunPhase.SUCCEEDED


def test_a_folded_fan_out_draws_its_failed_children_and_counts_the_rest(site: Site) -> None:
    """500 children, 5 failed: the first 10, then the failed ones, then one counted line."""
    flowsdk.run(deep.fan_failing, 500, name="b-fold", store=site.store)

    def body() -> None:
        page = site.page("/runs/b-fold", role="viewer")
        fold = page.locator("#tree .fold[data-fold]")
        playwright_api.expect(fold).to_contain_text("… 485 more actions: 485 SUCCEEDED", timeout=MS)
        # Each run of folded children is one line where it stands, in the children's order.
        gaps = [g.text_content() for g in page.locator("#tree .fold.gap").all()]
        assert gaps == [
            "… 27 folded (a11 … a37): 27 SUCCEEDED",
            *(f"… 99 folded (a{i + 1} … a{i + 99}): 99 SUCCEEDED" for i in (38, 138, 238, 338)),
            "… 62 folded (a439 … a500): 62 SUCCEEDED",
        ]
        drawn = [r.get_attribute("data-action") for r in page.locator("#tree .action").all()]
        assert drawn == [
            "a0",
            *(f"a{i}" for i in range(1, 11)),
            "a38",
            "a138",
            "a238",
            "a338",
            "a438",
        ]
        assert _row(page, "a438").get_attribute("data-phase") == "FAILED"
        fold.get_by_role("button", name="Show all").click()
        playwright_api.expect(page.locator("#tree .action")).to_have_count(501, timeout=MS)
        assert page.errors == []
        page.context.close()

    site.run(body)


def test_a_folded_fan_out_draws_a_child_that_caught_a_failure_below_it(site: Site) -> None:
    """A succeeded child whose own child failed is drawn among the folded ones."""
    flowsdk.run(deep.fan_guarded, 200, name="b-guarded", store=site.store)

    def body() -> None:
        page = site.page("/runs/b-guarded", role="viewer")
        fold = page.locator("#tree .fold[data-fold]")
        playwright_api.expect(fold).to_contain_text("… 188 more actions: 188 SUCCEEDED", timeout=MS)
        drawn = [r.get_attribute("data-action") for r in page.locator("#tree .action").all()]
        guarded = [n for n in drawn if n is not None and 1 <= int(n[1:]) <= 200]
        # The first ten, then guarded(37) and guarded(137): SUCCEEDED, each with its
        # FAILED child drawn below it.
        assert guarded == [*(f"a{i}" for i in range(1, 11)), "a38", "a138"]
        failed = page.locator('#tree .action[data-phase="FAILED"]')
        playwright_api.expect(failed).to_have_count(2, timeout=MS)  # under a38 and a138
        assert page.errors == []
        page.context.close()

    site.run(body)


def test_the_run_page_plots_each_trials_curve_and_says_why_one_was_pruned(site: Site) -> None:
    env = flowsdk.TaskEnvironment("b_curves")

    @env.task
    async def trial(rate: float) -> float:
        for step in range(6):
            await flowsdk.report(1 / (step + 1) + rate, step=step, name="loss")
        return rate

    @env.task
    async def study() -> None:
        def prune(report: flowsdk.Report) -> None:
            if report.value > 0.9 and report.step == 2:
                report.cancel("<b>pruned</b> by MedianPruner at step 2 (value 1.2; median 0.5)")

        await asyncio.gather(
            *(flowsdk.follow(trial(r), prune) for r in (0.1, 0.2, 0.9)), return_exceptions=True
        )

    flowsdk.run(study, name="b-curves", store=site.store)

    def body() -> None:
        page = site.page("/runs/b-curves", role="viewer")
        curves = page.locator("svg.curves polyline.curve")
        playwright_api.expect(curves).to_have_count(3, timeout=MS)
        pruned = page.locator("svg.curves polyline.pruned")  # once the actions' phases are in
        playwright_api.expect(pruned).to_have_count(1, timeout=MS)
        playwright_api.expect(pruned).to_have_attribute("data-action", "a3", timeout=MS)
        why = pruned.locator("title")
        playwright_api.expect(why).to_contain_text(
            "<b>pruned</b> by MedianPruner at step 2", timeout=MS
        )
        playwright_api.expect(why).to_contain_text("ABORTED", timeout=MS)
        assert pruned.locator("title b").count() == 0
        assert page.errors == []
        page.context.close()

    site.run(body)
