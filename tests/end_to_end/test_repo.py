"""The repository's promises to a new user: the README's test command is what CI runs."""

import re

from helpers import REPO


def test_readme_test_command_is_exactly_what_ci_runs_and_it_lints():
    ci_command = (REPO / ".ci/run").read_text().strip().splitlines()[-1]
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^python3 -m pip install .*$", readme.split("```", 2)[1], flags=re.M)
    assert ci_command in commands, (ci_command, commands)
    assert "ruff check" in ci_command and 'pytest -m "not slow"' in ci_command
