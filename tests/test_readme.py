"""The README's engine example runs as written, and its two set-up commands are the ones CI uses."""
import pathlib
import re

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_engine_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    example = next(b for b in blocks if "GradDotProdEngine(model" in b)
    scope = {}
    exec(compile(example, "README.md", "exec"), scope)
    result = scope["result"]
    assert result.dot_products.shape == (8,)
    assert set(result.per_parameter) == {n for n, p in scope["model"].named_parameters()}
    assert not scope["engine"].attached


def test_ci_runs_the_readme_test_command():
    ci = (pathlib.Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "test-command" in ci
    command = re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```", README, flags=re.S).group(1)
    assert "pytest" in command and "pip install" in command
