"""ReDo side by side with the reference implementation: do both recycle the same units, the same way?

The reference is Sokar et al.'s own code, Dopamine's ``dopamine/labs/redo/weight_recyclers.py``
(https://github.com/google/dopamine, JAX/Flax; not part of this project and never imported by it): pass a checkout's
root with ``--reference`` and have ``jax``, ``flax``, ``optax`` and ``gin-config`` importable (``pip install jax flax
optax gin-config``, or ``--extra-path DIR`` for packages installed with ``pip install --target DIR``). Its
``NeuronRecycler.recycle_dead_neurons`` is called unchanged, on Flax-layout copies of this library's network: Dense
kernels ``[in, out]``, Conv kernels ``[kh, kw, in, out]``, NHWC activations, the conv → dense kernel's rows in Flax's
``(h, w, c)`` flatten order, and an ``optax.ScaleByAdamState`` holding the torch Adam moments.

Two networks, trained with Adam (lr 1e-2, high enough for units to go dormant) while both engines act every
``--every`` steps on the same probe batch (256 rows), from the same state — the library's ``policies.ReDo``
(``init="xavier", gain=1``: the reference's ``xavier_uniform``) on the network, the reference on its copy:

* MLP 64-128-128-128-10 on scikit-learn's digits (Dense → Dense pairs);
* Dopamine's Nature-DQN layout scaled down (Conv 8×8/4 (16) → Conv 4×4/2 (32) → Conv 3×3/1 (32) → Dense 64 →
  Dense 4) on random 52×52×3 images with labels from a fixed random linear teacher (conv → conv and
  conv → flatten → dense pairs; the last conv map is 3×3).

Compared at every recycling, per layer: the recycled units (the reference's ``score <= threshold`` mask against the
units the library re-initialised), the incoming weights (which rows were redrawn, and both within xavier_uniform's
bound), the biases, the outgoing weights that were zeroed, and the Adam moments that were zeroed. Then training
continues from the library's result.

What it finds (measured, see the docs' reproductions page): the same units every time; the same incoming rows,
biases and outgoing weights for Dense → Dense and Conv → Conv. Two deviations of the reference, both reported:

* conv → flatten → dense: the reference builds the dense kernel's outgoing mask with ``jnp.repeat`` over the rows
  (``[m₀]×HW, [m₁]×HW, …``: channel-major), but Flax flattens NHWC maps channel-minor (row = (h·W + w)·C + c), so it
  zeroes rows that belong to *other* channels (and leaves most of the recycled channel's rows live); the library
  zeroes the channel's own H×W rows;
* Adam moments of the recycled units' biases: the reference's bias masks are ``None`` (``p.ndim == 1``), so their
  moments are kept; the library zeroes them with the bias.

Exit status: 1 when the engines disagree anywhere else — other recycled units, an incoming row redrawn outside the
recycled units, a new row outside the bound, other biases, other zeroed outgoing weights or kernel moments on a pair
that is not conv → flatten → dense — each such disagreement printed as ``DISAGREEMENT``; 0 otherwise (the on-demand
CI job ``.ci/redo_reference`` runs it so). ``--self-check`` has the library recycle at twice the reference's τ, to
show that the check does fail on engines that disagree.

    python benchmarks/redo_vs_reference.py --reference ../dopamine [--steps 300] [--every 50] [--tau 0.1]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from plasticity_lightning import policies


def load_reference(root: str, extra_path: str | None) -> Any:
    """Dopamine's ``weight_recyclers`` module, loaded from a checkout (a clear exit when ``root`` is not one)."""
    path = Path(root).expanduser().resolve() / "dopamine" / "labs" / "redo" / "weight_recyclers.py"
    if not path.is_file():
        raise SystemExit(
            f"--reference={root!r} holds no dopamine/labs/redo/weight_recyclers.py; expected the root of "
            "a checkout of https://github.com/google/dopamine"
        )
    if extra_path:
        sys.path.append(str(Path(extra_path).resolve()))  # after the project's own packages (numpy, torch)
    try:
        spec = importlib.util.spec_from_file_location("dopamine_weight_recyclers", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as error:
        raise SystemExit(f"the reference needs jax, flax, optax and gin-config ({error}); pip install them") from error
    return module


def mlp() -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in ((64, 128), (128, 128), (128, 128)):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(128, 10))


def nature_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 8, stride=4), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 3 * 3, 64), nn.ReLU(), nn.Linear(64, 4),
    )  # fmt: skip


def data(kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        digits = load_digits()
        return torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target)
    x = torch.rand(2048, 3, 52, 52, generator=generator)
    teacher = torch.randn(3 * 52 * 52, 4, generator=generator)
    return x, (x.flatten(1) @ teacher).argmax(dim=1)


def weight_layers(net: nn.Sequential) -> list[nn.Module]:
    return [m for m in net if isinstance(m, (nn.Linear, nn.Conv2d))]


def names(net: nn.Sequential) -> list[str]:
    """Flax's auto-names of the layers, the output layer named as in Dopamine's networks."""
    counts = {"Conv": 0, "Dense": 0}
    out = []
    for layer in weight_layers(net)[:-1]:
        kind = "Conv" if isinstance(layer, nn.Conv2d) else "Dense"
        out.append(f"{kind}_{counts[kind]}")
        counts[kind] += 1
    return [*out, "final_layer"]


def flax_kernel(w: torch.Tensor, map_shape: tuple[int, int] | None) -> np.ndarray:
    """A torch weight (or a moment tensor shaped like it) in Flax's layout; ``map_shape``: the H×W of the conv map a
    dense layer's inputs are flattened from (NHWC order in Flax, NCHW in torch)."""
    w = w.detach()
    if w.dim() == 4:
        return w.permute(2, 3, 1, 0).numpy().copy()  # [out, in, kh, kw] -> [kh, kw, in, out]
    if map_shape is not None:
        h, wd = map_shape
        w = w.reshape(w.shape[0], -1, h, wd).permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # (c, h, w) -> (h, w, c)
    return w.t().numpy().copy()


def torch_kernel(kernel: Any, map_shape: tuple[int, int] | None) -> torch.Tensor:
    """Inverse of :func:`flax_kernel`."""
    k = torch.from_numpy(np.array(kernel))
    if k.dim() == 4:
        return k.permute(3, 2, 0, 1)
    w = k.t()
    if map_shape is not None:
        h, wd = map_shape
        w = w.reshape(w.shape[0], h, wd, -1).permute(0, 3, 1, 2).reshape(w.shape[0], -1)
    return w


def activations(net: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Every hidden ReLU's output (the units both engines score), and the last conv map's H×W."""
    out, h = [], x
    for module in net:
        h = module(h)
        if isinstance(module, nn.ReLU):
            out.append(h.detach())
    return out


class Event:
    """What one recycling step compared."""

    def __init__(self) -> None:
        self.layers = 0
        self.same_units = 0
        self.units = 0
        self.same_incoming_rows = 0
        self.same_bias = 0
        self.same_outgoing = 0
        self.same_moments = 0
        self.within_bound = 0
        self.bias_moments_kept = 0  # recycled units whose bias moments the reference kept
        self.bias_moments_zeroed_by_library = 0
        self.notes: list[str] = []
        self.disagreements: list[str] = []  # beyond the reference's two known deviations: the check fails


def compare_once(ref: Any, net: nn.Sequential, optimizer: torch.optim.Adam, probe: torch.Tensor, tau: float,
                 step: int, library_tau: float | None = None) -> Event:  # fmt: skip
    import jax
    import jax.numpy as jnp
    import optax

    layers, layer_names = weight_layers(net), names(net)
    acts = activations(net, probe)
    conv_maps = {i: tuple(a.shape[2:]) for i, a in enumerate(acts) if a.dim() == 4}
    map_shape_before = {}  # layer index -> the H×W of the conv map its inputs are flattened from
    for i, layer in enumerate(layers):
        if i > 0 and isinstance(layers[i - 1], nn.Conv2d) and isinstance(layer, nn.Linear):
            map_shape_before[i] = conv_maps[i - 1]

    def flax_tree(tensor_of) -> dict:
        tree = {}
        for i, (name, layer) in enumerate(zip(layer_names, layers, strict=True)):
            tree[name] = {
                "kernel": jnp.asarray(flax_kernel(tensor_of(layer.weight), map_shape_before.get(i))),
                "bias": jnp.asarray(tensor_of(layer.bias).detach().numpy().copy()),
            }
        return {"params": tree}

    from flax.core import freeze  # Flax-trained state is frozen pytrees

    params = freeze(flax_tree(lambda p: p))
    mu = freeze(flax_tree(lambda p: optimizer.state[p]["exp_avg"]))
    nu = freeze(flax_tree(lambda p: optimizer.state[p]["exp_avg_sq"]))
    opt_state = (optax.ScaleByAdamState(count=jnp.asarray(step, dtype=jnp.int32), mu=mu, nu=nu), optax.EmptyState())
    intermediates = {
        f"{name}_act": {"__call__": (jnp.asarray(a.permute(0, 2, 3, 1).numpy() if a.dim() == 4 else a.numpy()),)}
        for name, a in zip(layer_names[:-1], acts, strict=True)
    }
    recycler = ref.NeuronRecycler(layer_names, dead_neurons_threshold=tau, reset_period=1)
    masks = [np.asarray(recycler._score2mask(intermediates[f"{n}_act"]["__call__"][0], None, None, None))
             for n in layer_names[:-1]]  # fmt: skip
    new_params, new_state = recycler.recycle_dead_neurons(intermediates, params, jax.random.PRNGKey(step), opt_state)

    before = {id(p): p.detach().clone() for p in net.parameters()}
    library_tau = tau if library_tau is None else library_tau  # --self-check: another threshold than the reference's
    redo = policies.ReDo(net, optimizer, every_n_steps=1, tau=library_tau, init="xavier", gain=1.0, seed=step)
    redo.recycle(probe)

    event = Event()
    for i, name in enumerate(layer_names[:-1]):
        layer, consumer = layers[i], layers[i + 1]
        mask = torch.from_numpy(masks[i].astype(bool))
        # a redrawn row: new non-zero values (zeroing the columns of the layer before changes rows too)
        redrawn = lambda w, old: ((w != old) & (w != 0)).flatten(1).any(dim=1)  # noqa: E731
        rows_ours = redrawn(layer.weight, before[id(layer.weight)])
        ref_kernel = torch_kernel(new_params["params"][name]["kernel"], map_shape_before.get(i))
        rows_ref = redrawn(ref_kernel, before[id(layer.weight)])
        event.layers += 1
        event.units += int(mask.sum())
        event.same_units += bool(torch.equal(rows_ours, mask))
        where = f"step {step}, {name}"
        if not torch.equal(rows_ours, mask):
            differ = int((rows_ours != mask).sum())
            event.disagreements.append(f"{where}: the library redrew {int(rows_ours.sum())} unit(s), the "
                                       f"reference's mask holds {int(mask.sum())} ({differ} differ)")  # fmt: skip
        same_rows = bool(torch.equal(rows_ref, mask))
        if bool((rows_ref & ~mask).any()):  # the reference's order may leave a recycled row all zero, never more
            event.disagreements.append(f"{where}: the reference redrew {int((rows_ref & ~mask).sum())} unit(s) it "
                                       "did not recycle")  # fmt: skip
        event.same_incoming_rows += same_rows
        if not same_rows:
            event.notes.append(f"{name}: the reference redrew the incoming weights of {int(rows_ref.sum())} unit(s), "
                               f"{int((rows_ref & mask).sum())} of them among the {int(mask.sum())} it recycled "
                               f"(the library: {int((rows_ours & mask).sum())}, none else: "
                               f"{not bool((rows_ours & ~mask).any())})")  # fmt: skip
        bound = (6.0 / sum(nn.init._calculate_fan_in_and_fan_out(layer.weight))) ** 0.5
        within = bool(layer.weight[mask].abs().max() <= bound if mask.any() else True) and bool(
            ref_kernel[mask].abs().max() <= bound if mask.any() else True
        )
        event.within_bound += within
        if not within:
            event.disagreements.append(f"{where}: a new incoming row lies outside xavier_uniform's bound {bound:.4g}")
        ref_bias = torch.from_numpy(np.array(new_params["params"][name]["bias"]))
        same_bias = bool(torch.equal(ref_bias, layer.bias.detach()))
        event.same_bias += same_bias
        if not same_bias:
            event.disagreements.append(f"{where}: the biases differ after recycling")
        # the reference's known deviation: its conv -> flatten -> dense outgoing mask (and the moments with it)
        known = isinstance(layer, nn.Conv2d) and isinstance(consumer, nn.Linear)
        # outgoing: which consumer input columns each engine zeroed, in the consumer's rows that neither redrew (a
        # recycled consumer unit gets fresh incoming weights: the reference zeroes its entries from recycled units
        # afterwards, the library, recycling layer by layer, redraws them; both leave the function unchanged)
        ref_out = torch_kernel(new_params["params"][layer_names[i + 1]]["kernel"], map_shape_before.get(i + 1))
        old = before[id(consumer.weight)]
        kept = ~((consumer.weight != old) & (consumer.weight != 0)).flatten(1).any(dim=1)
        kept &= ~((ref_out != old) & (ref_out != 0)).flatten(1).any(dim=1)

        def zeroed(w: torch.Tensor, kept: torch.Tensor = kept, old: torch.Tensor = old) -> torch.Tensor:
            columns, previous = w[kept].transpose(0, 1).flatten(1), old[kept].transpose(0, 1).flatten(1)
            return (columns == 0).all(dim=1) & (previous != 0).any(dim=1)

        zeroed_ours, zeroed_ref = zeroed(consumer.weight), zeroed(ref_out)
        same_outgoing = bool(torch.equal(zeroed_ours, zeroed_ref))
        event.same_outgoing += same_outgoing
        if not same_outgoing and not known:
            event.disagreements.append(f"{where} -> {layer_names[i + 1]}: other outgoing weights zeroed")
        if not same_outgoing:
            per_unit = zeroed_ours.numel() // mask.numel()
            wrong = int((zeroed_ref & ~zeroed_ours).sum())
            missed = int((zeroed_ours & ~zeroed_ref).sum())
            event.notes.append(f"{name} -> {layer_names[i + 1]}: the reference zeroed {wrong} input column(s) of "
                               f"other units and left {missed} of the {int(zeroed_ours.sum())} columns of the "
                               f"{int(mask.sum())} recycled unit(s) live ({per_unit} columns per unit)")  # fmt: skip
        # Adam moments: which entries each engine zeroed (kernels; biases below)
        ref_mu = torch_kernel(new_state[0].mu["params"][name]["kernel"], map_shape_before.get(i))
        ours_mu = optimizer.state[layer.weight]["exp_avg"]
        same_moments = bool(torch.equal(ref_mu == 0, ours_mu == 0))
        event.same_moments += same_moments
        if not same_moments and i not in map_shape_before:  # a flattened conv's outgoing rows: the same deviation
            event.disagreements.append(f"{where}: other kernel Adam moments zeroed")
        ref_bias_mu = torch.from_numpy(np.array(new_state[0].mu["params"][name]["bias"]))
        event.bias_moments_kept += int((ref_bias_mu[mask] != 0).sum())
        event.bias_moments_zeroed_by_library += int((optimizer.state[layer.bias]["exp_avg"][mask] == 0).sum())
    return event


def run(kind: str, ref: Any, steps: int, every: int, tau: float, seed: int, library_tau: float | None = None
        ) -> list[Event]:  # fmt: skip
    torch.manual_seed(seed)
    net = mlp() if kind == "mlp" else nature_cnn()
    x, y = data(kind, seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    probe = x[torch.randperm(len(x), generator=generator)[:256]]
    events = []
    for step in range(1, steps + 1):
        rows = torch.randint(len(x), (32,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(net(x[rows]), y[rows]).backward()
        optimizer.step()
        if step % every == 0:
            events.append(compare_once(ref, net, optimizer, probe, tau, step, library_tau))
    return events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="root of a google/dopamine checkout")
    parser.add_argument("--extra-path", help="a directory holding jax, flax, optax, gin (pip install --target)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument(
        "--self-check",
        action="store_true",
        help="the library recycles at 2x tau: shows that the check fails (non-zero exit) on engines that disagree",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    args = parser.parse_args(argv)
    ref = load_reference(args.reference, args.extra_path)
    print(f"ReDo (tau={args.tau}) every {args.every} of {args.steps} Adam steps: library vs Dopamine's NeuronRecycler")
    disagreements = []
    for kind in args.models:
        library_tau = 2 * args.tau if args.self_check else None
        events = run(kind, ref, args.steps, args.every, args.tau, args.seed, library_tau)
        total = sum(e.layers for e in events)
        print(f"\n{kind}: {len(events)} recyclings x {events[0].layers} layers = {total} layer-recyclings, "
              f"{sum(e.units for e in events)} units recycled by the reference")  # fmt: skip
        for label, attr in (("same recycled units", "same_units"), ("same incoming rows redrawn", "same_incoming_rows"),
                            ("new rows within xavier_uniform's bound (both)", "within_bound"),
                            ("same biases", "same_bias"), ("same outgoing columns zeroed", "same_outgoing"),
                            ("same Adam first moments zeroed (kernels)", "same_moments")):  # fmt: skip
            print(f"  {label}: {sum(getattr(e, attr) for e in events)}/{total}")
        units = sum(e.units for e in events)
        kept = sum(e.bias_moments_kept for e in events)
        zeroed = sum(e.bias_moments_zeroed_by_library for e in events)
        print(f"  Adam moments of the recycled units' biases: the reference kept {kept}/{units}, the library zeroed "
              f"{zeroed}/{units}")  # fmt: skip
        for note in [n for e in events for n in e.notes]:
            print(f"  deviation at a recycling: {note}")
        disagreements += [f"{kind}, {d}" for e in events for d in e.disagreements]
    for line in disagreements:
        print(f"DISAGREEMENT: {line}")
    print(f"\n{len(disagreements)} disagreement(s) beyond the reference's two known deviations")
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
