"""Peak memory of every training method on an SD 1.4-sized model at a small resolution (issue 14).

Builds the SD 1.4-architecture pipeline of ``bench/closed_form_scale.py`` with random weights
(860 M UNet, CLIP-L-sized text encoder) at a native latent of 16 x 16 (128 px), saves it once, and
runs each training method in its own process (``--child``): the pipeline loaded, the peak
resident memory reset (``/proc/self/clear_refs``), a fit of two iterations with the method's
official batch size (sampling steps and image counts cut to the least that runs: what is held
during a step is the same), the peak read back. Printed per method: the fit's peak (the whole process:
model, runtime, fit), the peak over the model's own size in that dtype, and the fit's seconds, in
fp32 and in bf16 (fp32 master weights of the trained parameters, ``mixed_precision="auto"``);
``--with-checkpointing`` adds fp32 with ``gradient_checkpointing=True`` (at 128 px the
activations are small, so it saves little there).

A method whose trained set is most of the UNet keeps, besides the model, the fit's copy of that
set, its gradients, Adam's two moments and (ESD-class, DoCo) a frozen UNet: at fp32 about 4.5x
the UNet on top of the model, ~20 GB at SD 1.4's size, over what this 24 GB machine can hold
beside anything else. Those (``--big``: estimated above ``--limit-gb``) are measured on a smaller
UNet of the same layout (``--small-widths``, default half SD 1.4's widths) and marked so; the
estimate for the SD 1.4 size is printed beside them.

    python bench/train_memory.py [--methods esd-x,ca,...] [--dtypes fp32,bf16] [--threads 2]
        [--limit-gb 18] [--with-checkpointing]

bitsandbytes' 8-bit Adam (``optimizer_8bit=True``) is measured where the package is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

# each method's official batch size and options; iterations / sampling steps / image counts / attack
# steps cut (an attack step holds what a training step holds: the peak is the same)
FAST: dict[str, dict] = {
    "esd-x": dict(iterations=2, ddim_steps=2),
    "esd-x-strict": dict(iterations=2, ddim_steps=2),
    "esd-u": dict(iterations=2, ddim_steps=2),
    "esd-all": dict(iterations=2, ddim_steps=2),
    "race": dict(esd_iterations=1, iterations=1, pgd_steps=2, ddim_steps=2),
    "ca": dict(iterations=2, num_anchor_images=8, anchor_steps=2),
    "salun": dict(iterations=2, num_images=8, sample_steps=2),
    "receler": dict(iterations=2, ddim_steps=2, adversarial_steps=2),
    "advunlearn": dict(iterations=2, warmup_iter=1, attack_step=2, ddim_steps=2),
    "doco": dict(iterations=3, warmup=1, num_anchor_images=8, anchor_steps=2),
    "spm": dict(iterations=2, ddim_steps=2),
    "mace": dict(iterations=2, num_images=2),
}


def child(args) -> None:
    """One fit in this process; print a JSON line of its memory."""
    from closed_form_scale import model_bytes, reset_peak_rss, rss

    from efface import load_pipeline
    from efface.methods import erase

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    size = model_bytes(pipe)
    options = dict(FAST[args.child])
    if args.checkpointing:
        options["gradient_checkpointing"] = True
    if args.eight_bit:
        options["optimizer_8bit"] = True
    before = rss("VmRSS")
    if not reset_peak_rss():
        raise SystemExit("/proc/self/clear_refs is not writable here: peak memory cannot be measured")
    start = time.perf_counter()
    erase(pipe, args.child, ["cat"], preserve=["dog"], seed=0, progress=False, **options)
    print(json.dumps({"model": size, "before": before, "peak": rss("VmHWM"), "seconds": time.perf_counter() - start}))


def estimate(pipe, method: str) -> int:
    """Bytes a fp32 fit holds at least: the model, then for the trained set its copy, gradient and
    Adam's two moments, and a frozen UNet (assumed for every method: an upper estimate)."""
    from closed_form_scale import model_bytes

    from efface.models.params import select
    from efface.registry import METHODS

    cls = METHODS.get(method)
    name = cls.parameter_set if isinstance(cls.parameter_set, str) or cls.parameter_set is None else None
    if name is None:  # a property (depends on the config): the default config's
        name = cls().parameter_set
    trained = sum(p.numel() * 4 for p in select(pipe, name).values()) if name else 0
    unet = sum(p.numel() * 4 for p in pipe.unet.parameters())
    return model_bytes(pipe) + 4 * trained + unet


def run(method: str, model: str, dtype: str, threads: int, checkpointing: bool = False,
        eight_bit: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--model", model, "--dtype", dtype, "--threads", str(threads)]
    cmd += ["--checkpointing"] * checkpointing + ["--eight-bit"] * eight_bit
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def cell(r: dict) -> str:
    if "error" in r:
        return f"failed: {r['error']}"
    return f"{r['peak'] / 1e9:.2f} GB ({r['peak'] / r['model']:.2f}x, {r['seconds']:.0f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(FAST))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit-gb", type=float, default=18.0, help="measure on the smaller UNet above this estimate")
    parser.add_argument("--small-widths", default="160,320,640,640")
    parser.add_argument("--with-checkpointing", action="store_true",
                        help="add a column: fp32 with gradient_checkpointing=True")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--eight-bit", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from closed_form_scale import model_bytes, sd14_pipeline

    import efface.methods  # noqa: F401  (registers the methods)

    torch.set_num_threads(args.threads)
    methods, dtypes = args.methods.split(","), args.dtypes.split(",")
    eight_bit = importlib.util.find_spec("bitsandbytes") is not None
    with tempfile.TemporaryDirectory() as tmp:
        big = sd14_pipeline(sample_size=16)
        estimates = {m: estimate(big, m) for m in methods}
        sizes = {"SD 1.4": model_bytes(big)}
        big.save_pretrained(f"{tmp}/sd14", safe_serialization=True)
        del big
        widths = tuple(int(w) for w in args.small_widths.split(","))
        small = None
        if any(e > args.limit_gb * 1e9 for e in estimates.values()):
            small = sd14_pipeline(sample_size=16, block_out_channels=widths)
            sizes["small"] = model_bytes(small)
            small.save_pretrained(f"{tmp}/small", safe_serialization=True)
            del small
        print("models (fp32): " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sizes.items())
              + f"; small UNet widths {widths}; latent 16 x 16 (128 px); {args.threads} threads")
        columns = [*dtypes] + (["fp32 + checkpointing"] if args.with_checkpointing else []) + \
            (["fp32 + 8-bit Adam"] if eight_bit else [])
        print()
        print("| method | model | estimate at SD 1.4 (fp32) | " + " | ".join(columns) + " |")
        print("|---|---|---|" + "---|" * len(columns))
        for m in methods:
            where = "small" if estimates[m] > args.limit_gb * 1e9 else "SD 1.4"
            model = f"{tmp}/{'small' if where == 'small' else 'sd14'}"
            results = [run(m, model, d, args.threads) for d in dtypes]
            if args.with_checkpointing:
                results.append(run(m, model, "fp32", args.threads, checkpointing=True))
            if eight_bit:
                results.append(run(m, model, "fp32", args.threads, eight_bit=True))
            print(f"| {m} | {where} | {estimates[m] / 1e9:.1f} GB | " + " | ".join(cell(r) for r in results) + " |",
                  flush=True)
    if not eight_bit:
        print("\n8-bit Adam: bitsandbytes is not installed here; not measured")


if __name__ == "__main__":
    main()
