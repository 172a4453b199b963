"""Where training reads data and writes results.

Each path is taken from an environment variable if set, else a default inside this
repository; `./train.sh --data_dir ... --results_dir ...` overrides both.
"""
import os

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))

# Results/<run_name>/ holds config.json, training_log.json, valset.pkl, grad_dotprods/, checkpoints/.
RESULTS_DIR = os.environ.get("GRADDOTPROD_RESULTS_DIR", os.path.join(REPO_ROOT, "Results"))

# Tokenized Pile written by pile_tools (per-split, per-domain uint16 token files).
PILE_DATA_DIR = os.environ.get("GRADDOTPROD_PILE_DATA_DIR", os.path.join(REPO_ROOT, "data", "pile_tokenized"))

# Where the bundled sample corpus is built and tokenized when no tokenized Pile is found.
SAMPLE_DATA_DIR = os.environ.get("GRADDOTPROD_SAMPLE_DATA_DIR", os.path.join(REPO_ROOT, "data", "sample"))
