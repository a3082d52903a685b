"""Study groups as Ray tasks (``plasticity study run SPEC --backend ray [--address auto]``).

:class:`RayPool` offers the one part of ``multiprocessing.Pool`` that :func:`~plasticity_lightning.studies.run_study`
uses (``apply_async`` with a callback, ``terminate``, ``join``), on Ray: each group is a Ray task on whichever node
has a free CPU, and its rows come back to the process that called ``run_study``, which stays the store's only
writer. Claims, crash-resume and shards therefore work exactly as with local worker processes.

Ray is an optional extra: ``pip install 'plasticity-lightning[ray]'``. Every node of a cluster needs the library
installed (or a Ray ``runtime_env`` that installs it).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from plasticity_lightning.core.errors import PlasticityConfigError


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise PlasticityConfigError(
            "--backend ray needs Ray: pip install 'plasticity-lightning[ray]' (or pip install ray)"
        ) from None
    return ray


def _in_ray_task(function: Callable[..., Any], *args: Any) -> Any:
    import torch

    torch.set_num_threads(1)  # one CPU per task, as a local worker process has: parallelism comes from the tasks
    return function(*args)


def cluster_cpus(address: str | None) -> int:
    """CPUs of the Ray cluster at ``address`` (``None``: a local Ray runtime), connecting if not yet connected."""
    ray = _connect(address)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _connect(address: str | None) -> Any:
    ray = _ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = address or "a local Ray runtime"
            raise PlasticityConfigError(
                f"--address {where}: cannot connect to Ray ({' '.join(str(err).split())[:300]})"
            ) from None
    return ray


class RayPool:
    """``multiprocessing.Pool.apply_async`` on Ray tasks, results delivered through the callbacks on this side.

    Args:
        address: Ray cluster address (``"auto"``: the cluster this machine belongs to; ``None``: the Ray runtime
            already initialised in this process, else a new local one).
    """

    def __init__(self, address: str | None = None) -> None:
        self._ray = _connect(address)
        self._task = self._ray.remote(num_cpus=1)(_in_ray_task)
        self._pending: dict[Any, tuple[Callable[[Any], None], Callable[[BaseException], None]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._waiter = threading.Thread(target=self._deliver, name="ray-results", daemon=True)
        self._waiter.start()

    def apply_async(
        self,
        function: Callable[..., Any],
        args: tuple[Any, ...],
        callback: Callable[[Any], None],
        error_callback: Callable[[BaseException], None],
    ) -> None:
        reference = self._task.remote(function, *args)
        with self._lock:
            self._pending[reference] = (callback, error_callback)

    def _deliver(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                references = list(self._pending)
            if not references:
                self._stop.wait(0.05)
                continue
            done, _ = self._ray.wait(references, num_returns=1, timeout=0.2)
            for reference in done:
                with self._lock:
                    callback, error_callback = self._pending.pop(reference)
                try:
                    result = self._ray.get(reference)
                except Exception as err:  # the task's own exception, re-raised by the caller as a local pool would
                    cause = getattr(err, "cause", None)
                    error_callback(cause if isinstance(cause, BaseException) else err)
                else:
                    callback(result)

    def terminate(self) -> None:
        self._stop.set()
        with self._lock:
            references = list(self._pending)
            self._pending.clear()
        for reference in references:
            with contextlib.suppress(Exception):
                self._ray.cancel(reference, force=True)

    def join(self) -> None:
        self._waiter.join()
