"""Nothing acknowledged is ever lost: annotators submit under load, the server is SIGKILLed, restarted on the
same file, and every label it acknowledged is there exactly once; retries of the requests cut off by the
kill are answered as if nothing had happened (stored once, or stored now)."""

import sqlite3
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from rlhfkit.label.store import Store  # noqa: E402

from .helpers import Server, bearer, make_project, tokens  # noqa: E402

WORKERS = 8


def test_sigkill_under_load_loses_no_acknowledged_label(tmp_path):
    project = make_project(tmp_path, n=2000, k=3)
    names = [f"a{i}" for i in range(WORKERS)]
    keys = tokens(project, *names)
    acked: dict[tuple[int, str], dict] = {}
    cut_off: dict[str, dict] = {}  # each worker's request that got no answer (it may or may not be stored)
    lock = threading.Lock()
    stop = threading.Event()
    server = Server(project).start()

    def work(name):
        with httpx.Client(base_url=server.url, headers=bearer(keys[name]), timeout=30) as http:
            for n in range(10_000):
                if stop.is_set():
                    return
                try:
                    item = http.get("/api/next")
                except httpx.HTTPError:
                    return
                body = {"item_id": item.json()["item_id"], "ranks": [1 + n % 3, 1 + (n + 1) % 3, 1 + (n + 2) % 3]}
                try:
                    answer = http.post("/api/labels", json=body)
                except httpx.HTTPError:
                    cut_off[name] = body
                    return
                assert answer.status_code == 200, answer.text
                with lock:
                    acked[body["item_id"], name] = answer.json()

    threads = [threading.Thread(target=work, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while len(acked) < 150 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.kill()  # SIGKILL, mid-stream: no shutdown, no checkpoint, requests in flight
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert len(acked) >= 150, "the load did not get going"
    print(f"\nsigkill: {len(acked)} labels acknowledged, {len(cut_off)} requests cut off by the kill")

    # The file is intact, and every acknowledged label is in it exactly once, as acknowledged.
    check = sqlite3.connect(project)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()
    stored = Store(project).labels()
    by_key = {}
    for label in stored:
        key = (label["item_id"], label["annotator"])
        assert key not in by_key, f"duplicated label {key}"
        by_key[key] = label
    for key, label in acked.items():
        assert by_key.get(key) == label, f"acknowledged label {key} lost or changed"
    assert len(stored) - len(acked) <= len(cut_off)  # only requests in flight at the kill may be unacknowledged

    # Restarted, the server answers the cut-off requests' retries: each label is then there exactly once.
    with Server(project) as again:
        for name, body in cut_off.items():
            retry = httpx.post(again.url + "/api/labels", headers=bearer(keys[name]), json=body, timeout=30)
            assert retry.status_code == 200, retry.text
            assert retry.json()["ranks"] == body["ranks"]
            acked[body["item_id"], name] = retry.json()
        for name, token in keys.items():  # and everyone carries on
            with httpx.Client(base_url=again.url, headers=bearer(token), timeout=30) as http:
                item = http.get("/api/next").json()["item_id"]
                answer = http.post("/api/labels", json={"item_id": item, "skip": True})
                assert answer.status_code == 200
                acked[item, name] = answer.json()
    final = Store(project).labels()
    keys_final = [(label["item_id"], label["annotator"]) for label in final]
    assert len(keys_final) == len(set(keys_final)) == len(acked)
    assert {k: l for k, l in zip(keys_final, final)} == acked
