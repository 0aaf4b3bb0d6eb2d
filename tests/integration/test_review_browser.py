"""The review pages in a real headless Chromium: a receiving technician logs in, opens an exception
whose evidence table highlights the mismatch, accepts it, and the release reaches the lot's story.

Uses Debian's /usr/bin/chromium through Playwright for Python (no ``playwright install``). Also
writes the README's screenshots to docs/screenshots/.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from lotflow.audit import why

from .pipeline import PROJECT_ROOT
from .review_fixtures import PASSWORD, Service, service, wait_until

__all__ = ["service"]  # the fixture, imported for pytest

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - `make install` installs it
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic"]
SCREENSHOTS = PROJECT_ROOT / "docs" / "screenshots"
# reasons whose evidence marks a cell of the receipt-against-PO table
HIGHLIGHTED = {"QUANTITY_OVER", "QUANTITY_SHORT", "DUPLICATE_RECEIPT", "MISSING_COA"}

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not found (apt-get install chromium)"),
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not importable (pip install playwright)"),
]


def _released(service: Service, target: dict[str, Any]) -> list[str]:
    """The lines of the receipt's story that show one of the exception's lots released by rita."""
    story = why(service.client, service.settings.clickhouse_database, target["subject_id"])
    return [line for line in story for lot in target["lot_ids"] if f" {lot}: RELEASED (by rita)" in line]


def test_a_receiving_technician_accepts_an_exception_in_the_browser(service: Service) -> None:
    assert sync_playwright is not None
    candidates = [e for e in service.open_in("receiving", "rita") if HIGHLIGHTED & set(e["reason_codes"])]
    if not candidates:
        pytest.fail(f"no open receiving exception with one of {sorted(HIGHLIGHTED)}: "
                    "the simulator's default faults should produce some")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)

            # not logged in: the queue sends the browser to the login page
            page.goto(f"{service.url}/queue/receiving")
            expect(page).to_have_url(re.compile(r"/login\?next=/queue/receiving$"))
            page.fill("#username", "rita")
            page.fill("#password", PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(re.compile(r"/queue/receiving$"))
            expect(page.locator("header .me")).to_contain_text("rita")

            on_page = set(page.locator("table#queue tbody tr[data-id]").evaluate_all(
                "rows => rows.map(r => r.dataset.id)"))
            shown = [e for e in candidates if e["id"] in on_page]
            assert shown, f"none of {len(candidates)} highlighted exceptions is on the queue page ({len(on_page)} rows)"
            target = shown[0]
            row = page.locator(f'table#queue tr[data-id="{target["id"]}"]')
            expect(row).to_be_visible()
            page.screenshot(path=str(SCREENSHOTS / "review-queue.png"), full_page=True)

            row.get_by_role("link").click()
            page.wait_for_url(f"{service.url}/exceptions/**")
            expect(page.locator("h1")).to_contain_text(target["id"])
            mismatch = page.locator("table#evidence .mismatch").first
            expect(mismatch).to_be_visible()
            page.screenshot(path=str(SCREENSHOTS / "review-exception.png"), full_page=True)

            form = page.locator("form#decide")
            form.locator("select#resolution").select_option(label="Accept")
            form.locator("textarea#reasoning").fill("Recounted the pallets with the driver: the slip is right.")
            form.locator("input#certainty").fill("85")
            form.get_by_role("button", name="Record decision").click()

            page.wait_for_url(re.compile(r"/queue/receiving\?decided="))
            expect(page.locator("[role=status]")).to_contain_text(target["id"])
            expect(page.locator("table#queue")).to_be_visible()
            expect(page.locator(f'table#queue tr[data-id="{target["id"]}"]')).to_have_count(0)
        finally:
            browser.close()

    assert target["id"] not in {e["id"] for e in service.open_in("receiving", "rita")}
    # the worker applies the decision, the sink stores the lot's release
    wait_until(f"a RELEASED lot event for {target['lot_ids']} in the story of {target['subject_id']}",
               lambda: bool(_released(service, target)), timeout=120)
    assert _released(service, target)
