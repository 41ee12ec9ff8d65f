"""ordered_map: input order kept, the input never read far ahead (bounded memory), and a worker that dies is an
error, not a hang."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pyllm.data.parallel import ordered_map

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("workers", [1, 2])
def test_order_kept_and_read_ahead_bounded(workers):
    consumed = []

    def items():
        for i in range(40):
            consumed.append(i)
            yield -i

    window = 4
    for k, value in enumerate(ordered_map(abs, items(), workers=workers, window=window)):
        assert value == k
        # when result k is handed out, at most `window` more items have been taken from the input
        assert len(consumed) <= k + 1 + window


def test_unknown_engine():
    with pytest.raises(ValueError, match="engine"):
        list(ordered_map(abs, [1], workers=2, engine="spark"))


def test_error_in_fn_keeps_its_type_and_message():
    results = ordered_map(int, ["1", "2", "x", "4"], workers=2)
    assert [next(results), next(results)] == [1, 2]
    with pytest.raises(ValueError, match="invalid literal for int"):
        next(results)


def test_closing_early_does_not_wait_for_the_queued_items():
    results = ordered_map(time.sleep, [1.0] * 40, workers=2, window=40)
    next(results)
    start = time.perf_counter()
    results.close()
    # the 37 or so queued one-second items would take ~19 s on two workers; only the running ones finish
    assert time.perf_counter() - start < 10


def _run_script(tmp_path, source: str, timeout: float) -> str:
    """Run ``source`` as a script (a fresh interpreter: spawned workers import it) and return its stderr; a hang
    fails the test after ``timeout`` seconds and kills the script's whole process group."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the script hung: no error within {timeout} s")
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: a data worker process died"), err
    assert 'if __name__ == "__main__":' in last and "out of memory" in last and "initializer" in last
    return err


def test_worker_killed_is_an_error(tmp_path):
    _run_script(tmp_path, """
        import os
        from pyllm.data.parallel import ordered_map

        def fn(x):
            if x == 3:
                os.kill(os.getpid(), 9)  # as the OOM killer does
            return x

        if __name__ == "__main__":
            print(list(ordered_map(fn, range(10), workers=2)))
    """, timeout=60)


def test_initializer_error_is_an_error(tmp_path):
    err = _run_script(tmp_path, """
        from pyllm.data.parallel import ordered_map

        def init():
            raise RuntimeError("no such classifier file")

        if __name__ == "__main__":
            print(list(ordered_map(abs, range(10), workers=2, initializer=init)))
    """, timeout=60)
    assert "no such classifier file" in err  # the initializer's own traceback is shown too


def test_script_without_main_guard_is_an_error(tmp_path):
    # each spawned worker re-runs the script, which tries to start workers of its own while bootstrapping and dies;
    # the trained classifier makes the workers' arguments larger than a pipe buffer (the parent must not block
    # writing them to a worker that died)
    _run_script(tmp_path, """
        from pyllm.data.pipeline import DataConfig, run

        run(DataConfig(out_dir="out", workers=2, max_documents=8, progress=False, report=False))
    """, timeout=120)
