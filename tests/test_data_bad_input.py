"""Bad training data as a new user would pass it to `megatron sft`: one line
`megatron sft: error: ...` naming the file (and row/line) or the reasons rows were dropped, no
traceback, a non-zero exit, and nothing left at `--save` (data is read before the run directory
is made)."""

from __future__ import annotations

import json

import pytest

from conftest import run_megatron


def _sft(model_dir, dataset, save, *extra):
    return run_megatron(["sft", "--model", str(model_dir), "--dataset", str(dataset), "--save", str(save),
                         "--train_iters", "1", "--global_batch_size", "2", "--micro_batch_size", "1",
                         "--add_version", "false", "--split_dataset_ratio", "0", *extra])


def _error_line(proc, save) -> str:
    """The single `megatron sft: error:` line; asserts the clean failure around it."""
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megatron sft: error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert not save.exists(), "a failed run left its --save directory behind"
    return lines[0]


@pytest.mark.parametrize("name,content", [
    ("empty.jsonl", b""),
    ("empty.json", b""),
    ("blank.jsonl", b"\n  \n"),
    ("empty_array.json", b"[]"),
    ("header_only.csv", b"query,response\n"),
])
def test_empty_file(model_dir, tmp_path, name, content):
    data = tmp_path / name
    data.write_bytes(content)
    line = _error_line(_sft(model_dir, data, tmp_path / "run"), tmp_path / "run")
    assert f"dataset file {data} has no rows (it is empty)" in line


@pytest.mark.parametrize("content,kind", [("[1, 2, 3]", "int"), ('["a", "b"]', "str")])
def test_json_array_of_non_objects(model_dir, tmp_path, content, kind):
    """Arrow would read these as a `text` column and train on "1", "2"...: refused instead."""
    data = tmp_path / "rows.json"
    data.write_text(content)
    n = len(json.loads(content))
    line = _error_line(_sft(model_dir, data, tmp_path / "run", "--strict", "true"), tmp_path / "run")
    assert f"{data} row 0: wrong type (a row must be a JSON object, got {kind})" in line
    line = _error_line(_sft(model_dir, data, tmp_path / "run"), tmp_path / "run")
    assert f"{data}: no usable rows: {n}/{n} rows dropped as wrong type" in line


def _utf8_file(tmp_path):
    data = tmp_path / "latin1.jsonl"
    good = json.dumps({"query": "Name a prime.", "response": "7"}).encode()
    bad = '{"query": "Caf\u00e9?", "response": "Oui"}'.encode("latin-1")  # é as the single byte 0xe9
    data.write_bytes(b"\n".join([good, bad, good, good]) + b"\n")
    return data


def test_non_utf8_line_strict(model_dir, tmp_path):
    data = _utf8_file(tmp_path)
    line = _error_line(_sft(model_dir, data, tmp_path / "run", "--strict", "true"), tmp_path / "run")
    assert f"{data} row 1 (line 2): invalid UTF-8 (byte 0xe9 at column 15)" in line


def test_non_utf8_line_dropped_and_counted(model_dir, tmp_path):
    data = _utf8_file(tmp_path)
    proc = _sft(model_dir, data, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"dropped {data} row 1 (line 2): invalid UTF-8 (byte 0xe9 at column 15)" in proc.stderr
    assert '"dropped": {"invalid UTF-8": 1}' in proc.stderr and '"rows": 3' in proc.stderr


def test_every_row_too_long(model_dir, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"query": f"Repeat {i}: " + "word " * 300, "response": "ok"}) + "\n"
                            for i in range(40)))
    line = _error_line(_sft(model_dir, data, tmp_path / "run", "--max_length", "256"), tmp_path / "run")
    assert f"no usable training rows in {data}: --max_length 256 drops 40/40 rows as too long" in line
    # right truncation keeps the rows but cuts every answer: named too
    line = _error_line(_sft(model_dir, data, tmp_path / "run", "--max_length", "256",
                            "--truncation_strategy", "right"), tmp_path / "run")
    assert "40/40 rows have no trained tokens left after --truncation_strategy right to --max_length 256" in line


def test_error_of_one_rank_under_torchrun_is_one_line(model_dir, tmp_path):
    """Rank 0 finds the data unusable while rank 1 waits for it: the user sees the one error line
    (exit 2), not rank 1's lost connection nor torchrun's ChildFailedError traceback."""
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"query": "word " * 300, "response": "ok"}) + "\n" for _ in range(8)))
    proc = run_megatron(["sft", "--model", str(model_dir), "--dataset", str(data), "--save", str(tmp_path / "run"),
                         "--train_iters", "1", "--global_batch_size", "2", "--micro_batch_size", "1",
                         "--max_length", "256", "--add_version", "false", "--tensor_model_parallel_size", "2"],
                        nproc=2)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "ChildFailedError" not in proc.stderr and "Connection closed" not in proc.stderr, proc.stderr[-3000:]
    line = _error_line(proc, tmp_path / "run")
    assert "no usable training rows" in line and "7/7 rows as too long" in line, line  # 1 of 8 held out


def test_rows_dropped_for_mixed_reasons(model_dir, tmp_path):
    data = tmp_path / "mixed.jsonl"
    rows = [{"query": "q " * 400, "response": "r"}] * 3 + [{"query": "no answer"}] * 2
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    line = _error_line(_sft(model_dir, data, tmp_path / "run", "--max_length", "256"), tmp_path / "run")
    assert f"no usable training rows in {data}:" in line
    assert "--max_length 256 drops 3/6 rows as too long" in line
    assert "2/6 rows dropped as missing field" in line and "1/6 rows dropped as invalid JSON" in line


def test_streaming_empty_stream(model_dir, tmp_path):
    data = tmp_path / "rows.json"
    data.write_text('["a", "b"]')
    line = _error_line(_sft(model_dir, data, tmp_path / "run", "--streaming", "true"), tmp_path / "run")
    assert f"no usable training (streamed) rows in {data}: 2/2 rows dropped as wrong type" in line
