"""Tests for samplemix.io.corpus: shard discovery, reading, rejects and whole-file errors.

Every fixture is a real file written into tmp_path (pyarrow for Parquet, gzip and
zstandard for compressed JSONL), so the expected documents, reject reasons and row
numbers below are known from what each test wrote, not from the reader under test.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from samplemix.config import CorpusConfig, load_config
from samplemix.io.corpus import (
    DOCS_SCHEMA,
    REJECTS_SCHEMA,
    CorpusError,
    Shard,
    ShardDocs,
    discover_shards,
    read_docs,
    read_shard,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "corpus"
JSONL_SUFFIXES = [".jsonl", ".jsonl.gz", ".jsonl.zst"]


# --- writers -------------------------------------------------------------------------


def write_jsonl(path: Path, data: bytes) -> Path:
    """Write raw JSONL bytes, compressed by the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def jsonl_bytes(records: list) -> bytes:
    return b"".join(json.dumps(r).encode("utf-8") + b"\n" for r in records)


def write_parquet(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def write_any(path: Path, records: list[dict]) -> Path:
    """The same records as Parquet (columns from the records' keys) or as JSONL."""
    if path.name.endswith(".parquet"):
        return write_parquet(path, pa.Table.from_pylist(records))
    return write_jsonl(path, jsonl_bytes(records))


def only_shard(path: Path, cfg: CorpusConfig | None = None) -> tuple[Shard, CorpusConfig]:
    """The Shard for one file, found the way a run finds it (single-file input)."""
    cfg = cfg or CorpusConfig(input=str(path))
    shards = discover_shards(cfg)
    assert len(shards) == 1
    return shards[0], cfg


def read_file(path: Path, **corpus: object) -> ShardDocs:
    shard, cfg = only_shard(path, CorpusConfig(input=str(path), **corpus))
    return read_shard(shard, cfg)


def reasons(sd: ShardDocs) -> dict[str, list[int]]:
    """Reject reason -> sorted row numbers."""
    out: dict[str, list[int]] = {}
    for r in sd.rejects.to_pylist():
        out.setdefault(r["reason"], []).append(r["row"])
    return {k: sorted(v) for k, v in out.items()}


# --- discover_shards -----------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A corpus folder: two domain folders, four shard formats, one nested folder and
    files that are not shards."""
    root = tmp_path / "corpus"
    write_any(root / "web" / "a.parquet", [{"text": "a"}])
    write_any(root / "web" / "b.jsonl.zst", [{"text": "b"}])
    write_any(root / "books" / "c.jsonl", [{"text": "c"}])
    write_any(root / "books" / "d.jsonl.gz", [{"text": "d"}])
    write_any(root / "web" / "sub" / "e.jsonl", [{"text": "e"}])
    (root / "books" / "README.md").write_text("not a shard")
    (root / "books" / "notes.txt").write_text("not a shard")
    (root / "web" / "a.parquet.crc").write_text("not a shard")
    (root / "config.yaml").write_text("corpus: {}")
    return root


def test_discover_folder_finds_every_format_sorted(tree: Path) -> None:
    shards = discover_shards(CorpusConfig(input=str(tree)))
    assert [(s.shard_id, s.domain) for s in shards] == [
        ("books/c.jsonl", "books"),
        ("books/d.jsonl.gz", "books"),
        ("web/a.parquet", "web"),
        ("web/b.jsonl.zst", "web"),
        ("web/sub/e.jsonl", "sub"),  # the domain is the immediate parent folder
    ]
    for s in shards:
        assert Path(s.path) == tree / s.shard_id
        assert s.fingerprint.startswith(f"{(tree / s.shard_id).stat().st_size}:")


def test_discover_fingerprint_changes_with_the_file(tree: Path) -> None:
    cfg = CorpusConfig(input=str(tree))
    before = {s.shard_id: s.fingerprint for s in discover_shards(cfg)}
    write_any(tree / "books" / "c.jsonl", [{"text": "c, now longer"}])
    after = {s.shard_id: s.fingerprint for s in discover_shards(cfg)}
    assert after["books/c.jsonl"] != before["books/c.jsonl"]
    assert after["web/a.parquet"] == before["web/a.parquet"]


def test_discover_glob_is_relative_to_the_part_before_the_wildcard(tree: Path) -> None:
    shards = discover_shards(CorpusConfig(input=f"{tree}/*/*.jsonl*"))
    assert [(s.shard_id, s.domain) for s in shards] == [
        ("books/c.jsonl", "books"),
        ("books/d.jsonl.gz", "books"),
        ("web/b.jsonl.zst", "web"),
    ]
    shards = discover_shards(CorpusConfig(input=f"{tree}/web/*.parquet"))
    assert [(s.shard_id, s.domain) for s in shards] == [("a.parquet", "web")]


def test_discover_single_file(tree: Path) -> None:
    shards = discover_shards(CorpusConfig(input=str(tree / "books" / "d.jsonl.gz")))
    assert [(s.shard_id, s.domain, s.path) for s in shards] == [
        ("d.jsonl.gz", "books", str(tree / "books" / "d.jsonl.gz"))
    ]


def test_discover_missing_input_names_corpus_input(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(CorpusError, match="corpus.input") as e:
        discover_shards(CorpusConfig(input=str(missing)))
    assert str(missing) in str(e.value)
    assert "does not exist" in str(e.value)


def test_discover_folder_without_shards_names_corpus_input(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    (tmp_path / "d" / "data.csv").write_text("text\nx\n")
    with pytest.raises(CorpusError, match="no shards under corpus.input") as e:
        discover_shards(CorpusConfig(input=str(tmp_path / "d")))
    assert ".parquet" in str(e.value) and ".jsonl.zst" in str(e.value)  # says what counts


def test_discover_glob_matching_nothing_names_corpus_input(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="corpus.input"):
        discover_shards(CorpusConfig(input=f"{tmp_path}/*.parquet"))


# --- read_shard: accepted documents ----------------------------------------------------

RECORDS = [
    {"id": "x1", "domain": "news", "text": "alpha"},
    {"id": None, "domain": None, "text": "beta"},  # id and domain fall back
    {"id": "x3", "domain": "", "text": "gamma"},  # an empty domain falls back too
]


def expected_docs(shard_id: str, folder: str) -> list[dict]:
    return [
        {"row": 0, "id": "x1", "domain": "news", "text": "alpha"},
        {"row": 1, "id": f"{shard_id}:1", "domain": folder, "text": "beta"},
        {"row": 2, "id": "x3", "domain": folder, "text": "gamma"},
    ]


@pytest.mark.parametrize("suffix", [".parquet", *JSONL_SUFFIXES])
def test_read_accepted_docs(tmp_path: Path, suffix: str) -> None:
    path = write_any(tmp_path / "web" / f"part{suffix}", RECORDS)
    sd = read_file(path)
    assert sd.docs.schema == DOCS_SCHEMA
    assert sd.docs.column_names == ["row", "id", "domain", "text"]
    assert sd.docs.to_pylist() == expected_docs(f"part{suffix}", "web")
    assert sd.rejects.schema == REJECTS_SCHEMA
    assert sd.rejects.num_rows == 0
    # Derived ids are deterministic: a second read gives the same table.
    assert read_file(path).docs.equals(sd.docs)


@pytest.mark.parametrize("suffix", [".parquet", *JSONL_SUFFIXES])
def test_read_without_id_or_domain_column(tmp_path: Path, suffix: str) -> None:
    path = write_any(tmp_path / "books" / f"p{suffix}", [{"text": "one"}, {"text": "two"}])
    assert read_file(path).docs.to_pylist() == [
        {"row": 0, "id": f"p{suffix}:0", "domain": "books", "text": "one"},
        {"row": 1, "id": f"p{suffix}:1", "domain": "books", "text": "two"},
    ]


def test_derived_ids_use_the_shard_id_relative_to_the_root(tmp_path: Path) -> None:
    write_any(tmp_path / "c" / "web" / "p.jsonl", [{"text": "one"}])
    cfg = CorpusConfig(input=str(tmp_path / "c"))
    (shard,) = discover_shards(cfg)
    assert read_shard(shard, cfg).docs.column("id").to_pylist() == ["web/p.jsonl:0"]


def test_numeric_ids_become_strings(tmp_path: Path) -> None:
    jl = write_jsonl(
        tmp_path / "d" / "a.jsonl", b'{"id": 7, "text": "x"}\n{"id": 8, "text": "y"}\n'
    )
    assert read_file(jl).docs.column("id").to_pylist() == ["7", "8"]
    pq_path = write_parquet(
        tmp_path / "d" / "a.parquet",
        pa.table({"id": pa.array([7, None], pa.int64()), "text": ["x", "y"]}),
    )
    assert read_file(pq_path).docs.column("id").to_pylist() == ["7", "a.parquet:1"]


def test_custom_column_names(tmp_path: Path) -> None:
    # The default-named keys are present too, with other values, and must be ignored.
    records = [
        {
            "body": "real text",
            "uid": "u1",
            "src": "forum",
            "text": "decoy",
            "id": "d",
            "domain": "d",
        },
        {"body": "more text", "uid": None, "src": None, "text": "decoy", "id": "d", "domain": "d"},
    ]
    cols = {"text_column": "body", "id_column": "uid", "domain_column": "src"}
    for suffix in [".parquet", ".jsonl.gz"]:
        path = write_any(tmp_path / "web" / f"c{suffix}", records)
        assert read_file(path, **cols).docs.to_pylist() == [
            {"row": 0, "id": "u1", "domain": "forum", "text": "real text"},
            {"row": 1, "id": f"c{suffix}:1", "domain": "web", "text": "more text"},
        ]
        # id_column / domain_column None: always derive, even when "id"/"domain" exist.
        got = read_file(path, id_column=None, domain_column=None).docs.to_pylist()
        assert [(d["id"], d["domain"], d["text"]) for d in got] == [
            (f"c{suffix}:0", "web", "decoy"),
            (f"c{suffix}:1", "web", "decoy"),
        ]


# --- read_shard: rejects -------------------------------------------------------------

# Line number -> what is on it. Blank and whitespace-only lines are not rows (they
# count neither as accepted nor as rejected); every other line is exactly one row.
BAD_LINES = [
    b'{"id": "g1", "text": "good one"}',  # 0 accepted
    b"this is not json",  # 1 invalid_json
    b"[1, 2, 3]",  # 2 not_object
    b'{"id": "no-text"}',  # 3 missing_text
    b"",  # 4 blank: not a row
    b'{"text": null}',  # 5 missing_text
    b'{"text": "   \\t\\n "}',  # 6 empty_text
    b'{"text": ""}',  # 7 empty_text
    b'{"text": 42}',  # 8 not_text
    '{"text": "café"}'.encode("latin-1"),  # 9 non_utf8
    b'{"text": "lone \\ud800 surrogate"}',  # 10 non_utf8: no UTF-8 encoding exists
    b'{"id": 5, "text": "good two"}',  # 11 accepted
    b'"just a string"',  # 12 not_object
    b"   \t",  # 13 whitespace only: not a row
    b'{"text": ["a", "list"]}',  # 14 not_text
    b'{"text": "good three"}\r',  # 15 accepted (CRLF line ending)
]
BAD_EXPECTED = {
    "invalid_json": [1],
    "not_object": [2, 12],
    "missing_text": [3, 5],
    "empty_text": [6, 7],
    "not_text": [8, 14],
    "non_utf8": [9, 10],
}
BAD_ROWS = 14  # 16 lines, 2 of them blank; the trailing "\n" adds no row either


@pytest.mark.parametrize("suffix", JSONL_SUFFIXES)
def test_jsonl_rejects_are_counted_per_reason_with_rows(tmp_path: Path, suffix: str) -> None:
    path = write_jsonl(tmp_path / "web" / f"bad{suffix}", b"\n".join(BAD_LINES) + b"\n")
    sd = read_file(path)
    assert reasons(sd) == BAD_EXPECTED
    assert sd.docs.to_pylist() == [
        {"row": 0, "id": "g1", "domain": "web", "text": "good one"},
        {"row": 11, "id": "5", "domain": "web", "text": "good two"},
        {"row": 15, "id": f"bad{suffix}:15", "domain": "web", "text": "good three"},
    ]
    assert sd.docs.num_rows + sd.rejects.num_rows == BAD_ROWS
    seen = sd.docs.column("row").to_pylist() + sd.rejects.column("row").to_pylist()
    assert sorted(seen) == [i for i, line in enumerate(BAD_LINES) if line.strip()]
    assert set(sd.rejects.column("shard").to_pylist()) == {f"bad{suffix}"}
    assert all(sd.rejects.column("detail").to_pylist())  # every reject says why
    details = {r["row"]: r["detail"] for r in sd.rejects.to_pylist()}
    assert "int" in details[8]  # names the type it got


def test_parquet_null_and_empty_text_are_rejected(tmp_path: Path) -> None:
    texts = ["ok", None, "", "  \n", "fine", None]
    path = write_parquet(tmp_path / "d" / "p.parquet", pa.table({"text": texts}))
    sd = read_file(path)
    assert reasons(sd) == {"missing_text": [1, 5], "empty_text": [2, 3]}
    assert sd.docs.column("row").to_pylist() == [0, 4]
    assert sd.docs.column("text").to_pylist() == ["ok", "fine"]
    assert sd.docs.num_rows + sd.rejects.num_rows == len(texts)


def test_parquet_binary_text_decodes_or_rejects_non_utf8(tmp_path: Path) -> None:
    texts = [b"good bytes", b"\xff\xfe bad", None, "café".encode(), b"\xc3"]
    table = pa.table({"text": pa.array(texts, pa.binary())})
    sd = read_file(write_parquet(tmp_path / "d" / "b.parquet", table))
    assert reasons(sd) == {"non_utf8": [1, 4], "missing_text": [2]}
    assert sd.docs.column("text").to_pylist() == ["good bytes", "café"]
    assert sd.docs.num_rows + sd.rejects.num_rows == len(texts)


def test_parquet_text_of_wrong_type_is_not_text(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d" / "n.parquet", pa.table({"text": [1, 2, 3]}))
    sd = read_file(path)
    assert sd.docs.num_rows == 0
    assert reasons(sd) == {"not_text": [0, 1, 2]}


def test_jsonl_of_only_blank_lines_reads_as_nothing(tmp_path: Path) -> None:
    sd = read_file(write_jsonl(tmp_path / "d" / "e.jsonl", b"\n\n  \n"))
    assert sd.docs.num_rows == 0 and sd.rejects.num_rows == 0


def test_multi_frame_zstd_and_multi_member_gzip_read_every_row(tmp_path: Path) -> None:
    first, second = jsonl_bytes([{"text": "a"}]), jsonl_bytes([{"text": "b"}])
    zc = zstandard.ZstdCompressor()
    zst = tmp_path / "d" / "m.jsonl.zst"
    gz = tmp_path / "d" / "m.jsonl.gz"
    zst.parent.mkdir()
    zst.write_bytes(zc.compress(first) + zc.compress(second))
    gz.write_bytes(gzip.compress(first) + gzip.compress(second))
    for path in (zst, gz):
        assert read_file(path).docs.column("text").to_pylist() == ["a", "b"]


# --- whole-file errors ---------------------------------------------------------------

MANY = jsonl_bytes([{"text": f"document number {i} " * 10} for i in range(500)])


def corrupt_files(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "bad"
    d.mkdir()
    random = d / "random.parquet"
    random.write_bytes(bytes(range(256)) * 8)
    real = write_parquet(d / "real.parquet", pa.table({"text": [f"t{i}" for i in range(500)]}))
    truncated = d / "truncated.parquet"
    truncated.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    gz = gzip.compress(MANY)
    (d / "truncated.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    zst = zstandard.ZstdCompressor().compress(MANY)
    (d / "truncated.jsonl.zst").write_bytes(zst[: len(zst) // 2])
    (d / "notgzip.jsonl.gz").write_bytes(MANY)  # plain text under a .gz name
    return {p.name: p for p in d.iterdir() if p.name != "real.parquet"}


def test_corrupt_files_raise_corpus_error_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    files = corrupt_files(tmp_path)
    assert len(files) == 5
    for name, path in files.items():
        with pytest.raises(CorpusError) as e:
            read_file(path)
        msg = str(e.value)
        assert str(path) in msg, name
        assert "corpus.on_bad_shard: skip" in msg, name


def test_parquet_without_the_text_column_lists_the_columns(tmp_path: Path) -> None:
    table = pa.table({"id": ["a"], "body": ["text is here"]})
    path = write_parquet(tmp_path / "d" / "p.parquet", table)
    with pytest.raises(CorpusError) as e:
        read_file(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "corpus.text_column" in msg
    assert "'text'" in msg and "'id'" in msg and "'body'" in msg
    # ...and pointing text_column at the right column reads it.
    assert read_file(path, text_column="body").docs.column("text").to_pylist() == ["text is here"]


@pytest.mark.parametrize("suffix", JSONL_SUFFIXES)
def test_jsonl_where_no_object_has_the_text_key(tmp_path: Path, suffix: str) -> None:
    data = jsonl_bytes([{"content": "a", "id": 1}, {"content": "b"}]) + b"not json\n"
    path = write_jsonl(tmp_path / "d" / f"p{suffix}", data)
    with pytest.raises(CorpusError) as e:
        read_file(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "corpus.text_column" in msg
    assert "'content'" in msg and "'id'" in msg


def test_read_docs_skips_an_unreadable_shard_as_one_reject(tmp_path: Path) -> None:
    for name, path in corrupt_files(tmp_path).items():
        shard, _ = only_shard(path)
        cfg = load_config(None, {"corpus.input": str(path), "corpus.on_bad_shard": "skip"})
        sd = read_docs(shard, cfg)
        assert sd.docs.num_rows == 0, name
        assert sd.docs.schema == DOCS_SCHEMA
        (reject,) = sd.rejects.to_pylist()
        assert reject["reason"] == "unreadable_shard"
        assert reject["shard"] == name and reject["row"] == -1
        assert str(path) in reject["detail"]
        cfg = load_config(None, {"corpus.input": str(path)})  # on_bad_shard: error
        with pytest.raises(CorpusError):
            read_docs(shard, cfg)


def test_read_docs_skip_also_covers_a_missing_text_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d" / "p.parquet", pa.table({"body": ["x"]}))
    shard, _ = only_shard(path)
    cfg = load_config(None, {"corpus.input": str(path), "corpus.on_bad_shard": "skip"})
    sd = read_docs(shard, cfg)
    assert sd.docs.num_rows == 0
    assert sd.rejects.column("reason").to_pylist() == ["unreadable_shard"]


# --- the committed example corpus ----------------------------------------------------


@pytest.mark.parametrize(
    "rel", ["books/part-000.parquet", "code/part-001.parquet", "email/part-000.jsonl.gz"]
)
def test_example_shards_read_cleanly(rel: str) -> None:
    cfg = CorpusConfig(input=str(EXAMPLES))
    shard = {s.shard_id: s for s in discover_shards(cfg)}[rel]
    assert shard.domain == rel.split("/")[0]
    sd = read_shard(shard, cfg)
    assert sd.rejects.num_rows == 0
    assert sd.docs.num_rows == 100
    # Ids come from the file's own id column, in file order.
    path = EXAMPLES / rel
    if rel.endswith(".parquet"):
        ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
    else:
        ids = [json.loads(line)["id"] for line in gzip.decompress(path.read_bytes()).splitlines()]
    assert sd.docs.column("id").to_pylist() == ids
    assert set(sd.docs.column("domain").to_pylist()) == {shard.domain}


def test_jsonl_with_a_utf8_bom_keeps_its_first_row(tmp_path: Path) -> None:
    data = b"\xef\xbb\xbf" + jsonl_bytes([{"text": "first"}, {"text": "second"}])
    sd = read_file(write_jsonl(tmp_path / "web" / "a.jsonl", data))
    assert sd.docs.column("text").to_pylist() == ["first", "second"]
    assert sd.rejects.num_rows == 0


def test_sample_texts_draws_the_same_documents_however_the_corpus_is_sharded(
    tmp_path: Path,
) -> None:
    import pyarrow.parquet as pq
    from conftest import write_tiny_corpus

    from samplemix.config import load_config
    from samplemix.io.corpus import sample_texts

    two = write_tiny_corpus(tmp_path / "two", shards_per_domain=2)
    four = write_tiny_corpus(tmp_path / "four", shards_per_domain=4)
    drawn = {}
    for name, corpus in (("two", two), ("four", four)):
        cfg = load_config(None, {"corpus.input": str(corpus)})
        drawn[name] = {
            "books": sample_texts("domains:books", cfg, 5),
            "all": sample_texts("all", cfg, 10),
            "folder": sample_texts(str(corpus / "code"), cfg, 3),
            "every book": sample_texts("domains:books", cfg, 1000),
        }
    assert drawn["two"] == drawn["four"]
    # Read independently: the domains' texts as written.
    texts = {
        d: set(pq.read_table(sorted((two / d).glob("*.parquet"))).column("text").to_pylist())
        for d in ("books", "code", "reference")
    }
    got = drawn["two"]
    assert len(got["books"]) == 5 and set(got["books"]) <= texts["books"]
    assert set(got["every book"]) == texts["books"]  # a limit above the domain: all of it
    assert len(set(got["all"])) == 10 and set(got["all"]) <= set().union(*texts.values())
    assert len(got["folder"]) == 3 and set(got["folder"]) <= texts["code"]
    cfg = load_config(None, {"corpus.input": str(two)})
    with pytest.raises(CorpusError, match="no documents for 'domains:web'"):
        sample_texts("domains:web", cfg, 5)
