"""The artifact store: ``{root}/{stage}/{key}/{name}`` over fsspec (local or s3://).

An artifact is a folder of files plus ``_done.json`` written last; only artifacts
with that marker are trusted, so a run killed mid-write leaves nothing a rerun would
reuse. Keys hash exactly what determines an artifact (see ``artifact_key``).
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DONE = "_done.json"


def artifact_key(stage: str, version: str, **parts: Any) -> str:
    """A 16-hex-digit hash of the stage, its logic version and everything it reads."""
    blob = json.dumps({"stage": stage, "version": version, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Store:
    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self._base = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self._local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    def _path(self, stage: str, key: str, name: str = "") -> str:
        return "/".join(p for p in (self._base, stage, key, name) if p)

    def _put(self, path: str, data: bytes) -> None:
        if self._local:
            # rename is atomic on one filesystem; S3 PUTs are atomic already.
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        else:
            with self.fs.open(path, "wb") as f:
                f.write(data)

    def put_table(self, stage: str, key: str, name: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self._put(self._path(stage, key, name), buf.getvalue())

    def put_array(self, stage: str, key: str, name: str, array: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        self._put(self._path(stage, key, name), buf.getvalue())

    def put_arrays(self, stage: str, key: str, name: str, **arrays: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self._put(self._path(stage, key, name), buf.getvalue())

    def commit(self, stage: str, key: str, summary: dict[str, Any]) -> dict[str, Any]:
        """Mark the artifact complete; ``summary`` (JSON-able) is what a cache hit returns."""
        self._put(self._path(stage, key, DONE), json.dumps(summary).encode())
        return summary

    def summary(self, stage: str, key: str) -> dict[str, Any] | None:
        """The committed summary, or None when the artifact is absent or incomplete."""
        try:
            with self.fs.open(self._path(stage, key, DONE), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def get_table(
        self, stage: str, key: str, name: str, columns: list[str] | None = None
    ) -> pa.Table:
        with self.fs.open(self._path(stage, key, name), "rb") as f:
            return pq.read_table(f, columns=columns)

    def get_array(self, stage: str, key: str, name: str) -> np.ndarray:
        with self.fs.open(self._path(stage, key, name), "rb") as f:
            return np.load(io.BytesIO(f.read()), allow_pickle=False)

    def get_arrays(self, stage: str, key: str, name: str) -> dict[str, np.ndarray]:
        with self.fs.open(self._path(stage, key, name), "rb") as f:
            with np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
