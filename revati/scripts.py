"""Running a user's script as `coverage run` does: `revati emulate -- python bench.py`, `revati record --`.

script = Script.parse(["python", "bench.py", "--batch", "8"], "record")
code = script.run()   # its exit code; sys.argv and sys.path are the script's while it runs
"""

from __future__ import annotations

import importlib.util
import os
import re
import runpy
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Script:
    """A script file or a module (`-m name`) with the arguments it sees as sys.argv."""

    target: str
    is_module: bool
    argv: list[str]  # sys.argv while it runs: the script (or module name) first

    @classmethod
    def parse(cls, argv: list[str], verb: str) -> Script:
        """From `python script.py args`, `script.py args` or `python -m module args`; errors name `verb`."""
        if argv and re.fullmatch(
            r"python[\d.]*(\.exe)?", Path(argv[0]).name
        ):  # the interpreter, not a script
            argv = argv[1:]
        if not argv or argv == ["-m"]:
            raise ValueError(
                f"revati {verb} --: give a script to run, e.g. `revati {verb} -- python bench.py`"
            )
        if argv[0] == "-m":
            with _cwd_on_path():
                try:
                    found = importlib.util.find_spec(argv[1]) is not None
                except (ImportError, ValueError):  # a parent package that does not exist
                    found = False
            if not found:
                raise FileNotFoundError(f"revati {verb} --: no module named {argv[1]!r}")
            return cls(argv[1], True, argv[1:])
        if not Path(argv[0]).exists():
            raise FileNotFoundError(f"revati {verb} --: no such script {argv[0]!r}")
        return cls(argv[0], False, list(argv))

    def run(self) -> int:
        """Run it as __main__ in this process; its exit code (an uncaught exception propagates)."""
        saved_argv, saved_path = sys.argv, list(sys.path)
        sys.argv = list(self.argv)
        try:
            if self.is_module:  # as `python -m`: the current directory first on the path
                sys.path.insert(0, os.getcwd())
                runpy.run_module(self.target, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(os.path.abspath(self.target)))
                runpy.run_path(self.target, run_name="__main__")
        except SystemExit as e:
            if isinstance(e.code, int) or e.code is None:
                return e.code or 0
            print(e.code, file=sys.stderr)  # sys.exit("message"), as Python itself prints it
            return 1
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path
        return 0


@contextmanager
def _cwd_on_path():
    sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        sys.path.remove(os.getcwd())
