"""The named model sizes of `--architecture` and the `--attention` kinds, as plain data.

Torch-free on purpose: the flags (GradDotProd_LM/args.py) offer and check these names before torch and
transformers are imported; GradDotProd_LM/model.py builds the models from them.
"""

# GPT2Config kwargs per size (docs/METHOD.md section 5); GPT2-Tiny is for CPU runs and tests.
ARCHITECTURES = {
    "GPT2-Tiny": dict(n_layer=2, n_head=2, n_embd=128),
    "GPT2-Small": dict(n_layer=12, n_head=12, n_embd=768),
    "GPT2-Medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "GPT2-Large": dict(n_layer=36, n_head=20, n_embd=1280),
}

# Llama-style (RoPE, RMSNorm, SwiGLU, grouped-query attention), embeddings tied as in Llama 3.2 1B and SmolLM.
# Sizes are the total parameter count with the padded GPT-2 vocabulary (docs/MODELS.md).
_LLAMA_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
LLAMA_ARCHITECTURES = {name: dict(zip(_LLAMA_SIZES, sizes)) for name, sizes in {
    "Llama-Tiny": (2, 128, 4, 2, 344),
    "Llama-20M": (8, 256, 4, 2, 688),
    "Llama-60M": (12, 512, 8, 4, 1376),
    "Llama-150M": (18, 768, 12, 4, 2048),
    "Llama-350M": (24, 1024, 16, 4, 3072),
    "Llama-1B": (16, 2048, 32, 8, 8192),
}.items()}
# The Pythia suite's shapes (GPT-NeoX: parallel attention/MLP, partial rotary, untied head); Pythia's own
# vocabulary has 50304 rows, as GPT-2's padded to 64 does here.
_PYTHIA_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
PYTHIA_ARCHITECTURES = {name: dict(zip(_PYTHIA_SIZES, sizes)) for name, sizes in {
    "Pythia-14M": (6, 128, 4, 512),
    "Pythia-70M": (6, 512, 8, 2048),
    "Pythia-160M": (12, 768, 12, 3072),
    "Pythia-410M": (24, 1024, 16, 4096),
    "Pythia-1B": (16, 2048, 8, 8192),
}.items()}
ARCHITECTURE_NAMES = (*ARCHITECTURES, *LLAMA_ARCHITECTURES, *PYTHIA_ARCHITECTURES)  # every --architecture

GPT2_MAX_SEQ_LEN = 1024  # GPT-2's learned position table
ROPE_MAX_SEQ_LEN = 2048  # positions the RoPE models are built for

# --attention: transformers' own attention, or GradDotProd_LM/lowrank_attention.py (Llama family only)
ATTENTIONS = ("standard", "lowrank")


def named_max_seq_len(architecture):
    """Longest row a named size takes (a --model_config's is read by model.max_seq_len, with transformers)."""
    return GPT2_MAX_SEQ_LEN if architecture in ARCHITECTURES else ROPE_MAX_SEQ_LEN


def supports_lowrank_attention(architecture, model_config=None):
    """Whether `--attention lowrank` applies: the Llama-style sizes and --model_config files of model_type llama."""
    if model_config is not None:
        return model_config.get("model_type") == "llama"
    return architecture in LLAMA_ARCHITECTURES
