"""Bytes, from first principles: weights, gradients, optimizer state, activations, KV cache and logits.

Every function here is pure arithmetic on a `ModelShape` and batch sizes; the phases that combine them are in
layout.py. The activation terms list what autograd keeps for the backward pass, op by op, for the blocks
transformers runs (eager attention unless sdpa is asked for), and what rlhfkit's own code adds:

Llama-style block (RMSNorm, SwiGLU), for b sequences of T tokens, H hidden, I intermediate, a heads of size d:
  - each RMSNorm keeps its input x (float32: it upcasts) for `pow`, and, when its weight is trained, the
    normalised x*rsqrt(var) for `weight * ...` (2 norms per block);
  - each linear keeps its input: the normed hidden state (one tensor shared by q/k/v and by gate/up in fp32;
    under autocast every consumer keeps its own half-precision cast), the attention output for o_proj and
    act(gate)*up for down_proj;
  - attention keeps the rotated queries, the keys and values repeated to all heads (repeat_kv copies them
    when kv heads < heads), and eager attention the softmax output (b, a, T, T), in float32 (softmax runs in
    float32; under autocast the half copy the next matmul takes is kept too); sdpa keeps a logsumexp (b, a, T);
  - the MLP keeps gate, silu(gate), up and their product: 4 x (b, T, I);
  - RoPE keeps only cos/sin (q * cos needs no q), residual adds keep nothing.
Phi-style block (LayerNorm, GELU MLP in parallel with attention): LayerNorm keeps its input, the linears its
output; attention as above; gelu_new (tanh form, plain ops) keeps fc1's output, the tanh, 0.5*x and 1+tanh,
and fc2 its input: 5 x (b, T, I).
LoRA (peft, dropout 0): a frozen linear keeps nothing for its weight's gradient, its adapter's lora_A keeps the
same input, lora_B keeps A's output (b, T, r); frozen norms do not keep the normalised x.
Gradient checkpointing (non-reentrant, per block): each block keeps its input only (b, T, H) and recomputes
one block at a time in the backward pass.

Logits (the LM head): SFT computes full (b, T, V) logits and rlhfkit's chunked log-softmax keeps them for the
backward pass, which then holds the gradient buffer and one full-size slice-backward gradient beside them
(3 x b*T*V*4 bytes at once). DPO, PPO and GRPO go through core/head_logprobs.py: only the response positions'
hidden states are kept and the logits exist a few chunks of 2**23 elements at a time (see
FUSED_HEAD_BACKWARD_CHUNKS), plus the head's fp32 weight gradient in the backward pass. Reward and value models
apply a scalar head.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.plan.shapes import ModelShape

FP32 = 4
HEAD_CHUNK_ELEMENTS = 2**23      # core/head_logprobs.py's _CHUNK_ELEMENTS
LOGPROB_CHUNK_ELEMENTS = 2**24   # core/logprobs.py's _CHUNK_ELEMENTS


@dataclass(frozen=True)
class Numerics:
    """How tensors are stored: `act` bytes of what linears and matmuls produce (4 in fp32, 2 under bf16/fp16
    autocast), `weight` bytes of trained weights (the stage's dtype), whether autocast runs."""

    act: int = 4
    weight: int = 4
    autocast: bool = False

    @classmethod
    def of(cls, compute: str, dtype_bytes: int = 4) -> "Numerics":
        return cls(act=4 if compute == "fp32" else 2, weight=dtype_bytes, autocast=compute != "fp32")


# --- parameters and optimizer state --------------------------------------------------------------------------
def weight_bytes(shape: ModelShape, lm_head: bool, dtype_bytes: int, half_linears: bool = False) -> int:
    """A model's weights. `lm_head`: a causal LM (else trunk + scalar head). `half_linears`: the blocks' linear
    layers stored in 2 bytes (models/precision.store_linears_in_bf16: embedding, head and norms stay fp32)."""
    total = shape.params if lm_head else shape.trunk_params + shape.scalar_head_params()
    if not half_linears or dtype_bytes == 2:
        return total * dtype_bytes
    linear = block_linear_params(shape)
    return linear * 2 + (total - linear) * FP32


def block_linear_params(shape: ModelShape) -> int:
    """Weights and biases of every block's linear layers (what half_linears stores in 2 bytes)."""
    return shape.layers * (shape.layer_linear_params() + _linear_bias_params(shape))


def _linear_bias_params(shape: ModelShape) -> int:
    if shape.family == "phi":
        return sum(out for _, out in shape.linear_shapes().values())
    return shape.q_width + 2 * shape.kv_width if shape.qkv_bias else 0


def adam_state_bytes(trainable_params: int, param_bytes: int) -> int:
    """torch's AdamW: exp_avg and exp_avg_sq, each in the parameter's dtype (no separate master copy: rlhfkit
    trains fp32 weights, autocast computes in half)."""
    return 2 * trainable_params * param_bytes


# --- activations ---------------------------------------------------------------------------------------------
def block_saved(shape: ModelShape, b: int, T: int, num: Numerics, attn: str = "eager", norms_trained: bool = True,
                lora_r: int = 0) -> dict[str, int]:
    """Bytes autograd keeps for one block's backward pass, by kind (see the module docstring)."""
    H, I, a, d = shape.hidden, shape.intermediate, shape.heads, shape.head_dim
    bt, h = b * T, num.act
    out: dict[str, int] = {}
    if shape.family == "phi":
        out["norm"] = bt * H * 4
        consumers = 4 if num.autocast else 1  # q, k, v, fc1 read the LayerNorm output
        out["linear inputs"] = consumers * bt * H * h
        out["mlp"] = 5 * bt * I * h
        n_linears = 6
    else:
        out["norm"] = 2 * bt * H * 4 * (2 if norms_trained else 1)
        consumers = 5 if num.autocast else 2  # q, k, v | gate, up read the two norms' outputs
        out["linear inputs"] = consumers * bt * H * h
        out["mlp"] = 4 * bt * I * h
        n_linears = 7
    out["attention"] = 4 * b * a * T * d * h  # rotated q, repeated k and v, the attention output
    if attn == "eager":
        out["attention scores"] = b * a * T * T * (4 + (2 if num.autocast else 0))
    else:
        out["attention scores"] = b * a * T * 4  # sdpa's logsumexp
    if lora_r:
        out["lora"] = n_linears * bt * lora_r * h
    return out


def block_backward_transient(shape: ModelShape, b: int, T: int, num: Numerics, attn: str = "eager",
                             norms_trained: bool = True) -> int:
    """Bytes a block's backward pass holds beyond the saved tensors, at its worst point. The residual stream's
    gradient and the gradient of the branch being differentiated (2 x b*T*H, float32) are always there; then the
    MLP comes first (its own gradients: 3 x b*T*I), and once it is done its saved tensors are freed (the MLP's, its
    norm's and its input casts) before attention's softmax backward holds two (b, a, T, T) tensors beside the
    saved probabilities (eager; sdpa's backward holds gradients of q, k, v and the output instead)."""
    bt, H, I, h = b * T, shape.hidden, shape.intermediate, num.act
    a, d = shape.heads, shape.head_dim
    mlp_phase = 3 * bt * I * h
    if shape.family == "phi":  # the LayerNorm output stays: attention's q, k, v still need it
        mlp_half = 5 * bt * I * h
    else:
        mlp_half = 4 * bt * I * h + bt * H * 4 * (2 if norms_trained else 1) + (2 if num.autocast else 1) * bt * H * h
    if attn == "eager":
        attention_phase = 2 * b * a * T * T * 4 + 2 * b * a * T * d * h
    else:
        attention_phase = 4 * b * a * T * d * h
    return 2 * bt * H * 4 + max(mlp_phase, attention_phase - mlp_half, 0)


def block_inference_transient(shape: ModelShape, b: int, T: int, num: Numerics, attn: str = "eager") -> int:
    """Peak of one block's no-grad forward: residual and normed states, then the larger of attention (q, k, v,
    repeated k and v, output; eager: the scores and their softmax, float32) and the MLP (gate, up, product)."""
    bt = b * T
    a, g, d = shape.heads, shape.kv_heads, shape.head_dim
    attention = (4 * b * a * T * d + 2 * b * g * T * d) * num.act
    if attn == "eager":
        attention += 2 * b * a * T * T * 4
    mlp = 3 * bt * shape.intermediate * num.act
    return 2 * bt * shape.hidden * 4 + max(attention, mlp)


def forward_cache_bytes(shape: ModelShape, b: int, T: int, num: Numerics) -> int:
    """A training forward that leaves `use_cache` at the config's default (SFT's and the reward model's) fills a
    DynamicCache with every block's keys and values until the forward returns; when kv heads < heads those are
    not the tensors autograd keeps (it keeps the repeated copies), so they are extra."""
    if shape.kv_heads == shape.heads:
        return 0
    return 2 * shape.layers * b * shape.kv_heads * T * shape.head_dim * num.act


def attention_mask_bytes(b: int, T: int, attn: str) -> int:
    """The float (b, 1, T, T) causal mask eager attention adds to the scores, built once per forward."""
    return b * T * T * 4 if attn == "eager" else b * T * T  # sdpa: a boolean mask


# --- LM head and logits --------------------------------------------------------------------------------------
def full_logits_bytes(b: int, T: int, vocab: int, num: Numerics) -> int:
    """The (b, T, V) logits kept for the backward of SFT's log-softmax; under autocast the head's half logits and
    the float32 chunks the log-softmax upcasts are both kept."""
    return b * T * vocab * (4 + (2 if num.autocast else 0))


def full_logits_backward_extra(b: int, T: int, vocab: int) -> int:
    """Beside the kept logits, SFT's backward holds the logits' gradient buffer and the full-size gradient each
    chunk's slice-backward makes (2 x b*T*V float32), plus two chunk-sized temporaries of logsumexp's backward."""
    chunk = min(b * T, max(1, LOGPROB_CHUNK_ELEMENTS // vocab)) * vocab * 4
    return 2 * b * T * vocab * 4 + 2 * chunk


def fused_head_chunk(n_rows: int, vocab: int) -> int:
    """One chunk of core/head_logprobs.py's fp32 logits: at most 2**23 elements (rows of V)."""
    rows = min(max(n_rows, 1), max(1, HEAD_CHUNK_ELEMENTS // vocab))
    return rows * vocab * 4


# Chunks alive at once in core/head_logprobs.py's loops. Forward: a chunk's logits and logsumexp's two
# temporaries (l - max, its exp), and with the entropy also the previous chunk's probabilities, which the loop
# variable holds until they are reassigned: 3, or 4 with the entropy. Backward: the previous chunk's logits and
# gradient (held by the loop variables) and the new chunk's logits, then its probabilities: 3.
FUSED_HEAD_BACKWARD_CHUNKS = 3


def fused_head_forward_chunks(with_entropy: bool) -> int:
    return 4 if with_entropy else 3


# --- KV cache and decoding -----------------------------------------------------------------------------------
def kv_cache_bytes(shape: ModelShape, batch: int, tokens: int, dtype_bytes: int) -> int:
    """layers x 2 (keys, values) x kv heads x head size x tokens x batch x bytes."""
    return shape.layers * 2 * shape.kv_heads * shape.head_dim * tokens * batch * dtype_bytes


def decode_step_transient(shape: ModelShape, batch: int, tokens: int, dtype_bytes: int) -> int:
    """One decoding step at the longest cache: the layer's keys and values concatenated anew (DynamicCache),
    sdpa's copies repeated to every head (with a padding mask transformers repeats kv heads), and the
    sampler's fp32 (B, V) logits, softmax and padded copy."""
    layer_kv = 2 * batch * shape.kv_heads * tokens * shape.head_dim * dtype_bytes
    repeated = 2 * batch * shape.heads * tokens * shape.head_dim * dtype_bytes if shape.kv_heads < shape.heads else 0
    sampler = 3 * batch * shape.vocab * 4
    return layer_kv + repeated + sampler


def gib(n: float) -> float:
    return n / 2**30
