import pytest
import torch
from conftest import make_trainer
from torch import nn

from plasticity_lightning import (
    MLP,
    ConvNet,
    DigitsDataModule,
    PlasticityConfigError,
    ResNet18,
    ToyDataModule,
)
from plasticity_lightning.nn import ACTIVATIONS


def _trainer(tmp_path, **kwargs):
    return make_trainer(tmp_path, **kwargs)


def _hook_order(model, x):
    """Names of hidden layers in the order their forward hooks fire, and how often each fires."""
    fired = []
    handles = [m.register_forward_hook(lambda *_, n=name: fired.append(n)) for name, m in model.hidden_layers()]
    model(x)
    for h in handles:
        h.remove()
    return fired


# ---------------------------------------------------------------------------- MLP
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_forward_backward_every_activation(activation):
    model = MLP(input_dim=6, num_outputs=3, hidden_sizes=[16, 16], activation=activation)
    x = torch.randn(10, 6)
    out = model(x)
    out.sum().backward()
    assert out.shape == (10, 3)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("hidden_sizes", [[], [5], [32, 8, 32], [64, 32, 16, 8], [7] * 6])
def test_mlp_shapes_follow_hidden_sizes(hidden_sizes):
    model = MLP(input_dim=4, num_outputs=2, hidden_sizes=hidden_sizes)
    widths = [block.linear.out_features for block in model.hidden]
    assert widths == hidden_sizes
    assert model.head.in_features == (hidden_sizes[-1] if hidden_sizes else 4)
    assert model(torch.randn(3, 4)).shape == (3, 2)


def test_mlp_skip_only_where_widths_match():
    model = MLP(input_dim=8, num_outputs=2, hidden_sizes=[8, 16, 16, 4], skip_connections=True, activation="tanh")
    assert [block.skip for block in model.hidden] == [True, False, True, False]
    block = model.hidden[2]
    x = torch.randn(5, 16)
    assert torch.allclose(block(x), torch.tanh(block.linear(x)) + x)
    no_skip = model.hidden[1]
    x = torch.randn(5, 8)
    assert torch.allclose(no_skip(x), torch.tanh(no_skip.linear(x)))


def test_mlp_without_skip_flag_never_skips():
    model = MLP(input_dim=8, num_outputs=2, hidden_sizes=[8, 8], skip_connections=False)
    assert not any(block.skip for block in model.hidden)


def test_mlp_flattens_images_and_names_hidden_layers():
    model = MLP(input_dim=64, num_outputs=10, hidden_sizes=[32, 32])
    x = torch.randn(4, 1, 8, 8)
    assert model(x).shape == (4, 10)
    names = dict(model.named_modules())
    assert all(name in names and names[name] is module for name, module in model.hidden_layers())
    assert _hook_order(model, x) == ["hidden.0.act", "hidden.1.act"]
    assert model.output_layer() == ("head", model.head)


def test_mlp_init_schemes_zero_biases_and_scale_weights():
    model = MLP(input_dim=400, num_outputs=10, hidden_sizes=[300], activation="relu", init="kaiming")
    w = model.hidden[0].linear.weight
    assert torch.equal(model.hidden[0].linear.bias, torch.zeros(300))
    assert w.abs().max() <= (2**0.5) * (3 / 400) ** 0.5
    default = MLP(input_dim=400, num_outputs=10, hidden_sizes=[300], init="default")
    assert default.hidden[0].linear.bias.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "foo"}, r"MLP.activation='foo' is not supported; choose one of"),
        ({"hidden_sizes": [8, -1]}, r"MLP.hidden_sizes\[1\]=-1 is invalid"),
        ({"hidden_sizes": [8, 0]}, r"MLP.hidden_sizes\[1\]=0 is invalid"),
        ({"hidden_sizes": "8"}, r"MLP.hidden_sizes='8' is invalid"),
        ({"init": "zeros"}, r"MLP.init='zeros' is not supported"),
        ({"input_dim": 0}, r"MLP.input_dim=0 is invalid"),
        ({"task": "ranking"}, r"MLP.task='ranking' is not supported"),
        ({"loss": "hinge"}, r"MLP.loss='hinge' is not supported; choose one of: cross_entropy"),
        ({"loss": "mse"}, r"MLP.loss='mse' is not supported"),  # a regression loss on a classifier
    ],
)
def test_mlp_bad_arguments_are_clear(kwargs, message):
    with pytest.raises(PlasticityConfigError, match=message):
        MLP(**kwargs)


def test_unbuilt_model_explains_itself():
    model = MLP(hidden_sizes=[4])
    with pytest.raises(PlasticityConfigError, match="input_dim, num_outputs unknown"):
        model(torch.randn(2, 3))


def test_sizes_are_inferred_from_the_datamodule(tmp_path):
    model = MLP(hidden_sizes=[16])
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, DigitsDataModule(batch_size=16))
    assert (model.input_dim, model.num_outputs) == (64, 10)
    assert model.hparams["input_dim"] == 64  # saved with the checkpoint, so load_from_checkpoint rebuilds it
    assert model.hidden[0].linear.in_features == 64


def test_explicit_size_mismatch_is_reported(tmp_path):
    model = MLP(input_dim=64, num_outputs=3, hidden_sizes=[8])
    trainer = _trainer(tmp_path, fast_dev_run=True)
    with pytest.raises(PlasticityConfigError, match=r"MLP.num_outputs=3 does not match the datamodule"):
        trainer.fit(model, DigitsDataModule())


def test_regression_model_on_a_classification_datamodule_is_a_clear_error(tmp_path):
    with pytest.raises(PlasticityConfigError, match=r"MLP\(task='regression'\): DigitsDataModule does not provide"):
        _trainer(tmp_path, fast_dev_run=True).fit(MLP(task="regression"), DigitsDataModule())


def test_optimizer_and_scheduler_injection():
    model = MLP(
        input_dim=2,
        num_outputs=2,
        hidden_sizes=[4],
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max"),
        lr_scheduler_monitor="val/acc",
    )
    config = model.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.5
    assert optimizer.param_groups[0]["name"] == "default"
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == sum(p.numel() for p in model.parameters())
    assert config["lr_scheduler"]["monitor"] == "val/acc"
    # a callback can add a param group to the optimizer the model built
    optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "lr": 0.0, "name": "grown"})
    assert [g["name"] for g in optimizer.param_groups] == ["default", "grown"]


def test_regression_task_trains_and_reports_r2(tmp_path):
    class Regression(ToyDataModule):
        num_targets = 1

        def load_splits(self):
            splits = super().load_splits()
            for split in splits.values():
                split.targets = split.inputs[:, 0] * 2.0 - split.inputs[:, 1]  # a linear target
            return splits

    model = MLP(task="regression", hidden_sizes=[16], optimizer=lambda p: torch.optim.Adam(p, lr=0.02))
    trainer = _trainer(tmp_path, max_epochs=30)
    trainer.fit(model, Regression("moons", n_samples=400, batch_size=64))
    assert model.num_outputs == 1
    assert trainer.callback_metrics["val/r2"] > 0.9
    assert {"val/mse", "val/mae", "train/loss_epoch"} <= set(trainer.callback_metrics)


def test_checkpoint_round_trip_rebuilds_inferred_sizes(tmp_path):
    model = MLP(hidden_sizes=[8], optimizer=torch.optim.SGD)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=True)
    trainer.fit(model, DigitsDataModule())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = MLP.load_from_checkpoint(path)  # torch's safe weights_only loading
    x = torch.randn(3, 1, 8, 8)
    model.eval()
    restored.eval()
    assert torch.equal(model(x), restored(x))


# ---------------------------------------------------------------------------- ConvNet
def test_convnet_matches_dohare_architecture():
    model = ConvNet(num_classes=2, in_channels=3, input_size=32)
    assert [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)] == [32, 64, 128]
    assert [m.kernel_size for m in model.features if isinstance(m, nn.Conv2d)] == [(5, 5), (3, 3), (3, 3)]
    assert model.classifier.fc1.in_features == 512  # 128 channels x 2 x 2
    assert (model.classifier.fc2.out_features, model.head.out_features) == (128, 2)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert _hook_order(model, x) == [
        "features.pool1",
        "features.pool2",
        "features.pool3",
        "classifier.act1",
        "classifier.act2",
    ]


@pytest.mark.parametrize(("size", "flat"), [(32, 512), (64, 128 * 6 * 6), (30, 128)])
def test_convnet_input_sizes(size, flat):
    model = ConvNet(num_classes=5, in_channels=1, input_size=size)
    assert model.classifier.fc1.in_features == flat
    assert model(torch.randn(2, 1, size, size)).shape == (2, 5)


def test_convnet_rejects_small_inputs():
    with pytest.raises(PlasticityConfigError, match=r"ConvNet.input_size=16 is too small"):
        ConvNet(num_classes=2, in_channels=3, input_size=16)


def test_convnet_on_digits_is_a_clear_error(tmp_path):
    with pytest.raises(PlasticityConfigError, match=r"input_size=8 is too small"):
        _trainer(tmp_path, fast_dev_run=True).fit(ConvNet(), DigitsDataModule())


# ---------------------------------------------------------------------------- ResNet-18
def test_resnet18_cifar_variant():
    model = ResNet18(num_classes=100, in_channels=3)
    net = model.net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.22e6, rel=0.01)
    x = torch.randn(2, 3, 32, 32)
    order = _hook_order(model, x)
    assert order == [name for name, _ in model.hidden_layers()]  # each hidden layer fires exactly once, in order
    assert len(order) == 17


def test_resnet18_block_forward_equals_torchvision_block():
    from torchvision.models.resnet import BasicBlock

    from plasticity_lightning.models import CIFARBasicBlock

    torch.manual_seed(0)
    ours = CIFARBasicBlock(16, 16).eval()
    reference = BasicBlock(16, 16).eval()
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 8, 8)
    assert torch.allclose(ours(x), reference(x))


def test_resnet18_imagenet_stem_option():
    model = ResNet18(num_classes=10, in_channels=1, cifar_stem=False)
    assert model.net.conv1.stride == (2, 2)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)
