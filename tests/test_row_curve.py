"""``bench.row_curve``: a row trained with step exports, each export measured as the row measures its final file.
The reference is the yardstick itself: the curve's last point must equal the row's own JSON for the same run.

LoRWeB's row runs on the session's quick world; Edit Transfer's and LoRA of Change's on quick worlds whose backbone
(FLUX.1-dev-like, InstructPix2Pix-like) is pretrained for only 20 steps (``--world-set flux_dev.steps=20``, a folder
of its own): the test is about measuring the same thing twice, not about what the backbone draws, and the full quick
backbones would cost the suite minutes.
"""

from __future__ import annotations

import json
import shutil

import pytest
from world_fixtures import SEED, quick_world

from bench import row_curve
from training import checkpoints as ckpt
from training.world.yardstick.runner import METHODS
from training.world.yardstick.runner import main as yardstick

STEPS, EVERY = 4, 2
FIGURES = ("edited_cells", "kept_cells", "error_over_no_edit")
# per row: the arguments that make its quick row tiny (the world, a learning rate at which 2 steps move the file)
ROW_ARGS = {"lorweb": ["--row-set", "learning_rate=0.05"],
            "edit_transfer": ["--world-set", "flux_dev.steps=20", "--row-set", "learning_rate=0.05"],
            "loc": ["--world-set", "instruct_pix2pix.steps=20", "--row-set", "learning_rate=0.01"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """row -> (its JSON, the run): a quick row at 4 steps with an export every 2, through the yardstick's command,
    trained once per module."""
    runs: dict[str, tuple[dict, object]] = {}

    def train(row: str):
        if row not in runs:
            quick_world()
            out = tmp_path_factory.mktemp(f"curve-{row}")
            report = yardstick(["--methods", row, "--quick", "--no-ceilings", "--seed", str(SEED), "--examples", "1",
                                "--out", str(out), "--row-set", f"max_steps={STEPS}",
                                "--row-set", f"checkpoint_every={EVERY}", "--row-set", "keep_exports=true",
                                *ROW_ARGS[row]])
            runs[row] = report["methods"][row], out / row / "train"
        return runs[row]

    return train


@pytest.fixture(params=sorted(ROW_ARGS))
def short_row(request, trained):
    """(row, its JSON, the run) for each row with a curve test."""
    return (request.param, *trained(request.param))


def test_the_curve_ends_at_the_rows_own_figures(short_row, tmp_path):
    row, figures, run = short_row
    assert [step for step, _ in ckpt.step_exports(run, METHODS[row].curve.artifact)] == [2, 4]
    report = row_curve.main(["--row", row, "--run", str(run), "--examples", "1", "--json", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text()) == report
    assert report["run"].startswith("…/") and report["run"].endswith(f"{row}/train")  # no machine's path
    assert (report["row"], report["seed"]) == (row, SEED) and report["world"].startswith("v2-quick-s0")
    first, last = report["curve"]
    assert (first["step"], last["step"]) == (2, 4)
    for family, measured in figures["families"].items():
        assert {k: last["families"][family][k] for k in FIGURES} == {k: measured[k] for k in FIGURES}, family
    for key in row_curve.SUMMARY:
        assert last[key] == figures["extra"][key], key
    # the step matters: step 2's file draws a different B′ (else the comparison above proves nothing)
    assert any(first["families"][f]["error_over_no_edit"] != last["families"][f]["error_over_no_edit"]
               for f in figures["families"])


def test_a_run_without_exports_of_another_world_or_row_is_refused(short_row, tmp_path):
    row, _, run = short_row
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "config.json", bare / "config.json")
    with pytest.raises(SystemExit, match="no step exports"):
        row_curve.main(["--row", row, "--run", str(bare)])
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run, elsewhere)
    config = json.loads((elsewhere / "config.json").read_text())
    (elsewhere / "config.json").write_text(json.dumps({**config, "backbone": f"world:{tmp_path / 'no-world'}"
                                                       + ("/flux_dev" if row == "edit_transfer" else "")}))
    with pytest.raises(SystemExit, match="cannot be used: .*not a built analogy world"):
        row_curve.main(["--row", row, "--run", str(elsewhere)])
    (elsewhere / "config.json").write_text(json.dumps({**config, "backbone": "black-forest-labs/FLUX.1-dev"}))
    with pytest.raises(SystemExit, match=f"not a run of row {row}: .*not on an analogy world"):
        row_curve.main(["--row", row, "--run", str(elsewhere)])


def test_an_edit_transfer_run_is_measured_only_as_the_row_it_was_trained_for(trained):
    _, run = trained("edit_transfer")  # Edit Transfer's rows share one trainer: a run of one can pass for another
    with pytest.raises(SystemExit, match="not a run of row edit_transfer_textfree: .*text_free=False"):
        row_curve.main(["--row", "edit_transfer_textfree", "--run", str(run), "--examples", "1"])


def test_a_loc_ceiling_run_is_not_measured_as_the_row(trained, tmp_path):
    _, run = trained("loc")  # a ceiling's run (plain LoRA or whole UNet) has no hypernetwork for the row to sample
    config = json.loads((run / "config.json").read_text())
    for key in ("plain_lora", "full_finetune"):
        ceiling = tmp_path / key
        shutil.copytree(run, ceiling)
        (ceiling / "config.json").write_text(json.dumps({**config, key: True}))
        with pytest.raises(SystemExit, match=f"not a run of row loc: .*{key}=true"):
            row_curve.main(["--row", "loc", "--run", str(ceiling), "--examples", "1"])
