"""Data sources and row formats: every supported format/file type normalises to the same
canonical rows; #N sampling, renames, LLaMA-Factory demo files, bad rows (strict/non-strict),
streaming and the offline hub error."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pytest

from megaswift.assets import fetch_llamafactory_data
from megaswift.data.formats import RowError, normalize
from megaswift.data.sources import load_source, load_sources, split

SYS, Q1, A1, Q2, A2 = "You are terse.", "Hi", "Hello!", "What is 2+2?", "4"
CANON = [{"role": "system", "content": SYS}, {"role": "user", "content": Q1},
         {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
         {"role": "assistant", "content": A2}]

FORMS = {
    "messages": {"messages": CANON},
    "sharegpt": {"conversations": [{"from": "system", "value": SYS}, {"from": "human", "value": Q1},
                                   {"from": "gpt", "value": A1}, {"from": "human", "value": Q2},
                                   {"from": "gpt", "value": A2}]},
    "sharegpt_system_column": {"system": SYS, "conversations": [
        {"from": "human", "value": Q1}, {"from": "gpt", "value": A1},
        {"from": "user", "value": Q2}, {"from": "assistant", "value": A2}]},
    "alpaca": {"system": SYS, "instruction": Q2, "input": "", "output": A2, "history": [[Q1, A1]]},
    "query_response": {"system": SYS, "query": Q2, "response": A2, "history": [[Q1, A1]]},
}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def canon(ds) -> list[list[dict]]:
    return [r["messages"] for r in ds]


@pytest.mark.parametrize("form", sorted(FORMS))
def test_same_conversation_every_format(form):
    row = {**FORMS[form], "__source__": "x.jsonl", "__row__": 0}
    assert normalize(row) == {"messages": CANON, "rejected_response": None, "tools": None,
                              "__source__": "x.jsonl", "__row__": 0}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_same_conversation_jsonl_and_json(tmp_path, form):
    rows = [FORMS[form]] * 3
    a, _ = load_sources([str(write_jsonl(tmp_path / "a.jsonl", rows))], seed=0)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    b, _ = load_sources([str(tmp_path / "b.json")], seed=0)
    assert canon(a) == canon(b) == [CANON] * 3
    assert a[2]["__source__"].endswith("a.jsonl") and a[2]["__row__"] == 2


def test_file_types_csv_parquet_dir_saved(tmp_path):
    single = [{"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]
    pd.DataFrame([{"instruction": Q2, "input": None, "output": A2}] * 2).to_csv(tmp_path / "a.csv", index=False)
    csv_ds, _ = load_sources([str(tmp_path / "a.csv")], seed=0)
    assert canon(csv_ds) == [single] * 2
    pd.DataFrame([FORMS["messages"]] * 2).to_parquet(tmp_path / "m.parquet")
    pq_ds, _ = load_sources([str(tmp_path / "m.parquet")], seed=0)
    assert canon(pq_ds) == [CANON] * 2
    # a directory with files of different formats (different raw columns), read in sorted order
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "b.jsonl", [FORMS["alpaca"]])
    write_jsonl(d / "sub" / "c.jsonl", [FORMS["sharegpt"]] * 2)
    (d / "a.json").write_text(json.dumps([FORMS["query_response"]]))
    dir_ds, _ = load_sources([str(d)], seed=0)
    assert canon(dir_ds) == [CANON] * 4
    assert [Path(s).name for s in dir_ds["__source__"]] == ["a.json", "b.jsonl", "c.jsonl", "c.jsonl"]
    assert dir_ds["__row__"] == [0, 0, 0, 1]
    assert len(load_source(str(d), seed=0)) == 4  # raw rows: the union of the files' columns
    write_jsonl(d / "z.jsonl", [{"conversations": "not a list"}])  # clashes with a list column: per-file path
    with pytest.raises(ValueError, match="incompatible columns"):
        load_source(str(d), seed=0)
    dir_ds, counts = load_sources([str(d)], seed=0)
    assert canon(dir_ds) == [CANON] * 4 and counts == Counter({"wrong type": 1})
    datasets.Dataset.from_list([FORMS["query_response"]] * 2).save_to_disk(str(tmp_path / "saved"))
    saved, _ = load_sources([str(tmp_path / "saved")], seed=0)
    assert canon(saved) == [CANON] * 2 and saved["__row__"] == [0, 1]


def test_alpaca_input_joined_and_text_rows(tmp_path):
    row = normalize({"instruction": "Translate", "input": "bonjour", "output": "hello"})
    assert row["messages"][0] == {"role": "user", "content": "Translate\nbonjour"}
    (tmp_path / "t.txt").write_text("first line\n\nsecond line\n")
    ds, _ = load_sources([str(tmp_path / "t.txt")], seed=0)
    assert canon(ds) == [[{"role": "assistant", "content": "first line"}],
                         [{"role": "assistant", "content": "second line"}]]
    assert ds["__row__"] == [0, 2]  # line index within the file


def test_preference_and_tool_formats():
    prompt = [{"role": "user", "content": "q"}]
    want = {"messages": prompt + [{"role": "assistant", "content": "good"}], "rejected_response": "bad"}
    for row in ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
                 "rejected": {"from": "gpt", "value": "bad"}},
                {"conversations": [{"from": "human", "value": "q"}], "chosen": "good", "rejected": "bad"},
                {"prompt": "q", "chosen": "good", "rejected": "bad"},
                {"prompt": prompt, "chosen": [{"role": "assistant", "content": "good"}],
                 "rejected": [{"role": "assistant", "content": "bad"}]},
                {"chosen": prompt + [{"role": "assistant", "content": "good"}],
                 "rejected": prompt + [{"role": "assistant", "content": "bad"}]},
                {"messages": prompt + [{"role": "assistant", "content": "good"}], "rejected_response": "bad"}):
        got = normalize(row)
        assert {k: got[k] for k in want} == want, row
    tool_row = normalize({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
        "tools": [{"name": "get", "parameters": {"type": "object"}}]})
    assert json.loads(tool_row["messages"][1]["content"]) == {"name": "get", "arguments": {"city": "Paris"}}
    assert json.loads(tool_row["tools"]) == [{"name": "get", "parameters": {"type": "object"}}]


def test_sampling(tmp_path):
    f = str(write_jsonl(tmp_path / "a.jsonl", [{"text": f"row {i}"} for i in range(20)]))
    a = load_source(f + "#5", seed=1)
    assert len(a) == 5 and len(set(a["__row__"])) == 5
    assert a["__row__"] == load_source(f + "#5", seed=1)["__row__"]
    assert a["__row__"] != load_source(f + "#5", seed=2)["__row__"]
    big = load_source(f + "#45", seed=1)  # 2 full copies + 5 sampled
    assert len(big) == 45 and Counter(Counter(big["__row__"]).values()) == {2: 15, 3: 5}
    normed, _ = load_sources([f + "#7", f], seed=3)
    assert len(normed) == 27 and normed[0]["messages"][0]["role"] == "assistant"


def test_columns_rename(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"q": Q2, "a": A2, "query": "clash"}])
    ds, _ = load_sources([str(f)], seed=0, columns={"q": "query", "a": "response", "absent": "x"})
    assert canon(ds) == [[{"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]]
    raw = load_source(str(f), seed=0, columns={"q": "query"})
    assert raw[0]["query"] == Q2 and "q" not in raw.column_names


def test_llamafactory_demo_files():
    d = fetch_llamafactory_data()
    alpaca, c = load_sources([str(d / "alpaca_en_demo.json")], seed=0, strict=True)
    assert len(alpaca) == 999 and not c and alpaca[0]["messages"][-1]["role"] == "assistant"
    dpo, _ = load_sources([str(d / "dpo_en_demo.json")], seed=0, strict=True)
    assert len(dpo) == 300 and all(r and r.strip() for r in dpo["rejected_response"])
    c4, _ = load_sources([str(d / "c4_demo.jsonl")], seed=0, strict=True)
    assert len(c4) == 300 and all(len(m) == 1 and m[0]["role"] == "assistant" for m in c4["messages"])
    v1, _ = load_sources([str(d / "v1_sft_demo.jsonl")], seed=0, strict=True)
    assert len(v1) == 500 and v1[0]["messages"][0] == {"role": "user", "content": "hi"}
    tools, _ = load_sources([str(d / "glaive_toolcall_en_demo.json")], seed=0, strict=True)
    assert len(tools) == 300 and json.loads(tools[0]["tools"])[0]["name"] == "search_recipes"
    assert {m["role"] for ms in tools["messages"] for m in ms} == {"user", "assistant", "tool"}


BAD_ROWS = [
    {"instruction": "ok", "output": "fine"},                       # row 0 good
    {"instruction": "no output"},                                  # row 1 missing field
    {"messages": "hello"},                                         # row 2 wrong type
    {"instruction": "x", "output": "   "},                         # row 3 empty assistant turn
    '{"instruction": "x", "output": ',                             # row 4 (line 5) invalid JSON
    {"messages": [{"role": "user", "content": "hi"}]},             # row 5 no assistant turn
    {"foo": 1},                                                    # row 6 unknown format
    {"query": "q", "response": "r"},                               # row 7 good
]
BAD_COUNTS = {"missing field": 1, "wrong type": 1, "empty assistant turn": 1, "invalid JSON": 1,
              "no assistant turn": 1, "unknown format": 1}


@pytest.mark.parametrize("num_proc", [1, 2])
def test_bad_rows(tmp_path, caplog, num_proc):
    f = str(write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS))
    with pytest.raises(RowError) as e:
        load_sources([f], seed=0, strict=True, num_proc=num_proc)
    assert e.value.reason == "missing field" and e.value.row == 1
    assert "bad.jsonl row 1 (line 2): missing field" in str(e.value) and "'output'" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="megaswift.data"):
        ds, counts = load_sources([f], seed=0, strict=False, num_proc=num_proc)
    assert counts == Counter(BAD_COUNTS) and ds["__row__"] == [0, 7]
    assert any("dropped 6 rows of" in r.message and "bad.jsonl" in r.message for r in caplog.records)


def test_invalid_json_strict_and_json_array_mixed_types(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}, {"text": "b"}, "{oops"])
    with pytest.raises(RowError, match=r"x.jsonl row 2 \(line 3\): invalid JSON"):
        load_sources([str(f)], seed=0, strict=True)
    (tmp_path / "y.json").write_text(json.dumps([FORMS["messages"], {"messages": "str"}, FORMS["alpaca"]]))
    with pytest.raises(RowError, match=r"y.json row 1: wrong type"):
        load_sources([str(tmp_path / "y.json")], seed=0, strict=True)
    ds, counts = load_sources([str(tmp_path / "y.json")], seed=0)
    assert canon(ds) == [CANON, CANON] and counts == Counter({"wrong type": 1})


def test_normalize_reasons():
    cases = {"unknown format": {"foo": "x"}, "missing field": {"query": "q"},
             "wrong type": {"conversations": [{"from": "alien", "value": "x"}]},
             "empty assistant turn": {"text": " "},
             "no assistant turn": {"messages": [{"role": "user", "content": "q"}]}}
    for reason, row in cases.items():
        with pytest.raises(RowError) as e:
            normalize({**row, "__source__": "f.json", "__row__": 17})
        assert e.value.reason == reason and str(e.value).startswith(f"f.json row 17: {reason}")


def test_streaming(tmp_path):
    good = str(write_jsonl(tmp_path / "good.jsonl", [FORMS["alpaca"], FORMS["sharegpt"]]))
    ds, _ = load_sources([good, good + "#1"], seed=0, streaming=True)
    assert isinstance(ds, datasets.IterableDataset) and canon(ds) == [CANON] * 3
    bad = str(write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS))
    ds, counts = load_sources([bad], seed=0, streaming=True)
    assert [r["__row__"] for r in ds] == [0, 7] and counts == Counter(BAD_COUNTS)
    ds, _ = load_sources([bad], seed=0, streaming=True, strict=True)
    with pytest.raises(RowError, match="bad.jsonl row 1"):
        list(ds)


def test_split_deterministic(tmp_path):
    f = str(write_jsonl(tmp_path / "a.jsonl", [{"text": f"row {i}"} for i in range(50)]))
    ds, _ = load_sources([f], seed=0)
    tr, va = split(ds, 0.1, seed=5)
    assert len(tr) == 45 and len(va) == 5 and va["__row__"] == split(ds, 0.1, seed=5)[1]["__row__"]
    assert sorted(list(tr["__row__"]) + list(va["__row__"])) == list(range(50))
    assert split(ds, 0.0, seed=5) == (ds, None)


def test_missing_path_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_source(str(tmp_path / "nope.jsonl"), seed=0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="not a local path.*hub.*local file"):
        load_source("some-org/some-dataset", seed=0)


def test_sampling_in_order_and_streams_take_first_rows(tmp_path):
    f = str(write_jsonl(tmp_path / "a.jsonl", [{"text": f"row {i}"} for i in range(20)]))
    assert load_source(f + "#5", seed=1, shuffle=False)["__row__"] == [0, 1, 2, 3, 4]
    assert load_source(f + "#45", seed=1, shuffle=False)["__row__"] == list(range(20)) * 2 + [0, 1, 2, 3, 4]
    ds, _ = load_sources([f + "#5"], seed=1, streaming=True)  # ms-swift: streams are sampled in order
    assert [r["__row__"] for r in ds] == [0, 1, 2, 3, 4]


def test_non_objects_non_utf8_and_empty_files(tmp_path):
    (tmp_path / "ints.json").write_text("[1, 2, 3]")  # Arrow would read a `text` column
    with pytest.raises(RowError, match=r"ints.json row 0: wrong type \(a row must be a JSON object, got int\)"):
        load_sources([str(tmp_path / "ints.json")], seed=0, strict=True)
    with pytest.raises(ValueError, match=r"ints.json: no usable rows: 3/3 rows dropped as wrong type"):
        load_sources([str(tmp_path / "ints.json")], seed=0)
    good = json.dumps(FORMS["alpaca"]).encode()
    bad = json.dumps({"query": "caf\u00e9", "response": "x"}, ensure_ascii=False).encode("latin-1")
    (tmp_path / "l.jsonl").write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    (tmp_path / "l.json").write_bytes(b"[" + good + b", " + bad + b"]")
    for name, where in (("l.jsonl", r"row 1 \(line 2\)"), ("l.json", "row 1")):
        with pytest.raises(RowError, match=rf"{name} {where}: invalid UTF-8"):
            load_sources([str(tmp_path / name)], seed=0, strict=True)
        for streaming in (False, True):
            ds, counts = load_sources([str(tmp_path / name)], seed=0, streaming=streaming)
            assert canon(ds) == [CANON] * (2 if name == "l.jsonl" else 1) and counts == Counter({"invalid UTF-8": 1})
    (tmp_path / "t.txt").write_bytes(b"fine\nw\xe9rld\n")
    with pytest.raises(ValueError, match=r"t.txt line 2: invalid UTF-8 \(byte 0xe9 at column 2\)"):
        load_sources([str(tmp_path / "t.txt")], seed=0)
    d = tmp_path / "dir"
    d.mkdir()
    (d / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="all 1 data files in it are empty"):
        load_sources([str(d)], seed=0)
    write_jsonl(d / "b.jsonl", [FORMS["alpaca"]])
    assert canon(load_sources([str(d)], seed=0)[0]) == [CANON]  # the empty file is skipped
    with pytest.raises(ValueError, match=r"empty.jsonl has no rows \(it is empty\)"):
        load_sources([str(d / "empty.jsonl")], seed=0, streaming=True)
