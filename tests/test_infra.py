"""infra/: the compose file, the Kubernetes manifests and the Dockerfile, checked
without Docker or a cluster (neither runs on CI machines).

Each file is validated against its published schema where the schema is installed
(the compose specification as check-jsonschema vendors it; Kubernetes' OpenAPI
schemas as kubernetes-validate ships them), with `docker compose config` where a
Docker client with the compose plugin exists, and always by the checks that
schemas cannot make: that the parts are wired to each other (service names, ports,
the work pool, the shared output folder, the image's working folder).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
SAMPLEMIX_SERVICES = {
    "buckets",
    "dask-scheduler",
    "dask-cpu-worker",
    "dask-gpu-worker",
    "deploy",
    "prefect-worker",
}
DASK_WORKERS = ("dask-cpu-worker", "dask-gpu-worker")


def command(service: dict) -> list[str]:
    cmd = service.get("command") or service.get("args") or []
    return cmd if isinstance(cmd, list) else cmd.split()


def workdir() -> str:
    """The image's WORKDIR (the deployments' runs start there)."""
    [line] = [s for s in (INFRA / "Dockerfile").read_text().splitlines() if s.startswith("WORKDIR")]
    return line.split()[1]


def pool_name() -> str:
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    [pool] = {d["work_pool"]["name"] for d in spec["deployments"]}
    return pool


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    """kind/name -> document, over every file the kustomization lists."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def test_compose_file_matches_the_compose_specification(compose: dict) -> None:
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema (which vendors the compose schema) is not installed")
    import jsonschema

    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((schema_file / "compose-spec.json").read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("no docker client with the compose plugin")
    # `config` renders and validates the file; it needs no Docker daemon.
    done = subprocess.run(
        [docker, "compose", "-f", str(INFRA / "compose.yaml"), "--profile", "gpu", "config", "-q"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_compose_services_are_wired_to_each_other(compose: dict) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
    # Every samplemix process runs the one image built from infra/Dockerfile, in its WORKDIR.
    for name in SAMPLEMIX_SERVICES:
        svc = services[name]
        assert svc["image"] == "samplemix:latest", name
        assert (INFRA / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == (
            INFRA / "Dockerfile"
        )
        assert svc["working_dir"] == workdir(), name

    # The scheduler listens where the flow runs and the workers look for it.
    sched = command(services["dask-scheduler"])
    port = sched[sched.index("--port") + 1]
    address = f"tcp://dask-scheduler:{port}"
    assert services["prefect-worker"]["environment"]["DASK_SCHEDULER_ADDRESS"] == address
    for name in DASK_WORKERS:
        assert address in command(services[name]), name
    assert f"{port}:{port}" in services["dask-scheduler"]["ports"]

    # Flow and Dask workers reach MinIO with its own credentials.
    minio = services["minio"]
    api_port = "9000"
    assert f"{api_port}:{api_port}" in minio["ports"]
    for name in ("prefect-worker", "buckets", *DASK_WORKERS):
        env = services[name]["environment"]
        assert urlparse(env["AWS_ENDPOINT_URL"]).netloc == f"minio:{api_port}", name
        assert env["AWS_ACCESS_KEY_ID"] == minio["environment"]["MINIO_ROOT_USER"], name
        assert env["AWS_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"], name

    # Local output paths work across containers: one volume, one path, in the flow's
    # container and every Dask worker, where relative paths (out/...) resolve.
    for name in ("prefect-worker", *DASK_WORKERS):
        assert f"out:{workdir()}/out" in services[name]["volumes"], name
    assert "out" in compose["volumes"]

    # The Prefect server keeps its state in the Postgres service, and is the same
    # Prefect release the project pins.
    server = services["prefect-server"]
    db = urlparse(server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    pg = services["postgres"]["environment"]
    assert (db.hostname, db.username, db.path.lstrip("/")) == (
        "postgres",
        pg["POSTGRES_USER"],
        pg["POSTGRES_DB"],
    )
    pinned = re.search(r'"prefect==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert server["image"].startswith(f"prefecthq/prefect:{pinned}-")
    for name in ("deploy", "prefect-worker"):
        assert services[name]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"

    # The worker polls the pool the deployments name; `deploy` deploys that file.
    worker = command(services["prefect-worker"])
    assert worker[worker.index("--pool") + 1] == pool_name()
    deploy = " ".join(command(services["deploy"]))
    assert f"work-pool create {pool_name()} --type process" in deploy
    assert "--prefect-file deployments/prefect.yaml" in deploy

    # GPU workers: dask-cuda on every GPU the NVIDIA runtime exposes, only on request.
    gpu = services["dask-gpu-worker"]
    assert command(gpu)[:3] == ["dask", "cuda", "worker"]
    assert gpu["profiles"] == ["gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "cuda" not in command(services["dask-cpu-worker"])
    # Tokenizing feeds the GPU (docs/sizing.md): threaded there, single-threaded on CPU workers.
    assert gpu["environment"]["TOKENIZERS_PARALLELISM"] == "true"
    assert services["dask-cpu-worker"]["environment"]["TOKENIZERS_PARALLELISM"] == "false"


def test_kubernetes_manifests_match_the_kubernetes_schemas(manifests: dict[str, dict]) -> None:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip("kubernetes-validate (Kubernetes' schemas) is not installed")
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    for name, doc in manifests.items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {e.message} at {list(e.path)}")


def test_kubernetes_manifests_are_wired_to_each_other(manifests: dict[str, dict]) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    [image] = kustomization["images"]
    env = dict(line.split("=", 1) for line in kustomization["configMapGenerator"][0]["literals"])
    service = manifests["Service/dask-scheduler"]
    port = next(p for p in service["spec"]["ports"] if p["name"] == "tcp-comm")
    address = f"tcp://{service['metadata']['name']}:{port['port']}"
    assert env["DASK_SCHEDULER_ADDRESS"] == address

    workloads = {k: v for k, v in manifests.items() if k.split("/")[0] in ("Deployment", "Job")}
    assert set(workloads) == {
        "Deployment/dask-scheduler",
        "Deployment/dask-gpu-worker",
        "Deployment/dask-cpu-worker",
        "Deployment/prefect-worker",
        "Job/samplemix-deploy",
    }
    for name, doc in workloads.items():
        pod = doc["spec"]["template"]
        if doc["kind"] == "Deployment":
            assert (
                doc["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
            )
        [container] = pod["spec"]["containers"]
        assert container["image"] == image["name"], name  # kustomize sets the registry
        refs = [r.get("configMapRef", {}).get("name") for r in container.get("envFrom", [])]
        if name != "Deployment/dask-scheduler":
            assert "samplemix-env" in refs, name
    # The Service selects the scheduler pod and its named port exists there.
    sched_pod = workloads["Deployment/dask-scheduler"]["spec"]["template"]
    assert service["spec"]["selector"].items() <= sched_pod["metadata"]["labels"].items()
    [sched] = sched_pod["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in sched["ports"]}
    assert str(port["port"]) == sched["args"][sched["args"].index("--port") + 1]

    for name in ("Deployment/dask-gpu-worker", "Deployment/dask-cpu-worker"):
        [worker] = workloads[name]["spec"]["template"]["spec"]["containers"]
        assert "tcp://dask-scheduler:8786" in worker["args"], name
    [gpu] = workloads["Deployment/dask-gpu-worker"]["spec"]["template"]["spec"]["containers"]
    assert gpu["args"][:3] == ["dask", "cuda", "worker"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    [cpu] = workloads["Deployment/dask-cpu-worker"]["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    gpu_env = {e["name"]: e.get("value") for e in gpu["env"]}
    assert gpu_env["TOKENIZERS_PARALLELISM"] == "true"  # wins over the ConfigMap's "false"
    assert env["TOKENIZERS_PARALLELISM"] == "false"

    # The Prefect worker and the deploy Job agree with deployments/prefect.yaml and
    # start where the image keeps the repository.
    [worker] = workloads["Deployment/prefect-worker"]["spec"]["template"]["spec"]["containers"]
    assert worker["args"][worker["args"].index("--pool") + 1] == pool_name()
    [job] = workloads["Job/samplemix-deploy"]["spec"]["template"]["spec"]["containers"]
    assert f"work-pool create {pool_name()} --type process" in job["args"][0]
    assert "--prefect-file deployments/prefect.yaml" in job["args"][0]
    for container in (worker, job):
        assert container["workingDir"] == workdir()


def test_dockerfile_installs_the_project_where_the_deployments_run() -> None:
    text = (INFRA / "Dockerfile").read_text()
    lines = [s.strip() for s in text.splitlines() if s.strip() and not s.startswith("#")]
    assert lines[0].startswith("ARG ") and any(s.startswith("FROM python:") for s in lines)
    assert workdir() == "/opt/samplemix"
    # dask-cuda's pinned dask must be in place before the project's own dependencies.
    order = [i for i, s in enumerate(lines) if "dask-cuda" in s or "COPY . ." in s]
    assert "dask-cuda" in lines[order[0]] and "COPY . ." in lines[order[-1]]
    assert "pip install --no-deps -e ." in text
    # The build context (the repository root) leaves out local environments and outputs.
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "out"} <= set(ignored)


def test_image_workers_keep_glibcs_adaptive_malloc() -> None:
    """The image's Dask config (infra/dask.yaml, copied to /etc/dask) unsets the
    MALLOC_TRIM_THRESHOLD_ that Dask's nannies would give each worker (flows/runtime.py)."""
    import dask
    from distributed.nanny import _get_env_variables

    assert "COPY infra/dask.yaml /etc/dask/" in (INFRA / "Dockerfile").read_text()
    image = dask.config.collect(paths=[str(INFRA / "dask.yaml")], env={})
    # Dask's own default (importing flows.mix unset it in this process).
    trim = {"distributed": {"nanny": {"pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": 65536}}}}
    base = dask.config.merge(dask.config.config, trim)
    for config, trimmed in ((base, True), (dask.config.merge(base, image), False)):
        with dask.config.set(config):
            spawned = _get_env_variables("distributed.nanny.pre-spawn-environ")
        assert ("MALLOC_TRIM_THRESHOLD_" in spawned) == trimmed
        assert spawned["OMP_NUM_THREADS"] == "1"
