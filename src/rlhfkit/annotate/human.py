"""`rlhfkit annotate --annotator human`: the sampled responses become a labelling project for people
(`DIR/labels.sqlite`, see rlhfkit.label) instead of being ranked by the simulated annotator."""

from __future__ import annotations

import json
from pathlib import Path

from rlhfkit.config import AnnotateConfig
from rlhfkit.errors import UserError
from rlhfkit.label.store import PROJECT_FILE, create_project

GUIDELINE_SUFFIXES = (".md", ".txt", ".markdown", ".rst")


def guidelines_text(value: str | None) -> str:
    """The `guidelines` setting: the text of a file it names, else the text itself. A missing file with a text
    suffix (guide.md) is refused rather than shown as the guidelines."""
    if not value:
        return ""
    path = Path(value)
    if len(value) < 4096 and "\n" not in value:
        if path.is_file():
            try:
                return path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}: guidelines are not UTF-8 text ({exc.reason} at byte {exc.start})") \
                    from None
        if path.suffix.lower() in GUIDELINE_SUFFIXES and " " not in value:  # "See rules.md" is text
            raise UserError(f"{path}: guidelines file not found (key 'guidelines': a file or the text itself)")
    return value


def check_project_free(out: Path) -> None:
    """Refuse before any sampling if a project is already there: it may hold people's labels."""
    if (out / PROJECT_FILE).exists():
        raise UserError(f"{out / PROJECT_FILE}: already exists (it may hold people's labels); choose another "
                        f"--output-dir or remove it")


def write_project(config: AnnotateConfig, out: Path, records: list[dict], texts: list[str], guidelines: str,
                  summary: dict) -> Path:
    """Write the project (atomically) and summary.json; print what to run next."""
    k = config.responses_per_prompt
    items = [{"prompt": record["prompt"], "responses": texts[i * k:(i + 1) * k]} for i, record in enumerate(records)]
    source = {"model": config.model, "data": config.data, "seed": config.seed,
              "responses_per_prompt": k, "temperature": config.temperature, "top_p": config.top_p}
    project = create_project(out / PROJECT_FILE, items, overlap=config.overlap, guidelines=guidelines,
                             source=source)
    summary = {**summary, "annotator": "human", "overlap": config.overlap, "project": str(project)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    print(f"""annotate: wrote {project} ({len(items)} items of {k} responses, each for {config.overlap} \
annotator(s)). Next:
  rlhfkit label add-annotator {project} NAME          # prints NAME's token once; --admin for a progress view
  rlhfkit label serve {project}                       # http://127.0.0.1:8000/
  rlhfkit label export {project} --output-dir {out}   # preferences.jsonl, rankings.jsonl, agreement.json
  rlhfkit reward --data {out / 'preferences.jsonl'} --output-dir runs/rm ...""", flush=True)
    return project
