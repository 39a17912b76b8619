"""Agent VMs and sessions, each against a floor measured in the same run (always --net none):

- `vm create --agent opencode` wall time to a healthy opencode, against `vm create` alone, and the part banger
  reports for opencode itself (session start -> healthy) against opencode's own start time measured inside the
  same guest (a second `opencode serve` on another port, polled from inside the guest);
- one opencode API call through banger (the daemon runs the request in the guest through the agent) against the
  same call made inside the guest, in a loop;
- `session start` + `session logs` of a short process against `vm exec` of the same command.
Run (as root): .venv/bin/python bench/bench_sessions.py [--calls 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vm import IMAGE, KERNEL, PRESET, banger_home, cleanup_on_signals, log, timed

OPENCODE_CACHE = Path("/var/cache/banger-tests/opencode-cache/agents")
BANGER = str(Path(sys.executable).parent / "banger")
# Inside the guest: start a second server and time it to healthy; then time N health calls in one process.
OWN_START = """
import base64, subprocess, sys, time, urllib.request
env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "OPENCODE_SERVER_PASSWORD": "bench",
       "OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_MODELS_FETCH": "1"}
t0 = time.monotonic()
p = subprocess.Popen(["opencode", "serve", "--hostname", "127.0.0.1", "--port", "4097"], env=env,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
auth = "Basic " + base64.b64encode(b"opencode:bench").decode()
def call():
    req = urllib.request.Request("http://127.0.0.1:4097/global/health", headers={"Authorization": auth})
    return urllib.request.urlopen(req, timeout=5).status
while True:
    try:
        if call() == 200:
            break
    except OSError:
        time.sleep(0.2)
start = time.monotonic() - t0
calls = []
for _ in range(int(sys.argv[1])):
    t = time.monotonic(); call(); calls.append(time.monotonic() - t)
p.terminate()
print(start, sorted(calls)[len(calls) // 2])
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    cleanup_on_signals()
    with banger_home() as home:
        home.banger("image", "build", IMAGE, "--preset", PRESET)
        OPENCODE_CACHE.mkdir(parents=True, exist_ok=True)
        (home.path / "cache" / "agents").symlink_to(OPENCODE_CACHE)
        base = [BANGER, "vm", "create", "--kernel", KERNEL, "--image", IMAGE, "--net", "none", "--vcpus", "2"]
        home.vms.append("plain")
        plain = timed([*base, "--name", "plain", "--memory", "2048", "--cpu", "max"], home.env, 900)
        home.remove("plain")
        log(f"vm create alone: {plain:.1f}s")
        home.vms.append("coder")
        t0 = time.perf_counter()
        out = home.banger(*base[1:], "--name", "coder", "--agent", "opencode", "--json", timeout=1800).stdout
        agent_wall = time.perf_counter() - t0
        healthy_after = float(json.loads(out)["agent"]["healthy_after_s"])
        log(f"vm create --agent opencode: {agent_wall:.1f}s (opencode healthy {healthy_after:.1f}s after its start)")
        own = home.banger("vm", "exec", "coder", "--", "python3", "-c", OWN_START, str(args.calls), timeout=1800)
        own_start, own_call = (float(x) for x in own.stdout.split())
        through = []
        for _ in range(args.calls):
            t = time.perf_counter()
            home.banger("session", "ls", "coder", "--json")  # one daemon round trip that asks the guest
            through.append(time.perf_counter() - t)
        exec_t = statistics.median(
            timed([BANGER, "vm", "exec", "coder", "--", "echo", "hi"], home.env) for _ in range(args.calls)
        )
        t = time.perf_counter()
        home.banger("session", "start", "coder", "--name", "echo", "--", "echo", "hi")
        home.banger("session", "logs", "-f", "coder", "echo")
        session_t = time.perf_counter() - t
        home.remove("coder")
    print(f"{'measurement':<52} {'seconds':>9} {'floor':>9} {'ratio':>7}")
    rows = [
        ("vm create --agent opencode (vs vm create alone)", agent_wall, plain),
        ("opencode start via banger (vs its own, same guest)", healthy_after, own_start),
        ("session ls round trip (vs API call inside guest)", statistics.median(through), own_call),
        ("session start + logs -f of `echo hi` (vs vm exec)", session_t, exec_t),
    ]
    for label, value, floor in rows:
        print(f"{label:<52} {value:>9.2f} {floor:>9.2f} {value / floor if floor else float('nan'):>7.2f}")


if __name__ == "__main__":
    main()
