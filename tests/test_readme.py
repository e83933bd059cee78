"""Every Python example of README.md runs as written, on the tiny model instead of SmolLM2-135M."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 1


def test_readme_python_examples_run(tiny_llama, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SENSIQUANT_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in python_blocks():
        code = block.replace('"smollm2-135m"', repr(str(tiny_llama)))
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own examples
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "out" / "smollm2-3.25" / "sensiquant.json").is_file()
    assert namespace["report"].bits_per_param > 0
