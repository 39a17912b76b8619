"""`banger kernel ...` end to end: real CLI, real daemon, a real HTTP server on loopback."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from banger.rpc.client import Client
from tests.conftest import BangerEnv
from tests.foundation.test_daemon import wait_for
from tests.kernels.pull.conftest import (
    LoopbackServer,
    Route,
    entry_for,
    good_members,
    http_server,  # noqa: F401  (fixture)
    snapshot,
    tar_bytes,
    zst,
)


def write_catalog(path: Path, entries: list[dict]) -> Path:  # type: ignore[type-arg]
    path.write_text(json.dumps({"version": 1, "entries": entries}))
    return path


def serve_bundle(server: LoopbackServer, name: str, route: Route | None = None) -> dict:  # type: ignore[type-arg]
    bundle = zst(tar_bytes(good_members()))
    route = route or Route(body=bundle)
    route.body = route.body or bundle
    url = server.add(f"/{name}.tar.zst", route)
    return entry_for(name, url, bundle).to_json()


def test_pull_list_show_force(banger_env: BangerEnv, http_server: LoopbackServer, tmp_path: Path) -> None:  # noqa: F811
    banger_env.env["BANGER_CATALOG"] = str(write_catalog(tmp_path / "c.json", [serve_bundle(http_server, "k1")]))
    avail = banger_env.cli("kernel", "list", "--available", check=True).stdout
    assert "STATE" in avail and "available" in avail and "k1" in avail
    r = banger_env.cli("kernel", "pull", "k1", check=True)
    assert "pulled kernel k1" in r.stdout
    assert "downloading k1" in r.stderr  # plain progress lines when not on a TTY
    rows = json.loads(banger_env.cli("kernel", "list", "--json", check=True).stdout)
    assert [k["name"] for k in rows] == ["k1"] and rows[0]["source"].startswith("pull:http://127.0.0.1")
    entries = json.loads(banger_env.cli("kernel", "list", "--available", "--json", check=True).stdout)
    assert entries[0]["state"] == "pulled"
    show = json.loads(banger_env.cli("kernel", "show", "k1", "--json", check=True).stdout)
    assert show["kernel_version"] == "6.1.99" and len(show["sha256"]) == 64
    again = banger_env.cli("kernel", "pull", "k1")
    assert again.returncode == 1 and "already installed" in again.stderr
    banger_env.cli("kernel", "pull", "k1", "--force", check=True)
    unknown = banger_env.cli("kernel", "pull", "nope")
    assert unknown.returncode == 1 and "k1" in unknown.stderr  # lists the known names


def test_ctrl_c_during_pull_leaves_nothing(
    banger_env: BangerEnv,
    http_server: LoopbackServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    route = Route(stall_after=1000)
    banger_env.env["BANGER_CATALOG"] = str(
        write_catalog(tmp_path / "c.json", [serve_bundle(http_server, "slow", route)])
    )
    banger_env.cli("daemon", "start", check=True)
    kernels = banger_env.home / "kernels"
    before = snapshot(kernels)
    proc = banger_env.popen("kernel", "pull", "slow")
    assert route.stalled.wait(30), "the pull never reached the server"
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    with Client(banger_env.socket) as c:
        wait_for(lambda: c.call("daemon.status")["inflight"] == 0, what="pull cancelled in the daemon")
    assert snapshot(kernels) == before
    assert "kernel.pull was cancelled" in banger_env.log_text() or "cancelled" in banger_env.log_text()


def test_import_survives_restart_and_rm(banger_env: BangerEnv, tmp_path: Path) -> None:
    src = tmp_path / "build"
    src.mkdir()
    for info, data in good_members():
        if info.isreg() and "/" not in info.name:
            (src / info.name).write_bytes(data or b"")
    banger_env.cli("kernel", "import", str(src), "--name", "local", "--distro", "custom", check=True)
    banger_env.cli("daemon", "stop", check=True)
    rows = json.loads(banger_env.cli("kernel", "list", "--json", check=True).stdout)  # autostarts a new daemon
    assert rows[0]["name"] == "local" and rows[0]["source"] == f"import:{src}"
    assert rows[0]["kernel_version"] == "6.1.99-test"  # read from the image's "Linux version" banner
    banger_env.cli("kernel", "rm", "local", check=True)
    assert not (banger_env.home / "kernels" / "local").exists()
    gone = banger_env.cli("kernel", "show", "local")
    assert gone.returncode == 1 and "not installed" in gone.stderr


def test_bundle_then_pull_reproduces_bytes(
    banger_env: BangerEnv,
    http_server: LoopbackServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "build"
    for info, data in good_members():
        if info.isreg():
            (src / info.name).parent.mkdir(parents=True, exist_ok=True)
            (src / info.name).write_bytes(data or b"")
    banger_env.cli("kernel", "import", str(src), "--name", "orig", check=True)
    out = tmp_path / "orig.tar.zst"
    url = http_server.base + "/orig.tar.zst"
    entry = json.loads(banger_env.cli("kernel", "bundle", "orig", "-o", str(out), "--url", url, check=True).stdout)
    assert entry["tarball_url"] == url and entry["size_bytes"] == out.stat().st_size
    http_server.add("/orig.tar.zst", Route(body=out.read_bytes()))
    entry["name"] = "copy"
    banger_env.env["BANGER_CATALOG"] = str(write_catalog(tmp_path / "c.json", [entry]))
    banger_env.cli("kernel", "pull", "copy", check=True)
    a, b = banger_env.home / "kernels" / "orig", banger_env.home / "kernels" / "copy"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert files and files == sorted(
        p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_malformed_catalog_is_clear(banger_env: BangerEnv, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "entries": [{"name": "x"}]}')
    banger_env.env["BANGER_CATALOG"] = str(bad)
    r = banger_env.cli("kernel", "list", "--available")
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and "missing" in r.stderr


def test_kernel_build_from_debian_then_bundle_and_pull(
    banger_env: BangerEnv,
    http_server: LoopbackServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    from tests.kernels.conftest import DEBS

    # Share the verified .deb cache with the kernel library tests, so this run does not download again.
    (banger_env.home / "cache").mkdir(parents=True)
    (banger_env.home / "cache" / "debian").symlink_to(DEBS)
    r = banger_env.cli("kernel", "build", "--from", "debian", "--name", "deb", "--json", check=True, timeout=1800)
    built = json.loads(r.stdout)
    assert built["source"].startswith("build:debian:")
    assert built["boots_on"] == {"firecracker": True, "qemu-microvm": True}
    assert built["has_initrd"] and built["has_modules"]
    out = tmp_path / "deb.tar.zst"
    url = http_server.base + "/deb.tar.zst"
    entry = json.loads(banger_env.cli("kernel", "bundle", "deb", "-o", str(out), "--url", url, check=True).stdout)
    http_server.add("/deb.tar.zst", Route(body=out.read_bytes()))
    entry["name"] = "deb-pulled"
    banger_env.env["BANGER_CATALOG"] = str(write_catalog(tmp_path / "c.json", [entry]))
    banger_env.cli("kernel", "pull", "deb-pulled", check=True, timeout=600)
    pulled = json.loads(banger_env.cli("kernel", "show", "deb-pulled", "--json", check=True).stdout)
    assert pulled["sha256"] == built["sha256"]
    assert pulled["boots_on"] == built["boots_on"]


def test_the_cli_environment_decides_the_catalog(
    banger_env: BangerEnv,
    http_server: LoopbackServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    first = write_catalog(tmp_path / "first.json", [serve_bundle(http_server, "from-env")])
    banger_env.env["BANGER_CATALOG"] = str(first)
    banger_env.cli("daemon", "start", check=True)  # this daemon's own environment names `first`
    assert "from-env" in banger_env.cli("kernel", "list", "--available", check=True).stdout
    del banger_env.env["BANGER_CATALOG"]
    # Without BANGER_CATALOG in the CLI, the config file decides (a path relative to it), not the daemon's env.
    (banger_env.home / "cats").mkdir()
    write_catalog(banger_env.home / "cats" / "c.json", [serve_bundle(http_server, "from-config")])
    (banger_env.home / "config.toml").write_text('kernel_catalog = "cats/c.json"\n')
    out = banger_env.cli("kernel", "list", "--available", check=True).stdout
    assert "from-config" in out and "from-env" not in out
    (banger_env.home / "config.toml").unlink()
    assert "no entries" in banger_env.cli("kernel", "list", "--available", check=True).stdout  # the packaged one


def test_ctrl_c_during_kernel_build_leaves_nothing(banger_env: BangerEnv) -> None:
    from tests.kernels.conftest import DEBS

    (banger_env.home / "cache").mkdir(parents=True)
    (banger_env.home / "cache" / "debian").symlink_to(DEBS)
    banger_env.cli("daemon", "start", check=True)
    proc = banger_env.popen("kernel", "build", "--from", "debian", "--name", "halfway")
    assert proc.stderr is not None
    for line in proc.stderr:  # plain progress lines: wait until the build is inside its steps
        if line.startswith("unpack"):
            break
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    with Client(banger_env.socket) as c:
        wait_for(lambda: c.call("daemon.status")["inflight"] == 0, what="build cancelled in the daemon")
    assert [p.name for p in (banger_env.home / "kernels").iterdir()] == []
    assert json.loads(banger_env.cli("kernel", "list", "--json", check=True).stdout) == []
