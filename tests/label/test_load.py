"""Load: 20 annotators at once, 50 submissions each, against a live server. No label lost or duplicated,
no item beyond its overlap; p95 latency and throughput printed (`pytest -s` shows them)."""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from rlhfkit.label.store import Store  # noqa: E402

from .helpers import Server, bearer, make_project, percentile, tokens  # noqa: E402

# 600 items x overlap 2 = 1200 places for 1000 submissions: at every moment each annotator has items left that
# they have not seen (with exactly 1000 places, the last free place may sit on an item its annotator did).
ANNOTATORS, SUBMISSIONS, OVERLAP, ITEMS = 20, 50, 2, 600


def test_20_annotators_x_50_submissions_lose_and_duplicate_nothing(tmp_path):
    project = make_project(tmp_path, n=ITEMS, k=4, overlap=OVERLAP)
    names = [f"annotator{i:02d}" for i in range(ANNOTATORS)]
    keys = tokens(project, *names)
    gets, posts, acked, errors = [], [], {}, []
    lock = threading.Lock()
    start = threading.Barrier(ANNOTATORS)

    def work(name):
        rng = random.Random(name)
        with httpx.Client(base_url=server.url, headers=bearer(keys[name]), timeout=60) as http:
            start.wait()
            for _ in range(SUBMISSIONS):
                t0 = time.perf_counter()
                item = http.get("/api/next")
                t1 = time.perf_counter()
                if item.status_code != 200:
                    errors.append((name, "next", item.status_code, item.text))
                    return
                item_id = item.json()["item_id"]
                ranks = rng.sample(range(1, 5), 4) if rng.random() < 0.8 else [1, 1, 3, 4]
                body = {"item_id": item_id, "ranks": ranks} if rng.random() < 0.95 else {"item_id": item_id,
                                                                                        "none_acceptable": True}
                answer = http.post("/api/labels", json=body)
                t2 = time.perf_counter()
                with lock:
                    gets.append(t1 - t0)
                    posts.append(t2 - t1)
                    if answer.status_code != 200:
                        errors.append((name, "post", answer.status_code, answer.text))
                        return
                    assert (item_id, name) not in acked, "the same item handed twice to one annotator"
                    acked[item_id, name] = answer.json()

    with Server(project) as server:
        began = time.perf_counter()
        with ThreadPoolExecutor(ANNOTATORS) as pool:
            list(pool.map(work, names))
        elapsed = time.perf_counter() - began

    assert not errors, errors[:5]
    assert len(acked) == ANNOTATORS * SUBMISSIONS
    stored = Store(project).labels()
    keys_stored = [(label["item_id"], label["annotator"]) for label in stored]
    assert len(keys_stored) == len(set(keys_stored)) == ANNOTATORS * SUBMISSIONS  # nothing duplicated
    assert set(keys_stored) == set(acked)  # nothing lost, nothing unacknowledged
    for label in stored:
        assert label == acked[label["item_id"], label["annotator"]]  # exactly what was acknowledged
    per_item = {}
    for item_id, _ in keys_stored:
        per_item[item_id] = per_item.get(item_id, 0) + 1
    assert max(per_item.values()) == OVERLAP  # never beyond the overlap
    assert sum(per_item.values()) == ANNOTATORS * SUBMISSIONS
    requests = len(gets) + len(posts)
    print(f"\nload: {ANNOTATORS} annotators x {SUBMISSIONS} submissions in {elapsed:.1f} s: "
          f"{requests / elapsed:.0f} requests/s, {len(posts) / elapsed:.0f} labels/s; "
          f"p50/p95/max GET /api/next {percentile(gets, 50) * 1e3:.0f}/{percentile(gets, 95) * 1e3:.0f}/"
          f"{max(gets) * 1e3:.0f} ms, POST /api/labels {percentile(posts, 50) * 1e3:.0f}/"
          f"{percentile(posts, 95) * 1e3:.0f}/{max(posts) * 1e3:.0f} ms")
