"""The JSON API: each route is one daemon call, returning the object the CLI prints with `--json`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from banger.cli.kernel_cmds import catalog_env
from banger.errors import BangerError, ErrorCode, InvalidInputError
from banger.rpc.aclient import AsyncClient
from banger.rpc.client import DaemonUnavailable
from banger.ui.forms import create_params_from

STATUS: dict[int, int] = {
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.IN_USE: 409,
    ErrorCode.BUSY: 409,
    ErrorCode.INVALID_INPUT: 400,
    ErrorCode.INVALID_PARAMS: 400,
    ErrorCode.UNSUPPORTED: 501,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.CANCELLED: 409,
}


def error_response(exc: BangerError) -> JSONResponse:
    """A daemon error as `{"error": message}` (and its hint), with a fitting status."""
    status = 503 if isinstance(exc, DaemonUnavailable) else STATUS.get(int(exc.code), 500)
    body: dict[str, Any] = {"error": exc.message}
    if exc.hint:
        body["hint"] = exc.hint
    return JSONResponse(body, status_code=status)


@contextlib.asynccontextmanager
async def daemon(request: Request) -> AsyncIterator[AsyncClient]:
    """A connection to the daemon for one request (the UI never starts the daemon itself)."""
    socket: Path = request.app.state.socket
    async with AsyncClient(socket) as client:
        yield client


async def call(request: Request, method: str, params: dict[str, Any] | None = None) -> Any:
    """One daemon call on a fresh connection."""
    async with daemon(request) as client:
        return await client.call(method, params or {})


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json() if await request.body() else {}
    except ValueError as exc:
        raise InvalidInputError(f"the request body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidInputError("the request body must be a JSON object")
    return body


def _name(request: Request, key: str = "name") -> str:
    return str(request.path_params[key])


def endpoint(fn: Any) -> Any:
    """Turn a coroutine returning a JSON-able value into a route handler with banger's error mapping."""

    async def handler(request: Request) -> Response:
        try:
            return JSONResponse(await fn(request))
        except BangerError as exc:
            return error_response(exc)

    handler.__name__ = fn.__name__
    return handler


@endpoint
async def list_vms(request: Request) -> Any:
    return await call(request, "vm.list")


@endpoint
async def show_vm(request: Request) -> Any:
    return await call(request, "vm.show", {"name": _name(request)})


@endpoint
async def vm_ports(request: Request) -> Any:
    return await call(request, "vm.ports", {"name": _name(request)})


@endpoint
async def vm_log(request: Request) -> Any:
    lines = request.query_params.get("lines", "200")
    if not lines.isdigit():
        raise InvalidInputError(f"lines must be a number, got {lines!r}")
    return await call(request, "vm.logs", {"name": _name(request), "lines": int(lines)})


@endpoint
async def create_vm(request: Request) -> Any:
    params = create_params_from(await _json_body(request))
    return await call(request, "vm.create", params)


def _lifecycle(method: str) -> Any:
    async def action(request: Request) -> Any:
        body = await _json_body(request)
        params: dict[str, Any] = {"name": _name(request)}
        if body.get("timeout") is not None:
            params["timeout"] = body["timeout"]
        return await call(request, method, params)

    action.__name__ = method.replace(".", "_")
    return endpoint(action)


@endpoint
async def remove_vm(request: Request) -> Any:
    force = request.query_params.get("force", "") in ("1", "true", "yes")
    return await call(request, "vm.rm", {"name": _name(request), "force": force})


@endpoint
async def list_kernels(request: Request) -> Any:
    if request.query_params.get("available", "") in ("1", "true", "yes"):
        cat = await call(request, "kernel.catalog", {"catalog": catalog_env()})
        return cat["entries"]  # `kernel list --available --json` prints the entries
    return await call(request, "kernel.list")


@endpoint
async def pull_kernel(request: Request) -> Any:
    body = await _json_body(request)
    params = {"name": _name(request), "force": bool(body.get("force", False)), "catalog": catalog_env()}
    return await call(request, "kernel.pull", params)


@endpoint
async def remove_kernel(request: Request) -> Any:
    return await call(request, "kernel.rm", {"name": _name(request)})


@endpoint
async def list_images(request: Request) -> Any:
    return await call(request, "image.list")


@endpoint
async def remove_image(request: Request) -> Any:
    return await call(request, "image.rm", {"name": _name(request)})


# Sessions belong to another work stream; their RPC names are aligned at merge. A daemon without them answers
# "not supported by this daemon" (501).
@endpoint
async def list_sessions(request: Request) -> Any:
    return await call(request, "session.list", {"vm": _name(request)})


@endpoint
async def start_session(request: Request) -> Any:
    return await call(request, "session.start", {**(await _json_body(request)), "vm": _name(request)})


@endpoint
async def send_session(request: Request) -> Any:
    body = await _json_body(request)
    return await call(request, "guest.session.send", {**body, "vm": _name(request), "session": _name(request, "sid")})


@endpoint
async def stop_session(request: Request) -> Any:
    body = await _json_body(request)
    return await call(request, "session.stop", {**body, "vm": _name(request), "session": _name(request, "sid")})


def process_age(pid: int) -> float | None:
    """Seconds since process `pid` started (a running VM's uptime is its VMM's age), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))


@endpoint
async def uptimes(request: Request) -> Any:
    """{name: seconds} for running VMs (not a CLI object: the VMs table's uptime column)."""
    vms = await call(request, "vm.list")
    ages = {vm["name"]: process_age(int(vm["pid"])) for vm in vms if vm.get("pid") and vm["state"] == "running"}
    return {name: age for name, age in ages.items() if age is not None}


@endpoint
async def daemon_status(request: Request) -> Any:
    return await call(request, "daemon.status")


ROUTES = [
    Route("/api/status", daemon_status),
    Route("/api/uptime", uptimes),
    Route("/api/vms", list_vms, methods=["GET"]),
    Route("/api/vms", create_vm, methods=["POST"]),
    Route("/api/vms/{name}", show_vm, methods=["GET"]),
    Route("/api/vms/{name}", remove_vm, methods=["DELETE"]),
    Route("/api/vms/{name}/start", _lifecycle("vm.start"), methods=["POST"]),
    Route("/api/vms/{name}/stop", _lifecycle("vm.stop"), methods=["POST"]),
    Route("/api/vms/{name}/restart", _lifecycle("vm.restart"), methods=["POST"]),
    Route("/api/vms/{name}/kill", _lifecycle("vm.kill"), methods=["POST"]),
    Route("/api/vms/{name}/ports", vm_ports),
    Route("/api/vms/{name}/log", vm_log),
    Route("/api/vms/{name}/sessions", list_sessions, methods=["GET"]),
    Route("/api/vms/{name}/sessions", start_session, methods=["POST"]),
    Route("/api/vms/{name}/sessions/{sid}/send", send_session, methods=["POST"]),
    Route("/api/vms/{name}/sessions/{sid}/stop", stop_session, methods=["POST"]),
    Route("/api/kernels", list_kernels),
    Route("/api/kernels/{name}/pull", pull_kernel, methods=["POST"]),
    Route("/api/kernels/{name}", remove_kernel, methods=["DELETE"]),
    Route("/api/images", list_images),
    Route("/api/images/{name}", remove_image, methods=["DELETE"]),
]
