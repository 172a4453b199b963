"""Models built from configuration only (no weight download): GPT-2, Llama-style and Pythia sizes, or any
Hugging Face causal-LM config the engine supports (`--model_config FILE.json`). All read GPT-2 tokens."""
import json
import os

from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, LlamaConfig

from GradDotProd_LM.architectures import (ARCHITECTURES, ATTENTIONS, LLAMA_ARCHITECTURES, PYTHIA_ARCHITECTURES,
                                          ROPE_MAX_SEQ_LEN, named_max_seq_len)
from GradDotProd_LM.lowrank_attention import add_lowrank_attention

GPT2_VOCAB_SIZE = 50257

# every --architecture: name -> (config class, its kwargs)
MODEL_ARCHITECTURES = {
    **{name: (GPT2Config, kwargs) for name, kwargs in ARCHITECTURES.items()},
    **{name: (LlamaConfig, kwargs) for name, kwargs in LLAMA_ARCHITECTURES.items()},
    **{name: (GPTNeoXConfig, kwargs) for name, kwargs in PYTHIA_ARCHITECTURES.items()},
}

_NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)

# The embedding/head is padded to a multiple of this many rows (50257 -> 50304): GPU matrix kernels for a
# dimension that is not a multiple of 8 fall back to slow paths, and the head's three GEMMs are the
# largest of the step. Token ids are unchanged and the padded rows are never a target; their logits
# only enter the softmax, where training drives them down (nanoGPT does the same).
VOCAB_PAD_MULTIPLE = 64


def padded_vocab_size(vocab_size, multiple=VOCAB_PAD_MULTIPLE):
    """The smallest multiple of `multiple` (1: no padding) that is >= vocab_size."""
    if multiple < 1:
        raise ValueError(f"vocab_pad_multiple={multiple} must be >= 1 (1 turns padding off)")
    return -(-vocab_size // multiple) * multiple


def max_seq_len(architecture, model_config=None):
    """Longest row the model takes: GPT-2's position table, else the RoPE models' position count."""
    if model_config is not None:
        config = AutoConfig.for_model(**model_config)
        return int(getattr(config, "n_positions", None) or config.max_position_embeddings)
    return named_max_seq_len(architecture)


def load_model_config(path):
    """The dict of a Hugging Face config.json (`model_type` + fields), checked to hold GPT-2's tokens."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError(f"{path} is not a Hugging Face model config (no \"model_type\")")
    try:
        built = AutoConfig.for_model(**config)
    except Exception as err:  # a bad field: ValueError, TypeError, huggingface_hub's StrictDataclassError, ...
        raise ValueError(f"{path}: {type(err).__name__}: {' '.join(str(err).split())}") from None
    if type(built) not in AutoModelForCausalLM._model_mapping:
        raise ValueError(f"{path}: model_type {config['model_type']!r} has no causal-LM class in transformers")
    if not isinstance(config.get("vocab_size", 1), int) or config.get("vocab_size", 1) < 1:
        raise ValueError(f"{path}: vocab_size {config['vocab_size']!r} is not a positive integer")
    return config  # its vocab_size (the data's when absent) must hold the data's ids: checked at start-up


def build_config(architecture, n_positions=1024, vocab_pad_multiple=VOCAB_PAD_MULTIPLE, model_config=None,
                 vocab_size=GPT2_VOCAB_SIZE, **overrides):
    """The Hugging Face config of a named size (or of `model_config`, a config.json dict); `overrides`
    replace any field. `vocab_size` is the data's vocabulary (before padding); a `model_config` that names
    its own keeps it. Dropout is 0 (a `model_config`'s dropout probabilities and layer drop too) and the KV
    cache off.

    GPT-2's GELU is transformers' fused "gelu_pytorch_tanh": the same tanh approximation as GPT-2's
    "gelu_new", one kernel instead of five.
    """
    if model_config is not None:
        kwargs = dict(model_config, use_cache=False, **overrides)
        kwargs["vocab_size"] = padded_vocab_size(kwargs.get("vocab_size", vocab_size), vocab_pad_multiple)
        config = AutoConfig.for_model(**kwargs)
        # the app trains without dropout, as its named sizes do: the validation rows share the training forward,
        # so dropout would make grad L_val a random draw per step (GPT-2's and OPT's configs default to 0.1)
        for key, value in config.to_dict().items():
            if ("dropout" in key or key.endswith("pdrop") or key == "layerdrop") and key not in overrides \
                    and isinstance(value, (int, float)) and not isinstance(value, bool) and value:
                setattr(config, key, 0.0)
        return config
    if architecture not in MODEL_ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}: choose one of {sorted(MODEL_ARCHITECTURES)}")
    config_class, sizes = MODEL_ARCHITECTURES[architecture]
    if config_class is GPT2Config:
        kwargs = dict(n_positions=n_positions, tie_word_embeddings=True, activation_function="gelu_pytorch_tanh",
                      **_NO_DROPOUT)
    else:
        kwargs = dict(max_position_embeddings=max(n_positions, ROPE_MAX_SEQ_LEN),
                      tie_word_embeddings=config_class is LlamaConfig, attention_dropout=0.0)
        if config_class is GPTNeoXConfig:
            kwargs.update(hidden_dropout=0.0, classifier_dropout=0.0)
    kwargs.update(vocab_size=vocab_size, use_cache=False, **sizes)
    kwargs.update(overrides)
    kwargs["vocab_size"] = padded_vocab_size(kwargs["vocab_size"], vocab_pad_multiple)
    return config_class(**kwargs)


def build_model(architecture, n_positions=1024, attn_implementation="sdpa", init_from=None,
                gradient_checkpointing=False, vocab_pad_multiple=VOCAB_PAD_MULTIPLE, model_config=None,
                attention="standard", attention_rank=16, attention_block=64, **overrides):
    """A causal LM built from config: dropout 0, the vocabulary padded to `vocab_pad_multiple`, GPT-2's
    wte/lm_head tied (and the Llama sizes' embedding and head).

    model_config: a Hugging Face config.json dict (any causal-LM family); then `architecture` is ignored.
    attention: "standard" (transformers' `attn_implementation`) or "lowrank" (Llama family only:
    GradDotProd_LM/lowrank_attention.py with `attention_rank` summaries per block of `attention_block`
    positions; its maps start as segment averages, after the weights of `init_from` are loaded).
    init_from: optional local directory written by `save_pretrained` (never a hub name: nothing is
    downloaded); its weights are loaded into the model built from our config, so the checkpoint's
    shapes must match (a checkpoint with the unpadded vocabulary is padded on load).
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}: choose one of {ATTENTIONS}")
    config = build_config(architecture, n_positions=n_positions, vocab_pad_multiple=vocab_pad_multiple,
                          model_config=model_config, **overrides)
    model_class = GPT2LMHeadModel if isinstance(config, GPT2Config) else AutoModelForCausalLM
    if attn_implementation == "sdpa" and not AutoModelForCausalLM._model_mapping[type(config)]._supports_sdpa:
        attn_implementation = "eager"  # a family transformers gives no SDPA path (Gemma 2: logit soft-capping)
    if init_from is None:
        model = (GPT2LMHeadModel(config) if model_class is GPT2LMHeadModel
                 else AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation))
        config._attn_implementation = attn_implementation
        model.config._attn_implementation = attn_implementation
    else:
        if not os.path.isdir(init_from):
            raise ValueError(f"init_from={init_from!r} is not a local directory: pass a directory written "
                             "by model.save_pretrained() (hub downloads are not used)")
        saved_vocab = AutoConfig.from_pretrained(init_from, local_files_only=True).vocab_size
        model = model_class.from_pretrained(init_from, config=config.__class__(
            **{**config.to_dict(), "vocab_size": saved_vocab}), local_files_only=True,
            attn_implementation=attn_implementation)
        if saved_vocab != config.vocab_size:
            if padded_vocab_size(saved_vocab, vocab_pad_multiple) != config.vocab_size:
                raise ValueError(f"init_from={init_from!r} has a vocabulary of {saved_vocab} rows; "
                                 f"{architecture} needs {config.vocab_size}")
            model.resize_token_embeddings(config.vocab_size, mean_resizing=False)
    # transformers infers the loss from the class name, which GPT2LMHeadModel does not match; name the
    # causal-LM loss it falls back to anyway (mean over shifted targets), so it is chosen without a warning.
    model.loss_type = "ForCausalLM"
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        model.tie_weights()
    if attention == "lowrank":
        add_lowrank_attention(model, attention_rank, attention_block)  # raises for a non-Llama model
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def count_parameters(model):
    """Number of distinct trainable parameters (the tied wte/lm_head counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
