"""Who labels what: each item goes to `overlap` annotators, never twice to the same one, and never to more
than `overlap` at once; an assignment not answered within the lease returns to the pool.

The capacity of an item: labels that count (a ranking or "none is acceptable"; a skip does not, so a
skipped item goes to someone else) plus open, unexpired leases of other annotators must stay below
`overlap` for the item to be handed out, or for an answer on an expired lease to be taken. Every decision
is made inside one write transaction (Store.write), so concurrent annotators cannot both take the last
place of an item.
"""

from __future__ import annotations

import json
import sqlite3
import time

from rlhfkit.label.labels import Label, Problem, check_ranks
from rlhfkit.label.store import Store

COUNTED = "skip = 0"  # labels that fill a place of an item (rankings and "none is acceptable")


def _taken(conn: sqlite3.Connection, item_id: int, annotator_id: int, now: float) -> int:
    """Places of the item taken by answers and by other annotators' open leases."""
    return conn.execute(
        f"SELECT (SELECT COUNT(*) FROM labels WHERE item_id = :item AND {COUNTED})"
        " + (SELECT COUNT(*) FROM assignments WHERE item_id = :item AND annotator_id != :me"
        "    AND expires_at > :now)",
        {"item": item_id, "me": annotator_id, "now": now}).fetchone()[0]


def next_item(store: Store, annotator_id: int, now: float | None = None,
              lease_seconds: int | None = None) -> dict | None:
    """The item this annotator should rank next (leased to them until now + lease), or None when none is left.
    An annotator who asks again before answering gets the same item back (a reloaded page loses nothing)."""
    now = time.time() if now is None else now
    lease = store.lease_seconds if lease_seconds is None else lease_seconds
    overlap = store.overlap
    with store.write() as conn:
        held = conn.execute("SELECT item_id, expires_at FROM assignments WHERE annotator_id = ? "
                            "ORDER BY leased_at, item_id", (annotator_id,)).fetchall()
        chosen = None
        for row in held:
            if row["expires_at"] > now or _taken(conn, row["item_id"], annotator_id, now) < overlap:
                chosen = row["item_id"]
                break
            # Expired, and others filled the item meanwhile: this lease is void.
            conn.execute("DELETE FROM assignments WHERE item_id = ? AND annotator_id = ?",
                         (row["item_id"], annotator_id))
        if chosen is None:
            row = conn.execute(
                "SELECT items.id FROM items"
                " WHERE NOT EXISTS (SELECT 1 FROM labels WHERE item_id = items.id AND annotator_id = :me)"
                "   AND NOT EXISTS (SELECT 1 FROM assignments WHERE item_id = items.id AND annotator_id = :me)"
                f"  AND (SELECT COUNT(*) FROM labels WHERE item_id = items.id AND {COUNTED})"
                "     + (SELECT COUNT(*) FROM assignments WHERE item_id = items.id AND expires_at > :now)"
                "     < :overlap"
                " ORDER BY items.id LIMIT 1",
                {"me": annotator_id, "now": now, "overlap": overlap}).fetchone()
            if row is None:
                return None
            chosen = row["id"]
        conn.execute("INSERT OR REPLACE INTO assignments (item_id, annotator_id, leased_at, expires_at) "
                     "VALUES (?, ?, ?, ?)", (chosen, annotator_id, now, now + lease))
        return store.item(chosen, conn)


def submit(store: Store, annotator_id: int, label: Label, now: float | None = None) -> dict:
    """Store one annotator's answer for an item they were assigned; return the stored label.

    A retry (the same answer again) returns the stored label; a different answer for an item already
    answered is refused (409). Raises `Problem` for an unknown item (404), an item not assigned to this
    annotator (403), wrong ranks (422), and an answer on a lease that expired while others filled the item
    (409). The label is committed before this returns.
    """
    now = time.time() if now is None else now
    with store.write() as conn:
        item = conn.execute("SELECT n_responses FROM items WHERE id = ?", (label.item_id,)).fetchone()
        if item is None:
            raise Problem(404, f"unknown item {label.item_id}")
        stored = store.label(label.item_id, annotator_id, conn)
        if stored is not None:
            if label.same_as(stored):
                return stored
            raise Problem(409, f"item {label.item_id} is already labelled by you, differently; "
                               f"a stored label is not changed")
        lease = conn.execute("SELECT expires_at FROM assignments WHERE item_id = ? AND annotator_id = ?",
                             (label.item_id, annotator_id)).fetchone()
        if lease is None:
            raise Problem(403, f"item {label.item_id} is not assigned to you (get items from GET /api/next)")
        if label.ranks is not None:
            check_ranks(label.ranks, item["n_responses"], label.item_id)
        if not label.skip and lease["expires_at"] <= now \
                and _taken(conn, label.item_id, annotator_id, now) >= store.overlap:
            conn.execute("DELETE FROM assignments WHERE item_id = ? AND annotator_id = ?",
                         (label.item_id, annotator_id))
            raise Problem(409, f"your assignment of item {label.item_id} expired and the item went to "
                               f"another annotator; get the next one")
        conn.execute(
            "INSERT INTO labels (item_id, annotator_id, ranks, skip, none_acceptable, comment, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (label.item_id, annotator_id, None if label.ranks is None else json.dumps(list(label.ranks)),
             int(label.skip), int(label.none_acceptable), label.comment, now))
        conn.execute("DELETE FROM assignments WHERE item_id = ? AND annotator_id = ?",
                     (label.item_id, annotator_id))
        return store.label(label.item_id, annotator_id, conn)


def progress(store: Store, annotator_id: int) -> dict:
    """One annotator's progress: items answered, and items still open to them (not yet filled by others)."""
    overlap = store.overlap
    with store.read() as conn:
        done = conn.execute("SELECT COUNT(*) FROM labels WHERE annotator_id = ?", (annotator_id,)).fetchone()[0]
        remaining = conn.execute(
            "SELECT COUNT(*) FROM items WHERE NOT EXISTS "
            "(SELECT 1 FROM labels WHERE item_id = items.id AND annotator_id = :me)"
            f" AND (SELECT COUNT(*) FROM labels WHERE item_id = items.id AND {COUNTED}) < :overlap",
            {"me": annotator_id, "overlap": overlap}).fetchone()[0]
        total = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    return {"done": done, "remaining": remaining, "items": total, "overlap": overlap}


def project_progress(store: Store, now: float | None = None) -> dict:
    """Everyone's progress (for the admin): items filled, labels by kind, and per annotator."""
    now = time.time() if now is None else now
    overlap = store.overlap
    with store.read() as conn:
        total = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        complete = conn.execute(
            f"SELECT COUNT(*) FROM items WHERE (SELECT COUNT(*) FROM labels WHERE item_id = items.id "
            f"AND {COUNTED}) >= ?", (overlap,)).fetchone()[0]
        people = []
        for row in conn.execute(
                "SELECT a.id, a.name, a.role,"
                " (SELECT COUNT(*) FROM labels WHERE annotator_id = a.id AND ranks IS NOT NULL) AS ranked,"
                " (SELECT COUNT(*) FROM labels WHERE annotator_id = a.id AND skip = 1) AS skipped,"
                " (SELECT COUNT(*) FROM labels WHERE annotator_id = a.id AND none_acceptable = 1) AS none_ok,"
                " (SELECT COUNT(*) FROM assignments WHERE annotator_id = a.id AND expires_at > ?) AS open"
                " FROM annotators a ORDER BY a.id", (now,)):
            if row["role"] != "annotator":
                continue
            people.append({"name": row["name"], "ranked": row["ranked"], "skipped": row["skipped"],
                           "none_acceptable": row["none_ok"],
                           "labels": row["ranked"] + row["skipped"] + row["none_ok"],
                           "open_assignments": row["open"]})
    return {"items": total, "complete": complete, "overlap": overlap,
            "labels": sum(p["labels"] for p in people), "annotators": people}
