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
LLAMA_ARCHITECTURES = {
    "Llama-Tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=344),
    "Llama-20M": dict(num_hidden_layers=8, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=688),
    "Llama-60M": dict(num_hidden_layers=12, hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=1376),
    "Llama-150M": dict(num_hidden_layers=18, hidden_size=768, num_attention_heads=12, num_key_value_heads=4,
                       intermediate_size=2048),
    "Llama-350M": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4,
                       intermediate_size=3072),
    "Llama-1B": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192),
}
# The Pythia suite's shapes (GPT-NeoX: parallel attention/MLP, partial rotary, untied head); Pythia's own
# vocabulary has 50304 rows, as GPT-2's padded to 64 does here.
PYTHIA_ARCHITECTURES = {
    "Pythia-14M": dict(num_hidden_layers=6, hidden_size=128, num_attention_heads=4, intermediate_size=512),
    "Pythia-70M": dict(num_hidden_layers=6, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "Pythia-160M": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "Pythia-410M": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
    "Pythia-1B": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=8, intermediate_size=8192),
}
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
