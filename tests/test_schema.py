"""The trace schema: writing, reading back, crash safety and validation."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from revati.schema import TABLES, TraceError, TraceWriter, read_table

RUN_ROW = {
    "source": "recorded",
    "complete": False,
    "device_kind": "cpu",
    "device_name": "test cpu",
    "sm_count": 0,
    "memory_bytes": 1 << 30,
    "torch_version": "2.13.0",
    "engine": "hf",
    "model": "tiny-llama",
    "model_config": "{}",
    "tp": 1,
    "pp": 1,
    "workload": "poisson:rate=1,n=1,prompt=fixed(4),output=fixed(2)",
}


def op_row(op_id: int) -> dict:
    return {
        "rank": 0,
        "op_id": op_id,
        "name": "aten::mm",
        "input_shapes": [[4, 8], [8, 16]],
        "dtypes": ["bfloat16", "bfloat16"],
        "stream": 0,
        "host_start": op_id * 1e-3,
        "host_duration": 1e-5,
        "device_start": op_id * 1e-3 + 2e-6,
        "device_duration": 3e-6,
    }


def test_every_table_carries_run_id_and_rank_where_it_applies():
    for name, schema in TABLES.items():
        assert schema.field("run_id").type == pa.string()
        assert ("rank" in schema.names) == (name in {"ops", "kernels", "iterations"})


def test_round_trip_keeps_rows_and_stamps_run_id(tmp_path):
    with TraceWriter(tmp_path, "r1", flush_rows=3) as w:
        w.write_run(RUN_ROW)
        w.append("ops", [op_row(i) for i in range(7)])
        w.append(
            "requests",
            {
                "request_id": ["a"],
                "arrival": [0.0],
                "prompt_tokens": [4],
                "output_tokens": [2],
                "first_token": [0.5],
                "completion": [0.6],
                "token_times": [[0.5, 0.6]],
            },
        )
    ops = read_table(tmp_path, "ops")
    assert ops.num_rows == 7
    assert sorted(p.name for p in (tmp_path / "ops").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert ops.column("op_id").to_pylist() == list(range(7))
    assert ops.column("input_shapes")[0].as_py() == [[4, 8], [8, 16]]
    assert set(ops.column("run_id").to_pylist()) == {"r1"}
    assert ops.column("predicted").to_pylist() == [False] * 7  # defaulted by the writer
    assert ops.schema == TABLES["ops"]
    assert read_table(tmp_path, "requests").column("token_times")[0].as_py() == [0.5, 0.6]


def test_close_marks_run_complete_and_writes_empty_tables(tmp_path):
    with TraceWriter(tmp_path, "r1") as w:
        w.write_run(RUN_ROW)
        assert read_table(tmp_path, "run").column("complete").to_pylist() == [False]
    assert read_table(tmp_path, "run").column("complete").to_pylist() == [True]
    assert read_table(tmp_path, "kernels").num_rows == 0


def test_exception_inside_writer_leaves_run_incomplete(tmp_path):
    with pytest.raises(RuntimeError), TraceWriter(tmp_path, "r1") as w:
        w.write_run(RUN_ROW)
        w.append_row("ops", op_row(0))
        raise RuntimeError("engine crashed")
    assert read_table(tmp_path, "run").column("complete").to_pylist() == [False]
    assert read_table(tmp_path, "ops").num_rows == 1


def test_crashed_writer_leaves_flushed_parts_readable_and_temp_files_ignored(tmp_path):
    w = TraceWriter(tmp_path, "r1", flush_rows=2)
    w.write_run(RUN_ROW)
    w.append("ops", [op_row(i) for i in range(5)])  # two parts on disk, one row in memory
    # a half-written part left by a crash mid-write
    (tmp_path / "ops" / ".part-00002.parquet.123.tmp").write_bytes(b"PAR1 half a file")
    del w  # never closed
    assert read_table(tmp_path, "ops").column("op_id").to_pylist() == [0, 1, 2, 3]
    assert read_table(tmp_path, "run").column("complete").to_pylist() == [False]


def test_writer_refuses_a_directory_that_holds_a_trace(tmp_path):
    with TraceWriter(tmp_path, "r1") as w:
        w.write_run(RUN_ROW)
    with pytest.raises(TraceError, match="already holds a trace"):
        TraceWriter(tmp_path, "r2")


def test_glob_reads_several_runs(tmp_path):
    for run_id in ("a", "b"):
        with TraceWriter(tmp_path / run_id, run_id) as w:
            w.write_run(RUN_ROW)
            w.append_row("ops", op_row(0))
    assert sorted(read_table(f"{tmp_path}/*", "ops").column("run_id").to_pylist()) == ["a", "b"]


def test_append_rejects_unknown_columns_and_tables(tmp_path):
    w = TraceWriter(tmp_path, "r1")
    with pytest.raises(TraceError, match=r"no column\(s\) \['opid'\]"):
        w.append_row("ops", {**op_row(0), "opid": 1})
    with pytest.raises(TraceError, match="unknown trace table 'op'"):
        w.append("op", [op_row(0)])
    with pytest.raises(TraceError, match="differ in length"):
        w.append("iterations", {"iteration_id": [0, 1], "phase": ["decode"]})


def test_missing_required_value_names_table_and_column(tmp_path):
    w = TraceWriter(tmp_path, "r1")
    row = op_row(0)
    del row["stream"]
    w.append_row("ops", row)
    with pytest.raises(TraceError, match="table 'ops', column 'stream'.*required"):
        w.flush()


def test_wrong_value_type_names_table_and_column(tmp_path):
    w = TraceWriter(tmp_path, "r1")
    w.append_row("ops", {**op_row(0), "host_start": "soon"})
    with pytest.raises(TraceError, match="table 'ops', column 'host_start'"):
        w.flush()


def _written_ops(tmp_path) -> pa.Table:
    with TraceWriter(tmp_path, "r1") as w:
        w.append_row("ops", op_row(0))
    return pq.read_table(tmp_path / "ops" / "part-00000.parquet")


def test_reader_names_file_and_missing_column(tmp_path):
    part = tmp_path / "ops" / "part-00000.parquet"
    pq.write_table(_written_ops(tmp_path).drop_columns(["device_duration"]), part)
    with pytest.raises(TraceError) as err:
        read_table(tmp_path, "ops")
    assert str(part) in str(err.value)
    assert "'device_duration' is missing" in str(err.value)


def test_reader_names_file_and_column_of_wrong_type(tmp_path):
    part = tmp_path / "ops" / "part-00000.parquet"
    data = _written_ops(tmp_path)
    data = data.set_column(data.schema.get_field_index("name"), "name", pa.array([7]))
    pq.write_table(data, part)
    with pytest.raises(
        TraceError, match=r"part-00000\.parquet: column 'name' has type int64, expected string"
    ):
        read_table(tmp_path, "ops")


def test_reader_accepts_compatible_widths(tmp_path):
    part = tmp_path / "ops" / "part-00000.parquet"
    data = _written_ops(tmp_path)
    data = data.set_column(data.schema.get_field_index("stream"), "stream", pa.array([0], pa.int64()))
    pq.write_table(data, part)
    assert read_table(tmp_path, "ops").schema.field("stream").type == pa.int32()


def test_reader_rejects_corrupt_part(tmp_path):
    _written_ops(tmp_path)
    (tmp_path / "ops" / "part-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(TraceError, match=r"part-00001\.parquet: not a readable Parquet file"):
        read_table(tmp_path, "ops")


def test_reader_errors_for_missing_dirs_and_tables(tmp_path):
    with pytest.raises(TraceError, match="no such trace directory"):
        read_table(tmp_path / "nope", "ops")
    with pytest.raises(TraceError, match="is not a trace directory"):
        read_table(tmp_path, "ops")
    (tmp_path / "run").mkdir()
    with pytest.raises(TraceError, match="no 'kernels' table"):
        read_table(tmp_path, "kernels")
    with pytest.raises(TraceError, match="unknown trace table 'kernel'"):
        read_table(tmp_path, "kernel")


def test_a_directory_of_runs_reads_as_all_of_them(tmp_path):
    for i in (1, 2):
        with TraceWriter(tmp_path / "runs" / f"run-{i}", f"r{i}") as w:
            w.write_run(RUN_ROW)
    rows = read_table(tmp_path / "runs", "run").to_pylist()
    assert sorted(r["run_id"] for r in rows) == ["r1", "r2"]
