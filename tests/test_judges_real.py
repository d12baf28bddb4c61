"""Real-model judges (``imagenet``, ``clip-zero-shot``): tiny seeded models built in code, saved and loaded
back through the real loaders; rigged models injected through the factories show that the decision is
the top-1 class; missing models and unknown concepts are InputErrors that say what to pass."""

from __future__ import annotations

import hashlib
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from efface.errors import InputError
from efface.judges_real import IMAGENETTE_INDEX, check_concepts, clip_judge, imagenet_judge, imagenet_tensor
from efface.protocols.objects import IMAGENETTE_CLASSES


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _noise(n: int, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8, 3)).astype(np.uint8)) for _ in range(n)]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_imagenette_index_names_the_protocol_classes_in_wnid_order():
    assert tuple(IMAGENETTE_INDEX) == IMAGENETTE_CLASSES
    # ImageNet-1k indices follow the sorted WordNet ids, and Imagenette's wnids are sorted: indices ascend
    indices = list(IMAGENETTE_INDEX.values())
    assert indices == sorted(set(indices)) and len(indices) == 10
    assert IMAGENETTE_INDEX["tench"] == 0 and IMAGENETTE_INDEX["parachute"] == 701


# ---------------------------------------------------------------- imagenet

def test_imagenet_judge_from_a_transformers_directory_decides_by_top1(resnet_dir):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    images = _noise(3)
    model = AutoModelForImageClassification.from_pretrained(resnet_dir, local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(resnet_dir, local_files_only=True)
    with torch.no_grad():
        probs = model(**processor(images=images, return_tensors="pt")).logits.softmax(-1)
    top1 = probs.argmax(-1).tolist()
    other = next(i for i in range(1000) if i not in top1)
    classes = {"first": top1[0], "other": other, **IMAGENETTE_INDEX}
    judge = imagenet_judge(str(resnet_dir), classes=classes, batch_size=2)
    for concept, k in classes.items():
        scores = judge.score(images, concept)
        assert [s["predicted"] for s in scores] == top1
        assert [s[concept] for s in scores] == pytest.approx(probs[:, k].tolist(), abs=1e-6)
        assert judge(images, concept) == [t == k for t in top1]
    assert judge(images, "first")[0] and not any(judge(images, "other"))
    per_image = np.array([[s[c] for c in classes for s in judge.score(images[i:i + 1], c)] for i in range(3)])
    assert (per_image >= 0).all() and (per_image.sum(1) <= 1 + 1e-6).all()  # disjoint classes of one softmax
    info = judge.describe()
    assert info["name"] == "imagenet" and info["threshold"] is None
    assert info["weights_sha256"] == _sha256(resnet_dir / "model.safetensors")
    assert info["evaluator"]["model"]["name"] == str(resnet_dir) and info["evaluator"]["package_version"]


def brightness_classifier():
    """Rigged: bright images are a tench (0), dark ones an English springer (217)."""
    def logits(images):
        b = torch.tensor([np.asarray(im.convert("L"), np.float32).mean() / 255 for im in images])
        out = torch.zeros(len(images), 1000)
        out[:, 0], out[:, 217] = 10 * b, 10 * (1 - b)
        return out
    return logits


def test_an_injected_classifier_decides_by_its_top1_and_scores_its_softmax():
    images = [Image.new("RGB", (16, 16), (v, v, v)) for v in (250, 10, 200, 40)]
    judge = imagenet_judge(classifier_factory=brightness_classifier, batch_size=3)
    assert judge(images, "tench") == [True, False, True, False]
    assert judge(images, "English springer") == [False, True, False, True]
    assert not any(judge(images, "golf ball"))
    scores = judge.score(images, "tench")
    assert [s["predicted"] for s in scores] == [0, 217, 0, 217]
    b = 250 / 255
    expected = np.exp(10 * b) / (np.exp(10 * b) + np.exp(10 * (1 - b)) + 998)
    assert scores[0]["tench"] == pytest.approx(expected, rel=1e-5)
    assert judge.score([], "tench") == []
    assert "brightness_classifier" in judge.describe()["evaluator"]["name"]


def test_unknown_concepts_are_refused_with_the_valid_names():
    judge = imagenet_judge(classifier_factory=brightness_classifier)
    with pytest.raises(InputError, match="goldfish.*valid: tench, English springer"):
        judge(_noise(1), "goldfish")
    with pytest.raises(InputError, match="'Tench'"):  # exact spelling, as in the protocol
        check_concepts(["tench", "Tench"], IMAGENETTE_INDEX, "imagenet")
    check_concepts(IMAGENETTE_CLASSES, IMAGENETTE_INDEX, "imagenet")


def test_a_missing_classifier_says_what_to_pass(tmp_path):
    with pytest.raises(InputError, match="microsoft/resnet-50.*resnet50-0676ba61.pth.*resnet50-11ad3fa6.pth"):
        imagenet_judge()
    with pytest.raises(InputError, match="not found at .*nope.pth.*microsoft/resnet-50"):
        imagenet_judge(str(tmp_path / "nope.pth"))
    with pytest.raises(InputError, match="no ImageNet classifier at .*microsoft/resnet-50"):
        imagenet_judge(str(tmp_path))  # an empty directory


def test_a_state_dict_without_torchvision_says_pip_install_torchvision(monkeypatch, tmp_path):
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, path)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(InputError, match="pip install torchvision"):
        imagenet_judge(str(path))


class TinyResNet(torch.nn.Module):
    """Stands in for torchvision's resnet50(): 3 x 224 x 224 -> 1000 logits."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def test_a_torchvision_state_dict_is_loaded_weights_only_and_preprocessed_as_imagenet(monkeypatch, tmp_path):
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(resnet50=TinyResNet)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    torch.manual_seed(0)
    net = TinyResNet().eval()
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(net.state_dict(), path)
    images = _noise(2, size=300)
    judge = imagenet_judge(str(path))
    with torch.no_grad():
        probs = net(torch.stack([imagenet_tensor(im) for im in images])).softmax(-1)
    assert [s["tench"] for s in judge.score(images, "tench")] == pytest.approx(probs[:, 0].tolist(), abs=1e-6)
    assert judge.describe()["weights_sha256"] == _sha256(path)
    assert "resize 256" in judge.provenance["preprocessing"]
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="not a torchvision ResNet-50 state dict"):
        imagenet_judge(str(tmp_path / "other.pth"))


def test_imagenet_preprocessing_resizes_crops_and_normalises():
    x = imagenet_tensor(Image.new("RGB", (300, 500), (255, 128, 0)))
    assert x.shape == (3, 224, 224)
    expected = (np.array([255, 128, 0]) / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert x.mean((1, 2)).tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    # the centre crop of a 256 x 426 resize keeps rows 101..324: a band outside them is cut
    pixels = np.zeros((500, 300, 3), np.uint8)
    pixels[:100] = 255
    assert imagenet_tensor(Image.fromarray(pixels)).max() < 0  # all black after the crop


# ---------------------------------------------------------------- clip-zero-shot

LABELS = ["circle", "square", "star"]


def test_clip_judge_from_a_directory_is_clips_zero_shot_softmax(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    images = _noise(3)
    judge = clip_judge(str(clip_dir), labels=LABELS, template="a red {}", batch_size=2)
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    with torch.no_grad():  # CLIP's own forward: logits_per_image = logit_scale * cos(image, text)
        probs = model(**processor(text=[f"a red {x}" for x in LABELS], images=images, return_tensors="pt",
                                  padding=True)).logits_per_image.softmax(-1)
    best = [LABELS[i] for i in probs.argmax(-1).tolist()]
    for k, concept in enumerate(LABELS):
        scores = judge.score(images, concept)
        assert [s[concept] for s in scores] == pytest.approx(probs[:, k].tolist(), abs=1e-5)
        assert [s["predicted"] for s in scores] == best
        assert judge(images, concept) == [b == concept for b in best]
    with pytest.raises(InputError, match="'triangle'.*valid: circle, square, star"):
        judge(images, "triangle")
    info = judge.describe()
    assert info["name"] == "clip-zero-shot" and info["weights_sha256"] == _sha256(clip_dir / "model.safetensors")
    assert info["evaluator"]["labels"] == LABELS and info["evaluator"]["template"] == "a red {}"


def test_clip_judge_refuses_missing_models_and_bad_labels(tmp_path):
    with pytest.raises(InputError, match="is not available on this machine.*never downloads"):
        clip_judge(str(tmp_path / "no-clip-here"), labels=LABELS)
    with pytest.raises(InputError, match="distinct labels"):
        clip_judge(labels=["a", "a"], clip_factory=rigged_clip)
    with pytest.raises(InputError, match="has no"):
        clip_judge(labels=LABELS, template="a photo", clip_factory=rigged_clip)


class RiggedClip:
    """Text 'bright' -> e1, anything else -> e0; an image -> (1 - brightness, brightness)."""

    config = types.SimpleNamespace()
    logit_scale = torch.tensor(np.log(20.0))
    text_calls = 0

    def get_text_features(self, input_ids, **kwargs):
        RiggedClip.text_calls += 1
        return torch.nn.functional.one_hot(input_ids[:, 0], 2).float()

    def get_image_features(self, pixel_values):
        return torch.stack([1 - pixel_values, pixel_values], -1)


def rigged_processor(text=None, images=None, **kwargs):
    if text is not None:
        return {"input_ids": torch.tensor([[int("bright" in t)] for t in text])}
    return {"pixel_values": torch.tensor([np.asarray(im.convert("L"), np.float32).mean() / 255 for im in images])}


def rigged_clip(config):
    return RiggedClip(), rigged_processor


def test_an_injected_clip_decides_by_the_best_label_and_encodes_labels_once():
    RiggedClip.text_calls = 0
    judge = clip_judge(labels=["dark", "bright"], template="a {} photo", clip_factory=rigged_clip)
    images = [Image.new("RGB", (8, 8), (v, v, v)) for v in (240, 20, 180)]
    assert judge(images, "bright") == [True, False, True] and judge(images, "dark") == [False, True, False]
    bright, dark = judge.score(images, "bright"), judge.score(images, "dark")
    assert [b["bright"] + d["dark"] for b, d in zip(bright, dark)] == pytest.approx([1, 1, 1])
    assert bright[0]["bright"] > bright[2]["bright"] > 0.5 > bright[1]["bright"]
    assert RiggedClip.text_calls == 1
    assert "rigged_clip" in judge.describe()["evaluator"]["name"]
