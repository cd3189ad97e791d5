"""Tokens: printed once, only a hash stored, checked in constant time; no default token."""

import pytest

from rlhfkit.errors import UserError
from rlhfkit.label.auth import add_annotator, authenticate, bearer_token, hash_token
from rlhfkit.label.store import Store

from .helpers import make_project


def test_token_is_returned_once_and_only_its_hash_is_stored(tmp_path):
    project = make_project(tmp_path)
    store = Store(project)
    token = add_annotator(store, "alice")
    admin = add_annotator(store, "boss", "admin")
    assert token != admin and len(token.split(".", 1)[1]) >= 40
    row = store.conn.execute("SELECT token_hash FROM annotators WHERE name = 'alice'").fetchone()
    assert row[0] == hash_token(token) and row[0] != token
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("labels.sqlite*"))  # the file and its WAL
    assert token.encode() not in raw and token.split(".", 1)[1].encode() not in raw


def test_authenticate_accepts_the_token_and_nothing_else(tmp_path):
    store = Store(make_project(tmp_path))
    assert authenticate(store, "anything") is None  # no annotator, no default password
    alice, bob = add_annotator(store, "alice"), add_annotator(store, "bob")
    admin = add_annotator(store, "boss", "admin")
    assert authenticate(store, alice).name == "alice" and authenticate(store, alice).role == "annotator"
    assert authenticate(store, bob).name == "bob"
    assert authenticate(store, admin).role == "admin"
    alice_id, secret = alice.split(".", 1)
    bob_id = bob.split(".", 1)[0]
    for wrong in (None, "", alice + "x", alice[:-1], f"{bob_id}.{secret}", f"99.{secret}", secret, ".", "1.",
                  "x" * 5000, f"{'9' * 30}.{secret}"):
        assert authenticate(store, wrong) is None, wrong


def test_bearer_header_parsing():
    assert bearer_token("Bearer abc.def") == "abc.def"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_names_are_checked_and_unique(tmp_path):
    store = Store(make_project(tmp_path))
    add_annotator(store, "alice")
    with pytest.raises(UserError, match="an annotator named 'alice' already exists"):
        add_annotator(store, "alice")
    for bad in ("", " lead", "a" * 65, "semi;colon", "<b>"):
        with pytest.raises(UserError, match="annotator name"):
            add_annotator(store, bad)
    assert [a.name for a in store.annotators()] == ["alice"]
