"""DNS latency of banger's server: local name, forwarded name, and the upstream queried directly, in one run.

Both servers run on loopback in a background event loop; queries come from a blocking UDP socket in the main
thread, one at a time, so the numbers are per-query latency rather than throughput.

    .venv/bin/python bench/bench_dns.py [--count 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from dnslib import QTYPE, DNSRecord

from banger.net.dns import DnsServer, Upstream

LOOPBACK = "127.0.0.1"


@contextmanager
def servers() -> Iterator[tuple[int, int]]:
    """Start an upstream (a DnsServer authoritative for `test`) and banger's server forwarding to it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    upstream = DnsServer(LOOPBACK, 0, domain="test", records={"example": "192.0.2.10"})
    ours = DnsServer(LOOPBACK, 0, records={"alpha": "172.30.77.2"})

    async def start() -> None:
        await upstream.start()
        ours.upstreams = [Upstream(LOOPBACK, upstream.port)]
        await ours.start()

    async def stop() -> None:
        await ours.stop()
        await upstream.stop()

    asyncio.run_coroutine_threadsafe(start(), loop).result()
    try:
        yield ours.port, upstream.port
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def measure(port: int, name: str, expect: str, count: int) -> list[float]:
    """Latency in microseconds of `count` sequential A queries for `name`, checking each answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2)
    sock.connect((LOOPBACK, port))
    samples: list[float] = []
    try:
        for i in range(count):
            query = DNSRecord.question(name, "A")
            query.header.id = i & 0xFFFF
            packet = query.pack()
            start = time.perf_counter()
            sock.send(packet)
            data = sock.recv(4096)
            samples.append((time.perf_counter() - start) * 1e6)
            reply = DNSRecord.parse(data)
            got = [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]
            if got != [expect]:
                raise SystemExit(f"wrong answer for {name}: {got}")
    finally:
        sock.close()
    return samples


def percentile(samples: list[float], p: float) -> float:
    """The p-th percentile (0-100) by nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def main() -> None:
    """Run the three measurements and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=2000, help="queries per case (default 2000)")
    args = parser.parse_args()
    with servers() as (ours, upstream):
        cases = [
            ("local name via banger", ours, "alpha.vm", "172.30.77.2"),
            ("forwarded name via banger", ours, "example.test", "192.0.2.10"),
            ("same name, upstream directly", upstream, "example.test", "192.0.2.10"),
        ]
        for _label, port, name, expect in cases:
            measure(port, name, expect, min(200, args.count))  # warm-up
        rows = [(label, measure(port, name, expect, args.count)) for label, port, name, expect in cases]
    print(f"{'case':<30} {'n':>6} {'p50 us':>9} {'p95 us':>9} {'mean us':>9}")
    for label, samples in rows:
        p50, p95 = percentile(samples, 50), percentile(samples, 95)
        print(f"{label:<30} {len(samples):>6} {p50:>9.0f} {p95:>9.0f} {statistics.fmean(samples):>9.0f}")


if __name__ == "__main__":
    main()
