"""Mutation testing of one module against its own tests, with mutmut 3, in a scratch copy of the working tree.

    benchmarks/mutation.sh plasticity_lightning/metrics/rank.py               # its own tests (MODULE_TESTS)
    benchmarks/mutation.sh plasticity_lightning/metrics/rank.py tests/x.py    # or the tests named here
    benchmarks/mutation.sh plasticity_lightning/metrics/rank.py --sample 40   # an estimate from 40 random mutants
    benchmarks/mutation.sh --list                                             # the modules and their tests

mutmut's settings are ``[tool.mutmut]`` in pyproject.toml; this script only narrows them to one module
(``only_mutate``) and its tests (``pytest_add_cli_args_test_selection``) in the copy, so the checkout itself gets no
``mutants/`` folder. It prints every mutant left alive and two scores: all mutants, and the mutants that change
behaviour, i.e. without those listed with their reason in ``benchmarks/mutation_equivalent.tsv``. Exit status 1
when that score is below ``--min-score`` (90 by default), 2 on a usage error.

One mutmut worker by default (``--jobs``): each mutant runs the tests that cover the mutated function, one pytest
process at a time. ``--sample N`` tests N mutants drawn at random (``--seed``) instead of all of them, for a quick
estimate on a busy machine: it prints the share killed with its 95% Wilson interval and the survivors it found, and
is never a score (exit status 0 unless mutmut fails).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EQUIVALENT = REPO / "benchmarks" / "mutation_equivalent.tsv"

# Each module's own tests: the unit tests of what it computes, not the slow end-to-end fits that also reach it.
MODULE_TESTS: dict[str, list[str]] = {
    "plasticity_lightning/metrics/rank.py": ["tests/test_metrics_rank.py"],
    "plasticity_lightning/metrics/activity.py": [
        "tests/test_metrics_activity.py",
        "tests/test_nonfinite.py::test_dormancy_shares_of_a_layer_with_a_nonfinite_activation_are_nan",
        "tests/test_nonfinite.py::test_finite_layers_keep_their_shares_and_masks_exactly",
    ],
    "plasticity_lightning/metrics/entropy.py": ["tests/test_metrics_activity.py", "tests/test_metrics_edges.py"],
    "plasticity_lightning/metrics/weights.py": ["tests/test_metrics_activity.py", "tests/test_metrics_edges.py"],
    "plasticity_lightning/metrics/dynamics.py": ["tests/test_metrics_activity.py", "tests/test_metrics_dynamics.py"],
    "plasticity_lightning/metrics/collapse.py": [
        "tests/test_metrics_edges.py",
        "tests/test_nonfinite.py::test_collapse_shares_and_alignment_are_nan_on_nonfinite_inputs",
        "tests/test_nonfinite.py::test_float16_overflow_counts_as_nonfinite_in_that_precision",
    ],
    "plasticity_lightning/metrics/continual.py": [
        "tests/test_metrics_edges.py",
        "tests/test_metrics.py::test_functional_matches_numpy",
        "tests/test_metrics.py::test_metric_accumulates_like_the_functional",
        "tests/test_metrics.py::test_input_validation",
        "tests/test_mut_continual.py",
    ],
    "plasticity_lightning/metrics/continual_summary.py": [
        "tests/test_metrics_edges.py",
        "tests/test_mut_continual.py",
        "tests/test_transfer.py::test_transfer_matches_the_papers_formulas_and_skips_missing_cells",
    ],
    "plasticity_lightning/metrics/text.py": ["tests/test_metrics_edges.py"],
    "plasticity_lightning/metrics/features.py": [
        "tests/test_mut_features.py",
        "tests/test_toolbox_measures.py::test_feature_norm_and_variance_match_numpy_and_the_twin_equals_one_pass",
        "tests/test_toolbox_measures.py::test_weight_change_matches_numpy_and_accumulates_over_updates",
        "tests/test_toolbox_measures.py::test_grama_scores_match_numpy_and_the_twin_reduces_across_ranks",
    ],
    "plasticity_lightning/metrics/statistics.py": ["tests/test_mut_statistics.py"],
    "plasticity_lightning/probes/capture.py": ["tests/test_probes.py", "tests/test_mut_probes.py"],
    "plasticity_lightning/probes/probe_set.py": ["tests/test_probes.py", "tests/test_mut_probes.py"],
    "plasticity_lightning/surgery/units.py": ["tests/test_surgery.py", "tests/test_cbp_units.py"],
    "plasticity_lightning/surgery/topology.py": [
        "tests/test_surgery.py",
        "tests/test_cbp_units.py",
        "tests/test_mut_topology.py",
    ],
    "plasticity_lightning/studies/store.py": ["tests/test_study_store.py", "tests/test_mut_store.py"],
    # the report tests that train runs and open a browser are too slow to repeat per mutant: the data path's own
    # unit tests on hand-written run folders, and the bad inputs through the command
    "plasticity_lightning/reports/data.py": [
        "tests/test_report_data.py",
        "tests/test_mut_report_data.py",
        "tests/test_report_views.py::test_bad_report_inputs_get_one_line_and_exit_2",
    ],
    # CBP's utility and selection live in the trainer-free policy; the callback is its adapter
    "plasticity_lightning/policies/cbp.py": [
        "tests/test_cbp_units.py",
        "tests/test_policies.py",
        "tests/test_mut_cbp.py",
    ],
}


def equivalent_mutants() -> dict[str, str]:
    """``{mutant name: why it changes no behaviour}`` from the tab-separated list (``#`` starts a comment)."""
    if not EQUIVALENT.exists():
        return {}
    listed = {}
    for line in EQUIVALENT.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.partition("\t")
            listed[name.strip()] = reason.strip()
    return listed


def copy_tree(work: Path) -> None:
    """The working tree as git sees it (tracked and untracked, ignored files left out) into ``work``."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listing.split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is skipped
            target = work / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def narrow_config(work: Path, module: str, tests: list[str]) -> None:
    """Rewrite the copy's ``[tool.mutmut]`` table: the repository's settings, one module, its tests."""
    path = work / "pyproject.toml"
    text = path.read_text()
    settings = tomllib.loads(text).get("tool", {}).get("mutmut", {})
    settings["only_mutate"] = [module]
    settings["pytest_add_cli_args_test_selection"] = tests
    table = "[tool.mutmut]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())
    start = text.find("[tool.mutmut]")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + table
    else:
        following = re.search(r"^\[", text[start + 1 :], re.M)
        end = len(text) if following is None else start + 1 + following.start()
        text = text[:start] + table + "\n" + text[end:]
    path.write_text(text)


def mutant_names(mutmut: str, work: Path, env: dict[str, str], module: str) -> list[str]:
    """Every mutant name of ``module``: mutmut generates them (and collects which tests cover what) before it
    checks a name filter, so a filter that matches nothing leaves them listed in the module's ``.meta`` file."""
    none = module.removesuffix(".py").replace("/", ".") + ".no_such_function__mutmut_0"
    subprocess.run([mutmut, "run", "--max-children", "1", none], cwd=work, env=env, capture_output=True)
    meta = work / "mutants" / (module + ".meta")
    if not meta.exists():
        raise RuntimeError(f"mutmut generated no mutants for {module} (no {meta})")
    return sorted(json.loads(meta.read_text())["exit_code_by_key"])


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a share k/n (in percent)."""
    if n == 0:
        return 0.0, 100.0
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100.0 * (centre - half) / (1 + z * z / n), 100.0 * (centre + half) / (1 + z * z / n)


def sampled(mutmut: str, work: Path, env: dict[str, str], module: str, size: int, seed: int, jobs: int) -> int:
    """Run ``size`` mutants of ``module`` drawn at random and print the share killed with its interval."""
    names = mutant_names(mutmut, work, env, module)
    chosen = sorted(random.Random(seed).sample(names, min(size, len(names))))
    run = subprocess.run([mutmut, "run", "--max-children", str(jobs), *chosen], cwd=work, env=env)
    if run.returncode != 0:
        print(f"mutation: mutmut run exited {run.returncode}", file=sys.stderr)
        return run.returncode
    listing = subprocess.run(
        [mutmut, "results", "--all", "true"], cwd=work, env=env, check=True, capture_output=True, text=True
    )
    status = {}
    for line in listing.stdout.splitlines():
        name, _, result = line.strip().rpartition(": ")
        if name in chosen:
            status[name] = result
    listed = equivalent_mutants()
    killed = sum(status[name] in ("killed", "timeout") for name in chosen)
    alive = {name: status[name] for name in chosen if status[name] not in ("killed", "timeout")}
    equivalent = {name for name in alive if name in listed}
    print(f"\n{module}: {len(names)} mutants, a sample of {len(chosen)} (seed {seed}): {killed} killed")
    for name, result in sorted(alive.items()):
        note = f"  (equivalent: {listed[name]})" if name in equivalent else ""
        print(f"  {result:>10}  {name}{note}")
    behaving = len(chosen) - len(equivalent)
    low, high = wilson(killed, behaving)
    share = 100.0 * killed / behaving if behaving else 100.0
    print(
        f"sample estimate (not a score): {share:.1f}% of the {behaving} sampled mutants that change behaviour, "
        f"95% interval {low:.1f}-{high:.1f}%"
    )
    (work / "sample.json").write_text(
        json.dumps(
            {"module": module, "mutants": len(names), "sampled": len(chosen), "seed": seed, "killed": killed}
            | {"equivalent": len(equivalent), "alive": alive, "estimate": share, "interval": [low, high]}
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="?", help="a source file, e.g. plasticity_lightning/metrics/rank.py")
    parser.add_argument("tests", nargs="*", help="test files or node ids (default: the module's own tests)")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MUTATION_JOBS", "1")))
    parser.add_argument("--min-score", type=float, default=90.0, help="percent of behaviour-changing mutants")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(os.environ.get("MUTATION_DIR", Path(os.environ.get("TMPDIR", "/tmp")) / "plasticity-mutation")),
        help="scratch folder (one sub-folder per module)",
    )
    parser.add_argument("--sample", type=int, default=0, help="test only N mutants drawn at random: an estimate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --sample draw")
    parser.add_argument("--list", action="store_true", help="print the modules with their own tests and exit")
    args = parser.parse_args(argv)
    if args.list:
        for module, tests in MODULE_TESTS.items():
            print(module, *tests)
        return 0
    if args.module is None:
        parser.print_usage(sys.stderr)
        print("mutation: name a module (see --list)", file=sys.stderr)
        return 2
    module = Path(args.module).as_posix()
    tests = args.tests or MODULE_TESTS.get(module)
    if not (REPO / module).is_file() or not module.endswith(".py"):
        print(f"mutation: module={module!r} is not a Python file of this repository", file=sys.stderr)
        return 2
    if not tests:
        print(f"mutation: module={module!r} has no tests listed in MODULE_TESTS; name them after it", file=sys.stderr)
        return 2
    # the mutmut of this interpreter's environment first: another one on PATH would test another install
    beside = Path(sys.executable).with_name("mutmut")
    mutmut = str(beside) if beside.exists() else shutil.which("mutmut") or ""
    if not mutmut:
        print("mutation: mutmut is not installed (pip install -e '.[mutation]')", file=sys.stderr)
        return 2

    work = args.work / module.replace("/", "_").removesuffix(".py")
    shutil.rmtree(work, ignore_errors=True)  # every run starts from scratch: scores are repeatable
    work.mkdir(parents=True)
    copy_tree(work)
    narrow_config(work, module, tests)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONHASHSEED": "0"}
    print(f"mutation: {module} against {' '.join(tests)} in {work}", flush=True)
    if args.sample > 0:
        return sampled(mutmut, work, env, module, args.sample, args.seed, args.jobs)
    run = subprocess.run([mutmut, "run", "--max-children", str(args.jobs)], cwd=work, env=env)
    if run.returncode != 0:
        print(f"mutation: mutmut run exited {run.returncode}", file=sys.stderr)
        return run.returncode
    subprocess.run([mutmut, "export-cicd-stats"], cwd=work, env=env, check=True, capture_output=True)
    stats = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    listing = subprocess.run([mutmut, "results"], cwd=work, env=env, check=True, capture_output=True, text=True)
    alive, timeouts = {}, []
    for line in listing.stdout.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name and status == "timeout":  # counted as killed, as mutmut does; listed to re-check on a quiet machine
            timeouts.append(name)
        elif name:
            alive[name] = status
    listed = equivalent_mutants()
    prefix = module.removesuffix(".py").replace("/", ".") + "."
    equivalent = {name for name in alive if name in listed}
    stale = sorted(name for name in listed if name.startswith(prefix) and name not in alive)
    tested = stats["total"] - stats["skipped"]
    killed = stats["killed"] + stats["timeout"]
    print(f"\n{module}: {stats['total']} mutants, {killed} killed, {len(alive)} not killed")
    for name, status in sorted(alive.items()):
        note = f"  (equivalent: {listed[name]})" if name in equivalent else ""
        print(f"  {status:>10}  {name}{note}")
    for name in sorted(timeouts):
        print(f"  {'timeout':>10}  {name}  (counted as killed)")
    for name in stale:
        print(f"  listed as equivalent but not alive (killed, or renumbered after an edit): {name}")
    raw = 100.0 * killed / tested if tested else 100.0
    behaviour = 100.0 * killed / (tested - len(equivalent)) if tested > len(equivalent) else 100.0
    print(f"score: {raw:.1f}% of all mutants; {behaviour:.1f}% of the {tested - len(equivalent)} that change behaviour")
    (work / "score.json").write_text(
        json.dumps({"module": module, **stats, "equivalent": len(equivalent), "score": raw, "behaviour": behaviour})
    )
    return 0 if behaviour >= args.min_score else 1


if __name__ == "__main__":
    sys.exit(main())
