"""Is the Hugging Face Hub reachable now: one quick request instead of the clients' retries.

``huggingface_hub`` retries a request that cannot connect five times with backoff
(1, 2, 4, 8, 8 s), and ``datasets`` reaches the hub several times per load, so a
machine without network waits about 25 s, printing retry lines, before it fails.
``unreachable`` asks once, within a short deadline, through the hub client's own
HTTP session (so its proxy and endpoint settings apply); ``offline`` then makes
the clients read their caches only, at once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

TIMEOUT_S = 3.0  # a HEAD of the hub's front page answers in well under a second when it is reachable


def unreachable(timeout: float = TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached now, in a few words, or None when it answers.

    Offline mode (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) counts as unreachable
    without asking. Any HTTP answer, an error status included, means reachable:
    what a status means is left to the call that follows. The whole check, name
    lookup included (which no HTTP timeout bounds), takes at most ``timeout`` seconds.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode() or _datasets_offline():
        return "offline mode is set (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)"
    outcome: list[str | None] = []

    def ask() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout, follow_redirects=False)
            outcome.append(None)
        except Exception as err:  # httpx raises many types for "no answer"
            outcome.append(" ".join(str(err).split()) or type(err).__name__)

    # A daemon thread: a name lookup that hangs past the deadline is left behind, not waited for.
    thread = threading.Thread(target=ask, name="jaxjoint-hub-check", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"{constants.ENDPOINT} does not answer within {timeout:g} s"
    return None if outcome[0] is None else f"{constants.ENDPOINT} does not answer ({outcome[0]})"


def _datasets_offline() -> bool:
    value = os.environ.get("HF_DATASETS_OFFLINE", "")
    return value.upper() in ("1", "ON", "YES", "TRUE")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Within: ``huggingface_hub`` and ``datasets`` read their caches only, without a request."""
    from huggingface_hub import constants

    saved = [(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)]
    try:
        import datasets.config
    except ImportError:
        pass
    else:
        saved.append((datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE))
    try:
        for module, name, _ in saved:
            setattr(module, name, True)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
