"""Reaching the Hugging Face hub: at once, or in one line within seconds.

The hub clients retry a failed connection for about 25 s, printing a "Retrying
in 8s" line each time, before they give up. jaxjoint looks first whether the
hub's host (or the HTTPS proxy) accepts a TCP connection within
``TIMEOUT_S``; when it does not, only the local cache is read, so a model or data
set downloaded earlier still loads offline and anything else fails in one line.
With ``HF_HUB_OFFLINE`` set, the network is not tried at all. The online path is
the clients' own, with their retry warnings silenced (``quiet``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

TIMEOUT_S = 3.0
_TRUE = ("1", "on", "yes", "true")


def offline(*, datasets: bool = False) -> bool:
    """Whether ``HF_HUB_OFFLINE`` (for a data set, ``HF_DATASETS_OFFLINE`` too) asks for no network."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if datasets else ("HF_HUB_OFFLINE",)
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in names)


def endpoint() -> tuple[str, int]:
    """(host, port) a hub request connects to first: the HTTPS proxy when one is set
    (``HTTPS_PROXY``), else the hub (``HF_ENDPOINT``, default huggingface.co)."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlsplit(proxy if proxy else os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if not url.hostname:  # a proxy given as host:port without a scheme
        url = urlsplit(f"http://{proxy}")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def unreachable(timeout: float = TIMEOUT_S, *, datasets: bool = False) -> str | None:
    """None when the hub (``endpoint``) accepts a TCP connection within ``timeout``
    seconds; otherwise why not, as a few words ("offline: HF_HUB_OFFLINE is set",
    "huggingface.co:443: Name or service not known", "... no answer in 3 s").
    ``datasets``: for a data set, where ``HF_DATASETS_OFFLINE`` counts too."""
    if offline(datasets=datasets):
        return "offline: HF_HUB_OFFLINE is set" if offline() else "offline: HF_DATASETS_OFFLINE is set"
    host, port = endpoint()
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err.strerror or type(err).__name__)

    # The name lookup inside create_connection has no timeout of its own.
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    if not outcome:
        return f"{host}:{port}: no answer in {timeout:g} s"
    return None if outcome[0] is None else f"{host}:{port}: {outcome[0]}"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the hub clients' retry warnings: a failure must end in one line."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets", "fsspec")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
