"""GPT-2 models built from configuration only (no weight download)."""
import os

from transformers import GPT2Config, GPT2LMHeadModel

GPT2_VOCAB_SIZE = 50257

# GPT2Config kwargs per size (docs/METHOD.md section 4); GPT2-Tiny is for CPU runs and tests.
ARCHITECTURES = {
    "GPT2-Tiny": dict(n_layer=2, n_head=2, n_embd=128),
    "GPT2-Small": dict(n_layer=12, n_head=12, n_embd=768),
    "GPT2-Medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "GPT2-Large": dict(n_layer=36, n_head=20, n_embd=1280),
}

_NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)


def build_config(architecture, n_positions=1024, **overrides):
    """GPT2Config for a named size; `overrides` replace any config field (e.g. vocab_size)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}: choose one of {sorted(ARCHITECTURES)}")
    kwargs = dict(vocab_size=GPT2_VOCAB_SIZE, n_positions=n_positions, tie_word_embeddings=True,
                  use_cache=False, **_NO_DROPOUT, **ARCHITECTURES[architecture])
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def build_model(architecture, n_positions=1024, attn_implementation="sdpa", init_from=None,
                gradient_checkpointing=False, **overrides):
    """A GPT2LMHeadModel with dropout 0 and tied wte/lm_head.

    init_from: optional local directory written by `save_pretrained` (never a hub name: nothing is
    downloaded); its weights are loaded into the model built from our config, so the checkpoint's
    shapes must match `architecture`.
    """
    config = build_config(architecture, n_positions=n_positions, **overrides)
    config._attn_implementation = attn_implementation
    if init_from is None:
        model = GPT2LMHeadModel(config)
    else:
        if not os.path.isdir(init_from):
            raise ValueError(f"init_from={init_from!r} is not a local directory: pass a directory written "
                             "by model.save_pretrained() (hub downloads are not used)")
        model = GPT2LMHeadModel.from_pretrained(init_from, config=config, local_files_only=True,
                                                attn_implementation=attn_implementation)
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
