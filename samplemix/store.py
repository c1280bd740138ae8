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

import hashlib
import io
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

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
    parts = {"version": version, **parts}
    blob = json.dumps({"stage": stage, **parts}, sort_keys=True, default=str)
    return Key(stage, hashlib.sha256(blob.encode()).hexdigest()[:16], parts, shard)


def _transient(e: BaseException) -> bool:
    """True for failures that another try may cure: the network, timeouts, 5xx."""
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    if isinstance(e, OSError | TimeoutError | ConnectionError):
        return True
    # botocore/aiohttp errors that s3fs lets through untranslated (connection refused).
    return type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp")


def put_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see all of it or nothing: a local
    file is written beside its place and renamed (atomic on one filesystem); an S3
    PUT is atomic already."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


class Store:
    def __init__(self, root: str, options: dict[str, Any] | None = None, retries: int = 5) -> None:
        self.root = root.rstrip("/")
        self.options = options or {}
        self.retries = retries
        self.fs, self._base = fsspec.core.url_to_fs(self.root, **self.options)

    # ---- failure handling ---------------------------------------------------------------

    def _explain(self, e: BaseException, url: str) -> StoreError:
        endpoint = (self.options.get("client_kwargs") or {}).get("endpoint_url", "")
        where = f"{url}" + (f" (endpoint {endpoint})" if endpoint else "")
        if isinstance(e, PermissionError):
            return StoreError(
                f"access denied to {where}: {e}. Check the credentials (storage.key/secret, "
                "storage.profile, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and that they "
                "may read and write this bucket"
            )
        if isinstance(e, FileNotFoundError):
            bucket = self._base.split("/", 1)[0]
            return StoreError(
                f"{where} does not exist: {e}. If the bucket {bucket!r} is missing, create it "
                "(e.g. `aws s3 mb s3://" + bucket + "`) or point output.store elsewhere"
            )
        return StoreError(
            f"cannot reach the store at {where} after {self.retries + 1} tries: "
            f"{type(e).__name__}: {e}. Check storage.endpoint_url (or AWS_ENDPOINT_URL), "
            "that the server is up, and the network"
        )

    def _retry(self, op: Callable[[], T], url: str) -> T:
        """``op()``, tried again after 0.5, 1, 2, 4, 8… s (capped at 15 s) while it fails
        transiently, at most ``retries`` times."""
        for attempt in range(self.retries + 1):
            try:
                return op()
            except Exception as e:  # noqa: BLE001 - classified below
                if isinstance(e, FileNotFoundError):
                    raise  # a missing artifact file is the caller's to handle
                if not _transient(e) or attempt == self.retries:
                    raise self._explain(e, url) from e
                time.sleep(min(0.5 * 2**attempt, 15.0))
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

    # ---- paths --------------------------------------------------------------------------

    def _path(self, key: Key, name: str = "") -> str:
        return "/".join(p for p in (self._base, key.stage, key.id, name) if p)

    def url(self, key: Key, name: str = "") -> str:
        return "/".join(p for p in (self.root, key.stage, key.id, name) if p)

    def _latest_path(self, stage: str, shard: str | None) -> str:
        tag = hashlib.sha256((shard or "").encode()).hexdigest()[:16]
        return f"{self._base}/{stage}/{LATEST}/{tag}.json"

    # ---- writing ------------------------------------------------------------------------

    def _put(self, key: Key, name: str, data: bytes) -> None:
        path = self._path(key, name)
        self._retry(lambda: put_bytes(self.fs, path, data), self.url(key, name))

    def put_table(self, key: Key, name: str, table: pa.Table) -> None:
        self._put(key, name, parquet_bytes(table))

    def put_array(self, key: Key, name: str, array: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        self._put(key, name, buf.getvalue())

    def put_arrays(self, key: Key, name: str, **arrays: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self._put(key, name, buf.getvalue())

    def commit(self, key: Key, summary: dict[str, Any]) -> dict[str, Any]:
        """Mark the artifact complete (``summary``, JSON-able, is what a cache hit
        returns), then point its shard's ``_latest`` entry at it."""
        if os.environ.get(KILL_BEFORE_COMMIT) == key.stage:
            os.kill(os.getpid(), signal.SIGKILL)
        done = {
            "stage": key.stage,
            "shard": key.shard,
            "parts": key.parts,
            "summary": summary,
            "committed": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self._put(key, DONE, json.dumps(done, default=str).encode())
        latest = json.dumps({"id": key.id, "shard": key.shard}).encode()
        path = self._latest_path(key.stage, key.shard)
        self._retry(lambda: put_bytes(self.fs, path, latest), f"{self.root}/{key.stage}/{LATEST}")
        return summary

    # ---- reading ------------------------------------------------------------------------

    def _read(self, path: str, url: str) -> bytes:
        return self._retry(lambda: self.fs.cat_file(path), url)

    def _json(self, path: str, url: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._read(path, url))
        except FileNotFoundError:
            return None

    def manifest(self, key: Key) -> dict[str, Any] | None:
        """The committed ``_done.json`` of ``key``, or None when absent or incomplete."""
        return self._json(self._path(key, DONE), self.url(key, DONE))

    def summary(self, key: Key) -> dict[str, Any] | None:
        """The committed summary, or None when the artifact is absent or incomplete."""
        done = self.manifest(key)
        return None if done is None else done["summary"]

    def latest(self, stage: str, shard: str | None) -> dict[str, Any] | None:
        """The manifest of the newest artifact committed for ``shard`` (None: the reduce)
        of ``stage``, or None when there is none (or it has been garbage-collected)."""
        ptr = self._json(self._latest_path(stage, shard), f"{self.root}/{stage}/{LATEST}")
        if ptr is None:
            return None
        return self.manifest(Key(stage, ptr["id"], {}, shard))

    def committed(self, stages: set[str]) -> dict[str, set[str]]:
        """The ids of the committed artifacts of each stage, from one listing per stage."""

        def ls(stage: str) -> set[str]:
            found = self.fs.glob(f"{self._base}/{stage}/*/{DONE}")
            return {p.rstrip("/").rsplit("/", 2)[-2] for p in found}

        return {s: self._retry(lambda s=s: ls(s), f"{self.root}/{s}") for s in stages}

    def has_files(self, key: Key) -> bool:
        """True when anything was written under ``key`` (committed or not)."""
        return bool(self._retry(lambda: self.fs.exists(self._path(key)), self.url(key)))

    def get_table(self, key: Key, name: str, columns: list[str] | None = None) -> pa.Table:
        data = self._read(self._path(key, name), self.url(key, name))
        return pq.read_table(io.BytesIO(data), columns=columns)

    def get_array(self, key: Key, name: str) -> np.ndarray:
        data = self._read(self._path(key, name), self.url(key, name))
        return np.load(io.BytesIO(data), allow_pickle=False)

    def get_arrays(self, key: Key, name: str) -> dict[str, np.ndarray]:
        data = self._read(self._path(key, name), self.url(key, name))
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    # ---- listing and removal (gc) -------------------------------------------------------

    def artifacts(self, only: str | None = None) -> list[tuple[str, str, bool]]:
        """Every artifact folder (of stage ``only``, when given) as (stage, id, committed)."""

        def walk() -> list[tuple[str, str, bool]]:
            if not self.fs.exists(self._base):
                return []
            found = []
            for stage_dir in self.fs.ls(self._base, detail=False):
                stage = stage_dir.rstrip("/").rsplit("/", 1)[-1]
                if stage.startswith("_") or (only and stage != only):
                    continue
                if not self.fs.isdir(stage_dir):
                    continue
                for key_dir in self.fs.ls(stage_dir, detail=False):
                    kid = key_dir.rstrip("/").rsplit("/", 1)[-1]
                    if kid.startswith("_"):
                        continue
                    found.append((stage, kid, self.fs.exists(f"{key_dir.rstrip('/')}/{DONE}")))
            return sorted(found)

        return self._retry(walk, self.root)

    def manifests(self, stage: str) -> list[tuple[str, dict[str, Any]]]:
        """(id, manifest) of every committed artifact of ``stage``; for reduces, whose
        artifacts are few (one per configuration tried)."""
        found = []
        for st, kid, done in self.artifacts(stage):
            m = self.manifest(Key(st, kid, {})) if done else None
            if m is not None:
                found.append((kid, m))
        return found

    def size(self, stage: str, kid: str) -> int:
        path = f"{self._base}/{stage}/{kid}"
        return int(self._retry(lambda: self.fs.du(path), f"{self.root}/{stage}/{kid}"))

    def remove(self, stage: str, kid: str) -> None:
        path = f"{self._base}/{stage}/{kid}"
        self._retry(lambda: self.fs.rm(path, recursive=True), f"{self.root}/{stage}/{kid}")
