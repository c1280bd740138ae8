"""Prefect's per-task context, serialized and rebuilt once instead of for every task.

Each task a flow submits to Dask costs Prefect, whatever the task does:
- in the flow, the whole settings model serialized again for the task (~0.1 s) and
  walked again by Dask to name the task (~0.05 s);
- on the worker, the settings model rebuilt from that dict (every nested
  pydantic-settings model reading the environment and its dotenv and TOML files
  again: ~0.3 s), and two API clients, each loading certifi's certificate bundle
  into a new SSL context (~0.06 s each).
That is more than most shards' work on the small stages, and ~12 worker-hours per
10^5 tasks. Prefect caches these for its own process pool (PrefectHQ/prefect#20853),
not for Dask.

``reuse_task_context`` makes a process serialize each settings context once (and
Dask name it by one token), build each distinct settings model once, and create one
verified SSL context per certificate file. It runs when ``tasks`` is imported: in the
flow, and on a worker as it unpickles its first task. A task still runs under exactly
the flow's settings (they are looked up by their full content); a Prefect without
these internals is left alone.
"""

from __future__ import annotations

import json
import ssl
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

_SETTINGS_KEPT = 8  # distinct flows' settings one worker keeps (one per API, profile)


class _SharedVerifiedContexts:
    """The ``ssl`` module as Prefect's client module sees it, except that the verified
    context for a certificate file is created once and shared (an SSLContext is safe
    to share between connections and threads; Prefect never changes a verified one)."""

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - whatever ssl holds
        return getattr(ssl, name)

    @staticmethod
    def create_default_context(*args: Any, **kwargs: Any) -> ssl.SSLContext:  # noqa: ANN401
        if args or set(kwargs) != {"cafile"}:  # e.g. the insecure path, which changes it
            return ssl.create_default_context(*args, **kwargs)
        return _verified(kwargs["cafile"])


class _SerializedSettings(dict):
    """A settings context's serialization, made once. Dask tokenizes each submitted
    task's arguments, and walking these ~400 values cost ~45 ms per task; it takes
    ``token`` instead (task keys are unique anyway: each holds a new task run id).
    Unpickled, it is a plain dict."""

    def __init__(self, serialized: dict[str, Any]) -> None:
        super().__init__(serialized)
        self.token = f"prefect-settings-{uuid.uuid4()}"

    def __reduce__(self) -> tuple:
        return dict, (dict(self),)


@lru_cache(maxsize=4)
def _verified(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


def reuse_task_context() -> bool:
    """Install the reuse (idempotent). Returns whether Prefect and Dask have what it
    wraps (``SettingsContext.serialize``, ``task_engine.hydrated_context``, the
    client module's ``ssl``, Dask's ``normalize_token``); where one is missing,
    nothing is changed."""
    try:
        from dask.tokenize import normalize_token
        from prefect import context, task_engine
        from prefect.client import orchestration
    except ImportError:
        return False
    serialize = getattr(context.SettingsContext, "serialize", None)
    hydrate = getattr(task_engine, "hydrated_context", None)
    if serialize is None or hydrate is None or not hasattr(orchestration, "ssl"):
        return False
    if getattr(hydrate, "reuses_settings", False):
        return True

    last: list[tuple] = [(None, None, None)]  # (context, include_secrets, serialization)

    def serialized(self: Any, include_secrets: bool = True) -> dict[str, Any]:  # noqa: ANN401
        # A SettingsContext is immutable: changed settings come as a new one. One tuple
        # read and one written, so that threads never see one context's serialization
        # paired with another context.
        ctx, secrets, out = last[0]
        if ctx is self and secrets == include_secrets:
            return out
        out = _SerializedSettings(serialize(self, include_secrets=include_secrets))
        last[0] = (self, include_secrets, out)
        return out

    built: dict[str, object] = {}
    lock = threading.Lock()  # a worker may run several tasks at once (threads, GPUs)

    @contextmanager
    def hydrated_context(
        serialized_context: dict[str, Any] | None = None, client: object = None
    ) -> Iterator[None]:
        sc = (serialized_context or {}).get("settings_context")
        if isinstance(sc, dict) and isinstance(sc.get("settings"), dict):
            key = json.dumps(sc, sort_keys=True, default=str)
            with lock:
                if key not in built:
                    if len(built) >= _SETTINGS_KEPT:
                        built.pop(next(iter(built)))
                    built[key] = context.SettingsContext(**sc).settings
                settings = built[key]
            # A built Settings is taken as it is (pydantic does not revalidate instances).
            sc = {**sc, "settings": settings}
            serialized_context = {**serialized_context, "settings_context": sc}  # type: ignore[dict-item]
        with hydrate(serialized_context, client):  # type: ignore[arg-type]
            yield

    hydrated_context.reuses_settings = True  # type: ignore[attr-defined]
    normalize_token.register(_SerializedSettings)(lambda s: s.token)
    context.SettingsContext.serialize = serialized  # type: ignore[method-assign]
    task_engine.hydrated_context = hydrated_context
    orchestration.ssl = _SharedVerifiedContexts()  # type: ignore[assignment]
    return True
