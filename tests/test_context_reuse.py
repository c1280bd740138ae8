"""Prefect's per-task context is built once per worker (tasks/context_reuse.py), and a
task still runs under exactly the flow's settings."""

from __future__ import annotations

import os
import ssl

import certifi
from dask.distributed import LocalCluster
from dask.tokenize import tokenize
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import SettingsContext
from prefect.settings import PREFECT_TASK_DEFAULT_RETRIES, temporary_settings
from prefect_dask import DaskTaskRunner

from tasks.context_reuse import _SharedVerifiedContexts, reuse_task_context


@task(cache_policy=NO_CACHE)
def worker_settings() -> tuple[int, int, int]:
    """(worker pid, id of the settings this task runs under, their default retries)."""
    from prefect.settings import get_current_settings

    import tasks  # noqa: F401 - a worker imports it unpickling its first samplemix task

    s = get_current_settings()
    return os.getpid(), id(s), s.tasks.default_retries


@flow
def probe(n: int) -> list[tuple[int, int, int]]:
    return [f.result() for f in [worker_settings.submit() for _ in range(n)]]


def test_workers_build_each_settings_once_and_follow_the_flows(prefect_server: str) -> None:
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True) as cluster:
        runner = DaskTaskRunner(address=cluster.scheduler_address)
        # The worker installs the reuse while its first task runs: warm it up.
        probe.with_options(task_runner=runner)(1)
        default = probe.with_options(task_runner=runner)(3)
        with temporary_settings({PREFECT_TASK_DEFAULT_RETRIES: 3}):
            changed = probe.with_options(task_runner=runner)(3)
        again = probe.with_options(task_runner=runner)(3)
    assert len({pid for pid, _, _ in default + changed + again}) == 1  # one worker
    assert {r for _, _, r in default} == {r for _, _, r in again} == {0}
    assert {r for _, _, r in changed} == {3}  # the flow's temporary setting reached it
    # One settings object per distinct settings, found again by its content.
    assert len({i for _, i, _ in default}) == len({i for _, i, _ in changed}) == 1
    assert default[0][1] != changed[0][1]
    assert again[0][1] == default[0][1]


@flow
def serialized_twice() -> tuple[bool, bool]:
    ctx = SettingsContext.get()
    a, b = ctx.serialize(), ctx.serialize()
    return a is b, tokenize(a) == tokenize(b)


def test_the_flow_serializes_its_settings_once(prefect_server: str) -> None:
    assert reuse_task_context()  # this Prefect has what it wraps
    assert serialized_twice() == (True, True)
    with temporary_settings({PREFECT_TASK_DEFAULT_RETRIES: 3}):
        assert SettingsContext.get().serialize()["settings"]["tasks"]["default_retries"] == 3


def test_a_verified_ssl_context_is_shared_and_others_are_not() -> None:
    shim = _SharedVerifiedContexts()
    verified = shim.create_default_context(cafile=certifi.where())
    assert verified is shim.create_default_context(cafile=certifi.where())
    assert verified.verify_mode == ssl.CERT_REQUIRED and verified.get_ca_certs()
    assert shim.create_default_context() is not shim.create_default_context()
    assert shim.SSLContext is ssl.SSLContext and shim.CERT_NONE == ssl.CERT_NONE
