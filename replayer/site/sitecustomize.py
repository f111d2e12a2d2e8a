"""Emulation in every rank a launcher starts (replayer.ranks): on where REVATI_EMULATE and RANK are set."""

import os

if os.environ.get("REVATI_EMULATE") and os.environ.get("RANK") is not None:
    from replayer.ranks import activate_from_env

    activate_from_env()
