"""Drive the feature browser in headless Chromium (Debian's `chromium`, through Playwright; no browser is
downloaded): open index.html from file://, go to a dictionary, search, open the first feature found, and record
console errors and every request. The test uses it; so does the screenshot in docs/browser.md:

    .venv/bin/python tests/browse_page.py eval/browser/index.html csae/layer_3 species examples/feature-browser.png
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@dataclass
class PageLog:
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@contextmanager
def chromium_page(width: int = 1280, height: int = 900) -> Iterator[tuple[Any, PageLog]]:
    """A headless Chromium page and the log of its console errors, page errors and requests."""
    from playwright.sync_api import sync_playwright

    log = PageLog()
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": height})
        page.on("console", lambda msg: log.errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda err: log.errors.append(str(err)))
        page.on("request", lambda req: log.requests.append(req.url))
        try:
            yield page, log
        finally:
            browser.close()


def open_first_match(page: Any, index: Path, key: str, query: str) -> int:
    """From index.html: click the dictionary `key`, search `query`, click the first feature listed; returns its id."""
    page.goto(Path(index).resolve().as_uri())
    page.click(f'a.dict-link[href="#d={quote(key, safe="")}"]')
    page.wait_for_selector("#search")
    page.fill("#search", query)
    first = page.wait_for_selector("tr.feature-row")
    feature = int(first.get_attribute("data-f"))
    first.query_selector("a").click()
    page.wait_for_selector(f'#feature[data-f="{feature}"]')
    return feature


def main(index: str, key: str, query: str, out: str) -> None:
    with chromium_page(1100, 1000) as (page, log):
        feature = open_first_match(page, Path(index), key, query)
        page.screenshot(path=out, full_page=False)
    print(f"{key} feature {feature}: wrote {out}; console errors {log.errors}")


if __name__ == "__main__":
    main(*sys.argv[1:])
