"""`rlhfkit label ...`: add annotators, serve the labelling app, export the labels, show progress."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys

from rlhfkit.errors import UserError

USAGE = """usage: rlhfkit label <command> DIR/labels.sqlite [options]

commands:
  add-annotator FILE NAME [--admin]   add a person; prints their token once (only its hash is stored).
                                      --admin: a token that sees everyone's progress and agreement, and
                                      does not label
  serve FILE [--host 127.0.0.1] [--port 8000] [--lease-seconds N]
                                      the labelling web app (localhost only unless --host says otherwise);
                                      an unanswered item returns to the pool after the lease (default:
                                      the project's, 1800 s)
  export FILE [--output-dir DIR]      preferences.jsonl and rankings.jsonl for `rlhfkit reward`/`dpo`,
                                      labels.jsonl and agreement.json (default DIR: the project's folder)
  progress FILE                       counts per annotator and agreement, as JSON

A project is made by `rlhfkit annotate --annotator human --output-dir DIR` (DIR/labels.sqlite)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def _parser() -> _Parser:
    parser = _Parser(prog="rlhfkit label", add_help=False)
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    add = commands.add_parser("add-annotator", add_help=False)
    add.add_argument("project")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true")
    serve = commands.add_parser("serve", add_help=False)
    serve.add_argument("project")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--lease-seconds", type=int, default=None)
    export = commands.add_parser("export", add_help=False)
    export.add_argument("project")
    export.add_argument("--output-dir", default=None)
    progress = commands.add_parser("progress", add_help=False)
    progress.add_argument("project")
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(project: str, host: str, port: int, lease_seconds: int | None) -> None:
    if not 0 <= port <= 65535:
        raise UserError(f"--port: {port} is not a port number (0-65535)")
    if lease_seconds is not None and lease_seconds < 1:
        raise UserError(f"--lease-seconds: must be >= 1, got {lease_seconds}")
    try:
        import uvicorn

        from rlhfkit.label.app import create_app
    except ImportError as exc:
        raise UserError(f"the labelling app needs FastAPI and uvicorn ({exc.name} is missing): "
                        f"pip install 'rlhfkit[label]'") from None
    app = create_app(project, lease_seconds)
    people = app.state.store.annotators()
    if not any(p.role == "annotator" for p in people):
        print(f"rlhfkit label: no annotators yet; add one with: rlhfkit label add-annotator {project} NAME",
              file=sys.stderr)
    if not _is_loopback(host):
        print(f"rlhfkit label: serving on {host}, reachable from other machines; tokens travel in clear "
              f"text over plain HTTP: put the app behind HTTPS", file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"rlhfkit label: serving {project} on http://{shown}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind the port
        raise UserError(f"could not serve on {host}:{port} (is the port in use?)") from exc


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or "--help" in argv or "-h" in argv:
        print(USAGE)
        return 0
    args = _parser().parse_args(argv)
    if args.command is None:
        raise UserError("missing command (add-annotator, serve, export, progress)")
    from rlhfkit.label.store import Store

    if args.command == "serve":
        serve(args.project, args.host, args.port, args.lease_seconds)
        return 0
    store = Store(args.project)
    if args.command == "add-annotator":
        from rlhfkit.label.auth import add_annotator

        role = "admin" if args.admin else "annotator"
        token = add_annotator(store, args.name, role)
        print(f"added {role} '{args.name}' to {args.project}. Their token, shown only this once "
              f"(only its hash is stored):")
        print(token)
    elif args.command == "export":
        from pathlib import Path

        from rlhfkit.label.export import export

        out = Path(args.output_dir) if args.output_dir else store.path.parent
        summary = export(store, out)
        print(json.dumps(summary))
        if summary["pairs"] == 0:
            print("rlhfkit label: no preference pairs yet (nothing ranked, or only ties)", file=sys.stderr)
        print(f"rlhfkit label: wrote {out}/preferences.jsonl ({summary['pairs']} pairs), rankings.jsonl, "
              f"labels.jsonl, agreement.json; train with: rlhfkit reward --data {out}/preferences.jsonl ...")
    elif args.command == "progress":
        from rlhfkit.label.report import project_report

        print(json.dumps(project_report(store), indent=2))
    return 0

