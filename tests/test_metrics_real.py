"""Real-model evaluators: a clear InputError when a package or its weights are missing, and real
numbers and provenance with tiny models injected through the factories (built in code, seeded)."""

from __future__ import annotations

import math
import sys
import tempfile
import types

import numpy as np
import pytest
import torch
from PIL import Image

from efface.errors import InputError
from efface.metrics.image_quality import (FID, INCEPTION_FILE, ClipScore, ClipScoreConfig, FIDConfig, LPIPSConfig,
                                          LPIPSDistance)
from efface.metrics.nudity import NUDE_CLASSES, NudityConfig, NudityRate, to_bgr
from efface.registry import METRICS



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run on one thread; restored afterwards (set at import time, it leaked into every
    later test of the session: the thread count changes which CPU kernels run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _solid(rgb: tuple[int, int, int], size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def _noise(seed: int, n: int, size: int = 32, shift: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(rng.integers(0, 200, (size, size, 3)) + shift, 0, 255).astype(np.uint8))
            for _ in range(n)]


def test_real_metrics_are_registered():
    assert {"nudity", "clip-score", "lpips", "fid"} <= set(METRICS.names())


# ---------------------------------------------------------------- missing packages and weights

@pytest.mark.parametrize("make, module, pip_name", [
    (lambda: NudityRate(), "nudenet", "pip install nudenet"),
    (lambda: LPIPSDistance(), "lpips", "pip install lpips"),
    (lambda: FID(), "cleanfid", "pip install clean-fid"),
])
def test_missing_package_is_an_input_error_at_construction(monkeypatch, make, module, pip_name):
    monkeypatch.setitem(sys.modules, module, None)  # whatever is installed here, `import module` now fails
    with pytest.raises(InputError, match=pip_name):
        make()


def test_missing_lpips_trunk_weights_name_the_file_and_torch_home(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lpips", types.ModuleType("lpips"))  # the package "is installed"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(InputError, match="alexnet-owt-7be5be79.pth.*TORCH_HOME"):
        LPIPSDistance()
    with pytest.raises(InputError, match="unknown LPIPS net"):
        LPIPSConfig(net="resnet")


def test_missing_inception_weights_name_the_file_and_url(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cleanfid", types.ModuleType("cleanfid"))
    with pytest.raises(InputError, match=f"{INCEPTION_FILE}.*nvlabs-fi-cdn.*FIDConfig\\(inception="):
        FID(FIDConfig(inception=str(tmp_path)))


def test_missing_clip_weights_say_how_to_provide_them(tmp_path):
    with pytest.raises(InputError, match="ClipScoreConfig\\(model="):
        ClipScore(ClipScoreConfig(model=str(tmp_path / "no-clip-here")))


# ---------------------------------------------------------------- nudity

def red_is_nude(image_bgr: np.ndarray) -> list[dict]:
    """A detector in NudeNet's format: "exposed breast" where the image is mostly red (channel 2 of
    BGR), a face always (not counted), a belly below the threshold where it is green."""
    b, g, r = (float(image_bgr[:, :, c].mean()) for c in range(3))
    found = [{"class": "FACE_FEMALE", "score": 0.95, "box": [0, 0, 8, 8]}]
    if r > 128:
        found += [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7, "box": [1, 2, 3, 4]},
                  {"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [5, 2, 3, 4]}]
    if g > 128:
        found.append({"class": "BELLY_EXPOSED", "score": 0.6, "box": [2, 2, 2, 2]})  # == threshold: not counted
    return found


def test_nudity_rate_counts_images_with_exposed_classes_above_threshold():
    rate = NudityRate(detector_factory=lambda config: red_is_nude)
    rate.update([_solid((255, 0, 0)), _solid((0, 0, 255)), _solid((0, 255, 0))])
    rate.update([_solid((250, 10, 10))])
    result = rate.compute()
    assert result["rate"] == 0.5 and result["count"] == 4 and result["nude_images"] == 2
    assert result["per_class"]["FEMALE_BREAST_EXPOSED"] == 2 and result["per_class"]["BELLY_EXPOSED"] == 0
    assert set(result["per_class"]) == set(NUDE_CLASSES)
    assert rate.per_image()[0] == {"FEMALE_BREAST_EXPOSED": 0.9} and rate.per_image()[1] == {}
    rate.reset()
    assert rate.compute()["rate"] is None


def test_nudity_provenance_records_evaluator_classes_and_threshold():
    rate = NudityRate(NudityConfig(threshold=0.5), detector_factory=lambda config: red_is_nude)
    rate.update([_solid((0, 255, 0))])
    assert rate.compute()["per_class"]["BELLY_EXPOSED"] == 1  # 0.6 > 0.5
    p = rate.provenance()
    assert p["metric"] == "nudity" and p["threshold"] == 0.5 and p["classes"] == list(NUDE_CLASSES)
    assert {"name", "package_version", "model"} <= set(p["evaluator"]) and "sha256" in p["evaluator"]["model"]
    assert "test_nudity_provenance" in p["evaluator"]["name"]


def test_nudity_detector_sees_bgr_and_bad_output_is_refused():
    assert to_bgr(_solid((255, 0, 0)))[0, 0].tolist() == [0, 0, 255]
    rate = NudityRate(detector_factory=lambda config: lambda image: [{"label": "x"}])
    with pytest.raises(ValueError, match="NudeNet detection"):
        rate.update([_solid((1, 2, 3))])
    with pytest.raises(InputError, match="unknown NudeNet classes"):
        NudityConfig(classes=("NAKED",))


def test_bundled_nudenet_when_installed_sees_what_a_png_file_gives_it(tmp_path):
    nudenet = pytest.importorskip("nudenet")  # bundles its detector: nothing to download
    image = _noise(5, 1, size=96)[0]
    image.save(tmp_path / "x.png")
    rate = NudityRate()
    assert nudenet.NudeDetector().detect(str(tmp_path / "x.png")) == rate.detector(to_bgr(image))
    rate.update([image, _solid((128, 128, 128), 64)])
    assert rate.compute()["count"] == 2
    evaluator = rate.provenance()["evaluator"]
    assert evaluator["package_version"] and len(evaluator["model"]["sha256"]) == 64


# ---------------------------------------------------------------- CLIP score

def tiny_clip(config: ClipScoreConfig):
    """A tiny, seeded CLIP (random weights) with the toy CLIP tokenizer and a real CLIP processor."""
    from families import build_tiny_clip

    with tempfile.TemporaryDirectory() as tmp:
        return build_tiny_clip(tmp)


def test_clip_score_with_a_tiny_clip_is_finite_and_scaled():
    images, prompts = _noise(0, 3, size=40), ["a red circle", "a blue star on a striped background", "a square"]
    metric = ClipScore(ClipScoreConfig(batch_size=2), model_factory=tiny_clip)
    metric.update(images, prompts=prompts)
    result = metric.compute()
    assert result["count"] == 3 and math.isfinite(result["clip_score"]) and 0 <= result["clip_score"] <= 100
    scores = metric.score(images, prompts)
    assert scores.tolist() == pytest.approx(metric.scores, abs=1e-5)  # batching does not change scores
    half = ClipScore(ClipScoreConfig(scale=50.0), model_factory=tiny_clip).score(images, prompts)
    assert half == pytest.approx(scores / 2, abs=1e-5)
    p = metric.provenance()
    assert p["metric"] == "clip-score" and p["scale"] == 100.0 and "tiny_clip" in p["evaluator"]["name"]
    with pytest.raises(ValueError):
        metric.update(images, prompts=prompts[:2])


# ---------------------------------------------------------------- LPIPS

class TinyPerceptual(torch.nn.Module):
    """LPIPS-shaped: unit-normalised conv features, squared difference, spatial mean -> N x 1 x 1 x 1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = (torch.nn.functional.normalize(self.conv(t), dim=1) for t in (x, y))
        return ((fx - fy) ** 2).sum(1, keepdim=True).mean((2, 3), keepdim=True)


def test_lpips_with_a_tiny_model_is_zero_for_same_images_and_grows_with_change():
    same, other = (LPIPSDistance(model_factory=lambda c: TinyPerceptual()) for _ in range(2))
    images = _noise(1, 3)
    same.update(images, reference=images)
    other.update(images, reference=_noise(2, 3))
    assert same.compute()["lpips"] == pytest.approx(0.0, abs=1e-7) and same.compute()["count"] == 3
    assert math.isfinite(other.compute()["lpips"]) and other.compute()["lpips"] > 0.01
    p = other.provenance()
    assert p["metric"] == "lpips" and p["net"] == "alex" and p["input_range"] == "[-1, 1]"
    with pytest.raises(ValueError, match="sizes differ"):
        other.update(images[:1], reference=_noise(3, 1, size=16))


# ---------------------------------------------------------------- FID / KID

def tiny_features(config: FIDConfig):
    """A seeded random conv net + pooling: 16-d features of 32 x 32 images."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 5, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))

    def extract(images):
        x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2) / 255
        with torch.inference_mode():
            return net(x.float()).flatten(1).double().numpy()

    return extract


def test_fid_with_tiny_features_separates_distributions():
    config = FIDConfig(kid_subsets=5, kid_subset_size=20)
    near, far = FID(config, feature_factory=tiny_features), FID(config, feature_factory=tiny_features)
    real = _noise(3, 24)
    for metric, generated in ((near, _noise(4, 24)), (far, _noise(4, 24, shift=80))):
        metric.update(real, real=True)
        metric.update(generated, real=False)
    a, b = near.compute(), far.compute()
    assert a["n_real"] == a["n_generated"] == 24
    assert all(math.isfinite(v) for v in (a["fid"], a["kid"], b["fid"], b["kid"]))
    assert b["fid"] > 10 * a["fid"] and b["kid"] > a["kid"]
    p = far.provenance()
    assert p["metric"] == "fid" and p["kid_subsets"] == 5 and "tiny_features" in p["evaluator"]["name"]
    far.reset()
    far.update(real[:1], real=True)
    assert far.compute()["fid"] is None


class _InceptionLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.conv = torch.nn.Conv2d(3, 2048, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class _InceptionStandIn(torch.nn.Module):
    """Shaped like clean-fid's Inception torchscript: ``layers(x)`` gives 2048 features."""

    def __init__(self):
        super().__init__()
        self.layers = _InceptionLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def test_clean_fid_default_path_when_installed_runs_its_loader_and_resize(tmp_path):
    pytest.importorskip("cleanfid")
    torch.manual_seed(0)
    torch.jit.script(_InceptionStandIn()).save(str(tmp_path / INCEPTION_FILE))
    metric = FID(FIDConfig(inception=str(tmp_path), batch_size=4))
    features = metric.features(_noise(6, 5, size=48) + _noise(7, 2, size=40))  # resized to 299 x 299 inside
    assert features.shape == (7, 2048) and np.isfinite(features).all()
    # (compute() is left out: the 2048 x 2048 matrix square root alone takes ~10 s on one core)
    assert len(metric.provenance()["evaluator"]["weights"]["sha256"]) == 64
