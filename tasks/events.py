"""Every process sends a run's Prefect events to that run's API, also after earlier runs
against other APIs (a Dask worker that outlives runs, a process that runs several).

The server records task runs from the events of their state changes, which each
process sends through one cached ``EventsWorker``. Prefect caches it under the events
client's class and options, and for a self-hosted server the options are empty: the
first API URL a process sent events to received all its later events. A long-lived Dask
worker then sent a second run's task runs to the first run's server, gone when that was
a temporary one (the worker logged ``Service 'EventsWorker' failed to process item``),
and the second run's server never recorded them (14 of 47 in one run).

``route_events_by_api`` caches one EventsWorker per API URL, each with a client of its
own URL, and drains the least recently used beyond ``APIS_KEPT`` in the background, so
a worker holds one per API in use, not one per run it ever served.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

APIS_KEPT = 8  # APIs whose runs one process serves at a time (one per concurrent server)


def route_events_by_api() -> bool:
    """Install the per-URL EventsWorker (idempotent). Returns whether this Prefect has
    what it replaces (``EventsWorker.instance``, a classmethod); where not, nothing is
    changed. Cloud, explicit client types and client overrides (Prefect's process pool,
    its test fixtures) keep Prefect's own choice."""
    try:
        from prefect.events.clients import PrefectEventsClient
        from prefect.events.worker import EventsWorker, emit_events_to_cloud
        from prefect.settings import PREFECT_API_URL
    except ImportError:
        return False
    original = EventsWorker.__dict__.get("instance")
    if not isinstance(original, classmethod):
        return False
    if getattr(original.__func__, "routes_by_api", False):
        return True

    kept: OrderedDict[str, EventsWorker] = OrderedDict()
    lock = threading.Lock()  # tasks on several threads of a worker emit at once

    def instance(cls: type[EventsWorker], client_type: Any = None) -> EventsWorker:  # noqa: ANN401
        url = PREFECT_API_URL.value()
        own = client_type is None and cls._client_override is None
        if not own or not isinstance(url, str) or emit_events_to_cloud():
            return original.__func__(cls, client_type)
        # Prefect's cache (keyed by these arguments) returns the live worker for this URL
        # or starts one, in the caller's context: its related-resources client uses the
        # same URL.
        worker = super(EventsWorker, cls).instance(PrefectEventsClient, (("api_url", url),))
        with lock:
            kept[url] = worker
            kept.move_to_end(url)
            stale = [kept.popitem(last=False)[1] for _ in range(len(kept) - APIS_KEPT)]
        for old in stale:  # sends what it holds (to a live server), then stops
            threading.Thread(target=old.drain, name="EventsWorker-drain", daemon=True).start()
        return worker

    instance.routes_by_api = True  # type: ignore[attr-defined]
    EventsWorker.instance = classmethod(instance)  # type: ignore[method-assign,assignment]
    return True
