"""scripts/demo_seeds.py: the per-seed configs (both seeds set, overrides checked like a run
config's keys) and the check table, on fabricated summaries (the runs themselves are the
pipeline's, tested in test_pipeline_demo.py)."""
import importlib.util
import json
from pathlib import Path

import pytest

from meddap.errors import MeddapError
from meddap.pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("demo_seeds", REPO / "scripts" / "demo_seeds.py")
demo_seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_seeds)


def test_each_seed_sets_run_and_lora_seed_and_the_overrides_apply():
    shipped = load_config("demo-fast")
    configs = demo_seeds.seed_configs("demo-fast", [0, 1, 2], ["classify.size=32",
                                                               'lora.targets=["*.attn2.*"]'])
    assert [(c.run.seed, c.lora.seed, c.classify.seed) for c in configs] == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]
    for c in configs:
        assert c.classify.size == 32 and list(c.lora.targets) == ["*.attn2.*"]
        assert c.lora.epochs == shipped.lora.epochs and c.lora.lr == shipped.lora.lr
        assert c.generate.check_images == shipped.generate.check_images
        assert c.data.phantom_counts == shipped.data.phantom_counts
    assert shipped.classify.size != 32                  # the override changed something


@pytest.mark.parametrize("item,pattern", [
    ("lora.rank=-1", r"\[lora\] rank = -1 is out of range"),
    ("classify.size", r"--set 'classify.size': write SECTION.KEY=VALUE"),
    ("size=32", r"--set 'size=32': write SECTION.KEY=VALUE"),
    ("lora.checkpoint=weights/x", r"'weights/x' is not a TOML value .*strings need quotes"),
    ("lora.nope=1", r"\[lora\] .*nope"),
])
def test_a_bad_override_is_an_error_naming_it(item, pattern):
    with pytest.raises(MeddapError, match=pattern):
        demo_seeds.seed_configs("demo-fast", [0], [item])


def test_main_checks_every_config_before_running_anything(tmp_path, capsys):
    assert demo_seeds.main(["demo-fast", "--work", str(tmp_path / "w"), "--set", "lora.lr=0"]) == 2
    assert "[lora] lr = 0" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def _summary(out: Path, adapted: float, base: float, confusion, spread: float) -> None:
    (out / "fold0" / "classify").mkdir(parents=True)
    (out / "fold0" / "classify" / "summary.json").write_text(json.dumps({"check": {
        "resnet34/adapted": {"accuracy": adapted, "confusion": confusion},
        "resnet34/base": {"accuracy": base, "confusion": [[1, 0], [0, 1]]}},
        "spread": {"adapted": {"all": spread, "a": spread}, "base": {"all": 0.5, "a": 0.5}}}))


def test_the_table_gives_each_seed_then_min_mean_and_max(tmp_path):
    _summary(tmp_path / "s0", 0.8, 0.3, [[9, 1], [2, 8]], 0.02)
    _summary(tmp_path / "s1", 0.6, 0.4, [[5, 5], [3, 7]], 0.05)
    rows = [demo_seeds.check_row(0, tmp_path / "s0", 100.04), demo_seeds.check_row(1, tmp_path / "s1", 90.0)]
    assert rows[0] == {"seed": 0, "seconds": 100.0, "resnet34/adapted": 0.8,
                       "resnet34/adapted_confusion": [[9, 1], [2, 8]], "resnet34/base": 0.3,
                       "adapted_spread": 0.02}
    lines = demo_seeds.table(rows).splitlines()
    assert lines[0] == ("| seed | resnet34/adapted | resnet34/base | adapted channel spread | adapted confusion "
                        "| wall s |")
    assert lines[2] == "| 0 | 80.0% | 30.0% | 0.020 | [[9, 1], [2, 8]] | 100 |"
    assert lines[3] == "| 1 | 60.0% | 40.0% | 0.050 | [[5, 5], [3, 7]] | 90 |"
    assert lines[4] == "| min | 60.0% | 30.0% | 0.020 | | |"
    assert lines[5] == "| mean | 70.0% | 35.0% | 0.035 | | |"
    assert lines[6] == "| max | 80.0% | 40.0% | 0.050 | | |"


def test_a_missing_or_broken_config_is_the_run_configs_own_error(tmp_path):
    # The config is read by meddap.pipeline.config.read_config_toml, as `meddap run` reads it.
    with pytest.raises(MeddapError, match=r"does not exist; give a TOML file or a shipped config \(busi-sd14"):
        demo_seeds.seed_configs(str(tmp_path / "absent.toml"), [0], [])
    broken = tmp_path / "broken.toml"
    broken.write_text("[run\n")
    with pytest.raises(MeddapError, match=r"broken.toml is not valid TOML"):
        demo_seeds.seed_configs(str(broken), [0], [])
