"""The console scripts end without the interpreter's teardown: exit code, output and exit functions kept."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

SCRIPT = textwrap.dedent('''
    import atexit, sys, threading, time
    import typer
    from cli.errors import run_console_script

    app = typer.Typer()

    @app.command()
    def go(code: int = 0, thread: bool = False, marker: str = ""):
        if marker:
            atexit.register(lambda: open(marker, "w").write("exit functions ran"))
        if thread:  # a non-daemon thread still running: the normal exit waits for it
            threading.Thread(target=lambda: (time.sleep(0.3), open(marker + ".thread", "w").write("done"))).start()
        sys.stdout.write("partial line without newline")
        if code:
            raise typer.Exit(code)

    run_console_script(app)
''')


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code_output_and_exit_functions(tmp_path, code):
    marker = tmp_path / "m"
    res = subprocess.run([sys.executable, "-c", SCRIPT, "--code", str(code), "--marker", str(marker)],
                         capture_output=True, text=True, cwd=str(ROOT))
    assert res.returncode == code
    assert res.stdout == "partial line without newline"  # flushed before the process ended
    assert marker.read_text() == "exit functions ran"


def test_a_live_thread_is_waited_for(tmp_path):
    marker = tmp_path / "m"
    res = subprocess.run([sys.executable, "-c", SCRIPT, "--thread", "--marker", str(marker)],
                         capture_output=True, text=True, cwd=str(ROOT))
    assert res.returncode == 0 and (tmp_path / "m.thread").read_text() == "done"


def test_featstore_cli_error_exit_code(tmp_path):
    res = subprocess.run([sys.executable, "-m", "cli.featstore_app", "info", str(tmp_path / "none.h5")],
                         capture_output=True, text=True, cwd=str(ROOT))
    assert res.returncode == 2 and "error: no store at" in res.stderr


LANES = textwrap.dedent('''
    import sys
    import typer
    from cli.errors import run_console_script
    from featstore.encoders.hf_ssl import _lane_pool

    class Teardown:  # its __del__ runs only in the interpreter's teardown (module globals cleared)
        def __del__(self, _open=open, _path=sys.argv[-1]):  # builtins may be gone by then
            with _open(_path, "w") as f:
                f.write("teardown ran")

    keep = Teardown()
    app = typer.Typer()

    @app.command()
    def go(marker: str):
        assert _lane_pool(2).submit(lambda: 41 + 1).result() == 42  # the extraction's lane threads, now idle

    run_console_script(app)
''')


def test_idle_lane_threads_do_not_force_the_slow_exit(tmp_path):
    marker = tmp_path / "teardown"
    res = subprocess.run([sys.executable, "-c", LANES, str(marker)], capture_output=True, text=True, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr
    assert not marker.exists(), "the interpreter's teardown ran: the lane threads forced the normal exit"


def test_the_teardown_marker_works(tmp_path):  # the check above can fail: without the fast exit it is written
    marker = tmp_path / "teardown"
    script = LANES.replace("run_console_script(app)", "app()")
    res = subprocess.run([sys.executable, "-c", script, str(marker)], capture_output=True, text=True, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr
    assert marker.read_text() == "teardown ran"
