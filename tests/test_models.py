"""Tests for the models package (offline: seeded random weights, no downloads)."""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import models
from models import registry

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Fast to build; its seeded classifier head is near zero, so compare logits, not rounded probabilities.
SMALL = "mobilenet_v3_small"
# Default PyTorch init gives AlexNet distinct random probabilities, so ranking checks mean something.
RANKED = "alexnet"


@pytest.fixture(autouse=True)
def _isolated_torch(tmp_path_factory: pytest.TempPathFactory):
    """One thread (stable timing on 2 cores) and an empty hub dir, so real cached weights never leak in."""
    old_threads = torch.get_num_threads()
    old_hub = torch.hub.get_dir()
    torch.set_num_threads(1)
    torch.hub.set_dir(str(tmp_path_factory.mktemp("hub")))
    models.clear_cache()
    yield
    models.clear_cache()
    torch.hub.set_dir(old_hub)
    torch.set_num_threads(old_threads)


def _image(seed: int = 0, size: tuple[int, int] = (160, 120)) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def _logits(clf: models.Classifier, imgs: list[Image.Image]) -> torch.Tensor:
    with torch.inference_mode():
        return clf.model(torch.stack([clf.transform(img) for img in imgs]))


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def test_list_models_and_aliases() -> None:
    names = models.list_models()
    assert {"alexnet", "resnet50", SMALL} <= set(names)
    assert names == sorted(names)
    assert models.resolve_name("resnet") == "resnet50"
    assert models.resolve_name(" AlexNet ") == "alexnet"


def test_unknown_model_suggests_close_match() -> None:
    with pytest.raises(ValueError, match="resnet50"):
        models.Classifier("resnet05")
    with pytest.raises(ValueError, match="unknown model"):
        models.Classifier("definitely-not-a-model")


def test_seeded_weights_are_deterministic(caplog: pytest.LogCaptureFixture) -> None:
    imgs = [_image(0), _image(1)]
    rng_before = torch.random.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="idunno.models"):
        a = models.Classifier(SMALL, seed=0)
        warnings = [r for r in caplog.records if r.name == "idunno.models"]
    assert len(warnings) == 1
    assert "seeded random weights" in warnings[0].getMessage()
    assert not a.pretrained
    assert a.weights_source == "random(seed=0)"
    b = models.Classifier(SMALL, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "global RNG must not be consumed"
    assert torch.equal(_logits(a, imgs), _logits(b, imgs))
    assert a.predict_batch(imgs) == b.predict_batch(imgs)
    c = models.Classifier(SMALL, seed=1)
    assert not torch.equal(_logits(c, imgs), _logits(a, imgs))


def test_seeded_predictions_are_deterministic_and_ranked() -> None:
    imgs = [_image(0), _image(1)]
    a = models.Classifier(RANKED, seed=0).predict_batch(imgs)
    b = models.Classifier(RANKED, seed=0).predict_batch(imgs)
    assert a == b
    probs = [p for _, p in a[0]]
    assert len(set(probs)) == 5, "random AlexNet should not produce ties"


def test_predict_batch_shape_and_probabilities() -> None:
    clf = models.Classifier(RANKED)
    # A grayscale and an RGBA image check the RGB conversion.
    imgs = [_image(0), _image(2, (300, 250)).convert("L"), _image(3).convert("RGBA")]
    results = clf.predict_batch(imgs, topk=5)
    assert len(results) == len(imgs)
    categories = set(clf.categories)
    assert len(clf.categories) == 1000
    for top in results:
        assert len(top) == 5
        labels = [label for label, _ in top]
        probs = [p for _, p in top]
        assert all(isinstance(p, float) for p in probs)
        assert set(labels) <= categories
        assert len(set(labels)) == 5
        assert probs == sorted(probs, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probs)
        assert sum(probs) <= 1.0 + 1e-6
    assert clf.predict_batch([]) == []
    assert len(clf.predict_batch(imgs[:1], topk=1)[0]) == 1
    with pytest.raises(ValueError):
        clf.predict_batch(imgs, topk=0)


def test_warm_up_runs_one_forward_pass_once_and_changes_no_prediction() -> None:
    clf = models.Classifier(SMALL, seed=0)
    before = clf.predict_batch([_image(1)])
    calls: list[int] = []
    clf.model.register_forward_hook(lambda _m, inp, _out: calls.append(inp[0].shape[0]))
    clf.warm_up()
    clf.warm_up()
    assert calls == [1]  # one blank image, and only the first call
    assert clf.predict_batch([_image(1)]) == before
    models.NoopClassifier().warm_up()  # the noop model has nothing to warm and must not fail


def test_weights_path_roundtrip(tmp_path: Path) -> None:
    seeded = models.Classifier(SMALL, seed=3)
    state = seeded.model.state_dict()
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    # A training checkpoint with DataParallel-style keys must load too.
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)

    imgs = [_image(4)]
    expected = _logits(seeded, imgs)
    for path in (plain, wrapped):
        loaded = models.Classifier(SMALL, weights_path=str(path), seed=99)
        assert loaded.pretrained
        assert loaded.weights_source == f"file:{path}"
        assert torch.equal(_logits(loaded, imgs), expected)
        assert loaded.predict_batch(imgs) == seeded.predict_batch(imgs)


def test_weights_path_without_version_metadata(tmp_path: Path) -> None:
    # MNASNet needs state_dict version metadata, which a plain dict copy loses.
    seeded = models.Classifier("mnasnet0_5", seed=2)
    path = tmp_path / "mnasnet.pth"
    torch.save(dict(seeded.model.state_dict()), path)
    loaded = models.Classifier("mnasnet0_5", weights_path=str(path))
    assert loaded.pretrained
    assert torch.equal(_logits(loaded, [_image(5)]), _logits(seeded, [_image(5)]))


def test_weights_path_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        models.Classifier(SMALL, weights_path=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="do not fit"):
        models.Classifier(SMALL, weights_path=str(wrong))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load weights"):
        models.Classifier(SMALL, weights_path=str(corrupt))


def test_hub_cache_weights_are_used() -> None:
    seeded = models.Classifier(SMALL, seed=5)
    cached = registry.hub_cache_path(registry.default_weights(SMALL))
    assert cached.startswith(torch.hub.get_dir())
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    torch.save(seeded.model.state_dict(), cached)

    clf = models.Classifier(SMALL)
    assert clf.pretrained
    assert clf.weights_source == f"hub-cache:{cached}"
    assert torch.equal(_logits(clf, [_image(6)]), _logits(seeded, [_image(6)]))


def test_get_classifier_is_cached_and_thread_safe() -> None:
    found: list[models.Classifier] = []
    threads = [threading.Thread(target=lambda: found.append(models.get_classifier(SMALL))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 4
    assert all(clf is found[0] for clf in found)
    assert models.get_classifier(SMALL, seed=1) is not found[0]


def test_decode_image_roundtrip() -> None:
    img = models.decode_image(_jpeg_bytes(_image(7)))
    assert img.mode == "RGB"
    assert img.size == (160, 120)
    buf = io.BytesIO()
    _image(8).convert("L").save(buf, "PNG")
    assert models.decode_image(buf.getvalue()).mode == "RGB"


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, b"GIF89a garbage"],
    ids=["empty", "text", "png-header-only", "gif-garbage"],
)
def test_decode_image_rejects_garbage(data: bytes) -> None:
    with pytest.raises(models.ImageDecodeError):
        models.decode_image(data)


def test_decode_image_rejects_unlisted_format() -> None:
    buf = io.BytesIO()
    _image(12).save(buf, "PCX")
    assert Image.open(io.BytesIO(buf.getvalue())).format == "PCX"
    with pytest.raises(models.ImageDecodeError):
        models.decode_image(buf.getvalue())


def test_decode_image_rejects_truncated_jpeg() -> None:
    data = _jpeg_bytes(_image(9))
    with pytest.raises(models.ImageDecodeError):
        models.decode_image(data[: len(data) // 2])
    assert issubclass(models.ImageDecodeError, ValueError)


def test_decode_image_rejects_decompression_bomb(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _jpeg_bytes(_image(10, (100, 100)))
    # PIL raises (not just warns) above twice the limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(models.ImageDecodeError, match="too large"):
        models.decode_image(data)


def test_alexnet_predict_api() -> None:
    img = Image.open(DATA_DIR / "img_001.jpg")
    result = models.alexnet_predict(img, query_id="q-1")
    assert set(result) == {"query_id", "model", "top5"}
    assert result["query_id"] == "q-1"
    assert result["model"] == "alexnet"
    assert len(result["top5"]) == 5
    assert all(isinstance(label, str) and isinstance(p, float) for label, p in result["top5"])


def test_resnet_predict_api() -> None:
    result = models.resnet_predict(_image(11), query_id=42)
    assert result["query_id"] == 42
    assert result["model"] == "resnet50"
    assert len(result["top5"]) == 5
    assert models.get_classifier("resnet") is models.get_classifier("resnet50")


def test_data_images_are_shippable() -> None:
    files = sorted(DATA_DIR.glob("img_*.jpg"))
    assert [f.name for f in files] == [f"img_{i:03d}.jpg" for i in range(100)]
    assert sum(f.stat().st_size for f in files) < 8_000_000
    digests = set()
    for f in files:
        data = f.read_bytes()
        assert len(data) < 60_000, f.name
        digests.add(hash(data))
        img = models.decode_image(data)
        assert min(img.size) >= 200 and max(img.size) <= 400, (f.name, img.size)
    assert len(digests) == len(files)
    assert (DATA_DIR / "LICENSE.md").is_file()


def test_noop_model_labels_anything_without_computing() -> None:
    clf = models.get_classifier("noop")
    assert clf is models.get_classifier(" NOOP ")
    assert not clf.decodes_input and not clf.pretrained
    assert clf.predict_batch([b"raw bytes", None]) == [[("noop", 1.0)], [("noop", 1.0)]]
    assert models.get_classifier(SMALL).decodes_input


def test_the_coordinators_model_list_is_torchvisions() -> None:
    """The coordinator resolves names without torch, from a static list: it must not drift."""
    from common.modelnames import ALIASES, MODEL_NAMES, NOOP  # noqa: PLC0415

    assert set(MODEL_NAMES) == {*models.list_models(), NOOP}
    assert ALIASES == models.ALIASES
    for name in ("resnet", " AlexNet ", "vit_b_16"):
        from common.modelnames import resolve_model  # noqa: PLC0415

        assert resolve_model(name) == models.resolve_name(name)
