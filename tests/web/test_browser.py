"""The page in a real browser (Playwright driving Debian's chromium; skipped without one):
generate from the untouched form on a class and a text model and watch progress reach 100%,
find the images in the gallery after a restart, vote A/B and see the ranking change, cancel
a long job, two browser contexts at once.  ``DIFFLAB_SCREENSHOTS=DIR`` saves a screenshot of
each page there (docs/img/ holds the committed ones)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from web_helpers import start

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")
SHOTS = os.environ.get("DIFFLAB_SCREENSHOTS")


def _shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"web_{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def _generate(page, timeout: float = 30_000) -> None:
    page.click("#gen-go")
    page.wait_for_function(
        "document.getElementById('gen-text').textContent.startsWith('done: 100%')",
        timeout=timeout,
    )
    assert page.locator("#gen-bar").evaluate("b => b.value") == 100
    page.wait_for_function("document.getElementById('gen-result').naturalWidth > 0")


def test_default_form_generates_on_a_class_model_and_the_gallery_survives_a_restart(
    browser, runs, tmp_path
):
    srv = start(runs["class"], data_dir=tmp_path)
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(srv.url)
        _generate(page)
        assert page.locator("#gen-error").is_hidden()
        assert "saved 4 to the gallery" in page.locator("#gen-caption").text_content()
        _shot(page, "generate")
        bad = page.locator("input[name=seed]")
        bad.fill("12345678901234567890")
        page.click("#gen-go")
        page.wait_for_selector("#gen-error:not([hidden])")
        assert "seed must be an integer" in page.locator("#gen-error").text_content()
    finally:
        srv.stop()
    srv = start(runs["class"], data_dir=tmp_path)  # a restarted server
    try:
        page.goto(srv.url)
        page.click("nav button[data-tab=gallery]")
        page.wait_for_function("document.querySelectorAll('#gal-grid img').length == 4")
        page.locator("#gal-grid img").first.click()
        assert '"seed"' in page.locator("#gal-params").text_content()
        _shot(page, "gallery")
        page.click("#gal-use")
        assert page.locator("#generate").is_visible()
        assert page.locator("input[name=n]").input_value() == "1"
    finally:
        srv.stop()


def test_default_form_generates_on_a_text_model(browser, runs, tmp_path):
    srv = start(runs["text"], data_dir=tmp_path)
    try:
        page = browser.new_page()
        page.goto(srv.url)
        assert page.locator("input[name=prompt]").input_value() != ""
        _generate(page)
        _shot(page, "generate_text")
    finally:
        srv.stop()


def test_ab_votes_change_the_ranking(browser, runs, tmp_path):
    srv = start(runs["class"], data_dir=tmp_path)
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(srv.url)
        page.click("nav button[data-tab=ab]")
        page.click("#ab-form button[type=submit]")
        rows = page.locator("#ab-ranking tr")
        seen = []
        for i, choice in enumerate(("left", "tie", "both_bad")):
            page.wait_for_selector(f"button[data-vote={choice}]:not([disabled])")
            page.wait_for_function("document.getElementById('ab-left').naturalWidth > 0")
            page.click(f"button[data-vote={choice}]")
            page.wait_for_function(
                f"document.getElementById('ab-ranking').dataset.votes == '{i + 1}'"
            )
            assert rows.count() == 3  # header + the two configurations
            seen.append([float(rows.nth(r).locator("td").nth(2).text_content()) for r in (1, 2)])
        assert seen[0][0] > 0 > seen[0][1]  # one win: a leader
        assert 0 < seen[1][0] < seen[0][0]  # a tie pulls the two together
        tallies = rows.nth(1).locator("td").nth(5).text_content()
        assert tallies in ("1/0/1/1", "0/1/1/1")  # W/L/T/both-bad
        _shot(page, "ab")
    finally:
        srv.stop()


def test_cancel_a_long_job_and_two_contexts_at_once(browser, runs, tmp_path):
    srv = start(runs["class"], data_dir=tmp_path)
    try:
        one, two = browser.new_context(), browser.new_context()
        a, b = one.new_page(), two.new_page()
        for page in (a, b):
            page.goto(srv.url)
        a.fill("input[name=steps]", "1000")
        a.click("#gen-go")
        a.wait_for_function("document.getElementById('gen-bar').value > 0")
        b.click("#gen-go")  # queued behind a's job
        b.wait_for_function("document.getElementById('gen-text').textContent.startsWith('queued')")
        _shot(b, "queued")
        a.click("#gen-cancel")
        a.wait_for_function("document.getElementById('gen-text').textContent == 'cancelled'")
        b.wait_for_function(
            "document.getElementById('gen-text').textContent.startsWith('done: 100%')"
        )
        one.close()
        two.close()
    finally:
        srv.stop()


def test_sweep_results_are_shown(browser, runs, tmp_path):
    from difflab.images import new_figure, save_figure

    folder = runs["class"] / "sweep"
    folder.mkdir(exist_ok=True)
    (folder / "sweep.csv").write_text("sampler,steps,nfe,fid\nddim,4,4,31.2\nddim,8,8,18.9\n")
    fig, axes = new_figure(1, 1)
    ax = axes[0][0]
    ax.plot([4, 8], [31.2, 18.9], marker="o")
    ax.set_xlabel("NFE")
    ax.set_ylabel("FID")
    save_figure(fig, folder / "sweep_nfe.png")
    srv = start(runs["class"], data_dir=tmp_path)
    try:
        page = browser.new_page()
        page.goto(srv.url)
        page.click("nav button[data-tab=sweeps]")
        page.wait_for_selector("table.sweep")
        assert page.locator("table.sweep tr").count() == 3
        page.wait_for_function("document.querySelector('img.plot').naturalWidth > 0")
        _shot(page, "sweeps")
    finally:
        srv.stop()
