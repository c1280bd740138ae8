"""Property-based tests (hypothesis) of the inputs users hand us: config overrides and
files, and shard files of arbitrary bytes or arbitrary JSON. The properties: a
clear error (ConfigError / CorpusError) or a result, never another exception; and
every row of a shard accounted for, read = accepted + rejected."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from samplemix.config import Config, ConfigError, load_config
from samplemix.io.corpus import CorpusError, ShardDocs, discover_shards, read_shard
from samplemix.io.store import transient

FIELDS = [
    "corpus.text_column",
    "corpus.id_column",
    "corpus.on_bad_shard",
    "storage.retries",
    "storage.options",
    "output.rows_per_shard",
    "output.max_part_bytes",
    "quality.scorer",
    "quality.max_length",
    "embed.dtype",
    "kmeans.k",
    "kmeans.refit",
    "kmeans.refit_new_share",
    "kmeans.max_sample",
    "diversity.form",
    "diversity.lam",
    "mixing.alpha",
    "mixing.budget",
    "mixing.budget_ratio",
    "mixing.max_repeats",
    "compute.n_workers",
    "nonsense.field",
    "mixing.nonsense",
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4))
def test_any_overrides_give_a_config_or_a_config_error(overrides: dict) -> None:
    try:
        cfg = load_config(None, {"corpus.input": "x", **overrides})
    except ConfigError as e:
        assert str(e).startswith("invalid configuration") or "cannot set" in str(e)
    else:
        assert isinstance(cfg, Config)


@FAST
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_config_file_gives_a_config_or_a_config_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mix.yaml"
        path.write_bytes(data)
        try:
            load_config(path, {"corpus.input": "x"})
        except ConfigError as e:
            assert str(path) in str(e) or "invalid configuration" in str(e)


def _read(name: str, data: bytes, **corpus: object) -> ShardDocs:
    """Write ``data`` as shard ``web/name`` and read it; CorpusError propagates."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "web").mkdir()
        (Path(d) / "web" / name).write_bytes(data)
        from samplemix.config import CorpusConfig

        cfg = CorpusConfig(input=d, **corpus)
        (shard,) = discover_shards(cfg)
        return read_shard(shard, cfg)


@FAST
@given(
    st.sampled_from(["p.parquet", "p.jsonl", "p.jsonl.gz", "p.jsonl.zst"]),
    st.binary(max_size=2000),
)
def test_random_bytes_are_rows_or_a_shard_error(name: str, data: bytes) -> None:
    try:
        sd = _read(name, data)
    except CorpusError as e:
        assert "p." in str(e)  # names the file
        assert not transient(e.__cause__ or e)  # a bad file is never "retry later"
        return
    if name == "p.jsonl":  # a row per non-blank line, after a leading UTF-8 BOM
        lines = [ln for ln in data.removeprefix(b"\xef\xbb\xbf").split(b"\n") if ln.strip()]
        assert sd.docs.num_rows + sd.rejects.num_rows == len(lines)


@FAST
@given(st.lists(st.dictionaries(st.sampled_from(["text", "id", "domain", "x"]), JSON), max_size=12))
def test_json_records_of_any_types_are_all_accounted_for(records: list[dict]) -> None:
    data = "\n".join(json.dumps(r) for r in records).encode()
    try:
        sd = _read("p.jsonl.gz", gzip.compress(data))
    except CorpusError as e:
        # Only a shard where no record has the text column is refused whole.
        assert records and not any("text" in r for r in records), e
        return
    assert sd.docs.num_rows + sd.rejects.num_rows == len(records)
    assert set(sd.docs.column("text").to_pylist()) <= {
        r["text"].strip() for r in records if isinstance(r.get("text"), str)
    } | {r.get("text") for r in records if isinstance(r.get("text"), str)}


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9])
def test_truncated_gzip_is_a_shard_error_not_a_retry(cut: float) -> None:
    data = gzip.compress(b"\n".join(json.dumps({"text": f"doc {i}"}).encode() for i in range(500)))
    with pytest.raises(CorpusError, match=r"p\.jsonl\.gz") as e:
        _read("p.jsonl.gz", data[: int(len(data) * cut)])
    assert not transient(e.value.__cause__)
