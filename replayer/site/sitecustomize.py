"""Emulation in every rank a launcher starts (replayer.ranks): on where REVATI_EMULATE and RANK are set.

Not in multiprocessing's own helpers (resource tracker, fork server), which an engine's processes start
with the same environment: they run no model and never meet the clock.
"""

import os


def _helper() -> bool:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            command = f.read()
    except OSError:
        return False
    return b"multiprocessing.resource_tracker" in command or b"multiprocessing.forkserver" in command


if os.environ.get("REVATI_EMULATE") and os.environ.get("RANK") is not None and not _helper():
    from replayer.ranks import activate_from_env

    activate_from_env()
