"""Image build cost: a cold build (mmdebstrap against the real archive), a warm rebuild from the bootstrap cache,
and an import of the same rootfs tarball; with per-step times and the resulting image and cache sizes.

Needs root (mmdebstrap in root mode, device nodes) and Debian's archive.
Run: .venv/bin/python bench/bench_image_build.py [--suite bookworm] [--packages git,curl] [--keep DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from banger.fsutil import human_size
from banger.images.build import build_image, cache_key, cached_rootfs, plan_for
from banger.images.importer import import_rootfs
from banger.images.spec import ImageInfo, ImageSpec
from banger.progress import ProgressEvent


class StepTimer:
    """A Progress sink that attributes wall time to the step last announced."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.current: str | None = None
        self.since = self.t0
        self.steps: dict[str, float] = {}

    def __call__(self, event: ProgressEvent) -> None:
        step = str(event.step)
        if step != self.current:
            self._close()
            self.current, self.since = step, time.perf_counter()

    def _close(self) -> None:
        if self.current is not None:
            now = time.perf_counter()
            self.steps[self.current] = self.steps.get(self.current, 0.0) + now - self.since

    def finish(self) -> float:
        self._close()
        self.current = None
        return time.perf_counter() - self.t0


def timed(label: str, fn: Callable[..., ImageInfo], out: Path) -> tuple[str, float, ImageInfo, StepTimer, Path]:
    timer = StepTimer()
    info = fn(progress=timer)
    return label, timer.finish(), info, timer, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="bookworm")
    ap.add_argument("--packages", default="", help="extra packages, comma separated")
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temp dir)")
    args = ap.parse_args()
    packages = tuple(p for p in args.packages.split(",") if p)
    spec = ImageSpec(name="bench", suite=args.suite, packages=packages)
    with tempfile.TemporaryDirectory(prefix="banger-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cache = work / "cache"
        tar = cached_rootfs(cache, cache_key(plan_for(spec)))
        tar.unlink(missing_ok=True)
        runs = []
        for label in ("cold build", "warm build"):
            out = work / f"{label.replace(' ', '-')}.ext4"
            out.unlink(missing_ok=True)
            runs.append(timed(label, partial(build_image, spec, out, cache_dir=cache), out))
        out = work / "import.ext4"
        out.unlink(missing_ok=True)
        runs.append(timed("import tar", partial(import_rootfs, tar, out), out))

        print(f"{'run':<12} {'total s':>8}  {'image':>9} {'on disk':>9}  steps (s)")
        for label, total, info, timer, path in runs:
            st = path.stat()
            steps = ", ".join(f"{k} {v:.1f}" for k, v in timer.steps.items())
            print(
                f"{label:<12} {total:>8.1f}  {human_size(info.size_bytes):>9} "
                f"{human_size(st.st_blocks * 512):>9}  {steps}"
            )
        print(f"cached rootfs tarball: {human_size(tar.stat().st_size)} ({tar})")
        print(f"packages: {', '.join(runs[0][2].packages)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
