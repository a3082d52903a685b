"""ReDo and Continual Backprop in a hand-written RL loop: a small DQN with a replay buffer on a drifting chain.

The environment is synthetic and tiny (no gym needed): a chain of ``--states`` cells, the agent moves left or
right, and one end pays 1 — which end switches every ``--switch-every`` steps, so the agent must keep relearning
(the setting where networks lose plasticity). The loop is plain PyTorch DQN (replay buffer, target network,
ε-greedy); the library adds its policies after ``optimizer.step()``: ReDo, whose probe is drawn from the replay
buffer only when recycling is due, and optionally CBP::

    python examples/rl_replay.py [--steps 30000] [--cbp]
"""

# docs-gallery: --steps 1000 --redo-every 100 --report-every 100 --cbp --plot {figure}

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

from plasticity_lightning.policies import ContinualBackprop, ReDo, measure


class DriftingChain:
    """Cells 0 … n−1, start in the middle; actions 0 (left) and 1 (right); reaching an end ends the episode with
    reward 1 at the paying end, 0 at the other; −0.01 per step; the paying end switches every ``switch_every``
    steps."""

    def __init__(self, states: int = 9, switch_every: int = 5000, max_steps: int = 30, seed: int = 0) -> None:
        self.states, self.switch_every, self.max_steps = states, switch_every, max_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.clock = 0
        self.reset()

    def observe(self) -> torch.Tensor:
        return F.one_hot(torch.tensor(self.position), self.states).float()

    def reset(self) -> torch.Tensor:
        self.position, self.steps = self.states // 2, 0
        return self.observe()

    def step(self, action: int) -> tuple[torch.Tensor, float, bool]:
        self.clock += 1
        self.steps += 1
        self.position += 1 if action == 1 else -1
        paying = self.states - 1 if (self.clock // self.switch_every) % 2 == 0 else 0
        if self.position in (0, self.states - 1):
            return self.observe(), float(self.position == paying), True
        return self.observe(), -0.01, self.steps >= self.max_steps


class ReplayBuffer:
    """A ring of transitions in tensors; ``sample(n)`` draws with replacement from its own generator."""

    def __init__(self, capacity: int, observation_size: int, seed: int = 0) -> None:
        self.obs = torch.zeros(capacity, observation_size)
        self.next_obs = torch.zeros(capacity, observation_size)
        self.action = torch.zeros(capacity, dtype=torch.long)
        self.reward = torch.zeros(capacity)
        self.done = torch.zeros(capacity)
        self.size, self.cursor, self.capacity = 0, 0, capacity
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, obs, action, reward, next_obs, done) -> None:
        i = self.cursor
        self.obs[i], self.action[i], self.reward[i], self.next_obs[i], self.done[i] = (
            obs,
            action,
            reward,
            next_obs,
            done,
        )
        self.cursor, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, n: int) -> tuple[torch.Tensor, ...]:
        i = torch.randint(0, self.size, (n,), generator=self.generator)
        return self.obs[i], self.action[i], self.reward[i], self.next_obs[i], self.done[i]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--states", type=int, default=9)
    parser.add_argument("--switch-every", type=int, default=5000)
    parser.add_argument("--redo-every", type=int, default=1000)
    parser.add_argument("--report-every", type=int, default=5000)
    parser.add_argument("--cbp", action="store_true", help="also Continual Backprop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="save the return and the dormant share at each report to this PNG")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    env = DriftingChain(args.states, args.switch_every, seed=args.seed)
    buffer = ReplayBuffer(10_000, args.states, seed=args.seed)
    q = nn.Sequential(nn.Linear(args.states, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    target = copy.deepcopy(q)
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-3)
    # the library's part: policies built on the network and optimizer, called after optimizer.step()
    redo = ReDo(
        q, optimizer, every_n_steps=args.redo_every, tau=0.1, init="kaiming", probe=lambda: buffer.sample(256)[0]
    )
    cbp = ContinualBackprop(q, optimizer, replacement_rate=1e-4, init="kaiming") if args.cbp else None

    obs, episode_return, returns, summary, history = env.reset(), 0.0, [], {}, []
    explore = torch.Generator().manual_seed(args.seed + 1)
    for step in range(1, args.steps + 1):
        with torch.no_grad():  # acting is not training: the policies' hooks ignore it
            greedy = int(q(obs).argmax())
        action = int(torch.randint(0, 2, (), generator=explore)) if torch.rand((), generator=explore) < 0.1 else greedy
        next_obs, reward, done = env.step(action)
        buffer.add(obs, action, reward, next_obs, float(done))
        episode_return += reward
        obs = next_obs
        if done:
            returns.append(episode_return)
            obs, episode_return = env.reset(), 0.0
        if buffer.size >= 256:
            o, a, r, o2, d = buffer.sample(32)
            with torch.no_grad():
                bootstrap = r + 0.9 * (1 - d) * target(o2).max(dim=1).values
            loss = F.smooth_l1_loss(q(o).gather(1, a[:, None]).squeeze(1), bootstrap)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            redo.step()
            if cbp is not None:
                cbp.step()
        if step % 200 == 0:
            target.load_state_dict(q.state_dict())
        if step % args.report_every == 0 and buffer.size >= 256:
            values = measure(q, buffer.sample(256)[0], families=["activity"])
            recent = returns[-50:] or [0.0]
            summary = {
                "return": sum(recent) / len(recent),
                "dormant": values["all/redo_dormant_fraction"],
                "recycled": float(sum(redo.replaced.values())),
            }
            print(f"step {step:>7,}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
            history.append((step, summary))
    if args.plot:
        plot(history, args.plot)
    return summary


def plot(history: list[tuple[int, dict[str, float]]], path: str) -> None:
    """The recent mean return and the ReDo-dormant share at each report, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [step for step, _ in history]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for axis, key, title in zip(
        axes, ("return", "dormant"), ("mean return (last 50 episodes)", "ReDo-dormant share"), strict=True
    ):
        axis.plot(steps, [values[key] for _, values in history], marker="o")
        axis.set(xlabel="step", title=title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
