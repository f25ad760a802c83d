"""cli_exit.exit_process: the quick way out once torch is loaded keeps what a normal exit
promises (the exit code, flushed output, atexit handlers, waiting for working threads)."""

import subprocess
import sys

from conftest import REPO


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_with_torch_loaded_the_code_output_and_atexit_handlers_survive():
    done = _python(
        "import atexit, sys, torch\n"
        "from mergekit_sd.cli_exit import exit_process\n"
        "atexit.register(lambda: print('handler ran'))\n"
        "sys.stdout.write('unflushed ')\n"
        "sys.stderr.write('to stderr')\n"
        "exit_process(3)\n"
        "print('not reached')\n")
    assert done.returncode == 3
    assert done.stdout == "unflushed handler ran\n"
    assert done.stderr == "to stderr"


def test_a_working_thread_is_waited_for():
    done = _python(
        "import threading, time, torch\n"
        "from mergekit_sd.cli_exit import exit_process\n"
        "def work():\n"
        "    time.sleep(0.3)\n"
        "    print('thread finished', flush=True)\n"
        "threading.Thread(target=work).start()\n"
        "exit_process(0)\n")
    assert done.returncode == 0
    assert done.stdout == "thread finished\n"


def test_the_command_line_keeps_its_exit_codes(cli, tmp_path):
    missing = cli("bake", tmp_path / "absent.safetensors", "x.safetensors", "-o",
                  tmp_path / "out.safetensors")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
    assert cli("--help").returncode == 0
