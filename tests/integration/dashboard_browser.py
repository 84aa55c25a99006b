"""Open the tun2socks dashboard in headless Chromium (Debian's, driven by Playwright) and report
what a person would see, as one JSON object on stdout. Run inside the bed's client namespace.

It waits until the live chart holds several samples with traffic in them and the connection
table lists a row for `--expect`, saves a screenshot, then (with --close) presses that row's
close button and waits for the row to go away. Every wait is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import json
import sys

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
# Debian's chromium as root in a namespace: no sandbox, nothing that phones home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CHART_READY = """() => {
    const chart = document.getElementById("chart");
    return Number(chart.dataset.samples) >= 4 && Number(chart.dataset.maxRate) > 0;
}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--expect", required=True, help="a destination the table must show")
    parser.add_argument("--screenshot", required=True)
    parser.add_argument("--close", action="store_true", help="then press that row's button")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for each wait")
    args = parser.parse_args(argv)
    wait_ms = args.timeout * 1000
    result: dict[str, object] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=wait_ms
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 960})
            page.set_default_timeout(wait_ms)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(args.url)
            try:
                page.wait_for_function(CHART_READY)
                row = page.locator("#connections tbody tr", has_text=args.expect)
                row.first.wait_for()
                page.wait_for_timeout(1500)  # one more update with a rate in the row
                result["row"] = row.first.inner_text().split("\t")
            finally:
                page.screenshot(path=args.screenshot, full_page=True)
                chart = page.locator("#chart")
                result["samples"] = int(chart.get_attribute("data-samples") or 0)
                result["max_rate"] = float(chart.get_attribute("data-max-rate") or 0)
                result["status"] = page.locator("#status").inner_text()
                result["errors"] = errors
            if args.close:
                row.first.get_by_role("button", name="close").click()
                row.first.wait_for(state="detached")
                result["closed"] = True
        except PlaywrightError as exc:
            result["error"] = str(exc).splitlines()[0]
        finally:
            browser.close()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
