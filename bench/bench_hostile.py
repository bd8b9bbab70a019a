"""Hostile-client figures for runnerd: its memory and `status` latency while other
connections misbehave.

Starts one fresh daemon in a temp folder with 200 runs in its
registry, then, one scenario at a time, a forked attacker process holds the hostile
connections while this process sends `status` on a connection of its own (one at a time,
10 ms apart; the first seconds, while the attack builds up, are reported apart) and
samples the daemon's VmRSS every 50 ms. Scenarios: a baseline with no attacker; 50
connections that pipeline `list` requests and never read a reply; 300 slowloris
connections, each sending a 1 MiB frame as slowly as the daemon lets it and reconnecting
when the daemon closes it (`frame_timeout`); 2 senders of 590 KB `create` frames with
60,000 params keys, in one map and spread over 60 maps. Prints a table and cleans up.
Not a test: it reports.

    python bench/bench_hostile.py [--quick]
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import Runnerd, Session, arguments, pct, rss_mb, session, temp_root

from runnerd.testing import RawClient
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import HEADER, frame

MB = 1 << 20
GOAL_RSS_MB, GOAL_P99 = 200, 0.050
Attack = Callable[[Path, Any], None]


def greeted(path: Path) -> RawClient:
    client = RawClient(path, timeout=30)
    client.hello("bench-hostile")
    return client


def fill(path: Path, runs: int) -> None:
    client = greeted(path)
    for i in range(runs):
        client.send(
            {
                "op": "create",
                "id": i + 1,
                "key": new_key(),
                "run_id": new_run_id(),
                "experiment": "fill",
                "params": {f"p{k}": k * 0.5 for k in range(20)},
            }
        )
    for _ in range(runs):
        client.recv()
    client.close()


# --- attackers (each runs in a forked process until `stop` is set) ----------------


def pipeliners(path: Path, stop: Any, count: int = 50) -> None:
    """Connections that write `list` requests as fast as the daemon takes them, never reading."""
    socks = [greeted(path).sock for _ in range(count)]
    burst = b"".join(frame({"op": "list", "id": i, "limit": 50}) for i in range(1000))
    offsets = [0] * count
    for sock in socks:
        sock.setblocking(False)
    while not stop.is_set():
        for i, sock in enumerate(socks):
            try:
                offsets[i] = (offsets[i] + sock.send(burst[offsets[i] :])) % len(burst)
            except BlockingIOError:
                pass
        time.sleep(0.001)
    for sock in socks:
        sock.close()


def slowloris(path: Path, stop: Any, count: int = 300) -> None:
    """Connections each sending one 1 MiB frame as slowly as they may (all but its last
    byte as fast as the daemon reads, then nothing), reconnecting when closed."""
    body = MB - 64
    payload = HEADER.pack(body) + b"\0" * (body - 1)
    conns: list[list[Any]] = [[None, 0] for _ in range(count)]
    while not stop.is_set():
        for conn in conns:
            sock, offset = conn
            try:
                if sock is None:
                    sock = greeted(path).sock
                    sock.setblocking(False)
                    conn[:] = [sock, 0]
                if offset < len(payload):
                    conn[1] = offset + sock.send(payload[offset : offset + (256 << 10)])
                elif sock.recv(4096) == b"":
                    raise ConnectionError
            except (BlockingIOError, TimeoutError):
                pass
            except OSError:
                if sock is not None:
                    sock.close()
                conn[:] = [None, 0]
        time.sleep(0.005)
    for sock, _ in conns:
        if sock is not None:
            sock.close()


def big_frames(path: Path, stop: Any, nested: bool) -> None:
    """2 connections sending 590 KB `create` frames of 60,000 params keys, each reading
    its replies (the limits refuse them; the question is what that costs the others)."""
    keys = [f"key{i:06d}" for i in range(60_000)]
    params: dict[str, Any] = {k: i for i, k in enumerate(keys)}
    if nested:
        params = {f"group{g}": {k: 1 for k in keys[g * 1000 : (g + 1) * 1000]} for g in range(60)}
    threads = [threading.Thread(target=_send_big, args=(path, stop, params)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _send_big(path: Path, stop: Any, params: dict[str, Any]) -> None:
    client = greeted(path)
    while not stop.is_set():
        client.call(
            {
                "op": "create",
                "id": 1,
                "key": new_key(),
                "run_id": new_run_id(),
                "experiment": "big",
                "params": params,
            }
        )
    client.close()


# --- measuring --------------------------------------------------------------------


@dataclass
class Figures:
    name: str
    rss_peak: float  # MB
    rss_after: float
    latencies: list[float]
    failed: int
    buildup: list[float]


def measure(
    daemon: Runnerd, name: str, attack: Attack | None, seconds: float, warmup: float
) -> Figures:
    """Start `attack` and time `status` from then on: for `warmup` s while the attack builds
    up (reported apart), then for `seconds` s."""
    stop = multiprocessing.get_context("fork").Event()
    attacker = None
    if attack is not None:
        attacker = multiprocessing.get_context("fork").Process(
            target=attack, args=(daemon.socket, stop), daemon=True
        )
        attacker.start()
    peak, sampling = [0.0], threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], rss_mb(daemon.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    latencies: list[float] = []
    buildup: list[float] = []
    failed = 0
    try:
        client = greeted(daemon.socket)
        steady = time.monotonic() + warmup
        deadline = steady + seconds
        req_id = 1
        while time.monotonic() < deadline:
            began = time.perf_counter()
            try:
                client.call({"op": "status", "id": req_id})
                (latencies if time.monotonic() > steady else buildup).append(
                    time.perf_counter() - began
                )
            except OSError:
                failed += 1
                client.close()
                client = greeted(daemon.socket)
            req_id += 1
            time.sleep(0.01)
        client.close()
    finally:
        stop.set()
        if attacker is not None:
            attacker.join(30)
            if attacker.is_alive():
                attacker.kill()
        time.sleep(1.0)
        sampling.set()
        sampler.join()
    return Figures(name, peak[0], rss_mb(daemon.pid), latencies, failed, buildup)


def report(rows: list[Figures]) -> None:
    print(
        f"{'scenario':<44} {'RSS peak':>9} {'after':>7} {'status p50':>11} {'p99':>8} "
        f"{'max':>8} {'n':>5} {'failed':>6} {'build-up max':>12}"
    )
    for f in rows:
        p99 = pct(f.latencies, 0.99)
        ok = f.rss_peak < GOAL_RSS_MB and p99 < GOAL_P99
        print(
            f"{f.name:<44} {f.rss_peak:>6.0f} MB {f.rss_after:>4.0f} MB "
            f"{pct(f.latencies, 0.5) * 1e3:>8.1f} ms {p99 * 1e3:>5.1f} ms "
            f"{max(f.latencies, default=float('nan')) * 1e3:>5.0f} ms {len(f.latencies):>5} "
            f"{f.failed:>6} {max(f.buildup, default=float('nan')) * 1e3:>9.0f} ms"
            f"  {'ok' if ok else 'MISSED'}"
        )
    print(
        f"goals: daemon RSS < {GOAL_RSS_MB} MB, status p99 < {GOAL_P99 * 1e3:.0f} ms "
        "(after the build-up: the first seconds of an attack, while its connections open "
        "and their first requests are read, are reported apart as 'build-up max')"
    )


def run(seconds: float, warmup: float, bench: Session) -> list[Figures]:
    """Each scenario in turn against one daemon with 200 runs."""
    scenarios: list[tuple[str, Attack | None]] = [
        ("baseline (no attacker)", None),
        ("50 non-reading pipeliners of `list`", pipeliners),
        ("300 slowloris 1 MiB frames", slowloris),
        (
            "2 senders, 60,000 params keys in one map",
            lambda path, stop: big_frames(path, stop, nested=False),
        ),
        (
            "2 senders, 60,000 params keys in 60 maps",
            lambda path, stop: big_frames(path, stop, nested=True),
        ),
    ]
    rows = []
    with temp_root() as root:
        daemon = Runnerd(root).start(20.0)
        try:
            fill(daemon.socket, 200)
            for label, attack in scenarios:
                bench.quiet.wait()
                rows.append(measure(daemon, label, attack, seconds, warmup))
                daemon.wait_idle(timeout=60)
        finally:
            daemon.stop()
    bench.stop()
    return rows


def main() -> None:
    args = arguments(__doc__, "5 s per scenario instead of 15 s").parse_args()
    bench = session(args)
    seconds, warmup = (5.0, 2.0) if args.quick else (15.0, 3.0)
    rows = run(seconds, warmup, bench)
    bench.header("hostile-client", "quick" if args.quick else "full")
    print(f"{seconds:.0f} s per scenario, after {warmup:.0f} s of build-up")
    report(rows)


if __name__ == "__main__":
    main()
