"""``rtdetr_lit.weights``: the registry of released files (checked, never downloaded here), the
cache folder, and the ``list``/``path`` commands."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest

from rtdetr_lit.models.zoo import MODEL_NAMES
from rtdetr_lit.weights import KINDS, REGISTRY, cache_dir, cached_path, entry, main


def test_every_entry_is_well_formed_and_names_are_unique() -> None:
    names = [e.name for e in REGISTRY]
    assert len(names) == len(set(names))
    for item in REGISTRY:
        url = urlparse(item.url)
        assert url.scheme == "https" and url.netloc in {"github.com", "huggingface.co"}, item
        assert Path(url.path).suffix in {".pth", ".safetensors"}, item
        assert item.models and set(item.models) <= set(MODEL_NAMES), item
        assert item.kind in KINDS and item.layout in {"reference", "hf"}, item
        assert (item.ap is None) == (item.kind == "imagenet" or item.name.endswith("_v0.1")), item
    # the sizes the paper reports AP for, each with a COCO detector
    assert {m for e in REGISTRY if e.kind == "coco" for m in e.models} == set(MODEL_NAMES)
    # every size has its ImageNet backbone
    assert {m for e in REGISTRY if e.kind == "imagenet" for m in e.models} == set(MODEL_NAMES)
    assert entry("rtdetrv2_r34_coco_discrete").url.endswith("/rrtdetrv2_r34vd_dsp_1x_coco.pth")


def test_the_cache_folder_and_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RTDETR_LIT_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "rtdetr_lit"
    monkeypatch.setenv("RTDETR_LIT_HOME", str(tmp_path / "home"))
    assert cached_path("rtdetrv2_r50_coco") == tmp_path / "home" / "rtdetrv2_r50_coco.pth"
    assert cached_path("rtdetrv2_r50_coco_hf").name == "rtdetrv2_r50_coco_hf.safetensors"
    with pytest.raises(ValueError, match=r"did you mean rtdetrv2_r50_coco"):
        entry("rtdetrv2_r50_cocoo")


def test_list_and_path_commands(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RTDETR_LIT_HOME", str(tmp_path))
    (tmp_path / "rtdetrv2_r18_coco.pth").write_bytes(b"x")
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "models", "kind", "AP", "cached"]
    rows = {line.split()[0]: line.split() for line in lines[1 : len(REGISTRY) + 1]}
    assert set(rows) == {e.name for e in REGISTRY}
    assert rows["rtdetrv2_r18_coco"][-2:] == ["48.1", "yes"]
    assert rows["rtdetrv2_r50_coco"][-1] == "no"
    assert lines[-1] == f"cache: {tmp_path}"
    assert main(["path", "resnet50vd_imagenet"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'resnet50vd_imagenet.pth'}\n"
    with pytest.raises(SystemExit) as stop:
        main(["path", "nothing"])
    assert stop.value.code == 2
