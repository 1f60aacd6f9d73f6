"""Ctrl-C: deferred to a flag, acted on after the record window it arrives in, finished
groups kept, no segmentation fault (issue 17 item 12)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import interrupt
from experiments.store import Store

ROOT = Path(__file__).resolve().parents[2]
TINY = str(Path(__file__).with_name("tiny.toml"))
# Two groups: 20 steps, then one far too long to finish within the test's timeout.
LONG = ["sweep.train.steps=[20, 3000000]", "sweep.batch_size=[16]",
        "sweep.learning_rate=[0.05]", "sweep.seed=[0]", "measure.measures=[]",
        "model.hidden=[4]"]


def test_sigint_inside_the_block_sets_the_flag_and_raises_on_leaving():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(interrupt.Interrupted):
        with interrupt.catching():
            with interrupt.catching():   # nested: shares the outer handler
                signal.raise_signal(signal.SIGINT)
                assert interrupt.requested()
            assert interrupt.requested()  # the inner block did not consume it
    assert signal.getsignal(signal.SIGINT) is before
    assert not interrupt.requested()
    assert issubclass(interrupt.Interrupted, KeyboardInterrupt)


def test_an_exception_in_flight_wins_over_a_pending_interrupt():
    with pytest.raises(ZeroDivisionError):
        with interrupt.catching():
            signal.raise_signal(signal.SIGINT)
            1 / 0
    with interrupt.catching():
        pass  # no interrupt: leaves quietly
    with pytest.raises(interrupt.Interrupted):
        with interrupt.catching():
            signal.raise_signal(signal.SIGINT)
            interrupt.check()


def _wait_for(path: Path, text: str, proc, timeout: float = 400) -> None:
    start = time.monotonic()
    while text not in path.read_text():
        assert proc.poll() is None, path.read_text()[-3000:]
        assert time.monotonic() - start < timeout, path.read_text()[-3000:]
        time.sleep(0.2)


def _finished(run_dir: Path) -> set:
    with Store(run_dir / "results.sqlite") as store:
        return store.finished_groups()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_inside_a_long_group_stops_it_after_a_window(tmp_path):
    # The Python API with progress lines: SIGINT once the long group is executing.
    code = ("import sys, experiments\n"
            "try:\n"
            f"    experiments.run({TINY!r}, overrides=sys.argv[2:], out=sys.argv[1],\n"
            "                    progress='lines', log=lambda m: print(m, file=sys.stderr))\n"
            "except experiments.interrupt.Interrupted:\n"
            "    print('interrupted', flush=True); sys.exit(130)\n")
    err = tmp_path / "stderr"
    with err.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run"), *LONG],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True)
        _wait_for(err, "/3000000 (", proc)   # a progress line of the long group
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, err.read_text()[-3000:]
    assert "interrupted" in out
    assert len(_finished(tmp_path / "run")) == 1   # the 20-step group, stored


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_from_the_cli_exits_130_and_keeps_the_finished_group(tmp_path):
    err = tmp_path / "stderr"
    args = [sys.executable, "-m", "experiments.cli", "run", TINY, "--out",
            str(tmp_path / "run"), "--no-report"]
    for override in LONG:
        args += ["--set", override]
    with err.open("w") as f:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        _wait_for(err, "members in", proc)   # the first group is stored
        time.sleep(2)                        # compiling or running the long one
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=300)
    text = err.read_text()
    assert proc.returncode == 130, text[-3000:]   # not -11 (a segmentation fault)
    assert "interrupted" in text and "Traceback" not in text
    assert len(_finished(tmp_path / "run")) == 1
