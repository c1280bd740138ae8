"""The artifact store: ``{root}/{stage}/{key}/{name}`` over fsspec (local or s3://).

An artifact is a folder of files plus ``_done.json`` written last; only artifacts
with that marker are trusted, so a run killed mid-write leaves nothing a rerun would
reuse. ``_done.json`` holds the stage's summary and the parts its key hashes, and
``{stage}/_latest/`` points from each shard to its newest artifact, so that
``samplemix plan`` can say what changed since.

Every read and write retries transient failures (connection refused or reset,
timeouts, 5xx) with exponential backoff; permanent ones (no such bucket, access
denied) raise StoreError at once, naming the URL and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any, BinaryIO, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DONE = "_done.json"
LATEST = "_latest"
# Fault injection (tests, drills): a process about to commit an artifact of this stage
# kills itself with SIGKILL, as a lost worker would, after the files and before the marker.
KILL_BEFORE_COMMIT = "SAMPLEMIX_FAULT_KILL_BEFORE_COMMIT"
T = TypeVar("T")


class StoreError(RuntimeError):
    """The store cannot be used; the message names the URL and what to do."""


@dataclass(frozen=True, eq=True)
class Key:
    """An artifact's address ``{stage}/{id}``. ``parts`` is the JSON-able record that
    ``id`` hashes; ``shard`` names the shard of a per-shard artifact (None: a reduce)."""

    stage: str
    id: str
    parts: dict[str, Any] = field(compare=False, hash=False)
    shard: str | None = None

    def __str__(self) -> str:
        return f"{self.stage}/{self.id}"


def artifact_key(stage: str, version: str, shard: str | None = None, **parts: Any) -> Key:
    """The key of ``stage`` at logic ``version`` over ``parts``: its id is a 16-hex-digit
    hash of all three."""
    # Round-tripped through JSON so that the parts recorded in a manifest compare equal.
    parts = json.loads(json.dumps({"version": version, **parts}, default=str))
    blob = json.dumps({"stage": stage, **parts}, sort_keys=True)
    return Key(stage, hashlib.sha256(blob.encode()).hexdigest()[:16], parts, shard)


_TRANSIENT_ERRNOS = {
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EPIPE,
    errno.EAGAIN,
    errno.EBUSY,
}
# Connection and timeout errors of botocore/aiohttp/urllib3, which s3fs lets through
# untranslated, by class name so that none of those packages must be imported here.
_TRANSIENT_TYPES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ResponseStreamingError",
    "ClientConnectorError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "IncompleteRead",
    "ProtocolError",
    "FSTimeoutError",
}
# S3 error codes that s3fs turns into a plain OSError(EIO) and that a retry may cure.
_TRANSIENT_CODES = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout")


def transient(e: BaseException) -> bool:
    """True for failures that another try may cure: a refused, reset or timed-out
    connection, or the server asking us to slow down or come back (5xx). Missing
    files, refused credentials, bad requests and corrupt data are permanent."""
    for err in (e, e.__cause__):
        if err is None or isinstance(err, FileNotFoundError | PermissionError):
            continue
        if isinstance(err, ConnectionError | TimeoutError):
            return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
        if type(err).__name__ in _TRANSIENT_TYPES:
            return True
        if isinstance(err, OSError) and any(c in str(err) for c in _TRANSIENT_CODES):
            return True
    return False


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def put_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see all of it or nothing: a local
    file as ``write_stream`` writes it (beside its place, then renamed); on S3 one PUT,
    atomic already."""
    if _is_local(fs):
        write_stream(fs, path, lambda f: f.write(data))
    else:
        fs.pipe_file(path, data)


def write_stream(fs: fsspec.AbstractFileSystem, path: str, fill: Callable[[BinaryIO], T]) -> T:
    """``fill(f)`` on a file opened for writing at ``path``, published whole or not at
    all: a local file is written beside its place and renamed (atomic on one
    filesystem; the temporary file is removed if ``fill`` raises); an S3 object is a
    multipart upload, aborted if ``fill`` raises. Returns what ``fill`` returns."""
    if _is_local(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with fs.open(tmp, "wb") as f:
                result = fill(f)
            fs.mv(tmp, path)
        finally:
            if fs.exists(tmp):
                fs.rm_file(tmp)
        return result
    # Parts of 8 MiB (S3's minimum is 5): the upload holds one part, not the file.
    f = fs.open(path, "wb", block_size=8 << 20)
    try:
        result = fill(f)
        f.close()  # completes the upload
    except BaseException:
        f.closed = True  # first: closing it (when collected) would publish what it holds
        with contextlib.suppress(Exception):  # the error to report is the one above
            f.discard()  # abort the upload; one left behind is never visible
        raise
    return result


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# Store.get_rows: wanted rows closer than this are fetched in one range (one request,
# not two, for 64 KiB of unwanted bytes at most); ranges are fetched this much at a time.
ROWS_GAP = 1 << 16
ROWS_BATCH = 1 << 26


def npy_layout(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, tuple[int, int], np.dtype]:
    """(data offset in bytes, shape, dtype) of the 2-D C-order ``.npy`` file ``path``,
    read from its header alone. Raises ValueError for another layout."""
    # start and end by name: s3fs takes a version id as its second positional argument.
    head = io.BytesIO(fs.cat_file(path, start=0, end=12))
    version = np.lib.format.read_magic(head)
    # The header's length follows the magic and version: 2 bytes in format 1.0, else 4.
    length = 2 if version == (1, 0) else 4
    size = 8 + length + int.from_bytes(head.read(length), "little")
    f = io.BytesIO(fs.cat_file(path, start=0, end=size))
    np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran or len(shape) != 2 or dtype.hasobject:
        raise ValueError(f"{path}: not a 2-D C-order array of numbers ({shape}, {dtype})")
    return f.tell(), shape, dtype


class Location:
    """A local folder or ``s3://`` prefix whose reads and writes are retried with
    backoff while they fail transiently, and explained (StoreError) when they fail
    for good. ``what`` names the config field that set it, for the messages."""

    what = "output.store"

    def __init__(self, root: str, options: dict[str, Any] | None = None, retries: int = 5) -> None:
        self.root = root.rstrip("/")
        self.options = options or {}
        self.retries = retries
        self.fs, self._base = fsspec.core.url_to_fs(self.root, **self.options)

    def _explain(self, e: BaseException, url: str) -> StoreError:
        endpoint = (self.options.get("client_kwargs") or {}).get("endpoint_url", "")
        where = f"{url}" + (f" (endpoint {endpoint})" if endpoint else "")
        if isinstance(e, PermissionError) or type(e).__name__ in (
            "NoCredentialsError",
            "PartialCredentialsError",
        ):
            return StoreError(
                f"access denied to {where}: {e}. Check the credentials (storage.key/secret, "
                "storage.profile, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and that they "
                "may read and write this bucket"
            )
        if isinstance(e, FileNotFoundError):
            bucket = self._base.split("/", 1)[0]
            return StoreError(
                f"{where} does not exist: {e}. If the bucket {bucket!r} is missing, create it "
                f"(e.g. `aws s3 mb s3://{bucket}`) or point {self.what} elsewhere"
            )
        if not transient(e):
            return StoreError(f"{where}: {type(e).__name__}: {e}. Check {self.what} and storage.*")
        return StoreError(
            f"cannot reach {where} after {self.retries + 1} tries: "
            f"{type(e).__name__}: {e}. Check storage.endpoint_url (or AWS_ENDPOINT_URL), "
            "that the server is up, and the network"
        )

    def _retry(self, op: Callable[[], T], url: str, ours: type[Exception] | None = None) -> T:
        """``op()``, tried again after 0.5, 1, 2, 4, 8… s (capped at 15 s) while it fails
        transiently, at most ``retries`` times. A missing file raises FileNotFoundError
        (the caller's to handle); other failures raise StoreError, except permanent ones
        not of type ``ours`` when given (an op that also computes: those are not the
        store's, and are raised as they are)."""
        for attempt in range(self.retries + 1):
            try:
                return op()
            except (FileNotFoundError, StoreError):  # StoreError: explained where it failed
                raise
            except Exception as e:  # noqa: BLE001 - classified by transient()
                if transient(e) and attempt < self.retries:
                    time.sleep(min(0.5 * 2**attempt, 15.0))
                    continue
                if ours is not None and not transient(e) and not isinstance(e, ours):
                    raise
                raise self._explain(e, url) from e
        raise AssertionError("unreachable")

    def check(self) -> None:
        """Write, read and delete a probe object; raise StoreError explaining the cause
        (missing bucket, access denied, endpoint unreachable) when any of that fails."""
        path = f"{self._base}/_probe/{uuid.uuid4().hex}"
        url = f"{self.root}/_probe"

        def probe() -> None:
            put_bytes(self.fs, path, b"ok")
            self.fs.cat_file(path)
            self.fs.rm_file(path)

        try:
            self._retry(probe, url)
        except FileNotFoundError as e:
            raise self._explain(e, url) from e

    def _write(self, path: str, data: bytes) -> None:
        self._retry(lambda: put_bytes(self.fs, path, data), self._url(path))

    def _read(self, path: str) -> bytes:
        return self._retry(lambda: self.fs.cat_file(path), self._url(path))

    def _json(self, path: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._read(path))
        except FileNotFoundError:
            return None

    def _url(self, path: str) -> str:
        return self.root + path[len(self._base) :]


class Store(Location):
    """Stage artifacts: ``{root}/{stage}/{key id}/{name}`` plus ``_done.json``.
    ``stages`` names the stage folders it owns; nothing else under ``root`` is listed
    or removed, so a store may share a bucket prefix with other data."""

    def __init__(
        self,
        root: str,
        options: dict[str, Any] | None = None,
        retries: int = 5,
        stages: tuple[str, ...] = (),
    ) -> None:
        super().__init__(root, options, retries)
        self.stages = stages

    def _path(self, key: Key, name: str = "") -> str:
        return "/".join(p for p in (self._base, key.stage, key.id, name) if p)

    def _latest_path(self, stage: str, shard: str | None) -> str:
        tag = hashlib.sha256((shard or "").encode()).hexdigest()[:16]
        return f"{self._base}/{stage}/{LATEST}/{tag}.json"

    # ---- writing ------------------------------------------------------------------------

    def put_table(self, key: Key, name: str, table: pa.Table) -> None:
        self._write(self._path(key, name), parquet_bytes(table))

    def put_bytes(self, key: Key, name: str, data: bytes) -> None:
        self._write(self._path(key, name), data)

    def put_array(self, key: Key, name: str, array: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        self._write(self._path(key, name), buf.getvalue())

    def put_arrays(self, key: Key, name: str, **arrays: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self._write(self._path(key, name), buf.getvalue())

    def commit(self, key: Key, summary: dict[str, Any]) -> dict[str, Any]:
        """Mark the artifact complete (``summary``, JSON-able, is what a cache hit
        returns), then point its shard's ``_latest`` entry at it; returns the
        committed summary.

        The first commit wins: when two runs sharing the store computed the same key
        at once, the later one keeps the earlier marker and returns its summary. Both
        wrote the same files (a key fixes its inputs; each file is replaced whole), so
        the artifact is consistent whichever files landed last.
        """
        if os.environ.get(KILL_BEFORE_COMMIT) == key.stage:
            os.kill(os.getpid(), signal.SIGKILL)
        first = self.manifest(key)
        done = {
            "stage": key.stage,
            "shard": key.shard,
            "parts": key.parts,
            "summary": summary,
            "committed": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if first is None:
            self._write(self._path(key, DONE), json.dumps(done).encode())
        latest = json.dumps({"id": key.id, "shard": key.shard}).encode()
        self._write(self._latest_path(key.stage, key.shard), latest)
        return summary if first is None else first["summary"]

    # ---- reading ------------------------------------------------------------------------

    def manifest(self, key: Key) -> dict[str, Any] | None:
        """The committed ``_done.json`` of ``key``, or None when absent or incomplete."""
        return self._json(self._path(key, DONE))

    def summary(self, key: Key) -> dict[str, Any] | None:
        """The committed summary, or None when the artifact is absent or incomplete."""
        done = self.manifest(key)
        return None if done is None else done["summary"]

    def summaries(self, keys: list[Key]) -> dict[Key, dict[str, Any]]:
        """The committed summaries among ``keys``, fetched in one batch (concurrent
        GETs on S3); keys without a committed artifact are left out."""
        if not keys:
            return {}
        paths = {self._path(k, DONE): k for k in keys}
        got = self._retry(
            lambda: self.fs.cat(list(paths), on_error="omit"), f"{self.root}/{keys[0].stage}"
        )
        return {paths[p]: json.loads(b)["summary"] for p, b in got.items() if p in paths}

    def latest(self, stage: str, shard: str | None) -> dict[str, Any] | None:
        """The manifest of the newest artifact committed for ``shard`` (None: the reduce)
        of ``stage``, or None when there is none (or it has been garbage-collected)."""
        ptr = self._json(self._latest_path(stage, shard))
        if ptr is None:
            return None
        return self.manifest(Key(stage, ptr["id"], {}, shard))

    def has_files(self, key: Key) -> bool:
        """True when anything was written under ``key`` (committed or not)."""
        return bool(self._retry(lambda: self.fs.exists(self._path(key)), self.url(key)))

    def url(self, key: Key, name: str = "") -> str:
        return self._url(self._path(key, name))

    def get_bytes(self, key: Key, name: str) -> bytes:
        return self._read(self._path(key, name))

    def get_table(self, key: Key, name: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(io.BytesIO(self._read(self._path(key, name))), columns=columns)

    def get_array(self, key: Key, name: str) -> np.ndarray:
        return np.load(io.BytesIO(self._read(self._path(key, name))), allow_pickle=False)

    def get_rows(self, key: Key, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (ascending, distinct) of the 2-D array ``name`` (``put_array``),
        read by byte ranges rather than whole: (len(rows), columns) of its dtype.

        The array is read in blocks of about ``ROWS_BATCH`` bytes, each in one request per
        run of wanted rows less than ``ROWS_GAP`` bytes apart (the rows between are read
        and dropped; on S3 a block's requests run concurrently), so memory holds the rows
        asked for plus one block, however large the array."""
        path = self._path(key, name)
        offset, shape, dtype = self._retry(lambda: npy_layout(self.fs, path), self._url(path))
        width = dtype.itemsize * shape[1]
        out = np.empty((len(rows), shape[1]), dtype)
        if not len(rows):
            return out
        if rows[0] < 0 or rows[-1] >= shape[0] or np.any(np.diff(rows) <= 0):
            raise ValueError(f"{self._url(path)}: rows must be ascending and within 0..{shape[0]}")
        block = rows // max(1, ROWS_BATCH // width)
        for lo, hi in pairwise([0, *(np.flatnonzero(np.diff(block)) + 1).tolist(), len(rows)]):
            r = rows[lo:hi]
            # A range ends where the next wanted row is more than ROWS_GAP bytes further on.
            ends = np.flatnonzero(np.diff(r) * width > ROWS_GAP + width)
            firsts, lasts = np.r_[0, ends + 1], np.r_[ends, len(r) - 1]
            starts = (offset + r[firsts] * width).tolist()
            stops = (offset + (r[lasts] + 1) * width).tolist()
            got = self._retry(
                lambda s=starts, e=stops: self.fs.cat_ranges(
                    [path] * len(s), s, e, on_error="raise"
                ),
                self._url(path),
            )
            for f, last, data in zip(firsts, lasts, got, strict=True):
                got_rows = np.frombuffer(data, dtype).reshape(-1, shape[1])
                out[lo + f : lo + last + 1] = got_rows[r[f : last + 1] - r[f]]
        return out

    def get_ranges(self, ranges: list[tuple[Key, str, int, int]]) -> list[bytes]:
        """Bytes [start, end) of file ``name`` of ``key``, for each (key, name, start,
        end), fetched together (concurrently on S3), in order."""
        if not ranges:
            return []
        paths = [self._path(k, name) for k, name, _, _ in ranges]
        starts = [start for _, _, start, _ in ranges]
        ends = [end for _, _, _, end in ranges]
        folders = sorted({p.rsplit("/", 2)[0] for p in paths})  # the stages read
        where = self._url(paths[0]) if len(paths) == 1 else f"{len(paths)} files under "
        where += "" if len(paths) == 1 else ", ".join(self._url(f) for f in folders)
        return self._retry(lambda: self.fs.cat_ranges(paths, starts, ends, on_error="raise"), where)

    def get_arrays(self, key: Key, name: str) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(self._read(self._path(key, name))), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    # ---- listing and removal (gc) -------------------------------------------------------

    def artifacts(self, only: str | None = None) -> list[Artifact]:
        """Every artifact folder of the store's stages (or of stage ``only``), from one
        recursive listing per stage."""

        def walk(stage: str) -> list[Artifact]:
            base = f"{self._base}/{stage}"
            if not self.fs.exists(base):
                return []
            folders: dict[str, Artifact] = {}
            for path, info in self.fs.find(base, detail=True).items():
                rel = path[len(base) + 1 :].split("/")
                if len(rel) < 2 or not _ID.fullmatch(rel[0]):
                    continue  # _latest pointers, or anything that is not an artifact
                a = folders.setdefault(rel[0], Artifact(stage, rel[0], False, 0, 0.0))
                a.committed |= rel[-1] == DONE
                a.size += int(info.get("size") or 0)
                a.modified = max(a.modified, _mtime(info))
            return sorted(folders.values(), key=lambda a: a.id)

        stages = (only,) if only else self.stages
        return [a for st in stages for a in self._retry(lambda st=st: walk(st), self.root)]

    def manifests(self, stage: str) -> list[tuple[str, dict[str, Any]]]:
        """(id, manifest) of every committed artifact of ``stage``; for reduces, whose
        artifacts are few (one per configuration tried)."""
        found = []
        for a in self.artifacts(stage):
            m = self.manifest(Key(stage, a.id, {})) if a.committed else None
            if m is not None:
                found.append((a.id, m))
        return found

    def remove(self, stage: str, kid: str) -> None:
        path = f"{self._base}/{stage}/{kid}"
        self._retry(lambda: self.fs.rm(path, recursive=True), self._url(path))


_ID = re.compile(r"[0-9a-f]{16}")


@dataclass
class Artifact:
    """One artifact folder: committed (has ``_done.json``), total bytes, newest file's
    modification time (seconds since the epoch)."""

    stage: str
    id: str
    committed: bool
    size: int
    modified: float


def _mtime(info: dict[str, Any]) -> float:
    stamp = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
    return stamp.timestamp() if isinstance(stamp, datetime) else float(stamp)


def _lease_dead(held: dict[str, Any]) -> bool:
    """True when a lease expired, or its holder's process is gone from this host."""
    if held.get("expires", 0) < time.time():
        return True
    if held.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(held["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _never_raising(warn: Callable[[str], None]) -> Callable[[str], None]:
    """``warn`` with any exception it raises suppressed: the lease's renewal thread and
    its release tell their troubles through it, and a failing log handler must stop
    neither the renewals nor the block's own exception."""

    def say(message: str) -> None:
        with contextlib.suppress(Exception):
            warn(message)

    return say


class Output(Location):
    """The folder (or s3:// prefix) a run publishes to: mixture/, plan/, rejects/,
    report/ and ``_manifest.json``, written last, naming the key the files came from
    and their sizes. ``current(key)`` says whether they are all still there."""

    what = "output.path"
    MANIFEST = "_manifest.json"
    FOLDERS = ("mixture", "plan", "rejects", "report")

    @property
    def url(self) -> str:
        return self.root

    def put_table(self, name: str, table: pa.Table) -> None:
        self.put_bytes(name, parquet_bytes(table))

    def put_bytes(self, name: str, data: bytes) -> None:
        self._write(f"{self._base}/{name}", data)

    def put_stream(self, name: str, fill: Callable[[BinaryIO], T]) -> T:
        """Write file ``name`` by ``fill(f)`` (``write_stream``), the whole of it tried
        again while it fails transiently; returns what ``fill`` returns. I/O errors are
        explained as the output's (StoreError); anything else ``fill`` raises is raised
        as it is."""
        path = f"{self._base}/{name}"
        return self._retry(lambda: write_stream(self.fs, path, fill), self._url(path), OSError)

    def manifest(self) -> dict[str, Any] | None:
        return self._json(f"{self._base}/{self.MANIFEST}")

    def _files(self) -> dict[str, int]:
        """Every published file (relative path → bytes), from one listing per folder."""
        files = {}
        for folder in self.FOLDERS:
            base = f"{self._base}/{folder}"
            found = self._retry(
                lambda b=base: self.fs.find(b, detail=True) if self.fs.exists(b) else {},
                self._url(base),
            )
            for p, info in found.items():
                if ".tmp-" not in p:
                    files[p[len(self._base) + 1 :]] = int(info["size"])
        return files

    def current(self, key: Key) -> bool:
        """True when the files were written from ``key`` and none is missing or resized."""
        m = self.manifest()
        if m is None or m.get("key") != key.id:
            return False
        files = self._files()
        return all(files.get(f) == n for f, n in m["files"].items())

    def clear(self) -> None:
        """Remove the manifest, then what an earlier run published (it may have had more
        parts), so that no stale file is taken for part of this run's output."""
        for name in (self.MANIFEST, *self.FOLDERS):
            path = f"{self._base}/{name}"
            self._retry(
                lambda p=path: self.fs.rm(p, recursive=True) if self.fs.exists(p) else None,
                self._url(path),
            )

    LEASE = "_lease.json"
    LEASE_TTL = 120.0  # seconds a lease lives without renewal; renewed every TTL/4
    _lease_run: str | None = None  # the run id of the lease this object holds, if any

    @contextlib.contextmanager
    def lease(
        self,
        wait_s: float,
        log: Callable[[str], None],
        warn: Callable[[str], None] | None = None,
    ) -> Iterator[None]:
        """Hold ``_lease.json`` while the block runs, so that one run at a time writes
        this output. A lease held by another run is waited for (polled every 2 s) up
        to ``wait_s`` seconds, then StoreError names its holder. A lease whose
        holder stopped renewing it (expired), or whose process is gone from this
        host, is taken over.

        While the block runs, a thread renews the lease every TTL/4 s. It never
        raises: a renewal that fails (the store unreachable) is told to ``warn``
        (default ``log``) and tried again every TTL/16 s until it succeeds. The lease
        is lost only when a renewal finds it held by another run, or gone, which
        another run can cause only after it went unrenewed for longer than
        ``LEASE_TTL``: ``warn`` then gets one line naming the output and what to do,
        renewals stop, and ``seal`` raises StoreError with that line. Releasing the
        lease never replaces the block's own exception: a release that fails is a
        warning, the lease expiring by itself.
        """
        path = f"{self._base}/{self.LEASE}"
        me = {"run": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        say = _never_raising(warn or log)

        def stamp() -> bytes:
            return self._lease_stamp(me)

        self._take_lease(path, me["run"], stamp, wait_s, log)
        self._lease_run = me["run"]
        stop = threading.Event()
        renewer = threading.Thread(
            target=self._renew_until,
            args=(stop, path, me["run"], stamp, say),
            name=f"lease {self.root}",
            daemon=True,
        )
        renewer.start()
        try:
            yield
        finally:
            # A release that fails is only told (the lease then expires by itself), so
            # that it never replaces the block's own exception.
            stop.set()
            renewer.join()
            self._lease_run = None
            try:
                self._release(path, me["run"])
            except StoreError as e:
                say(
                    f"output {self.root}: could not remove its lease {self.LEASE} ({e}); it "
                    f"expires {self.LEASE_TTL:g} s after its last renewal, and is taken over "
                    "at once by a run on this host when this process has ended"
                )

    def _lease_stamp(self, me: dict[str, Any]) -> bytes:
        """The lease document of holder ``me`` (run, host, pid), valid from now for
        ``LEASE_TTL`` seconds, as the bytes written to ``_lease.json``."""
        now = time.time()
        return json.dumps({**me, "since": now, "expires": now + self.LEASE_TTL}).encode()

    def _take_lease(
        self,
        path: str,
        run: str,
        stamp: Callable[[], bytes],
        wait_s: float,
        log: Callable[[str], None],
    ) -> None:
        """Return once ``run`` holds the lease at ``path``: taken when free, already
        ``run``'s, expired or held by a process gone from this host; otherwise polled
        every 2 s (each wait told to ``log``). Raises StoreError naming the holder when
        it is still held by another run after ``wait_s`` seconds."""
        deadline = time.monotonic() + wait_s
        while True:
            held = self._json(path)
            if held is None or held.get("run") == run or _lease_dead(held):
                self._write(path, stamp())
                time.sleep(0.2)  # two runs that wrote at once: the last write wins
                if (self._json(path) or {}).get("run") == run:
                    return
                continue
            if time.monotonic() >= deadline:
                raise StoreError(
                    f"output {self.root} is being written by another run (host "
                    f"{held.get('host')}, pid {held.get('pid')}, lease until "
                    f"{datetime.fromtimestamp(held['expires'], UTC):%H:%M:%S} UTC); wait "
                    "for it (output.lease_wait_s) or use another output.path"
                )
            log(f"output {self.root} is being written by another run; waiting")
            time.sleep(2.0)

    def _renew_until(
        self,
        stop: threading.Event,
        path: str,
        run: str,
        stamp: Callable[[], bytes],
        say: Callable[[str], None],
    ) -> None:
        """The renewal thread's body: renew ``run``'s lease every TTL/4 s until ``stop``
        is set, or until a renewal finds the lease taken or gone (told to ``say`` once).

        Never raises (an exception would end the renewals, and the lease would expire
        under the running block): a failed renewal is told to ``say`` once per failed
        spell, again once the lease has gone unrenewed past ``LEASE_TTL``, and retried
        every TTL/16 s; the first success after a failure is told too. ``say`` must not
        raise."""
        renewed = time.monotonic()
        failing: str | None = None  # the first error of the current failed spell
        told_expired = False
        # Renewing well before expiry; retrying more often once a renewal failed.
        while not stop.wait(self.LEASE_TTL / (16 if failing else 4)):
            unrenewed = time.monotonic() - renewed
            try:
                holder = self._renew(path, run, stamp)
            except Exception as e:  # noqa: BLE001 - the renewals must outlive any failure
                if failing is None:
                    failing = f"{type(e).__name__}: {e}"
                    say(
                        f"output {self.root}: cannot renew its lease {self.LEASE} ({failing}); "
                        f"retrying every {self.LEASE_TTL / 16:g} s (it expires "
                        f"{self.LEASE_TTL:g} s after the last renewal)"
                    )
                elif unrenewed > self.LEASE_TTL and not told_expired:
                    told_expired = True
                    say(
                        f"output {self.root}: its lease {self.LEASE} went unrenewed for "
                        f"{unrenewed:.0f} s and has expired ({failing}); still retrying"
                    )
                continue
            if holder is not None:
                say(self._lease_lost(holder))
                return
            if failing is not None:
                say(f"output {self.root}: lease {self.LEASE} renewed after {unrenewed:.0f} s")
            renewed, failing, told_expired = time.monotonic(), None, False

    def _renew(self, path: str, run: str, stamp: Callable[[], bytes]) -> dict[str, Any] | None:
        """One try at renewing the lease of ``run`` (the renewal loop is the retry):
        None when renewed, else the lease found instead ({} when there is none)."""
        try:
            held = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return {}
        if held.get("run") != run:
            return held
        put_bytes(self.fs, path, stamp())
        return None

    def _release(self, path: str, run: str) -> None:
        """Remove the lease if ``run`` still holds it (never another run's)."""
        if (self._json(path) or {}).get("run") == run:
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile: nothing to do
                self._retry(lambda: self.fs.rm_file(path), self._url(path))

    def _lease_lost(self, holder: dict[str, Any]) -> str:
        """The line that tells a run its lease was taken (``holder``: the lease found
        instead, {} when none)."""
        now = (
            f"host {holder.get('host')}, pid {holder.get('pid')} holds it now"
            if holder
            else "it is gone (another run took it over and ended, or it was removed)"
        )
        return (
            f"output {self.root}: this run no longer holds its lease {self.LEASE}: {now} (a "
            f"lease expires when unrenewed for {self.LEASE_TTL:g} s, e.g. while the store is "
            "unreachable); its files there may be mixed with another run's: when no other run "
            "writes this output, run again (cached stages are not recomputed), or use another "
            "output.path"
        )

    def seal(self, key: Key, summary: dict[str, Any]) -> None:
        """Write the manifest: the published files with their sizes, and the run summary.
        Written last, so a run killed before it leaves no manifest. Under a lease
        (``lease``) that another run has taken since, raises StoreError instead (the
        files may be mixed with that run's)."""
        if self._lease_run is not None:
            held = self._json(f"{self._base}/{self.LEASE}") or {}
            if held.get("run") != self._lease_run:
                raise StoreError(self._lease_lost(held))
        doc = {"key": key.id, "files": dict(sorted(self._files().items())), "summary": summary}
        self._write(f"{self._base}/{self.MANIFEST}", json.dumps(doc, indent=1).encode())
