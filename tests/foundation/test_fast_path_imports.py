"""The CLI's fast path (`version`, `daemon status`, plain `vm exec` and `vm show`) stays import-light (issue 14,
item 6): what it needs to reach the daemon must not pull in click, typing, dataclasses or pathlib, each of which
costs milliseconds on every call. Checked in a fresh interpreter, the way the CLI starts."""

from __future__ import annotations

import subprocess
import sys

from banger.rpc import protocol

HEAVY = {"click", "typing", "dataclasses", "pathlib", "inspect", "base64"}


def _imported_by(code: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


def test_what_the_fast_exec_path_imports_leaves_the_heavy_modules_out() -> None:
    # Everything vm_exec touches before its first byte reaches the daemon: the modules, a Client, the hello's code_id.
    modules = _imported_by(
        "from banger.cli import fast, stream; from banger.rpc.client import Client; from banger.buildinfo import "
        "code_id, build_info; Client('/nonexistent/bangerd.sock'); code_id(); build_info()"
    )
    assert {"banger.cli.fast", "banger.cli.stream", "banger.rpc.client"} <= modules
    assert not modules & HEAVY, f"the fast path imported {sorted(modules & HEAVY)}"


def test_requests_compare_by_value_and_refuse_hashing() -> None:
    req = protocol.parse_request(b'{"jsonrpc":"2.0","id":3,"method":"vm.show","params":{"name":"a"}}')
    assert req == protocol.Request("vm.show", {"name": "a"}, 3)
    assert req != protocol.Request("vm.show", {"name": "b"}, 3)
    assert (req.method, req.params, req.id) == ("vm.show", {"name": "a"}, 3)
    assert "vm.show" in repr(req)
    try:
        hash(req)
    except TypeError:
        pass
    else:
        raise AssertionError("a request with dict params must not be hashable")
