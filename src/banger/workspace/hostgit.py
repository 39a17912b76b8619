"""Host-side git for workspaces. Runs in the CLI process, as the calling user, never in the daemon.

Every call goes through `git()`: an argument list, a timeout, a clean environment (no GIT_DIR or GIT_INDEX_FILE
leaking in from the caller, no system config), hooks and fsmonitor off. Nothing here ever runs git with a
guest-written `.git`: what comes back from a guest is a bundle, unpacked into a scratch repository banger made
itself, and it reaches the user's repository only through a `file://` fetch with `transfer.fsckObjects` on
(Debian 12's git 2.39 does not fsck objects while unbundling).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from banger import proc
from banger.errors import AlreadyExistsError, InvalidInputError, ToolError

GIT_TIMEOUT = 1800.0
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
# The snapshot commit's identity: it never leaves the host's refs/banger/ namespace under this name.
SNAPSHOT_IDENTITY = {
    "GIT_AUTHOR_NAME": "banger",
    "GIT_AUTHOR_EMAIL": "banger@localhost",
    "GIT_COMMITTER_NAME": "banger",
    "GIT_COMMITTER_EMAIL": "banger@localhost",
}
_SAFE_CONFIG = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "core.pager=cat")


def git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment host git runs with: the caller's HOME (their global config), nothing else of theirs."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_OPTIONAL_LOCKS": "0",
    }
    if "XDG_CONFIG_HOME" in os.environ:
        env["XDG_CONFIG_HOME"] = os.environ["XDG_CONFIG_HOME"]
    return env | (extra or {})


def git(
    repo: Path,
    *args: str,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    check: bool = True,
    capture: bool = True,
    step: str | None = None,
) -> str:
    """Run `git -C repo ARGS...` as described in the module docstring; returns stdout."""
    argv = [proc.which("git", hint="apt-get install git"), *_SAFE_CONFIG, "-C", str(repo), *args]
    out = proc.run(
        argv,
        env=git_env(env),
        input=input,
        check=check,
        capture=capture,
        step=step or f"git {args[0]}",
        timeout=GIT_TIMEOUT,
        inherit_env=False,
    )
    return (out.stdout or b"").decode(errors="replace")


def toplevel(path: Path) -> Path | None:
    """The top of the git work tree holding `path`, or None when it is not in one."""
    if not path.is_dir():
        return None
    out = git(path, "rev-parse", "--show-toplevel", check=False).strip()
    return Path(out) if out and Path(out).is_dir() else None


def identity(repo: Path) -> tuple[str, str]:
    """The caller's user.name and user.email as git sees them in `repo` (empty when unset)."""
    name = git(repo, "config", "user.name", check=False).strip()
    email = git(repo, "config", "user.email", check=False).strip()
    return name, email


@dataclass(frozen=True)
class Snapshot:
    """What a workspace starts from: HEAD, the branch, and a commit of exactly what the work tree holds."""

    repo: Path
    head: str
    branch: str | None
    commit: str
    ref: str
    submodules: tuple[str, ...]


def snapshot_ref(vm_name: str) -> str:
    """Where the base commit of VM `vm_name`'s workspace is kept reachable in the host repo."""
    return f"refs/banger/{vm_name}/base"


def make_snapshot(repo: Path, vm_name: str) -> Snapshot:
    """Commit the work tree (tracked + untracked-not-ignored) on top of HEAD, with a temporary index.

    The user's index, work tree, HEAD and stash are not touched; the commit is kept under refs/banger/NAME/base."""
    head = git(repo, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False).strip()
    if not SHA_RE.fullmatch(head):
        raise InvalidInputError(f"{repo} has no commits yet", hint="commit once, then create the workspace")
    branch = git(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False).strip() or None
    with tempfile.TemporaryDirectory(prefix="banger-index-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        git(repo, "read-tree", "HEAD", env=env)
        git(repo, "add", "-A", "--", ".", env=env, step="snapshot the work tree")
        tree = git(repo, "write-tree", env=env).strip()
        gitlinks = git(repo, "ls-files", "-s", "-z", env=env)
    subs = tuple(entry.split("\t", 1)[1] for entry in gitlinks.split("\0") if entry.startswith("160000 "))
    commit = git(
        repo, "commit-tree", tree, "-p", head, "-m", f"banger workspace snapshot for {vm_name}", env=SNAPSHOT_IDENTITY
    ).strip()
    ref = snapshot_ref(vm_name)
    git(repo, "update-ref", "-m", "banger workspace snapshot", ref, commit)
    return Snapshot(repo, head, branch, commit, ref, subs)


def make_bundle(snap: Snapshot, out: Path) -> int:
    """Write the history up to the snapshot as a bundle at `out`; returns its size."""
    git(snap.repo, "bundle", "create", "-q", str(out), snap.ref, step="bundle the workspace")
    return out.stat().st_size


def drop_ref(repo: Path, ref: str) -> None:
    """Delete a banger ref (never fails loudly: it is a cleanup)."""
    with contextlib.suppress(ToolError):
        git(repo, "update-ref", "-d", ref)


@contextlib.contextmanager
def checked_objects(repo: Path, bundle: Path, fetch_ref: str) -> Iterator[Path]:
    """Unbundle a guest's bundle into a scratch repo and yield it; objects are not yet in `repo`.

    The scratch repository borrows `repo`'s objects (alternates), so the bundle's prerequisites resolve; its
    configuration is banger's, so nothing the guest wrote is ever read as git config or hooks."""
    objects = Path(git(repo, "rev-parse", "--path-format=absolute", "--git-common-dir").strip()) / "objects"
    with tempfile.TemporaryDirectory(prefix="banger-scratch-") as tmp:
        scratch = Path(tmp) / "scratch.git"
        git(Path(tmp), "init", "-q", "--bare", str(scratch))
        (scratch / "objects" / "info" / "alternates").write_text(f"{objects}\n")
        heads = git(scratch, "bundle", "list-heads", str(bundle), step="read the guest's bundle").split("\n")
        if not any(line.endswith(" " + fetch_ref) for line in heads):
            raise InvalidInputError(f"the guest's bundle does not carry {fetch_ref}")
        git(scratch, "bundle", "unbundle", str(bundle), step="unpack the guest's bundle")
        tip = next(line.split(" ", 1)[0] for line in heads if line.endswith(" " + fetch_ref))
        if not SHA_RE.fullmatch(tip):
            raise InvalidInputError("the guest's bundle names a malformed commit")
        git(scratch, "update-ref", fetch_ref, tip)
        yield scratch


def fetch_checked(scratch: Path, into: Path, src_ref: str, dest_ref: str) -> str:
    """Fetch `src_ref` of the scratch repo into `dest_ref` of `into`, every object fsck-checked on the way."""
    git(
        into,
        "-c",
        "transfer.fsckObjects=true",
        "-c",
        "fetch.fsckObjects=true",  # it overrides transfer.fsckObjects: a user's `false` must not switch the check off
        "-c",
        "protocol.file.allow=always",
        "fetch",
        "-q",
        "--no-tags",
        "--no-write-fetch-head",
        "--no-recurse-submodules",
        f"file://{scratch}",
        f"+{src_ref}:{dest_ref}",
        step="fetch the guest's commits (fsck on)",
    )
    return git(into, "rev-parse", "--verify", dest_ref + "^{commit}").strip()


def branch_exists(repo: Path, branch: str) -> bool:
    """Whether refs/heads/BRANCH exists."""
    return bool(git(repo, "rev-parse", "--verify", "-q", f"refs/heads/{branch}", check=False).strip())


def check_branch_name(repo: Path, branch: str) -> None:
    """A clear error for a name git would refuse as a branch."""
    if git(repo, "check-ref-format", "--branch", branch, check=False).strip() != branch:
        raise InvalidInputError(f"{branch!r} is not a valid branch name")


def set_branch(repo: Path, branch: str, commit: str, *, force: bool) -> None:
    """Point refs/heads/BRANCH at `commit`: refused when it exists (unless force) or is checked out."""
    check_branch_name(repo, branch)
    current = git(repo, "symbolic-ref", "-q", "HEAD", check=False).strip()
    if current == f"refs/heads/{branch}":
        raise InvalidInputError(f"branch {branch} is checked out in {repo}; export to another branch")
    if branch_exists(repo, branch) and not force:
        raise AlreadyExistsError(f"branch {branch} already exists in {repo}", hint="pass --force to replace it")
    old: Sequence[str] = () if force else ("",)  # "" as old value: the ref must not exist yet
    git(repo, "update-ref", "-m", "banger workspace export", f"refs/heads/{branch}", commit, *old)


def diffstat(repo: Path, base: str, tip: str) -> str:
    """`git diff --stat` between two commits, rename detection on."""
    return git(repo, "diff", "--no-ext-diff", "--no-textconv", "--stat", "-M", base, tip)


def show_diff(repo: Path, base: str, tip: str, *, stat: bool) -> None:
    """Print `git diff` between two commits to our stdout (colour when it is a terminal)."""
    color = "--color=always" if os.isatty(1) else "--color=never"
    args = ["diff", "--no-ext-diff", "--no-textconv", "-M", color, base, tip]
    if stat:
        args.insert(1, "--stat")
    git(repo, *args, capture=False)


def scratch_clone(repo: Path) -> contextlib.AbstractContextManager[Path]:
    """A throwaway bare repository borrowing `repo`'s objects (for diffs that must not touch `repo`)."""
    return _scratch_clone(repo)


@contextlib.contextmanager
def _scratch_clone(repo: Path) -> Iterator[Path]:
    objects = Path(git(repo, "rev-parse", "--path-format=absolute", "--git-common-dir").strip()) / "objects"
    tmp = Path(tempfile.mkdtemp(prefix="banger-view-"))
    try:
        view = tmp / "view.git"
        git(tmp, "init", "-q", "--bare", str(view))
        (view / "objects" / "info" / "alternates").write_text(f"{objects}\n")
        yield view
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
