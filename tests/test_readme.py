"""The README's Python examples run as written (so the documented API cannot rot)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no Python example"
    namespace = {"__name__": "readme"}  # later blocks continue earlier ones
    for code in blocks:
        exec(compile(code, str(README), "exec"), namespace)
    assert "trace" in capsys.readouterr().out
