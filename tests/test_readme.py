"""The README's two commands are what a new user runs; CI must run exactly the second one."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_readme_opens_with_demo_and_test_commands():
    demo, tests = _readme_commands()[:2]
    assert "influence-hooks demo" in demo and "torch==2.13.0" in demo
    assert "pytest" in tests and "torch==2.13.0" in tests


def test_ci_runs_exactly_the_readme_test_command():
    tests = _readme_commands()[1].strip()
    ci_lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines
