"""LLM annotation of the seven-dimension quality rubric (SampleMix, method.md §1.1).

An LLM rates a *sample* of documents on seven dimensions; those labels train the
quality evaluator that then scores the whole corpus. This module does the annotation:

* :data:`DIMENSIONS` — the rubric: short key -> allowed integer scores. Total 0..9.
* :func:`load_prompt` — a prompt template, ``samplemix/scoring/prompts/<name>.md`` or any file.
  Its *version* is the file name stem (``rubric_v1``) and its *hash* the SHA-256 of the
  file's bytes; both are part of the cache key, so editing a template without renaming
  it still invalidates cached answers. ``{document}`` in the template is replaced by the
  text with :meth:`str.replace` (not :meth:`str.format`), so the template may contain
  JSON braces freely.
* :func:`parse_scores` — strict parsing of the model's answer (see its docstring).
* :class:`Annotator` — sends each document to an OpenAI-compatible
  ``POST {base_url}/chat/completions`` endpoint (vLLM, llama.cpp, SGLang, OpenAI, ...),
  retries, rate-limits, caches, and returns one label row per document.
* :func:`write_labels` — the labels as Parquet (fsspec paths).
* :func:`stratified_sample` — which documents to annotate, spread over domains and
  length quantiles.

Retries. A document gets at most ``1 + max_retries`` requests. Retried: a malformed
answer (immediately — the model may answer differently, e.g. at temperature > 0 or on
a server that batches non-deterministically), HTTP 408/429/5xx and connection errors
(after ``backoff_s * 2**i`` seconds, capped at ``max_backoff_s``; a 429's
``Retry-After`` replaces the backoff). When the requests run out:

* the last problem was a malformed answer -> the document becomes a *failure row*
  (scores null, ``error`` says why); the run goes on, and the failure is not cached, so
  a rerun asks again;
* the last problem was HTTP 408/429/5xx or a connection error -> :class:`AnnotatorError`
  (the endpoint is down or overloaded; every further document would fail the same way).
  Answers obtained so far are in the cache, so a rerun resumes where it stopped.

Any other non-2xx status (400, 401, 404, ...) raises :class:`AnnotatorError` at once,
naming the status and the endpoint: it is a configuration error, not bad luck.

Cache. With ``cache_dir`` set, each successful answer is stored as one JSON file
``{cache_dir}/{key[:2]}/{key}.json``, written to a temporary file and renamed, so a run
killed mid-write leaves no partial entry and concurrent writers of one key are safe.
``key = sha256(sha256(text as sent) | prompt version | template sha256 | model)``;
"text as sent" is the text after truncation, so changing ``max_doc_chars`` changes the
key only for documents it actually cuts. Temperature and ``max_tokens`` are not in the
key: a cached label is reused whatever they are now. An unreadable or invalid cache file
counts as a miss and is overwritten.

Truncation. Documents longer than ``max_doc_chars`` characters are cut to their first
``max_doc_chars`` characters and :data:`TRUNCATION_MARKER` is appended; the rubric tells
the model not to mark coherence down for that cut. The label is assumed to hold for the
whole document.

The API key is resolved when :meth:`Annotator.annotate` is called — ``api_key`` from the
config, else ``$SAMPLEMIX_ANNOTATOR_API_KEY``, else ``$OPENAI_API_KEY``, else none (no
``Authorization`` header) — and is never logged, printed or written anywhere.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
import httpx
import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from samplemix.config import Config
from samplemix.io.store import parquet_bytes, put_bytes

log = logging.getLogger(__name__)

DIMENSIONS: dict[str, tuple[int, ...]] = {
    "clarity": (0, 1),  # Clarity of Expression and Accuracy
    "coherence": (0, 1),  # Completeness and Coherence
    "structure": (0, 1),  # Structure and Style
    "accuracy": (0, 1),  # Content Accuracy and Credibility
    "significance": (0, 1),  # Significance
    "knowledge": (0, 1, 2),  # Knowledge Richness
    "logic": (0, 1, 2),  # Logicality and Analytical Depth
}
MAX_TOTAL = sum(max(v) for v in DIMENSIONS.values())  # 9

API_KEY_ENV = ("SAMPLEMIX_ANNOTATOR_API_KEY", "OPENAI_API_KEY")
PLACEHOLDER = "{document}"
TRUNCATION_MARKER = "\n[... document truncated ...]"
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
# Statuses worth asking again besides every 5xx: request timeout, rate limit.
TRANSIENT_STATUS = frozenset({408, 429})

LABEL_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text_sha256", pa.string(), nullable=False),
        *(pa.field(k, pa.int8()) for k in DIMENSIONS),
        pa.field("total", pa.int16()),
        pa.field("label_model", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("attempts", pa.int16(), nullable=False),
        pa.field("error", pa.string()),
    ]
)
METADATA_KEY = b"samplemix.scoring.annotate"


class MalformedAnswer(ValueError):
    """The model's answer is not a valid rubric JSON object; the message says why."""


class AnnotatorError(RuntimeError):
    """The endpoint cannot be used (HTTP status, connection); names status and URL."""


# --------------------------------------------------------------------------- parsing

_FENCE = re.compile(r"^```[ \t]*(?:json)?[ \t]*\n(.*?)\n?[ \t]*```$", re.DOTALL | re.IGNORECASE)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads hook: a repeated key is ambiguous, so refuse it instead of keeping the last."""
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise MalformedAnswer(f"key {k!r} appears twice")
        seen[k] = v
    return seen


def check_scores(obj: object) -> dict[str, int]:
    """Validate a decoded rubric object; return ``{key: score}`` in :data:`DIMENSIONS` order.

    Exactly the seven keys; each value a JSON integer (``int``, not ``bool``, not
    ``float`` — ``1.0`` is refused too, because the prompt demands integers and an answer
    that ignores the format is not trusted) within that dimension's allowed values.
    Raises :class:`MalformedAnswer` listing every problem found.
    """
    if not isinstance(obj, dict):
        raise MalformedAnswer(f"answer is a JSON {type(obj).__name__}, not an object")
    problems: list[str] = []
    missing = [k for k in DIMENSIONS if k not in obj]
    extra = sorted(str(k) for k in obj if k not in DIMENSIONS)
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    for key, allowed in DIMENSIONS.items():
        if key not in obj:
            continue
        value = obj[key]
        if type(value) is not int:  # bool is a subclass of int: compare the exact type
            problems.append(f"{key}={value!r} is a {type(value).__name__}, not an integer")
        elif value not in allowed:
            problems.append(f"{key}={value} not in {set(allowed)}")
    if problems:
        raise MalformedAnswer("; ".join(problems))
    return {k: obj[k] for k in DIMENSIONS}


def parse_scores(answer: str) -> dict[str, int]:
    """Parse a model answer into ``{key: score}`` for the seven :data:`DIMENSIONS`.

    Accepted: a JSON object alone, surrounded by whitespace at most, or that object
    inside one Markdown code fence (```` ```json ```` or plain ```` ``` ````). Refused,
    with :class:`MalformedAnswer` naming the problem: prose before or after the object,
    invalid JSON, a non-object, duplicate keys, missing or unexpected keys, values that
    are not integers (booleans, floats including ``1.0``, strings) or outside the allowed
    values. Nothing is guessed or repaired: a retry is cheaper than a wrong label.
    """
    if not isinstance(answer, str):
        raise MalformedAnswer(f"answer is {type(answer).__name__}, not text")
    text = answer.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if not text.startswith("{"):
        raise MalformedAnswer(
            f"answer must be only a JSON object (optionally in a ```json fence); "
            f"it starts with {text[:40]!r}"
        )
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise MalformedAnswer(f"answer is not valid JSON ({e.msg} at char {e.pos})") from None
    return check_scores(obj)


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """A loaded template: ``version`` (file stem), ``template`` text, its ``sha256``."""

    version: str
    template: str
    sha256: str

    def render(self, document: str) -> str:
        """The template with every ``{document}`` replaced by ``document``."""
        return self.template.replace(PLACEHOLDER, document)


def load_prompt(spec: str | Path) -> Prompt:
    """Load a template by packaged name (``"rubric_v1"`` ->
    ``samplemix/scoring/prompts/rubric_v1.md``) or by path (anything with a path separator
    or a suffix, or an existing file).

    Raises ValueError for an unknown packaged name (listing the known ones) or a
    template without the ``{document}`` placeholder.
    """
    spec_s = str(spec)
    is_path = isinstance(spec, Path) or "/" in spec_s or os.sep in spec_s
    is_path = is_path or bool(Path(spec_s).suffix)
    path = Path(spec_s) if is_path or Path(spec_s).is_file() else PROMPTS_DIR / f"{spec_s}.md"
    if not path.is_file():
        known = sorted(p.stem for p in PROMPTS_DIR.glob("*.md"))
        raise ValueError(f"no prompt template {spec_s!r} ({path}); packaged prompts: {known}")
    data = path.read_bytes()
    template = data.decode("utf-8")
    if PLACEHOLDER not in template:
        raise ValueError(f"prompt template {path} has no {PLACEHOLDER} placeholder")
    return Prompt(version=path.stem, template=template, sha256=hashlib.sha256(data).hexdigest())


# --------------------------------------------------------------------------- config


class AnnotatorConfig(BaseModel):
    """Where and how to annotate. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(description="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(min_length=1, description="model name sent in each request")
    api_key: SecretStr | None = Field(
        default=None,
        description="bearer token; None: $SAMPLEMIX_ANNOTATOR_API_KEY, else $OPENAI_API_KEY, "
        "else no Authorization header (resolved at annotate time)",
    )
    prompt: str = Field(default="rubric_v1", description="packaged prompt name or template path")
    max_retries: int = Field(default=3, ge=0, le=100, description="requests per doc = 1 + this")
    requests_per_second: float | None = Field(
        default=5.0, gt=0, description="rate limit over all requests incl. retries; None: none"
    )
    concurrency: int = Field(default=1, ge=1, le=256, description="requests in flight at once")
    timeout_s: float = Field(default=120.0, gt=0, description="per-request timeout")
    temperature: float = Field(default=0.0, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1, description="sent only when set")
    max_doc_chars: int = Field(
        default=8000, ge=1, description="longer documents are cut to their first N characters"
    )
    cache_dir: Path | None = Field(default=None, description="answer cache folder; None: none")
    backoff_s: float = Field(default=1.0, ge=0, description="first backoff after 5xx/429/errors")
    max_backoff_s: float = Field(default=60.0, ge=0, description="cap on any backoff/Retry-After")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {v!r}")
        return v


def resolve_api_key(cfg: AnnotatorConfig) -> str | None:
    """The key to send: config, then the environment variables in :data:`API_KEY_ENV`.

    Empty or whitespace-only values count as unset."""
    if cfg.api_key is not None and cfg.api_key.get_secret_value().strip():
        return cfg.api_key.get_secret_value().strip()
    for name in API_KEY_ENV:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


# --------------------------------------------------------------------------- rate limit


class RateLimiter:
    """At most ``rate`` request starts per second: consecutive starts are at least
    ``1/rate`` s apart (no burst). Thread-safe: each caller reserves the next slot under
    a lock and sleeps outside it. ``rate=None`` never waits."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 0.0 if rate is None else 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Block until this caller may start a request."""
        if self._interval == 0.0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            time.sleep(start - now)


# --------------------------------------------------------------------------- cache


def sha256_text(text: str) -> str:
    """Hex SHA-256 of the UTF-8 bytes of ``text`` (``surrogatepass``: any str hashes)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def cache_key(sent_sha256: str, prompt: Prompt, model: str) -> str:
    """The answer cache key: hash of (sent text hash, prompt version, template hash, model)."""
    parts = [sent_sha256, prompt.version, prompt.sha256, model]
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


class AnswerCache:
    """One JSON file per key under ``root``; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, int] | None:
        """The cached scores, or None when absent, unreadable or invalid (= a miss)."""
        path = self._path(key)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            return check_scores(record["scores"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unusable cache entry %s: %s", path, e)
            return None

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Store ``record`` (must hold ``scores``) under ``key``, replacing any old entry."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# --------------------------------------------------------------------------- annotator


@dataclass
class _Outcome:
    """Result of asking about one document: scores or the reason it failed."""

    scores: dict[str, int] | None
    attempts: int
    error: str | None


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date), else None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _answer_content(response: httpx.Response) -> str:
    """``choices[0].message.content`` of a chat-completions response.

    A 200 without that shape is treated as a malformed answer (retried), not a crash."""
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise MalformedAnswer(
            f"response is not a chat completion with choices[0].message.content ({e!r})"
        ) from None
    if not isinstance(content, str):
        raise MalformedAnswer(f"choices[0].message.content is {type(content).__name__}")
    return content


class Annotator:
    """Annotates documents with the rubric through an OpenAI-compatible endpoint.

    Use as a context manager (or call :meth:`close`) to release the HTTP connections.
    """

    def __init__(self, cfg: AnnotatorConfig) -> None:
        self.cfg = cfg
        self.prompt = load_prompt(cfg.prompt)
        self.url = f"{cfg.base_url}/chat/completions"
        self.cache = AnswerCache(cfg.cache_dir) if cfg.cache_dir is not None else None
        self._limiter = RateLimiter(cfg.requests_per_second)
        self._client = httpx.Client(timeout=cfg.timeout_s)

    def __enter__(self) -> Annotator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()

    # -- public -------------------------------------------------------------------

    def annotate(self, docs: Sequence[tuple[str, str]]) -> pa.Table:
        """Label ``(id, text)`` pairs; one row per pair, in input order, schema
        :data:`LABEL_SCHEMA` (plus schema metadata with the template hash and settings).

        ``attempts`` = requests made for the row in this call (0 = served from the cache).
        A row whose answers stayed malformed has null scores and ``error`` set.
        Raises :class:`AnnotatorError` for an unusable endpoint (see the module docstring).
        """
        headers = {"Content-Type": "application/json"}
        key = resolve_api_key(self.cfg)
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"

        def one(doc: tuple[str, str]) -> dict[str, Any]:
            return self._annotate_one(doc[0], doc[1], headers)

        rows = _map(one, list(docs), self.cfg.concurrency)
        return self._table(rows)

    # -- one document -------------------------------------------------------------

    def _annotate_one(self, doc_id: str, text: str, headers: dict[str, str]) -> dict[str, Any]:
        sent = text if len(text) <= self.cfg.max_doc_chars else text[: self.cfg.max_doc_chars]
        if len(sent) < len(text):
            sent += TRUNCATION_MARKER
        key = cache_key(sha256_text(sent), self.prompt, self.cfg.model)
        outcome = None
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                outcome = _Outcome(cached, 0, None)
        if outcome is None:
            outcome = self._ask(self.prompt.render(sent), headers)
            if outcome.scores is not None and self.cache is not None:
                self.cache.put(key, self._cache_record(outcome.scores, sent))
        return {"id": doc_id, "text_sha256": sha256_text(text), "outcome": outcome}

    def _cache_record(self, scores: dict[str, int], sent: str) -> dict[str, Any]:
        # Provenance beside the scores, so a cache entry can be audited on its own.
        return {
            "scores": scores,
            "model": self.cfg.model,
            "prompt_version": self.prompt.version,
            "template_sha256": self.prompt.sha256,
            "sent_sha256": sha256_text(sent),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def _payload(self, content: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.cfg.temperature,
        }
        if self.cfg.max_tokens is not None:
            payload["max_tokens"] = self.cfg.max_tokens
        return payload

    def _backoff(self, retry: int) -> float:
        return min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2.0**retry)

    def _ask(self, content: str, headers: dict[str, str]) -> _Outcome:
        """Up to ``1 + max_retries`` requests until a valid answer (see module docstring)."""
        payload = self._payload(content)
        last: Exception | None = None
        delay = 0.0
        for attempt in range(1, self.cfg.max_retries + 2):
            if delay > 0:
                time.sleep(delay)
            delay = 0.0
            self._limiter.wait()
            try:
                response = self._client.post(self.url, json=payload, headers=headers)
            except httpx.TransportError as e:
                last = AnnotatorError(f"POST {self.url} failed: {type(e).__name__}: {e}")
                delay = self._backoff(attempt - 1)
                log.warning("%s (attempt %d; next in %.2f s)", last, attempt, delay)
                continue
            status = response.status_code
            if status in TRANSIENT_STATUS or status >= 500:
                last = AnnotatorError(f"POST {self.url} returned HTTP {status}")
                wait = _retry_after(response) if status == 429 else None
                delay = self._backoff(attempt - 1) if wait is None else wait
                delay = min(delay, self.cfg.max_backoff_s)
                log.warning("%s (attempt %d; next in %.2f s)", last, attempt, delay)
                continue
            if not 200 <= status < 300:
                raise AnnotatorError(
                    f"POST {self.url} returned HTTP {status} (not retried; check base_url, "
                    f"model and API key): {response.text[:300]}"
                )
            try:
                return _Outcome(parse_scores(_answer_content(response)), attempt, None)
            except MalformedAnswer as e:
                last = e
                log.info("malformed answer (attempt %d): %s", attempt, e)
        attempts = self.cfg.max_retries + 1
        if isinstance(last, MalformedAnswer):
            return _Outcome(None, attempts, f"malformed answer after {attempts} attempts: {last}")
        assert last is not None
        raise AnnotatorError(f"{last}; gave up after {attempts} attempts") from last

    # -- output -------------------------------------------------------------------

    def _table(self, rows: list[dict[str, Any]]) -> pa.Table:
        columns: dict[str, list[Any]] = {name: [] for name in LABEL_SCHEMA.names}
        for row in rows:
            out: _Outcome = row["outcome"]
            columns["id"].append(row["id"])
            columns["text_sha256"].append(row["text_sha256"])
            for k in DIMENSIONS:
                columns[k].append(None if out.scores is None else out.scores[k])
            columns["total"].append(None if out.scores is None else sum(out.scores.values()))
            columns["label_model"].append(self.cfg.model)
            columns["prompt_version"].append(self.prompt.version)
            columns["attempts"].append(out.attempts)
            columns["error"].append(out.error)
        meta = {
            "template_sha256": self.prompt.sha256,
            "temperature": self.cfg.temperature,
            "max_doc_chars": self.cfg.max_doc_chars,
        }
        schema = LABEL_SCHEMA.with_metadata({METADATA_KEY: json.dumps(meta).encode()})
        return pa.table(columns, schema=schema)


def _map(fn: Callable[[Any], Any], items: list[Any], workers: int) -> list[Any]:
    """``[fn(x) for x in items]``, on ``workers`` threads when > 1; order kept.

    The first exception propagates after queued items are cancelled (running ones
    finish, so their answers still reach the cache)."""
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    pool = ThreadPoolExecutor(max_workers=min(workers, len(items)))
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- labels I/O


def write_labels(table: pa.Table, path: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write a label table as one Parquet file (any fsspec URL: local, s3://, ...)."""
    _check_label_columns(table.schema, path)
    write_table(table, path, storage_options)


def write_table(table: pa.Table, path: str, storage_options: dict[str, Any] | None = None) -> None:
    """One Parquet file at ``path`` (local folders are created), written whole or not at all."""
    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    put_bytes(fs, p, parquet_bytes(table))


def _check_label_columns(schema: pa.Schema, path: str) -> None:
    missing = [n for n in LABEL_SCHEMA.names if n not in schema.names]
    if missing:
        raise ValueError(f"{path}: not a label table, missing columns {missing}")


# --------------------------------------------------------------------------- sampling


def _allocate(sizes: Sequence[int], n: int) -> list[int]:
    """Split ``n`` seats over groups of the given sizes (each >= 1, ``n <= sum(sizes)``).

    * ``n < len(sizes)``: one seat each to the ``n`` largest groups (ties: lower index).
    * otherwise, proportional with a floor of one: every group whose proportional share
      ``seats * size / pool`` is below 1 is fixed at one seat and removed; repeat on the
      remaining seats and groups until no share is below 1; then the remaining groups
      get ``floor(share)`` plus one more seat for the largest fractional parts
      (largest remainder / Hamilton; ties: larger group, then lower index). Exact
      integer arithmetic. No group gets more seats than its size (the seats-per-member
      ratio of the remaining groups only falls when small groups are fixed), and when
      every share is >= 1 this is plain largest-remainder apportionment.
    """
    k = len(sizes)
    if n < k:
        order = sorted(range(k), key=lambda i: (-sizes[i], i))
        chosen = set(order[:n])
        return [1 if i in chosen else 0 for i in range(k)]
    fixed: set[int] = set()
    while True:
        free = [i for i in range(k) if i not in fixed]
        seats = n - len(fixed)
        pool = sum(sizes[i] for i in free)
        small = [i for i in free if seats * sizes[i] < pool]
        if not small:
            break
        fixed.update(small)
    quota = [1 if i in fixed else 0 for i in range(k)]
    for i in free:
        quota[i] = seats * sizes[i] // pool
    left = seats - sum(quota[i] for i in free)
    order = sorted(free, key=lambda i: (-(seats * sizes[i] % pool), -sizes[i], i))
    for i in order[:left]:
        quota[i] += 1
    return quota


def _domain_rng(seed: int, domain: str) -> np.random.Generator:
    # Seeded by (seed, domain) so one domain's picks do not depend on the others.
    tag = int.from_bytes(hashlib.sha256(domain.encode("utf-8")).digest()[:8], "big")
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, tag]))


def stratified_sample(
    ids: Sequence[str],
    domains: Sequence[str],
    lengths: Sequence[float],
    n: int,
    seed: int = 0,
    bins: int = 4,
) -> list[int]:
    """Indices of ``n`` documents to annotate, spread over domains and lengths.

    Allocation rule:

    1. **Domains.** The ``n`` seats are split over the domains (sorted by name) by
       :func:`_allocate` on the domain sizes: proportional to size by largest remainder,
       with at least one document per domain when ``n >= number of domains`` (when
       fewer, the ``n`` largest domains get one each, ties by name).
    2. **Length bins.** Within a domain of size ``N_d`` with quota ``m``, documents are
       ranked by ``(length, id, index)`` and split into ``B = min(bins, m)`` quantile
       bins by rank: rank ``r`` goes to bin ``r * B // N_d`` (bin sizes differ by at most
       one). The ``m`` seats are split over the bins by :func:`_allocate`, so every bin
       gets at least one document.
    3. **Draw.** In each bin the seats are filled uniformly at random without
       replacement, from a generator seeded by ``(seed, domain)``.

    Deterministic for a seed; with unique ids the chosen *ids* also do not depend on the
    input order. ``n`` larger than the corpus returns every index. Returns sorted indices.
    """
    total = len(ids)
    if len(domains) != total or len(lengths) != total:
        raise ValueError(
            f"ids, domains and lengths differ in length: {total}, {len(domains)}, {len(lengths)}"
        )
    if n < 0 or bins < 1:
        raise ValueError(f"need n >= 0 and bins >= 1, got n={n}, bins={bins}")
    if n >= total:
        return list(range(total))
    members: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
        members.setdefault(str(d), []).append(i)
    names = sorted(members)
    quotas = _allocate([len(members[d]) for d in names], n)
    chosen: list[int] = []
    for domain, quota in zip(names, quotas, strict=True):
        if quota:
            chosen += _sample_domain(members[domain], ids, lengths, quota, bins, seed, domain)
    return sorted(chosen)


def _sample_domain(
    idx: list[int],
    ids: Sequence[str],
    lengths: Sequence[float],
    quota: int,
    bins: int,
    seed: int,
    domain: str,
) -> list[int]:
    """Steps 2 and 3 of :func:`stratified_sample` for one domain's indices."""
    ranked = sorted(idx, key=lambda i: (float(lengths[i]), str(ids[i]), i))
    n_bins = min(bins, quota)
    groups: list[list[int]] = [[] for _ in range(n_bins)]
    for rank, i in enumerate(ranked):
        groups[rank * n_bins // len(ranked)].append(i)
    rng = _domain_rng(seed, domain)
    picked: list[int] = []
    for group, k in zip(groups, _allocate([len(g) for g in groups], quota), strict=True):
        picked += [group[j] for j in rng.choice(len(group), size=k, replace=False)]
    return picked


def corpus_sample(cfg: Config, n: int, seed: int = 0) -> pa.Table:
    """``n`` accepted documents of ``cfg.corpus`` chosen by ``stratified_sample`` over
    domains and lengths (characters): a table id, domain, text. Reads every shard once
    (point ``corpus.input`` at a slice for a large corpus)."""
    from samplemix.io.corpus import discover_shards, read_docs

    shards = discover_shards(cfg.corpus, cfg.storage.fsspec_options(cfg.corpus.input))
    docs = pa.concat_tables([read_docs(s, cfg).docs for s in shards])
    texts = docs.column("text").to_pylist()
    picked = stratified_sample(
        docs.column("id").to_pylist(),
        docs.column("domain").to_pylist(),
        [len(t) for t in texts],
        n,
        seed,
    )
    return docs.select(["id", "domain", "text"]).take(pa.array(picked, pa.int64()))
