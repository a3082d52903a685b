"""``plasticity study run --backend ray``: groups as Ray tasks on a local Ray runtime, rows written by this process."""

from __future__ import annotations

import zlib

import pytest

from plasticity_lightning.cli import main
from plasticity_lightning.studies import ResultStore, StudySpec, run_study

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _contents(store: ResultStore) -> list[tuple]:
    """Every stored run, whole (history included), without the time it was written."""
    rows = store._select("SELECT key, study, config, seed, metrics, history FROM runs ORDER BY key")
    return [(*fields[:5], zlib.decompress(fields[5])) for fields in rows]


def test_ray_backend_store_equals_the_local_one(tmp_path, local_ray):
    spec = StudySpec(
        name="r", activations=["relu", "tanh"], hidden_sizes=[[4], [4, 4]], datasets=["moons"], trials=2, epochs=20
    )
    local = ResultStore(tmp_path / "local.sqlite")
    assert run_study(spec, local, workers=1) == 8  # in this process, one thread: what each local worker does
    remote = ResultStore(tmp_path / "ray.sqlite")
    assert run_study(spec, remote, workers=2, backend="ray") == 8
    assert len(_contents(remote)) == 8 and _contents(remote) == _contents(local)
    assert remote.claims() == []  # every claim released by the one writer
    assert run_study(spec, remote, workers=2, backend="ray") == 0  # stored runs are not trained again


def test_ray_backend_resumes_a_partial_store(tmp_path, local_ray, capsys):
    """A store a killed study left half done is completed through Ray by the CLI, as the local backend would."""
    spec_path = tmp_path / "p.yaml"
    spec_path.write_text(
        "name: p\nactivations: [relu, tanh, sigmoid]\nhidden_sizes: [[3]]\ndatasets: [xor]\ntrials: 2\nepochs: 10\n"
    )
    spec = StudySpec.from_yaml(spec_path)
    store_path = tmp_path / "p.sqlite"
    first = spec.groups()[0]
    from plasticity_lightning.studies.study import run_group

    ResultStore(store_path).write(run_group(spec.name, first))
    main(["study", "run", str(spec_path), "--store", str(store_path), "--backend", "ray", "--workers", "2"])
    assert "p: trained 4 runs; 6 in" in capsys.readouterr().out
    whole = ResultStore(tmp_path / "whole.sqlite")
    run_study(spec, whole, workers=1)
    assert _contents(ResultStore(store_path)) == _contents(whole)


def test_address_without_ray_backend_is_refused(tmp_path, capsys):
    spec_path = tmp_path / "a.yaml"
    spec_path.write_text("name: a\nactivations: [relu]\nhidden_sizes: [[3]]\ndatasets: [xor]\ntrials: 1\nepochs: 5\n")
    with pytest.raises(SystemExit) as exit_:
        main(["study", "run", str(spec_path), "--address", "auto"])
    assert exit_.value.code == 2
    assert "plasticity: error: --address 'auto' needs --backend ray" in capsys.readouterr().err
