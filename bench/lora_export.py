"""How close a method's LoRA export is to efface's own apply, in plain diffusers, on toy-sd.

For each method: erase "circle" (toy preset; UCE and RECE also preserve "square"), save the
artifact with ``lora=True``, generate 4 prompts (seeds 0-3, 8 steps of the pipeline's scheduler)
with the artifact applied by efface and with the LoRA loaded by ``pipe.load_lora_weights`` into a
``StableDiffusionPipeline.from_pretrained`` of the toy directory; print the LoRA's mode, largest
rank, relative error (manifest) and the largest pixel difference of the two image sets, next to the
largest difference between the erased and the base images (what an erasure moves).

    python bench/lora_export.py [--methods uce,rece,mace,esd-x,esd-x-strict] [--iterations 20]

``--iterations`` overrides the trained methods' toy schedule (ESD-x's preset runs longer).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

PROMPTS = ["a red circle", "a blue square", "a green circle, striped style", "a yellow star"]
CLOSED = ("uce", "rece", "mace")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="uce,rece,mace,esd-x,esd-x-strict")
    parser.add_argument("--iterations", type=int, default=20, help="iterations of the trained methods")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    from diffusers import StableDiffusionPipeline

    from efface import load_pipeline
    from efface.methods import erase
    from efface.toy.presets import method_inputs, method_preset

    source = load_pipeline("toy").efface_source
    pipe = StableDiffusionPipeline.from_pretrained(source, local_files_only=True)  # plain diffusers
    pipe.set_progress_bar_config(disable=True)

    def images():
        gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
        return pipe(PROMPTS, num_inference_steps=args.steps, generator=gens, output_type="np").images

    base = images()
    print(f"{'method':<13} {'mode':<6} {'rank<=':>6} {'rel. error':>10} {'LoRA vs efface':>15} {'erased vs base':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            options = {} if method in CLOSED else {"iterations": args.iterations}
            erased = erase(pipe, method, ["circle"], preserve=["square"] if method in ("uce", "rece") else (),
                           seed=0, progress=False, preset=method_preset(method), **method_inputs(method), **options)
            out = erased.save(Path(tmp) / method, pipe=pipe, lora=True)
            lo = erased.manifest["lora"]
            with erased.applied(pipe):
                expected = images()
            pipe.load_lora_weights(out / "lora", adapter_name=method.replace("-", "_"))
            got = images()
            pipe.unload_lora_weights()
            print(f"{method:<13} {lo['mode']:<6} {lo['max_rank']:>6} {lo['relative_error']:>10.2e} "
                  f"{np.abs(got - expected).max() * 255:>11.4f}/255 {np.abs(expected - base).max() * 255:>11.1f}/255",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
