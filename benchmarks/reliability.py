"""Reliability figures of the server: fuzzing, overload, killed workers, slow clients, drain.

Starts the real server (``python -m service.server``, the demo bundles by default) and
measures, each part on a fresh server:

1. fuzzing: Schemathesis requests generated from ``/openapi.json`` on both inference
   routes, and how many got a 5xx or broke their declared schema;
2. overload: open-loop load at fixed offered rates (a new connection per request),
   what was served and the mix of statuses;
3. killed workers: under steady load, ``kill -9`` of a classify worker (several times)
   and of the only summarize worker: time until the replacement is ready, requests
   answered 503 (retryable) and requests lost (no answer, a reset, a 5xx other than 503);
4. slow clients: twice the in-flight limit of stalled uploads (headers and 10 of 200
   body bytes) while normal clients keep sending: their statuses, and when the stalled
   ones get 408;
5. a dead HTTP process: ``kill -9`` of one of two HTTP processes under load: the exit
   status of the server and how long it took, what the clients got until then;
6. drain: requests in flight (workers paused) when the process group gets SIGINT (what
   Ctrl+C does) and, on another server, SIGTERM (systemd's KillMode=control-group): how
   many were answered, what new requests got, exit status, tracebacks, workers restarted.

Writes ``benchmarks/results/reliability.md`` and ``.json`` (with the machine and the
command). Figures on a shared machine are noisy; the counts are what matters.

    python benchmarks/reliability.py              # demo bundles (make demo-models), ~7 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import hardware, machine  # noqa: E402

MESSAGES = [
    "I lost my card yesterday, please block it",
    "Why did my transfer fail?",
    "How do I top up with Apple Pay?",
    "My card payment was declined twice today!!",
]
CONVERSATION = (
    "Customer: Hi, my parcel never arrived.\nAgent: Sorry to hear that. Can you give me the "
    "order number?\nCustomer: It is 48213.\nAgent: It was lost by the courier; I sent a "
    "replacement."
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--intent-bundle", default="runs/demo-intent/bundle")
    parser.add_argument("--summarizer-bundle", default="runs/demo-summarizer/bundle")
    parser.add_argument("--fuzz-examples", type=int, default=1200, help="per route at most")
    parser.add_argument("--rates", type=float, nargs="+", default=[20, 100, 400])
    parser.add_argument("--seconds", type=float, default=8.0, help="per offered rate")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/reliability")
    return parser.parse_args(argv)


# -- a server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, args, log: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "SUPPORTLENS_INTENT_BUNDLE": args.intent_bundle,
            "SUPPORTLENS_SUMMARIZER_BUNDLE": args.summarizer_bundle,
            "SUPPORTLENS_PORT": str(self.port),
            "SUPPORTLENS_LOG_LEVEL": "info",
            "SUPPORTLENS_LOG_FORMAT": "json",
            **env,
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.server"],
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        while self.health() != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)

    def health(self) -> int:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return 0

    def log_entries(self) -> list[dict]:
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                entries.append({"message": line, "raw": True})
        return entries

    def ready_workers(self, api: str) -> list[tuple[int, float]]:
        """(pid, time the main process logged it ready) for the workers of ``api``."""
        found = []
        pattern = re.compile(rf"supportlens-worker-{api}-\d+ ready \(pid (\d+)\)")
        for entry in self.log_entries():
            match = pattern.search(entry.get("message", ""))
            if match:
                stamp = datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
                found.append((int(match.group(1)), stamp))
        return found

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._log.close()
        return self.process.returncode


# -- a minimal HTTP client -----------------------------------------------------------------


async def request(port: int, path: str, body: dict, timeout: float = 30) -> int:
    """One POST on a new connection: its status, or 0 when it got no answer."""
    payload = json.dumps(body).encode()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    except (OSError, TimeoutError):
        return 0
    try:
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), len(payload))
            + payload
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        return int(head.split(b" ", 2)[1])
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        return 0
    finally:
        writer.close()


def classify_body(i: int) -> dict:
    return {"texts": [MESSAGES[i % len(MESSAGES)]]}


class SteadyLoad:
    """``clients`` closed-loop clients in a thread until stopped; statuses with times."""

    def __init__(self, port: int, clients: int, path: str = "/v1/classify", body=None):
        self.port, self.clients, self.path = port, clients, path
        self.body = body or classify_body
        self.results: list[tuple[float, int]] = []
        self.stopping = False
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()))

    async def _client(self, rank: int) -> None:
        i = rank
        while not self.stopping:
            status = await request(self.port, self.path, self.body(i))
            self.results.append((time.time(), status))
            i += self.clients
            if status in (429, 503):
                await asyncio.sleep(1.0)  # a polite client: Retry-After is 1 s by default

    async def _run(self) -> None:
        await asyncio.gather(*(self._client(r) for r in range(self.clients)))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping = True
        self.thread.join(60)


# -- the parts ---------------------------------------------------------------------------


def fuzz(args, work: Path) -> dict:
    server = Server(args, work / "fuzz.log")
    try:
        st = Path(sys.executable).with_name("st")
        started = time.monotonic()
        result = subprocess.run(
            [
                str(st),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,"
                "response_schema_conformance",
                "--include-path-regex",
                "^/v1/(classify|summarize)$",
                "--max-examples",
                str(args.fuzz_examples),
                "--seed",
                "1",
                "--workers",
                "2",
                "--request-timeout",
                "60",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=1800,
            cwd=work,  # Schemathesis keeps its example database in ./.schemathesis
        )
        generated = re.search(r"(\d+) generated", result.stdout)
        failed = re.search(r"(\d+) failed", result.stdout)
        log = server.log_entries()
        statuses = Counter(
            m.group(1)
            for e in log
            if (m := re.search(r"^POST /v1/\w+ (\d{3}) ", e.get("message", "")))
        )
        return {
            "requests_generated": int(generated.group(1)) if generated else None,
            "checks_failed": int(failed.group(1)) if failed else 0,
            "schemathesis_exit_status": result.returncode,
            "schemathesis_summary": result.stdout[result.stdout.rfind("SUMMARY") :][-3000:],
            "status_mix": dict(sorted(statuses.items())),
            "server_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
            "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        server.stop()


async def open_loop(port: int, rate: float, seconds: float) -> dict:
    tasks = []
    started = time.monotonic()
    for i in range(int(rate * seconds)):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(request(port, "/v1/classify", classify_body(i))))
    statuses = await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    mix = Counter(str(s) for s in statuses)
    return {
        "offered_rps": rate,
        "served_rps": round(mix.get("200", 0) / elapsed, 1),
        "status_mix": dict(sorted(mix.items())),
    }


def overload(args, work: Path) -> list[dict]:
    server = Server(args, work / "overload.log")
    try:
        return [asyncio.run(open_loop(server.port, rate, args.seconds)) for rate in args.rates]
    finally:
        server.stop()


def kill_workers(args, work: Path) -> dict:
    import psutil

    server = Server(args, work / "kills.log", SUPPORTLENS_WORKERS="2")
    kills = []
    try:
        with SteadyLoad(server.port, 8) as load:
            time.sleep(2)
            for _ in range(args.kills):
                known = {pid for pid, _ in server.ready_workers("v1-classify")}
                alive = [pid for pid in known if psutil.pid_exists(pid)]
                victim = alive[0]
                killed_at = time.time()
                psutil.Process(victim).kill()
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    new = [(p, t) for p, t in server.ready_workers("v1-classify") if p not in known]
                    if new:
                        kills.append({"api": "/v1/classify", "recovery_s": new[0][1] - killed_at})
                        break
                    time.sleep(0.2)
                time.sleep(2)
            results = list(load.results)
        # The only summarize worker: readiness goes false until it is replaced.
        known = {pid for pid, _ in server.ready_workers("v1-summarize")}
        with SteadyLoad(
            server.port, 2, "/v1/summarize", lambda i: {"texts": [CONVERSATION]}
        ) as summarize_load:
            time.sleep(1)
            killed_at = time.time()
            psutil.Process(max(known)).kill()
            not_ready = 0.0
            while server.health() != 200 or not_ready == 0.0:
                if server.health() != 200 and not_ready == 0.0:
                    not_ready = time.time()
                if time.time() - killed_at > 120:
                    break
                time.sleep(0.05)
            kills.append({"api": "/v1/summarize", "recovery_s": time.time() - killed_at})
            time.sleep(1)
        alive = server.process.poll() is None
    finally:
        server.stop()
    classify_mix = Counter(str(s) for _, s in results)
    summarize_mix = Counter(str(s) for _, s in summarize_load.results)
    lost = sum(
        n
        for mix in (classify_mix, summarize_mix)
        for s, n in mix.items()
        if s not in ("200", "503")
    )
    return {
        "kills": kills,
        "classify_status_mix": dict(sorted(classify_mix.items())),
        "summarize_status_mix": dict(sorted(summarize_mix.items())),
        "lost": lost,
        "main_process_alive": alive,
    }


def half_sent(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /v1/classify HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        b'Content-Length: 200\r\n\r\n{"texts": ["'
    )
    return sock


def slow_clients(args, work: Path) -> dict:
    limit = 8
    server = Server(
        args, work / "slow.log", SUPPORTLENS_MAX_IN_FLIGHT=str(limit), SUPPORTLENS_BODY_TIMEOUT="5"
    )
    try:
        started = time.monotonic()
        stalled = [half_sent(server.port) for _ in range(2 * limit)]
        with SteadyLoad(server.port, 4) as load:
            answers = []
            for sock in stalled:
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
                answers.append((data.split(b" ", 2)[1].decode(), time.monotonic() - started))
                sock.close()
        mix = Counter(str(s) for _, s in load.results)
    finally:
        server.stop()
    return {
        "stalled_uploads": len(stalled),
        "in_flight_limit": limit,
        "stalled_statuses": dict(Counter(s for s, _ in answers)),
        "stalled_answered_within_s": round(max(t for _, t in answers), 1),
        "other_clients_status_mix": dict(sorted(mix.items())),
    }


def drain(args, work: Path, signum: signal.Signals = signal.SIGINT) -> dict:
    """``signum`` to the whole process group (Ctrl+C; systemd's KillMode=control-group)
    with requests in flight."""
    import psutil

    server = Server(args, work / f"drain-{signum.name}.log", SUPPORTLENS_SUMMARIZER_BUNDLE="none")
    workers = [
        p
        for p in psutil.Process(server.process.pid).children(recursive=True)
        if "spawn_main" in " ".join(p.cmdline())
    ]
    for worker in workers:
        worker.send_signal(signal.SIGSTOP)
    count = 20

    async def scenario():
        in_flight = [
            asyncio.create_task(request(server.port, "/v1/classify", classify_body(i), 60))
            for i in range(count)
        ]
        await asyncio.sleep(2)
        sent_at = time.monotonic()
        os.killpg(server.process.pid, signum)
        await asyncio.sleep(1)
        late = await asyncio.gather(
            *(request(server.port, "/v1/classify", classify_body(i), 10) for i in range(5))
        )
        for worker in workers:
            worker.send_signal(signal.SIGCONT)
        answered = await asyncio.gather(*in_flight)
        return answered, late, sent_at

    answered, late, sent_at = asyncio.run(scenario())
    code = server.process.wait(timeout=120)
    exit_s = time.monotonic() - sent_at
    server.stop()
    log = server.log_path.read_text(errors="replace")
    return {
        "signal": signum.name,
        "in_flight_at_signal": count,
        "in_flight_answered": dict(Counter(str(s) for s in answered)),
        "new_requests_during_drain": dict(Counter(str(s) for s in late)),
        "exit_status": code,
        "exit_after_s": round(exit_s, 1),
        "traceback_lines": log.count("Traceback"),
        "workers_restarted": log.count("starting a new one"),
    }


def drains(args, work: Path) -> list[dict]:
    return [drain(args, work, signum) for signum in (signal.SIGINT, signal.SIGTERM)]


def http_death(args, work: Path) -> dict:
    """``kill -9`` of one of two HTTP processes under load: the server must exit 1 (for
    its supervisor to restart it) instead of keeping a port open that nobody serves."""
    server = Server(
        args, work / "http.log", SUPPORTLENS_SUMMARIZER_BUNDLE="none", SUPPORTLENS_API_SERVERS="2"
    )
    pattern = re.compile(r"Started server process \[(\d+)\]")
    http = [
        int(m.group(1)) for e in server.log_entries() if (m := pattern.search(e.get("message", "")))
    ]
    statuses: list[int] = []

    async def scenario() -> float:
        stop = time.monotonic() + 60

        async def client(i: int) -> None:
            # As a client of a replicated service would: wait Retry-After on 503, and go
            # elsewhere (here: stop) once this server answers nothing.
            while time.monotonic() < stop and server.process.poll() is None:
                status = await request(server.port, "/v1/classify", classify_body(i), 10)
                statuses.append(status)
                if status == 0:
                    return
                if status == 503:
                    await asyncio.sleep(1)

        clients = [asyncio.create_task(client(i)) for i in range(8)]
        await asyncio.sleep(2)
        killed_at = time.monotonic()
        os.kill(http[0], signal.SIGKILL)
        await asyncio.gather(*clients)
        return killed_at

    killed_at = asyncio.run(scenario())
    code = server.process.wait(timeout=120)
    exit_s = time.monotonic() - killed_at
    server.stop()
    return {
        "http_processes": len(http),
        "client_statuses": dict(Counter(str(s) for s in statuses)),
        "exit_status": code,
        "exit_after_s": round(exit_s, 1),
    }


def render(run: dict) -> str:
    m = run["machine"]
    fuzz_, kills, slow, http = run["fuzz"], run["kills"], run["slow_clients"], run["http_death"]
    recovery = ", ".join(f"{k['api']} {k['recovery_s']:.1f} s" for k in kills["kills"])
    lines = [
        "# Reliability",
        "",
        f"Command: `{run['command']}`",
        "",
        f"Machine: {hardware(m)} ({m['cpu']}), Python {m['python']}; "
        f"load average at start {m['load_average_at_start']} (shared: timings are noisy). "
        f"Bundles: {run['bundles']}. Each part runs on a fresh server with default settings "
        "unless noted.",
        "",
        "| what | result |",
        "|---|---|",
        f"| fuzzing (Schemathesis from /openapi.json, both inference routes) | "
        f"{fuzz_['requests_generated']} requests generated, {fuzz_['checks_failed']} failed checks, "
        f"{fuzz_['server_5xx']} answered 5xx; statuses {fuzz_['status_mix']} |",
    ]
    for cell in run["overload"]:
        lines.append(
            f"| overload: {cell['offered_rps']:g} req/s offered (open loop, new connection each) | "
            f"{cell['served_rps']:g} req/s served; statuses {cell['status_mix']} |"
        )
    lines += [
        f"| `kill -9` of model workers under load: {len(kills['kills']) - 1} times one of the 2 "
        "classify workers (8 clients), then the only summarize worker (2 clients); clients wait "
        f"Retry-After on 503 | replacement ready after {recovery}; classify requests "
        f"{kills['classify_status_mix']}, summarize requests {kills['summarize_status_mix']}; "
        f"{kills['lost']} lost (no answer, or an error other than 503); main process alive: "
        f"{kills['main_process_alive']} |",
        f"| slow clients: {slow['stalled_uploads']} stalled uploads, in-flight limit "
        f"{slow['in_flight_limit']}, body timeout 5 s | stalled ones got "
        f"{slow['stalled_statuses']} within {slow['stalled_answered_within_s']} s; other "
        f"clients meanwhile: {slow['other_clients_status_mix']} |",
        f"| `kill -9` of one of the {http['http_processes']} HTTP processes under load (8 "
        f"clients; a client stops at its first request with no answer, waits Retry-After on "
        f"503) | exit status {http['exit_status']} after {http['exit_after_s']} s; client "
        f"statuses until then {http['client_statuses']} |",
    ]
    for drain_ in run["drain"]:
        lines.append(
            f"| drain: {drain_['signal']} to the process group with "
            f"{drain_['in_flight_at_signal']} requests in flight | in flight: "
            f"{drain_['in_flight_answered']}; new requests during the drain: "
            f"{drain_['new_requests_during_drain']}; exit status {drain_['exit_status']} after "
            f"{drain_['exit_after_s']} s; {drain_['traceback_lines']} tracebacks in the log; "
            f"{drain_['workers_restarted']} workers restarted |"
        )
    lines += [
        "",
        "Status 0 means no HTTP answer (connection refused, reset or timed out).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    for path in (args.intent_bundle, args.summarizer_bundle):
        if not (Path(path) / "manifest.json").is_file():
            raise SystemExit(f"reliability: no bundle at {path} (run `make demo-models`)")
    work = Path(tempfile.mkdtemp(prefix="supportlens-reliability-"))
    given = list(argv if argv is not None else sys.argv[1:])
    run = {
        "machine": machine(),
        "command": " ".join(["python benchmarks/reliability.py", *given]),
        "bundles": f"{args.intent_bundle}, {args.summarizer_bundle}",
    }
    for name, part in (
        ("fuzz", fuzz),
        ("overload", overload),
        ("kills", kill_workers),
        ("slow_clients", slow_clients),
        ("http_death", http_death),
        ("drain", drains),
    ):
        print(f"-- {name}", flush=True)
        run[name] = part(args, work)
        print(json.dumps(run[name]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run, indent=2) + "\n")
    tmp.replace(out.with_suffix(".json"))
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(render(run))
    tmp.replace(out.with_suffix(".md"))
    print(render(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
