"""The operator console in a real browser (Debian's headless Chromium via Selenium) against
the real daemon: find a delivery, open it and its sandboxed HTML, requeue a dead letter with
the operator token, read the dev inbox, and a hostile subject that stays text.

Screenshots of every page go to ``<tmp_path>/screenshots`` (printed, for a reviewer). Without
Chromium the test is skipped — except in CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.pipeline.reports import ReportIntake
from maildaemon.reports.model import Incoming
from maildaemon.store.pipeline.db import Store
from maildaemon.store.reports.db import ReportStore
from tests import reports_corpus
from tests.integration.test_api import TOKEN, MakeSettings, settings_for
from tests.support import Db, command, running_app, xadd

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
HOSTILE = "<script>alert(1)</script>"
# The HTML part tries to run script and to load a remote image: neither may happen.
HOSTILE_HTML = (
    '<p id="canary">still here</p>'
    "<script>document.getElementById('canary').textContent = 'script ran'; alert(2)</script>"
    '<img id="remote" src="http://192.0.2.1/pixel.gif" alt="remote">'
)

pytestmark = pytest.mark.slow


def _need_browser() -> None:
    if CHROMIUM and CHROMEDRIVER:
        return
    message = "chromium and chromium-driver are needed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None
    options.binary_location = CHROMIUM
    for arg in (
        "--no-sandbox",
        "--headless=new",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1366,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The steps of the scenarios, run in a worker thread (the daemon serves in the loop)."""

    def __init__(self, driver: Any, base: str, shots: Path) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.d = driver
        self.base = base
        self.shots = shots
        self.wait = WebDriverWait(driver, 20)

    def open(self, fragment: str) -> None:
        self.d.get(f"{self.base}/console/{fragment}")

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        return self.wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, css)))

    def text_is(self, css: str, predicate: Callable[[str], bool]) -> str:
        from selenium.webdriver.common.by import By

        def check(d: Any) -> str | bool:
            try:
                text: str = d.find_element(By.CSS_SELECTOR, css).text
            except Exception:
                return False
            return text if predicate(text) else False

        result: str = self.wait.until(check)
        return result

    def shot(self, name: str) -> None:
        path = self.shots / f"{name}.png"
        self.d.save_screenshot(str(path))
        print(f"screenshot: {path}")

    def no_alert(self) -> None:
        from selenium.common.exceptions import NoAlertPresentException

        with pytest.raises(NoAlertPresentException):
            self.d.switch_to.alert.text  # noqa: B018 - reading it is the check

    def report_failure(self, name: str) -> None:
        """What a reviewer needs when a step fails: a screenshot, the page, the browser log."""
        self.shot(f"failed-{name}")
        print(f"failed at {self.d.current_url}\n{self.d.find_element('tag name', 'body').text}")
        for entry in self.d.get_log("browser"):
            print("browser log:", entry["level"], entry["message"])

    def js_errors(self) -> list[str]:
        entries = self.d.get_log("browser")
        return [e["message"] for e in entries if "Uncaught" in e["message"]]


def scenario_overview(p: Page) -> None:
    p.open("")
    figures = p.find("#figures")
    p.text_is("#figures", lambda t: "deliveries sent" in t)
    assert "dead letters unreviewed" in figures.text
    p.find(".chart svg.plot polyline")
    p.text_is(".legend", lambda t: "sent: 2" in t)
    p.shot("overview")


def scenario_find_and_open(p: Page) -> None:
    p.open("#/deliveries")
    p.find("#search-recipient").send_keys("carol@example.com")
    p.find("#delivery-search button[type=submit]").click()
    p.text_is("table.results tbody", lambda t: "find-me" in t and "dl-1" not in t)
    p.shot("deliveries-search")
    p.find("table.results tbody a").click()
    p.text_is("#delivery-status", lambda t: t == "sent")
    p.text_is("table.attempts tbody", lambda t: "250" in t)
    frame = p.find("iframe#html-frame")
    assert frame.get_attribute("sandbox") == ""
    p.shot("delivery-detail")
    p.d.switch_to.frame(frame)
    try:
        p.text_is("body", lambda t: "Hello Carol" in t)
    finally:
        p.d.switch_to.default_content()
    p.find("#tab-source").click()
    p.text_is("#source", lambda t: "Message-ID:" in t)
    p.find("#tab-headers").click()
    p.text_is("table.headers", lambda t: "Subject" in t)


def scenario_hostile_subject(p: Page) -> None:
    p.open("#/delivery/xss-1")
    assert p.text_is("#message-subject", lambda t: t == HOSTILE) == HOSTILE
    p.text_is("table.headers, #message", lambda t: HOSTILE in t)
    frame = p.find("iframe#html-frame")
    assert frame.get_attribute("sandbox") == ""
    p.no_alert()
    p.d.switch_to.frame(frame)
    try:
        assert p.text_is("#canary", lambda t: bool(t)) == "still here"  # the script never ran
        natural = p.d.execute_script("return document.getElementById('remote').naturalWidth")
        assert natural == 0  # the remote image was not loaded
    finally:
        p.d.switch_to.default_content()
    p.no_alert()
    p.d.execute_script("document.getElementById('message').scrollIntoView()")
    p.shot("hostile-subject")
    p.open("#/deliveries")
    p.text_is("table.results tbody", lambda t: "xss-1" in t)
    p.no_alert()


def scenario_requeue_dead_letter(p: Page) -> None:
    p.open("#/dead-letters")
    p.text_is("table.results tbody", lambda t: "dl-1" in t)
    p.shot("dead-letters")
    p.open("#/delivery/dl-1")
    p.text_is("#delivery-status", lambda t: t == "dead_letter")
    p.find("#requeue").click()
    p.find("#confirm-yes").click()
    p.text_is("#flash", lambda t: "operator token" in t)  # refused before any request
    p.find("#token").send_keys(TOKEN)
    p.find("#token-save").click()
    p.text_is("#token-state", lambda t: "kept" in t)
    p.find("#action-reason").send_keys("provider fixed")
    p.find("#requeue").click()
    p.find("#confirm-yes").click()
    p.text_is("#flash", lambda t: "dead_letter → queued" in t)
    p.text_is("#delivery-status", lambda t: t in ("queued", "sending", "sent"))
    p.shot("requeued")


def scenario_dev_inbox(p: Page) -> None:
    p.open("#/inbox")
    p.text_is("table.inbox tbody", lambda t: "carol@example.com" in t)
    p.shot("dev-inbox")
    links = p.d.find_elements("css selector", "table.inbox tbody a")
    assert links
    links[-1].click()
    p.text_is("#message-subject", lambda t: bool(t) and t != "\u2013")
    p.find("iframe#html-frame, #text-part")
    p.shot("dev-inbox-message")


def scenario_reports(p: Page) -> None:
    p.open("#/reports")
    p.text_is("table.reports tbody", lambda t: "complaint" in t and "find-me" in t)
    p.text_is("table.rates tbody", lambda t: "authsession" in t)
    p.shot("reports")
    p.find("table.reports tbody a").click()
    p.text_is("#delivery-status", lambda t: t == "sent")
    p.text_is("table.reports tbody", lambda t: "complained and suppressed" in t)


async def _complaint(settings: Any, original: bytes) -> None:
    """An ARF complaint about ``find-me``, through the daemon's report path."""
    store = await Store.open(settings.dsn, min_size=1, max_size=1)
    try:
        raw = reports_corpus.arf(original)
        await ReportIntake(settings, ReportStore(store.pool)).take(
            Incoming(raw, "ingest", None, (), len(raw))
        )
    finally:
        await store.close()


async def test_console_in_a_real_browser(
    browser: Any, make_settings: MakeSettings, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    smtp_sink.behaviour.rcpt_replies["bob@example.com"] = ["452 4.2.2 mailbox full"] * 2
    settings = settings_for(
        make_settings,
        retry_ladder="0.2s",
        bounce_domain="bounces.test.example",
        bounce_secret="s3cret-for-the-bounce-tests",
    )
    db = Db(settings.dsn)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"console screenshots in {shots}")
    assert smtp_sink.maildir is not None
    async with running_app(settings, dev_maildir=smtp_sink.maildir) as app:
        await xadd(
            settings,
            command(
                "find-me",
                to=["carol@example.com"],
                payload_mode="rendered",
                template_id=None,
                locale=None,
                variables=None,
                subject="Your order",
                text="Hello Carol",
                html="<h1 style='color:#1f5fbf'>Hello Carol</h1><p>Your order shipped.</p>",
            ),
            command("dl-1", idempotency_key="k-dl", to=["bob@example.com"]),
            command(
                "xss-1",
                idempotency_key="k-xss",
                to=["mallory@example.com"],
                payload_mode="rendered",
                template_id=None,
                locale=None,
                variables=None,
                subject=HOSTILE,
                text="see HTML",
                html=HOSTILE_HTML,
            ),
        )
        await db.wait_status("find-me", "sent")
        await db.wait_status("xss-1", "sent")
        await db.wait_status("dl-1", "dead_letter")
        found = [m.data for m in smtp_sink.messages if b"Hello Carol" in m.data]
        await _complaint(settings, found[0])
        page = Page(browser, f"http://127.0.0.1:{app.http_port}", shots)
        for scenario in (
            scenario_overview,
            scenario_find_and_open,
            scenario_hostile_subject,
            scenario_requeue_dead_letter,
            scenario_dev_inbox,
            scenario_reports,
        ):
            try:
                await asyncio.to_thread(scenario, page)
            except Exception:
                await asyncio.to_thread(page.report_failure, scenario.__name__)
                raise
        errors = await asyncio.to_thread(page.js_errors)
        assert errors == [], errors
        await db.wait_status("dl-1", "sent")
        actions = await db.fetch(
            "SELECT action, target, reason FROM mail.operator_actions ORDER BY id"
        )
        assert [(a["action"], a["target"], a["reason"]) for a in actions] == [
            ("delivery.requeue", "dl-1", "provider fixed")
        ]
    assert sorted(p.name for p in shots.iterdir()) == sorted(
        f"{n}.png"
        for n in (
            "overview",
            "deliveries-search",
            "delivery-detail",
            "hostile-subject",
            "dead-letters",
            "requeued",
            "dev-inbox",
            "dev-inbox-message",
            "reports",
        )
    )
