"""The world cache: built once, reused while the builder is unchanged, rebuilt when it is not."""

from __future__ import annotations

from mmalign.zoo import registry


def test_cached_world_is_reused_and_rebuilt_when_built_by_other_code(tmp_path, monkeypatch):
    monkeypatch.setenv("MMALIGN_HOME", str(tmp_path))
    logs: list[str] = []
    out = registry.build("text-tiny", log=logs.append)
    stamp = out / "fingerprint.txt"
    assert stamp.read_text().strip() == registry.fingerprint("text-tiny")
    built_at = (out / "world.json").stat().st_mtime_ns

    assert registry.build("text-tiny", log=logs.append) == out
    assert (out / "world.json").stat().st_mtime_ns == built_at  # reused, not rebuilt

    stamp.write_text("built-by-an-older-mmalign\n")
    logs.clear()
    registry.build("text-tiny", log=logs.append)
    assert any("rebuilding" in line for line in logs)
    assert stamp.read_text().strip() == registry.fingerprint("text-tiny")


def test_a_world_built_on_another_is_rebuilt_when_its_base_changes(monkeypatch):
    """image-flow-tiny trains on image-tiny's VAE and digits: its fingerprint carries image-tiny's."""
    original = registry.fingerprint
    before = original("image-flow-tiny")
    assert original("image-pairs") != original("image-flow-tiny")
    monkeypatch.setattr(
        registry, "fingerprint", lambda name: "other" if name == "image-tiny" else original(name)
    )
    assert registry.fingerprint("image-flow-tiny") != before
    assert registry.fingerprint("text-tiny") == original("text-tiny")  # a world on no base is unaffected
