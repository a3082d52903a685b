"""Bad inputs to `plasticity fit`, each named: exit status 2 and one line naming the field and the value.

Covers the command line, checkpoints (`--ckpt_path`), the trainer, models, datamodules, task schedules and the
callbacks' constructor arguments, every one through the real entry point (`plasticity_lightning.cli.main`). Other
test files hold the bad inputs of the study store and of reports.
"""

import http.server
import os
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import REPO

from plasticity_lightning.cli import main

QUICKSTART = ["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--trainer.fast_dev_run=1"]
TEXT = ["fit", "--model", "CausalLM", "--model.pretrained", "false", "--data", "TextDataModule"]


def _model(name: str, *extra: str) -> list[str]:
    return ["fit", "--model", name, "--data", "DigitsDataModule", "--trainer.fast_dev_run=1", *extra]


def _data(name: str, *extra: str) -> list[str]:
    return ["fit", "--model", "MLP", "--data", name, "--trainer.fast_dev_run=1", *extra]


def _callback(name: str, *settings: str) -> list[str]:
    """The quickstart with one more callback given a bad setting (``field=value``)."""
    return [*QUICKSTART, f"--trainer.callbacks+={name}", *(f"--trainer.callbacks.{s}" for s in settings)]


def _ckpt(name: str, *extra: str) -> list[str]:
    return [*QUICKSTART, f"--ckpt_path={{ckpt}}/{name}", *extra]


# (id, arguments, what the one line must contain). `{ckpt}` is the folder of planted checkpoint files, `{url}` the
# address of a local HTTP server that serves it, `{adam}` a quickstart checkpoint trained with Adam.
CASES = [
    # ---------------------------------------------------------------- checkpoints
    ("ckpt_missing_file", _ckpt("nothing.ckpt"), ["--ckpt_path=", "nothing.ckpt", "does not exist"]),
    ("ckpt_directory", [*QUICKSTART, "--ckpt_path={ckpt}"], ["--ckpt_path=", "is a directory"]),
    ("ckpt_text_file", _ckpt("notes.ckpt"), ["notes.ckpt", "not a readable checkpoint (text"]),
    ("ckpt_truncated", _ckpt("truncated.ckpt"), ["truncated.ckpt", "not a readable checkpoint", "truncated"]),
    ("ckpt_empty_file", _ckpt("empty.ckpt"), ["empty.ckpt", "is an empty file"]),
    ("ckpt_random_bytes", _ckpt("noise.ckpt"), ["noise.ckpt", "not a readable checkpoint (not a PyTorch file"]),
    ("ckpt_holds_a_list", _ckpt("list.ckpt"), ["list.ckpt", "holds a list, not a Lightning checkpoint"]),
    ("ckpt_dict_without_state", _ckpt("plain_dict.ckpt"), ["plain_dict.ckpt", "not a Lightning checkpoint"]),
    ("ckpt_weights_only_for_fit", _ckpt("weights.ckpt"), ["weights.ckpt", "weights only", "cannot resume"]),
    ("ckpt_code_payload", _ckpt("payload.ckpt"), ["payload.ckpt", "safe loader refuses", "--weights_only false"]),
    ("ckpt_plain_pickle", _ckpt("pickled.ckpt"), ["pickled.ckpt", "a plain pickle", "--weights_only false"]),
    (
        "ckpt_other_architecture",
        _ckpt("mlp_32_tanh.ckpt"),
        ["mlp_32_tanh.ckpt", "holds a MLP with hidden_sizes=[32], activation='tanh'", "hidden_sizes=[256, 256]"],
    ),
    ("ckpt_other_model_class", _ckpt("convnet.ckpt"), ["convnet.ckpt", "holds a ConvNet", "asks for a MLP"]),
    ("ckpt_url_not_found", [*QUICKSTART, "--ckpt_path={url}/missing.ckpt"], ["missing.ckpt", "HTTP 404"]),
    ("ckpt_url_text", [*QUICKSTART, "--ckpt_path={url}/notes.ckpt"], ["{url}/notes.ckpt", "not a readable"]),
    ("ckpt_url_payload", [*QUICKSTART, "--ckpt_path={url}/payload.ckpt"], ["{url}/payload.ckpt", "refuses"]),
    ("ckpt_foreign_weights", _ckpt("whole.ckpt"), ["whole.ckpt", "weights that do not fit", "MLP"]),
    (
        "ckpt_other_optimizer",
        [*QUICKSTART[:3], "--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--ckpt_path={adam}"],
        ["last.ckpt", "another optimizer than SGD", "momentum"],
    ),
    ("ckpt_url_unreachable", [*QUICKSTART, "--ckpt_path=http://127.0.0.1:9/x.ckpt"], ["127.0.0.1:9", "cannot be read"]),
    ("ckpt_unknown_scheme", [*QUICKSTART, "--ckpt_path=nosuchscheme://x.ckpt"], ["nosuchscheme://x.ckpt", "cannot"]),
    ("ckpt_memory_url_missing", [*QUICKSTART, "--ckpt_path=memory://none.ckpt"], ["memory://none.ckpt", "cannot"]),
    ("ckpt_last_without_runs", [*QUICKSTART, "--ckpt_path=last"], ["--ckpt_path last", "version_*", "last.ckpt"]),
    ("ckpt_best_keyword", [*QUICKSTART, "--ckpt_path=best"], ["--ckpt_path='best' is not supported"]),
    ("model_from_checkpoint_alone", [*QUICKSTART, "--model_from_checkpoint=true"], ["needs a checkpoint"]),
    ("weights_only_not_bool", [*QUICKSTART, "--weights_only=maybe"], ["weights_only='maybe'"]),
    # ---------------------------------------------------------------- command line and trainer
    ("unknown_model_class", [*QUICKSTART, "--model", "MLPX"], ["--model MLPX: no such class", "MLP"]),
    ("unknown_data_class", [*QUICKSTART, "--data", "Digits"], ["--data Digits: no such class", "DigitsDataModule"]),
    ("unknown_schedule_class", [*QUICKSTART, "--data.schedule=Foo"], ["--data.schedule Foo: no such class", "Perm"]),
    ("config_file_missing", [*QUICKSTART, "--config=nowhere.yaml"], ["nowhere.yaml", "does not exist"]),
    ("seed_not_a_number", [*QUICKSTART, "--seed_everything=abc"], ["seed_everything='abc' is invalid"]),
    ("max_epochs_not_int", [*QUICKSTART, "--trainer.max_epochs=abc"], ["trainer.max_epochs='abc' is invalid"]),
    ("max_epochs_negative", [*QUICKSTART, "--trainer.max_epochs=-5"], ["max_epochs", "-5"]),
    ("max_steps_negative", [*QUICKSTART, "--trainer.max_steps=-5"], ["max_steps", "-5"]),
    ("accelerator_unknown", [*QUICKSTART, "--trainer.accelerator=foo"], ["accelerator='foo'", "cpu"]),
    ("strategy_unknown", [*QUICKSTART, "--trainer.strategy=foo"], ["strategy='foo'"]),
    ("precision_unknown", [*QUICKSTART, "--trainer.precision=13"], ["trainer.precision='13' is invalid", "bf16"]),
    ("devices_zero", [*QUICKSTART, "--trainer.devices=0"], ["devices='0'"]),
    ("accumulate_grad_zero", [*QUICKSTART, "--trainer.accumulate_grad_batches=0"], ["accumulate_grad_batches=0"]),
    ("check_val_every_zero", [*QUICKSTART, "--trainer.check_val_every_n_epoch=0"], ["check_val_every_n_epoch=0"]),
    ("log_every_negative", [*QUICKSTART, "--trainer.log_every_n_steps=-1"], ["trainer.log_every_n_steps=-1"]),
    ("limit_train_negative", [*QUICKSTART, "--trainer.limit_train_batches=-1"], ["trainer.limit_train_batches=-1"]),
    ("val_check_negative", [*QUICKSTART, "--trainer.val_check_interval=-1"], ["trainer.val_check_interval=-1"]),
    ("clip_algorithm_unknown", [*QUICKSTART, "--trainer.gradient_clip_algorithm=foo"], ["gradient_clip_algorithm"]),
    ("clip_value_negative", [*QUICKSTART, "--trainer.gradient_clip_val=-1"], ["trainer.gradient_clip_val=-1"]),
    # ---------------------------------------------------------------- models
    ("mlp_activation", [*QUICKSTART, "--model.activation=foo"], ["MLP.activation='foo' is not supported", "relu"]),
    ("mlp_hidden_negative", [*QUICKSTART, "--model.hidden_sizes=[64, -3]"], ["MLP.hidden_sizes[1]=-3"]),
    ("mlp_hidden_text", [*QUICKSTART, "--model.hidden_sizes=abc"], ["model.hidden_sizes='abc' is invalid"]),
    ("mlp_dropout_above_one", [*QUICKSTART, "--model.dropout=1.5"], ["MLP.dropout=1.5", "[0, 1)"]),
    ("mlp_init_unknown", [*QUICKSTART, "--model.init=foo"], ["MLP.init='foo' is not supported", "kaiming"]),
    ("model_task_unknown", [*QUICKSTART, "--model.task=foo"], ["model.task='foo' is invalid", "'classification'"]),
    ("model_metric_unknown", [*QUICKSTART, "--model.metrics=[foo]"], ["MLP.metrics=['foo'] is invalid", "acc"]),
    ("model_loss_unknown", [*QUICKSTART, "--model.loss=foo"], ["MLP.loss='foo' is not supported"]),
    ("model_lr_negative", [*QUICKSTART, "--model.optimizer.init_args.lr=-1"], ["MLP.optimizer", "learning rate"]),
    ("model_interval_unknown", [*QUICKSTART, "--model.lr_scheduler_interval=foo"], ["lr_scheduler_interval='foo'"]),
    ("model_input_dim_zero", [*QUICKSTART, "--model.input_dim=0"], ["MLP.input_dim=0 is invalid"]),
    ("model_outputs_negative", [*QUICKSTART, "--model.num_outputs=-2"], ["MLP.num_outputs=-2 is invalid"]),
    ("model_input_dim_mismatch", [*QUICKSTART, "--model.input_dim=3"], ["MLP.input_dim=3 does not match", "64"]),
    ("convnet_activation", _model("ConvNet", "--model.activation=foo"), ["ConvNet.activation='foo'"]),
    ("resnet_regression", _model("ResNet18", "--model.task=regression"), ["ResNet18.task='regression'"]),
    ("causal_lm_attention", [*TEXT, "--model.attn_implementation=foo"], ["attn_implementation='foo'", "'sdpa'"]),
    ("causal_lm_unknown_arch", [*TEXT, "--model.model_name_or_path=gpt5"], ["model_name_or_path='gpt5'"]),
    (
        "generation_beyond_positions",
        [
            *TEXT,
            "--model.n_layer=1",
            "--model.n_head=2",
            "--model.n_embd=16",
            "--model.n_positions=16",
            "--data.text_files=[{texts}]",
            "--data.vocab_size=300",
            "--data.block_size=16",
            "--trainer.fast_dev_run=1",
            "--trainer.callbacks+=DegenerationMonitor",
            "--trainer.callbacks.prompts=[The old cat]",
            "--trainer.callbacks.every_n_steps=1",
        ],
        ["max_new_tokens=32", "CausalLM.n_positions=16"],
    ),
    # ---------------------------------------------------------------- datamodules and schedules
    ("data_batch_size_zero", [*QUICKSTART, "--data.batch_size=0"], ["DigitsDataModule.batch_size=0 is invalid"]),
    ("data_batch_size_negative", [*QUICKSTART, "--data.batch_size=-3"], ["DigitsDataModule.batch_size=-3"]),
    ("data_eval_batch_zero", [*QUICKSTART, "--data.eval_batch_size=0"], ["DigitsDataModule.eval_batch_size=0"]),
    ("data_val_fraction", [*QUICKSTART, "--data.val_fraction=1.5"], ["DigitsDataModule.val_fraction=1.5"]),
    (
        "data_fractions_sum_to_one",
        [*QUICKSTART, "--data.val_fraction=0.6", "--data.test_fraction=0.5"],
        ["val_fraction + test_fraction = 1.1 leaves no training rows"],
    ),
    ("data_workers_negative", [*QUICKSTART, "--data.num_workers=-1"], ["DigitsDataModule.num_workers=-1"]),
    ("schedule_tasks_zero", [*QUICKSTART, "--data.schedule.num_tasks=0"], ["PermutedInputs.num_tasks=0"]),
    ("schedule_epochs_zero", [*QUICKSTART, "--data.schedule.epochs_per_task=0"], ["epochs_per_task=0"]),
    (
        "schedule_without_length",
        _data("DigitsDataModule", "--data.schedule=ClassIncremental", "--data.schedule.classes_per_task=2"),
        ["ClassIncremental", "epochs_per_task", "steps_per_task"],
    ),
    ("toy_dataset_unknown", _data("ToyDataModule", "--data.dataset=swiss_roll"), ["dataset='swiss_roll'", "moons"]),
    ("toy_samples_negative", _data("ToyDataModule", "--data.n_samples=-1"), ["ToyDataModule.n_samples=-1"]),
    ("toy_noise_negative", _data("ToyDataModule", "--data.noise=-1"), ["ToyDataModule.noise=-1"]),
    ("modular_modulus_one", _data("ModularArithmeticDataModule", "--data.p=1"), ["p=1 is invalid"]),
    ("modular_operation", _data("ModularArithmeticDataModule", "--data.operation=pow"), ["operation='pow'"]),
    ("particles_count_zero", _data("ParticleDataModule", "--data.n_particles=0"), ["n_particles=0 is invalid"]),
    ("cifar_synthetic_size", _data("CIFAR10DataModule", "--data.synthetic=true", "--data.synthetic_size=0"), ["0"]),
    ("text_no_source", [*TEXT, "--trainer.fast_dev_run=1"], ["TextDataModule needs exactly one text source"]),
    ("text_block_size_zero", [*TEXT, "--data.corpus=shakespeare", "--data.block_size=0"], ["block_size=0"]),
    ("text_corpus_unknown", [*TEXT, "--data.corpus=homer"], ["data.corpus='homer' is invalid", "'shakespeare'"]),
    ("text_files_missing", [*TEXT, "--data.text_files=[nowhere.txt]"], ["text_files", "'nowhere.txt' does not exist"]),
    ("text_workers_negative", [*TEXT, "--data.corpus=shakespeare", "--data.num_workers=-2"], ["num_workers=-2"]),
    # ---------------------------------------------------------------- callbacks
    ("rank_probe_size_zero", _callback("RankMonitor", "probe_size=0"), ["RankMonitor.probe_size=0"]),
    ("rank_measure_unknown", _callback("RankMonitor", "measures=[foo]"), ["RankMonitor.measures='foo'"]),
    ("dormant_tau_negative", _callback("DormantUnitMonitor", "tau=-1"), ["DormantUnitMonitor.tau=-1"]),
    ("cbp_rate_negative", _callback("ContinualBackprop", "replacement_rate=-0.1"), ["replacement_rate=-0.1"]),
    ("cbp_utility_unknown", _callback("ContinualBackprop", "utility=foo"), ["utility='foo'"]),
    ("cbp_decay_above_one", _callback("ContinualBackprop", "decay_rate=1.5"), ["decay_rate=1.5"]),
    ("redo_tau_negative", _callback("ReDo", "tau=-1"), ["ReDo.tau=-1"]),
    ("redo_probe_source", _callback("ReDo", "probe_source=test"), ["probe_source='test'"]),
    ("shrink_negative", _callback("ShrinkAndPerturb", "shrink=-1"), ["ShrinkAndPerturb.shrink=-1"]),
    ("l2init_negative", _callback("L2Init", "weight=-1"), ["L2Init.weight=-1"]),
    ("head_reset_mode", _callback("HeadReset", "mode=foo"), ["mode='foo'"]),
    ("task_table_stage", _callback("TaskAccuracyTable", "stage=foo"), ["TaskAccuracyTable.stage='foo'"]),
    ("weight_precision_bits", _callback("WeightPrecision", "bits=99"), ["WeightPrecision.bits=99"]),
    ("james_stein_variance", _callback("JamesSteinShrinkage", "variance=-1"), ["JamesSteinShrinkage.variance=-1"]),
    ("monitor_layer_unknown", _callback("RankMonitor", "layers=[nowhere]"), ["nowhere"]),
    # a grouped setting (a dataclass argument): its key path and value, or the unknown key and the allowed ones
    (
        "cycle_prune_level",
        _callback("PlasticityCycle", "cycle.prune_level=1.5"),
        ["PlasticityCycle.cycle.prune_level=1.5"],
    ),
    (
        "cycle_key_unknown",
        _callback("PlasticityCycle", 'cycle={{"learn_stepz": 3}}'),
        ["PlasticityCycle.cycle: unknown key 'learn_stepz'", "allowed keys: learn_steps, max_cycles"],
    ),
    (  # a prefix of a key is not completed to it
        "cycle_key_prefix",
        _callback("PlasticityCycle", "cycle.learn_step=3"),
        ["PlasticityCycle.cycle: unknown key 'learn_step'", "allowed keys: learn_steps, max_cycles"],
    ),
    (  # the settings' owner (the name in their messages) is not a key
        "cycle_owner_not_a_key",
        _callback("PlasticityCycle", "cycle.owner=me"),
        ["PlasticityCycle.cycle: unknown key 'owner'", "min_improvement"],
    ),
    ("growth_boost_negative", _callback("HeadGrowth", "reviver.boost_steps=-1"), ["HeadGrowth.reviver.boost_steps=-1"]),
]


class _Payload:
    """Unpickling this creates ``marker``: proof that a checkpoint's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A folder of files that are not usable checkpoints for the quickstart recipe."""
    folder = tmp_path_factory.mktemp("planted")
    (folder / "notes.ckpt").write_text("these are my notes, not a checkpoint\n" * 20)
    (folder / "texts").mkdir()
    (folder / "texts" / "a.txt").write_text(" ".join(f"The old cat sees {n} dogs by the river." for n in range(200)))
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "noise.ckpt").write_bytes(bytes(range(256)) * 8)
    torch.save([1, 2, 3], folder / "list.ckpt")
    torch.save({"weights": torch.zeros(3)}, folder / "plain_dict.ckpt")
    version = {"pytorch-lightning_version": "2.6.0"}
    torch.save({"state_dict": {"w": torch.zeros(64, 64)}, **version}, folder / "weights.ckpt")  # no optimizer state
    good = {"state_dict": {"w": torch.zeros(64, 64)}, "optimizer_states": [], **version}
    torch.save(good, folder / "whole.ckpt")
    data = (folder / "whole.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    payload = {"state_dict": {}, "optimizer_states": [], "extra": _Payload(folder / "PAYLOAD_RAN"), **version}
    torch.save(payload, folder / "payload.ckpt")
    import pickle

    (folder / "pickled.ckpt").write_bytes(pickle.dumps({"state_dict": {}, "set": {1, 2}}))
    mlp = {"_class_path": "plasticity_lightning.models.MLP", "hidden_sizes": [32], "activation": "tanh"}
    torch.save({**good, "hyper_parameters": mlp}, folder / "mlp_32_tanh.ckpt")
    convnet = {"_class_path": "plasticity_lightning.models.ConvNet", "activation": "relu"}
    torch.save({**good, "hyper_parameters": convnet}, folder / "convnet.ckpt")
    # a real checkpoint of the quickstart's model, trained with Adam instead of the recipe's SGD
    argv, sys.argv = sys.argv, ["plasticity"]
    try:
        main(
            [
                *QUICKSTART[:3],
                "--model.optimizer=Adam",
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=2",
                "--trainer.limit_val_batches=1",
                "--trainer.enable_progress_bar=false",
                "--trainer.logger=false",
                f"--trainer.default_root_dir={folder / 'adam'}",
            ]
        )
    finally:
        sys.argv = argv
    return folder


@pytest.fixture(scope="module")
def server(planted):
    """``http://127.0.0.1:<port>`` serving the planted folder."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(planted)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize(("args", "expected"), [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_input_gives_exit_2_and_one_line(args, expected, planted, server, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["plasticity"])
    monkeypatch.delenv("PLASTICITY_TRACEBACK", raising=False)
    fill = {"ckpt": str(planted), "url": server, "adam": str(planted / "adam" / "checkpoints" / "last.ckpt")}
    fill["texts"] = str(planted / "texts")
    args = [arg.format(**fill) for arg in args]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("plasticity: error:")]
    assert exit_info.value.code == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err and "usage:" not in err
    for part in expected:
        assert part.format(**fill) in lines[0], lines[0]
    assert "weights_only=False" not in lines[0]  # never the advice to unpickle an unknown file
    assert not (planted / "PAYLOAD_RAN").exists()


def test_cases_are_many_and_named():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids)) >= 50


def test_a_planted_payload_runs_only_with_the_explicit_opt_in(planted, server, tmp_path, monkeypatch, capsys):
    """The payload is real: `--weights_only false` (the documented opt-in) runs it; the default never does."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["plasticity"])
    marker = planted / "PAYLOAD_RAN"
    for source in (f"{server}/payload.ckpt", str(planted / "payload.ckpt")):
        with pytest.raises(SystemExit):
            main([*QUICKSTART, f"--ckpt_path={source}"])
        assert not marker.exists(), source
    with pytest.raises(SystemExit):  # trusted: it unpickles (and the empty weights then do not fit the model)
        main([*QUICKSTART, f"--ckpt_path={server}/payload.ckpt", "--weights_only=false"])
    assert marker.exists()
    os.remove(marker)
