"""The Prefect API a run reports to: the one ``PREFECT_API_URL`` names, or a temporary
local server that lives for the run."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

# Prefect gives its temporary server 20 s to answer. A first start migrates a fresh
# SQLite database, and on a loaded 2-core machine that took longer (54 test errors in one
# suite run); 120 s fits a busy machine and costs nothing on an idle one.
STARTUP_TIMEOUT_VAR = "SAMPLEMIX_SERVER_START_TIMEOUT_S"
DEFAULT_STARTUP_TIMEOUT_S = 120.0
START_ATTEMPTS = 2


class ServerStartError(RuntimeError):
    """The temporary Prefect server did not answer in time (message: what to do)."""


def startup_timeout_s() -> float:
    """Seconds each start of the temporary server may take: ``$STARTUP_TIMEOUT_VAR``
    when set, else ``DEFAULT_STARTUP_TIMEOUT_S``. (Prefect's own setting takes whole
    seconds and is ignored here.)"""
    value = os.environ.get(STARTUP_TIMEOUT_VAR, "").strip()
    if not value:
        return DEFAULT_STARTUP_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        raise ServerStartError(
            f"{STARTUP_TIMEOUT_VAR}={value!r} is not a number of seconds; set it to e.g. 300"
        ) from None
    if seconds <= 0:
        raise ServerStartError(f"{STARTUP_TIMEOUT_VAR}={value!r} must be > 0 seconds")
    return seconds


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (Prefect starts its server
    on another one if it is taken by the time the server binds it)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_temporary_server():  # noqa: ANN201 - prefect's SubprocessASGIServer
    """A started temporary Prefect server. Each of ``START_ATTEMPTS`` tries waits up to
    ``startup_timeout_s()``; a try that times out has its process stopped before the
    next. Raises ServerStartError, in one line that says what to do, when none answers."""
    from prefect.server.api.server import SubprocessASGIServer

    timeout = startup_timeout_s()
    for _ in range(START_ATTEMPTS):
        # A port of our own: Prefect keeps one server object per port, and with none
        # given it would hand back a server this process already runs.
        server = SubprocessASGIServer(port=free_port())
        try:
            server.start(timeout=timeout)  # type: ignore[arg-type] - a float works
            return server
        except Exception:  # noqa: BLE001 - a timeout, or the health check's HTTP error
            server.stop()  # Prefect leaves the timed-out process running otherwise
    raise ServerStartError(
        f"the temporary Prefect server did not answer within {timeout:g} s "
        f"({START_ATTEMPTS} tries; a busy machine starts it slowly): set "
        f"{STARTUP_TIMEOUT_VAR} higher (e.g. {4 * timeout:g}), or start one with "
        "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
    )


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the Prefect API URL, starting a temporary local server when none is set.

    Prefect's own ephemeral mode would start one more server inside every Dask worker
    process, and their task runs would never reach the flow's database; one server
    whose URL the workers inherit through the environment keeps a run in one place.
    """
    url = get_current_settings().api.url
    if url:
        yield url
        return
    server = start_temporary_server()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # send queued logs while the server still listens
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
