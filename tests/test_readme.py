"""The README's Python examples run as written."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    namespace: dict = {}
    for block in blocks:  # later blocks continue from earlier ones, as a reader would
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["stacked"]["0.weight"].shape[0] == 3
    # The preconditioning example: three steps, one refresh (inverse_every=10).
    assert int(namespace["opt_state"][0].refreshes) == 1
    assert int(namespace["kfac_state"].refreshes) == 1
