"""The S3 test helpers in ``tests/s3.py`` against a real moto server (no mocks)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import s3fs
from botocore.exceptions import BotoCoreError
from s3 import KEY, REGION, SECRET, FlakyProxy, MotoServer, s3_storage_options

BUCKET = "helpers-bucket"
# One attempt, no botocore retries. Note: in botocore's (default) legacy mode the
# ``max_attempts`` key counts *retries*, so ``max_attempts=1`` still makes two attempts.
NO_RETRY: dict[str, Any] = {"retries": {"total_max_attempts": 1}}


def make_fs(endpoint: str, **kwargs: Any) -> s3fs.S3FileSystem:
    """A fresh s3fs instance: fsspec would otherwise hand back a cached one across tests."""
    return s3fs.S3FileSystem(
        skip_instance_cache=True,
        use_listings_cache=False,
        **s3_storage_options(endpoint),
        **kwargs,
    )


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def module_proxy(moto: MotoServer) -> Iterator[FlakyProxy]:
    with FlakyProxy(moto.host, moto.port) as proxy:
        yield proxy


@pytest.fixture
def proxy(module_proxy: FlakyProxy) -> Iterator[FlakyProxy]:
    """The shared proxy, guaranteed up again after each test that cuts it."""
    module_proxy.up()
    yield module_proxy
    module_proxy.up()


def test_storage_options_shape(moto: MotoServer) -> None:
    assert moto.endpoint == f"http://127.0.0.1:{moto.port}"
    assert moto.storage_options() == s3_storage_options(moto.endpoint)
    assert moto.storage_options() == {
        "key": KEY,
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": moto.endpoint, "region_name": REGION},
    }


def test_moto_roundtrip(moto: MotoServer) -> None:
    fs = make_fs(moto.endpoint)
    data = os.urandom(1 << 20)
    fs.pipe(f"{BUCKET}/direct/blob.bin", data)
    with fs.open(f"{BUCKET}/direct/blob.bin", "rb") as f:
        assert f.read() == data
    assert fs.cat_file(f"{BUCKET}/direct/blob.bin") == data


def test_moto_start_failure_reports_stderr() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        server = MotoServer(port=squatter.getsockname()[1])
        with pytest.raises(RuntimeError, match="in use"):
            server.start()
    server.stop()


def test_proxy_forwards_concurrent_connections(proxy: FlakyProxy) -> None:
    fs = make_fs(proxy.endpoint)
    blobs = {f"{BUCKET}/many/{i:02d}": os.urandom(1000 + i) for i in range(24)}
    # Larger than the socket buffers, so the pumps must cope with partial sends.
    blobs[f"{BUCKET}/many/large"] = os.urandom(8 << 20)
    fs.pipe(blobs)
    before = proxy.accepted
    fresh = make_fs(proxy.endpoint)
    assert fresh.cat(list(blobs)) == blobs
    # s3fs fans the reads out over several keep-alive connections at once.
    assert proxy.accepted - before > 1


def test_down_fails_fast_and_up_recovers(proxy: FlakyProxy) -> None:
    fs = make_fs(proxy.endpoint, config_kwargs=NO_RETRY)
    path = f"{BUCKET}/flaky/a.bin"
    data = os.urandom(4096)
    fs.pipe(path, data)
    assert fs.cat_file(path) == data

    proxy.down()
    refused = proxy.refused
    # A refused connect surfaces as botocore's EndpointConnectionError, which is *not*
    # an OSError; s3fs passes it through untranslated.
    with pytest.raises((OSError, BotoCoreError)):
        fs.cat_file(path)
    # One try, no retry, so it fails fast (botocore's default would try 5 times, with
    # backoff); a pooled connection the proxy cut may count as one more refusal.
    assert 1 <= proxy.refused - refused <= 2

    proxy.up()
    assert fs.cat_file(path) == data  # same instance: its pool recovers from the resets


def test_down_for_recovers_with_default_retries(proxy: FlakyProxy) -> None:
    fs = make_fs(proxy.endpoint)
    path = f"{BUCKET}/flaky/b.bin"
    data = os.urandom(4096)
    fs.pipe(path, data)
    assert fs.cat_file(path) == data

    refused = proxy.refused
    t0 = time.monotonic()
    proxy.down_for(1.0)
    # botocore's default (legacy) mode retries connection errors 4 times with random
    # exponential backoff, which outlasts a 1 s outage except with ~0.1% probability.
    assert fs.cat_file(path) == data
    assert time.monotonic() - t0 >= 0.9
    assert proxy.refused > refused
    assert not proxy.is_down


def _http_get(sock: socket.socket, host: str) -> bytes:
    """Send ``GET /`` and return the response head (moto then closes the connection)."""
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            break
        head += chunk
    return head


def _wait_accepted(proxy: FlakyProxy, n: int) -> None:
    """Wait until the proxy has forwarded ``n`` connections (accept runs in its thread)."""
    deadline = time.monotonic() + 3.0
    while proxy.accepted < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.accepted >= n


def _cut(sock: socket.socket) -> bool:
    """True if the peer closed or reset ``sock``; a timeout (hang) fails the test."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        pytest.fail("proxy left the connection hanging instead of closing it")


def test_down_cuts_open_and_new_raw_connections(proxy: FlakyProxy) -> None:
    addr = ("127.0.0.1", proxy.port)
    with socket.create_connection(addr, timeout=3.0) as served:
        assert _http_get(served, proxy.host).startswith(b"HTTP/1.")
    # Idle, not mid-request: moto answers "Connection: close", so a served one is over.
    accepted = proxy.accepted
    with socket.create_connection(addr, timeout=3.0) as live:
        _wait_accepted(proxy, accepted + 1)
        proxy.down()
        assert _cut(live)
    try:
        late = socket.create_connection(addr, timeout=3.0)
    except (ConnectionResetError, ConnectionRefusedError):
        pass  # the reset can beat connect() itself; just as good as a refusal
    else:
        with late:
            assert _cut(late)
    proxy.up()
    with socket.create_connection(addr, timeout=3.0) as again:
        assert _http_get(again, proxy.host).startswith(b"HTTP/1.")


def test_stop_leaves_no_threads(moto: MotoServer) -> None:
    before = set(threading.enumerate())
    proxy = FlakyProxy(moto.host, moto.port)
    proxy.start()
    # Idle connections: moto answers "Connection: close", so a request would end them.
    socks = [socket.create_connection(("127.0.0.1", proxy.port), timeout=3.0) for _ in range(8)]
    try:
        name = f"FlakyProxy-pump-{proxy.port}"

        def pumps() -> int:
            return sum(t.name == name for t in threading.enumerate())

        # Accepting and starting pumps happens asynchronously in the proxy's thread.
        deadline = time.monotonic() + 3.0
        while pumps() < 2 * len(socks) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pumps() == 2 * len(socks)
        proxy.stop()
        assert all(_cut(s) for s in socks)
    finally:
        for s in socks:
            s.close()

    timed = FlakyProxy(moto.host, moto.port)
    timed.start()
    timed.down_for(30.0)  # stop() must cancel the pending up() timer as well
    timed.stop()

    leaked = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert leaked == []
