"""Model shapes: what the planner needs to know about a causal LM, read from its config.json (no weights).

A shape is the handful of numbers that fix every tensor of a decoder-only transformer: layers, hidden size, MLP
size, attention heads (query and key/value), head size, vocabulary, tied or separate LM head, and the block's
family ('llama': RMSNorm, gated SiLU MLP, no biases except Qwen2's q/k/v; 'phi': LayerNorm with biases, plain
GELU MLP, attention and MLP in parallel, an LM head with a bias). Parameter counts follow from the shape; a test
checks them against real models (the tiny and embedded ones, and the named shapes built on PyTorch's meta device).

A few common shapes are written in here as facts (`KNOWN`, from each model's config.json on the Hugging Face Hub),
so `rlhfkit plan --model phi-2` needs nothing on disk.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rlhfkit.errors import UserError

# model_type values whose blocks are Llama's (RMSNorm, SwiGLU MLP); Qwen2 adds biases to q, k and v.
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "granite")
PHI_FAMILY = ("phi",)


@dataclass(frozen=True)
class ModelShape:
    name: str
    family: str                 # 'llama' or 'phi' (see the module docstring)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool                  # LM head shares the input embedding's weight
    qkv_bias: bool = False      # Qwen2: biases on q, k, v
    max_positions: int | None = None
    note: str = ""              # e.g. "unknown model_type 'x': planned as a Llama-style block"

    # --- parameter counts -------------------------------------------------------------------------------------
    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one block, by its usual module name."""
        h, i = self.hidden, self.intermediate
        attn = {"q_proj": (h, self.q_width), "k_proj": (h, self.kv_width), "v_proj": (h, self.kv_width)}
        if self.family == "phi":
            return {**attn, "dense": (self.q_width, h), "fc1": (h, i), "fc2": (i, h)}
        return {**attn, "o_proj": (self.q_width, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        """Weights of one block's linear layers (no biases)."""
        return sum(a * b for a, b in self.linear_shapes().values())

    def layer_other_params(self) -> int:
        """Biases and norm weights of one block."""
        if self.family == "phi":  # every linear has a bias; one LayerNorm (weight and bias)
            return sum(out for _, out in self.linear_shapes().values()) + 2 * self.hidden
        bias = self.q_width + 2 * self.kv_width if self.qkv_bias else 0
        return bias + 2 * self.hidden  # two RMSNorm weights

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """The LM head's own parameters (0 when tied to the embedding; phi's head has a bias)."""
        if self.tied:
            return 0
        return self.vocab * self.hidden + (self.vocab if self.family == "phi" else 0)

    @property
    def final_norm_params(self) -> int:
        return 2 * self.hidden if self.family == "phi" else self.hidden

    @property
    def trunk_params(self) -> int:
        """Embedding, blocks and final norm: what a reward or value model keeps of the LM."""
        return (self.embed_params + self.layers * (self.layer_linear_params() + self.layer_other_params())
                + self.final_norm_params)

    @property
    def params(self) -> int:
        """All parameters of the causal LM."""
        return self.trunk_params + self.head_params

    def scalar_head_params(self) -> int:
        """The reward/value head of rlhfkit's reward model (a linear H -> 1 without bias)."""
        return self.hidden

    def lora_params(self, r: int, targets: tuple[str, ...] | None = None) -> int:
        """Adapter parameters for rank r on the targeted linear layers of every block (all of them if None)."""
        chosen = {k: v for k, v in self.linear_shapes().items() if targets is None or k in targets}
        return self.layers * sum(r * (a + b) for a, b in chosen.values())

    def to_dict(self) -> dict:
        out = asdict(self)
        out["params"] = self.params
        return out


# Facts from each model's config.json on the Hugging Face Hub (parameter counts in the comments are what the
# formulas above give, and what PyTorch counts for the same config on the meta device).
KNOWN: dict[str, ModelShape] = {
    "phi-2": ModelShape("phi-2", "phi", 32, 2560, 10240, 32, 32, 80, 51200, False, max_positions=2048),  # 2.78B
    "Llama-3.1-8B": ModelShape("Llama-3.1-8B", "llama", 32, 4096, 14336, 32, 8, 128, 128256, False,
                               max_positions=131072),  # 8.03B
    "Qwen2.5-0.5B": ModelShape("Qwen2.5-0.5B", "llama", 24, 896, 4864, 14, 2, 64, 151936, True, qkv_bias=True,
                               max_positions=32768),  # 0.49B
    "Qwen2.5-1.5B": ModelShape("Qwen2.5-1.5B", "llama", 28, 1536, 8960, 12, 2, 128, 151936, True, qkv_bias=True,
                               max_positions=131072),  # 1.54B
    "Qwen2.5-7B": ModelShape("Qwen2.5-7B", "llama", 28, 3584, 18944, 28, 4, 128, 152064, False, qkv_bias=True,
                             max_positions=131072),  # 7.62B
    "SmolLM2-135M": ModelShape("SmolLM2-135M", "llama", 30, 576, 1536, 9, 3, 64, 49152, True,
                               max_positions=8192),  # 135M; the embedded default
    "SmolLM2-360M": ModelShape("SmolLM2-360M", "llama", 32, 960, 2560, 15, 5, 64, 49152, True,
                               max_positions=8192),  # 362M
    "SmolLM2-1.7B": ModelShape("SmolLM2-1.7B", "llama", 24, 2048, 8192, 32, 32, 64, 49152, True,
                               max_positions=8192),  # 1.71B
}
# Other spellings people use for the same models.
ALIASES = {"microsoft/phi-2": "phi-2", "meta-llama/Llama-3.1-8B": "Llama-3.1-8B",
           "meta-llama/Llama-3.1-8B-Instruct": "Llama-3.1-8B", "Llama-3.1-8B-Instruct": "Llama-3.1-8B",
           **{f"Qwen/{n}": n for n in ("Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-7B")},
           **{f"Qwen/{n}-Instruct": n for n in ("Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-7B")},
           **{f"{n}-Instruct": n for n in ("Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-7B")},
           **{f"HuggingFaceTB/{n}": n for n in ("SmolLM2-135M", "SmolLM2-360M", "SmolLM2-1.7B")},
           **{f"HuggingFaceTB/{n}-Instruct": n for n in ("SmolLM2-135M", "SmolLM2-360M", "SmolLM2-1.7B")},
           **{f"{n}-Instruct": n for n in ("SmolLM2-135M", "SmolLM2-360M", "SmolLM2-1.7B")},
           "embedded": "SmolLM2-135M"}
# The embedded tokenizer's vocabulary, which the tiny model takes (models/tiny.py builds it over that tokenizer).
EMBEDDED_VOCAB = 49152


def shape_from_config(cfg: dict, name: str) -> ModelShape:
    """A shape from the fields of a config.json (a dict)."""
    model_type = cfg.get("model_type", "")
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{name}: config.json lacks {exc} (need hidden_size, num_attention_heads, "
                        f"num_hidden_layers, vocab_size)") from None
    family, note = "llama", ""
    if model_type in PHI_FAMILY:
        family = "phi"
    elif model_type not in LLAMA_FAMILY:
        note = f"model_type '{model_type}' is planned as a Llama-style block (RMSNorm, gated MLP)"
    head_dim = cfg.get("head_dim") or hidden // heads
    return ModelShape(
        name=name, family=family, layers=layers, hidden=hidden,
        intermediate=int(cfg.get("intermediate_size") or 4 * hidden), heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(head_dim), vocab=vocab,
        tied=bool(cfg.get("tie_word_embeddings", family != "phi")),
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        max_positions=cfg.get("max_position_embeddings"), note=note)


def tiny_shape() -> ModelShape:
    """The `tiny` test model, from the same config models/tiny.py builds (over the embedded tokenizer)."""
    from rlhfkit.models.tiny import tiny_config

    cfg = tiny_config(EMBEDDED_VOCAB, None, None, None).to_dict()
    return shape_from_config(cfg, "tiny")


def known_names() -> list[str]:
    return [*KNOWN, "embedded", "tiny"]


def resolve_shape(model: str | None) -> ModelShape:
    """The shape of a model given as a folder (its config.json), a known name, 'embedded' or 'tiny'."""
    if model in (None, "", "embedded"):
        return replace(KNOWN["SmolLM2-135M"], name="embedded (SmolLM2-135M-Instruct)")
    if model == "tiny":
        return tiny_shape()
    path = Path(model)
    if (path / "config.json").is_file():
        try:
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path / 'config.json'}: cannot read: {exc}") from None
        return shape_from_config(cfg, str(path))
    if path.suffix == ".json" and path.is_file():
        return shape_from_config(json.loads(path.read_text(encoding="utf-8")), str(path))
    name = ALIASES.get(model, model)
    if name in KNOWN:
        return KNOWN[name]
    lowered = {k.lower(): k for k in KNOWN}
    if name.lower() in lowered:
        return KNOWN[lowered[name.lower()]]
    raise UserError(f"model '{model}': no config.json there and not a known shape (known: "
                    f"{', '.join(known_names())}; or give a folder with config.json)")


def adapter_base(folder: str | None) -> str | None:
    """The base model of a PEFT adapter folder (adapter_config.json's base_model_name_or_path), else None."""
    if not folder:
        return None
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None
