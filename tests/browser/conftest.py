"""A real Chromium (Debian's `chromium` package, which `make test` installs) driven by Playwright
from PyPI through `executable_path`: no browser is downloaded. The pages are served by a live
`amber serve` with its training worker, on the real default model.

axe-core (from the npm registry, installed by `make test` under .venv-clients/) is evaluated in
the page for the accessibility checks. AMBER_WRITE_SCREENSHOTS=1 also saves each page's screenshot
under docs/screenshots/ (what the README shows).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.api.conftest import live_server, registry

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("AMBER_CHROMIUM", "/usr/bin/chromium"))
AXE = Path(os.environ.get("AMBER_AXE", REPO / ".venv-clients/axe-core-4.14.1/node_modules/axe-core/axe.min.js"))
SCREENSHOTS = REPO / "docs/screenshots"
# Headless, and quiet: this machine's network is closed, so nothing that phones home.
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic"]
LAPTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def studio(default_checkpoint, tiny_checkpoint, tmp_path_factory):
    """`amber serve` with its worker: keys for alice (`key`) and bob (`other_key`)."""
    text = registry(default_checkpoint, tiny_checkpoint)
    with live_server(tmp_path_factory.mktemp("studio-home"), text) as server:
        yield server


@pytest.fixture(scope="module")  # not session: Playwright's sync API holds an asyncio loop in this
def browser():                    # thread while it runs, and later tests' asyncio.run() would fail
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium package"
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def axe_source() -> str:
    assert AXE.exists(), f"{AXE} is missing: `make test` installs axe-core from the npm registry"
    return AXE.read_text()


class Watch:
    """What a page did that it must not: script errors, dialogs (an XSS would alert), requests whose
    URL holds the key."""

    def __init__(self, page, key: str):
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.leaks: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and "Failed to load resource" not in m.text
                and self.errors.append(m.text))
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("request", lambda r: key in r.url and self.leaks.append(r.url))

    def clean(self) -> None:
        assert not self.errors, self.errors
        assert not self.dialogs, self.dialogs
        assert not self.leaks, self.leaks


def sign_in(page, url: str, key: str) -> None:
    page.goto(f"{url}/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Playground").wait_for()


def screenshot(page, name: str, full_page: bool = True) -> None:
    if os.environ.get("AMBER_WRITE_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)


def axe_violations(page, axe_source: str) -> list[dict]:
    """axe-core's serious and critical violations on the page as it stands (WCAG 2.x A and AA)."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(axe_source)
    found = page.evaluate("""() => axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}})
        .then(r => r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                           nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))})))""")
    return [v for v in found if v["impact"] in ("serious", "critical")]
