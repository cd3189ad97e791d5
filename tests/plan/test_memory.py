"""Bytes by hand: weights, optimizer state, KV cache, logits and one block's saved activations."""

from rlhfkit.plan import memory as mem
from rlhfkit.plan.shapes import KNOWN, tiny_shape

SMOL = KNOWN["SmolLM2-135M"]


def test_weights_and_adam_of_smollm2_135m():
    assert mem.weight_bytes(SMOL, lm_head=True, dtype_bytes=4) == 134_515_008 * 4
    assert mem.weight_bytes(SMOL, lm_head=True, dtype_bytes=2) == 134_515_008 * 2
    # a reward model: the trunk (the head is tied, so the same weights) plus a 576 -> 1 scalar head
    assert mem.weight_bytes(SMOL, lm_head=False, dtype_bytes=4) == (134_515_008 + 576) * 4
    # frozen linears in bf16: 30 blocks x 3,538,944 linear weights at 2 bytes, the rest (embedding, norms) fp32
    assert mem.weight_bytes(SMOL, True, 4, half_linears=True) == 30 * 3_538_944 * 2 + (134_515_008 - 30 * 3_538_944) * 4
    assert mem.adam_state_bytes(134_515_008, 4) == 2 * 134_515_008 * 4


def test_kv_cache():
    # layers x 2 x kv heads x head size x tokens x batch x bytes
    assert mem.kv_cache_bytes(SMOL, batch=2, tokens=100, dtype_bytes=4) == 30 * 2 * 3 * 64 * 100 * 2 * 4
    # Llama-3.1-8B: 128 KiB per token in bf16, so 8192 tokens take 1 GiB
    assert mem.kv_cache_bytes(KNOWN["Llama-3.1-8B"], batch=1, tokens=8192, dtype_bytes=2) == 2**30


def test_logits():
    fp32 = mem.Numerics.of("fp32")
    assert mem.full_logits_bytes(2, 10, 49152, fp32) == 2 * 10 * 49152 * 4
    assert mem.full_logits_bytes(2, 10, 49152, mem.Numerics.of("bf16")) == 2 * 10 * 49152 * 6
    assert mem.fused_head_chunk(10_000, 49152) == (2**23 // 49152) * 49152 * 4  # capped at 2**23 elements
    assert mem.fused_head_chunk(5, 49152) == 5 * 49152 * 4


def test_one_tiny_block_saves_what_autograd_keeps():
    s = tiny_shape()  # H 64, I 128, 4 heads of 16, 2 kv heads
    parts = mem.block_saved(s, b=1, T=8, num=mem.Numerics.of("fp32"))
    assert parts == {"norm": 2 * 8 * 64 * 4 * 2,        # each RMSNorm: its input and the normalised input
                     "linear inputs": 2 * 8 * 64 * 4,   # q/k/v share one, gate/up share one
                     "mlp": 4 * 8 * 128 * 4,             # gate, silu(gate), up, product
                     "attention": 4 * 4 * 8 * 16 * 4,    # rotated q, repeated k and v, output
                     "attention scores": 4 * 8 * 8 * 4}  # softmax output (eager)
    lora = mem.block_saved(s, 1, 8, mem.Numerics.of("fp32"), norms_trained=False, lora_r=4)
    assert lora["norm"] == parts["norm"] // 2 and lora["lora"] == 7 * 8 * 4 * 4
    sdpa = mem.block_saved(s, 1, 8, mem.Numerics.of("fp32"), attn="sdpa")
    assert sdpa["attention scores"] == 4 * 8 * 4  # logsumexp only
    half = mem.block_saved(s, 1, 8, mem.Numerics.of("bf16"))
    assert half["linear inputs"] == 5 * 8 * 64 * 2  # every consumer keeps its own cast
    assert half["attention scores"] == 4 * 8 * 8 * 6  # float32 softmax and its half copy


def test_phi_block_keeps_gelu_intermediates():
    phi = KNOWN["phi-2"]
    parts = mem.block_saved(phi, 1, 4, mem.Numerics.of("fp32"))
    assert parts["mlp"] == 5 * 4 * 10240 * 4 and parts["norm"] == 4 * 2560 * 4
