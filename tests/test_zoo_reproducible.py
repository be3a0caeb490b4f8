"""World builds are bit-identical whatever the caller's thread count: a fresh-process build at 2 threads against the
registry's 1-thread build, every file compared."""

from __future__ import annotations

import json

import pytest
import torch
from filelock import FileLock

from mmalign.zoo import registry
from mmalign.zoo.reproducible import (
    BUILD_ENV,
    build_in_fresh_process,
    build_threads,
    compare,
    run_build_process,
    world_digests,
)


def test_build_threads_pins_and_restores_the_callers_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with build_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), build_threads(1):
            raise RuntimeError("a failed build still restores the count")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_digests_ignore_only_the_wall_times_of_world_json(tmp_path):
    for name, seconds in (("a", 1.0), ("b", 9.0)):
        (tmp_path / name / "base").mkdir(parents=True)
        (tmp_path / name / "base" / "weights.bin").write_bytes(b"\x00\x01")
        (tmp_path / name / "world.json").write_text(
            json.dumps({"accuracy": 0.5, "timings": {"total_s": seconds}})
        )
    same = compare(tmp_path / "a", tmp_path / "b")
    assert same.identical and same.same == ["base/weights.bin", "world.json"]
    (tmp_path / "b" / "world.json").write_text(json.dumps({"accuracy": 0.6, "timings": {}}))
    (tmp_path / "b" / "extra.txt").write_text("x")
    differ = compare(tmp_path / "a", tmp_path / "b")
    assert differ.different == ["world.json"] and differ.only_second == ["extra.txt"] and not differ.identical
    assert world_digests(tmp_path / "a").keys() == {"base/weights.bin", "world.json"}


@pytest.mark.parametrize(
    "world",
    [
        "image-tiny",  # without pinned threads every weight of this world differed between 1 and 2 threads
        pytest.param("text-tiny", marks=pytest.mark.slow),
        pytest.param("speech-tiny", marks=pytest.mark.slow),
        pytest.param("vlm-tiny", marks=pytest.mark.slow),
        pytest.param("image-flow-tiny", marks=pytest.mark.slow),
    ],
)
def test_tiny_world_is_bit_identical_across_thread_counts_and_processes(world, tmp_path, mmalign_home):
    # a fresh process at 2 OpenMP threads against the registry's build process at BUILD_THREADS (1)
    two_threads = build_in_fresh_process(world, tmp_path, 2)
    with FileLock(str(mmalign_home) + ".lock"):
        cached = registry.build(world, log=lambda *_: None)
    assert BUILD_ENV["OMP_NUM_THREADS"] == "1"
    result = compare(two_threads, cached)
    assert result.identical, (result.different, result.only_first, result.only_second)
    assert any(name.endswith(".safetensors") for name in result.same)


def test_a_failing_build_process_reports_its_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)building world 'no-such-world' failed.*KeyError"):
        run_build_process("no-such-world", tmp_path / "out", lambda *_: None)
    assert BUILD_ENV["OMP_NUM_THREADS"] == "1" and BUILD_ENV["MKL_CBWR"] == "AVX2"
