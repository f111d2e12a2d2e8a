"""Running a user's script as `python` would: what `revati emulate --` and `revati record --` share."""

from __future__ import annotations

import sys

import pytest

from recorder.device import kind_of
from revati.scripts import Script


def test_only_an_interpreter_is_dropped_from_the_command(tmp_path):
    script = tmp_path / "python_bench.py"
    script.write_text("import sys\nprint('args', sys.argv[1:])\n")
    assert Script.parse([str(script), "--x"], "record").argv == [str(script), "--x"]
    assert Script.parse(["python3.11", str(script), "--x"], "record").target == str(script)
    with pytest.raises(FileNotFoundError, match="no such script"):
        Script.parse(["python", "missing.py"], "record")


def test_modules_are_found_from_the_current_directory_like_python_m(tmp_path, monkeypatch, capsys):
    (tmp_path / "localmod.py").write_text("import sys\nprint('ran', sys.argv)\n")
    monkeypatch.chdir(tmp_path)
    saved = list(sys.path)
    script = Script.parse(["python", "-m", "localmod", "a"], "record")
    assert script.run() == 0
    assert "ran ['" in capsys.readouterr().out and sys.path == saved
    with pytest.raises(FileNotFoundError, match="no module named 'nosuch.sub'"):
        Script.parse(["-m", "nosuch.sub"], "emulate")


def test_exit_codes_and_exit_messages_are_the_scripts(tmp_path, capsys):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nsys.exit('bad input file')\n")
    assert Script.parse([str(script)], "record").run() == 1
    assert "bad input file" in capsys.readouterr().err
    script.write_text("raise SystemExit(3)\n")
    assert Script.parse([str(script)], "record").run() == 3


def test_gpu_names_map_to_whole_hardware_keys():
    assert kind_of("NVIDIA H100 80GB HBM3") == "h100" and kind_of("NVIDIA H100 PCIe") == "h100-pcie"
    assert kind_of("NVIDIA L40S") == "l40s" and kind_of("NVIDIA L4") == "l4"
    assert kind_of("NVIDIA L40") != "l4" and kind_of("NVIDIA GH200 480GB") != "h200"
