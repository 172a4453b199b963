"""This repository's settings: where training writes results and reads data.

Not a module of the package: the app reads this file (GradDotProd_LM/settings.py) when it runs in this
directory, or from anywhere through ./train.sh. Relative paths are relative to this file's directory.
Environment variables override each setting (GRADDOTPROD_RESULTS_DIR, GRADDOTPROD_PILE_DATA_DIR,
GRADDOTPROD_SAMPLE_DATA_DIR) and flags override both (--results_dir, --data_dir).
"""

# Results/<run_name>/ holds config.json, training_log.json, valset.pkl, grad_dotprods/, checkpoints/.
RESULTS_DIR = "Results"

# Tokenized Pile written by pile_tools (per-split, per-domain uint16 token files).
PILE_DATA_DIR = "data/pile_tokenized"

# Where the bundled sample corpus is built and tokenized when no tokenized Pile is found.
SAMPLE_DATA_DIR = "data/sample"
