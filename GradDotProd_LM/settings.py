"""Where the app writes results and reads data when no flag says so.

Each directory is the first of:

1. its environment variable: GRADDOTPROD_RESULTS_DIR, GRADDOTPROD_PILE_DATA_DIR, GRADDOTPROD_SAMPLE_DATA_DIR;
2. the settings file's RESULTS_DIR, PILE_DATA_DIR, SAMPLE_DATA_DIR (a relative path there is relative to the
   file's own directory). The settings file is the one $GRADDOTPROD_CONFIG_FILE names, else
   `config_file.py` in the current directory if there is one (the repository's, when run from the
   repository; ./train.sh names the repository's from any directory);
3. the current directory: ./Results, ./data/pile_tokenized, ./data/sample.

Never the directory the package is installed in. `--results_dir` / `--data_dir` override all of these.
"""
import os
import runpy
from dataclasses import dataclass

CONFIG_FILE_ENV = "GRADDOTPROD_CONFIG_FILE"
CONFIG_FILE_NAME = "config_file.py"

# setting name in the settings file -> (environment variable, default relative to the current directory)
_SETTINGS = {
    "RESULTS_DIR": ("GRADDOTPROD_RESULTS_DIR", "Results"),
    "PILE_DATA_DIR": ("GRADDOTPROD_PILE_DATA_DIR", os.path.join("data", "pile_tokenized")),
    "SAMPLE_DATA_DIR": ("GRADDOTPROD_SAMPLE_DATA_DIR", os.path.join("data", "sample")),
}


@dataclass(frozen=True)
class Settings:
    results_dir: str      # Results/<run_name>/ for every run
    pile_data_dir: str    # tokenized Pile written by pile_tools
    sample_data_dir: str  # where the bundled sample corpus is built when no tokenized Pile is found
    config_file: str | None  # the settings file that was read, if any


def settings_file() -> str | None:
    """The settings file that applies now (absolute path), or None."""
    named = os.environ.get(CONFIG_FILE_ENV)
    if named:
        if not os.path.isfile(named):
            raise FileNotFoundError(f"${CONFIG_FILE_ENV}={named}: no such settings file (unset it, or name a "
                                    f"{CONFIG_FILE_NAME} holding RESULTS_DIR / PILE_DATA_DIR / SAMPLE_DATA_DIR)")
        return os.path.abspath(named)
    local = os.path.abspath(CONFIG_FILE_NAME)
    return local if os.path.isfile(local) else None


def load_settings() -> Settings:
    """The directories as they apply now (absolute paths); see the module docstring for the order."""
    path = settings_file()
    try:
        from_file = runpy.run_path(path) if path else {}
    except Exception as err:  # whatever the file's own code raises
        raise ValueError(f"settings file {path}: {type(err).__name__}: {err}") from err
    resolved = {}
    for name, (env_var, default) in _SETTINGS.items():
        if os.environ.get(env_var):
            resolved[name] = os.path.abspath(os.environ[env_var])
        elif from_file.get(name) is not None:
            value = from_file[name]
            if not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"settings file {path}: {name} must be a path string, got {type(value).__name__}")
            resolved[name] = os.path.abspath(os.path.join(os.path.dirname(path), value))
        else:
            resolved[name] = os.path.abspath(default)
    return Settings(resolved["RESULTS_DIR"], resolved["PILE_DATA_DIR"], resolved["SAMPLE_DATA_DIR"], path)


def resolve_run_dir(run: str) -> str | None:
    """RUN as a path if it is a directory, else <results dir>/RUN; None if neither exists (what export, curate
    and attribute take as RUN)."""
    if os.path.isdir(run):
        return os.path.abspath(run)
    under_results = os.path.join(load_settings().results_dir, run)
    return under_results if os.path.isdir(under_results) else None
