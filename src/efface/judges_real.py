"""Judges on real models, for objects, artists and celebrities (:class:`~efface.judges.Judge` objects).

* ``imagenet`` (:func:`imagenet_judge`): an ImageNet-1k classifier; the concept is present iff the
  image's top-1 ImageNet index is the concept's index (ESD's and UCE's object erasure: a ResNet-50 on
  the Imagenette classes, :data:`IMAGENETTE_INDEX`). No threshold. The classifier is a local
  transformers directory (a copy of ``microsoft/resnet-50``, or that id already in the Hugging Face
  cache) or torchvision's ResNet-50 state dict (``resnet50-0676ba61.pth``, IMAGENET1K_V1, preprocessed
  as torchvision's eval transform: resize the shorter side to 256, centre crop 224, ImageNet mean / std;
  ``resnet50-11ad3fa6.pth``, IMAGENET1K_V2, resizes to 232 as torchvision's own eval of those weights).
* ``clip-zero-shot`` (:func:`clip_judge`): CLIP zero-shot classification among ``labels`` (artists:
  ``"a painting in the style of {}"`` over erased + kept artists; celebrities: ``"a photo of {}"``);
  present iff the best label is the concept. Probabilities: softmax of ``logit_scale * cos``.

Scores per image: ``{concept: probability of the concept, "predicted": the top-1 class}`` (an ImageNet
index for ``imagenet``, a label for ``clip-zero-shot``). Nothing is downloaded: a missing model is an
:class:`~efface.errors.InputError` raised by the factory, before any image is judged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from efface.errors import InputError
from efface.judges import Judge
from efface.metrics.image_quality import ClipScoreConfig, transformers_clip
from efface.metrics.real import batches, factory_name, package_version, require_module, weights_provenance

# Imagenette's classes (spelled as efface.protocols.objects.IMAGENETTE_CLASSES) -> ImageNet-1k index
IMAGENETTE_INDEX: dict[str, int] = {
    "tench": 0, "English springer": 217, "cassette player": 482, "chain saw": 491, "church": 497,
    "French horn": 566, "garbage truck": 569, "gas pump": 571, "golf ball": 574, "parachute": 701,
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TORCHVISION_RESIZE: dict[str, int] = {"resnet50-11ad3fa6.pth": 232}  # torchvision's V2 eval; otherwise 256
HOW_IMAGENET = ("pass imagenet_judge(model=...) a local directory holding microsoft/resnet-50 (config.json, "
                "model.safetensors, preprocessor_config.json), or torchvision's ResNet-50 state dict "
                "resnet50-0676ba61.pth (IMAGENET1K_V1) or resnet50-11ad3fa6.pth (IMAGENET1K_V2) "
                "(efface never downloads weights)")

# N images -> N x C logits (C > every class index); ``classifier_factory()`` returns one
ImageClassifier = Callable[[Sequence[Image.Image]], torch.Tensor]


def check_concepts(concepts: Iterable[str], valid: Iterable[str], judge: str) -> None:
    """Refuse concepts ``judge`` cannot see (e.g. before generating: ``check_concepts(cs, IMAGENETTE_INDEX,
    "imagenet")``); the message lists the valid names."""
    valid = list(valid)
    unknown = [c for c in concepts if c not in valid]
    if unknown:
        raise InputError(f"the {judge!r} judge cannot judge {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(valid)}")


def _weights_file(folder: str | Path) -> Path | None:
    folder = Path(folder).expanduser()
    return next((folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()), None)


def _model_provenance(model: str | None, weights: Path | None) -> dict[str, Any]:
    w = weights_provenance(weights)
    return {"model": {"name": model, **w}, "weights_sha256": w["sha256"]}


def imagenet_tensor(image: Image.Image, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """torchvision's ImageNet eval transform on a PIL image (``Resize(resize)`` bilinear on the shorter
    side, ``CenterCrop(crop)``, ``ToTensor``, ``Normalize(mean, std)``) without torchvision: 3 x crop x crop."""
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize * long / short)
    image = image.resize((resize, new_long) if w <= h else (new_long, resize), Image.BILINEAR)
    w, h = image.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    x = np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32) / 255.0
    x = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _torchvision_resnet50(path: Path, device: str) -> ImageClassifier:
    tv = require_module("torchvision", pip_name="torchvision",
                        purpose=f"the 'imagenet' judge with the torchvision state dict {path.name}")
    net = tv.models.resnet50()
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # unpickling refused, or keys / shapes not ResNet-50's
        raise InputError(f"{path} is not a torchvision ResNet-50 state dict ({type(e).__name__}: {e}); "
                         f"{HOW_IMAGENET}") from e
    net = net.to(device).eval()
    resize = TORCHVISION_RESIZE.get(path.name, 256)

    def logits(images: Sequence[Image.Image]) -> torch.Tensor:
        return net(torch.stack([imagenet_tensor(im, resize) for im in images]).to(device))

    return logits


def _transformers_classifier(model: str, device: str) -> ImageClassifier:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    try:
        net = AutoModelForImageClassification.from_pretrained(model, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"no ImageNet classifier at {model!r} ({type(e).__name__}); {HOW_IMAGENET}") from e
    net = net.to(device).eval()

    def logits(images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return net(pixel_values=inputs["pixel_values"].to(device)).logits

    return logits


def imagenet_judge(model: str | None = None, *, classes: dict[str, int] | None = None,
                   classifier_factory: Callable[[], ImageClassifier] | None = None, device: str = "cpu",
                   batch_size: int = 16) -> Judge:
    """The ``imagenet`` judge: present iff the top-1 ImageNet index is ``classes[concept]``.

    ``model``: a transformers image-classification directory (or a hub id in the HF cache), or a
    torchvision ResNet-50 ``.pth`` state dict (needs ``torchvision``). ``classes``: concept -> index
    (default :data:`IMAGENETTE_INDEX`). ``classifier_factory()``: returns an :data:`ImageClassifier`
    (N PIL images -> N x C logits), used instead of ``model``. Scores: ``{concept: softmax probability
    of its index, "predicted": the top-1 index (int)}``.
    """
    classes = dict(IMAGENETTE_INDEX if classes is None else classes)
    if not classes or not all(isinstance(i, int) and i >= 0 for i in classes.values()):
        raise InputError(f"classes must map concept names to class indices (ints >= 0), got {classes}")
    if classifier_factory is not None:
        classifier, weights = classifier_factory(), None
        evaluator = {"name": factory_name(classifier_factory), "package_version": None}
    elif model is None:
        raise InputError(f"the 'imagenet' judge needs an ImageNet-1k classifier: {HOW_IMAGENET}")
    elif (path := Path(model).expanduser()).is_file():
        classifier, weights = _torchvision_resnet50(path, device), path
        evaluator = {"name": "torchvision.models.resnet50", "package_version": package_version("torchvision"),
                     "preprocessing": f"resize {TORCHVISION_RESIZE.get(path.name, 256)}, centre crop 224, "
                                      "ImageNet mean / std"}
    elif path.is_dir() or (model.count("/") == 1 and not model.startswith(("/", ".", "~"))):  # or a hub id
        classifier, weights = _transformers_classifier(model, device), _weights_file(path)
        evaluator = {"name": "transformers.AutoModelForImageClassification",
                     "package_version": package_version("transformers")}
    else:
        raise InputError(f"ImageNet classifier not found at {path}; {HOW_IMAGENET}")

    def score(images: list, concept: str) -> list[dict[str, Any]]:
        check_concepts([concept], classes, "imagenet")
        k, out = classes[concept], []
        for batch in batches(images, batch_size):
            with torch.inference_mode():
                probs = classifier(list(batch)).float().softmax(-1).cpu()
            if probs.ndim != 2 or probs.shape[0] != len(batch) or probs.shape[1] <= max(classes.values()):
                raise InputError(f"the classifier gave logits of shape {tuple(probs.shape)} for {len(batch)} "
                                 f"images; expected {len(batch)} x C with C > {max(classes.values())}")
            out += [{concept: float(p[k]), "predicted": int(p.argmax())} for p in probs]
        return out

    def decide(s: dict, concept: str) -> bool:
        return s["predicted"] == classes[concept]

    provenance = {**evaluator, **_model_provenance(model, weights), "classes": classes,
                  "decision": "present iff the top-1 ImageNet index is the concept's"}
    return Judge("imagenet", None, score, decide, provenance)


def _features(out: Any) -> torch.Tensor:
    """transformers 4 returns the projected features; 5 returns an output whose pooler_output they are."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_judge(model: str | None = None, *, labels: Sequence[str], template: str = "{}",
               clip_factory: Callable[[ClipScoreConfig], tuple[Any, Any]] | None = None, device: str = "cpu",
               batch_size: int = 16) -> Judge:
    """The ``clip-zero-shot`` judge: present iff ``template.format(concept)`` is the image's best label.

    ``model``: a local CLIP directory or a hub id in the HF cache (default: :class:`ClipScoreConfig`'s);
    ``clip_factory(config)``: ``(CLIPModel, CLIPProcessor)``-like, as
    :class:`~efface.metrics.image_quality.ClipScore`'s (``get_text_features``, ``get_image_features``,
    ``logit_scale``; the processor called with ``text=`` or ``images=``).
    The label texts are encoded once, here. Scores: ``{concept: softmax probability of its label over
    all labels (logit_scale * cosine), "predicted": the best label}``.
    """
    labels = list(labels)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise InputError(f"clip_judge needs at least two distinct labels to choose among, got {labels}")
    if "{}" not in template:
        raise InputError(f"the template {template!r} has no '{{}}' for the label, e.g. 'a photo of {{}}'")
    config = ClipScoreConfig(device=device, batch_size=batch_size, **({} if model is None else {"model": model}))
    factory = clip_factory or transformers_clip
    clip, processor = factory(config)
    max_length = getattr(getattr(clip.config, "text_config", None), "max_position_embeddings", 77)
    prompts = [template.format(label) for label in labels]
    text = []
    with torch.inference_mode():
        for batch in batches(prompts, batch_size):
            inputs = processor(text=list(batch), return_tensors="pt", padding=True, truncation=True,
                               max_length=max_length)
            text.append(_features(clip.get_text_features(**{k: v.to(device) for k, v in inputs.items()})).float())
        text_embeds = torch.nn.functional.normalize(torch.cat(text), dim=-1)
        logit_scale = clip.logit_scale.exp().float()

    def score(images: list, concept: str) -> list[dict[str, Any]]:
        check_concepts([concept], labels, "clip-zero-shot")
        k, out = labels.index(concept), []
        for batch in batches(images, batch_size):
            pixels = processor(images=[im.convert("RGB") for im in batch], return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                image_embeds = _features(clip.get_image_features(pixel_values=pixels.to(device))).float()
                logits = logit_scale * torch.nn.functional.normalize(image_embeds, dim=-1) @ text_embeds.T
            out += [{concept: float(p[k]), "predicted": labels[int(p.argmax())]} for p in logits.softmax(-1).cpu()]
        return out

    def decide(s: dict, concept: str) -> bool:
        return s["predicted"] == concept

    if factory is transformers_clip:
        evaluator = {"name": "transformers.CLIPModel", "package_version": package_version("transformers"),
                     "revision": getattr(clip.config, "_commit_hash", None)}
        weights = _weights_file(config.model)
    else:
        evaluator, weights = {"name": factory_name(factory), "package_version": None}, None
    provenance = {**evaluator, **_model_provenance(config.model, weights), "labels": labels, "template": template,
                  "decision": "present iff the concept's label has the highest logit_scale * cos(image, text)"}
    return Judge("clip-zero-shot", None, score, decide, provenance)
