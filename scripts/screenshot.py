"""Screenshots of the Prefect UI for docs/: a finished deployment run and its artifacts.

Does what docs/deploy.md tells a new user to do, on a throwaway Prefect server (its
own PREFECT_HOME, 127.0.0.1:PORT): creates the process work pool, deploys
deployments/prefect.yaml, starts a worker, runs the `mix` deployment on the example
corpus (short settings, output in a temporary folder), waits for it through the
API, then runs it again. Then it drives headless Chromium over the DevTools protocol
and saves

    OUT/ui-run.png        the mix run: state, duration, its task runs named stage/shard
    OUT/ui-artifacts.png  the run's Artifacts tab (report, tables, progress bars)
    OUT/ui-report.png     the mixture-report Markdown artifact with its embedded plots
    OUT/ui-rerun.png      the second run: every task run Cached

Everything it started (server, worker, browser) is stopped at the end.

    .venv/bin/python scripts/screenshot.py [--port 4299] [--out docs]

Needs Debian's Chromium (`apt-get install -y chromium`) or --chromium PATH.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POOL = "samplemix-local"
# The example corpus, shortened so the run takes about two minutes on two cores.
OVERRIDES = {"embed.max_length": 64, "kmeans.k": 12, "compute.n_workers": 2}


def wait_until(check: Callable[[], object], what: str, timeout: float) -> object:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if value := check():
                return value
        time.sleep(0.5)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def background(cmd: list[str], log: Path, env: dict, cwd: Path = ROOT) -> Iterator[None]:
    """Run ``cmd`` in its own process group for the block, then stop that group."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


class Page:
    """One Chromium tab over the DevTools protocol (JSON messages on a websocket)."""

    def __init__(self, ws_url: str, width: int, height: int) -> None:
        from websockets.sync.client import connect  # a dependency of Prefect

        self.ws = connect(ws_url, max_size=None)
        self.n = 0
        self.size(width, height)

    def call(self, method: str, **params: object) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def size(self, width: int, height: int) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def js(self, expression: str) -> object:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        return result["result"].get("value")

    def open(self, url: str, ready_js: str, what: str) -> None:
        self.call("Page.navigate", url=url)
        wait_until(lambda: self.js(ready_js), what, 60)
        time.sleep(2)  # let charts and fonts settle after the data arrived

    def save(self, path: Path) -> None:
        path.write_bytes(
            base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        )
        print(f"wrote {path}")


def run_deployment(env: dict, out: Path) -> dict[str, str]:
    """Deploy, run `samplemix/mix` twice (the second run finds everything in the store)
    and return the ids of the two `mix` subflow runs and of the first's report."""
    deploy = ["prefect", "--no-prompt", "deploy", "--all"]
    subprocess.run(
        [*deploy, "--prefect-file", "deployments/prefect.yaml"],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    code = f"""
import json, sys
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, FlowRunFilter,
    FlowRunFilterParentFlowRunId)
from prefect.deployments import run_deployment
ids = {{}}
for name in ("run", "rerun"):
    run = run_deployment("samplemix/mix", timeout=1800, poll_interval=2, parameters={{
        "config_path": "examples/mix.yaml",
        "overrides": {{**{OVERRIDES!r}, "output.path": {str(out)!r}}}}})
    if not run.state.is_completed():
        sys.exit(f"the run ended {{run.state.name}}: {{run.state.message}}")
    with get_client(sync_client=True) as client:
        [child] = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
        ids[name] = str(child.id)
        if name == "run":
            [report] = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[child.id]),
                key=ArtifactFilterKey(any_=["mixture-report"])))
            ids["report"] = str(report.id)
print(json.dumps(ids))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def screenshots(chromium: str, ui: str, ids: dict[str, str], out: Path, tmp: Path) -> None:
    port = free_port()
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        # The machine has no network: Chromium's own background calls would only fail.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'chromium'}",
        f"--remote-debugging-port={port}",
        "about:blank",
    ]
    with background(cmd, tmp / "chromium.log", dict(os.environ)):

        def page_target() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                pages = [t for t in json.load(r) if t["type"] == "page"]
            return pages[0]["webSocketDebuggerUrl"] if pages else None

        page = Page(str(wait_until(page_target, "Chromium's DevTools", 60)), 1500, 1250)

        def run_tab(run_id: str, tab: str, shows: str, name: str) -> None:
            page.open(
                f"{ui}/runs/flow-run/{run_id}",
                "document.body.innerText.includes('Completed')",
                "the flow run page",
            )
            page.js(
                "[...document.querySelectorAll('.p-tab')]"
                f".find(e => e.textContent.trim() === {tab!r}).click()"
            )
            wait_until(
                lambda: page.js(f"document.body.innerText.includes({shows!r})"),
                f"the {tab} tab",
                30,
            )
            time.sleep(2)
            page.save(out / name)

        run_tab(ids["run"], "Task Runs", "/part-0", "ui-run.png")
        run_tab(ids["run"], "Artifacts", "mixture-report", "ui-artifacts.png")
        run_tab(ids["rerun"], "Task Runs", "Cached", "ui-rerun.png")
        page.size(1500, 2200)
        page.open(
            f"{ui}/artifacts/artifact/{ids['report']}",
            "[...document.images].filter(i => i.src.startsWith('data:image/png')"
            " && i.complete).length >= 3",
            "the report artifact's plots",
        )
        page.save(out / "ui-report.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=4299, help="Prefect server port (127.0.0.1)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="Folder for the PNGs")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    args = ap.parse_args()
    if not Path(args.chromium).exists():
        sys.exit(f"no Chromium at {args.chromium}: apt-get install -y chromium, or --chromium PATH")
    args.out.mkdir(parents=True, exist_ok=True)
    bin_dir = str(Path(sys.executable).parent)
    with tempfile.TemporaryDirectory(prefix="samplemix-ui-") as tmp_name:
        tmp = Path(tmp_name)
        ui = f"http://127.0.0.1:{args.port}"
        env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PREFECT_HOME": str(tmp / "prefect"),
            "PREFECT_API_URL": f"{ui}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
        }
        server = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(args.port)]
        with background(server, tmp / "server.log", env):
            wait_until(
                lambda: urllib.request.urlopen(f"{ui}/api/health", timeout=2).status == 200,
                f"the Prefect server on port {args.port} (log: {tmp / 'server.log'})",
                180,
            )
            subprocess.run(
                ["prefect", "work-pool", "create", POOL, "--type", "process", "--overwrite"],
                cwd=ROOT,
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
            )
            worker = ["prefect", "worker", "start", "--pool", POOL]
            with background(worker, tmp / "worker.log", env, cwd=tmp):
                ids = run_deployment(env, tmp / "out")
            screenshots(args.chromium, ui, ids, args.out, tmp)


if __name__ == "__main__":
    main()
