"""Scale benchmark of the mix flow (issue 28, item 6): cost, memory, task runs and store
size from 10^4 to 10^6 documents, and what they project to at 10^9.

Corpus: ``--source`` (the shared corpus) cycled until N documents exist, replica r of a
document with id ``<id>-r<r>`` and ``replica <r>`` as its text's first line, so that every
document is distinct; written as Parquet shards of ``--shard-docs`` documents, one domain
folder each, the domains interleaved shard by shard. Written once per N under ``--work``
(streamed: at most one shard in memory) and reused while the folder holds N documents.

Each N is one cold run as a user starts it: ``python -m samplemix.cli run`` in a
subprocess (its temporary Prefect server and default LocalCluster, from this checkout),
with the static embedder (``samplemix distill-embedder``, made once under ``--work``), the
default quality scorer, a budget of half the source tokens, and a fresh store and output.
A thread here samples that process and its descendants every 0.5 s (psutil): per process
its CPU-s (user + system, last seen, so a process that exits keeps what it had used by
then) and its peak RSS (the kernel's high-water mark, VmHWM), in classes: ``flow`` (the
CLI process, which also runs the Dask scheduler and the nannies), ``worker`` (the Dask
worker processes the nannies spawn), ``server`` (the Prefect server, uvicorn) and
``other``. The tree's total CPU-s is exact: this process's RUSAGE_CHILDREN before and
after; what the samples missed (the last half second of each process) is the
difference. From the run summary (the output's manifest): per stage its calls, its task
runs (``flows.mix.task_groups`` over the computed and the cached calls, as the flow
groups them) and its task seconds (summed over tasks); the store's size is ``du -sb``.

A tiny run of one shard first measures the fixed cost (server, cluster, imports): the
marginal CPU-s per 1k documents, (CPU(N) - CPU(tiny)) / (N - tiny), is printed beside
the raw CPU(N) / N. The projection to 10^9 documents uses the marginal rate of the
largest N: workers = ceil(N / (r · W · u)) (docs/sizing.md; r per single-threaded
worker, u = 0.7), CPU-hours, peak RSS (flow, largest worker), task runs per stage
(``task_groups`` of the calls, per-shard stages scaled by shards), mixture parts
(``output.max_part_bytes``) and store size, both linear in N.

Usage: python -m bench.bench_scale --docs 10000 100000 [--work /tmp/scale]
       [--shard-docs 600] [--max-part-bytes 4MB] [--window-hours 24]
Writes WORK/scale-<N>.json per run (the tiny one too) and WORK/run-<N>.log (the CLI's
output); prints the machine, the tables and the projection in Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from bench.bench_evaluate import cpu
from bench.procfs import status_bytes
from flows.mix import TASK_RUNS_PER_STAGE, task_groups
from samplemix.config import load_config
from samplemix.pipeline.graph import GRAPH, OUTPUT_STAGES

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "corpus"
CLASSES = ("flow", "worker", "server", "other")
TARGET = 10**9  # documents the projection is for
UTILISATION = 0.7  # u of docs/sizing.md
MiB = 2**20


# ---- the corpus ---------------------------------------------------------------------------


def source_chunks(src: Path, shard_docs: int) -> list[tuple[str, pa.Table]]:
    """One replica of ``src``: per domain folder its documents (id, source, text; shards
    in name order) cut into chunks of ``shard_docs``, the domains interleaved chunk by
    chunk (the first chunk of every domain, then the second, ...)."""
    by_domain = {}
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        tables = [
            pj.read_json(f) if f.name.endswith(".jsonl.gz") else pq.read_table(f)
            for f in sorted(folder.glob("part-*"))
        ]
        docs = pa.concat_tables(t.select(["id", "source", "text"]) for t in tables)
        by_domain[folder.name] = [
            docs.slice(i, shard_docs) for i in range(0, docs.num_rows, shard_docs)
        ]
    depth = max(len(chunks) for chunks in by_domain.values())
    return [
        (domain, chunks[j])
        for j in range(depth)
        for domain, chunks in by_domain.items()
        if j < len(chunks)
    ]


def corpus_docs(folder: Path) -> int:
    """Documents in the Parquet shards under ``folder`` (from their footers)."""
    return sum(pq.read_metadata(f).num_rows for f in folder.rglob("*.parquet"))


def distinct_corpus(src: Path, dst: Path, docs: int, shard_docs: int) -> Path:
    """``dst``: ``docs`` distinct documents made from ``src`` (module docstring), kept
    when it already holds that many. Written to a sibling folder renamed last, so a
    killed run leaves no partial corpus under ``dst``."""
    if dst.is_dir() and corpus_docs(dst) == docs:
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    chunks = source_chunks(src, shard_docs)
    left, replica = docs, 0
    while left:
        for j, (domain, chunk) in enumerate(chunks):
            chunk = chunk.slice(0, left)
            text = pc.binary_join_element_wise(f"replica {replica}\n", chunk["text"], "")
            ids = pc.binary_join_element_wise(chunk["id"], f"-r{replica}", "")
            table = chunk.set_column(0, "id", ids).set_column(2, "text", text)
            (tmp / domain).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, tmp / domain / f"part-r{replica:05d}-{j:03d}.parquet")
            left -= table.num_rows
            if not left:
                break
        replica += 1
    tmp.rename(dst)
    return dst


def static_embedder(work: Path) -> Path:
    """The static embedder distilled from MiniLM under ``work`` (made once)."""
    folder = work / "minilm-static"
    if not (folder / "model.safetensors").exists():
        cli = [sys.executable, "-m", "samplemix.cli", "distill-embedder", "--out", str(folder)]
        subprocess.run(cli, cwd=ROOT, check=True, capture_output=True)
    return folder


# ---- the process tree ---------------------------------------------------------------------


def process_class(proc: psutil.Process, root: int) -> str:
    """``flow`` (``root``), ``worker`` (a process a Dask nanny in ``root`` spawned),
    ``server`` (uvicorn: the Prefect server) or ``other``."""
    if proc.pid == root:
        return "flow"
    cmdline = " ".join(proc.cmdline())
    if "uvicorn" in cmdline:
        return "server"
    if "spawn_main" in cmdline and proc.ppid() == root:
        return "worker"
    return "other"


class ProcessTree:
    """Samples process ``root`` and its descendants every ``every`` s until the context
    exits. ``seen[(pid, start time)]``: class, command line, peak RSS, when the peak was
    first seen (``peak_at_s``, seconds since the sampling began: the run's log says
    which stage was running then), the RSS over time (``rss_timeline``: (s, bytes)
    whenever it moved by 4 MiB) and CPU-s (user + system) as last sampled."""

    def __init__(self, root: int, every: float = 0.5) -> None:
        self.root, self.every = root, every
        self.t0 = time.perf_counter()
        self.seen: dict[tuple[int, float], dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            top = psutil.Process(self.root)
            procs = [top, *top.children(recursive=True)]
        except psutil.Error:  # the run has ended
            return
        for proc in procs:
            try:
                with proc.oneshot():
                    key = (proc.pid, proc.create_time())
                    if key not in self.seen:
                        self.seen[key] = {
                            "pid": proc.pid,
                            "class": process_class(proc, self.root),
                            "cmdline": " ".join(proc.cmdline())[:200],
                        }
                    times = proc.cpu_times()
                    rss = status_bytes("VmHWM", proc.pid)
                    resident = proc.memory_info().rss
            except (psutil.Error, OSError, StopIteration):  # gone meanwhile
                continue
            seen, now = self.seen[key], round(time.perf_counter() - self.t0, 1)
            if rss > seen.get("peak_rss", 0):
                seen["peak_at_s"] = now
            # The resident set over time, a point whenever it moved by 4 MiB or more.
            timeline = seen.setdefault("rss_timeline", [])
            if not timeline or abs(resident - timeline[-1][1]) >= 4 * MiB:
                timeline.append((now, resident))
            seen |= {"cpu_s": times.user + times.system, "peak_rss": rss}

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def __enter__(self) -> ProcessTree:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def processes(self) -> list[dict]:
        """Every process sampled at least once with its figures."""
        return [p for p in self.seen.values() if "cpu_s" in p]


def children_cpu_s() -> float:
    """User + system CPU-s of this process's finished (waited for) descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def du_bytes(folder: Path) -> int:
    """``du -sb``: the apparent size of every file under ``folder``."""
    out = subprocess.run(["du", "-sb", str(folder)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


# ---- one run ------------------------------------------------------------------------------


def measured_run(
    corpus: Path, work: Path, embedder: Path, sets: list[str], tiny: dict | None
) -> dict:
    """A cold ``samplemix run`` of ``corpus`` into ``WORK/run-<N>`` (removed first) and
    what it cost (module docstring); with ``tiny`` (the one-shard run's record), the
    marginal CPU-s per 1k documents too. Raises SystemExit when the run fails."""
    docs = corpus_docs(corpus)
    out = work / f"run-{docs}"
    shutil.rmtree(out, ignore_errors=True)
    settings = [f"embed.model={embedder}", *sets]
    cmd = [sys.executable, "-m", "samplemix.cli", "run", "--input", str(corpus)]
    cmd += ["--output", str(out), "--budget-ratio", "0.5"]
    cmd += [arg for s in settings for arg in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # a temporary server
    log = work / f"run-{docs}.log"
    cpu_before, t0 = children_cpu_s(), time.perf_counter()
    started = datetime.datetime.now().isoformat(timespec="seconds")  # peak_at_s counts from here
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=sink)
        with ProcessTree(proc.pid) as tree:
            rc = proc.wait()
    wall, cpu_s = time.perf_counter() - t0, children_cpu_s() - cpu_before
    if rc:
        raise SystemExit(f"samplemix run on {docs:,} documents failed (exit {rc}): see {log}")
    summary = json.loads((out / "_manifest.json").read_text())["summary"]
    budget = next((out / "store" / "budget").glob("*/_done.json"))
    procs = tree.processes()
    by_class = {c: [p for p in procs if p["class"] == c] for c in CLASSES}
    calls = {s: summary["computed"][s] + summary["cached"][s] for s in summary["computed"]}
    record = {
        "docs": docs,
        "documents_accepted": summary["documents"],
        "shards": sum(1 for _ in corpus.rglob("*.parquet")),
        "command": cmd,
        "started": started,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu_s, 1),
        "cpu_s_per_1k": round(1000 * cpu_s / docs, 2),
        "cpu_s_by_class": {c: round(sum(p["cpu_s"] for p in ps), 1) for c, ps in by_class.items()},
        "peak_rss_mib": {
            c: round(max((p["peak_rss"] for p in ps), default=0) / MiB)
            for c, ps in by_class.items()
        },
        "worker_processes": len(by_class["worker"]),
        "calls": calls,
        "task_runs": {
            s: len(task_groups(summary["computed"][s], None))
            + len(task_groups(summary["cached"][s], None))
            for s in calls
        },
        "task_s_per_1k": {s: round(1000 * t / docs, 3) for s, t in summary["task_seconds"].items()},
        "mixture_parts": summary["mixture_parts"],
        "expected_mixture_bytes": json.loads(budget.read_text())["summary"]["expected_bytes"],
        "store_bytes": du_bytes(out / "store"),
        "store_files": sum(len(files) for _, _, files in os.walk(out / "store")),
        "scatter_files": sum(1 for _ in (out / "store" / "counts").glob("*/pieces.arrows")),
        "mixture_rows": summary["mixture_rows"],
        "processes": sorted(procs, key=lambda p: p["pid"]),
    }
    record["cpu_s_sampled"] = round(sum(record["cpu_s_by_class"].values()), 1)
    record["task_runs_total"] = sum(record["task_runs"].values())
    if tiny is not None:
        extra = (cpu_s - tiny["cpu_s"]) / (docs - tiny["docs"])
        record["marginal_cpu_s_per_1k"] = round(1000 * extra, 2)
    (work / f"scale-{docs}.json").write_text(json.dumps(record, indent=1))
    return record


# ---- the report ---------------------------------------------------------------------------


def header(args: argparse.Namespace, max_part_bytes: int) -> str:
    """Machine, date, commit and settings."""

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True).stdout

    commit = git("rev-parse", "--short", "HEAD").strip()
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "-uno").strip() else ""
    load = os.getloadavg()[0]
    return (
        f"Machine: {cpu()}, {psutil.virtual_memory().total / 2**30:.0f} GiB; load average "
        f"{load:.1f} at the start. Date: {datetime.date.today()}. Commit: "
        f"{commit}{dirty}. "
        f"Python {sys.version.split()[0]}.\nSettings: static embedder, default quality scorer, "
        f"budget 0.5 T_src, shards of {args.shard_docs} documents, output.max_part_bytes "
        f"{max_part_bytes / MiB:g} MiB, default LocalCluster."
    )


def markdown(rows: list[list[str]]) -> str:
    """``rows`` (the first one the header) as a Markdown table."""
    lines = ["| " + " | ".join(rows[0]) + " |", "| --- |" + " ---: |" * (len(rows[0]) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def runs_table(records: list[dict]) -> str:
    """One row per N: time, CPU, memory, task runs, store."""
    head = ["documents", "shards", "wall s", "CPU-s (flow / workers / server / other)"]
    head += ["sampled CPU-s", "CPU-s per 1k docs", "marginal CPU-s per 1k"]
    head += ["peak RSS flow MiB", "peak RSS largest worker MiB", "peak RSS server MiB"]
    head += ["task runs", "task runs / shard", "parts", "store MiB", "store files (scatter)"]
    rows = [head]
    for r in records:
        by = r["cpu_s_by_class"]
        rows.append(
            [
                f"{r['docs']:,}",
                f"{r['shards']:,}",
                f"{r['wall_s']:,.0f}",
                f"{r['cpu_s']:,.0f} ({' / '.join(f'{by[c]:,.0f}' for c in CLASSES)})",
                f"{r['cpu_s_sampled']:,.0f}",
                f"{r['cpu_s_per_1k']:.1f}",
                f"{r['marginal_cpu_s_per_1k']:.1f}" if "marginal_cpu_s_per_1k" in r else "-",
                f"{r['peak_rss_mib']['flow']:,}",
                f"{r['peak_rss_mib']['worker']:,}",
                f"{r['peak_rss_mib']['server']:,}",
                f"{r['task_runs_total']:,}",
                f"{r['task_runs_total'] / r['shards']:.2f}",
                f"{r['mixture_parts']:,}",
                f"{r['store_bytes'] / MiB:,.1f}",
                f"{r['store_files']:,} ({r['scatter_files']:,})",
            ]
        )
    return markdown(rows)


def stages_table(records: list[dict]) -> str:
    """Per stage and N: task seconds per 1k documents, and task runs (of calls)."""
    stages = list(records[-1]["calls"])
    rows = [["stage", *(f"{r['docs']:,}: task s / 1k docs, runs (calls)" for r in records)]]
    for s in stages:
        cells = [
            f"{r['task_s_per_1k'].get(s, 0):.2f}, {r['task_runs'].get(s, 0):,} "
            f"({r['calls'].get(s, 0):,})"
            for r in records
        ]
        rows.append([s, *cells])
    return markdown(rows)


def acceptance(first: dict, last: dict) -> str:
    """The issue's criteria from ``first`` to ``last`` (the smallest and largest N)."""

    def ratio(key: str, sub: str | None = None) -> float:
        a, b = (first[key], last[key]) if sub is None else (first[key][sub], last[key][sub])
        return b / a

    group = max(1, -(-last["shards"] // TASK_RUNS_PER_STAGE))  # shards per task run
    largest = max(last["peak_rss_mib"].values()) / max(first["peak_rss_mib"].values())
    return "\n".join(
        [
            f"From {first['docs']:,} to {last['docs']:,} documents:",
            f"- CPU-s per 1k docs, raw: x{ratio('cpu_s_per_1k'):.3f}; marginal: "
            f"x{ratio('marginal_cpu_s_per_1k'):.3f} (within ±15%: 0.85 to 1.15)",
            f"- peak RSS of the largest process: x{largest:.2f} (flow "
            f"x{ratio('peak_rss_mib', 'flow'):.2f}, largest worker "
            f"x{ratio('peak_rss_mib', 'worker'):.2f}; within 1.25)",
            f"- task runs: x{ratio('task_runs_total'):.2f} for x{ratio('shards'):.2f} shards "
            f"(at most {group} shards per task run at {last['docs']:,} documents)",
        ]
    )


def projection(first: dict, last: dict, args: argparse.Namespace, max_part_bytes: int) -> str:
    """10^9 documents from the largest run ``last`` (memory growth from ``first``)."""
    scale = TARGET / last["docs"]
    per_1k = last["marginal_cpu_s_per_1k"]
    rate = 1000 / per_1k  # documents per CPU-second: one single-threaded worker's r
    window = args.window_hours * 3600
    workers = math.ceil(TARGET / (rate * window * UTILISATION))
    shards = math.ceil(TARGET / args.shard_docs)
    parts = math.ceil(last["expected_mixture_bytes"] * scale / max_part_bytes)
    per_shard = {s.name: s.per_shard for s in (*GRAPH, *OUTPUT_STAGES)}
    runs = {}
    for stage, calls in last["calls"].items():
        if stage == "materialise":
            calls = parts
        elif per_shard[stage]:
            calls = round(calls * shards / last["shards"])
        runs[stage] = len(task_groups(calls, None))

    # Each shard's counts write one pieces file (every part's copies); each part's writer
    # reads an index entry and a piece from every shard with copies: shards x parts reads.
    reads = shards * parts
    other_files = (last["store_files"] - last["scatter_files"]) * scale

    def memory(cls: str) -> str:
        a, b = first["peak_rss_mib"][cls], last["peak_rss_mib"][cls]
        grew = "grew" if b > 1.25 * a else "flat"
        return (
            f"{b:,} MiB at {last['docs']:,} documents (x{b / a:.2f} from {first['docs']:,}: {grew})"
        )

    return "\n".join(
        [
            f"Projection to 10^9 documents (from {last['docs']:,}; marginal rate r = "
            f"{rate:.0f} docs/s per single-threaded worker):",
            f"- workers for a {args.window_hours:g} h window: ceil(10^9 / ({rate:.0f} · "
            f"{window:,.0f} · {UTILISATION})) = **{workers:,}**",
            f"- CPU-hours: 10^6 · {per_1k:.2f} / 3600 = {TARGET / 1000 * per_1k / 3600:,.0f}",
            f"- peak RSS, flow: {memory('flow')}",
            f"- peak RSS, largest worker: {memory('worker')}",
            f"- shards of {args.shard_docs}: {shards:,}; task runs per stage: "
            + ", ".join(f"{s} {n:,}" for s, n in runs.items())
            + f" ({sum(runs.values()):,} in all)",
            f"- mixture parts of {max_part_bytes / MiB:g} MiB: {parts:,}",
            f"- store: {last['store_bytes'] * scale / 2**40:,.2f} TiB (linear in N); files: "
            f"{other_files:,.0f} (linear) + {shards:,} pieces files of counts (one per "
            f"shard); the parts' writers read {reads:,.3g} pieces (shards x parts: use "
            "larger shards at this size)",
        ]
    )


def run_records(args: argparse.Namespace, sets: list[str]) -> Iterator[dict]:
    """The tiny run, then one run per ``--docs``, each record as it finishes."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    embedder = static_embedder(work)
    tiny = None
    for docs in [args.shard_docs, *sorted(args.docs)]:
        t0 = time.perf_counter()
        corpus = distinct_corpus(Path(args.source), work / f"corpus-{docs}", docs, args.shard_docs)
        made = time.perf_counter() - t0
        record = measured_run(corpus, work, embedder, sets, tiny)
        tiny = tiny or record
        print(
            f"{docs:,} documents: corpus {made:.0f} s, run {record['wall_s']:.0f} s, "
            f"{record['cpu_s']:.0f} CPU-s",
            file=sys.stderr,
            flush=True,
        )
        yield record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, nargs="+", required=True, help="corpus sizes N")
    ap.add_argument("--work", default="/tmp/scale", help="corpora, embedder, runs, JSON")
    ap.add_argument("--source", default=str(SHARED), help="corpus the documents come from")
    ap.add_argument("--shard-docs", type=int, default=600)
    ap.add_argument("--max-part-bytes", help="output.max_part_bytes, e.g. 4MB (default: 256MiB)")
    ap.add_argument("--window-hours", type=float, default=24, help="for the projection")
    args = ap.parse_args()
    sets = [f"output.max_part_bytes={args.max_part_bytes}"] if args.max_part_bytes else []
    cfg = load_config(None, {"corpus.input": args.source, **dict(s.split("=", 1) for s in sets)})
    max_part_bytes = cfg.output.max_part_bytes
    print(header(args, max_part_bytes), flush=True)
    records = list(run_records(args, sets))
    measured = records[1:]
    print("\n" + runs_table(records))
    print(f"\nThe first row ({records[0]['docs']:,} documents) is the fixed-cost run.")
    print("\n" + stages_table(records))
    print("\n" + acceptance(measured[0], measured[-1]))
    print("\n" + projection(measured[0], measured[-1], args, max_part_bytes))


if __name__ == "__main__":
    main()
