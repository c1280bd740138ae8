"""The artifact store on a local folder: keys, commits, pointers, listing, outputs, and
the reasons and k-means reuse rules that ``samplemix plan`` and the flow share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from samplemix.config import ConfigError, load_config
from samplemix.io.corpus import Shard
from samplemix.io.store import Key, Output, Store, artifact_key, transient
from samplemix.pipeline import keys
from samplemix.pipeline.plan import change_reason


def test_key_hashes_exactly_its_parts() -> None:
    a = artifact_key("quality", "1", "web/p.parquet", quality={"scorer": "heuristic"})
    assert a == artifact_key("quality", "1", "web/p.parquet", quality={"scorer": "heuristic"})
    assert a.id != artifact_key("quality", "2", "web/p.parquet", quality={"scorer": "heuristic"}).id
    assert a.id != artifact_key("quality", "1", "web/p.parquet", quality={"scorer": "x"}).id
    assert a.id != artifact_key("embed", "1", "web/p.parquet", quality={"scorer": "heuristic"}).id
    assert a.parts == {"version": "1", "quality": {"scorer": "heuristic"}}
    assert len(a.id) == 16 and str(a) == f"quality/{a.id}"


def test_only_committed_artifacts_are_trusted(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"), stages=("embed",))
    key = artifact_key("embed", "1", "a.parquet", x=1)
    store.put_array(key, "embeddings.npy", np.ones((2, 3), np.float32))
    assert store.summary(key) is None and store.has_files(key)
    ((a,),) = [store.artifacts()]
    npy = tmp_path / "store" / "embed" / key.id / "embeddings.npy"
    assert (a.stage, a.id, a.committed, a.size) == ("embed", key.id, False, npy.stat().st_size)
    assert store.summaries([key]) == {}
    store.commit(key, {"docs": 2})
    assert store.summary(key) == {"docs": 2}
    assert store.manifest(key)["parts"] == {"version": "1", "x": 1}
    assert [(a.id, a.committed) for a in store.artifacts()] == [(key.id, True)]
    other = artifact_key("embed", "1", "b.parquet", x=2)
    assert store.summaries([key, other]) == {key: {"docs": 2}}
    np.testing.assert_array_equal(store.get_array(key, "embeddings.npy"), np.ones((2, 3)))
    # Writes go through a temporary name and a rename: nothing else is left behind.
    names = sorted(p.name for p in (tmp_path / "store" / "embed" / key.id).iterdir())
    assert names == ["_done.json", "embeddings.npy"]


def test_latest_points_at_the_newest_commit_per_shard(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    old = artifact_key("quality", "1", "a.parquet", quality={"scorer": "heuristic"})
    new = artifact_key("quality", "1", "a.parquet", quality={"scorer": "hf-classifier"})
    other = artifact_key("quality", "1", "b.parquet", quality={"scorer": "heuristic"})
    for k in (old, other, new):
        store.commit(k, {})
    assert store.latest("quality", "a.parquet")["parts"] == new.parts
    assert store.latest("quality", "b.parquet")["parts"] == other.parts
    assert store.latest("quality", "c.parquet") is None
    store.remove("quality", new.id)  # as gc does: the pointer dangles, latest says None
    assert store.latest("quality", "a.parquet") is None


def test_transient_errors_are_told_from_permanent_ones() -> None:
    assert transient(ConnectionResetError()) and transient(TimeoutError())
    assert transient(OSError(5, "An error occurred (SlowDown) when calling PutObject"))
    assert not transient(OSError(5, "An error occurred (InvalidBucketName)"))
    assert not transient(OSError("Not a gzipped file"))  # a corrupt shard stays a corrupt shard
    assert not transient(FileNotFoundError()) and not transient(PermissionError())
    assert not transient(ValueError("bad config"))


def test_artifacts_lists_only_artifact_folders(tmp_path: Path) -> None:
    # A store sharing a folder with other data lists (and gc removes) only its own.
    store = Store(str(tmp_path), stages=("tokens", "embed"))
    store.commit(artifact_key("tokens", "1", "a", x=1), {})
    for stray in ("corpus/web/part-0.parquet", "tokens/notes.txt", "tokens/old-run/x.npy"):
        (tmp_path / stray).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / stray).write_text("keep me")
    assert [(a.stage, a.committed) for a in store.artifacts()] == [("tokens", True)]


def test_missing_files_raise_file_not_found(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        store.get_table(artifact_key("tokens", "1", x=1), "index.parquet")


def test_change_reasons_name_what_changed(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    base = {"corpus": {"fingerprint": "10:1"}, "quality": {"scorer": "heuristic", "max": 5}}
    old = artifact_key("quality", "1", "a.parquet", **base)
    assert change_reason(store, old) == "new shard"
    assert change_reason(store, artifact_key("kmeans", "1", embed=["x"])) == "no earlier result"
    store.commit(old, {})
    scorer = {**base, "quality": {"scorer": "hf-classifier", "max": 5}}
    assert (
        change_reason(store, artifact_key("quality", "1", "a.parquet", **scorer))
        == "config changed: quality.scorer"
    )
    edited = {**base, "corpus": {"fingerprint": "11:2"}}
    assert (
        change_reason(store, artifact_key("quality", "1", "a.parquet", **edited))
        == "shard file changed"
    )
    assert change_reason(store, artifact_key("quality", "2", "a.parquet", **base)).startswith(
        "stage logic changed (version 1 -> 2)"
    )
    partial = artifact_key("quality", "1", "a.parquet", **scorer)
    store.put_array(partial, "quality.npy", np.zeros(3))
    assert change_reason(store, partial).startswith("incomplete artifact")

    km = artifact_key("clusters", "1", assign=["a", "b", "c"], diversity={"form": "product"})
    store.commit(km, {})
    moved = artifact_key("clusters", "1", assign=["a", "b", "d"], diversity={"form": "product"})
    assert change_reason(store, moved) == "upstream changed: assign (1 of 3 shards)"


def _embed_keys(n: int) -> list[Key]:
    return [artifact_key("embed", "1", f"s{i}", i=i) for i in range(n)]


@pytest.mark.parametrize(
    ("refit", "share", "docs_new", "reused"),
    [
        ("auto", 0.2, 20, True),  # 20 / 100 new: at the threshold, keep
        ("auto", 0.2, 30, False),  # 30 / 110: refit
        ("always", 0.2, 1, False),
        ("never", 0.0, 500, True),
    ],
)
def test_kmeans_reuse_policy(
    tmp_path: Path, refit: str, share: float, docs_new: int, reused: bool
) -> None:
    cfg = load_config(
        None,
        {"corpus.input": "x", "kmeans.refit": refit, "kmeans.refit_new_share": share},
    )
    store = Store(str(tmp_path))
    embed = _embed_keys(5)
    old = keys.kmeans_key(embed[:4], cfg)  # fitted before shard s4 was added
    store.commit(old, {"k": 3})
    docs = [20, 20, 20, 20, docs_new]
    km, why = keys.kmeans_to_use(store, embed, docs, cfg)
    assert (km == old) is reused
    assert (km == keys.kmeans_key(embed, cfg)) is not reused
    assert ("kept the fit over 4 of 5 shards" in why) is reused
    # A fit with other k-means settings, or one that saw a shard not in the corpus, never counts.
    other = load_config(None, {"corpus.input": "x", "kmeans.niter": 3, "kmeans.refit": refit})
    assert keys.kmeans_to_use(store, embed, docs, other)[0] == keys.kmeans_key(embed, other)
    gone = keys.kmeans_to_use(store, embed[1:], docs[1:], cfg)[0]
    assert gone == keys.kmeans_key(embed[1:], cfg)


def test_kmeans_reuse_waits_for_unread_shards(tmp_path: Path) -> None:
    cfg = load_config(None, {"corpus.input": "x"})
    store = Store(str(tmp_path))
    embed = _embed_keys(3)
    store.commit(keys.kmeans_key(embed[:2], cfg), {"k": 2})
    km, why = keys.kmeans_to_use(store, embed, [10, 10, None], cfg)
    assert km is None and "decided once the new shards are read" in why


def test_output_manifest_detects_missing_and_changed_files(tmp_path: Path) -> None:
    out = Output(str(tmp_path / "out"))
    key = artifact_key("output", "1", counts=["a"])
    assert not out.current(key)
    out.put_table("mixture/part-00000.parquet", pa.table({"x": [1, 2, 3]}))
    out.put_table("plan/part-00000.parquet", pa.table({"x": [1]}))
    out.seal(key, {"rows": 3})
    assert out.current(key)
    assert sorted(out.manifest()["files"]) == [
        "mixture/part-00000.parquet",
        "plan/part-00000.parquet",
    ]
    assert not out.current(artifact_key("output", "1", counts=["b"]))
    out.put_table("mixture/part-00000.parquet", pa.table({"x": list(range(1000))}))
    assert not out.current(key)  # resized
    (tmp_path / "out" / "plan" / "part-00000.parquet").unlink()
    assert not out.current(key)
    out.clear()
    assert out.manifest() is None and not (tmp_path / "out" / "mixture").exists()


def test_keys_do_not_depend_on_the_machine(tmp_path: Path) -> None:
    import shutil

    from samplemix.scoring.models import model_fingerprint, resolve_model

    # "auto" precision is keyed as configured, not as this machine resolves it.
    cfg = load_config(None, {"corpus.input": "x"})
    shard = Shard("/data/web/a.parquet", "web/a.parquet", "web", "10:1")
    assert keys.embed_key(shard, cfg).parts["embed"]["dtype"] == "auto"
    # A model is fingerprinted by content: a copy elsewhere hashes the same, an edit differs.
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(resolve_model("minilm"), a)
    shutil.copytree(a, b)
    assert model_fingerprint(str(a)) == model_fingerprint(str(b))
    (b / "config.json").write_text((b / "config.json").read_text().replace("384", "385"))
    model_fingerprint.cache_clear()
    assert model_fingerprint(str(a)) != model_fingerprint(str(b))
    with pytest.raises(ConfigError, match="not a folder or file on this machine"):
        model_fingerprint(str(tmp_path / "missing-model"))
    assert len(model_fingerprint("org/hub-model")) == 16  # a hub id: its name


def test_kmeans_never_refit_decides_without_counts(tmp_path: Path) -> None:
    cfg = load_config(None, {"corpus.input": "x", "kmeans.refit": "never"})
    store = Store(str(tmp_path))
    embed = _embed_keys(3)
    old = keys.kmeans_key(embed[:2], cfg)
    store.commit(old, {"k": 2})
    km, why = keys.kmeans_to_use(store, embed, [None, None, None], cfg)
    assert km == old and why == "kept the fit over 2 of 3 shards (refit: never)"


def test_storage_options_carry_credentials_but_never_hold_them() -> None:
    from samplemix.config import ConfigError

    cfg = load_config(
        None,
        {
            "corpus.input": "s3://b/c",
            "storage.key": "AK",
            "storage.secret": "SK",
            "storage.token": "TK",
            "storage.endpoint_url": "http://127.0.0.1:9000",
        },
    )
    opts = cfg.storage.fsspec_options("s3://b/c")
    assert (opts["key"], opts["secret"], opts["token"]) == ("AK", "SK", "TK")
    assert opts["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9000"}
    assert cfg.storage.fsspec_options("/local/path") == {}
    with pytest.raises(ConfigError, match=r"credentials \['secret'\] do not belong"):
        load_config(None, {"corpus.input": "x", "storage.options": {"secret": "SK"}})
