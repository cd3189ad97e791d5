"""`rlhfkit label ...`: tokens printed once, exports, progress; mistakes are one line and exit status 2; the
`rlhfkit --help` path imports no web stack."""

import json
import socket
import subprocess
import sys

import pytest

from rlhfkit.cli import main
from rlhfkit.label.auth import authenticate
from rlhfkit.label.store import Store

from .helpers import make_project


def run(capsys, *argv):
    code = main(["label", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_add_annotator_prints_the_token_once(tmp_path, capsys):
    project = make_project(tmp_path)
    code, out, err = run(capsys, "add-annotator", project, "alice")
    assert code == 0 and err == ""
    assert "shown only this once" in out
    token = out.strip().splitlines()[-1]
    assert authenticate(Store(project), token).name == "alice"
    code, out, _ = run(capsys, "add-annotator", project, "boss", "--admin")
    assert code == 0 and authenticate(Store(project), out.strip().splitlines()[-1]).role == "admin"


@pytest.mark.parametrize("argv,message", [
    (["add-annotator", "{p}", "alice"], "{p}: an annotator named 'alice' already exists"),
    (["add-annotator", "{d}/missing.sqlite", "x"], "{d}/missing.sqlite: no labelling project here"),
    (["add-annotator", "{p}", "<b>"], "annotator name '<b>': use 1-64 letters"),
    (["add-annotator", "{p}"], "the following arguments are required: name"),
    (["frobnicate", "{p}"], "invalid choice: 'frobnicate'"),
    (["serve", "{p}", "--port", "99999"], "--port: 99999 is not a port number"),
    (["serve", "{p}", "--lease-seconds", "0"], "--lease-seconds: must be >= 1, got 0"),
    (["serve", "{p}", "--port", "eighty"], "argument --port: invalid int value: 'eighty'"),
    (["export", "{d}/notes.txt"], "{d}/notes.txt: not an rlhfkit labelling project"),
])
def test_mistakes_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    project = make_project(tmp_path)
    (tmp_path / "notes.txt").write_text("hello, not a database\n" * 200)
    main(["label", "add-annotator", str(project), "alice"])
    capsys.readouterr()
    fill = {"p": str(project), "d": str(tmp_path)}
    code, out, err = run(capsys, *[a.format(**fill) for a in argv])
    assert code == 2, (out, err)
    assert err.startswith("rlhfkit label: error: ") and message.format(**fill) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_export_defaults_to_the_projects_folder_and_progress_prints_json(tmp_path, capsys):
    from rlhfkit.label.assign import next_item, submit
    from rlhfkit.label.labels import Label

    project = make_project(tmp_path, n=2)
    run(capsys, "add-annotator", project, "alice")
    store = Store(project)
    alice = store.annotators()[0].id
    next_item(store, alice)
    submit(store, alice, Label(1, ranks=(3, 1, 2)))
    code, out, err = run(capsys, "export", project)
    assert code == 0 and err == ""
    assert json.loads(out.splitlines()[0])["pairs"] == 3
    assert "preferences.jsonl (3 pairs)" in out and f"rlhfkit reward --data {tmp_path}/preferences.jsonl" in out
    for name in ("preferences.jsonl", "rankings.jsonl", "labels.jsonl", "agreement.json"):
        assert (tmp_path / name).is_file(), name
    code, out, _ = run(capsys, "export", project, "--output-dir", tmp_path / "elsewhere")
    assert code == 0 and len((tmp_path / "elsewhere" / "preferences.jsonl").read_text().splitlines()) == 3
    code, out, _ = run(capsys, "progress", project)
    report = json.loads(out)
    assert code == 0 and report["labels"] == 1 and report["annotators"][0]["name"] == "alice"
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "add-annotator FILE NAME" in out and "export FILE" in out


def test_help_and_offline_commands_import_no_web_stack(tmp_path):
    project = make_project(tmp_path)
    probe = ("import sys; from rlhfkit.cli import main; main(sys.argv[1:]); "
             "print('LOADED', sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'torch') if m in sys.modules))")
    for argv in (["--help"], ["label", "--help"], ["label", "add-annotator", str(project), "bob"],
                 ["label", "export", str(project)]):
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "LOADED []" in done.stdout, (argv, done.stdout[-300:])


def test_serve_on_a_busy_port_is_a_clear_error(tmp_path):
    project = make_project(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "rlhfkit", "label", "serve", str(project), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"rlhfkit label: error: could not serve on 127.0.0.1:{port} (is the port in use?)" in done.stderr
