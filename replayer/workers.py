"""The processes an engine starts itself (SGLang's scheduler and detokenizer, vLLM's engine core), emulated.

An engine that runs its model in processes of its own is emulated in all of them: the caller's process by
the run itself, the others from their environment (replayer/site/sitecustomize.py, as ranks are), and all
share one virtual time (replayer.tree) so a request's times read in the front end are the model's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from replayer import ranks, tree


@contextlib.contextmanager
def environment(
    gpu: str, profile: str | None, host_time: str, env: dict[str, str], paths: tuple[str, ...] = ()
):
    """Inside the block, processes started from this one run emulated on one shared time, with `env` set and
    `paths` importable (here and in them).

    Yields the directory where each emulated child writes its figures (process-PID.json); call `join(emu)`
    once this process's emulator is active.
    """
    work = Path(tempfile.mkdtemp(prefix="revati-workers-"))
    results = work / "results"
    results.mkdir()
    shared = tree.create(work)
    full = {**env, **ranks.worker_environment(gpu, profile, host_time, results, shared, paths)}
    saved = {k: os.environ.get(k) for k in full}
    os.environ.update(full)
    sys.path[:0] = paths
    try:
        yield results
    finally:
        for path in paths:
            with contextlib.suppress(ValueError):
                sys.path.remove(path)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(work, ignore_errors=True)


def join(emu) -> None:
    """This process (the front end) shares the time of the processes it will start."""
    emu.share_time(tree.Tree.join(Path(os.environ[tree.ENV])))


def children(results: Path) -> list[dict]:
    """The figures each emulated child process last wrote."""
    rows = []
    for path in sorted(results.glob("process-*.json")):
        with contextlib.suppress(ValueError, OSError):
            rows.append(json.loads(path.read_text()))
    return rows
