"""The README's promises: two set-up commands first, CI runs them verbatim, and the snippet works."""

import re
import runpy
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


def test_own_trainer_snippet_runs(in_tmp, capsys):
    match = re.search(r"<!-- snippet: own-trainer.*?-->\n```python\n(.*?)```", README, re.S)
    assert match, "README lost its own-trainer snippet"
    script = in_tmp / "snippet.py"
    script.write_text(match.group(1))
    namespace = runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "step 0: task 0 of 3 begins" in out and "task 2 of 3 begins" in out
    replaced = int(re.search(r"units replaced by continual backprop: (\d+)", out).group(1))
    assert replaced > 0
    table = next(cb for cb in namespace["trainer"].callbacks if type(cb).__name__ == "TaskAccuracyTable")
    assert sorted(table.rows) == [0, 1, 2]
    assert table.rows[2][2] > 0.7  # the last task is learned
    assert "effective rank of the hidden layer:" in out
    rank = next(cb for cb in namespace["trainer"].callbacks if type(cb).__name__ == "RankMonitor")
    assert [h["task"] for h in rank.history] == [0, 1, 2, 2]  # three task starts and the end of training


def test_heads_snippet_runs_shortened(in_tmp):
    match = re.search(r"<!-- snippet: heads.*?-->\n```python\n(.*?)```", README, re.S)
    assert match, "README lost its attention-heads snippet"
    code = match.group(1)
    for long, short in [
        ("max_steps=1000", "max_steps=8, enable_progress_bar=False, logger=False"),
        ("start_step=400, learn_steps=100", "start_step=2, learn_steps=3, probe_size=4, max_new_tokens=4"),
        ('TextDataModule(corpus="shakespeare")', 'TextDataModule(corpus="shakespeare", max_tokens=40_000)'),
    ]:
        assert long in code
        code = code.replace(long, short)
    script = in_tmp / "heads.py"
    script.write_text(code)
    namespace = runpy.run_path(str(script), run_name="__main__")
    cycle = namespace["trainer"].callbacks[1]
    assert len(cycle.history) == 2 and (in_tmp / "plasticity_cycle.json").exists()


def test_heads_plain_loop_snippet_runs(in_tmp):
    match = re.search(r"<!-- snippet: heads-plain-loop.*?-->\n```python\n(.*?)```", README, re.S)
    assert match, "README lost its plain-loop heads snippet"
    code = match.group(1).replace("num_batches=50", "num_batches=2")
    code = code.replace("# revive later: reviver.revive(", "revived = reviver.revive(")
    setup = (
        "import torch\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "torch.manual_seed(0)\n"
        "model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50, n_positions=16))\n"
        "optimizer = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "batches = [torch.randint(0, 50, (4, 16)) for _ in range(6)]\n"
    )
    script = in_tmp / "heads_loop.py"
    script.write_text(setup + code)
    namespace = runpy.run_path(str(script), run_name="__main__")
    mask = namespace["scores"].gates.mask
    # three windows pruned two heads each, never a layer's last head; then one dead head came back, near-silent
    assert mask.shape == (2, 4) and ((mask > 0).sum(dim=1) >= 1).all()
    assert int((mask == 0).sum()) == 5 and 0 < float(mask[mask < 1].max()) < 0.1
