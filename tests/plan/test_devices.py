"""Device lists: counts, sizes, bf16, and one clear line for a mistake (exit status 2 from the command)."""

import pytest

from rlhfkit.cli import main
from rlhfkit.errors import UserError
from rlhfkit.plan.devices import CUDA_CONTEXT_GIB, GIB, parse_devices


def test_lists():
    t4 = parse_devices("5xT4")
    assert [d.label for d in t4] == [f"cuda:{i} (T4)" for i in range(5)]
    assert t4[0].total_gib == 14.75 and not t4[0].bf16
    assert t4[0].usable_bytes == int((14.75 - CUDA_CONTEXT_GIB) * GIB)
    a100 = parse_devices("1xA100-80GB")
    assert len(a100) == 1 and a100[0].bf16 and a100[0].total_gib > 79
    assert len(parse_devices("2xH100")) == 2
    cpu = parse_devices("cpu:24GB")
    assert cpu[0].is_cpu and cpu[0].usable_bytes == 24 * GIB
    assert parse_devices("H200")[0].total_gib > 139
    assert parse_devices("2xgpu:24GB")[1].total_gib == 24
    mixed = parse_devices("4xT4+1xV100-32GB")
    assert [d.kind for d in mixed] == ["T4"] * 4 + ["V100-32GB"] and mixed[4].index == 4


@pytest.mark.parametrize("text, message", [
    ("5xT5", "unknown device 'T5'"),
    ("A100", "A100-40GB or A100-80GB"),
    ("cpu", "give the CPU's memory"),
    ("cpu:lots", "is not a size"),
    ("0xT4", "at least 1"),
    ("2xT4+cpu:8GB", "either GPUs or the CPU"),
    ("", "--devices is required"),
])
def test_mistakes_are_one_clear_error(text, message):
    with pytest.raises(UserError, match=message):
        parse_devices(text)


def test_command_exits_2_with_one_line(capsys):
    assert main(["plan", "--preset", "tiny", "--stage", "ppo", "--devices", "5xT5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown device 'T5'" in err
