"""Test helpers for S3: a moto server in a subprocess and a TCP proxy that can be cut.

``MotoServer`` gives a real S3-speaking HTTP endpoint; ``FlakyProxy`` sits in front of it
and simulates an outage without stopping moto (moto keeps its state in memory, so
restarting it would lose every bucket).

Typical use::

    with MotoServer() as moto, FlakyProxy(moto.host, moto.port) as proxy:
        moto.create_bucket("b")
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options(proxy.endpoint))
        proxy.down_for(1.0)
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any

import boto3

KEY = "testing-key"
SECRET = "testing-secret"
REGION = "us-east-1"
HOST = "127.0.0.1"

# Ignores http_proxy & co.: the readiness probe must hit 127.0.0.1 directly.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that was free a moment ago (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def s3_storage_options(endpoint: str) -> dict[str, Any]:
    """s3fs ``S3FileSystem`` kwargs for the test credentials against ``endpoint``."""
    return {
        "key": KEY,
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION},
    }


class MotoServer:
    """moto's standalone S3 server in a subprocess on a free port of 127.0.0.1.

    State (buckets, objects) lives in the subprocess's memory and is lost on ``stop()``.
    """

    def __init__(
        self, host: str = HOST, port: int | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.host = host
        self.env = env or {}
        self._auto_port = port is None
        self.port = port if port is not None else free_port(host)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def storage_options(self) -> dict[str, Any]:
        """s3fs kwargs pointing straight at this server."""
        return s3_storage_options(self.endpoint)

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and block until it answers HTTP.

        Raises ``RuntimeError`` (with the server's stderr) if it exits or does not answer
        within ``timeout`` seconds.
        """
        if self._proc is not None:
            raise RuntimeError("MotoServer already started")
        deadline = time.monotonic() + timeout
        # The free port is only free "a moment ago"; if something grabs it before moto
        # binds, pick another one rather than fail the session.
        for attempt in range(3):
            try:
                self._start_once(deadline)
                return
            except RuntimeError as e:
                if not self._auto_port or "in use" not in str(e) or attempt == 2:
                    raise
                self.port = free_port(self.host)

    def _start_once(self, deadline: float) -> None:
        # A file, not a pipe: moto logs every request to stderr and a full pipe would
        # block the server mid-test.
        self._log = tempfile.TemporaryFile()
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": REGION,
            **self.env,
        }
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=env,
        )
        while True:
            rc = self._proc.poll()
            if rc is not None:
                log = self._read_log()
                self.stop()
                raise RuntimeError(f"moto server exited (rc={rc}) before answering:\n{log}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                log = self._read_log()
                self.stop()
                raise RuntimeError(f"moto server did not answer in time:\n{log}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (kill if it ignores SIGTERM); idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def create_bucket(self, name: str) -> None:
        """Create ``name`` via boto3 (s3fs ``mkdir`` sends a location constraint moto rejects)."""
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=KEY,
            aws_secret_access_key=SECRET,
            region_name=REGION,
        )
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()

    def _answers(self) -> bool:
        try:
            with _DIRECT.open(self.endpoint + "/", timeout=1.0):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP status means the server is serving
        except OSError:
            return False

    def _read_log(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-8000:]

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` so the peer sees a connection reset (RST), never a hang."""
    with contextlib.suppress(OSError):
        # linger 0: close() sends RST instead of a graceful FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        # Wakes a pump sleeping in select() on this socket without sending a FIN.
        sock.shutdown(socket.SHUT_RD)
    sock.close()


# Longest a pump sleeps in select(); bounds how long stop() can wait on an idle peer.
_TICK = 0.25


class _Link:
    """One proxied connection: a client socket, an upstream socket and two pump threads.

    Sockets are non-blocking and every wait goes through select() with a timeout, so no
    pump thread ever sits in a syscall that another thread's close() cannot end.
    """

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self._lock = threading.Lock()
        self._open_pumps = 2
        self._closed = False

    def pump(
        self, src: socket.socket, dst: socket.socket, on_done: Callable[[_Link], None]
    ) -> None:
        try:
            while not self._closed:
                readable, _, _ = select.select([src], [], [], _TICK)
                if self._closed:
                    return
                if not readable:
                    continue
                try:
                    data = src.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    # Half-close: the other direction may still be carrying a response.
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                self._send_all(dst, data)
        except (OSError, ValueError):
            # ValueError: select() on a socket another thread already closed (fd == -1).
            self.reset()
        finally:
            with self._lock:
                self._open_pumps -= 1
                last = self._open_pumps == 0
            if last:
                self.close()
                on_done(self)

    def _send_all(self, dst: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            _, writable, _ = select.select([], [dst], [], _TICK)
            if self._closed:
                return
            if not writable:
                continue
            try:
                view = view[dst.send(view) :]
            except BlockingIOError:
                continue

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.client.close()
        self.upstream.close()

    def reset(self) -> None:
        """Abort both sides: the client sees a reset, the pumps notice and exit."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _reset(self.client)
        _reset(self.upstream)


class FlakyProxy:
    """TCP forwarder from 127.0.0.1:<free port> to ``(target_host, target_port)``.

    ``down()`` resets every open connection and resets new ones as soon as they are
    accepted, so clients fail fast (connection reset) instead of hanging; ``up()``
    resumes forwarding. All threads are daemons and are joined by ``stop()``.
    """

    def __init__(self, target_host: str, target_port: int, host: str = HOST) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self._listener: socket.socket | None = None
        self.port = 0
        self._stopping = threading.Event()
        self._down = threading.Event()
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        # Every pump ever started and not yet seen dead: stop() joins them all, including
        # pumps of links that closed normally but whose thread has not exited yet.
        self._pumps: list[threading.Thread] = []
        self._accept_thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        # Counters for tests: connections forwarded, and connections reset while down.
        self.accepted = 0
        self.refused = 0

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_down(self) -> bool:
        return self._down.is_set()

    def start(self) -> None:
        """Bind a free port and start accepting."""
        if self._listener is not None:
            raise RuntimeError("FlakyProxy already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(256)
        # A timeout lets the accept loop notice stop(); close() does not wake accept().
        listener.settimeout(0.1)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._stopping.clear()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"FlakyProxy-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, reset all connections and join every thread; idempotent."""
        self._cancel_timer()
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
            self._accept_thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._reset_all()
        with self._lock:
            pumps, self._pumps = self._pumps, []
        for t in pumps:
            t.join(timeout)

    def down(self) -> None:
        """Cut the link: reset open connections now and every new one on arrival."""
        self._cancel_timer()
        self._down.set()
        self._reset_all()

    def up(self) -> None:
        """Forward again (new connections only; cut ones stay cut)."""
        self._cancel_timer()
        self._down.clear()

    def down_for(self, seconds: float) -> None:
        """``down()`` now and ``up()`` automatically after ``seconds``."""
        self.down()
        timer = threading.Timer(seconds, self._timer_up)
        timer.daemon = True
        with self._lock:
            self._timer = timer
        timer.start()

    def _timer_up(self) -> None:
        with self._lock:
            self._timer = None
        self._down.clear()

    def _cancel_timer(self) -> None:
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            if timer is not threading.current_thread():
                timer.join()

    def _reset_all(self) -> list[_Link]:
        with self._lock:
            links = list(self._links)
        for link in links:
            link.reset()
        return links

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._down.is_set() or self._stopping.is_set():
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5.0)
            except OSError:
                _reset(client)
                continue
            for sock in (client, upstream):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream)
            threads = [
                threading.Thread(
                    target=link.pump,
                    args=(src, dst, self._forget),
                    name=f"FlakyProxy-pump-{self.port}",
                    daemon=True,
                )
                for src, dst in ((client, upstream), (upstream, client))
            ]
            with self._lock:
                self._links.add(link)
                self._pumps = [t for t in self._pumps if t.is_alive()] + threads
                self.accepted += 1
            # down() may have run between the check above and registration.
            if self._down.is_set():
                link.reset()
            for t in threads:
                t.start()

    def __enter__(self) -> FlakyProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
