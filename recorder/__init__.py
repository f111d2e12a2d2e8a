"""Capture real runs on CUDA or CPU into Parquet traces (`revati record`): see recorder.run."""

import os

os.environ.setdefault(
    "KINETO_LOG_LEVEL", "6"
)  # Kineto prints a line per start / stop below this; read at first load
