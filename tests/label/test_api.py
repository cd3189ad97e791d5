"""The HTTP API against a live `rlhfkit label serve` on 127.0.0.1: the flow, isolation between annotators,
the admin view, and every bad request of the issue, one by one (a 4xx with a JSON message, never a 500)."""

import json
import re
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from .helpers import SCRIPT, Server, bearer, make_project, tokens  # noqa: E402


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    project = make_project(folder, n=12, k=3)
    keys = tokens(project, "alice", "bob", "carol", "dave", admin="boss")
    with Server(project) as server:
        yield server, keys


def client(server, token=None):
    return httpx.Client(base_url=server.url, headers=bearer(token) if token else {}, timeout=30)


def test_an_annotator_ranks_retries_and_sees_progress(live):
    server, keys = live
    with client(server, keys["alice"]) as alice:
        assert alice.get("/api/whoami").json() == {"name": "alice", "role": "annotator"}
        start = alice.get("/api/progress").json()
        assert start["annotator"] == "alice" and start["items"] == 12 and start["done"] == 0
        assert start["guidelines"] == "Prefer the helpful answer.\nTies are fine."
        item = alice.get("/api/next")
        assert item.status_code == 200
        body = item.json()
        assert set(body) == {"item_id", "prompt", "responses"} and len(body["responses"]) == 3
        if body["item_id"] == 1:
            assert SCRIPT in body["responses"][1]  # stored and served as data; the page shows it as text
        label = {"item_id": body["item_id"], "ranks": [2, 1, 2], "comment": "B is clearer"}
        first = alice.post("/api/labels", json=label)
        assert first.status_code == 200
        stored = first.json()
        assert (stored["item_id"], stored["ranks"], stored["comment"], stored["annotator"]) == (
            body["item_id"], [2, 1, 2], "B is clearer", "alice")
        retry = alice.post("/api/labels", json=label)
        assert retry.status_code == 200 and retry.json() == stored  # idempotent
        changed = alice.post("/api/labels", json={**label, "ranks": [1, 2, 3]})
        assert changed.status_code == 409 and "already labelled by you" in changed.json()["error"]
        assert alice.get("/api/progress").json()["done"] == 1
        assert [l["ranks"] for l in alice.get("/api/labels").json()["labels"]] == [[2, 1, 2]]


def test_annotators_cannot_read_or_change_each_others_labels(live):
    server, keys = live
    with client(server, keys["bob"]) as bob, client(server, keys["carol"]) as carol:
        bobs = bob.get("/api/next").json()["item_id"]
        carols = carol.get("/api/next").json()["item_id"]
        assert bobs != carols  # overlap 1: one annotator per item
        stolen = carol.post("/api/labels", json={"item_id": bobs, "ranks": [1, 2, 3]})
        assert stolen.status_code == 403
        assert stolen.json() == {"error": f"item {bobs} is not assigned to you (get items from GET /api/next)"}
        assert bob.post("/api/labels", json={"item_id": bobs, "skip": True}).status_code == 200
        assert carol.post("/api/labels", json={"item_id": bobs, "skip": True}).status_code == 403
        # Only one's own labels are listed; nothing of bob's shows up for carol.
        assert carol.get("/api/labels").json() == {"labels": []}
        assert [l["annotator"] for l in bob.get("/api/labels").json()["labels"]] == ["bob"]


def test_admin_sees_progress_counts_and_agreement_and_does_not_label(live):
    server, keys = live
    with client(server, keys["boss"]) as boss, client(server, keys["dave"]) as dave:
        item = dave.get("/api/next").json()["item_id"]
        assert dave.post("/api/labels", json={"item_id": item, "none_acceptable": True}).status_code == 200
        view = boss.get("/api/admin/progress")
        assert view.status_code == 200
        data = view.json()
        assert data["items"] == 12 and data["overlap"] == 1
        people = {p["name"]: p for p in data["annotators"]}
        assert set(people) == {"alice", "bob", "carol", "dave"}  # the admin is not an annotator
        assert people["dave"]["none_acceptable"] == 1 and people["dave"]["labels"] == 1
        assert "krippendorff_alpha_ordinal" in data["agreement"] and "kendall_w_mean" in data["agreement"]
        assert boss.get("/api/whoami").json()["role"] == "admin"
        refused = boss.get("/api/next")
        assert refused.status_code == 403 and "admin token does not label" in refused.json()["error"]
        assert boss.post("/api/labels", json={"item_id": 1, "skip": True}).status_code == 403
        assert dave.get("/api/admin/progress").status_code == 403
        assert dave.get("/api/admin/progress").json() == {"error": "this needs an admin token"}


def test_the_page_is_self_contained_and_locked_down(live):
    server, _ = live
    with client(server) as anyone:
        page = anyone.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        script = anyone.get("/static/app.js").text
        style = anyone.get("/static/style.css").text
        assert anyone.get("/static/style.css").status_code == 200
        for text in (page.text, script, style):  # no CDN, no remote font: works offline
            assert not re.search(r"(src|href)=[\"']?https?://|@import|url\(\s*[\"']?https?:", text)
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", script)
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"


BIG = b'{"item_id": 1, "comment": "' + b"x" * (1 << 20) + b'"}'


def bad_requests(item_of_other):
    """(what, method, path, headers, raw body, status, message): the issue's bad requests and a few more."""
    good = "GOOD"  # replaced by alice's token
    return [
        ("no token", "GET", "/api/next", {}, None, 401, "missing token: send the header 'Authorization: Bearer TOKEN'"),
        ("no token on POST", "POST", "/api/labels", {}, b'{"item_id": 1, "skip": true}', 401, "missing token"),
        ("wrong token", "GET", "/api/progress", {"Authorization": "Bearer 1.wrong"}, None, 401, "invalid token"),
        ("not a bearer token", "GET", "/api/next", {"Authorization": "Basic YWxpY2U6eA=="}, None, 401, "missing token"),
        ("malformed JSON", "POST", "/api/labels", good, b'{"item_id": 1, "ranks": [1, 2', 400,
         "request body is not valid JSON: Expecting ',' delimiter (line 1, column 30)"),
        ("empty body", "POST", "/api/labels", good, b"", 400, "empty request body: send a JSON object"),
        ("not UTF-8", "POST", "/api/labels", good, b'{"item_id": 1, "comment": "\xff"}', 400, "request body is not UTF-8"),
        ("NaN", "POST", "/api/labels", good, b'{"item_id": 1, "ranks": [NaN, 1, 2]}', 400, "NaN is not a JSON number"),
        ("nested too deep", "POST", "/api/labels", good, b"[" * 200_000 + b"]" * 200_000, 400, "not valid JSON"),
        ("a list, not an object", "POST", "/api/labels", good, b"[1, 2, 3]", 400, "the body must be a JSON object"),
        ("no item_id", "POST", "/api/labels", good, b'{"ranks": [1, 2, 3]}', 400, "field 'item_id': missing"),
        ("item_id as text", "POST", "/api/labels", good, b'{"item_id": "1", "ranks": [1, 2, 3]}', 400,
         "field 'item_id': must be an integer"),
        ("unknown field", "POST", "/api/labels", good, b'{"item_id": 1, "rank": [1, 2, 3]}', 400,
         "unknown field 'rank' (fields: item_id, ranks, skip, none_acceptable, comment)"),
        ("no answer", "POST", "/api/labels", good, b'{"item_id": 1}', 400,
         "give 'ranks' (one per response, 1 = best, equal = tie), or 'skip': true, or 'none_acceptable': true"),
        ("two answers", "POST", "/api/labels", good, b'{"item_id": 1, "ranks": [1, 2, 3], "skip": true}', 400,
         "give only one of ranks, skip and none_acceptable, got ranks and skip"),
        ("skip not a boolean", "POST", "/api/labels", good, b'{"item_id": 1, "skip": "yes"}', 400,
         "field 'skip': must be true or false"),
        ("ranks not a list", "POST", "/api/labels", good, b'{"item_id": 1, "ranks": "1,2,3"}', 400,
         "field 'ranks': must be a list of integers"),
        ("ranks of text", "POST", "/api/labels", good, b'{"item_id": 1, "ranks": ["1", 2, 3]}', 422,
         "field 'ranks[0]': must be an integer"),
        ("ranks of floats", "POST", "/api/labels", good, b'{"item_id": 1, "ranks": [1.5, 2, 3]}', 422,
         "field 'ranks[0]': must be an integer"),
        ("too few ranks", "POST", "/api/labels", good, b'{"item_id": 1, "ranks": [1, 2]}', 422,
         "field 'ranks': item 1 has 3 responses, got 2 ranks"),
        ("rank out of range", "POST", "/api/labels", good, b'{"item_id": 1, "ranks": [1, 2, 9]}', 422,
         "field 'ranks[2]': 9 is not between 1 (best) and 3"),
        ("comment not text", "POST", "/api/labels", good, b'{"item_id": 1, "skip": true, "comment": 5}', 400,
         "field 'comment': must be a string"),
        ("comment too long", "POST", "/api/labels", good,
         json.dumps({"item_id": 1, "skip": True, "comment": "x" * 10_001}).encode(), 422,
         "field 'comment': 10,001 characters, over the limit of 10,000"),
        ("unknown item", "POST", "/api/labels", good, b'{"item_id": 999, "ranks": [1, 2, 3]}', 404, "unknown item 999"),
        ("another annotator's item", "POST", "/api/labels", good,
         json.dumps({"item_id": item_of_other, "ranks": [1, 2, 3]}).encode(), 403,
         f"item {item_of_other} is not assigned to you (get items from GET /api/next)"),
        ("body over 1 MiB", "POST", "/api/labels", good, BIG, 413, "request body over the limit of 1048576 bytes"),
        ("unknown path", "GET", "/api/nothing", good, None, 404, "not found: /api/nothing"),
        ("wrong method", "DELETE", "/api/labels", good, None, 405, "method DELETE not allowed on /api/labels"),
    ]


def test_bad_requests_get_a_clear_4xx_one_by_one(tmp_path):
    project = make_project(tmp_path, n=3, k=3)
    keys = tokens(project, "alice", "bob")
    with Server(project) as server, client(server, keys["alice"]) as alice, client(server, keys["bob"]) as bob:
        assert alice.get("/api/next").json()["item_id"] == 1
        other = bob.get("/api/next").json()["item_id"]
        for what, method, path, headers, body, status, message in bad_requests(other):
            if headers == "GOOD":
                headers = bearer(keys["alice"])
            response = httpx.request(method, server.url + path, headers={"Content-Type": "application/json",
                                                                           **headers}, content=body, timeout=30)
            assert response.status_code == status, (what, response.status_code, response.text[:300])
            assert response.headers["content-type"] == "application/json", what
            error = response.json()["error"]
            assert message in error, (what, error)
            assert "Traceback" not in response.text and len(error) < 300, what
        # A body over 1 MiB sent in chunks, with no Content-Length to refuse it by, is cut off as well.
        chunks = (b"x" * 65536 for _ in range(20))
        streamed = httpx.post(server.url + "/api/labels", headers=bearer(keys["alice"]), content=chunks, timeout=30)
        assert streamed.status_code == 413 and "over the limit" in streamed.json()["error"]
        # None of it stored anything; alice's item is still hers to answer.
        assert alice.get("/api/labels").json() == {"labels": []}
        assert alice.post("/api/labels", json={"item_id": 1, "ranks": [1, 2, 3]}).status_code == 200
        assert "Traceback" not in server.log.read_text()  # nothing blew up inside either


def test_an_abandoned_item_goes_to_someone_else_after_the_lease(tmp_path):
    project = make_project(tmp_path, n=1, k=2)
    keys = tokens(project, "alice", "bob")
    with Server(project, "--lease-seconds", "1") as server, client(server, keys["alice"]) as alice, \
            client(server, keys["bob"]) as bob:
        assert alice.get("/api/next").json()["item_id"] == 1
        assert bob.get("/api/next").status_code == 204  # nothing left while alice holds it
        time.sleep(1.3)
        assert bob.get("/api/next").json()["item_id"] == 1
        assert bob.post("/api/labels", json={"item_id": 1, "ranks": [2, 1]}).status_code == 200
        late = alice.post("/api/labels", json={"item_id": 1, "ranks": [1, 2]})
        assert late.status_code == 409 and "expired" in late.json()["error"]
        for person in (alice, bob):
            response = person.get("/api/next")
            assert response.status_code == 204 and response.content == b""


def test_an_unexpected_failure_is_a_json_500_and_a_busy_store_a_503(tmp_path, monkeypatch):
    """In process (a live server cannot be made to fail on demand): the catch-all handler answers JSON without
    a traceback, and the server's log gets the traceback."""
    import sqlite3

    from starlette.testclient import TestClient

    from rlhfkit.label import assign
    from rlhfkit.label.app import create_app

    project = make_project(tmp_path, n=2)
    keys = tokens(project, "alice")
    app = create_app(project)

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    with TestClient(app, raise_server_exceptions=False) as http:
        monkeypatch.setattr(assign, "next_item", broken)
        failed = http.get("/api/next", headers=bearer(keys["alice"]))
        assert failed.status_code == 500
        assert failed.json() == {"error": "internal error (nothing was saved); the server's log has the details"}
        assert "secret internals" not in failed.text and "Traceback" not in failed.text
        monkeypatch.setattr(assign, "submit", locked)
        busy = http.post("/api/labels", headers=bearer(keys["alice"]), json={"item_id": 1, "skip": True})
        assert busy.status_code == 503
        assert busy.json() == {"error": "the label store could not be used just now (nothing was saved); retry"}
