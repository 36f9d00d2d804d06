"""Benchmarks of eventuali-api-server against the ceiling of its own HTTP stack.

    python benchmarks/bench.py                 # everything, at full sizes
    python benchmarks/bench.py --quick         # tiny sizes: a smoke run (used by the tests)
    python benchmarks/bench.py --only emit,sse # a subset: see --help for the parts
    python benchmarks/bench.py --only emit,batch --against ../other-checkout
                                               # A/B: the same load, alternating, on both

Each part starts the server from this checkout on a free port with a fresh data dir,
prints a table, and writes every figure to --json (default benchmarks/results/latest.json).
Load comes from `wrk` when it is installed (Debian: apt-get install wrk), else from a
Python client, which is slower than the server and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEED_AGENT = {
    "name": "agent.started",
    "attributes": {"agent_name": "url-cacher", "message": "Agent started successfully"},
    "aggregate_id": "url-cacher-abc123",
    "correlation_id": "workflow-def456",
    "causation_id": "parent-agent-789",
}
UVICORN = [sys.executable, "-m", "uvicorn", "--no-access-log", "--log-level", "warning"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PIDS: dict = {}  # url -> the pid of the server process serving it


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process and its children (workers) have used so far
    (/proc/PID/stat, Linux)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, ticks
    tree = {pid}
    for _ in range(3):  # children, and theirs
        tree |= {child for child, (parent, _) in stats.items() if parent in tree}
    ticks = sum(stats[member][1] for member in tree if member in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


SHIMS = Path(tempfile.mkdtemp(prefix="eventuali-bench-default-install-"))
atexit.register(shutil.rmtree, SHIMS, True)
for _name in ("uvloop", "httptools"):  # stand-ins that make a process as without the [fast] extra
    (SHIMS / f"{_name}.py").write_text("raise ImportError('a default install has no ' + __name__)\n")
FAST = False  # --fast: the parts run with uvloop and httptools, where installed


def install_env(default_install: bool) -> dict:
    """The environment that makes a server process (and its workers) as without [fast]."""
    if not default_install:
        return {}
    return {"PYTHONPATH": os.pathsep.join([str(SHIMS), os.environ.get("PYTHONPATH", "")])}


@contextmanager
def running(command: list, port: int, env: dict, cwd: Path | None = None, probe: str = "/") -> Iterator[str]:
    """The server that `command` starts on `port`, once it answers `probe`; stopped after."""
    proc = subprocess.Popen(
        command, cwd=cwd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    PIDS[url] = proc.pid
    try:
        deadline = time.time() + 30
        while True:
            try:
                httpx.get(url + probe, timeout=1)  # any answer: it serves
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.time() > deadline:
                    proc.kill()
                    raise RuntimeError("server did not start: " + proc.communicate()[1].decode()) from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


@contextmanager
def serve(app: str, cwd: Path, env: dict | None = None) -> Iterator[str]:
    """`uvicorn app` on a free port; the same uvicorn settings for every app measured: the
    default install's (asyncio, h11) unless --fast."""
    port = free_port()
    with running([*UVICORN, "--port", str(port), app], port, {**install_env(not FAST), **(env or {})}, cwd) as url:
        yield url


@contextmanager
def events_server(env: dict | None = None, code: Path = ROOT) -> Iterator[str]:
    """The server of the checkout at `code` (this one by default), on a fresh data dir."""
    with (
        tempfile.TemporaryDirectory() as data,
        serve("eventuali_api_server:app", code, {"DATA_DIR": data, **(env or {})}) as url,
    ):
        yield url


@contextmanager
def command_server(
    *flags: str, default_install: bool = False, env: dict | None = None, code: Path = ROOT
) -> Iterator[str]:
    """The server of the checkout at `code` as its command starts it (`python
    eventuali_api_server.py`), on a fresh data dir; with default_install, as without the [fast]
    extra: uvloop and httptools do not import, in the workers too (a PYTHONPATH of stand-ins
    that raise ImportError)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        command = [sys.executable, str(code / "eventuali_api_server.py"), "--port", str(port), "--data-dir", data]
        extra = {**install_env(default_install), **(env or {})}
        with running([*command, "--log-level", "warning", *flags], port, extra, probe="/health") as url:
            time.sleep(0.5)  # every worker up
            yield url


def percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# -- load generation ------------------------------------------------------------


def wrk_p99(out: str) -> float:
    """The 99th percentile of wrk's latency distribution (--latency), in ms."""
    value = next(line.split()[1] for line in out.splitlines() if line.strip().startswith("99%"))
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def wrk_post(url: str, body: dict, connections: int, seconds: float) -> tuple:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
    )
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "--timeout",
                "10s",
                "--latency",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        script.unlink()
    errors = [line for line in out.splitlines() if "Non-2xx" in line or "Socket errors" in line]
    if errors:
        if not errors[0].strip().startswith("Socket errors: connect 0, read 0, write 0"):
            raise RuntimeError(f"wrk saw errors: {errors}")
        print(f"  (wrk: {errors[0].split(',')[-1].strip()}: requests that waited over 10 s, not counted)")
    rate = float(next(line for line in out.splitlines() if line.startswith("Requests/sec")).split()[1])
    requests = int(next(line for line in out.splitlines() if "requests in" in line).split()[0])
    return rate, requests, wrk_p99(out)


async def _python_post(url: str, body: bytes, connections: int, seconds: float) -> tuple:
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    done = 0
    latencies: list = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection(host, int(port))
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode())
            length = int(
                next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            )
            await reader.readexactly(length)
            latencies.append((time.perf_counter() - sent) * 1000)
            done += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return done / (time.perf_counter() - started), done, percentile(latencies, 99)


def post_load(url: str, body: dict, connections: int, seconds: float) -> tuple:
    """(requests per second, server CPU seconds per request, p99 latency in ms) under a fixed
    POST load."""
    pid = PIDS.get(url.split("/events")[0])
    before = cpu_seconds(pid) if pid else 0.0
    if shutil.which("wrk"):
        rate, requests, p99 = wrk_post(url, body, connections, seconds)
    else:
        rate, requests, p99 = asyncio.run(_python_post(url, json.dumps(body).encode(), connections, seconds))
    cpu = (cpu_seconds(pid) - before) / max(1, requests) if pid else float("nan")
    return rate, cpu, p99


# -- parts ------------------------------------------------------------------------------


def alternate(targets: dict, args: argparse.Namespace) -> tuple:
    """Emit load on each target in turn, args.runs rounds: ({name: requests/s per run},
    {name: server CPU seconds per request, per run})."""
    rates: dict = {name: [] for name in targets}
    cpus: dict = {name: [] for name in targets}
    for url in targets.values():  # warm up each
        post_load(url + "/events/emit/agent", SEED_AGENT, args.connections, 1)
    for _ in range(args.runs):
        for name, url in targets.items():
            rate, cpu, _p99 = post_load(url + "/events/emit/agent", SEED_AGENT, args.connections, args.seconds)
            rates[name].append(rate)
            cpus[name].append(cpu)
    return rates, cpus


def medians(targets: dict, args: argparse.Namespace) -> dict:
    """alternate(), as {name: (median requests/s, median CPU µs per request, CPU µs per run)}."""
    rates, cpus = alternate(targets, args)
    return {
        name: (statistics.median(rates[name]), statistics.median(cpus[name]) * 1e6, [c * 1e6 for c in cpus[name]])
        for name in targets
    }


def bench_emit(args: argparse.Namespace, results: dict) -> None:
    """POST /events/emit/agent vs the bare endpoint (and --against's server), in alternating
    runs: the ratio of rates, and the server's CPU time per request."""
    names = ["bare", "server"] + (["against"] if args.against else [])
    with (
        serve("bare:app", HERE) as bare,
        events_server({"DURABILITY": args.durability}) as server,
        events_server({"DURABILITY": args.durability}, args.against) if args.against else nullcontext() as other,
    ):
        rates, cpus = alternate(dict(zip(names, [bare, server, other])), args)
    median = {name: statistics.median(rates[name]) for name in names}
    cpu_us = {name: statistics.median(cpus[name]) * 1e6 for name in names}
    ratios = [s / b for s, b in zip(rates["server"], rates["bare"])]
    results["emit"] = {
        "connections": args.connections,
        "seconds_per_run": args.seconds,
        "runs": args.runs,
        "durability": args.durability,
        "bare_rps": rates["bare"],
        "server_rps": rates["server"],
        "bare_median": median["bare"],
        "server_median": median["server"],
        "ratio_of_medians": median["server"] / median["bare"],
        "ratio_per_run": ratios,
        "ratio_median": statistics.median(ratios),
        "cpu_us_per_request": {name: cpus[name] for name in names},
        "cpu_us_per_request_median": cpu_us,
    }
    print(
        f"emit, {args.connections} connections, durability={args.durability}: "
        f"server {median['server']:,.0f}/s, bare endpoint {median['bare']:,.0f}/s, "
        f"ratio {median['server'] / median['bare']:.2f} (per run: {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    print("  server CPU per request (median of runs): " + ", ".join(f"{name} {cpu_us[name]:.0f} µs" for name in names))
    if args.against:
        per_run = [a / b for a, b in zip(cpus["server"], cpus["against"])]
        results["emit"]["against"] = {
            "path": str(args.against),
            "rps": rates["against"],
            "median": median["against"],
            "cpu_ratio_per_run": per_run,
        }
        print(
            f"  against {args.against}: {median['against']:,.0f}/s; CPU per request, this / that: "
            f"{cpu_us['server'] / cpu_us['against']:.3f} (per run: {', '.join(f'{r:.2f}' for r in per_run)})"
        )


# Events the reads part loads carry their own timestamps, one every READ_STEP seconds from
# READ_BASE on: a million of them span a month, as a log of that size would, where events the
# server stamps as fast as it takes them would all fall in a minute or two.
READ_STEP = 2.6
READ_BASE = time.time() - 1_000_000 * READ_STEP - 86_400


def read_timestamp(i: int) -> str:
    return datetime.fromtimestamp(READ_BASE + i * READ_STEP, timezone.utc).isoformat()


def make_events(start: int, stop: int, workflows: int = 100, stamped: bool = False) -> list:
    """A mix of workflows, agents (with parents) and sessions, like agent hooks emit; stamped,
    each with its timestamp (read_timestamp)."""
    events = []
    for i in range(start, stop):
        wf = f"wf-{i % workflows}"
        kind = i % 10
        if kind == 0:
            events.append(
                {
                    "kind": "workflow",
                    "name": "workflow.progress",
                    "aggregate_id": wf,
                    "attributes": {"user_prompt": "do it", "i": i},
                }
            )
        elif kind == 9:
            events.append(
                {"kind": "system", "name": "session.tick", "aggregate_id": f"session-{i % 7}", "correlation_id": wf}
            )
        else:
            events.append(
                {
                    "kind": "agent",
                    "name": "agent.step" if kind % 2 else "agent.started",
                    "aggregate_id": f"agent-{i % (workflows * 5)}",
                    "correlation_id": wf,
                    "causation_id": f"agent-{i % 3}",
                    "attributes": {"agent_name": f"worker-{kind}", "step": i},
                }
            )
        if stamped:
            events[-1]["timestamp"] = read_timestamp(i)
    return events


def load_events(url: str, count: int, batch: int = 1000, senders: int = 3, start: int | None = None) -> float:
    """Append `count` events in batches from a few concurrent senders (so that the client's
    own JSON encoding overlaps the server's work); returns events per second."""
    return timed_load(url, count, batch, senders, start)[0]


def timed_load(url: str, count: int, batch: int = 1000, senders: int = 3, start: int | None = None) -> tuple:
    """load_events, and the server's CPU seconds per event; with `start`, the events from that
    number on, stamped (make_events)."""
    pid = PIDS.get(url)
    first = start or 0
    bodies = [
        json.dumps({"events": make_events(i, min(first + count, i + batch), stamped=start is not None)}).encode()
        for i in range(first, first + count, batch)
    ]

    def send(chunk: list) -> None:
        with httpx.Client(base_url=url, timeout=120, headers={"content-type": "application/json"}) as client:
            for body in chunk:
                client.post("/events/emit/batch", content=body).raise_for_status()

    started, cpu = time.perf_counter(), cpu_seconds(pid) if pid else 0.0
    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(send, [bodies[i::senders] for i in range(senders)]))
    rate = count / (time.perf_counter() - started)
    return rate, (cpu_seconds(pid) - cpu) / count if pid else float("nan")


def bench_batch(args: argparse.Namespace, results: dict) -> None:
    """The batch load; with --against, alternating rounds on both servers."""
    names = ["server"] + (["against"] if args.against else [])
    rates: dict = {name: [] for name in names}
    cpus: dict = {name: [] for name in names}
    rounds = args.runs if args.against else 1
    with (
        events_server({"DURABILITY": args.durability}) as server,
        events_server({"DURABILITY": args.durability}, args.against) if args.against else nullcontext() as other,
    ):
        targets = dict(zip(names, [server, other]))
        for _ in range(rounds):
            for name, url in targets.items():
                rate, cpu = timed_load(url, args.batch_events // rounds)
                rates[name].append(rate)
                cpus[name].append(cpu)
    rate = statistics.median(rates["server"])
    cpu_us = {name: statistics.median(cpus[name]) * 1e6 for name in names}
    results["batch"] = {
        "events": args.batch_events,
        "events_per_second": rate,
        "rounds": rates,
        "cpu_us_per_event": cpu_us,
    }
    print(
        f"batch load: {rate:,.0f} events/s ({args.batch_events:,} events in batches of 1000); "
        f"server CPU {cpu_us['server']:.1f} µs per event"
    )
    if args.against:
        print(
            f"  against {args.against}: {statistics.median(rates['against']):,.0f} events/s, "
            f"CPU {cpu_us['against']:.1f} µs per event; rounds this: "
            f"{', '.join(f'{r:,.0f}' for r in rates['server'])}; that: "
            f"{', '.join(f'{r:,.0f}' for r in rates['against'])}"
        )


def agent_traces(spans: int, per_request: int = 512) -> list[bytes]:
    """About `spans` spans of agent runs made with the OpenTelemetry SDK, in OTLP protobuf
    requests of `per_request` spans (the BatchSpanProcessor's default batch): each trace a
    root agent and two sub-agents, each agent two model calls with usage and two tool calls,
    about a kilobyte of GenAI attributes a span."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "bench-agents"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("bench")
    prompt, answer = "Summarise the quarterly report. " * 18, "The report says revenue grew. " * 10

    def agent(name: str, depth: int) -> None:
        attributes = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": name, "gen_ai.system": "openai"}
        with tracer.start_as_current_span(f"invoke_agent {name}", attributes=attributes):
            for i in range(2):
                with tracer.start_as_current_span(
                    "chat gpt-4o",
                    attributes={
                        "gen_ai.operation.name": "chat",
                        "gen_ai.request.model": "gpt-4o",
                        "gen_ai.response.model": "gpt-4o-2024-08-06",
                        "gen_ai.usage.input_tokens": 812 + i,
                        "gen_ai.usage.output_tokens": 96,
                        "gen_ai.input.messages": prompt,
                        "gen_ai.output.messages": answer,
                    },
                ):
                    pass
                with tracer.start_as_current_span(
                    "execute_tool search",
                    attributes={
                        "gen_ai.operation.name": "execute_tool",
                        "gen_ai.tool.name": "search",
                        "gen_ai.tool.call.id": f"call_{i}",
                        "gen_ai.tool.call.arguments": prompt[:400],
                        "gen_ai.tool.call.result": answer,
                    },
                ):
                    pass
            if depth == 0:
                agent("researcher", 1)
                agent("writer", 1)

    while len(memory.get_finished_spans()) < spans:
        agent("planner", 0)
    provider.shutdown()
    finished = list(memory.get_finished_spans())
    return [
        encode_spans(finished[i : i + per_request]).SerializeToString() for i in range(0, len(finished), per_request)
    ]


def span_count(bodies: list[bytes]) -> int:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    total = 0
    for body in bodies:
        request = ExportTraceServiceRequest.FromString(body)
        total += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    return total


def post_exports(url: str, bodies: list[bytes], senders: int = 2) -> float:
    """POST the OTLP requests from a few concurrent exporters; seconds until every one was
    answered (on this server, answered means committed)."""

    def send(chunk: list) -> None:
        with httpx.Client(base_url=url, timeout=300, headers={"content-type": "application/x-protobuf"}) as client:
            for body in chunk:
                client.post("/v1/traces", content=body).raise_for_status()

    started = time.perf_counter()
    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(send, [bodies[i::senders] for i in range(senders)]))
    return time.perf_counter() - started


def peak_rss_kib(pid: int) -> int:
    """The largest resident set the process and its children have had (VmHWM, Linux)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if int(entry.name) == pid or parent == pid:
                total += int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) if "VmHWM" in status else 0
    return total


def bench_otlp(args: argparse.Namespace, results: dict) -> None:
    """OTLP ingest of agent traces: spans per second until every span is queryable, and peak
    memory, on this server beside its own batch emit in the same run; and on Arize Phoenix
    where `phoenix` is installed (PHOENIX_PYTHON names its interpreter: it lives best in a
    virtualenv of its own)."""
    bodies = agent_traces(args.otlp_spans)
    spans = span_count(bodies)
    row: dict = {"spans": spans, "requests": len(bodies), "request_bytes": sum(map(len, bodies)) // len(bodies)}
    with events_server({"DURABILITY": args.durability}) as url:
        pid = PIDS[url]
        seconds = post_exports(url, bodies)
        with httpx.Client(base_url=url) as client:
            stored = client.get("/events/", params={"limit": 1}).json()["total"]
        row.update(
            spans_per_second=spans / seconds,
            events_stored=stored,
            peak_rss_mib=peak_rss_kib(pid) / 1024,
        )
    with events_server({"DURABILITY": args.durability}) as url:
        row["batch_events_per_second"] = load_events(url, args.batch_events)
    row["ratio_to_batch"] = row["spans_per_second"] / row["batch_events_per_second"]
    print(
        f"OTLP ingest: {spans:,} spans in {len(bodies)} protobuf requests of ~{row['request_bytes'] // 1024} KiB: "
        f"{row['spans_per_second']:,.0f} spans/s until queryable ({stored:,} events), peak RSS "
        f"{row['peak_rss_mib']:.0f} MiB; batch emit in the same run {row['batch_events_per_second']:,.0f} "
        f"events/s: ratio {row['ratio_to_batch']:.2f}"
    )
    phoenix = os.environ.get("PHOENIX_PYTHON") or shutil.which("phoenix") and sys.executable
    if phoenix:
        row["phoenix"] = bench_phoenix(phoenix, bodies, spans)
    results["otlp"] = row


def bench_phoenix(python: str, bodies: list[bytes], spans: int) -> dict:
    """Arize Phoenix on its SQLite default in a throwaway working dir: its start, idle and peak
    memory, how fast it acknowledges the spans and how long until its GraphQL API counts them."""
    port, grpc = free_port(), free_port()
    with tempfile.TemporaryDirectory() as work:
        env = {
            "PHOENIX_WORKING_DIR": work,
            "PHOENIX_PORT": str(port),
            "PHOENIX_GRPC_PORT": str(grpc),
            "PHOENIX_HOST": "127.0.0.1",
        }
        started = time.perf_counter()
        proc = subprocess.Popen(
            [python, "-m", "phoenix.server.main", "serve"],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 180
            while True:
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("phoenix did not start")
                time.sleep(0.2)
            row: dict = {"start_seconds": time.perf_counter() - started}
            time.sleep(2)
            row["idle_rss_mib"] = peak_rss_kib(proc.pid) / 1024
            began = time.perf_counter()
            acknowledged = post_exports(url, bodies)
            query = {"query": "{ projects { edges { node { recordCount } } } }"}
            while True:
                reply = httpx.post(url + "/graphql", json=query, timeout=30).json()
                counted = sum(edge["node"]["recordCount"] for edge in reply["data"]["projects"]["edges"])
                if counted >= spans or time.perf_counter() - began > 900:
                    break
                time.sleep(0.5)
            queryable = time.perf_counter() - began
            row.update(
                acknowledged_spans_per_second=spans / acknowledged,
                queryable_after_seconds=queryable,
                spans_per_second=counted / queryable,
                counted=counted,
                peak_rss_mib=peak_rss_kib(proc.pid) / 1024,
            )
        finally:
            proc.terminate()
            proc.wait(30)
    print(
        f"  Arize Phoenix: started in {row['start_seconds']:.1f} s at {row['idle_rss_mib']:.0f} MiB; acknowledged "
        f"{row['acknowledged_spans_per_second']:,.0f} spans/s; all {row['counted']:,} queryable after "
        f"{row['queryable_after_seconds']:.1f} s ({row['spans_per_second']:,.0f} spans/s); peak RSS "
        f"{row['peak_rss_mib']:.0f} MiB"
    )
    return row


READS = [
    ("/events/", {}),
    ("/events/", {"event_type": "AgentEvent"}),
    ("/events/", {"aggregate_type": "workflow_aggregate"}),
    ("/events/", {"aggregate_id": "agent-7"}),
    ("/events/", {"correlation_id": "wf-3"}),
    ("/events/", {"event_name": "agent.started"}),
    ("/events/", {"since": "2000-01-01T00:00:00Z"}),
    ("/events/", {"since": "2999-01-01T00:00:00Z"}),
    ("/events/", {"since": "MID"}),
    ("/events/", {"until": "MID"}),
    ("/events/", {"offset": "DEEP"}),
    ("/events/", {"order": "asc", "after": "DEEP"}),
    ("/events/agents/agent-7", {}),
    ("/events/workflows/wf-3", {}),
    ("/events/workflows/wf-3/agents", {}),
    ("/health/database", {}),
]
# Every pair of the seven filters; MID is the timestamp of the middle event, where a time
# window splits the log in halves (the most work for an exact count), and a window of both
# covers the middle half.
FILTERS = {
    "event_type": "AgentEvent",
    "aggregate_type": "agent_aggregate",
    "aggregate_id": "agent-7",
    "correlation_id": "wf-3",
    "event_name": "agent.started",
    "since": "MID",
    "until": "MID",
}
PAIRS = [
    ("/events/", {a: FILTERS[a], b: FILTERS[b]})
    for i, a in enumerate(FILTERS)
    for b in list(FILTERS)[i + 1 :]
    if (a, b) != ("since", "until")
]
PAIRS.append(("/events/", {"since": "1/4", "until": "3/4"}))


def timestamp_at(client: httpx.Client, fraction: float, size: int) -> str:
    position = max(1, int(size * fraction))
    return client.get("/events/", params={"order": "asc", "after": position - 1, "limit": 1}).json()["events"][0][
        "timestamp"
    ]


def bench_reads(args: argparse.Namespace, results: dict, env: dict | None = None, key: str = "reads") -> None:
    """Read latency of every route and filter (and pair of filters, unless --no-pairs) at each
    of the sizes, events a month apart at a million (make_events); with --against, that
    checkout's server too, loaded alike, each query on both in turn."""
    table: dict = {}
    builds = {"this": ROOT, **({"against": args.against} if args.against and key == "reads" else {})}
    with contextlib.ExitStack() as stack:
        urls = {
            build: stack.enter_context(events_server({"DURABILITY": "normal", **(env or {})}, code=code))
            for build, code in builds.items()
        }
        clients = {build: stack.enter_context(httpx.Client(base_url=url, timeout=120)) for build, url in urls.items()}
        loaded = 0
        for size in args.read_sizes:
            for url in urls.values():
                load_events(url, size - loaded, start=loaded)
            loaded = size
            marks = {
                "MID": timestamp_at(clients["this"], 0.5, size),
                "1/4": timestamp_at(clients["this"], 0.25, size),
                "3/4": timestamp_at(clients["this"], 0.75, size),
            }
            for path, params in READS + (PAIRS if args.pairs else []):
                given = params
                params = {k: (str(size // 2) if v == "DEEP" else marks.get(v, v)) for k, v in params.items()}
                label = path + (
                    "?" + "&".join(f"{k}={'n/2' if v == 'DEEP' else v}" for k, v in given.items()) if given else ""
                )
                timings: dict = {build: [] for build in builds}
                totals = {}
                for _ in range(args.read_repeats):
                    for build, client in clients.items():
                        started = time.perf_counter()
                        reply = client.get(path, params=params)
                        timings[build].append((time.perf_counter() - started) * 1000)
                        reply.raise_for_status()
                        totals[build] = reply.json().get("total")
                if len(set(totals.values())) > 1:
                    raise RuntimeError(f"{label}: the builds disagree on the total: {totals}")
                for build in builds:
                    table.setdefault(build, {}).setdefault(label, {})[size] = {
                        "p50_ms": percentile(timings[build], 50),
                        "p99_ms": percentile(timings[build], 99),
                        "total": totals[build],
                    }
    results[key] = table["this"]
    if "against" in table:
        results[key + " against"] = {"path": str(args.against), **table["against"]}
    sizes = args.read_sizes
    for build, rows in table.items():
        name = key if build == "this" else f"{key} ({args.against})"
        print(f"{name}: read latency, ms (p50 / p99) at " + ", ".join(f"{s:,}" for s in sizes) + " events:")
        for label, row in rows.items():
            print(f"  {label:70s} " + "  ".join(f"{row[s]['p50_ms']:7.2f} / {row[s]['p99_ms']:7.2f}" for s in sizes))


async def _sse_latency(url: str, subscribers: int, events: int, post_url: str | None = None) -> dict:
    """Subscribers on `url`; events POSTed to `post_url` (another server of the same log), or to `url`."""
    host, port = url.split("//")[1].split(":")
    sent: dict = {}
    latencies: list = []
    received = [0] * subscribers
    ready = asyncio.Event()
    connected = 0

    async def subscriber(index: int) -> None:
        nonlocal connected
        reader, writer = await asyncio.open_connection(host, int(port), limit=2**20)
        writer.write(f"GET /events/stream HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await reader.readuntil(b"connected")
        connected += 1
        if connected == subscribers:
            ready.set()
        while received[index] < events:
            line = await reader.readline()
            if line.startswith(b"data: "):
                now = time.perf_counter()
                name = json.loads(line[6:])["event_name"]
                if name not in sent:  # an event of an earlier part, committed after its load ended
                    continue
                latencies.append((now - sent[name]) * 1000)
                received[index] += 1
        writer.close()

    tasks = [asyncio.ensure_future(subscriber(i)) for i in range(subscribers)]
    await asyncio.wait_for(ready.wait(), 60)
    async with httpx.AsyncClient(base_url=post_url or url) as client:
        for i in range(events):
            name = f"e{i}"
            sent[name] = time.perf_counter()
            (await client.post("/events/emit/system", json={"name": name})).raise_for_status()
            await asyncio.sleep(0.02 if subscribers < 500 else 0.2)
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return {
        "subscribers": subscribers,
        "events": events,
        "delivered": sum(received),
        "expected": subscribers * events,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
    }


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


async def _idle_streams(url: str, count: int) -> list:
    host, port = url.split("//")[1].split(":")
    conns = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /events/stream HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await reader.readuntil(b"connected")
        conns.append(writer)
    return conns


@contextmanager
def held_streams(url: str, paths: list) -> Iterator[None]:
    """Streams on these paths, opened and read (progress marks included) by a thread of their
    own for as long as the block runs."""
    loop = asyncio.new_event_loop()
    ready, stop = threading.Event(), asyncio.Event()
    host, port = url.split("//")[1].split(":")

    async def drain(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    async def hold() -> None:
        writers, drains = [], []
        for path in paths:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await reader.readuntil(b"connected")
            writers.append(writer)
            drains.append(asyncio.ensure_future(drain(reader)))
        ready.set()
        await stop.wait()
        for writer in writers:
            writer.close()
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(hold(),), daemon=True)
    thread.start()
    if not ready.wait(300):
        raise RuntimeError("the streams did not open")
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)


def fanout_ratio(args: argparse.Namespace, code: Path) -> dict:
    """Emit on a server of the checkout at `code` with `fanout_streams` streams, each filtered
    to a workflow of its own that no emitted event is of, against the same build with none,
    in alternating runs; then emit-to-receive latency with those streams and 20 that match
    every event."""
    n = args.fanout_streams
    name = f"{n} filtered streams"
    paths = [f"/events/stream?workflow_id=elsewhere-{i}" for i in range(n)]
    room = {"MAX_STREAMS": str(n + 100)}  # the held streams and the 20 that measure latency
    with (
        events_server(room, code=code) as plain,
        events_server(room, code=code) as watched,
        held_streams(watched, paths),
    ):
        figures = medians({"no streams": plain, name: watched}, args)
        latency = asyncio.run(_sse_latency(watched, 20, args.sse_events))
    return {
        "streams": n,
        "emit": {key: {"rps": row[0], "cpu_us": row[1], "cpu_us_runs": row[2]} for key, row in figures.items()},
        "ratio": figures[name][0] / figures["no streams"][0],
        "latency_20_matching": latency,
    }


def bench_fanout(args: argparse.Namespace, results: dict) -> None:
    """fanout_ratio for this checkout, and for --against's where one is given."""
    builds = {"this": ROOT, **({"against": args.against} if args.against else {})}
    results["fanout"] = {build: fanout_ratio(args, code) for build, code in builds.items()}
    for build, row in results["fanout"].items():
        print(
            f"fanout ({build}): emit with {row['streams']} streams filtered to other workflows "
            f"({args.runs} alternating runs):"
        )
        for key, figures in row["emit"].items():
            print(f"  {key:24s} {figures['rps']:8,.0f}/s  {figures['cpu_us']:6.0f} µs CPU per request")
        latency = row["latency_20_matching"]
        print(
            f"  ratio {row['ratio']:.2f}; with them, 20 matching subscribers: p50 {latency['p50_ms']:.2f} ms, "
            f"p99 {latency['p99_ms']:.2f} ms, delivered {latency['delivered']}/{latency['expected']}"
        )


def sse_against(args: argparse.Namespace, results: dict) -> None:
    """SSE latency with 20 subscribers on this checkout and on --against's, in alternating
    rounds, each on a fresh server."""
    rounds: dict = {"server": [], "against": []}
    for _ in range(args.runs):
        for name, code in (("server", ROOT), ("against", args.against)):
            with events_server(code=code) as url:
                rounds[name].append(asyncio.run(_sse_latency(url, 20, args.sse_events)))
    results["sse_against"] = {"path": str(args.against), "rounds": rounds}
    for name in rounds:
        p50 = [row["p50_ms"] for row in rounds[name]]
        p99 = [row["p99_ms"] for row in rounds[name]]
        print(
            f"SSE, 20 subscribers, {name}: p50 {statistics.median(p50):.2f} ms (rounds: "
            f"{', '.join(f'{v:.2f}' for v in p50)}), p99 {statistics.median(p99):.2f} ms"
        )


def bench_sse(args: argparse.Namespace, results: dict) -> None:
    if args.against:
        return sse_against(args, results)
    rows = []
    for count in args.sse_subscribers:
        with events_server() as url:
            rows.append(asyncio.run(_sse_latency(url, count, args.sse_events)))
    with events_server() as url:
        pid = PIDS.get(url)

        async def measure() -> tuple:
            before = _rss_kib(pid) if pid else 0
            conns = await _idle_streams(url, args.idle_streams)
            await asyncio.sleep(1)
            after = _rss_kib(pid) if pid else 0
            for writer in conns:
                writer.close()
            return before, after

        before, after = asyncio.run(measure())
    post = asyncio.run(_post_round_trip(args.sse_events * 5))
    results["sse"] = {
        "latency": rows,
        "idle_streams": args.idle_streams,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_idle_stream": (after - before) / max(1, args.idle_streams),
        "client_post_round_trip_ms": post,
    }
    print("SSE emit-to-receive latency (from just before the POST to each subscriber's receipt):")
    for row in rows:
        print(
            f"  {row['subscribers']:5d} subscribers: p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
            f"max {row['max_ms']:.2f} ms, delivered {row['delivered']}/{row['expected']}"
        )
    print(
        f"  a POST round trip from this Python client alone: p50 {post['p50_ms']:.2f} ms, p99 {post['p99_ms']:.2f} ms"
    )
    print(
        f"  {args.idle_streams} idle streams: +{(after - before) / 1024:.1f} MB RSS "
        f"({(after - before) / max(1, args.idle_streams):.1f} KiB each)"
    )


async def _post_round_trip(count: int) -> dict:
    with tempfile.TemporaryDirectory():
        pass
    timings = []
    with events_server() as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for i in range(count):
                started = time.perf_counter()
                (await client.post("/events/emit/system", json={"name": f"rt{i}"})).raise_for_status()
                timings.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": percentile(timings, 50), "p99_ms": percentile(timings, 99)}


def big_events_scenario(url: str, events: int = 300, size: int = 900_000, streams: int = 6, lists: int = 3) -> dict:
    """Big events read by many at once: `events` events of ~`size` bytes of attributes, then
    `streams` streams catching up from position 0 and `lists` queries of `limit=events`, all at
    once, each reading everything it asked for. The server's RSS (KiB) after the emits, at its
    peak while they read (sampled every 20 ms), and once they are done."""
    pid = PIDS[url]
    blob = "x" * size
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(events):
            client.post(
                "/events/emit/system", json={"name": f"big{i}", "attributes": {"blob": blob}}
            ).raise_for_status()
    idle = _rss_kib(pid)
    peak = [idle]
    reading = True

    def sample() -> None:
        while reading:
            peak[0] = max(peak[0], _rss_kib(pid))
            time.sleep(0.02)

    def stream_all(_: int) -> int:
        host, port = url.split("//")[1].split(":")
        got = 0
        with socket.create_connection((host, int(port)), timeout=120) as sock:
            sock.sendall(f"GET /events/stream?after=0 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while got < events:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
                while b"\n\n" in data:
                    message, data = data.split(b"\n\n", 1)
                    got += b"\ndata: " in b"\n" + message
        return got

    def list_all(_: int) -> int:
        with httpx.Client(base_url=url, timeout=120) as client:
            return len(client.get("/events/", params={"limit": events}).json()["events"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with ThreadPoolExecutor(streams + lists) as pool:
        readers = [pool.submit(stream_all, i) for i in range(streams)] + [
            pool.submit(list_all, i) for i in range(lists)
        ]
        got = [reader.result() for reader in readers]
    reading = False
    sampler.join()
    time.sleep(1)
    return {
        "events": events,
        "event_bytes": size,
        "streams": streams,
        "lists": lists,
        "received": got,
        "rss_idle_kib": idle,
        "rss_peak_kib": peak[0],
        "rss_after_kib": _rss_kib(pid),
    }


def bench_memory(args: argparse.Namespace, results: dict) -> None:
    events = 20 if args.quick else 300
    with events_server() as url:
        row = big_events_scenario(url, events=events)
    results["memory"] = row
    print(
        f"memory, {events} events of 0.9 MB, 6 streams from position 0 and 3 lists of all at once: server RSS "
        f"{row['rss_idle_kib'] / 1024:.0f} MB after the emits, peak {row['rss_peak_kib'] / 1024:.0f} MB, "
        f"{row['rss_after_kib'] / 1024:.0f} MB after; every reader got all: {row['received']}"
    )


def bench_size(args: argparse.Namespace, results: dict) -> None:
    with tempfile.TemporaryDirectory() as data:
        with serve("eventuali_api_server:app", ROOT, {"DATA_DIR": data, "DURABILITY": "normal"}) as url:
            load_events(url, args.size_events)
        size = sum(f.stat().st_size for f in Path(data).iterdir())
    results["size"] = {"events": args.size_events, "bytes": size, "bytes_per_event": size / args.size_events}
    print(f"database size: {size / args.size_events:.0f} bytes per event ({args.size_events:,} events)")


# -- PostgreSQL ---------------------------------------------------------------------------------


RUN = contextlib.ExitStack()  # what the whole run shares: its PostgreSQL cluster, closed by main
CLUSTER: list = []


@contextmanager
def postgres_cluster() -> Iterator:
    """The run's throwaway PostgreSQL, started on first use and shared by the parts (each
    makes databases of its own); yields a function that makes a new database and returns its URL."""
    if not CLUSTER:
        CLUSTER.append(RUN.enter_context(new_cluster()))
    yield CLUSTER[0]


@contextmanager
def new_cluster() -> Iterator:
    """A throwaway PostgreSQL (initdb, pg_ctl) on a Unix socket, fsync on as in production;
    yields a function that makes a new database and returns its URL."""
    import psycopg

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or [Path(p) for p in [shutil.which("initdb")] if p]
    if not found:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    binaries = found[-1].parent
    folder = tempfile.mkdtemp(prefix="eventuali-bench-pg-")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    port = free_port()

    def run(tool: str, *args: str) -> None:
        subprocess.run([*as_user, str(binaries / tool), *args], check=True, capture_output=True)

    run("initdb", "-D", f"{folder}/data", "-A", "trust", "-N", "-U", "postgres")
    run(
        "pg_ctl",
        "-D",
        f"{folder}/data",
        "-w",
        "-l",
        f"{folder}/log",
        "-o",
        f"-c listen_addresses='' -k {folder} -p {port} -c max_connections=200 -c shared_buffers=256MB",
        "start",
    )
    made = []

    def new_database() -> str:
        name = f"bench{len(made)}"
        with psycopg.connect(f"postgresql:///postgres?host={folder}&port={port}&user=postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        made.append(name)
        return f"postgresql:///{name}?host={folder}&port={port}&user=postgres"

    try:
        yield new_database
    finally:
        run("pg_ctl", "-D", f"{folder}/data", "-m", "fast", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def post_load_on(urls: list, body: dict, connections: int, seconds: float) -> tuple:
    """post_load on several servers at once, the connections shared out: (requests per
    second in all, the servers' CPU seconds per request in all)."""
    pids = [PIDS[url.split("/events")[0]] for url in urls]
    before = [cpu_seconds(pid) for pid in pids]
    with ThreadPoolExecutor(len(urls)) as pool:
        runs = list(
            pool.map(
                lambda url: (
                    wrk_post(url, body, connections // len(urls), seconds)
                    if shutil.which("wrk")
                    else asyncio.run(_python_post(url, json.dumps(body).encode(), connections // len(urls), seconds))
                ),
                urls,
            )
        )
    requests = sum(done for _rate, done, _p99 in runs)
    cpu = sum(cpu_seconds(pid) - start for pid, start in zip(pids, before))
    return sum(rate for rate, _done, _p99 in runs), cpu / max(1, requests)


def bench_postgres(args: argparse.Namespace, results: dict) -> None:
    """The same figures on PostgreSQL (a throwaway server of this machine, fsync on): emit with
    one and two server processes next to SQLite, in alternating runs; a batch load; an event
    emitted on one server and received on a stream of another; reads at each size."""
    figures: dict = {}
    if not (sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or shutil.which("initdb")):
        print("postgres: skipped (PostgreSQL is not installed; Debian: apt-get install postgresql)")
        return
    with postgres_cluster() as new_database, contextlib.ExitStack() as stack:
        one_url, two_url = new_database(), new_database()
        with (
            events_server() as lite,
            events_server({"DATABASE_URL": one_url}) as pg1,
            events_server({"DATABASE_URL": two_url}) as pg2a,
            events_server({"DATABASE_URL": two_url}) as pg2b,
        ):
            targets = {"sqlite": [lite], "postgres, 1 process": [pg1], "postgres, 2 processes": [pg2a, pg2b]}
            if args.against:  # that checkout's, on each backend
                targets["sqlite (against)"] = [stack.enter_context(events_server(code=args.against))]
                targets["postgres, 1 process (against)"] = [
                    stack.enter_context(events_server({"DATABASE_URL": new_database()}, code=args.against))
                ]
            rates: dict = {name: [] for name in targets}
            cpus: dict = {name: [] for name in targets}
            for urls in targets.values():  # warm up
                post_load_on([u + "/events/emit/agent" for u in urls], SEED_AGENT, args.connections, 1)
            for _ in range(args.runs):
                for name, urls in targets.items():
                    rate, cpu = post_load_on(
                        [u + "/events/emit/agent" for u in urls], SEED_AGENT, args.connections, args.seconds
                    )
                    rates[name].append(rate)
                    cpus[name].append(cpu)
            figures["emit"] = {
                name: {
                    "rps": rates[name],
                    "median_rps": statistics.median(rates[name]),
                    "cpu_us_per_request": statistics.median(cpus[name]) * 1e6,
                }
                for name in targets
            }
            latency = asyncio.run(_sse_latency(pg2b, 1, args.sse_events, post_url=pg2a))
            latency20 = asyncio.run(_sse_latency(pg2b, 20, args.sse_events, post_url=pg2a))
            figures["across_servers"] = [latency, latency20]
        with events_server({"DATABASE_URL": new_database()}) as url:
            rate, cpu = timed_load(url, args.batch_events)
            figures["batch"] = {"events_per_second": rate, "cpu_us_per_event": cpu * 1e6}
        if args.against:
            with events_server({"DATABASE_URL": new_database()}, code=args.against) as url:
                against_rate, against_cpu = timed_load(url, args.batch_events)
                figures["batch against"] = {"events_per_second": against_rate, "cpu_us_per_event": against_cpu * 1e6}
        results["postgres"] = figures
        print(
            "postgres: emit, 32 connections (requests/s, server CPU per request; median of "
            f"{args.runs} alternating runs):"
        )
        for name, row in figures["emit"].items():
            print(f"  {name:24s} {row['median_rps']:8,.0f}/s  {row['cpu_us_per_request']:6.0f} µs")
        print(f"postgres: batch load {rate:,.0f} events/s, server CPU {cpu * 1e6:.1f} µs per event")
        if args.against:
            print(f"  against {args.against}: {against_rate:,.0f} events/s, {against_cpu * 1e6:.1f} µs per event")
        ratios = [p / q for p, q in zip(rates["postgres, 1 process"], rates["sqlite"])]
        print(f"  postgres / sqlite, 1 process, per round: {', '.join(f'{r:.2f}' for r in ratios)}")
        for row in figures["across_servers"]:
            print(
                f"postgres: emitted on server A, received on a stream of server B ({row['subscribers']} "
                f"subscribers): p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
                f"delivered {row['delivered']}/{row['expected']}"
            )
        bench_reads(args, results, {"DATABASE_URL": new_database()}, key="postgres reads")


def bench_metrics(args: argparse.Namespace, results: dict) -> None:
    """What counting requests for /metrics costs the emit path: the same server with
    METRICS on and off, in alternating runs."""
    with events_server({"METRICS": "on"}) as on, events_server({"METRICS": "off"}) as off:
        figures = medians({"metrics on": on, "metrics off": off}, args)
    per_run = [a / b for a, b in zip(figures["metrics on"][2], figures["metrics off"][2])]
    results["metrics"] = {
        name: {"rps": row[0], "cpu_us": row[1], "cpu_us_runs": row[2]} for name, row in figures.items()
    }
    results["metrics"]["cpu_ratio_per_run"] = per_run
    print(f"metrics, emit with {args.connections} connections ({args.runs} alternating runs):")
    for name, (rate, cpu, _runs) in figures.items():
        print(f"  {name:12s} {rate:8,.0f}/s  {cpu:6.0f} µs CPU per request")
    print(f"  CPU per request, on / off, per run: {', '.join(f'{r:.3f}' for r in per_run)}")


def bench_install(args: argparse.Namespace, results: dict) -> None:
    """The default install against the [fast] extra (uvloop, httptools), with 1 and 2
    workers, started as the command starts them, on SQLite (and with the fast install on
    PostgreSQL, where it is installed): emit, in alternating runs."""
    if not has_fast_install():
        print("install: skipped (pip install -e '.[fast]' first: it compares with and without it)")
        return
    configs = {
        "default, 1 worker": ((), True),
        "fast, 1 worker": ((), False),
        "default, 2 workers": (("--workers", "2"), True),
        "fast, 2 workers": (("--workers", "2"), False),
    }
    has_postgres = bool(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or shutil.which("initdb"))
    with contextlib.ExitStack() as stack:
        targets = {
            name: stack.enter_context(command_server(*flags, default_install=default))
            for name, (flags, default) in configs.items()
        }
        if has_postgres:
            new_database = stack.enter_context(postgres_cluster())
            for workers in ("1", "2"):
                url = new_database()
                name = f"fast, {workers} worker{'s' if workers == '2' else ''}, PostgreSQL"
                targets[name] = stack.enter_context(command_server("--workers", workers, env={"DATABASE_URL": url}))
        figures = medians(targets, args)
    results["install"] = {
        name: {"rps": row[0], "cpu_us": row[1], "cpu_us_runs": row[2]} for name, row in figures.items()
    }
    base = figures["default, 1 worker"][0]
    print(f"install, emit with {args.connections} connections, on SQLite unless named ({args.runs} alternating runs):")
    for name, (rate, cpu, _runs) in figures.items():
        print(f"  {name:32s} {rate:8,.0f}/s ({rate / base:.2f}x)  {cpu:6.0f} µs CPU per request (all processes)")


def has_fast_install() -> bool:
    try:
        import httptools  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def bench_workers(args: argparse.Namespace, results: dict) -> None:
    """Two workers on one SQLite file against one: emit rate, CPU per request (every process)
    and p99 latency, default and fast installs (fast where installed), for this checkout and
    --against's, in alternating runs; the ratios are per round, then their median."""
    builds = {"this": ROOT, **({"against": args.against} if args.against else {})}
    installs = ["default", "fast"] if has_fast_install() else ["default"]
    with contextlib.ExitStack() as stack:
        targets = {
            (build, install, workers): stack.enter_context(
                command_server("--workers", workers, default_install=install == "default", code=code)
            )
            for build, code in builds.items()
            for install in installs
            for workers in ("1", "2")
        }
        for url in targets.values():  # warm up each
            post_load(url + "/events/emit/agent", SEED_AGENT, args.connections, 1)
        rounds: dict = {key: [] for key in targets}
        for _ in range(args.runs):
            for key, url in targets.items():
                rounds[key].append(post_load(url + "/events/emit/agent", SEED_AGENT, args.connections, args.seconds))
    table = {}
    for build in builds:
        for install in installs:
            one, two = rounds[(build, install, "1")], rounds[(build, install, "2")]
            table[f"{build}, {install}"] = {
                "rps": [[r[0] for r in one], [r[0] for r in two]],
                "cpu_us": [[r[1] * 1e6 for r in one], [r[1] * 1e6 for r in two]],
                "p99_ms": [[r[2] for r in one], [r[2] for r in two]],
                "rate_ratio": statistics.median(b[0] / a[0] for a, b in zip(one, two)),
                "p99_ratio": statistics.median(b[2] / a[2] for a, b in zip(one, two)),
            }
    results["workers"] = table
    print(f"workers on SQLite, emit with {args.connections} connections ({args.runs} alternating runs):")
    for name, row in table.items():
        rps = [statistics.median(r) for r in row["rps"]]
        p99 = [statistics.median(r) for r in row["p99_ms"]]
        cpu = [statistics.median(r) for r in row["cpu_us"]]
        print(
            f"  {name:24s} 1 worker {rps[0]:7,.0f}/s p99 {p99[0]:6.1f} ms {cpu[0]:4.0f} µs; "
            f"2 workers {rps[1]:7,.0f}/s p99 {p99[1]:6.1f} ms {cpu[1]:4.0f} µs; "
            f"2/1: rate {row['rate_ratio']:.2f}, p99 {row['p99_ratio']:.2f}"
        )


def emit_latencies(url: str, until: Callable[[], bool]) -> list:
    """Emit one event after another until until() is true: each one's latency in ms."""
    latencies = []
    with httpx.Client(base_url=url, timeout=60) as client:
        while not until():
            started = time.perf_counter()
            client.post("/events/emit/agent", json=SEED_AGENT).raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def bench_retention(args: argparse.Namespace, results: dict) -> None:
    """`prune` on a log of old events while a client emits one event after another: how long
    it takes, and the emit latency before and during it (SQLite)."""
    count = args.batch_events
    with tempfile.TemporaryDirectory() as data, serve("eventuali_api_server:app", ROOT, {"DATA_DIR": data}) as url:
        events = make_events(0, count)
        for event in events:
            event["timestamp"] = "2020-01-01T00:00:00Z"
        with httpx.Client(base_url=url, timeout=120) as client:
            for start in range(0, count, 1000):
                client.post("/events/emit/batch", json={"events": events[start : start + 1000]}).raise_for_status()
        deadline = time.perf_counter() + 3
        before = emit_latencies(url, lambda: time.perf_counter() > deadline)
        started = time.perf_counter()
        pruning = subprocess.Popen(
            [sys.executable, str(ROOT / "eventuali_api_server.py"), "prune", "--older-than", "1d", "--data-dir", data],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **install_env(not FAST)},
        )
        during = emit_latencies(url, lambda: pruning.poll() is not None)
        seconds = time.perf_counter() - started
        said = pruning.stdout.read().strip() if pruning.stdout else ""

    def row(values: list) -> dict:
        return {"emits": len(values), **{f"p{q}_ms": percentile(values, q) for q in (50, 99)}, "max_ms": max(values)}

    figures = {"events": count, "prune_seconds": seconds, "said": said, "before": row(before), "during": row(during)}
    results["retention"] = figures
    print(f"retention: prune of {count:,} old events took {seconds:.1f} s ({said})")
    for name in ("before", "during"):
        r = figures[name]
        print(
            f"  emit latency {name:6s} the prune: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
            f"max {r['max_ms']:.1f} ms ({r['emits']} emits, one at a time)"
        )


def run_events(start: int, stop: int) -> list:
    """Runs of 10 events each, as agents with model and tool calls emit them: a workflow, an
    agent, three model calls with usage, a tool call, their ends; one run in four fails."""
    events = []
    for run in range(start, stop):
        wf, agent, failed = f"run-{run}", f"run-{run}-agent", run % 4 == 3
        chat = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}
        events += [
            {"kind": "workflow", "name": "workflow.started", "aggregate_id": wf,
             "attributes": {"user_prompt": f"task {run}"}},
            {"kind": "agent", "name": "agent.started", "aggregate_id": agent, "correlation_id": wf},
            *[
                {
                    "kind": "agent",
                    "name": "llm.call.completed",
                    "aggregate_id": agent,
                    "correlation_id": wf,
                    "attributes": {**chat, "gen_ai.usage.input_tokens": 900 + i, "gen_ai.usage.output_tokens": 80},
                }
                for i in range(3)
            ],
            {"kind": "agent", "name": "tool.call.started", "aggregate_id": agent, "correlation_id": wf,
             "attributes": {"gen_ai.operation.name": "execute_tool"}},
            {"kind": "agent", "name": "tool.call.failed" if failed else "tool.call.completed", "aggregate_id": agent,
             "correlation_id": wf, "attributes": {"gen_ai.operation.name": "execute_tool"}},
            {"kind": "agent", "name": "agent.failed" if failed else "agent.completed", "aggregate_id": agent,
             "correlation_id": wf},
            {"kind": "system", "name": "session.tick", "aggregate_id": f"session-{run % 7}", "correlation_id": wf},
            {"kind": "workflow", "name": "workflow.failed" if failed else "workflow.completed", "aggregate_id": wf},
        ]  # fmt: skip
    return events


def bench_runs(args: argparse.Namespace, results: dict) -> None:
    """The workflows index and a workflow's agents with usage, at `runs_sizes` runs of 10 events."""
    table: dict = {}
    with (
        events_server({"DURABILITY": "normal"}) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        loaded = 0
        for runs in args.runs_sizes:
            for start in range(loaded, runs, 100):
                body = {"events": run_events(start, min(runs, start + 100))}
                client.post("/events/emit/batch", json=body).raise_for_status()
            loaded = runs
            mid = client.get("/events/workflows", params={"limit": 1, "offset": runs // 2}).json()["workflows"][0]
            reads = {
                "/events/workflows": {},
                "/events/workflows?state=failed": {"state": "failed"},
                "/events/workflows?since=MID": {"since": mid["last_event_time"]},
                "/events/workflows?before=MID": {"before": mid["last_position"]},
                "/events/workflows/MID/agents": None,
            }
            for label, params in reads.items():
                path = f"/events/workflows/{mid['workflow_id']}/agents" if params is None else "/events/workflows"
                timings = []
                for _ in range(args.read_repeats):
                    started = time.perf_counter()
                    reply = client.get(path, params=params or {})
                    timings.append((time.perf_counter() - started) * 1000)
                    reply.raise_for_status()
                table.setdefault(label, {})[runs] = {
                    "p50_ms": percentile(timings, 50),
                    "p99_ms": percentile(timings, 99),
                    "total": reply.json().get("total"),
                }
    results["runs"] = table
    sizes = args.runs_sizes
    print(
        "runs: workflows index and agents, ms (p50 / p99) at "
        + ", ".join(f"{s:,} runs ({s * 10:,} events)" for s in sizes)
        + ":"
    )
    for label, row in table.items():
        print(f"  {label:40s} " + "  ".join(f"{row[s]['p50_ms']:7.2f} / {row[s]['p99_ms']:7.2f}" for s in sizes))


PARTS = {
    "emit": bench_emit,
    "batch": bench_batch,
    "reads": bench_reads,
    "sse": bench_sse,
    "size": bench_size,
    "postgres": bench_postgres,
    "memory": bench_memory,
    "metrics": bench_metrics,
    "install": bench_install,
    "retention": bench_retention,
    "otlp": bench_otlp,
    "runs": bench_runs,
    "fanout": bench_fanout,
    "workers": bench_workers,
}


def main(argv: list | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: " + ", ".join(PARTS))
    parser.add_argument("--json", default=str(HERE / "results" / "latest.json"))
    parser.add_argument("--durability", default="full", choices=["full", "normal"])
    parser.add_argument("--no-pairs", dest="pairs", action="store_false", help="reads: leave out the pairs of filters")
    parser.add_argument(
        "--read-sizes",
        type=lambda text: [int(size) for size in text.split(",")],
        default=None,
        help="reads: the log sizes to measure at, comma-separated (default 1000,100000,1000000)",
    )
    parser.add_argument(
        "--against",
        type=Path,
        default=None,
        metavar="CHECKOUT",
        help="another checkout of the server to measure emit, batch, sse, reads, postgres, fanout and workers "
        "against (A/B)",
    )
    parser.add_argument(
        "--fast", action="store_true", help="run the parts with uvloop and httptools (the [fast] extra)"
    )
    args = parser.parse_args(argv)
    global FAST
    FAST = args.fast
    quick = args.quick
    args.connections = 32
    args.seconds = 1 if quick else 5
    args.runs = 1 if quick else 5
    args.batch_events = 2000 if quick else 100_000
    args.read_sizes = args.read_sizes or ([200, 1000] if quick else [1000, 100_000, 1_000_000])
    args.read_repeats = 5 if quick else 50
    args.sse_subscribers = [1, 5] if quick else [1, 20, 100, 1000]
    args.sse_events = 5 if quick else 50
    args.idle_streams = 20 if quick else 1000
    args.size_events = 1000 if quick else 100_000
    args.otlp_spans = 1024 if quick else 20_480
    args.runs_sizes = [200] if quick else [10_000, 100_000]
    args.fanout_streams = 50 if quick else 1000
    results: dict = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "load_generator": "wrk" if shutil.which("wrk") else "python (asyncio; slower than wrk)",
        "quick": quick,
    }
    print(f"load generator: {results['load_generator']}; {results['machine']}")
    with RUN:
        for part in args.only.split(","):
            PARTS[part.strip()](args, results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"figures written to {args.json}")
    return results


if __name__ == "__main__":
    main()
