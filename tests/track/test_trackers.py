"""Each tracker through its own library, read back from what it wrote: tensorboard's event files, an mlflow file
store, wandb's offline run folder, trackio's local database. A tiny SFT run (2 steps, one evaluation) is tracked."""

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhfkit.runtime.metrics_log import read_metrics
from rlhfkit.trainers.sft import run_sft

from ..trainers.helpers import tiny_config


def tracked_sft(out: Path, report_to: str):
    run_sft(tiny_config("sft", output_dir=out, max_steps=2, eval_every=2, save_every=0, report_to=report_to,
                        progress=False))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and "eval/nll" in rows[-1]
    return rows


def test_tensorboard_event_files_hold_every_row_the_config_and_the_model_card(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    out = tmp_path / "sft"
    rows = tracked_sft(out, "tensorboard")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "sft/nll"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-12)) for r in rows], key
    assert [(e.step, e.value) for e in events.Scalars("eval/nll")] == [(2, pytest.approx(rows[-1]["eval/nll"]))]

    def text(tag):
        return tensor_util.make_ndarray(events.Tensors(tag)[0].tensor_proto).item().decode()

    assert "learning_rate: 0.001" in text("config/text_summary") and "report_to:\n- tensorboard" in text(
        "config/text_summary")
    assert "library_name: transformers" in text("files/README.md/text_summary")


def test_mlflow_file_store_holds_params_metrics_and_artefacts(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is an optional extra: pip install 'rlhfkit[mlflow]'")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    out = tmp_path / "sft"
    rows = tracked_sft(out, "mlflow")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("rlhfkit")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "sft" and run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["report_to"] == "['mlflow']"
    assert run.data.tags["rlhfkit.stage"] == "sft"
    for key in ("loss", "grad_norm"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted((m.step, m.value) for m in history) == [(r["step"], pytest.approx(r[key])) for r in rows]
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "README.md", "metrics.jsonl"} <= artefacts
    card = Path(client.download_artifacts(run.info.run_id, "README.md", str(tmp_path)))
    assert card.read_text() == (out / "README.md").read_text()


def wandb_records(run_file: Path, timeout_s: float = 120.0) -> list:
    """The records of a finished run's .wandb file, once its last record (`exit`) is on disk.

    wandb's service writes the file in 32 KiB blocks and flushes the last, partial one when it closes the run's
    stream, which can be a moment after `run.finish()` returns while the service lives on (as it does inside one
    pytest process); so wait for the file to end in `exit` instead of reading a half-flushed file."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = parse_wandb_file(run_file.read_bytes())
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            kinds = [r.WhichOneof("record_type") for r in records]
            raise AssertionError(f"{run_file} has no exit record after {timeout_s:.0f} s; records: {kinds}")
        time.sleep(0.2)


def parse_wandb_file(data: bytes) -> list:
    """The complete records of a .wandb file (a LevelDB-style log: 32 KiB blocks of chunks with a 7-byte header
    each, after the 7-byte file header ':W&B', magic 0xBEE1, version 0), parsed with wandb's own protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    if len(data) < 7:  # not even the file header is on disk yet
        return []
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero padding to the end of a block
            pos += left - 7
            continue
        if pos + length > len(data):  # a chunk still being written
            break
        chunk, pos = data[pos:pos + length], pos + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first start a record, middle/last extend it
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def key(item) -> str:
    """A wandb record item's key (written as `key`, or as `nested_key` parts)."""
    return item.key or "/".join(item.nested_key)


def test_wandb_runs_offline_without_a_key_into_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra: pip install 'rlhfkit[wandb]'")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    out = tmp_path / "sft"
    rows = tracked_sft(out, "wandb")
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = wandb_records(next(run_dir.glob("run-*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "rlhfkit" and run.display_name == "sft" and run.job_type == "sft"
    config = {key(item): json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert config["learning_rate"] == 0.001 and config["report_to"] == ["wandb"]
    history = [{key(item): json.loads(item.value_json) for item in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [1, 2]
    for logged, row in zip(history, rows):
        assert logged["loss"] == pytest.approx(row["loss"]) and logged["grad_norm"] == pytest.approx(row["grad_norm"])
    assert history[-1]["eval/nll"] == pytest.approx(rows[-1]["eval/nll"])
    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "model" and {"config.yaml", "README.md", "metrics.jsonl"} <= {
        e.path for e in artifact.manifest.contents}
    assert kinds[-1] == "exit" and records[-1].exit.exit_code == 0


READ_TRACKIO = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
project = sys.argv[1]
runs = SQLiteStorage.get_runs(project)
logs = {run: SQLiteStorage.get_logs(project, run) for run in runs}
configs = {run: SQLiteStorage.get_run_config(project, run) for run in runs}
print(json.dumps({"runs": runs, "logs": logs, "config": configs}, default=str))
"""


def test_trackio_keeps_the_rows_in_its_local_database(tmp_path):
    """In a subprocess: trackio reads TRACKIO_DIR once, when it is first imported."""
    pytest.importorskip("trackio", reason="trackio is an optional extra: pip install 'rlhfkit[trackio]'")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "sft"
    subprocess.run([sys.executable, "-m", "rlhfkit", "sft", "--preset", "tiny", "--output-dir", str(out),
                    "--max-steps", "2", "--eval-every", "2", "--save-every", "0", "--mixed-precision", "no",
                    "--progress", "false", "--report-to", "trackio"], check=True, env=env, capture_output=True)
    rows = read_metrics(out / "metrics.jsonl")
    read = subprocess.run([sys.executable, "-c", READ_TRACKIO, "rlhfkit"], check=True, env=env,
                          capture_output=True, text=True)
    found = json.loads(read.stdout.strip().splitlines()[-1])
    (run,) = found["runs"]
    logs = [entry for entry in found["logs"][run] if "loss" in entry]
    assert [e["step"] for e in logs] == [1, 2]
    assert [e["loss"] for e in logs] == [pytest.approx(r["loss"]) for r in rows]
    assert found["config"][run]["learning_rate"] == 0.001
