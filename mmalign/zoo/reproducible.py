"""Bit-identical world builds, whatever the caller's thread count or process, and as far as it can be held, CPU.

Two things change the bits of a trained world besides its code and seeds:

- the thread count: float sums split across threads round differently (built with OMP_NUM_THREADS=2, every
  trained weight of image-tiny differed from a one-thread build). Builders run under `build_threads()`, which pins
  torch (and through it MKL and OpenMP) to `BUILD_THREADS` and restores the caller's count afterwards;
- the CPU's instruction set: ATen's vectorised kernels, MKL and oneDNN pick code paths by what the CPU offers, and
  each path rounds differently (here, holding ATen to its scalar kernels, MKL to its COMPATIBLE path, or oneDNN
  to SSE4.1 each changed image-tiny's weights; on an AMD CPU MKL's default path differs from its AVX2 one, which
  changed speech-tiny's weights). `registry.build` therefore runs every builder in a fresh process
  started with `BUILD_ENV`, which holds all three to their AVX2 paths, which an AVX-512 machine can
  be held to too. MKL documents this as conditional
  numerical reproducibility; CPUs without AVX2 (and non-x86 CPUs) still build other bits. Across CPU vendors it is
  not enough everywhere: on an Intel Xeon (AVX-512, held to AVX2) the vlm world's base, at the fingerprint its
  README tables were measured at on an AMD CPU, answered POPE 0.943 instead of 0.953 (vision/VLM.md), while the
  flow world's base judge agreement matched (44.2%). Compare worlds by the numbers of the machine they run on.

Every random draw comes from a seeded generator or torch's seeded global generator. `python -m
mmalign.zoo.reproducible WORLD...` checks it: each world built twice in fresh processes at different
OMP_NUM_THREADS, every file compared by sha256 (world.json without its wall times).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BUILD_THREADS = 1  # the count the worlds in README tables were built with
# The environment a build process starts with (read by the math libraries when they load, so never set later).
BUILD_ENV = {
    "OMP_NUM_THREADS": str(BUILD_THREADS),
    "MKL_NUM_THREADS": str(BUILD_THREADS),
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
IN_PROCESS = (
    "MMALIGN_ZOO_IN_PROCESS"  # "1": build in the calling process (set inside the build process itself)
)


@contextmanager
def build_threads(threads: int = BUILD_THREADS) -> Iterator[None]:
    """Run the enclosed build on `threads` torch threads, then restore the caller's thread count."""
    import torch

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_build_process(name: str, out: Path, log: Callable[[str], object]) -> None:
    """Run world `name`'s builder into `out` in a fresh Python process started with `BUILD_ENV`, passing its log
    lines to `log`; a failed build is a RuntimeError carrying the end of the process's error output."""
    env = {**os.environ, **BUILD_ENV, IN_PROCESS: "1", "PYTHONUNBUFFERED": "1"}
    code = f"from mmalign.zoo.registry import build_here; build_here({name!r}, {str(out)!r})"
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=errors, text=True
        )
        try:
            for line in process.stdout:
                log(line.rstrip("\n"))
            returncode = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if returncode != 0:
            errors.seek(0)
            tail = "\n".join(errors.read().splitlines()[-30:])
            raise RuntimeError(f"building world {name!r} failed (exit {returncode}):\n{tail}")


# ---------------------------------------------------------------------------------- checking a build


VOLATILE_KEYS = {"world.json": ("timings",)}  # what measures the build (wall times), not the world


def world_digests(root: str | Path) -> dict[str, str]:
    """sha256 of every file of a built world, by path relative to `root` (world.json without its wall times)."""
    root = Path(root)
    digests = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        data = path.read_bytes()
        if name in VOLATILE_KEYS:
            record = json.loads(data)
            for key in VOLATILE_KEYS[name]:
                record.pop(key, None)
            data = json.dumps(record, sort_keys=True).encode()
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


@dataclass
class Comparison:
    """Files of two builds of a world: identical, different, or present in only one of them."""

    same: list[str]
    different: list[str]
    only_first: list[str]
    only_second: list[str]

    @property
    def identical(self) -> bool:
        return not (self.different or self.only_first or self.only_second)


def compare(first: str | Path, second: str | Path) -> Comparison:
    """Compare two built copies of a world file by file (see `world_digests`)."""
    a, b = world_digests(first), world_digests(second)
    return Comparison(
        same=sorted(k for k in a.keys() & b.keys() if a[k] == b[k]),
        different=sorted(k for k in a.keys() & b.keys() if a[k] != b[k]),
        only_first=sorted(a.keys() - b.keys()),
        only_second=sorted(b.keys() - a.keys()),
    )


def build_in_fresh_process(world: str, home: str | Path, threads: int) -> Path:
    """Build `world` into `home` in a new Python process started with OMP_NUM_THREADS=`threads` and the builder
    running in that process (not in a `BUILD_ENV` build process), so the builder's own thread pinning is tested;
    the math libraries' code paths are `BUILD_ENV`'s (MKL's default path on an AMD CPU is not its AVX2 one)."""
    env = {
        **os.environ,
        **{k: v for k, v in BUILD_ENV.items() if not k.endswith("_NUM_THREADS")},
        "MMALIGN_HOME": str(home),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        IN_PROCESS: "1",
    }
    code = f"from mmalign.zoo import registry; registry.build({world!r}, log=lambda *_: None)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building {world} with {threads} thread(s) failed:\n{done.stderr[-4000:]}")
    return Path(home) / "zoo" / world


def main(argv: list[str] | None = None) -> int:
    """Build worlds twice in fresh processes at different OMP_NUM_THREADS and compare every file (exit 1 if any
    differs); with `--against DIR`, also compare each build with DIR/<world> (files present in both)."""
    parser = argparse.ArgumentParser(prog="python -m mmalign.zoo.reproducible", description=main.__doc__)
    parser.add_argument("worlds", nargs="+")
    parser.add_argument("--threads", type=int, nargs=2, default=(1, 2))
    parser.add_argument("--work", default=None, help="directory for the two homes (default: a temporary one)")
    parser.add_argument("--against", default=None, help="a zoo directory holding reference builds")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="mmalign-repro-"))
    ok = True
    for world in args.worlds:
        builds = [build_in_fresh_process(world, work / f"threads{t}", t) for t in args.threads]
        result = compare(*builds)
        ok &= result.identical
        print(
            f"{world}: {len(result.same)} files identical at {args.threads[0]} and {args.threads[1]} threads; "
            f"different: {result.different or 'none'}; only in one: {result.only_first + result.only_second or 'none'}"
        )
        if args.against:
            reference = compare(Path(args.against) / world, builds[0])
            ok &= not reference.different
            print(
                f"  vs {args.against}/{world}: {len(reference.same)} identical, different: "
                f"{reference.different or 'none'}, new files: {len(reference.only_second)}, "
                f"missing: {reference.only_first or 'none'}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
