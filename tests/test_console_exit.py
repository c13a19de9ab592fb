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
