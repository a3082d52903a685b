"""Loading from the Hugging Face hub without a retry storm when there is no network."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

T = TypeVar("T")


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HF hub can be reached: not in offline mode and its host accepts a connection.

    huggingface_hub retries a failed request with back-off (about 25 s per file); checking once first makes an
    offline run fall back at once.
    """
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def from_hub(load: Callable[..., T], name_or_path: str, **kwargs) -> T:
    """``load(name_or_path, **kwargs)`` from a local directory or the HF cache, else from the hub when reachable.

    Raises ``OSError`` when neither works (what ``from_pretrained`` raises for a missing model).
    """
    try:
        return load(name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        if not hub_reachable():
            raise OSError(f"{name_or_path!r} is neither local nor cached, and the HF hub is unreachable") from err
    return load(name_or_path, **kwargs)
