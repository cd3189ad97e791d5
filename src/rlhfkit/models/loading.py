"""Load any causal LM and its tokenizer from a local folder (or the names `embedded` and `tiny`).

Nothing here downloads from a model hub: a path must be a local folder. Weights load only from safetensors
(pickled weights are refused), and `trust_remote_code` stays off unless the caller asks: see `safety.py`.
"""

from __future__ import annotations

from pathlib import Path

from rlhfkit.errors import ConfigError, UserError
from rlhfkit.models import lora
from rlhfkit.models.safety import check_loaded_weights, check_model_folder

# Special names accepted wherever a model folder is expected.
EMBEDDED = "embedded"
TINY = "tiny"

# Files of which a folder needs one for AutoTokenizer to build a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")

# Errors transformers, tokenizers and safetensors raise for a broken folder; each becomes one line.
_LOAD_ERRORS = (ValueError, RuntimeError, OSError, KeyError, TypeError)

# Tokens we may reuse as padding when the tokenizer's pad token is missing or equal to EOS.
_PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def resolve_model_path(name_or_path: str | None) -> Path:
    """Map `embedded`/None and `tiny` to their cache folders; check that anything else is a model folder."""
    if name_or_path in (None, "", EMBEDDED):
        from rlhfkit.models.embedded import ensure_embedded

        return ensure_embedded()
    if name_or_path == TINY:
        from rlhfkit.models.tiny import ensure_tiny

        return ensure_tiny(lambda: load_tokenizer(None))
    path = Path(name_or_path)
    if not path.is_dir():
        raise UserError(f"{path}: model folder not found (give a local folder with config.json, "
                        f"or '{EMBEDDED}' / '{TINY}'; nothing is downloaded)")
    if not (path / "config.json").is_file() and not (path / lora.ADAPTER_CONFIG).is_file():
        raise UserError(f"{path}: not a model folder: config.json is missing")
    return path


def choose_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token distinct from EOS when its vocabulary has one to spare.

    Padding with EOS is harmless for attention (the mask hides pads) but makes "the first EOS ends the
    response" and "pad" indistinguishable in token ids, so we prefer a separate token. We never add new
    tokens: that would change the embedding matrix of a model we did not train.
    """
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES + ((tokenizer.unk_token,) if tokenizer.unk_token else ()):
        if candidate in vocab and candidate != eos:
            tokenizer.pad_token = candidate
            return
    if tokenizer.pad_token is None:
        tokenizer.pad_token = eos


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_errors() -> tuple[type[Exception], ...]:
    from safetensors import SafetensorError

    return (*_LOAD_ERRORS, SafetensorError)


def load_tokenizer(path: str | Path | None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    folder = resolve_model_path(None if path is None else str(path))
    check_model_folder(folder, trust_remote_code, need_weights=False)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(f"{folder}: no tokenizer in this model folder (expected tokenizer.json or "
                        f"tokenizer_config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except load_errors() as exc:
        raise UserError(f"{folder}: cannot load the tokenizer: {first_line(exc)}") from exc
    choose_pad_token(tokenizer)
    # Prompts are left-padded so that every row's generation starts at the same column.
    tokenizer.padding_side = "left"
    return tokenizer


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}' (choose from {', '.join(sorted(DTYPES))})")
    return getattr(torch, DTYPES[name])


def attention_kernel(name: str) -> str:
    """The transformers `attn_implementation` for a config value. 'auto' is eager: rlhfkit runs its models
    on the CPU, where torch's flash-attention backward for short sequences costs more than the whole eager
    attention (embedded model, 8 x 66 tokens: forward+backward 0.65 s eager, 0.90 s sdpa)."""
    return "eager" if name == "auto" else name


def load_causal_lm(path: str | Path | None, dtype: str = "float32", trust_remote_code: bool = False,
                   attn_implementation: str = "auto", device: str = "cpu"):
    """An `AutoModelForCausalLM` from a local folder, on `device`, with dropout off (RL and RM training want
    deterministic forward passes: the ratio and the KL must compare the same function)."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model_path(None if path is None else str(path))
    if lora.is_adapter_folder(folder):  # a LoRA stage's output: its base with the adapter merged in
        base = load_causal_lm(lora.adapter_base(folder), dtype, trust_remote_code, attn_implementation, device)
        return merge_adapter(base, folder)
    check_model_folder(folder, trust_remote_code)
    try:
        # Mismatched shapes are loaded (randomly initialised) rather than raised with transformers' vague
        # "look at the above report", so that check_loaded_weights can name the first one.
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True,
            attn_implementation=attention_kernel(attn_implementation), output_loading_info=True,
            ignore_mismatched_sizes=True)
    except load_errors() as exc:
        raise UserError(f"{folder}: cannot load the model: {first_line(exc)}") from exc
    check_loaded_weights(folder, info)
    disable_dropout(model)
    return own_memory(model.to(device))


def own_memory(model):
    """`model` with every weight and buffer on the CPU copied out of its memory-mapped checkpoint file.

    transformers maps a safetensors file and hands each tensor a view of the mapping. The pages a forward or a
    conversion reads then stay resident as file pages for as long as any one tensor still points into the file,
    and they count in the process's RSS: a frozen model whose Linear weights are kept in bf16
    (models/precision.py) also kept its unused fp32 weights resident that way, 0.9 GB of the embedded LoRA PPO
    run's 3.1 GB peak (reference base and reward model). Copied once at load, the loader's views die, the file
    is unmapped and its pages leave the process. Tied weights stay tied: a shared Parameter is copied once and
    every module still holds that one Parameter. On a GPU the move to the device already copied them."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()
    return model


def merge_adapter(base, folder: Path):
    """`base` with the LoRA adapter of `folder` merged in (W + (alpha/r) B A): a plain model of its class."""
    try:
        model = lora.merge_adapter_folder(base, folder)
    except (*load_errors(), KeyError) as exc:
        raise UserError(f"{folder}: cannot apply the LoRA adapter: {first_line(exc)}") from exc
    disable_dropout(model)
    return model


def set_gradient_checkpointing(model, enabled: bool):
    """Turn on transformers' gradient checkpointing of each decoder layer (non-reentrant torch.utils.checkpoint,
    which replays the forward under the autocast state it first ran with) for a model that will be trained."""
    if enabled:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"key 'gradient_checkpointing': {type(model).__name__} does not support it")
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def check_fits_context(model, tokens: int, key: str) -> None:
    """Refuse a config whose sequences can outgrow the model's positions. Prompts are cut to
    max_prompt_length, so no data file can do this; only the config can. Models with learned positions
    (GPT-2) would crash mid-run with an index error, rotary ones (Llama) would quietly degrade."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and tokens > limit:
        raise ConfigError(f"key '{key}': sequences of up to {tokens} tokens do not fit the context of "
                          f"{model.name_or_path} (max_position_embeddings = {limit} in its config.json)")


def disable_dropout(model) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # Attention layers copy their dropout rate from the config when built (e.g. Llama's
        # `self.attention_dropout`), so zeroing the config afterwards is not enough.
        for attr in ("attention_dropout", "dropout", "hidden_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, key) and isinstance(getattr(model.config, key), float):
            setattr(model.config, key, 0.0)
