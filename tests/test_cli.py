"""The command line, end to end on real (tiny or bundled) pipelines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from efface.cli import main
from efface.errors import InputError
from efface.sampling import GenerationConfig, make_grid
from efface.toy import TOY_SD

ROOT = Path(__file__).resolve().parents[1]


def _generate(model, out, *extra):
    return main(["-q", "generate", "--model", str(model), "--prompt", "a red circle", "--num-images", "3",
                 "--steps", "2", "--seed", "5", "--out", str(out), *extra])


def test_generate_writes_pngs_grid_and_settings(tiny_sd_dir, tmp_path):
    assert _generate(tiny_sd_dir, tmp_path / "a") == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["000.png", "001.png", "002.png", "generation.json", "grid.png"]
    meta = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert meta["seed"] == 5 and meta["steps"] == 2 and meta["prompt"] == "a red circle"


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_same_seed_gives_byte_identical_pngs_and_batching_does_not_matter(tiny_sd_dir, tmp_path):
    """Same seed and batch size: byte-identical PNGs. Across batch sizes CPU BLAS may sum in
    another order (kernels are chosen by matrix shape), so there the images agree to within one
    or two levels per pixel, not bit for bit (sampling.py's docstring)."""
    _generate(tiny_sd_dir, tmp_path / "a")
    _generate(tiny_sd_dir, tmp_path / "a2")
    _generate(tiny_sd_dir, tmp_path / "b", "--batch-size", "1")
    _generate(tiny_sd_dir, tmp_path / "c", "--seed", "6", "--batch-size", "1")
    for name in ("000.png", "001.png", "002.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "a2" / name).read_bytes()
        assert np.abs(_pixels(tmp_path / "a" / name) - _pixels(tmp_path / "b" / name)).max() <= 2
    # image i uses seed + i: seed 6's first image is seed 5's second (both drawn in batches of 1)
    assert (tmp_path / "c" / "000.png").read_bytes() == (tmp_path / "b" / "001.png").read_bytes()


def test_existing_output_is_refused_unless_overwrite(tiny_sd_dir, tmp_path, caplog):
    _generate(tiny_sd_dir, tmp_path / "a")
    before = (tmp_path / "a" / "000.png").read_bytes()
    assert _generate(tiny_sd_dir, tmp_path / "a") == 2
    assert "already exists" in caplog.text
    assert (tmp_path / "a" / "000.png").read_bytes() == before
    assert _generate(tiny_sd_dir, tmp_path / "a", "--overwrite", "--seed", "9") == 0


def test_bad_sampling_options_fail_before_loading(tmp_path, caplog):
    code = main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x", "--steps", "0",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "steps must be at least 1" in caplog.text
    with pytest.raises(InputError):
        GenerationConfig(height=30)


@pytest.mark.skipif(not (TOY_SD / "model_index.json").exists(), reason="bundled toy-sd not present")
def test_generate_with_the_bundled_toy_model(tmp_path):
    assert main(["-q", "generate", "--model", "toy", "--prompt", "a blue square", "--num-images", "2",
                 "--steps", "5", "--out", str(tmp_path / "toy")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "toy" / "000.png").size == (32, 32)


def test_list_prints_every_kind(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "methods:" in out and "attacks:" in out and "metrics:" in out
    uce = out[out.index("  uce "):]
    assert "families: sd, sdxl, sd3, flux" in uce[: uce.index("--set")]
    assert "protocols:" in out and "  nudity " in out and "prompt sets (--prompt-set): i2p" in out
    assert main(["list", "protocols"]) == 0
    assert capsys.readouterr().out.startswith("protocols:\n  nudity")


def test_help_everywhere(capsys):
    for argv in (["--help"], ["generate", "--help"], ["list", "--help"], ["toy", "train", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    assert "--unet-steps" in capsys.readouterr().out


def test_make_grid_tiles_images():
    from PIL import Image

    grid = make_grid([Image.new("RGB", (4, 4))] * 5, cols=3, pad=1)
    assert grid.size == (3 * 5 + 1, 2 * 5 + 1)


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.search(r"^python -m pip install (.+)$", ci, re.M).group(1)
    assert f"pip install {install} &&" in readme
    assert "apt-get install -y chromium" in ci and "`apt-get install -y chromium`" in readme
    test_cmd = re.search(r"^(python -m pytest.*)$", ci, re.M).group(1)
    assert f"```bash\n{test_cmd}\n```" in readme


@pytest.mark.skipif(not (TOY_SD / "model_index.json").exists(), reason="bundled toy-sd not present")
def test_readme_python_example_runs():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert len(namespace["images"]) == 4
