"""Running the CLI with one of its streams a terminal (a pty), as a user at a shell sees it."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def run_on_terminal(args, env: dict, stream: str = "stdout", timeout: float = 300,
                    module: str = "mergekit_sd.cli") -> tuple[int, str, str]:
    """`mergekit-sd ARGS` with `stream` ("stdout" or "stderr") a terminal and the other a pipe:
    (exit code, what the pipe got, what the terminal got, colours off and lines as written: a
    terminal wraps a longer one for the eye only, copied out it is one line). `module`: a
    test's own entry point that changes a setting before it runs the CLI's."""
    import pty

    main, secondary = pty.openpty()
    other = subprocess.PIPE
    streams = {"stdout": secondary, "stderr": other} if stream == "stdout" else \
        {"stdout": other, "stderr": secondary}
    with subprocess.Popen([sys.executable, "-m", module, *map(str, args)], env=env,
                          stdin=subprocess.DEVNULL, **streams) as child:
        os.close(secondary)
        seen = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the terminal's other end closed: the child is done
                break
            if not chunk:
                break
            seen += chunk
        piped = (child.stderr if stream == "stdout" else child.stdout).read().decode()
        child.wait(timeout=timeout)
    os.close(main)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", seen.decode(errors="replace")).replace("\r\n", "\n")
    return child.returncode, piped, shown
