"""The planner's peaks against measured ones, on the tiny model: every training stage, full and LoRA, within 15%.

Each case runs the real stage in a fresh process (bench/plan_check.py's driver: fp32, one thread) and compares
the peak RSS above the process's RSS just before the first model loads with the plan's peak on a CPU. The RSS
follows the live tensors there: rlhfkit's keep-freed-memory setting is off and glibc gives every block above
64 KiB its own mapping, returned when freed (the planner counts tensors, not what the C allocator keeps).

Sizes: the tiny model's weights are 12 MB, while the process's own growth after loading (the first use of
libtorch's kernels, dispatcher caches, Python objects of the run) is about 40-70 MB. So every case is sized for
the model's tensors to reach 0.6-1.4 GB: 16 sequences of 128 tokens for SFT (49k-vocabulary logits), 16 pairs of
512 tokens for the reward model and DPO (eager attention's 512 x 512 probabilities), and 32 samples of 480 + 32
tokens for GRPO (beta 0.04: a reference) and PPO, whose update (the peak) is sized by the whole sequence.
"""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "plan_check.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("plan_check", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lora_available() -> bool:
    from rlhfkit.config import SFTConfig

    return "lora_r" in SFTConfig.__dataclass_fields__


@pytest.fixture(scope="session")
def shared_inputs(tmp_path_factory):
    """The data files and the reward model, made once per pytest worker for all cases."""
    return tmp_path_factory.mktemp("plan-inputs")


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "grpo", "ppo"])
def test_predicted_peak_within_15_percent_of_measured(stage, lora, tmp_path, shared_inputs):
    if lora and not lora_available():
        pytest.skip("no LoRA settings in this config.py")
    row = load_bench().check(stage, "tiny", lora, tmp_path, shared=shared_inputs)
    assert row["measured"] > 400 * 2**20, "the case no longer measures mostly the model's own tensors"
    assert abs(row["error"]) <= 0.15, (f"{stage} ({'lora' if lora else 'full'}): predicted "
                                       f"{row['predicted'] / 2**20:.0f} MiB, measured {row['measured'] / 2**20:.0f} "
                                       f"MiB ({row['error']:+.1%}); plan: {row['phase']} {row['parts']}")
