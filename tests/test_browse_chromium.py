"""The browser in headless Chromium from file://: no console error, no request leaving the file system, the search
finds the planted feature, and its page shows 20 contexts with the planted token marked as each one's token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from browse_page import CHROMIUM, chromium_page, open_first_match
from planted_site import HIGH_LEVEL, PLANTED_WORD


def test_planted_feature_in_headless_chromium(planted_site: dict[str, Any], tmp_path: Path) -> None:
    assert Path(CHROMIUM).exists(), "install Debian's chromium (`apt-get install chromium`; .ci/run does)"
    index = planted_site["out"] / "index.html"
    with chromium_page() as (page, log):
        feature = open_first_match(page, index, "csae/layer_1", PLANTED_WORD)
        assert feature == 0  # ranked first: all 20 of its top contexts have the word as their token
        contexts = page.query_selector_all("#top-contexts .context.top")
        assert len(contexts) == 20
        marked = [c.query_selector_all(".tok.max") for c in contexts]
        assert all(len(m) == 1 and m[0].inner_text().strip() == PLANTED_WORD for m in marked)
        assert page.query_selector(".logits-up li").inner_text().split()[-1] == '"brain"'
        match = page.query_selector('a[href^="#d=baseline%2Flayer_1&f="]')  # its best match in the other run
        match.click()
        page.wait_for_selector('#feature[data-f]')
        assert "baseline layer 1 feature" in page.inner_text("#feature")
        page.go_back()
        page.wait_for_selector('#feature[data-f="0"]')
        tsae = page.query_selector('p.match a[href^="#d=tsae%2Flayer_1&f="]')  # and in the third run
        assert tsae is not None and "tsae #" in tsae.inner_text()
        page.goto(index.resolve().as_uri() + "#d=tsae%2Flayer_1")  # the T-SAE's block is marked and filterable
        page.wait_for_selector("#block-note")
        page.uncheck("#hide-dead")
        page.fill("#dense", "100")
        page.check("#block-only")
        shown = [int(r.get_attribute("data-f")) for r in page.query_selector_all("tr.feature-row")]
        assert shown and all(f < HIGH_LEVEL for f in shown)
        assert all(r.query_selector(".hl") for r in page.query_selector_all("tr.feature-row"))
        page.goto(index.resolve().as_uri() + "#d=csae%2Flayer_1&f=0")
        page.wait_for_selector('#feature[data-f="0"]')
        shot = tmp_path / "feature.png"
        page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    assert not log.errors, log.errors
    assert log.requests and all(url.startswith("file://") for url in log.requests), log.requests
