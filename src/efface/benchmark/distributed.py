"""One bench, several processes: ``accelerate launch --num_processes N -m efface bench ...``.

The processes find each other through accelerate's process state (``PartialState``: NCCL on GPUs,
gloo on CPUs, e.g. ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m efface bench ...``). The
work is split twice:

1. **Cells across processes.** The main process reads the cell cache and says which cells are left;
   they are dealt round-robin, and each process fits the erasures of its cells at the same time as
   the others, each saved under ``out/artifacts/<cell>/`` with the cell's key beside it
   (``<cell>.key``), so a killed run refits only what it had not saved.
2. **Prompts of a cell across processes.** Every cell is then evaluated by all processes: each
   generates every ``world``-th image (its own seed, so the image is the one a single process
   makes), the images are gathered (as PNG bytes, lossless) and the main process judges them, runs
   the cell's attacks and writes the cell, with ``"process"``: the process that fitted it. An
   erasure is fitted once and shared: a process that does not find the artifact on its own disk
   receives its files from the process that fitted it.

The numbers equal those of one process with the same seeds wherever the images are the same (the
erasure is the same fit; a batch made of other images can move a pixel by one level on CPU, see
:mod:`efface.sampling`). ``results.json`` records ``"processes"``.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TIMEOUT = timedelta(hours=12)  # a process may wait this long for another's fit or attacks


def _world_from_env() -> int:
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


class Shard:
    """This process's part of a run of several (``rank`` of ``world``)."""

    def __init__(self, state):
        self.state = state
        self.rank, self.world = state.process_index, state.num_processes
        self.is_main = state.is_main_process
        self.device = state.device

    @classmethod
    def current(cls) -> Shard | None:
        """The process group a launcher started (None for one process)."""
        if _world_from_env() <= 1:
            return None
        import torch
        from accelerate import PartialState

        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
        state = PartialState(cpu=cpu, timeout=TIMEOUT)
        if state.num_processes <= 1:
            return None
        if cpu:  # the cores shared by the processes on this machine
            local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        return cls(state)

    def indices(self, n: int) -> range:
        """This process's share of ``n`` items: every ``world``-th from ``rank``."""
        return range(self.rank, n, self.world)

    def gather_images(self, images: list) -> list:
        """Every process's images (None where another process made it) put together, on every process."""
        from accelerate.utils import gather_object
        from PIL import Image

        mine = []
        for i, im in enumerate(images):
            if im is not None:
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                mine.append((i, buf.getvalue()))
        out = list(images)
        for i, data in gather_object(mine):
            out[i] = Image.open(io.BytesIO(data)).convert("RGB")
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of process ``src``, on every process."""
        from accelerate.utils import broadcast_object_list

        box = [obj if self.rank == src else None]
        broadcast_object_list(box, from_process=src)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every process's ``obj``, in process order, on every process."""
        from accelerate.utils import gather_object

        return gather_object([obj])

    def barrier(self) -> None:
        self.state.wait_for_everyone()


def _artifact(out: Path, name: str) -> tuple[Path, Path]:
    return out / "artifacts" / name, out / "artifacts" / f"{name}.key"


def _saved(out: Path, cell) -> bool:
    folder, key = _artifact(out, cell.name)
    return folder.is_dir() and key.is_file() and key.read_text() == cell.key


def _fit(pipe, out: Path, cell, *, preset: str, seed: int, options: dict) -> None:
    """Fit the cell's erasure and save it with its key (unless it is saved already)."""
    from efface.benchmark.grid import fit_cell
    from efface.io import atomic_file

    if _saved(out, cell):
        log.info("bench: %s's erasure found in %s", cell.name, _artifact(out, cell.name)[0])
        return
    folder, key = _artifact(out, cell.name)
    fit_cell(pipe, cell, preset=preset, seed=seed, options=options).save(folder, overwrite=True)
    with atomic_file(key) as tmp:
        tmp.write_text(cell.key)


def _shared_artifact(out: Path, cell, owner: int, shard: Shard):
    """The cell's erasure on every process: from its own disk, or the owner's files sent over."""
    from efface.artifacts import ErasedModel

    have = _saved(out, cell)
    needed = any(not h for h in shard.gather(have))
    files = None
    if needed:
        folder = _artifact(out, cell.name)[0]
        files = shard.broadcast({str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
                                if shard.rank == owner else None, src=owner)
    if have:
        return ErasedModel.load(_artifact(out, cell.name)[0]), None
    tmp = Path(tempfile.mkdtemp(prefix="efface-artifact-"))
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    return ErasedModel.load(tmp), tmp


def run_cells(pipe, out: Path, cells: list, shard: Shard, *, options: dict, preset: str, config, seed: int,
              attack_prompts: int, progress: bool) -> list[dict[str, Any]]:
    """Every cell of ``cells`` by all processes (see the module docstring); the cells on the main
    process, [] on the others."""
    from tqdm.auto import tqdm

    from efface.benchmark.grid import cached_cell, finish_cell

    cached = {c.name: cached_cell(out, c.name, c.key) for c in cells} if shard.is_main else {}
    pending = shard.broadcast([c.name for c in cells if cached[c.name] is None] if shard.is_main else None)
    owner = {name: i % shard.world for i, name in enumerate(pending)}
    mine = [c for c in cells if owner.get(c.name) == shard.rank and c.method is not None]
    for cell in tqdm(mine, desc=f"fits (process {shard.rank})", disable=not progress):
        _fit(pipe, out, cell, preset=preset, seed=seed, options=options.get(cell.method, {}))
    shard.barrier()
    results, base_cache = [], {}
    for cell in tqdm(cells, desc="bench cells", disable=not progress or not shard.is_main):
        if cell.name not in owner:
            results.append(cached.get(cell.name))
            continue
        erased, tmp = (None, None) if cell.method is None else _shared_artifact(out, cell, owner[cell.name], shard)
        try:
            results.append(finish_cell(pipe, out, cell, erased, config=config, seed=seed, attack_prompts=attack_prompts,
                                       base_cache=base_cache, shard=shard, process=owner[cell.name]))
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    shard.barrier()
    return results if shard.is_main else []
