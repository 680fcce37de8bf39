"""Everything README.md shows runs as written: its Python blocks in order, then its `hf-gb` commands, in a fresh
folder (the blocks write out/... and tiny-bert* there). The install commands of the quick start are what CI runs."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def run(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{shlex.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_readme_is_a_short_guide():
    assert len(README.splitlines()) <= 400
    assert "issue" not in README.lower()  # no development history in the guide


def test_every_python_block_runs(tmp_path):
    code = blocks("python")
    assert len(code) >= 4
    for i, block in enumerate(code):
        (tmp_path / f"block{i}.py").write_text(block)
        run([sys.executable, f"block{i}.py"], tmp_path)
    # The shell commands that use what the blocks wrote (the quick start's install lines are CI's own).
    commands = [line.split("#")[0].strip() for block in blocks("bash") for line in block.splitlines()]
    commands = [c for c in commands if c.startswith("hf-gb ")]
    assert len(commands) >= 3
    for command in commands:
        args = shlex.split(command)
        run([sys.executable, "-c", "import sys; from hf_gb.cli import main; sys.exit(main(sys.argv[1:]))",
             *args[1:]], tmp_path)
    assert (tmp_path / "tiny-bert-plain" / "config.json").is_file()


def test_the_quick_start_runs_the_main_job_and_the_tests():
    assert 'pip install -e ".[examples]" && python examples/train_mnist.py' in README
    assert 'pip install -e ".[test]" && python -m pytest -q tests' in README
    assert (ROOT / "examples" / "train_mnist.py").is_file()
