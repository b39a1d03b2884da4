"""``bench.lorweb_curve``: a LoRWeB row trained with step exports, each measured as the row measures its final basis.
The reference is the yardstick itself: the curve's last point must equal the row's own JSON for the same run."""

from __future__ import annotations

import json
import shutil

import pytest

from bench import lorweb_curve
from training import checkpoints as ckpt
from training.world.yardstick.runner import main as yardstick
from world_fixtures import SEED, quick_world

STEPS, EVERY = 4, 2
FIGURES = ("edited_cells", "kept_cells", "error_over_no_edit")


@pytest.fixture(scope="module")
def short_row(tmp_path_factory):
    """The quick LoRWeB row at 4 steps with an export every 2, through the yardstick's command: (its JSON, the run)."""
    quick_world()
    out = tmp_path_factory.mktemp("curve")
    report = yardstick(["--methods", "lorweb", "--quick", "--no-ceilings", "--seed", str(SEED), "--examples", "1",
                        "--out", str(out), "--row-set", f"max_steps={STEPS}", "--row-set", f"checkpoint_every={EVERY}",
                        "--row-set", "learning_rate=0.05", "--row-set", "keep_exports=true"])
    return report["methods"]["lorweb"], out / "lorweb" / "train"


def test_the_curve_ends_at_the_rows_own_figures(short_row, tmp_path):
    row, run = short_row
    assert [step for step, _ in ckpt.step_exports(run, "lorweb_basis.safetensors")] == [2, 4]
    report = lorweb_curve.main(["--run", str(run), "--quick", "--seed", str(SEED), "--examples", "1",
                                "--json", str(tmp_path / "curve.json")])
    assert json.loads((tmp_path / "curve.json").read_text()) == report
    assert report["run"].startswith("…/") and report["run"].endswith("lorweb/train")  # no machine's path
    first, last = report["curve"]
    assert (first["step"], last["step"]) == (2, 4)
    for family, figures in row["families"].items():
        assert {k: last["families"][family][k] for k in FIGURES} == {k: figures[k] for k in FIGURES}, family
    for key in lorweb_curve.SUMMARY:
        assert last[key] == row["extra"][key], key
    # the step matters: step 2's basis draws a different B′ (else the comparison above proves nothing)
    assert any(first["families"][f]["error_over_no_edit"] != last["families"][f]["error_over_no_edit"]
               for f in row["families"])


def test_a_run_without_exports_or_of_another_world_is_refused(short_row, tmp_path):
    _, run = short_row
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "config.json", bare / "config.json")
    with pytest.raises(SystemExit, match="no step exports"):
        lorweb_curve.main(["--run", str(bare), "--quick", "--seed", str(SEED)])
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run, elsewhere)
    config = json.loads((elsewhere / "config.json").read_text())
    (elsewhere / "config.json").write_text(json.dumps({**config, "backbone": f"world:{tmp_path / 'other-world'}"}))
    with pytest.raises(SystemExit, match="not on this world"):
        lorweb_curve.main(["--run", str(elsewhere), "--quick", "--seed", str(SEED)])
