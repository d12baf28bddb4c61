"""``efface demo``: erase a toy concept with UCE and ESD, evaluate both against the base model,
write the report, in about two minutes on 2 CPU cores (measured by ``bench/demo_time.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from efface.benchmark.grid import BenchConfig
from efface.evaluation import EvalConfig


@dataclass
class DemoConfig:
    """What the demo runs: two methods, one concept, an evaluation sized for two minutes."""

    concept: str = field(default="circle", metadata={"help": "toy concept to erase"})
    methods: str = field(default="uce,esd-u", metadata={"help": "comma-separated methods"})
    esd_iterations: int = field(default=100, metadata={"help": "ESD iterations (its toy preset: 150)"})
    esd_lr: float = field(default=1.5e-4, metadata={"help": "ESD learning rate (its toy preset: 1.5e-4)"})
    n: int = field(default=16, metadata={"help": "prompts per effectiveness group"})
    n_other: int = field(default=6, metadata={"help": "prompts per other concept"})
    steps: int = field(default=20, metadata={"help": "denoising steps of the evaluation images"})

    def bench(self) -> BenchConfig:
        return BenchConfig(methods=self.methods, concepts=self.concept, multi_concept=False)

    def evaluation(self) -> EvalConfig:
        return EvalConfig(n=self.n, n_other=self.n_other, steps=self.steps)

    def options(self) -> dict[str, dict]:
        """ESD's shorter schedule: fewer iterations at a larger step (same target, same layers)."""
        esd = {"iterations": self.esd_iterations, "lr": self.esd_lr}
        return {m: esd for m in ("esd-x", "esd-x-strict", "esd-u", "esd-all")}
