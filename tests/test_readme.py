"""Every code block of the README runs as written, in order, in one scratch folder (relative paths
as a user types them): ```python blocks share one namespace, ```bash blocks run in bash -e. A block
after `<!-- readme: slow -->` runs only in the slow suite; one after `<!-- readme: setup -->`
(installing from the checkout) runs there too, in the checkout itself; the block after
`<!-- readme: ci -->` is the test command, which must be .ci/run's (CI runs it; running it here
would recurse)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- readme: (?P<mark>\w+) -->\s*\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)


def blocks():
    text = ROOT.joinpath("README.md").read_text()
    return [(m["mark"] or "", m["lang"], m["code"], text[:m.start()].count("\n") + 1) for m in BLOCK.finditer(text)]


def run_blocks(workdir: Path, include_slow: bool):
    for name in ("configs", "tools", "bench"):
        (workdir / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONUNBUFFERED": "1"}
    namespace: dict = {"__name__": "__readme__"}
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for mark, lang, code, line in blocks():
            if mark == "ci" or (mark in ("slow", "setup") and not include_slow):
                continue
            if lang == "python":
                exec(compile(code, f"README.md:{line}", "exec"), namespace)
            elif lang == "bash":
                done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], env=env, capture_output=True,
                                      text=True, timeout=1800, cwd=ROOT if mark == "setup" else workdir)
                assert done.returncode == 0, f"README.md:{line} failed:\n{code}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            else:
                raise AssertionError(f"README.md:{line}: code block of language {lang!r} (use python or bash)")
    finally:
        os.chdir(cwd)


def test_readme_test_command_is_what_ci_runs():
    (command,) = [code for mark, _, code, _ in blocks() if mark == "ci"]
    ci = ROOT.joinpath(".ci/run").read_text()
    for line in command.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert line.strip().replace("pip install", "python -m pip install -q") in ci, line


def test_readme_blocks_run_in_order(tmp_path):
    run_blocks(tmp_path, include_slow=False)


@pytest.mark.slow
def test_readme_blocks_run_in_order_with_the_slow_ones(tmp_path):
    run_blocks(tmp_path, include_slow=True)
