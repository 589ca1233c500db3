"""Progress output: off a terminal a bar prints plain lines, at most 20 per bar
(one per 5% of its total, the last one from close()) and never a "\\r"; on a
terminal it redraws in place at most 4 times a second; stages log a start and a
finish line with their times; the classifier and Grad-CAM loops draw bars."""
import io
import os
import re
import time

from meddap import progress as progress_mod
from meddap.progress import Progress, progress


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A stand-in for time.monotonic that moves only when told."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_no_tty_bar_of_1000_updates_prints_at_most_21_lines():
    """The issue's bound: no-TTY output stays under 21 lines; it is 20 (5%, ..., 95%, close)."""
    stream = io.StringIO()
    bar = Progress(total=1000, desc="work", stream=stream)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert len(lines) == 20 <= 21
    assert [int(re.search(r"\] (\d+)/1000", line).group(1)) for line in lines] == \
        [50 * k for k in range(1, 20)] + [1000]
    assert all(line.startswith("work [") for line in lines)


def test_no_tty_bar_counts_its_steps_from_a_resumed_start_and_from_big_updates():
    stream = io.StringIO()
    bar = Progress(total=1000, initial=500, stream=stream)     # resumed halfway: 55% ... 95%, close
    for _ in range(500):
        bar.update(1)
    bar.close()
    assert len(stream.getvalue().splitlines()) == 10
    stream = io.StringIO()
    bar = Progress(total=10, stream=stream)                     # each update passes two 5% steps
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert len(stream.getvalue().splitlines()) == 10            # one line per update at most


def test_no_tty_bar_without_a_total_prints_one_line_per_10_seconds(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_mod.time, "monotonic", clock)
    stream = io.StringIO()
    bar = Progress(stream=stream, desc="scan")
    for _ in range(100):                                        # 100 s, one update a second
        clock.now += 1.0
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and "\r" not in stream.getvalue()  # at 10, 20, ..., 100 s, and close
    assert lines[0].startswith("scan 10 00:10") and lines[-1].startswith("scan 100 01:40")


def test_tty_bar_redraws_in_place_at_most_4_times_a_second(monkeypatch):
    clock = Clock(1000.0)
    monkeypatch.setattr(progress_mod.time, "monotonic", clock)
    stream = TTY()
    bar = Progress(total=100, stream=stream)
    for _ in range(100):                                        # 1 s in steps of 10 ms
        clock.now += 0.01
        bar.update(1)
    bar.close()
    text = stream.getvalue()
    # draws at 0.01, 0.26, 0.51, 0.76 s (<= 0.25 s apart), then close's
    assert text.count("\r") == 5 and text.count("\n") == 1 and text.endswith("100/100 00:01<00:00 100.00/s\n")


def test_disabled_bars_are_silent_on_any_stream():
    for stream in (io.StringIO(), TTY()):
        bar = Progress(total=10, stream=stream, enabled=False)
        for _ in range(10):
            bar.update(1)
        bar.close()
        assert stream.getvalue() == ""


def test_progress_wraps_an_iterable_on_stderr(capsys):
    assert list(progress(range(1000), desc="items")) == list(range(1000))
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 20 and "\r" not in err and "1000/1000" in err.splitlines()[-1]


def test_stage_logs_its_start_and_finish_with_times(tmp_path):
    from meddap.pipeline.stages import STARTED, Stage

    log = []
    run_t0 = time.monotonic() - 75.2                            # the run started 01:15 ago
    st = Stage(tmp_path / "s", "fold0/lora", {"a": 1}, log.append, run_t0=run_t0)
    assert not st.done()
    assert log == ["[fold0/lora] running (01:15 into the run)"]
    started = st.folder / STARTED
    os.utime(started, (time.time() - 34.2,) * 2)                # the stage started 00:34 ago
    st.finish()
    assert log[-1] == "[fold0/lora] finished in 00:34 (01:15 into the run)"
    os.utime(started, (time.time() - 34.2,) * 2)
    later = Stage(tmp_path / "s", "fold0/lora", {"a": 1}, log.append, run_t0=run_t0 - 60)
    later.finish()                                              # another process finishes it
    assert log[-1] == "[fold0/lora] finished in 00:34 (02:15 into the run)"
    (tmp_path / "s" / "stage.json").unlink()
    assert not Stage(tmp_path / "s", "fold0/lora", {"a": 1}, log.append, run_t0=run_t0).done()
    assert log[-1] == "[fold0/lora] resuming an interrupted run (01:15 into the run)"


def test_classifier_and_gradcam_draw_bars_over_batches_and_images(tmp_path, capsys):
    from meddap.classify.gradcam import write_gradcam_panels
    from meddap.classify.networks import Arch
    from meddap.classify.train import TrainConfig, train_classifier
    from meddap.data.phantom import write_phantom

    data = tmp_path / "data"
    write_phantom(data, seed=0, size=32, counts={"benign": 2, "malignant": 2}, show_progress=False)
    out = tmp_path / "run"
    train_classifier(TrainConfig(arch=Arch.SQUEEZENET1_1, train=(str(data),), val=str(data), out=out,
                                 epochs=2, batch_size=1, size=32, device="cpu",
                                 weights_dir=tmp_path / "no-weights"))
    err = capsys.readouterr().err.splitlines()
    bars = [line for line in err if line.startswith("squeezenet1.1 [")]
    assert len(bars) == 8                                       # 2 epochs x 4 batches, one line each
    assert "8/8" in bars[-1] and re.search(r"epoch 2/2 loss \d\.\d{3} val acc \d\.\d{3} \(best ", bars[-1])
    assert "epoch 1/2 loss" in bars[4] and "epoch" not in bars[3]   # epoch 1's results after its 4 batches
    assert write_gradcam_panels([str(out)], str(data), tmp_path / "cam", device="cpu") == 4
    cams = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gradcam [")]
    assert len(cams) == 4 and "4/4" in cams[-1] and cams[-1].endswith("squeezenet1.1")
