"""A real browser (Playwright driving Debian's Chromium) on the labelling page: log in with a token, rank
items with the mouse and with the keyboard alone, skip one, mark one "none is acceptable", see a response
holding <script> shown as text, then check the export and the admin's view.

Skipped, with the reason, where Playwright or Chromium is missing; under CI (CI=true) that fails instead:
`.ci/run` installs Chromium with apt and Playwright comes with the test extra."""

import json
import os
import shutil
from pathlib import Path

import pytest

from rlhfkit.cli import main

from .helpers import SCRIPT, Server, make_project, tokens


def browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install playwright; it is in the test extra)"
    else:
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium:
            return sync_playwright, chromium
        reason = "Debian's chromium is not installed (apt-get install chromium; .ci/run does it)"
    if os.environ.get("CI"):
        pytest.fail(f"the browser test must run in CI: {reason}")
    pytest.skip(reason)


def test_rank_with_mouse_and_keyboard_scripts_show_as_text_and_export(tmp_path, capsys):
    sync_playwright, chromium = browser_or_skip()
    project = make_project(tmp_path, n=5, k=3)
    keys = tokens(project, "alice", admin="boss")
    dialogs = []
    with Server(project) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")

        # Log in with the token.
        page.fill("#token", "1.not-a-token")
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#login-error:has-text('not accepted')")
        page.fill("#token", keys["alice"])
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#item-id:has-text('item 1')")
        assert page.inner_text("#who") == "alice"
        page.wait_for_selector("#progress:has-text('done 0 · remaining 5')")
        assert page.inner_text("#guidelines") == "Prefer the helpful answer.\nTies are fine."

        # Model output is text: the script tag shows as characters and never runs or becomes an element.
        card = "#responses li[data-index='{}']"
        assert page.inner_text(card.format(1) + " .text") == f"Try this: {SCRIPT} <b>bold?</b>"
        assert page.locator("#responses script, #responses b").count() == 0
        shot = tmp_path / "labelling.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("RLHFKIT_SCREENSHOT"):  # how docs/labelling.png is made
            shutil.copy(shot, os.environ["RLHFKIT_SCREENSHOT"])

        # Item 1, with the mouse: drag response C above A (order C, A, B), then submit.
        page.locator(card.format(2)).drag_to(page.locator(card.format(0)), target_position={"x": 60, "y": 6})
        assert [page.get_attribute(f"#responses li:nth-child({i})", "data-index") for i in (1, 2, 3)] == ["2", "0", "1"]
        assert page.inner_text(card.format(2) + " .rank") == "1"
        page.click("#submit")
        page.wait_for_selector("#item-id:has-text('item 2')")

        # Item 2, with the keyboard alone: the first response has the focus.
        page.keyboard.press("ArrowDown")        # focus B
        page.keyboard.press("Shift+ArrowUp")    # move B to the top: B, A, C
        page.keyboard.press("ArrowDown")        # focus A
        page.keyboard.press("ArrowDown")        # focus C
        page.keyboard.press("t")                # C ties with A, above it
        assert [page.inner_text(card.format(i) + " .rank") for i in (0, 1, 2)] == ["2", "1", "2"]
        page.keyboard.press("Tab")              # to the comment box
        page.keyboard.type("A and C are as good")
        page.keyboard.press("Control+Enter")
        page.wait_for_selector("#item-id:has-text('item 3')")

        # Item 3, with the mouse again: A down twice with its buttons (B, C, A), a comment, submit.
        page.click(card.format(0) + " button.down")
        page.click(card.format(0) + " button.down")
        page.click("#comment")
        page.keyboard.type("B is best")
        page.click("#submit")
        page.wait_for_selector("#item-id:has-text('item 4')")
        page.click("#skip")
        page.wait_for_selector("#item-id:has-text('item 5')")
        page.click("#none")
        page.wait_for_selector("#done:visible")
        page.wait_for_selector("#progress:has-text('done 5 · remaining 0')")

        # The admin sees alice's counts.
        page.click("#logout")
        page.fill("#token", keys["boss"])
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#admin-table tbody tr")
        assert page.inner_text("#admin-table tbody tr").split("\t")[:5] == ["alice", "3", "1", "1", "0"]
        assert "4 of 5 items complete" in page.inner_text("#admin-summary")  # the skipped one waits for someone
        browser.close()
    assert dialogs == [] and errors == []

    assert main(["label", "export", str(project), "--output-dir", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    labels = {row["item_id"]: row for row in map(json.loads, Path(tmp_path / "out" / "labels.jsonl").read_text().splitlines())}
    assert [labels[i]["ranks"] for i in (1, 2, 3)] == [[2, 3, 1], [2, 1, 2], [3, 1, 2]]
    assert (labels[2]["comment"], labels[3]["comment"]) == ("A and C are as good", "B is best")
    assert labels[4]["skip"] and labels[5]["none_acceptable"]
    prefs = [json.loads(line) for line in (tmp_path / "out" / "preferences.jsonl").read_text().splitlines()]
    letters = {f"Answer {c} to question {q}.": c for q in range(1, 6) for c in "ABC"}
    letters[f"Try this: {SCRIPT} <b>bold?</b>"] = "B"
    assert [(p["item_id"], letters[p["chosen"]] + ">" + letters[p["rejected"]]) for p in prefs] == [
        (1, "C>A"), (1, "C>B"), (1, "A>B"),
        (2, "B>A"), (2, "B>C"),             # A and C tied: no pair between them
        (3, "B>C"), (3, "B>A"), (3, "C>A")]
