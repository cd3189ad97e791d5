"""The project file: schema, WAL + synchronous=FULL, atomic creation, refusals with one clear message."""

import sqlite3
import stat

import pytest

from rlhfkit.errors import UserError
from rlhfkit.label.store import Store, create_project

from .helpers import make_items, make_project


def test_project_holds_items_settings_and_is_in_wal_mode_with_full_sync(tmp_path):
    project = make_project(tmp_path, n=4, k=3, overlap=2, lease_seconds=60, guidelines="Be kind.")
    store = Store(project)
    assert [i["item_id"] for i in store.items()] == [1, 2, 3, 4]
    first = store.item(1)
    assert first["prompt"] == "Question 1: how do I water a cactus?"
    assert first["responses"][1] == "Try this: <script>alert(1)</script> <b>bold?</b>"
    assert (store.overlap, store.lease_seconds, store.guidelines) == (2, 60, "Be kind.")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.item(99) is None
    # Only the owner may read token hashes and labels; no temporary file is left behind.
    assert stat.S_IMODE(project.stat().st_mode) == 0o600
    assert not [p.name for p in tmp_path.iterdir() if not p.name.startswith("labels.sqlite")]


def test_conversational_prompts_round_trip(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    project = create_project(tmp_path / "labels.sqlite", [{"prompt": prompt, "responses": ["a", "b"]}])
    assert Store(project).item(1)["prompt"] == prompt


def test_refusals_name_the_file(tmp_path):
    project = make_project(tmp_path)
    with pytest.raises(UserError, match=r"labels.sqlite: already exists"):
        make_project(tmp_path)
    with pytest.raises(UserError, match=r"item 2: needs at least 2 responses"):
        create_project(tmp_path / "b.sqlite", [{"prompt": "p", "responses": ["a", "b"]},
                                               {"prompt": "q", "responses": ["a"]}])
    with pytest.raises(UserError, match="overlap must be >= 1"):
        create_project(tmp_path / "c.sqlite", make_items(2), overlap=0)
    assert not (tmp_path / "b.sqlite").exists() and not (tmp_path / "c.sqlite").exists()
    with pytest.raises(UserError, match=r"nope.sqlite: no labelling project here"):
        Store(tmp_path / "nope.sqlite")
    (tmp_path / "junk.sqlite").write_text("not a database at all, just text " * 100)
    with pytest.raises(UserError, match=r"junk.sqlite: not an rlhfkit labelling project"):
        Store(tmp_path / "junk.sqlite")
    other = sqlite3.connect(tmp_path / "other.sqlite")
    other.execute("CREATE TABLE t (x)")
    other.close()
    with pytest.raises(UserError, match=r"other.sqlite: not an rlhfkit labelling project"):
        Store(tmp_path / "other.sqlite")
    assert Store(project).overlap == 1


def test_a_failed_write_transaction_leaves_nothing(tmp_path):
    store = Store(make_project(tmp_path))
    with pytest.raises(RuntimeError):
        with store.write() as conn:
            conn.execute("INSERT INTO annotators (name, token_hash, role, created_at) VALUES ('x', 'h', "
                         "'annotator', 0)")
            raise RuntimeError("boom")
    assert store.annotators() == []


def test_one_label_per_item_and_annotator_is_enforced_by_the_schema(tmp_path):
    store = Store(make_project(tmp_path))
    with store.write() as conn:
        conn.execute("INSERT INTO annotators (name, token_hash, role, created_at) VALUES ('a', 'h', 'annotator', 0)")
        conn.execute("INSERT INTO labels (item_id, annotator_id, skip, created_at) VALUES (1, 1, 1, 0)")
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        with store.write() as conn:
            conn.execute("INSERT INTO labels (item_id, annotator_id, skip, created_at) VALUES (1, 1, 1, 0)")
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):  # a label is exactly one kind of answer
        with store.write() as conn:
            conn.execute("INSERT INTO labels (item_id, annotator_id, ranks, skip, created_at) "
                         "VALUES (2, 1, '[1, 2, 3]', 1, 0)")
    assert len(store.labels()) == 1
