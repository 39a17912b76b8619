"""put/get through the real agent, and the extractor's refusal of hostile tar streams."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from banger import errors
from banger.guest.client import AgentClient
from banger.guest.transfer import ROOT, TransferError, extract_tar

from .test_agent import with_client


def _tree(root: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Relative path -> (mode, content or link target) for everything under root."""
    found: dict[str, tuple[int, bytes | str | None]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            found[rel] = (stat.S_IMODE(st.st_mode), os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            found[rel] = (stat.S_IMODE(st.st_mode), None)
        else:
            found[rel] = (stat.S_IMODE(st.st_mode), path.read_bytes())
    return found


def _make_tree(src: Path) -> None:
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o755)
    (src / "secret").write_bytes(b"s3cret")
    (src / "secret").chmod(0o600)
    (src / "sub" / "deep" / "data.bin").write_bytes(os.urandom(100_000))
    (src / "sub" / "link").symlink_to("deep/data.bin")
    (src / "sub" / "deep").chmod(0o700)
    (src / "sub").chmod(0o750)


def test_put_and_get_directory_round_trip_keeps_modes(tmp_path: Path) -> None:
    src, guest, back = tmp_path / "src", tmp_path / "guest", tmp_path / "back"
    _make_tree(src)

    async def body(c: AgentClient) -> None:
        placed = await c.put(src, str(guest / "tree"))
        assert placed == str(guest / "tree")
        assert _tree(guest / "tree") == _tree(src)
        got = await c.get(str(guest / "tree"), back)
        assert got == back
        assert _tree(back) == _tree(src)
        # Into an existing directory, like cp: the source keeps its name.
        (tmp_path / "into").mkdir()
        got2 = await c.get(str(guest / "tree" / "secret"), tmp_path / "into")
        assert got2 == tmp_path / "into" / "secret"
        assert stat.S_IMODE(got2.stat().st_mode) == 0o600 and got2.read_bytes() == b"s3cret"
        # Into an existing directory the source keeps its name; a second put merges (like cp -r): what the
        # source no longer has stays, what it has is replaced.
        assert await c.put(src, str(guest)) == str(guest / "src")
        (src / "secret").unlink()
        (src / "run.sh").write_bytes(b"#!/bin/sh\necho changed\n")
        assert await c.put(src, str(guest)) == str(guest / "src")
        assert (guest / "src" / "secret").read_bytes() == b"s3cret"
        assert (guest / "src" / "run.sh").read_bytes() == b"#!/bin/sh\necho changed\n"
        # The same on the way out: a get onto an existing copy keeps the host's extra files.
        out = tmp_path / "out"
        out.mkdir()
        assert await c.get(str(guest / "src"), out) == out / "src"
        (out / "src" / "mine.txt").write_text("host only")
        (out / "src" / "mine.txt").chmod(0o644)
        assert await c.get(str(guest / "src"), out) == out / "src"
        assert (out / "src" / "mine.txt").read_text() == "host only"
        assert _tree(out / "src") == {**_tree(src), "mine.txt": (0o644, b"host only"), "secret": (0o600, b"s3cret")}

    with_client(tmp_path, body)


def test_put_as_user_owns_the_tree(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root to give files away, like the agent in a guest")
    src = tmp_path / "src"
    _make_tree(src)
    dest = tmp_path / "guest"

    async def body(c: AgentClient) -> None:
        await c.put(src, str(dest), user="nobody")
        owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in [dest, *dest.rglob("*")]}
        assert owners == {(65534, 65534)}
        assert _tree(dest) == _tree(src)
        with pytest.raises(errors.BangerError, match="no such user"):
            await c.put(src, str(tmp_path / "other"), user="no-such-user-here")
        assert not (tmp_path / "other").exists()

    with_client(tmp_path, body)


def test_large_file_transfer(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    data = os.urandom(6 * 1024 * 1024 + 123)
    big.write_bytes(data)
    big.chmod(0o640)

    async def body(c: AgentClient) -> None:
        await c.put(big, str(tmp_path / "guest.bin"))
        assert hashlib.sha256((tmp_path / "guest.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
        got = await c.get(str(tmp_path / "guest.bin"), tmp_path / "back.bin")
        assert got.read_bytes() == data
        assert stat.S_IMODE(got.stat().st_mode) == 0o640

    with_client(tmp_path, body)


def test_concurrent_transfers_and_exec(tmp_path: Path) -> None:
    files = []
    for i in range(3):
        f = tmp_path / f"f{i}"
        f.write_bytes(os.urandom(1_500_000))
        files.append(f)

    async def body(c: AgentClient) -> None:
        puts = [c.put(f, str(tmp_path / f"g{i}")) for i, f in enumerate(files)]
        _, echoed = await asyncio.gather(asyncio.gather(*puts), c.run(["echo", "meanwhile"]))
        assert echoed.stdout == b"meanwhile\n"
        for i, f in enumerate(files):
            assert (tmp_path / f"g{i}").read_bytes() == f.read_bytes()

    with_client(tmp_path, body)


def test_transfer_errors(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        with pytest.raises(errors.NotFoundError):
            await c.get("/no/such/path", tmp_path / "x")
        assert not (tmp_path / "x").exists()
        with pytest.raises(errors.NotFoundError):
            await c.put(tmp_path / "missing", str(tmp_path / "y"))
        assert (await c.health()).version == 1

    with_client(tmp_path, body)


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode = kind, size, link, 0o644
    return info


@pytest.mark.parametrize(
    "members",
    [
        [(_info("../evil", size=1), b"x")],
        [(_info(ROOT, tarfile.DIRTYPE), None), (_info(f"{ROOT}/../../evil", size=1), b"x")],
        [(_info("/etc/evil", size=1), b"x")],
        [
            (_info(ROOT, tarfile.DIRTYPE), None),
            (_info(f"{ROOT}/l", tarfile.SYMTYPE, link="/tmp"), None),
            (_info(f"{ROOT}/l/evil", size=1), b"x"),
        ],
        [(_info(ROOT, tarfile.DIRTYPE), None), (_info(f"{ROOT}/dev", tarfile.CHRTYPE), None)],
        [(_info(ROOT, tarfile.DIRTYPE), None), (_info(f"{ROOT}/h", tarfile.LNKTYPE, link="/etc/passwd"), None)],
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "through-symlink", "device", "hardlink-out"],
)
def test_extract_refuses_hostile_tars(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    target = tmp_path / "out" / "dest"
    with pytest.raises(TransferError):
        extract_tar(_tar(*members), target, keep_owner=False)  # type: ignore[arg-type]
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []  # the staging directory is gone too


def test_extract_does_not_write_through_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"original")
    tar = _tar(
        (_info(ROOT, tarfile.DIRTYPE), None),
        (_info(f"{ROOT}/f", tarfile.SYMTYPE, link=str(victim)), None),
        (_info(f"{ROOT}/f", size=3), b"new"),
    )
    extract_tar(tar, tmp_path / "dest", keep_owner=False)  # type: ignore[arg-type]
    assert victim.read_bytes() == b"original"
    assert (tmp_path / "dest" / "f").read_bytes() == b"new"


def test_pipes_hand_over_whole_chunks_and_ack_each_once() -> None:
    from banger.guest.protocol import MAX_CHUNK
    from banger.guest.transfer import InboundPipe, OutboundPipe

    async def main() -> None:
        loop = asyncio.get_running_loop()
        acks: list[int] = []
        inbound = InboundPipe(loop, acks.append)
        chunks = [os.urandom(MAX_CHUNK), os.urandom(100)]
        for chunk in chunks:
            inbound.feed(chunk)
        inbound.feed_eof()
        # A reader asking for more than a chunk gets that chunk whole; a smaller read splits it.
        got = [await asyncio.to_thread(inbound.read, 1 << 20), await asyncio.to_thread(inbound.read, 60)]
        got += [await asyncio.to_thread(inbound.read, 1 << 20), await asyncio.to_thread(inbound.read, 1 << 20)]
        await asyncio.sleep(0)
        assert got == [chunks[0], chunks[1][:60], chunks[1][60:], b""]
        assert acks == [MAX_CHUNK, 100]  # one ACK per chunk, once it is all consumed

        sent: list[bytes] = []

        async def send(chunk: bytes) -> bool:
            sent.append(chunk)
            return True

        outbound = OutboundPipe(loop, send)
        data = os.urandom(3 * MAX_CHUNK + 5)
        await asyncio.to_thread(outbound.write, data)
        assert [len(c) for c in sent] == [MAX_CHUNK] * 3  # whole chunks go at once; the tail waits for more
        await asyncio.to_thread(outbound.flush)
        assert b"".join(sent) == data and len(sent[-1]) == 5

    asyncio.run(main())
