"""Corpus shards: discovery and reading into a normalised Arrow table.

A shard is one Parquet or JSON Lines file (plain, .gz or .zst) under a local
folder, a glob, or an s3:// URL; every other file found there is passed over and
listed with the reason (``discover``). Reading a shard yields the accepted documents
(columns ``row, id, domain, text``) and the rejected rows with their reason; every
row of the file lands in exactly one of the two.
"""

from __future__ import annotations

import heapq
import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from samplemix.config import Config, CorpusConfig
from samplemix.io.store import transient

PARQUET = (".parquet", ".pq")
JSONL = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".ndjson")
# Suffixes that name a compression: the extension of "x.csv.gz" is ".csv.gz", not ".gz".
_COMPRESSION = (".gz", ".zst", ".bz2", ".xz", ".zip")
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


@dataclass(frozen=True)
class PassedOver:
    """A file (or a folder a glob matched) under ``corpus.input`` that discovery did
    not take as a shard. ``path`` is its URL (as ``Shard.path``), ``reason`` says why
    and what to do."""

    path: str
    reason: str


@dataclass(frozen=True)
class Discovery:
    """What ``discover`` found: the shards, sorted by shard id, and the other files,
    sorted by path."""

    shards: list[Shard]
    passed_over: list[PassedOver]


@dataclass
class ShardDocs:
    """One shard read: ``read`` = docs + rejects rows. A shard skipped whole
    (``skipped``, under ``corpus.on_bad_shard: skip``) has read = 0, no documents and
    one rejects record for the file (row −1) that is not a row of it."""

    docs: pa.Table  # DOCS_SCHEMA
    rejects: pa.Table  # REJECTS_SCHEMA
    read: int  # rows read from the file (Parquet rows; JSONL non-blank lines)
    skipped: bool = False


def _is_shard(path: str) -> bool:
    return path.lower().endswith(PARQUET + JSONL)


def _extension(path: str) -> str:
    """The file's extension, with the one before a compression suffix ("" if none)."""
    stem, ext = posixpath.splitext(posixpath.basename(path).lower())
    if ext in _COMPRESSION:
        ext = posixpath.splitext(stem)[1] + ext
    return ext


def _ancestors(path: str) -> Iterator[str]:
    """Every folder above ``path``, nearest first."""
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        yield path


def _not_a_shard(path: str) -> str:
    ext = _extension(path)
    what = f"extension {ext}" if ext else "no extension"
    return f"not a shard: {what}; expected {', '.join(PARQUET + JSONL)}"


def _fingerprint(info: dict) -> str:
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}:{stamp}"


def discover(cfg: CorpusConfig, options: dict[str, Any] | None = None) -> Discovery:
    """The shard files under ``cfg.input`` (a folder, a glob, or one file), sorted by
    shard id, and every other file found there with the reason it was passed over,
    and the folders a glob matched without matching files in them.
    ``options`` are fsspec's (``StorageConfig.fsspec_options``).

    Raises CorpusError when the input does not exist or holds no shard; the message
    names the first path passed over, with its reason.
    """
    fs, root = fsspec.core.url_to_fs(cfg.input, **(options or {}))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    folders: list[str] = []  # matched by a glob whose files it does not match
    if any(c in root for c in "*?["):
        found = fs.glob(root, detail=True)
        paths = [p for p, info in found.items() if info.get("type") != "directory"]
        base = root[: min(root.index(c) for c in "*?[" if c in root)].rsplit("/", 1)[0]
        reached = {a for p in paths for a in _ancestors(p)}
        folders = [p for p, info in found.items() if info.get("type") == "directory"]
        folders = [p for p in folders if p not in reached]
    elif fs.isdir(root):
        paths = fs.find(root)
        base = root
    elif fs.exists(root):
        paths, base = [root], posixpath.dirname(root)
    else:
        raise CorpusError(f"corpus.input {cfg.input!r} does not exist")

    def url(p: str) -> str:
        return p if protocol in ("file", "local") else f"{protocol}://{p}"

    folder = (
        "a folder matched by the glob; the files in it are not read: make the pattern "
        "reach them (e.g. end it in /*/* rather than /*)"
    )
    passed = sorted(
        [PassedOver(url(p), _not_a_shard(p)) for p in paths if not _is_shard(p)]
        + [PassedOver(url(p), folder) for p in folders],
        key=lambda f: f.path,
    )
    paths = [p for p in paths if _is_shard(p)]
    if not paths:
        seen = (
            f"; passed over {len(passed)}, e.g. {passed[0].path}: {passed[0].reason}"
            if passed
            else ""
        )
        raise CorpusError(
            f"no shards under corpus.input {cfg.input!r}: expected files ending in "
            f"{', '.join(PARQUET + JSONL)}{seen}"
        )
    shards = []
    for p in paths:
        rel = posixpath.relpath(p, base) if base else p
        parent = posixpath.basename(posixpath.dirname(p)) or "default"
        shards.append(Shard(url(p), rel, parent, _fingerprint(fs.info(p))))
    # Shard order fixes the order of every reduce's inputs (float sums, which of two
    # documents sharing an id comes first); a listing's order must not.
    return Discovery(sorted(shards, key=lambda s: s.shard_id), passed)


def discover_shards(cfg: CorpusConfig, options: dict[str, Any] | None = None) -> list[Shard]:
    """``discover(cfg, options).shards``: the shards alone, for callers that do not
    report the files passed over. Raises CorpusError as ``discover`` does."""
    return discover(cfg, options).shards


def passed_over_lines(passed: list[PassedOver], shown: int = 20) -> list[str]:
    """Log lines for the files discovery passed over: a count, then per reason the
    files (at most ``shown`` of each, then how many more). Empty when there are none."""
    if not passed:
        return []
    by_reason: dict[str, list[str]] = {}
    for f in passed:
        by_reason.setdefault(f.reason, []).append(f.path)
    lines = [f"{len(passed)} paths under corpus.input are not shards and were not read:"]
    for reason, paths in by_reason.items():
        more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
        lines.append(f"  {', '.join(paths[:shown])}{more}: {reason}")
    return lines


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


def _jsonl_lines(fs, path: str) -> list[bytes]:  # noqa: ANN001
    """The file's lines, decompressed by its suffix, a leading UTF-8 BOM removed."""
    zst = path.lower().endswith(".zst")
    with fs.open(path, "rb", compression=None if zst else "infer") as f:
        data = f.read()
    data = _unzstd(data) if zst else data
    return data.removeprefix(b"\xef\xbb\xbf").split(b"\n")  # a UTF-8 BOM is not text


def count_rows(shard: Shard, options: dict[str, Any] | None = None) -> int | None:
    """The rows ``read_shard`` counts in the file, without reading them: a Parquet
    file's footer (num_rows), a JSONL file's non-blank lines once decompressed. None
    when the file cannot tell (no readable footer, data that does not decompress).
    For shards ``read_shard`` refused; transient (network) errors propagate."""
    fs, path = fsspec.core.url_to_fs(shard.path, **(options or {}))
    try:
        if shard.path.lower().endswith(PARQUET):
            with fs.open(path, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows
        return sum(1 for line in _jsonl_lines(fs, path) if line.strip())
    except Exception as e:  # noqa: BLE001 - a file that cannot tell its rows: None
        if transient(e):
            raise
        return None


def _jsonl_records(fs, path: str, shard: Shard, cfg: CorpusConfig) -> list[tuple]:  # noqa: ANN001
    """(row, text, id, domain, reject_reason) per non-blank line; row = 0-based line number."""
    lines = _jsonl_lines(fs, path)
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


def read_docs(shard: Shard, cfg: Config) -> ShardDocs:
    """The shard's documents; an unreadable shard under ``on_bad_shard: skip`` is
    ``skipped``: no rows read, no documents, and one rejects record for the file (row
    −1, reason ``unreadable_shard``, the error as detail)."""
    try:
        return read_shard(shard, cfg.corpus, cfg.storage.fsspec_options(shard.path))
    except CorpusError as e:
        if cfg.corpus.on_bad_shard == "error":
            raise
        rejects = pa.table(
            {
                "shard": [shard.shard_id],
                "row": [-1],
                "reason": ["unreadable_shard"],
                "detail": [str(e)],
            },
            schema=REJECTS_SCHEMA,
        )
        return ShardDocs(DOCS_SCHEMA.empty_table(), rejects, read=0, skipped=True)


def sample_texts(spec: str, cfg: Config, limit: int, seed: int = 0) -> list[str]:
    """Up to ``limit`` document texts from ``spec``, drawn by a hash of their ids (the
    same documents for the same seed, however the corpus is sharded), in draw order.

    ``spec``: ``domains:a,b`` = the documents of those domains under
    ``cfg.corpus.input``; ``all`` = every document there; else a folder, glob or file of
    shards read with ``cfg.corpus``'s columns. Raises CorpusError when it holds no
    document (naming the spec)."""
    from samplemix.mixing.weights import doc_uniforms  # not at import: corpus is low-level

    domains: set[str] | None = None
    corpus = cfg.corpus
    if spec.startswith("domains:"):
        domains = {d.strip() for d in spec.removeprefix("domains:").split(",") if d.strip()}
    elif spec != "all":
        corpus = corpus.model_copy(update={"input": spec})
    read_cfg = cfg.model_copy(update={"corpus": corpus})
    kept: list[tuple[float, str]] = []  # the `limit` documents with the smallest uniforms
    for shard in discover_shards(corpus, cfg.storage.fsspec_options(corpus.input)):
        docs = read_docs(shard, read_cfg).docs
        if domains is not None:
            docs = docs.filter(pc.is_in(docs.column("domain"), pa.array(sorted(domains))))
        u = doc_uniforms(docs.column("id").to_pylist(), seed, "sample_texts")
        kept += zip(u.tolist(), docs.column("text").to_pylist(), strict=True)
        kept = heapq.nsmallest(limit, kept, key=lambda d: d[0])
    if not kept:
        raise CorpusError(f"no documents for {spec!r} under {corpus.input}")
    return [text for _, text in kept]
