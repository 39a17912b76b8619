"""Sample git checkouts for workspace tests, and a file-by-file fingerprint (hash + mode, links by target)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.org",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.org",
    "GIT_OPTIONAL_LOCKS": "0",  # `git status` must not refresh (rewrite) the index we compare
}


def git(repo: Path, *args: str, input: bytes | None = None) -> str:
    """Run git in `repo` as a user would (test helper); returns stdout."""
    env = {**os.environ, **GIT_ENV, "HOME": str(repo.parent)}
    out = subprocess.run(["git", "-C", str(repo), *args], env=env, capture_output=True, check=True, input=input)
    return out.stdout.decode()


def make_repo(root: Path, name: str = "proj") -> Path:
    """A checkout with exec bits, a symlink, a binary file, an ignored file, an untracked file, an uncommitted edit
    and a staged deletion."""
    repo = root / name
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "Host User")
    git(repo, "config", "user.email", "host@example.org")
    (repo / "run.sh").write_text("#!/bin/sh\necho run\n")
    (repo / "run.sh").chmod(0o755)
    (repo / "data.bin").write_bytes(bytes(range(256)) * 40 + b"\0\xff\0")
    (repo / "link").symlink_to("run.sh")
    (repo / ".gitignore").write_text("*.log\n")
    (repo / "tracked.txt").write_text("one\ntwo\n")
    (repo / "keep.txt").write_text("keep\n")
    (repo / "rename-me.txt").write_text("a file that the guest renames\n" * 5)
    (repo / "gone.txt").write_text("deleted but staged\n")
    (repo / "sub").mkdir()
    (repo / "sub" / "tool.py").write_text("print('tool')\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    (repo / "ignored.log").write_text("ignored\n")
    (repo / "untracked.txt").write_text("untracked\n")
    (repo / "we[ir]d *.txt").write_text("a name that is a glob pattern\n")
    (repo / "tracked.txt").write_text("one\ntwo\nthree (uncommitted)\n")
    git(repo, "rm", "-q", "gone.txt")
    return repo


def fingerprint(root: Path, *, skip: frozenset[str] = frozenset({".git"})) -> dict[str, str]:
    """path -> "mode:sha256" for files, "link:target" for symlinks (directories only through their contents)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = f"link:{os.readlink(path)}"
            else:
                out[rel] = f"{stat.S_IMODE(st.st_mode):o}:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    return out


# The same fingerprint, as a python3 program for the guest (stdlib only), printing JSON.
GUEST_FINGERPRINT = r"""
import hashlib, json, os, stat, sys
root = sys.argv[1]
out = {}
for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d != ".git"]
    for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, root)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            out[rel] = "link:" + os.readlink(path)
        else:
            out[rel] = "%o:%s" % (stat.S_IMODE(st.st_mode), hashlib.sha256(open(path, "rb").read()).hexdigest())
print(json.dumps(out))
"""


def host_state(repo: Path) -> tuple[str, str, str, str]:
    """What must not change on the host: porcelain status, HEAD, the index file's hash, the stash list."""
    index = hashlib.sha256((repo / ".git" / "index").read_bytes()).hexdigest()
    return git(repo, "status", "--porcelain"), git(repo, "rev-parse", "HEAD"), index, git(repo, "stash", "list")
