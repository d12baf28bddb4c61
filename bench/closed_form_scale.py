"""How the closed forms scale with the number of concepts on an SD 1.4-sized model (issue 14).

Builds an SD 1.4-architecture ``StableDiffusionPipeline`` in code with random weights (the SD 1.x
UNet, 860 M parameters; a CLIP-L-sized text encoder, 77 positions; an offline CLIP BPE tokenizer
whose vocabulary holds every concept word, ``model_max_length`` 77; a tiny VAE, unused) and times,
for 1 / 10 / 100 distinct concepts (``CONCEPTS``):

* UCE (paper preset): the method's seconds from the manifest (``erase(pipe, "uce", ...)``), the
  ratio t(100) / t(1), and beside it the bare arithmetic: ``UCE.edit`` on keys already collected
  (the normal matrices and the per-layer solves alone);
* RECE (paper preset, ``epochs`` rounds, default 1 as issue 14 measured): the manifest's seconds;
* MACE's closed forms with the paper's 30 templates: the prompts encoded and reduced to their Gram
  matrices (``MACE.statistics``), the CFR (``MACE.refine``) and the fusion (``MACE.fuse_loras``) of
  random rank-1 LoRA factors standing in for the trained ones (the LoRA training and the image
  sampling between them are not closed forms and are not timed);
* the peak resident memory of a UCE fit of 100 concepts against the model's own size (the peak
  is reset through ``/proc/self/clear_refs`` just before the fit).

Goals (issue 14): UCE with 100 concepts at most 2x the time of 1 concept; peak memory of a UCE
fit at most 1.25x the model. Use the cores you have (``--threads``, default 2):

    python bench/closed_form_scale.py [--counts 1,10,100] [--methods uce,rece,mace] [--repeat 3]
        [--rece-epochs 1] [--mace-templates 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time

import torch

# 100 distinct concepts of real words (objects, animals, places, artists' names are left out: one
# string each, one to three words)
CONCEPTS: tuple[str, ...] = (
    "cat", "dog", "church", "garbage truck", "parachute", "golf ball", "french horn", "chain saw", "gas pump",
    "cassette player", "tench", "english springer", "car", "bicycle", "airplane", "ship", "train", "horse",
    "elephant", "giraffe", "zebra", "lion", "tiger", "bear", "wolf", "fox", "rabbit", "squirrel", "owl",
    "eagle", "parrot", "penguin", "dolphin", "whale", "shark", "octopus", "butterfly", "spider", "snake",
    "turtle", "frog", "apple", "banana", "orange", "strawberry", "pineapple", "pizza", "hamburger", "cake",
    "coffee cup", "wine glass", "teapot", "umbrella", "backpack", "suitcase", "laptop", "keyboard",
    "television", "telephone", "camera", "clock", "lamp", "chair", "sofa", "bed", "bathtub", "castle",
    "lighthouse", "bridge", "skyscraper", "windmill", "tractor", "fire engine", "police car", "motorcycle",
    "helicopter", "rocket", "submarine", "sailboat", "hot air balloon", "violin", "piano", "guitar", "drum",
    "trumpet", "football", "tennis racket", "baseball bat", "skateboard", "surfboard", "snowman",
    "christmas tree", "pumpkin", "sunflower", "rose", "cactus", "mushroom", "volcano", "waterfall",
    "rainbow",
)
assert len(set(CONCEPTS)) == len(CONCEPTS) == 100


def clip_tokenizer(words: list[str], directory: str):
    """An offline CLIP BPE tokenizer (77 tokens) whose vocabulary makes each word one token."""
    from transformers import CLIPTokenizer

    from efface.toy.tokenizer import BOS, CHARS, EOS, build_vocab
    from efface.toy.world import vocabulary

    words = sorted({w for w in [*vocabulary(), *words] if all(c in CHARS for c in w)})
    vocab, merges = build_vocab(words)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS,
                        model_max_length=77)
    tok.save_pretrained(directory)
    return CLIPTokenizer.from_pretrained(directory)


def sd14_pipeline(sample_size: int = 64, block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)):
    """SD 1.4's architecture with random weights: UNet (SD 1.x defaults, 768-d context), CLIP-L text
    encoder (768 hidden, 12 layers, 12 heads, 3072 MLP, 77 positions, CLIP's 49408 ids), tiny VAE.
    ``sample_size``: the UNet's native latent side (64: 512 px); ``block_out_channels``: its widths
    (SD 1.x's by default; narrower ones give a smaller UNet of the same layout)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    words = sorted({w for c in CONCEPTS for w in c.split()})
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(words, tmp)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=sample_size,
                                block_out_channels=block_out_channels)  # SD 1.x: the defaults
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_bytes(pipe) -> int:
    return sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.text_encoder, pipe.vae) for p in m.parameters())


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def time_uce(pipe, counts: list[int], repeat: int) -> dict[int, tuple[float, float]]:
    """Per count, the fastest of ``repeat`` runs: (method seconds from the manifest, seconds of
    UCE.edit on keys already collected: the solves alone)."""
    from efface.methods import ErasureRequest, erase
    from efface.methods.uce import UCE
    from efface.models.params import select

    out = {}
    erase(pipe, "uce", list(CONCEPTS[:1]), progress=False)  # warm up (first calls allocate)
    for n in counts:
        seconds = min(erase(pipe, "uce", list(CONCEPTS[:n]), progress=False).manifest["seconds"]
                      for _ in range(repeat))
        uce = UCE()
        keys = uce.keys(pipe, ErasureRequest.build(list(CONCEPTS[:n])))
        weights = select(pipe, uce.parameter_set)
        saved = {k: p.detach().clone() for k, p in weights.items()}
        solves = []
        for _ in range(repeat):
            start = time.perf_counter()
            uce.edit(pipe, keys)
            solves.append(time.perf_counter() - start)
            with torch.no_grad():
                for k, p in weights.items():
                    p.copy_(saved[k])
        out[n] = (seconds, min(solves))
    return out


def time_rece(pipe, counts: list[int], epochs: int, repeat: int) -> dict[int, float]:
    from efface.methods import erase

    return {n: min(erase(pipe, "rece", list(CONCEPTS[:n]), epochs=epochs, progress=False).manifest["seconds"]
                   for _ in range(repeat)) for n in counts}


def time_mace(pipe, counts: list[int], n_templates: int) -> dict[int, tuple[float, float, float]]:
    """Per count: seconds of (the prompts encoded and reduced to Gram matrices, the CFR, the fusion)
    with the first ``n_templates`` of the paper's templates and random rank-1 LoRA factors."""
    from efface.methods import ErasureRequest
    from efface.methods.mace import MACE, OBJECT_TEMPLATES
    from efface.models.params import select

    out = {}
    weights = select(pipe, MACE.parameter_set)
    saved = {k: p.detach().clone() for k, p in weights.items()}
    for n in counts:
        mace = MACE(templates=OBJECT_TEMPLATES[:n_templates])
        request = ErasureRequest.build(list(CONCEPTS[:n]), default_anchor=MACE.default_anchor)
        g = torch.Generator().manual_seed(0)
        factors = [{k: (torch.randn(p.shape[0], 1, generator=g) * 1e-3, torch.randn(1, p.shape[1], generator=g))
                    for k, p in weights.items()} for _ in range(n)]
        dtype = getattr(torch, mace.config.solve_dtype)
        try:
            start = time.perf_counter()
            stats = mace.statistics(pipe, request, dtype)
            encoding = time.perf_counter() - start
            start = time.perf_counter()
            mace.refine(pipe, stats)
            cfr = time.perf_counter() - start
            refined = {k: p.detach().clone() for k, p in weights.items()}
            start = time.perf_counter()
            mace.fuse_loras(pipe, stats, saved, refined, factors)
            fusion = time.perf_counter() - start
        finally:
            with torch.no_grad():
                for k, p in weights.items():
                    p.copy_(saved[k])
        out[n] = (encoding, cfr, fusion)
    return out


def peak_memory(pipe, n: int, size: int) -> None:
    """Print the peak resident memory of a UCE fit of ``n`` concepts against the model's size."""
    from efface.methods import erase

    before = rss("VmRSS")
    if not reset_peak_rss():
        print("peak memory: /proc/self/clear_refs is not writable here; not measured")
        return
    erase(pipe, "uce", list(CONCEPTS[:n]), progress=False)
    peak = rss("VmHWM")
    print(f"UCE fit of {n} concepts: peak RSS {peak / 1e9:.2f} GB = {peak / size:.2f}x the model's "
          f"{size / 1e9:.2f} GB (goal <= 1.25x: {'met' if peak <= 1.25 * size else 'missed'}); before the fit "
          f"{before / 1e9:.2f} GB (the model and the Python / torch runtime), the fit's own peak above that "
          f"{(peak - before) / 1e6:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,10,100", help="numbers of concepts (at most 100)")
    parser.add_argument("--methods", default="uce,rece,mace")
    parser.add_argument("--rece-epochs", type=int, default=1)
    parser.add_argument("--mace-templates", type=int, default=30, help="MACE's templates (paper: 30)")
    parser.add_argument("--repeat", type=int, default=3, help="UCE / RECE: the fastest of this many runs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    methods = args.methods.split(",")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import efface.methods  # noqa: F401  (registers the methods)

    start = time.perf_counter()
    pipe = sd14_pipeline()
    size = model_bytes(pipe)
    print(f"SD 1.4-sized pipeline built in {time.perf_counter() - start:.0f} s: UNet "
          f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f} M, text encoder "
          f"{sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e6:.0f} M parameters, "
          f"{size / 1e9:.2f} GB (fp32); {torch.get_num_threads()} threads")
    if "uce" in methods:  # first, so that no earlier run's freed memory is already resident
        peak_memory(pipe, max(counts), size)
    rows: dict[str, dict[int, str]] = {}
    if "uce" in methods:
        uce = time_uce(pipe, counts, args.repeat)
        rows["UCE (manifest seconds)"] = {n: f"{s:.2f}" for n, (s, _) in uce.items()}
        rows["UCE: the solves alone (UCE.edit)"] = {n: f"{e:.2f}" for n, (_, e) in uce.items()}
        lo, hi = min(counts), max(counts)
        ratio = uce[hi][0] / uce[lo][0]
        print(f"UCE t({hi}) / t({lo}) = {ratio:.2f} (goal <= 2: {'met' if ratio <= 2 else 'missed'}); "
              f"solves alone {uce[hi][1]:.2f} s / {uce[lo][1]:.2f} s")
    if "rece" in methods:
        rows[f"RECE, {args.rece_epochs} epoch(s) (manifest seconds)"] = {
            n: f"{s:.2f}" for n, s in time_rece(pipe, counts, args.rece_epochs, args.repeat).items()}
    if "mace" in methods:
        mace = time_mace(pipe, counts, args.mace_templates)
        k = args.mace_templates
        rows[f"MACE: {k} prompts per concept encoded, reduced to Gram matrices"] = {
            n: f"{e:.2f}" for n, (e, _, _) in mace.items()}
        rows["MACE: CFR (solve + apply)"] = {n: f"{c:.2f}" for n, (_, c, _) in mace.items()}
        rows["MACE: fusion of the LoRAs (solve + apply)"] = {n: f"{f:.2f}" for n, (_, _, f) in mace.items()}
    print()
    print("| seconds | " + " | ".join(f"{n} concept{'s' * (n > 1)}" for n in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells.get(n, "") for n in counts) + " |")


if __name__ == "__main__":
    main()
