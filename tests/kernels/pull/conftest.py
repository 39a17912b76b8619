"""Fixtures for kernel tests: a real loopback HTTP server and real zstd-compressed tar bundles."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import ssl
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import zstandard

from banger import proc
from banger.kernels.bulkhttp import tls_context
from banger.kernels.catalog import CatalogEntry

# A minimal x86-64 ELF header with no program/section headers, then filler and a version banner: enough for
# banger's layout and version checks. These kernels are never booted here; the VM tests use a real one.
FAKE_VMLINUX = (
    b"\x7fELF\x02\x01\x01"
    + bytes(9)
    + b"\x02\x00\x3e\x00"
    + bytes(44)
    + os.urandom(4000)
    + b"Linux version 6.1.99-test (x@y) #1 SMP\x00"
)


@dataclass
class Route:
    """What the server does for one path: serve `body`, or fail with `status`, or stall/close early."""

    body: bytes = b""
    status: int = 200
    stall_after: int | None = None  # send this many body bytes, then hang until the server stops
    close_after: int | None = None  # send this many body bytes, then drop the connection
    chunk_delay: float = 0.0  # seconds between 1 MiB chunks: a download that lasts long enough to show progress
    hits: int = 0
    stalled: threading.Event = field(default_factory=threading.Event)


@dataclass
class LoopbackServer:
    base: str
    routes: dict[str, Route] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def add(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.base + path


def _handler(server: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            route = server.routes.get(self.path)
            if route is None:
                self.send_error(404, "Not Found")
                return
            route.hits += 1
            if route.status != 200:
                self.send_error(route.status)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            if route.stall_after is not None:
                self.wfile.write(route.body[: route.stall_after])
                self.wfile.flush()
                route.stalled.set()
                server.stop.wait(30)
                self.close_connection = True
                return
            if route.close_after is not None:
                self.wfile.write(route.body[: route.close_after])
                self.wfile.flush()
                self.close_connection = True
                return
            view = memoryview(route.body)
            for i in range(0, len(view), 1 << 20):
                self.wfile.write(view[i : i + (1 << 20)])
                if route.chunk_delay:
                    self.wfile.flush()
                    server.stop.wait(route.chunk_delay)

    return Handler


@contextlib.contextmanager
def _serve(tls: ssl.SSLContext | None) -> Iterator[LoopbackServer]:
    state = LoopbackServer(base="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    state.base = f"{'https' if tls else 'http'}://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def http_server() -> Iterator[LoopbackServer]:
    """A threaded HTTP server on 127.0.0.1 with programmable routes."""
    with _serve(None) as state:
        yield state


@pytest.fixture
def https_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackServer]:
    """The same server over TLS, with a fresh self-signed certificate the client trusts via SSL_CERT_FILE."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    proc.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", key, "-out", cert],
        step="make a test certificate",
    )  # fmt: skip
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    tls_context.cache_clear()
    try:
        with _serve(ctx) as state:
            yield state
    finally:
        tls_context.cache_clear()


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """An uncompressed tar built from explicit members (so tests can build hostile ones)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def reg(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info, None


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


def good_members(extra: bytes = b"") -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [
        reg("vmlinux", FAKE_VMLINUX + extra, 0o755),
        reg("config", b"CONFIG_VIRTIO=y\n"),
        reg("cmdline", b"console=ttyS0 reboot=k\n"),
        special("modules", tarfile.DIRTYPE),
        special("modules/6.1.99", tarfile.DIRTYPE),
        reg("modules/6.1.99/modules.dep", b"kernel/virtio.ko:\n"),
        reg("modules/6.1.99/kernel/virtio.ko", os.urandom(3000)),
        special("modules/6.1.99/source", tarfile.SYMTYPE, "kernel"),
        special("modules/6.1.99/again.ko", tarfile.LNKTYPE, "modules/6.1.99/kernel/virtio.ko"),
    ]


def entry_for(name: str, url: str, bundle: bytes, sha: str | None = None) -> CatalogEntry:
    return CatalogEntry(
        name=name,
        distro="debian",
        arch="x86_64",
        kernel_version="6.1.99",
        tarball_url=url,
        tarball_sha256=sha or hashlib.sha256(bundle).hexdigest(),
        size_bytes=len(bundle),
        description="test kernel",
    )


def snapshot(root: Path) -> dict[str, tuple[str, bytes]]:
    """Every path under `root` with its kind and content, to prove a failed pull changed nothing."""
    out: dict[str, tuple[str, bytes]] = {}
    if not root.exists():
        return out
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p).encode())
            elif p.is_dir():
                out[rel] = ("dir", b"")
            else:
                out[rel] = ("file", p.read_bytes())
    return out
