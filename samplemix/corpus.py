"""Corpus shards: discovery and reading into a normalised Arrow table.

A shard is one Parquet or JSON Lines file (plain, .gz or .zst) under a local
folder, a glob, or an s3:// URL. Reading a shard yields the accepted documents
(columns ``row, id, domain, text``) and the rejected rows with their reason; every
row of the file lands in exactly one of the two.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from samplemix.config import CorpusConfig
from samplemix.store import transient

PARQUET = (".parquet", ".pq")
JSONL = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".ndjson")
DOCS_SCHEMA = pa.schema(
    [("row", pa.int64()), ("id", pa.string()), ("domain", pa.string()), ("text", pa.string())]
)
REJECTS_SCHEMA = pa.schema(
    [("shard", pa.string()), ("row", pa.int64()), ("reason", pa.string()), ("detail", pa.string())]
)


class CorpusError(ValueError):
    """A corpus that cannot be read as configured; the message names the file and the fix."""


@dataclass(frozen=True)
class Shard:
    """One input file. ``shard_id`` is its path relative to the corpus root (stable
    across machines and used in ids and cache keys); ``fingerprint`` changes when the
    file does (size + mtime or ETag)."""

    path: str
    shard_id: str
    domain: str
    fingerprint: str


@dataclass
class ShardDocs:
    docs: pa.Table  # DOCS_SCHEMA
    rejects: pa.Table  # REJECTS_SCHEMA
    read: int  # rows in the file (Parquet rows; JSONL non-blank lines) = docs + rejects


def _is_shard(path: str) -> bool:
    return path.lower().endswith(PARQUET + JSONL)


def _fingerprint(info: dict) -> str:
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}:{stamp}"


def discover_shards(cfg: CorpusConfig, options: dict[str, Any] | None = None) -> list[Shard]:
    """All shard files under ``cfg.input`` (a folder, a glob, or one file), sorted by
    shard id.
    ``options`` are fsspec's (``StorageConfig.fsspec_options``).

    Raises CorpusError when nothing matches.
    """
    fs, root = fsspec.core.url_to_fs(cfg.input, **(options or {}))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if any(c in root for c in "*?["):
        paths = fs.glob(root)
        base = root[: min(root.index(c) for c in "*?[" if c in root)].rsplit("/", 1)[0]
    elif fs.isdir(root):
        paths = fs.find(root)
        base = root
    elif fs.exists(root):
        paths, base = [root], posixpath.dirname(root)
    else:
        raise CorpusError(f"corpus.input {cfg.input!r} does not exist")
    paths = [p for p in paths if _is_shard(p)]
    if not paths:
        raise CorpusError(
            f"no shards under corpus.input {cfg.input!r}: expected files ending in "
            f"{', '.join(PARQUET + JSONL)}"
        )
    shards = []
    for p in paths:
        rel = posixpath.relpath(p, base) if base else p
        parent = posixpath.basename(posixpath.dirname(p)) or "default"
        url = p if protocol in ("file", "local") else f"{protocol}://{p}"
        shards.append(Shard(url, rel, parent, _fingerprint(fs.info(p))))
    # Shard order fixes the order of every reduce's inputs (float sums, which of two
    # documents sharing an id comes first); a listing's order must not.
    return sorted(shards, key=lambda s: s.shard_id)


def read_shard(shard: Shard, cfg: CorpusConfig, options: dict[str, Any] | None = None) -> ShardDocs:
    """Read one shard into accepted documents and counted rejects.

    Raises CorpusError if the file as a whole cannot be read (corrupt, missing text
    column); row-level problems become rejects with reasons ``missing_text``,
    ``empty_text``, ``not_text``, ``non_utf8``, ``invalid_json``, ``not_object``.
    """
    fs, path = fsspec.core.url_to_fs(shard.path, **(options or {}))
    try:
        if shard.path.lower().endswith(PARQUET):
            records = _parquet_records(fs, path, shard, cfg)
        else:
            records = _jsonl_records(fs, path, shard, cfg)
        return _normalise(records, shard, cfg)
    except CorpusError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear message
        if transient(e):
            raise  # the network, not the file: the task is retried, nothing is skipped
        raise CorpusError(
            f"cannot read shard {shard.path}: {type(e).__name__}: {e}. Fix or remove the file, "
            "or set corpus.on_bad_shard: skip to skip unreadable shards (they are reported)."
        ) from e


def _missing_column(shard: Shard, column: str, present: list[str]) -> CorpusError:
    return CorpusError(
        f"shard {shard.path} has no text column {column!r} (columns: {present}); "
        "set corpus.text_column to the column that holds the text"
    )


def _parquet_records(fs, path: str, shard: Shard, cfg: CorpusConfig) -> list[tuple]:  # noqa: ANN001
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    names = table.column_names
    if cfg.text_column not in names:
        raise _missing_column(shard, cfg.text_column, names)
    texts = table.column(cfg.text_column).to_pylist()
    ids = table.column(cfg.id_column).to_pylist() if cfg.id_column in names else None
    domains = table.column(cfg.domain_column).to_pylist() if cfg.domain_column in names else None
    return [
        (row, texts[row], ids[row] if ids else None, domains[row] if domains else None, None)
        for row in range(table.num_rows)
    ]


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _unzstd(data: bytes) -> bytes:
    """Decompress every zstd frame in ``data``; a truncated frame raises EOFError (the
    streaming reader fsspec uses returns what it has without complaint, losing rows)."""
    import zstandard

    out = []
    while data:
        d = zstandard.ZstdDecompressor().decompressobj()
        out.append(d.decompress(data))
        if not d.eof:
            raise EOFError("zstd data ends before the end of its frame (truncated file?)")
        data = d.unused_data
    return b"".join(out)


def _jsonl_records(fs, path: str, shard: Shard, cfg: CorpusConfig) -> list[tuple]:  # noqa: ANN001
    """(row, text, id, domain, reject_reason) per non-blank line; row = 0-based line number."""
    zst = path.lower().endswith(".zst")
    with fs.open(path, "rb", compression=None if zst else "infer") as f:
        data = f.read()
    data = _unzstd(data) if zst else data
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")  # a UTF-8 BOM is not text
    records: list[tuple] = []
    keys_seen: set[str] = set()
    for row, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            records.append((row, None, None, None, "non_utf8"))
            continue
        except json.JSONDecodeError as e:
            records.append((row, None, None, None, f"invalid_json: {e.msg}"))
            continue
        if not isinstance(obj, dict):
            records.append((row, None, None, None, "not_object"))
            continue
        if _SURROGATE_ESCAPE.search(raw):  # "\ud800" decodes to a str Arrow cannot store
            try:
                json.dumps(obj, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                records.append((row, None, None, None, "non_utf8: lone surrogate \\u escape"))
                continue
        keys_seen.update(obj)
        records.append(
            (
                row,
                obj.get(cfg.text_column),
                obj.get(cfg.id_column or ""),
                obj.get(cfg.domain_column or ""),
                None,
            )
        )
    if keys_seen and cfg.text_column not in keys_seen:
        raise _missing_column(shard, cfg.text_column, sorted(keys_seen))
    return records


def _normalise(records: list[tuple], shard: Shard, cfg: CorpusConfig) -> ShardDocs:
    rows, ids, domains, texts = [], [], [], []
    rejects: dict[str, list] = {"shard": [], "row": [], "reason": [], "detail": []}

    def reject(row: int, reason: str, detail: str = "") -> None:
        rejects["shard"].append(shard.shard_id)
        rejects["row"].append(row)
        rejects["reason"].append(reason.split(":")[0])
        rejects["detail"].append(detail or reason)

    for row, text, doc_id, domain, reason in records:
        if reason is not None:
            reject(row, reason)
            continue
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                reject(row, "non_utf8", "text is not valid UTF-8")
                continue
        if text is None:
            reject(row, "missing_text", f"no value in column {cfg.text_column!r}")
        elif not isinstance(text, str):
            reject(row, "not_text", f"{cfg.text_column!r} holds {type(text).__name__}, not text")
        elif not text.strip():
            reject(row, "empty_text", "text is empty or whitespace")
        else:
            rows.append(row)
            ids.append(str(doc_id) if doc_id is not None else f"{shard.shard_id}:{row}")
            domains.append(str(domain) if domain not in (None, "") else shard.domain)
            texts.append(text)
    docs = pa.table([rows, ids, domains, texts], schema=DOCS_SCHEMA)
    return ShardDocs(docs, pa.table(rejects, schema=REJECTS_SCHEMA), len(records))
