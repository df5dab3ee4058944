"""Released weights by name (``rtdetr_lit.weights``): download with progress into the cache, a
cache hit without the network, the checks a file passes before it enters the cache (web page,
truncated, another model size, checksum), the offline message, ``import``, two processes fetching
one name, and names where paths are accepted (init_from, backbone_weights, ckpt_path, load).

Generated checkpoints in the reference and Hugging Face layouts are served by a throwaway HTTP
server on 127.0.0.1 (and as ``file://`` URLs); nothing here reaches the internet.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import save_file

import rtdetr_lit
from rtdetr_lit import weights
from rtdetr_lit.checkpoints import EVAL_SIZE_BUFFERS
from rtdetr_lit.cli import _user_error, error_message
from rtdetr_lit.config import ConfigError, compose_config
from rtdetr_lit.convert import to_hf_state_dict
from rtdetr_lit.inference import read_checkpoint
from rtdetr_lit.models import create_model
from rtdetr_lit.weights import WeightsError, cached_path, entry, fetch, import_file, read_weights

NAME = "rtdetrv2_r18_coco"
BACKBONE = "resnet18vd_imagenet"


def _state_dict(seed: int) -> dict[str, torch.Tensor]:
    """An r18 detector whose float tensors are all random (a fresh model has constant ones that
    could hide a key mix-up); batch-norm variances stay positive."""
    g = torch.Generator().manual_seed(seed)
    sd = create_model("r18", channels_last=False).state_dict()
    for key, value in sd.items():
        if key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=g) + 0.5)
        elif value.is_floating_point() and key not in EVAL_SIZE_BUFFERS:
            value.copy_(torch.randn(value.shape, generator=g) * 0.02)
    return sd


def _pth(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The files of the release: the r18 detector as the reference ships it, the same detector
    in HF's layout (safetensors), and the r18 ImageNet backbone."""
    folder = tmp_path_factory.mktemp("release")
    sd = _state_dict(seed=0)
    hf = folder / "model.safetensors"
    save_file({k: v.clone() for k, v in to_hf_state_dict(sd).items()}, str(hf))
    backbone = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return {
        "state_dict": sd,
        "reference": _pth({"ema": {"module": sd, "updates": 1000}}),
        "hf": hf.read_bytes(),
        "backbone": _pth(backbone),
    }


class _Server:
    """Files by URL path. ``mode[path]``: ``"truncated"`` (half the body, the full length
    announced) or ``"page"`` (an HTML page with status 200). ``hold`` keeps every response
    waiting until it is set; ``gets`` lists the paths asked for."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.mode: dict[str, str] = {}
        self.gets: list[str] = []
        self.asked = threading.Event()
        self.hold = threading.Event()
        self.hold.set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.gets.append(self.path)
                server.asked.set()
                server.hold.wait(60)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                mode = server.mode.get(self.path)
                if mode == "page":
                    body = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if mode == "truncated" else body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve(self, name: str, body: bytes, mode: str | None = None) -> None:
        path = "/" + _relative_url(name)
        self.files[path] = body
        if mode:
            self.mode[path] = mode


def _relative_url(name: str) -> str:
    """The entry's URL below its origin (the part a mirror keeps)."""
    url = entry(name).url
    for origin in (
        "https://github.com/lyuwenyu/storage/releases/download/",
        "https://huggingface.co/",
    ):
        if url.startswith(origin):
            return url[len(origin) :]
    raise AssertionError(url)


@pytest.fixture
def server() -> Iterator[_Server]:
    served = _Server()
    yield served
    served.hold.set()
    served.httpd.shutdown()


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("RTDETR_LIT_HOME", str(folder))
    monkeypatch.delenv("RTDETR_LIT_MIRROR", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return folder


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _kept(folder: Path) -> list[str]:
    """What the cache holds besides lock files."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_download_with_progress_then_the_cache_without_network(
    cache: Path,
    server: _Server,
    release: dict[str, object],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    server.serve(NAME, release["reference"])
    monkeypatch.setenv("RTDETR_LIT_MIRROR", server.url)
    path = fetch(NAME)
    assert path == cache / "rtdetrv2_r18_coco.pth" == cached_path(NAME)
    assert path.read_bytes() == release["reference"]
    progress = capfd.readouterr().err
    assert "100%" in progress and "77.4M" in progress  # torch.hub's bar on stderr
    digest = hashlib.sha256(release["reference"]).hexdigest()
    assert (cache / "rtdetrv2_r18_coco.pth.sha256").read_text() == digest + "\n"
    assert _kept(cache) == ["rtdetrv2_r18_coco.pth", "rtdetrv2_r18_coco.pth.sha256"]
    # Later uses never ask the network: the mirror now points at nothing.
    monkeypatch.setenv("RTDETR_LIT_MIRROR", _closed_port())
    assert fetch(NAME) == path
    contents, source = read_weights(NAME, model="r18")
    assert source == NAME and torch.equal(
        contents["ema"]["module"]["decoder.enc_score_head.weight"],
        release["state_dict"]["decoder.enc_score_head.weight"],
    )
    assert server.gets == ["/v0.2/rtdetrv2_r18vd_120e_coco_rerun_48.1.pth"]
    assert weights.main(["list"]) == 0
    row = next(line for line in capfd.readouterr().out.splitlines() if line.startswith(NAME + " "))
    assert row.split()[-1] == "yes"


def test_hub_files_come_in_hf_layout_and_load_in_ours(
    cache: Path, server: _Server, release: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    server.serve("rtdetrv2_r18_coco_hf", release["hf"])
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # Hugging Face's own mirror setting
    assert fetch("rtdetrv2_r18_coco_hf", progress=False).name == "rtdetrv2_r18_coco_hf.safetensors"
    assert server.gets == ["/PekingU/rtdetr_v2_r18vd/resolve/main/model.safetensors"]
    ours, _ = read_weights("rtdetrv2_r18_coco_hf")
    expected = release["state_dict"]
    assert set(ours) == set(expected)
    for key in set(expected) - EVAL_SIZE_BUFFERS:
        assert torch.equal(ours[key], expected[key]), key


def test_file_urls(
    cache: Path, release: dict[str, object], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mirror = tmp_path / "mirror"
    target = mirror / _relative_url(BACKBONE)
    target.parent.mkdir(parents=True)
    target.write_bytes(release["backbone"])
    monkeypatch.setenv("RTDETR_LIT_MIRROR", mirror.as_uri())
    assert fetch(BACKBONE, progress=False).read_bytes() == release["backbone"]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("truncated", "is not rtdetrv2_r18_coco's weights for model r18: could not read"),
        ("page", "the server sent a web page, not weights"),
        (
            "other size",
            "is not rtdetrv2_r34_coco's weights for model r34: "
            "the file does not fit the model: missing keys",
        ),
        ("checksum", "differs from the released file's"),
    ],
)
def test_a_bad_download_names_the_file_and_leaves_nothing(
    case: str,
    expected: str,
    cache: Path,
    server: _Server,
    release: dict[str, object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = "rtdetrv2_r34_coco" if case == "other size" else NAME
    server.serve(name, release["reference"], mode=case if case in ("truncated", "page") else None)
    if case == "checksum":
        import dataclasses

        known = dataclasses.replace(entry(NAME), sha256="0" * 64)
        registry = tuple(known if e.name == NAME else e for e in weights.REGISTRY)
        monkeypatch.setattr(weights, "REGISTRY", registry)
    monkeypatch.setenv("RTDETR_LIT_MIRROR", server.url)
    with pytest.raises(WeightsError) as failure:
        fetch(name, progress=False)
    message = str(failure.value)
    assert expected in message
    assert message.startswith(f"{name} from {server.url}/v0.")
    assert message.endswith("Nothing was kept in the cache") or "nothing was kept" in message
    assert _kept(cache) == []


def test_the_cache_checks_files_placed_by_hand_and_every_later_use(
    cache: Path, release: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RTDETR_LIT_MIRROR", _closed_port())
    cache.mkdir()
    placed = cache / "rtdetrv2_r18_coco.pth"
    placed.write_bytes(release["reference"])
    assert fetch(NAME) == placed  # checked like a download, its checksum recorded
    digest = hashlib.sha256(release["reference"]).hexdigest()
    assert (cache / "rtdetrv2_r18_coco.pth.sha256").read_text().strip() == digest
    damaged = bytearray(release["reference"])
    damaged[len(damaged) // 2] ^= 0xFF
    placed.write_bytes(bytes(damaged))
    with pytest.raises(WeightsError, match="the file changed since it entered the cache"):
        fetch(NAME)
    # a file placed by hand that is not the weights is refused, with the file named
    (cache / "rtdetrv2_r18_coco.pth.sha256").unlink()
    placed.write_bytes(b"<html>404</html>")
    with pytest.raises(WeightsError, match=r"rtdetrv2_r18_coco \(.*placed by hand\): the server"):
        fetch(NAME)


def test_offline_a_missing_name_fails_at_once_saying_what_to_do(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RTDETR_LIT_MIRROR", _closed_port())
    start = time.perf_counter()
    with pytest.raises(WeightsError) as failure:
        fetch(NAME)
    assert time.perf_counter() - start < 10
    message = str(failure.value)
    url = os.environ["RTDETR_LIT_MIRROR"] + "/v0.2/rtdetrv2_r18vd_120e_coco_rerun_48.1.pth"
    assert message.startswith("rtdetrv2_r18_coco is not in the cache and could not be downloaded")
    assert f"download {url} and either save it as rtdetrv2_r18_coco.pth in {cache} or run: " \
        "python -m rtdetr_lit.weights import rtdetrv2_r18_coco FILE" in message  # fmt: skip
    assert _kept(cache) == []


def test_the_import_command(
    cache: Path,
    release: dict[str, object],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    by_hand = tmp_path / "ResNet18_vd_pretrained_from_paddle.pth"
    by_hand.write_bytes(release["backbone"])
    assert weights.main(["import", BACKBONE, str(by_hand)]) == 0
    assert capsys.readouterr().out == f"{cache / 'resnet18vd_imagenet.pth'}\n"
    assert (cache / "resnet18vd_imagenet.pth").read_bytes() == release["backbone"]
    # the r18 backbone is not the r34 one: refused, nothing kept
    with pytest.raises(SystemExit) as stop:
        weights.main(["import", "resnet34vd_imagenet", str(by_hand)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"resnet34vd_imagenet from {by_hand} is not resnet34vd_imagenet's weights" in err
    assert "do not fit PResNet" in err
    assert _kept(cache) == ["resnet18vd_imagenet.pth", "resnet18vd_imagenet.pth.sha256"]
    with pytest.raises(SystemExit):
        weights.main(["import", BACKBONE, str(tmp_path / "missing.pth")])
    assert "no such file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cached_release(
    release: dict[str, object], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A cache holding the r18 detector and its ImageNet backbone (imported: no server), for the
    tests that only read it."""
    folder = tmp_path_factory.mktemp("cached")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RTDETR_LIT_HOME", str(folder / "cache"))
        patch.setenv("RTDETR_LIT_MIRROR", _closed_port())
        for name, key in ((NAME, "reference"), (BACKBONE, "backbone")):
            file = folder / f"{name}.pth"
            file.write_bytes(release[key])
            import_file(name, file)
        yield folder / "cache"


def test_backbone_weights_by_name(cached_release: Path, release: dict[str, object]) -> None:
    expected = release["state_dict"]["backbone.res_layers.3.blocks.1.branch2b.conv.weight"]
    for value in ("imagenet", BACKBONE, NAME):  # a reference detector gives its backbone too
        net = create_model("r18", backbone_weights=value)
        assert torch.equal(net.backbone.res_layers[3].blocks[1].branch2b.conv.weight, expected)
    with pytest.raises(WeightsError, match="resnet50vd_imagenet holds weights for model=r50m/r50"):
        create_model("r18", backbone_weights="resnet50vd_imagenet")
    # the recipes start from ImageNet, as the paper does; null turns it off
    cfg = compose_config("train", ["experiment=rtdetrv2_r18_coco"])
    assert cfg.model.net.backbone_weights == "imagenet"
    off = compose_config(
        "train", ["experiment=rtdetrv2_r18_coco", "model.net.backbone_weights=null"]
    )
    assert off.model.net.backbone_weights is None


def test_init_from_a_name_into_another_class_count(
    cached_release: Path, release: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = compose_config("train", ["model=r18", "data.num_classes=3", f"model.init_from={NAME}"])
    with caplog.at_level("WARNING"):
        module = instantiate(cfg.model)
    sd, expected = module.net.state_dict(), release["state_dict"]
    assert sd["decoder.enc_score_head.weight"].shape == (3, 256)
    assert torch.equal(
        sd["decoder.dec_bbox_head.2.layers.2.weight"],
        expected["decoder.dec_bbox_head.2.layers.2.weight"],
    )
    assert (
        "decoder.enc_score_head.weight" in caplog.text
        and "another number of classes" in caplog.text
    )
    # weights of another size are refused before anything is read, naming the right ones
    wrong = compose_config("train", ["model=r50", f"model.init_from={NAME}"])
    with pytest.raises(InstantiationException) as failure:
        instantiate(wrong.model)
    line = error_message(_user_error(failure.value))
    assert line == (
        "rtdetrv2_r18_coco holds weights for model=r18, not model=r50; for r50: "
        "rtdetrv2_r50_coco, rtdetrv2_r50_coco_hf"
    )


def test_ckpt_path_and_load_take_a_name(cached_release: Path, release: dict[str, object]) -> None:
    checkpoint = read_checkpoint(NAME)
    assert checkpoint.record.model == "r18" and checkpoint.record.num_classes == 80
    detector = rtdetr_lit.load(NAME, device="cpu")
    assert detector.classes.names[:3] == ("person", "bicycle", "car")
    assert detector.classes.category_ids[-3:] == (88, 89, 90)
    expected = release["state_dict"]["decoder.dec_score_head.2.weight"]
    assert torch.equal(detector.model.net.decoder.dec_score_head[2].weight, expected)
    with pytest.raises(WeightsError, match="resnet18vd_imagenet is an ImageNet backbone, not a"):
        read_checkpoint(BACKBONE)
    with pytest.raises(ConfigError, match=r"did you mean rtdetrv2_r50_coco, rtdetrv2_r50m_coco"):
        read_checkpoint("rtdetrv2_r50_cocoo")


def test_predict_command_with_a_name(cached_release: Path, tmp_path: Path) -> None:
    from rtdetr_lit.predict import predict

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(pictures / "000000000001.png")
    overrides = [f"ckpt_path={NAME}", f"source={pictures}", f"paths.output_dir={tmp_path / 'out'}"]
    cfg = compose_config("predict", [*overrides, "extras.print_config=false"])
    out = predict(cfg)
    assert out["pictures"] == 1 and cfg.model.net.name == "r18"
    assert list(cfg.image_size) == [640, 640]


def test_two_processes_fetching_one_name_download_it_once(
    cache: Path, server: _Server, release: dict[str, object], tmp_path: Path
) -> None:
    server.serve(NAME, release["reference"])
    server.hold.clear()  # the first download waits until the second process is waiting too
    env = {**os.environ, "RTDETR_LIT_HOME": str(cache), "RTDETR_LIT_MIRROR": server.url}
    command = [sys.executable, "-m", "rtdetr_lit.weights", "download", NAME]
    logs = [tmp_path / f"rank{i}.txt" for i in range(2)]
    first = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=logs[0].open("w"), text=True
    )
    assert server.asked.wait(120), "the first process never asked the server"
    second = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=logs[1].open("w"), text=True
    )
    deadline = time.monotonic() + 120
    while "waiting for it" not in logs[1].read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    server.hold.set()
    outputs = [first.communicate(timeout=120)[0], second.communicate(timeout=120)[0]]
    assert first.returncode == second.returncode == 0, [p.read_text() for p in logs]
    assert outputs == [f"{cache / 'rtdetrv2_r18_coco.pth'}\n"] * 2
    assert "another process is downloading rtdetrv2_r18_coco" in logs[1].read_text()
    assert len(server.gets) == 1
    assert (cache / "rtdetrv2_r18_coco.pth").read_bytes() == release["reference"]
