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


def test_readme_is_a_front_page_that_links_into_the_docs():
    """At most 200 lines: the set-up commands, one figure, the feature table and links into docs/ that resolve."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "_hooks" / "generate.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    assert len(README.splitlines()) <= 200
    assert README.count("![") == 1 and (REPO / "docs" / "images" / "plasticity_loss_comparison.png").exists()
    assert "mkdocs build --strict" in README  # the docs build, beside the test command
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    for link in local:
        path, _, anchor = link.partition("#")
        assert (REPO / path).exists(), link
        if anchor:  # the heading exists on that page, as the site's table of contents names it
            headings = re.findall(r"^#{1,6} (.+)$", (REPO / path).read_text(), re.M)
            assert anchor in {hooks._slugify(h) for h in headings}, link
    # the done-when paths: each one link from the front page
    for page in ("docs/guides/plain-loop.md", "docs/guides/measuring.md", "docs/troubleshooting.md"):
        assert any(link.startswith(page) for link in local), page
