"""GPT-2 models built from configuration only (no weight download)."""
import os

from transformers import GPT2Config, GPT2LMHeadModel

GPT2_VOCAB_SIZE = 50257

# GPT2Config kwargs per size (docs/METHOD.md section 5); GPT2-Tiny is for CPU runs and tests.
ARCHITECTURES = {
    "GPT2-Tiny": dict(n_layer=2, n_head=2, n_embd=128),
    "GPT2-Small": dict(n_layer=12, n_head=12, n_embd=768),
    "GPT2-Medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "GPT2-Large": dict(n_layer=36, n_head=20, n_embd=1280),
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


def build_config(architecture, n_positions=1024, vocab_pad_multiple=VOCAB_PAD_MULTIPLE, **overrides):
    """GPT2Config for a named size; `overrides` replace any config field (e.g. vocab_size, before padding).

    GELU is transformers' fused "gelu_pytorch_tanh": the same tanh approximation as GPT-2's
    "gelu_new", one kernel instead of five.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}: choose one of {sorted(ARCHITECTURES)}")
    kwargs = dict(vocab_size=GPT2_VOCAB_SIZE, n_positions=n_positions, tie_word_embeddings=True,
                  use_cache=False, activation_function="gelu_pytorch_tanh", **_NO_DROPOUT,
                  **ARCHITECTURES[architecture])
    kwargs.update(overrides)
    kwargs["vocab_size"] = padded_vocab_size(kwargs["vocab_size"], vocab_pad_multiple)
    return GPT2Config(**kwargs)


def build_model(architecture, n_positions=1024, attn_implementation="sdpa", init_from=None,
                gradient_checkpointing=False, vocab_pad_multiple=VOCAB_PAD_MULTIPLE, **overrides):
    """A GPT2LMHeadModel with dropout 0, tied wte/lm_head and the vocabulary padded to `vocab_pad_multiple`.

    init_from: optional local directory written by `save_pretrained` (never a hub name: nothing is
    downloaded); its weights are loaded into the model built from our config, so the checkpoint's
    shapes must match `architecture` (a checkpoint with the unpadded vocabulary is padded on load).
    """
    config = build_config(architecture, n_positions=n_positions, vocab_pad_multiple=vocab_pad_multiple,
                          **overrides)
    config._attn_implementation = attn_implementation
    if init_from is None:
        model = GPT2LMHeadModel(config)
    else:
        if not os.path.isdir(init_from):
            raise ValueError(f"init_from={init_from!r} is not a local directory: pass a directory written "
                             "by model.save_pretrained() (hub downloads are not used)")
        saved_vocab = GPT2Config.from_pretrained(init_from, local_files_only=True).vocab_size
        model = GPT2LMHeadModel.from_pretrained(init_from, config=config.__class__(
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
    if model.lm_head.weight is not model.transformer.wte.weight:
        model.tie_weights()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def count_parameters(model):
    """Number of distinct trainable parameters (the tied wte/lm_head counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
