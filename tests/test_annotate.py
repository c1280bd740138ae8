"""samplemix.scoring.annotate against a real chat-completions server on 127.0.0.1.

The server (a ThreadingHTTPServer in a thread) scores each document from simple text
statistics (:func:`expected_scores`), so the right labels are computable here, and can
be told to misbehave for the first k requests about a document.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from samplemix.scoring.annotate import (
    DIMENSIONS,
    LABEL_SCHEMA,
    MAX_TOTAL,
    TRUNCATION_MARKER,
    AnnotatorConfig,
    AnnotatorError,
    MalformedAnswer,
    _allocate,
    load_prompt,
    parse_scores,
    sha256_text,
    stratified_sample,
    write_labels,
)
from samplemix.scoring.annotate import Annotator as _Annotator

# --------------------------------------------------------------------------- fake server


def expected_scores(text: str) -> dict[str, int]:
    """The rubric the fake server answers for ``text`` (deterministic text statistics)."""
    words = text.split()
    return {
        "clarity": int(len(words) % 2 == 0),
        "coherence": int(text.rstrip().endswith(".")),
        "structure": int("\n" in text),
        "accuracy": int(any(c.isdigit() for c in text)),
        "significance": int(len(text) > 40),
        "knowledge": len(words) % 3,
        "logic": min(2, text.count("because")),
    }


def malformed(kind: str, scores: dict[str, int]) -> str | dict[str, Any]:
    """A bad answer of the given kind (str: message content; dict: whole response body)."""
    if kind == "missing_key":
        return json.dumps({k: v for k, v in scores.items() if k != "logic"})
    if kind == "out_of_range":
        return json.dumps({**scores, "clarity": 2})
    if kind == "prose":
        return "Sure! Here are the scores: " + json.dumps(scores)
    if kind == "not_json":
        return "{clarity: 1, coherence: 1}"
    if kind == "float":
        return json.dumps({**scores, "knowledge": 1.5})
    if kind == "bool":
        return json.dumps({**scores, "clarity": True})
    if kind == "no_choices":
        return {"object": "chat.completion", "choices": []}
    raise AssertionError(kind)


def extract_document(prompt: str) -> str:
    start = prompt.index("<document>\n") + len("<document>\n")
    return prompt[start : prompt.rindex("\n</document>")]


class ChatServer(ThreadingHTTPServer):
    """Chat-completions endpoint with request counting and scripted faults."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests = 0
        self.auth: list[str | None] = []
        self.documents: list[str] = []
        self.models: list[str] = []
        self.per_doc: Counter[str] = Counter()
        # document text -> (fault kind, number of first requests that get the fault)
        self.faults: dict[str, tuple[str, int]] = {}
        self.always_status: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, *args: object) -> None:  # keep pytest output quiet
        pass

    def _send(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": "not found"})
            return
        doc = extract_document(body["messages"][0]["content"])
        with srv.lock:
            srv.requests += 1
            srv.auth.append(self.headers.get("Authorization"))
            srv.documents.append(doc)
            srv.models.append(body["model"])
            srv.per_doc[doc] += 1
            nth = srv.per_doc[doc]
        if srv.always_status is not None:
            self._send(srv.always_status, {"error": {"message": "nope"}})
            return
        scores = expected_scores(doc)
        kind, k = srv.faults.get(doc, ("", 0))
        if nth <= k and kind == "429":
            self._send(429, {"error": "slow down"}, {"Retry-After": "0"})
            return
        if nth <= k and kind == "500":
            self._send(500, {"error": "boom"})
            return
        content: str | dict[str, Any] = json.dumps(scores)
        if nth <= k:
            content = malformed(kind, scores)
        if isinstance(content, dict):
            self._send(200, content)
            return
        message = {"role": "assistant", "content": content}
        self._send(200, {"object": "chat.completion", "choices": [{"message": message}]})


@pytest.fixture
def server() -> Iterator[ChatServer]:
    srv = ChatServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def _no_env_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAMPLEMIX_ANNOTATOR_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def make_cfg(base_url: str, tmp_path: Path, **kw: Any) -> AnnotatorConfig:
    """Fast defaults: no rate limit, no backoff, a cache under tmp_path."""
    base: dict[str, Any] = {
        "base_url": base_url,
        "model": "test-model",
        "requests_per_second": None,
        "backoff_s": 0.0,
        "max_backoff_s": 1.0,
        "cache_dir": tmp_path / "cache",
    }
    return AnnotatorConfig(**{**base, **kw})


def annotate(cfg: AnnotatorConfig, docs: list[tuple[str, str]]) -> pa.Table:
    with _Annotator(cfg) as ann:
        return ann.annotate(docs)


DOCS = [
    ("a", "The sky is blue because of Rayleigh scattering, see 1871."),
    ("b", "short text"),
    ("c", "Line one.\nLine two because reasons because more reasons."),
    ("d", "Numbers 1 2 3 and words without end"),
    ("e", ""),
]


def scores_of(table: pa.Table, i: int) -> dict[str, int]:
    return {k: table.column(k)[i].as_py() for k in DIMENSIONS}


# --------------------------------------------------------------------------- annotator


def test_labels_match_the_server(server: ChatServer, tmp_path: Path) -> None:
    table = annotate(make_cfg(server.base_url, tmp_path), DOCS)
    assert table.schema.equals(LABEL_SCHEMA)  # equals() ignores the metadata
    assert table.column("id").to_pylist() == [d for d, _ in DOCS]
    for i, (_, text) in enumerate(DOCS):
        want = expected_scores(text)
        assert scores_of(table, i) == want
        assert table.column("total")[i].as_py() == sum(want.values())
        assert table.column("text_sha256")[i].as_py() == sha256_text(text)
    assert table.column("attempts").to_pylist() == [1] * len(DOCS)
    assert table.column("error").null_count == len(DOCS)
    assert set(table.column("label_model").to_pylist()) == {"test-model"}
    assert set(table.column("prompt_version").to_pylist()) == {"rubric_v1"}
    assert server.requests == len(DOCS)
    meta = json.loads(table.schema.metadata[b"samplemix.scoring.annotate"])
    assert meta["template_sha256"] == load_prompt("rubric_v1").sha256


@pytest.mark.parametrize(
    "kind", ["missing_key", "out_of_range", "prose", "not_json", "float", "bool", "no_choices"]
)
def test_malformed_answers_are_retried(server: ChatServer, tmp_path: Path, kind: str) -> None:
    server.faults[DOCS[0][1]] = (kind, 2)
    table = annotate(make_cfg(server.base_url, tmp_path, max_retries=3), DOCS[:2])
    assert table.column("attempts").to_pylist() == [3, 1]
    assert scores_of(table, 0) == expected_scores(DOCS[0][1])
    assert table.column("error").null_count == 2
    assert server.requests == 4


def test_permanently_malformed_is_a_failure_row(server: ChatServer, tmp_path: Path) -> None:
    server.faults[DOCS[1][1]] = ("missing_key", 10**6)
    cfg = make_cfg(server.base_url, tmp_path, max_retries=2)
    table = annotate(cfg, DOCS[:3])
    row = table.slice(1, 1).to_pylist()[0]
    assert all(row[k] is None for k in DIMENSIONS) and row["total"] is None
    assert row["attempts"] == 3
    assert "malformed answer after 3 attempts" in row["error"]
    assert "missing keys ['logic']" in row["error"]
    assert table.column("error").null_count == 2  # the other documents are fine
    assert server.requests == 1 + 3 + 1
    # A failure is not cached: a rerun asks about that document again, and only it.
    again = annotate(cfg, DOCS[:3])
    assert again.column("attempts").to_pylist() == [0, 3, 0]
    assert server.requests == 5 + 3


def test_429_honours_retry_after(
    server: ChatServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.faults[DOCS[0][1]] = ("429", 2)
    # backoff_s would wait 5 s and more; Retry-After: 0 must replace it. The wait each
    # retry chose is in its log line, so no clock is read.
    cfg = make_cfg(server.base_url, tmp_path, backoff_s=5.0, max_backoff_s=30.0)
    with caplog.at_level(logging.WARNING, logger="samplemix.scoring.annotate"):
        table = annotate(cfg, DOCS[:1])
    waits = [r.getMessage() for r in caplog.records if "HTTP 429" in r.getMessage()]
    assert [w.rsplit("; ", 1)[1] for w in waits] == ["next in 0.00 s)"] * 2
    assert table.column("attempts").to_pylist() == [3]
    assert scores_of(table, 0) == expected_scores(DOCS[0][1])


def test_500_is_retried_with_backoff(server: ChatServer, tmp_path: Path) -> None:
    server.faults[DOCS[0][1]] = ("500", 2)
    cfg = make_cfg(server.base_url, tmp_path, backoff_s=0.05)
    start = time.monotonic()
    table = annotate(cfg, DOCS[:1])
    assert time.monotonic() - start >= 0.05 + 0.1 - 0.01  # backoffs 0.05, then 0.1
    assert table.column("attempts").to_pylist() == [3]
    assert table.column("error").null_count == 1


def test_persistent_500_raises_after_retries(server: ChatServer, tmp_path: Path) -> None:
    server.faults[DOCS[0][1]] = ("500", 10**6)
    with pytest.raises(AnnotatorError, match=r"chat/completions returned HTTP 500.*4 attempts"):
        annotate(make_cfg(server.base_url, tmp_path, max_retries=3), DOCS[:1])
    assert server.requests == 4


def test_other_4xx_fails_at_once_naming_status_and_endpoint(
    server: ChatServer, tmp_path: Path
) -> None:
    server.always_status = 401
    with pytest.raises(AnnotatorError) as err:
        annotate(make_cfg(server.base_url, tmp_path), DOCS[:2])
    assert "HTTP 401" in str(err.value)
    assert f"{server.base_url}/chat/completions" in str(err.value)
    assert server.requests == 1


def test_connection_refused_raises(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = make_cfg(f"http://127.0.0.1:{port}/v1", tmp_path, max_retries=1)
    with pytest.raises(AnnotatorError, match=r"ConnectError.*2 attempts"):
        annotate(cfg, DOCS[:1])


def test_cache_serves_reruns_and_keys_on_model_and_prompt(
    server: ChatServer, tmp_path: Path
) -> None:
    cfg = make_cfg(server.base_url, tmp_path)
    first = annotate(cfg, DOCS)
    assert server.requests == len(DOCS)
    second = annotate(cfg, DOCS)
    assert server.requests == len(DOCS)  # zero new requests
    assert second.column("attempts").to_pylist() == [0] * len(DOCS)
    assert second.select(list(DIMENSIONS)).equals(first.select(list(DIMENSIONS)))

    annotate(cfg.model_copy(update={"model": "other-model"}), DOCS)
    assert server.requests == 2 * len(DOCS)
    assert server.models[-1] == "other-model"

    v2 = tmp_path / "rubric_v2.md"  # a new prompt version, same text
    v2.write_text(load_prompt("rubric_v1").template)
    table = annotate(cfg.model_copy(update={"prompt": str(v2)}), DOCS)
    assert server.requests == 3 * len(DOCS)
    assert set(table.column("prompt_version").to_pylist()) == {"rubric_v2"}

    edited = tmp_path / "edited" / "rubric_v1.md"  # same version name, edited template
    edited.parent.mkdir()
    edited.write_text("Rate it.\n" + load_prompt("rubric_v1").template)
    annotate(cfg.model_copy(update={"prompt": str(edited)}), DOCS)
    assert server.requests == 4 * len(DOCS)


def test_unusable_cache_entry_is_a_miss(server: ChatServer, tmp_path: Path) -> None:
    cfg = make_cfg(server.base_url, tmp_path)
    annotate(cfg, DOCS[:1])
    (entry,) = (tmp_path / "cache").rglob("*.json")
    entry.write_text('{"scores": {"clarity": 7}}')
    table = annotate(cfg, DOCS[:1])
    assert table.column("attempts").to_pylist() == [1]
    assert server.requests == 2
    assert annotate(cfg, DOCS[:1]).column("attempts").to_pylist() == [0]  # repaired


def test_api_key_comes_from_the_environment(
    server: ChatServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(server.base_url, tmp_path, cache_dir=None)
    annotate(cfg, DOCS[:1])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    annotate(cfg, DOCS[:1])
    monkeypatch.setenv("SAMPLEMIX_ANNOTATOR_API_KEY", "sk-samplemix")
    annotate(cfg, DOCS[:1])
    explicit = AnnotatorConfig(**{**cfg.model_dump(), "api_key": "sk-config"})
    annotate(explicit, DOCS[:1])
    assert server.auth == [None, "Bearer sk-openai", "Bearer sk-samplemix", "Bearer sk-config"]
    assert "sk-config" not in repr(explicit) and "sk-config" not in explicit.model_dump_json()


def test_rate_limit_spaces_requests(server: ChatServer, tmp_path: Path) -> None:
    cfg = make_cfg(server.base_url, tmp_path, requests_per_second=20.0, cache_dir=None)
    start = time.monotonic()
    annotate(cfg, DOCS[:4])
    assert time.monotonic() - start >= 0.15  # 3 gaps of 1/20 s
    assert server.requests == 4


def test_concurrent_requests_keep_input_order(server: ChatServer, tmp_path: Path) -> None:
    docs = [(f"id{i}", f"document {i} " + "word " * i) for i in range(8)]
    table = annotate(make_cfg(server.base_url, tmp_path, concurrency=4), docs)
    assert table.column("id").to_pylist() == [d for d, _ in docs]
    for i, (_, text) in enumerate(docs):
        assert scores_of(table, i) == expected_scores(text)


def test_long_documents_are_truncated(server: ChatServer, tmp_path: Path) -> None:
    text = "0123456789" * 5
    table = annotate(make_cfg(server.base_url, tmp_path, max_doc_chars=12), [("x", text)])
    assert server.documents == [text[:12] + TRUNCATION_MARKER]
    assert table.column("text_sha256")[0].as_py() == sha256_text(text)  # of the whole text
    assert scores_of(table, 0) == expected_scores(text[:12] + TRUNCATION_MARKER)


def test_labels_round_trip_through_parquet(server: ChatServer, tmp_path: Path) -> None:
    server.faults[DOCS[2][1]] = ("not_json", 10**6)
    table = annotate(make_cfg(server.base_url, tmp_path, max_retries=0), DOCS)
    path = tmp_path / "labels" / "labels.parquet"
    path.parent.mkdir()
    write_labels(table, str(path))
    back = pq.read_table(path)  # as train-scorer reads it (load_training_pairs)
    assert back.equals(table)
    assert back.column("total").null_count == 1
    other = tmp_path / "other.parquet"
    with pytest.raises(ValueError, match="missing columns"):
        write_labels(pa.table({"id": ["a"]}), str(other))
    assert not other.exists()


# --------------------------------------------------------------------------- parsing

GOOD = {"clarity": 1, "coherence": 0, "structure": 1, "accuracy": 1}
GOOD = {**GOOD, "significance": 0, "knowledge": 2, "logic": 1}


@pytest.mark.parametrize(
    "answer",
    [
        json.dumps(GOOD),
        "  \n" + json.dumps(GOOD, indent=2) + "\n",
        "```json\n" + json.dumps(GOOD) + "\n```",
        "```JSON\n" + json.dumps(GOOD, indent=1) + "\n```\n",
        "```\n" + json.dumps(GOOD) + "\n```",
    ],
)
def test_parse_scores_accepts_bare_or_fenced_objects(answer: str) -> None:
    assert parse_scores(answer) == GOOD
    assert list(parse_scores(answer)) == list(DIMENSIONS)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (json.dumps({k: v for k, v in GOOD.items() if k != "logic"}), r"missing keys \['logic'\]"),
        (json.dumps({**GOOD, "humour": 1}), r"unexpected keys \['humour'\]"),
        (json.dumps({**GOOD, "clarity": 2}), r"clarity=2 not in \{0, 1\}"),
        (json.dumps({**GOOD, "knowledge": 3}), r"knowledge=3 not in \{0, 1, 2\}"),
        (json.dumps({**GOOD, "logic": -1}), r"logic=-1 not in"),
        (json.dumps({**GOOD, "clarity": True}), r"clarity=True is a bool"),
        (json.dumps({**GOOD, "knowledge": 1.5}), r"knowledge=1.5 is a float"),
        (json.dumps({**GOOD, "knowledge": 1.0}), r"knowledge=1.0 is a float"),
        (json.dumps({**GOOD, "logic": "1"}), r"logic='1' is a str"),
        (json.dumps({**GOOD, "logic": None}), r"logic=None is a NoneType"),
        ("Here you go: " + json.dumps(GOOD), r"only a JSON object.*'Here you go"),
        (json.dumps(GOOD) + "\nHope this helps!", r"not valid JSON \(Extra data"),
        ("{clarity: 1}", r"not valid JSON"),
        ("not json at all", r"only a JSON object"),
        ("", r"only a JSON object"),
        ("[" + json.dumps(GOOD) + "]", r"only a JSON object"),
        ('{"clarity": 1, "clarity": 0}', r"key 'clarity' appears twice"),
        ("Scores:\n```json\n" + json.dumps(GOOD) + "\n```", r"only a JSON object"),
    ],
)
def test_parse_scores_refuses_malformed_answers(answer: str, message: str) -> None:
    with pytest.raises(MalformedAnswer, match=message):
        parse_scores(answer)


def test_parse_scores_reports_every_problem() -> None:
    bad = {**{k: v for k, v in GOOD.items() if k != "logic"}, "clarity": 5, "extra": 0}
    with pytest.raises(MalformedAnswer) as err:
        parse_scores(json.dumps(bad))
    assert "missing keys" in str(err.value) and "unexpected keys" in str(err.value)
    assert "clarity=5" in str(err.value)
    assert issubclass(MalformedAnswer, ValueError)


def test_rubric_and_prompt_loading(tmp_path: Path) -> None:
    assert MAX_TOTAL == 9
    prompt = load_prompt("rubric_v1")
    assert prompt.version == "rubric_v1" and prompt.template.count("{document}") == 1
    for key in DIMENSIONS:
        assert f'"{key}"' in prompt.template
    assert prompt.render("HELLO").count("HELLO") == 1
    with pytest.raises(ValueError, match=r"packaged prompts: \[.*'rubric_v1'"):
        load_prompt("rubric_v999")
    no_slot = tmp_path / "bad.md"
    no_slot.write_text("Rate this.")
    with pytest.raises(ValueError, match="placeholder"):
        load_prompt(str(no_slot))


def test_config_is_strict() -> None:
    with pytest.raises(ValueError, match="Extra inputs"):
        AnnotatorConfig(base_url="http://x/v1", model="m", modle="typo")
    with pytest.raises(ValueError, match="http"):
        AnnotatorConfig(base_url="127.0.0.1:8000/v1", model="m")
    assert AnnotatorConfig(base_url="http://x/v1/", model="m").base_url == "http://x/v1"


# --------------------------------------------------------------------------- sampling


def corpus(sizes: dict[str, int]) -> tuple[list[str], list[str], list[int]]:
    ids, domains, lengths = [], [], []
    for d, size in sizes.items():
        for i in range(size):
            ids.append(f"{d}-{i}")
            domains.append(d)
            lengths.append((i * 37) % 101)
    return ids, domains, lengths


def per_domain(domains: list[str], idx: list[int]) -> dict[str, int]:
    return dict(Counter(domains[i] for i in idx))


def test_domains_are_proportional() -> None:
    ids, domains, lengths = corpus({"a": 60, "b": 30, "c": 10})
    picked = stratified_sample(ids, domains, lengths, n=10, seed=1)
    assert per_domain(domains, picked) == {"a": 6, "b": 3, "c": 1}
    assert len(set(picked)) == 10 and picked == sorted(picked)


def test_every_domain_is_represented() -> None:
    # Shares 9, 0.8, 0.2: b and c get one each, a the rest.
    ids, domains, lengths = corpus({"a": 90, "b": 8, "c": 2})
    assert per_domain(domains, stratified_sample(ids, domains, lengths, 10)) == {
        "a": 8,
        "b": 1,
        "c": 1,
    }
    # Fewer seats than domains: the largest domains, ties by name.
    ids, domains, lengths = corpus({"a": 5, "c": 3, "b": 3})
    assert per_domain(domains, stratified_sample(ids, domains, lengths, 2)) == {"a": 1, "b": 1}


def test_sample_is_deterministic_and_order_independent() -> None:
    ids, domains, lengths = corpus({"a": 40, "b": 25, "c": 7})
    one = stratified_sample(ids, domains, lengths, n=12, seed=7)
    assert one == stratified_sample(ids, domains, lengths, n=12, seed=7)
    seeds = {tuple(stratified_sample(ids, domains, lengths, n=12, seed=s)) for s in range(5)}
    assert len(seeds) > 1
    order = list(reversed(range(len(ids))))
    rev = stratified_sample(
        [ids[i] for i in order], [domains[i] for i in order], [lengths[i] for i in order], 12, 7
    )
    assert {ids[order[i]] for i in rev} == {ids[i] for i in one}


def test_length_bins_are_covered() -> None:
    # One domain, lengths 1..8 in scrambled order, 4 seats, 4 bins of two ranks each:
    # {1,2} {3,4} {5,6} {7,8} -> one pick from each bin, whatever the seed.
    lengths = [5, 1, 8, 3, 7, 2, 6, 4]
    ids = [f"d{i}" for i in range(8)]
    for seed in range(10):
        picked = stratified_sample(ids, ["x"] * 8, lengths, n=4, seed=seed)
        assert sorted((lengths[i] - 1) // 2 for i in picked) == [0, 1, 2, 3]
    # 2 seats -> 2 bins (halves): one short, one long document.
    picked = stratified_sample(ids, ["x"] * 8, lengths, n=2, seed=3)
    assert sorted(lengths[i] > 4 for i in picked) == [False, True]


def test_sample_edge_cases() -> None:
    ids, domains, lengths = corpus({"a": 3, "b": 2})
    assert stratified_sample(ids, domains, lengths, n=9) == list(range(5))
    assert stratified_sample(ids, domains, lengths, n=0) == []
    with pytest.raises(ValueError, match="differ in length"):
        stratified_sample(ids, domains[:-1], lengths, n=1)


def test_allocation_never_exceeds_a_group() -> None:
    for sizes in ([1, 1, 1], [1, 2, 7], [3, 3, 3, 1], [10, 1, 1, 1, 1], [4, 9]):
        for n in range(sum(sizes) + 1):
            quota = _allocate(sizes, n)
            assert sum(quota) == n
            assert all(0 <= q <= s for q, s in zip(quota, sizes, strict=True))
            if n >= len(sizes):
                assert min(quota) >= 1
