"""The shell scripts the daemon runs in a guest (through the agent's exec) to place and read a workspace.

They run the guest's own git on the guest's own repository: whatever that repository's config says runs in the
guest, which is the guest's business. The host only ever sees bytes from them: a bundle, or a few bounded lines.
Each script is `sh -c SCRIPT banger ARGS...`, so arguments never pass through a shell parser.
"""

from __future__ import annotations

WORKSPACE_ROOT = "/workspace"
# Where a bundle waits between the upload and the clone (root-owned, removed afterwards).
INBOX = "/workspace/.banger-inbox"

# As root: make the landing directory for USER, then store stdin (the bundle) in a private file; print its path.
RECEIVE = r"""
set -eu
user=$1 dest=$2
command -v git >/dev/null 2>&1 || { echo "git is not installed in the guest" >&2; exit 20; }
if [ -e "$dest" ]; then echo "$dest already exists in the guest" >&2; exit 21; fi
mkdir -p /workspace
chmod 755 /workspace
mkdir -p /workspace/.banger-inbox
chmod 711 /workspace/.banger-inbox
mkdir "$dest"
chown "$user:" "$dest"
f=$(mktemp /workspace/.banger-inbox/in.XXXXXX)
cat > "$f"
chown "$user:" "$f"
chmod 600 "$f"
printf '%s\n' "$f"
"""

# As root: remove what a failed import left behind (the half-made workspace and any stored bundle of it).
CLEANUP = r"""
rm -rf -- "$1"
[ -n "$2" ] && rm -f -- "$2"
exit 0
"""

# As the workspace user: clone the bundle into DEST, HEAD as on the host, the work tree as the snapshot.
CLONE = r"""
set -eu
dest=$1 bundle=$2 ref=$3 head=$4 branch=$5 name=$6 email=$7
cd "$dest"
git init -q .
git fetch -q --no-tags "$bundle" "+$ref:refs/banger/base"
rm -f "$bundle"
if [ -n "$branch" ]; then git checkout -q -B "$branch" "$head"; else git checkout -q --detach "$head"; fi
# The work tree becomes the snapshot; the index stays at HEAD, so the host's uncommitted and untracked files show
# up as uncommitted changes here too. Only the paths that differ are restored (a big checkout is written once).
git diff --no-renames --name-only -z "$head" refs/banger/base > .git/banger-restore
if [ -s .git/banger-restore ]; then
    git --literal-pathspecs restore --source=refs/banger/base --worktree \
        --pathspec-from-file=.git/banger-restore --pathspec-file-nul
fi
rm -f .git/banger-restore
[ -n "$name" ] && git config user.name "$name"
[ -n "$email" ] && git config user.email "$email"
git config banger.base "$(git rev-parse refs/banger/base)"
git config banger.head "$head"
"""

# As the workspace user: commit the work tree (temporary index) on top of HEAD, point refs/banger/export at it and
# print a summary: "tip SHA", "ahead N", then "change STATUS\tPATH..." lines against the base.
PREPARE = r"""
set -eu
cd "$1"
base=$2 head=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git config user.name >/dev/null 2>&1 || export GIT_AUTHOR_NAME=banger GIT_COMMITTER_NAME=banger
git config user.email >/dev/null 2>&1 || export GIT_AUTHOR_EMAIL=banger@localhost GIT_COMMITTER_EMAIL=banger@localhost
tip=$(git rev-parse --verify HEAD^{commit})
GIT_INDEX_FILE="$tmp/index" git read-tree HEAD
GIT_INDEX_FILE="$tmp/index" git add -A -- :/
tree=$(GIT_INDEX_FILE="$tmp/index" git write-tree)
if [ "$tree" != "$(git rev-parse "$tip^{tree}")" ]; then
    tip=$(git commit-tree "$tree" -p "$tip" -m "banger: uncommitted changes in the workspace")
fi
git update-ref refs/banger/export "$tip"
echo "tip $tip"
echo "ahead $(git rev-list --count "$head..HEAD")"
git diff --no-ext-diff --no-textconv --name-status -M "$base" "$tip" | sed 's/^/change /'
"""

# As the workspace user: the bundle of refs/banger/export on stdout, without what the host already has.
BUNDLE = r"""
set -eu
cd "$1"
git bundle create -q - refs/banger/export "^$2" "^$3"
"""


def argv(script: str, *args: str) -> list[str]:
    """The exec argv running `script` with positional arguments."""
    return ["/bin/sh", "-c", script, "banger", *args]
