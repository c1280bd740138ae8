"""Faults: a worker killed mid-stage, an object store that is missing, refuses us, is
unreachable, or drops out for a few seconds. Real servers throughout: moto's
standalone S3 server, a TCP proxy in front of it that can be cut, a real Prefect
server and a real Dask LocalCluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
from conftest import tiny_config, write_tiny_corpus
from distributed.scheduler import KilledWorker
from s3 import KEY, REGION, SECRET, FlakyProxy, MotoServer, free_port, s3_storage_options

from flows.mix import run_mix
from samplemix.config import load_config
from samplemix.io.corpus import CorpusError, discover_shards, read_docs
from samplemix.io.store import (
    KILL_BEFORE_COMMIT,
    Output,
    Store,
    StoreError,
    artifact_key,
    transient,
)
from samplemix.pipeline import keys, stages
from samplemix.pipeline.plan import plan_steps


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, cluster: dict) -> Path:
    """The tiny corpus and an uninterrupted run's output, under one folder."""
    root = tmp_path_factory.mktemp("faults")
    run_mix(tiny_config(write_tiny_corpus(root / "corpus"), root / "clean", **cluster))
    return root


@pytest.mark.slow
def test_worker_killed_in_embed_leaves_nothing_trusted_and_rerun_matches(
    clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(clean / "corpus", tmp_path / "killed")
    # Every worker that reaches an embed commit dies by SIGKILL after writing the
    # embeddings and before the completion marker; Dask gives up at the first loss.
    monkeypatch.setenv(KILL_BEFORE_COMMIT, "embed")
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        pytest.raises(KilledWorker),
    ):
        run_mix(cfg)
    monkeypatch.delenv(KILL_BEFORE_COMMIT)

    store = keys.store_for(cfg)
    embed = store.artifacts("embed")
    assert embed and not any(a.committed for a in embed)  # files written, none committed
    assert all((Path(store.root) / "embed" / a.id / "embeddings.npy").exists() for a in embed)
    reasons = {s.reason for s in plan_steps(cfg, store, keys.output_for(cfg)) if s.stage == "embed"}
    assert "incomplete artifact (interrupted run): recompute" in reasons
    assert not (tmp_path / "killed" / "_manifest.json").exists()

    summary = run_mix(cfg)
    assert summary["computed"]["embed"] == 6  # the partial files were not trusted
    assert file_bytes(tmp_path / "killed" / "mixture") == file_bytes(clean / "clean" / "mixture")
    assert file_bytes(tmp_path / "killed" / "plan") == file_bytes(clean / "clean" / "plan")


def cli_run(corpus: Path, out: Path, *extra: str) -> subprocess.Popen:
    """`samplemix run` of ``tiny_config(corpus, out)`` in its own process group."""
    args = ["--input", str(corpus), "--output", str(out), "--budget-ratio", "0.8"]
    args += ["--workers", "2", "--set", "embed.max_length=32", "--set", "kmeans.k=3", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "samplemix.cli", "run", *args],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def on_cluster(cluster: dict) -> list[str]:
    """``samplemix run`` options that put a run on the session's cluster."""
    return [a for k, v in cluster.items() for a in ("--set", f"{k}={v}")]


@pytest.mark.slow
def test_two_runs_on_one_output_take_turns(clean: Path, tmp_path: Path, cluster: dict) -> None:
    """While one run holds the output's lease, a second fails at once with wait 0, and
    with a longer wait runs after it, finding everything done."""
    out = tmp_path / "out"
    first = cli_run(clean / "corpus", out, *on_cluster(cluster))
    deadline = time.monotonic() + 120
    while not (out / "_lease.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, "first run did not start"
        time.sleep(0.1)
    cfg = tiny_config(clean / "corpus", out, **cluster)
    cfg.output.lease_wait_s = 0
    # Paused, the first run holds its lease however quick its compute is on this machine
    # (its process stays alive and its lease unexpired for the few seconds it takes).
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StoreError, match="is being written by another run"):
            run_mix(cfg)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    cfg.output.lease_wait_s = 600
    second = run_mix(cfg)
    assert first.wait(timeout=60) == 0
    assert set(second["computed"].values()) == {0}
    assert file_bytes(out / "mixture") == file_bytes(clean / "clean" / "mixture")
    assert not (out / "_lease.json").exists()


@pytest.mark.slow
def test_two_runs_sharing_a_store_at_once(clean: Path, tmp_path: Path, cluster: dict) -> None:
    """Two runs with their own outputs and one store, started together on one cluster,
    compute the same artifacts side by side: both finish with the clean run's mixture,
    and a third run on that store finds every artifact complete and computes nothing."""
    store = ["--set", f"output.store={tmp_path / 'store'}", *on_cluster(cluster)]
    runs = [cli_run(clean / "corpus", tmp_path / name, *store) for name in ("a", "b")]
    assert [r.wait(timeout=600) for r in runs] == [0, 0]
    for name in ("a", "b"):
        assert file_bytes(tmp_path / name / "mixture") == file_bytes(clean / "clean" / "mixture")
    cfg = tiny_config(
        clean / "corpus", tmp_path / "c", **{"output.store": str(tmp_path / "store")}, **cluster
    )
    third = run_mix(cfg)
    computed = {stage: n for stage, n in third["computed"].items() if n}
    # Only its own output: the mixture's parts, the plan shard by shard and the rejects.
    shards = third["computed"]["tokens"] + third["cached"]["tokens"]
    assert computed == {
        "materialise": third["mixture_parts"],
        "publish-plan": shards,
        "publish-rejects": 1,
    }
    assert file_bytes(tmp_path / "c" / "mixture") == file_bytes(clean / "clean" / "mixture")


@pytest.mark.slow
def test_flow_process_killed_between_stages_resumes_to_the_same_output(
    clean: Path, tmp_path: Path
) -> None:
    """SIGKILL the whole `samplemix run` (flow, temporary server, workers) once the
    cluster statistics are committed; a rerun reuses what was committed and ends with
    the uninterrupted run's bytes."""
    out = tmp_path / "out"
    proc = cli_run(clean / "corpus", out)
    deadline = time.monotonic() + 300
    while not list((out / "store" / "clusters").glob("*/_done.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended or stalled"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "_manifest.json").exists()

    summary = run_mix(tiny_config(clean / "corpus", out))
    reused = ("tokens", "quality", "embed", "kmeans", "assign", "clusters")
    assert all(summary["computed"][s] == 0 for s in reused), summary["computed"]
    assert file_bytes(out / "mixture") == file_bytes(clean / "clean" / "mixture")
    assert file_bytes(out / "plan") == file_bytes(clean / "clean" / "plan")


# ---- the object store -------------------------------------------------------------------


def test_missing_bucket_is_named_with_the_fix(moto: MotoServer) -> None:
    store = Store("s3://no-such-bucket/store", s3_storage_options(moto.endpoint), retries=0)
    with pytest.raises(StoreError, match=r"s3://no-such-bucket/store.*create it.*aws s3 mb"):
        store.check()


def test_wrong_credentials_are_named_with_the_fix() -> None:
    # With no unauthenticated actions allowed, moto checks every request's access key.
    with MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as strict:
        options = s3_storage_options(strict.endpoint) | {"key": "AKIAWRONGKEY000"}
        with pytest.raises(StoreError) as e:
            Store("s3://mix/store", options, retries=0).check()
    msg = str(e.value)
    assert msg.startswith(f"access denied to s3://mix/store/_probe (endpoint {strict.endpoint})")
    assert "AWS_ACCESS_KEY_ID" in msg and "storage.key" in msg


def test_unreachable_endpoint_is_named_with_the_fix() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = Store("s3://mix/store", s3_storage_options(endpoint), retries=1)
    with pytest.raises(StoreError) as e:
        store.check()
    msg = str(e.value)
    assert "cannot reach s3://mix/store/_probe" in msg and endpoint in msg
    assert "after 2 tries" in msg and "storage.endpoint_url" in msg


def test_outage_is_retried_with_backoff(proxy: FlakyProxy) -> None:
    store = Store("s3://mix/flaky", s3_storage_options(proxy.endpoint), retries=6)
    key = artifact_key("embed", "1", "a.parquet", x=1)
    proxy.down_for(2.0)
    store.put_array(key, "embeddings.npy", np.arange(6.0))
    store.commit(key, {"docs": 6})
    assert store.summary(key) == {"docs": 6}
    np.testing.assert_array_equal(store.get_array(key, "embeddings.npy"), np.arange(6.0))


def test_a_part_cut_off_mid_upload_is_written_again_whole(
    moto: MotoServer, proxy: FlakyProxy
) -> None:
    """The link goes down after the first 8 MiB upload part of a 20 MiB part and stays
    down until s3fs's own retries give up and the upload is dropped; the whole part is
    then written again; readers see the whole file, never a piece of it."""
    out = Output("s3://mix/cut", s3_storage_options(proxy.endpoint), retries=6)
    chunk = bytes(range(256)) * 4096  # 1 MiB
    tries = []

    def fill(f) -> int:  # noqa: ANN001 - a binary file object
        tries.append(len(tries))
        # Up only once the first try has failed: a timed outage raced s3fs's (random)
        # backoff, and on a slow machine the first try outlasted it and succeeded.
        proxy.up()
        for i in range(20):
            f.write(chunk)
            if len(tries) == 1 and i == 9:  # one 8 MiB part has gone up
                proxy.down()
        return 20

    assert out.put_stream("mixture/part-00000.parquet", fill) == 20
    assert len(tries) >= 2
    direct = Output("s3://mix/cut", moto.storage_options())
    assert direct.fs.cat_file("mix/cut/mixture/part-00000.parquet") == chunk * 20


def test_corpus_read_during_an_outage_is_retried_not_skipped(
    tmp_path: Path, moto: MotoServer, proxy: FlakyProxy
) -> None:
    """A network failure is not a bad shard: under on_bad_shard: skip it must raise (and
    be retried by Prefect), not be committed as an unreadable shard with no documents."""
    import s3fs

    corpus = write_tiny_corpus(tmp_path / "corpus")
    direct = s3fs.S3FileSystem(skip_instance_cache=True, **moto.storage_options())
    direct.put(str(corpus) + "/", "mix/outage-corpus/", recursive=True)
    cfg = load_config(
        None,
        {
            "corpus.input": "s3://mix/outage-corpus",
            "corpus.on_bad_shard": "skip",
            "storage.endpoint_url": proxy.endpoint,
            "storage.key": KEY,
            "storage.secret": SECRET,
            "storage.region": REGION,
            "storage.options": {"config_kwargs": {"retries": {"total_max_attempts": 1}}},
        },
    )
    shard = discover_shards(cfg.corpus, cfg.storage.fsspec_options(cfg.corpus.input))[0]
    assert read_docs(shard, cfg).docs.num_rows == 8
    proxy.down()
    with pytest.raises(Exception) as e:  # noqa: PT011 - whatever the network raised
        stages.read_docs(shard, cfg)
    assert transient(e.value) and not isinstance(e.value, CorpusError)


def test_outage_longer_than_the_retries_is_a_clear_error(proxy: FlakyProxy) -> None:
    store = Store("s3://mix/flaky", s3_storage_options(proxy.endpoint), retries=0)
    proxy.down()
    with pytest.raises(StoreError, match="cannot reach s3://mix/flaky/"):
        store.put_array(artifact_key("embed", "1", x=2), "embeddings.npy", np.zeros(2))


@pytest.mark.slow
def test_run_survives_store_outages(
    tmp_path: Path, moto: MotoServer, proxy: FlakyProxy, cluster: dict
) -> None:
    corpus = write_tiny_corpus(tmp_path / "corpus")
    cfg = tiny_config(corpus, tmp_path / "out", **cluster)
    cfg.output.store = "s3://mix/outage-store"
    cfg.storage.endpoint_url = proxy.endpoint
    cfg.storage.region = REGION
    cfg.storage.key = KEY  # type: ignore[assignment]  # validated into a SecretStr
    cfg.storage.secret = SECRET  # type: ignore[assignment]
    # Three-second outages, two seconds apart, for the first half minute of the run.
    stop = threading.Event()

    def flap() -> None:
        while not stop.wait(2.0):
            proxy.down()
            if stop.wait(3.0):
                break
            proxy.up()
        proxy.up()

    flapper = threading.Thread(target=flap, daemon=True)
    flapper.start()
    threading.Timer(30.0, stop.set).start()
    try:
        summary = run_mix(cfg)
    finally:
        stop.set()
        flapper.join()
    reference = run_mix(tiny_config(corpus, tmp_path / "reference", **cluster))
    assert summary["realised_tokens"] == reference["realised_tokens"]
    assert file_bytes(tmp_path / "out" / "mixture") == file_bytes(
        tmp_path / "reference" / "mixture"
    )
    store = keys.store_for(cfg)
    assert store.root.startswith("s3://")
    assert store.artifacts() and all(a.committed for a in store.artifacts())


def test_credentials_from_a_prefect_aws_block(moto: MotoServer, prefect_server: str) -> None:
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    from flows.runtime import with_block_credentials
    from samplemix.config import ConfigError

    AwsCredentials(
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name=REGION,
        aws_client_parameters=AwsClientParameters(endpoint_url=moto.endpoint),
    ).save("samplemix-test", overwrite=True)
    cfg = load_config(
        None,
        {
            "corpus.input": "x",
            "output.store": "s3://mix/block-store",
            "storage.aws_credentials_block": "samplemix-test",
        },
    )
    resolved = with_block_credentials(cfg)
    assert resolved.storage.endpoint_url == moto.endpoint
    assert resolved.storage.key.get_secret_value() == KEY
    keys.store_for(resolved).check()  # reaches moto: the endpoint came from the block
    cfg.storage.aws_credentials_block = "no-such-block"
    with pytest.raises(ConfigError, match="'no-such-block' cannot be loaded"):
        with_block_credentials(cfg)
