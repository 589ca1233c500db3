"""The run config: shipped configs load with the paper's defaults; bad values name the key
and what is accepted; stages skip, resume and redo by the hashes of their inputs."""
import json
import re

import pytest

from meddap.cli import main
from meddap.errors import MeddapError
from meddap.fid import FeatureSpace
from meddap.pipeline.config import DataSource, config_from_dict, load_config
from meddap.pipeline.stages import Stage, tree_sha256


def test_shipped_configs_load():
    busi = load_config("busi-sd14")
    assert busi.data.source is DataSource.FOLDER and busi.data.folds == 5
    assert (busi.data.val, busi.data.test) == (115, 120)            # paper: 545 / 115 / 120
    assert (busi.lora.rank, busi.lora.lr, busi.lora.batch_size, busi.lora.epochs, busi.lora.resolution) == \
        (4, 1e-4, 1, 100, 224)                                        # paper_facts.md, Diffusion model
    assert busi.lora.targets == "cross" and busi.generate.ratios == (0.5, 1.0, 2.0)
    assert len(busi.generate.adjectives) == 10 and busi.generate.adjectives[0] == "none"
    assert (busi.generate.sampler.value, busi.generate.steps, busi.generate.guidance) == ("pndm", 30, 7.5)
    demo = load_config("demo")
    assert demo.data.source is DataSource.PHANTOM and demo.fid.features is FeatureSpace.AUTO
    assert demo.lora.checkpoint == "weights/tiny/tiny-sd.safetensors"
    assert load_config("demo-fast").run.name == "demo-fast"


@pytest.mark.parametrize("raw, words", [
    ({"data": {"source": "web"}}, ["[data] source", "'web'", "'phantom'", "'folder'"]),
    ({"generate": {"sampler": "euler"}}, ["[generate] sampler", "'euler'", "'ddim'", "'pndm'", "'ddpm'"]),
    ({"classify": {"networks": ["vgg16"]}}, ["[classify] networks", "'vgg16'", "'resnet34'", "'squeezenet1.1'",
                                             "'densenet121'"]),
    ({"fid": {"features": "clip"}}, ["[fid] features", "'inception'", "'pixels'", "'auto'"]),
    ({"generate": {"ratios": [0.5, -1]}}, ["[generate] ratios", "> 0"]),
    ({"lora": {"rank": 0}}, ["[lora] rank", "0", "from 1 to 1024"]),
    ({"lora": {"rank": "four"}}, ["[lora] rank", "'four'", "whole number"]),
    ({"lora": {"resolution": 100}}, ["[lora] resolution", "100", "multiple of 8"]),
    ({"data": {"phantom_counts": {"cyst": 3}}}, ["[data] phantom_counts", "cyst", "benign / malignant / normal"]),
    ({"lora": {"rnak": 4}}, ["unknown key [lora] rnak", "rank", "targets"]),
    ({"loras": {}}, ["unknown section [loras]", "[lora]", "[generate]"]),
    ({"lora": {"cache_latents": "yes"}}, ["[lora] cache_latents", "true or false"]),
])
def test_bad_values_name_key_and_allowed(raw, words):
    with pytest.raises(MeddapError) as e:
        config_from_dict(raw, "my.toml")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_cli_reports_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[generate]\nsampler = "euler"\n')
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "[generate] sampler = 'euler' is not allowed" in err and "'pndm'" in err
    broken = tmp_path / "broken.toml"
    broken.write_text("[run\n")
    assert main(["run", str(broken)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "demo, demo-fast" in capsys.readouterr().err


def test_stage_skips_resumes_and_redoes(tmp_path):
    log = []
    st = Stage(tmp_path / "s", "s", {"a": 1}, log.append)
    assert not st.done()                                   # first run
    (st.folder / "out.txt").write_text("x")
    assert not Stage(tmp_path / "s", "s", {"a": 1}, log.append).done()    # killed before finish: resume
    assert "resuming" in log[-1] and (st.folder / "out.txt").exists()
    record = st.finish()
    assert record["outputs_sha256"] == tree_sha256(st.folder)
    assert json.loads((st.folder / "stage.json").read_text())["inputs"] == {"a": 1}
    again = Stage(tmp_path / "s", "s", {"a": 1}, log.append)
    assert again.done() and again.outputs_sha256 == record["outputs_sha256"]
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "image.png").write_text("old")
    changed = Stage(tmp_path / "s", "s", {"a": 2}, log.append, owns=(tmp_path / "elsewhere",))
    assert not changed.done() and "inputs changed" in log[-2]
    assert not (st.folder / "out.txt").exists()            # redone from scratch,
    assert not (tmp_path / "elsewhere").exists()           # with the outputs it owns elsewhere


@pytest.mark.parametrize("cls_path, field, value, command, section", [
    ("meddap.lora.train:LoRARunConfig", "rank", 7, ["train-lora"], "lora"),
    ("meddap.sampling.generation:GenerationConfig", "steps", 17, ["expand"], "generate"),
    ("meddap.classify.train:TrainConfig", "epochs", 9, ["classify", "train"], "classify"),
    ("meddap.data.splits:SplitConfig", "val", 11, ["split"], "data"),
    ("meddap.fid.config:FidConfig", "kid_subsets", 13, ["fid"], "fid"),
])
def test_a_default_is_declared_once(monkeypatch, capsys, cls_path, field, value, command, section):
    """Change one default in the stage's dataclass: the command's --help and the TOML reader both see it."""
    import dataclasses
    import importlib

    module, name = cls_path.split(":")
    cls = getattr(importlib.import_module(module), name)
    monkeypatch.setattr(cls.__dataclass_fields__[field], "default", value)
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    flag = "--" + field.replace("_", "-")
    assert re.search(re.escape(flag) + r" [A-Z_]+ (?:(?! --).)*?" + re.escape(f"(default: {value})"), text), text
    cfg = config_from_dict({})
    assert getattr(getattr(cfg, section), field) == value
    assert dataclasses.fields(getattr(cfg, section))      # a dataclass section, not a parallel copy


TINY = "weights/tiny/tiny-sd.safetensors"


@pytest.mark.parametrize("raw, words", [
    ({"data": {"source": "phantom", "phantom_counts": {"benign": 5, "malignant": 5}, "val": 4, "test": 6}},
     ["[data] val = 4 and [data] test = 6 leave no training images of the 10"]),
    ({"lora": {"checkpoint": "{junk}"}}, ["[lora] checkpoint = ", "junk.safetensors", "not a safetensors file"]),
    ({"fid": {"features": "inception", "inception_weights": "{missing}"}}, ["[fid] features = \"inception\""]),
])
def test_run_checks_its_files_and_sizes_before_any_work(tmp_path, raw, words):
    from meddap.pipeline.run import run

    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    base = {"data": {"source": "phantom", "phantom_size": 32,
                     "phantom_counts": {"benign": 10, "malignant": 10}, "val": 2, "test": 2},
            "lora": {"checkpoint": TINY}}
    for section, keys in raw.items():
        base[section] = {**base.get(section, {}), **{k: v.replace("{junk}", str(tmp_path / "junk.safetensors"))
                                                     .replace("{missing}", str(tmp_path / "none.pth"))
                                                     if isinstance(v, str) else v for k, v in keys.items()}}
    cfg = config_from_dict(base, "my.toml")
    with pytest.raises(MeddapError) as e:
        run(cfg, tmp_path / "out")
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not (tmp_path / "out").exists()


def test_the_check_stage_holds_one_model_at_a_time(tmp_path, monkeypatch):
    """stage_check loads the adapted base, writes its images, and lets it go before loading the
    unadapted base: on a GPU two SD models at once would not fit where one does."""
    import gc
    import weakref

    import meddap.sampling.generation as generation
    from meddap.pipeline import run as pipeline_run

    alive, loaded = [], []

    class FakeModel:
        pass

    def load_model(checkpoint, lora=None, device=None, dtype="fp32"):
        gc.collect()
        loaded.append(sum(r() is not None for r in alive))          # models still alive at this load
        model = FakeModel()
        alive.append(weakref.ref(model))
        return model

    monkeypatch.setattr(generation, "load_model", load_model)
    monkeypatch.setattr(generation, "write_images", lambda sd, gen, jobs, folder, **kw: None)
    cfg = config_from_dict({"lora": {"checkpoint": TINY}, "generate": {"check_images": 1}})
    ctx = pipeline_run.Context(cfg=cfg, out=tmp_path, checkpoint=tmp_path / "sd.safetensors", base_sha256="0")
    lora = pipeline_run.Adapter(path=tmp_path / "lora.safetensors", sha256="1")
    split = pipeline_run.Split(path=str(tmp_path / "split.json"), sha256="2")
    assert pipeline_run.stage_check(ctx, ["benign"], split, lora, work=True) is None  # nothing written: not finished
    assert loaded == [0, 0]
