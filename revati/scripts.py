"""Running a user's script as `coverage run` does: `revati emulate -- python bench.py`, `revati record --`.

script = Script.parse(["python", "bench.py", "--batch", "8"], "record")
code = script.run()   # its exit code; sys.argv and sys.path are the script's while it runs
"""

from __future__ import annotations

import os
import runpy
import sys
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
        if argv and Path(argv[0]).name.startswith("python"):
            argv = argv[1:]
        if not argv or argv == ["-m"]:
            raise ValueError(
                f"revati {verb} --: give a script to run, e.g. `revati {verb} -- python bench.py`"
            )
        if argv[0] == "-m":
            return cls(argv[1], True, argv[1:])
        if not Path(argv[0]).exists():
            raise FileNotFoundError(f"revati {verb} --: no such script {argv[0]!r}")
        return cls(argv[0], False, list(argv))

    def run(self) -> int:
        """Run it as __main__ in this process; its exit code (an uncaught exception propagates)."""
        saved_argv, saved_path = sys.argv, list(sys.path)
        sys.argv = list(self.argv)
        try:
            if self.is_module:
                runpy.run_module(self.target, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(os.path.abspath(self.target)))
                runpy.run_path(self.target, run_name="__main__")
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path
        return 0
