"""The README's promises: two set-up commands first, CI runs them verbatim, and the snippet works."""

import re
import shlex

from conftest import REPO

README = (REPO / "README.md").read_text()


def _setup_commands() -> list[str]:
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block is not None and README.index(first_block.group(0)) < README.index("## ")
    return [line for line in first_block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_exactly_two_setup_commands():
    install_and_run, install_and_test = _setup_commands()
    assert install_and_run == 'pip install -e ".[all]" && plasticity fit --config recipes/quickstart.yaml'
    assert install_and_test.startswith('pip install -e ".[test]" && ') and install_and_test.endswith("&& pytest")
    assert shlex.split(install_and_run)[3] == ".[all]"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "python3 -m venv" in ci and "set -euo pipefail" in ci
    # CI takes the command from the README itself, so the two cannot drift apart
    assert "README.md" in ci
    assert (REPO / ".ci" / "run").stat().st_mode & 0o111
