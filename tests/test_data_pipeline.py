"""Rows -> tokens end to end: formats agree, truncation and bad input behave, cached datasets."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import data_args, run_megatron
from megaswift.args.data import DataArgs
from megaswift.assets import fetch_llamafactory_data, fetch_smollm2
from megaswift.data.cached import load_cached_datasets
from megaswift.data.formats import PlaceholderError
from megaswift.data.pipeline import build_datasets
from megaswift.data.sources import load_train_val
from megaswift.data.template import IGNORE_INDEX

SYSTEM = "You are terse."
ROUNDS = [("Name a prime.", "7"), ("And an even one?", "2")]


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fetch_smollm2())


def _same_conversation_files(tmp_path):
    (q1, a1), (q2, a2) = ROUNDS
    msgs = [{"role": "system", "content": SYSTEM}] + [
        m for q, a in ROUNDS for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    share = [{"from": "system", "value": SYSTEM}] + [
        m for q, a in ROUNDS for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    return {
        "messages": _write(tmp_path / "m.jsonl", [{"messages": msgs}]),
        "sharegpt": _write(tmp_path / "s.jsonl", [{"conversations": share}]),
        "alpaca": _write(tmp_path / "a.jsonl", [{"system": SYSTEM, "instruction": q2, "input": "",
                                                 "output": a2, "history": [[q1, a1]]}]),
        "query_response": _write(tmp_path / "q.jsonl", [{"system": SYSTEM, "query": q2, "response": a2,
                                                         "history": [[q1, a1]]}]),
    }


def test_formats_give_identical_ids_and_labels(tokenizer, tmp_path):
    encoded = {}
    for name, path in _same_conversation_files(tmp_path).items():
        train, _, _ = build_datasets(data_args(dataset=[path]), tokenizer)
        encoded[name] = (train[0]["input_ids"], train[0]["labels"])
    first = encoded["messages"]
    assert all(v == first for v in encoded.values())
    trained = tokenizer.decode([t for t in first[1] if t != IGNORE_INDEX])
    assert trained == "7<|im_end|>2<|im_end|>"


def test_truncation_strategies(tokenizer, tmp_path):
    path = _write(tmp_path / "long.jsonl", [{"query": "word " * 60, "response": "ok"},
                                            {"query": "hi", "response": "hello"}])
    _, _, stats = build_datasets(data_args(dataset=[path], max_length=40, truncation_strategy="delete"), tokenizer)
    assert stats.rows == 1 and stats.dropped == {"too long": 1}
    train, _, stats = build_datasets(data_args(dataset=[path], max_length=40, truncation_strategy="left"), tokenizer)
    assert stats.rows == 2 and stats.truncated == 1 and max(len(r) for r in train["input_ids"]) == 40
    _, _, stats = build_datasets(data_args(dataset=[path], max_length=40, truncation_strategy="right"), tokenizer)
    assert stats.dropped == {"no trained tokens": 1}  # right truncation cut the whole answer


def test_held_out_rows_that_all_drop_mean_no_evaluation(tokenizer, tmp_path, caplog):
    """The default --split_dataset_ratio 0.01 holds out one row here; when it is too long the run
    trains without evaluation (one warning), while a --val_dataset with no usable row is an error."""
    rows = [{"query": "word " * 60, "response": "ok"}] * 10 + [{"query": "hi", "response": "hello"}] * 90
    path = _write(tmp_path / "d.jsonl", rows)
    seen = set()
    for seed in range(20):  # a seed whose held-out row is a long one
        train, val, stats = build_datasets(DataArgs(dataset=[path], max_length=40, data_seed=seed), tokenizer)
        seen.add(val is None)
        if val is None:
            assert "training without evaluation" in caplog.text and stats.val is None
            assert stats.rows + stats.dropped["too long"] == 99
            break
    assert True in seen, "no seed held out a long row"
    long = _write(tmp_path / "long.jsonl", [{"query": "word " * 60, "response": "ok"}] * 2)
    with pytest.raises(ValueError, match="no usable validation rows in .*long.jsonl"):
        build_datasets(DataArgs(dataset=[path], val_dataset=[long], max_length=40), tokenizer)


def test_lazy_and_streaming_match_eager(tokenizer):
    alpaca = str(fetch_llamafactory_data() / "alpaca_en_demo.json") + "#20"
    eager, _, _ = build_datasets(data_args(dataset=[alpaca]), tokenizer)
    lazy, _, _ = build_datasets(data_args(dataset=[alpaca], lazy_tokenize=True), tokenizer)
    assert [lazy[i]["input_ids"] for i in range(len(lazy))] == eager["input_ids"]
    stream, _, _ = build_datasets(data_args(dataset=[str(fetch_llamafactory_data() / "alpaca_en_demo.json")],
                                           streaming=True, dataset_shuffle=False), tokenizer)
    full, _, _ = build_datasets(data_args(dataset=[str(fetch_llamafactory_data() / "alpaca_en_demo.json")]), tokenizer)
    assert [r["input_ids"] for _, r in zip(range(30), stream)] == full["input_ids"][:30]


def test_streams_shuffled_through_a_buffer_reseeded_per_epoch(tokenizer):
    """--dataset_shuffle (default true) passes a stream through a --shuffle_buffer_size buffer,
    seeded by --data_seed and re-seeded per pass by set_epoch; #N takes a stream's first N rows."""
    alpaca = str(fetch_llamafactory_data() / "alpaca_en_demo.json") + "#40"
    full, _, _ = build_datasets(data_args(dataset=[alpaca], dataset_shuffle=False), tokenizer)

    def read(epoch=0, **kw):
        stream, _, _ = build_datasets(data_args(dataset=[alpaca], streaming=True, shuffle_buffer_size=16, **kw),
                                      tokenizer)
        stream.set_epoch(epoch)
        return [r["input_ids"] for r in stream]

    first = read()
    assert first == read() and first != full["input_ids"]  # deterministic, shuffled
    assert sorted(first) == sorted(full["input_ids"])       # the same 40 rows: the file's first 40
    assert read(epoch=1) != first and sorted(read(epoch=1)) == sorted(first)
    assert read(data_seed=7) != first
    assert read(dataset_shuffle=False) == full["input_ids"]


def test_streaming_packing_and_empty_streams(tokenizer, tmp_path):
    c4 = str(fetch_llamafactory_data() / "c4_demo.jsonl") + "#32"
    kw = dict(dataset=[c4], template="default", loss_scale="all", packing=True, packing_length=1024, max_length=256,
              truncation_strategy="right", dataset_shuffle=False)
    packed, _, stats = build_datasets(data_args(**kw), tokenizer)
    stream, _, _ = build_datasets(data_args(**kw, streaming=True), tokenizer)
    assert [dict(r) for r in stream] == packed.to_list() and stats.packed_rows == 7
    bad = _write(tmp_path / "bad.jsonl", [{"query": "word " * 80, "response": "ok"}] * 3)
    with pytest.raises(ValueError, match=r"no usable training \(streamed\) rows in .*bad.jsonl: "
                                         r"--max_length 40 drops 3/3 rows as too long"):
        build_datasets(data_args(dataset=[bad], max_length=40, streaming=True), tokenizer)


def test_cached_dataset_export(tmp_path):
    out = tmp_path / "cached"
    alpaca = fetch_llamafactory_data() / "alpaca_en_demo.json"
    proc = run_megatron(["export", "--model", str(fetch_smollm2()), "--to_cached_dataset", "true",
                         "--dataset", str(alpaca), "--save", str(out), "--packing", "true",
                         "--packing_length", "2048", "--dataset_num_proc", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert {"rows", "dropped", "truncated", "tokens", "packing_efficiency"} <= set(stats)
    # 999 rows with --split_dataset_ratio 0; its default 0.01 holds 10 of them out for validation
    assert stats["rows"] == 989 and stats["dropped"] == {} and stats["packing_efficiency"] >= 0.98
    train, val = load_cached_datasets([str(out)])
    assert val is not None and len(train) == stats["packed_rows"]
    assert sum(sum(r) for r in train["lengths"]) == stats["tokens"]
    assert max(len(r) for r in train["input_ids"]) <= 2048


@pytest.mark.parametrize("flags,message", [
    (["--columns", "{text1: query"], "--columns"),
    (["--template", "vicuna"], "unknown --template 'vicuna'"),
])
def test_bad_flags_are_clear_errors(tmp_path, flags, message):
    out = tmp_path / "out"
    path = _write(tmp_path / "d.jsonl", [{"query": "hi", "response": "hello"}])
    proc = run_megatron(["export", "--model", str(fetch_smollm2()), "--to_cached_dataset", "true",
                         "--dataset", path, "--save", str(out), *flags])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


def test_strict_names_file_and_row(tmp_path):
    out = tmp_path / "out"
    path = _write(tmp_path / "bad.jsonl", [{"query": "hi", "response": "hello"}, {"query": "hi", "response": " "}])
    proc = run_megatron(["export", "--model", str(fetch_smollm2()), "--to_cached_dataset", "true",
                         "--dataset", path, "--save", str(out), "--strict", "true"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "bad.jsonl row 1: empty assistant turn" in proc.stderr
    assert not out.exists()


SELF_COGNITION = [
    {"query": "你是？", "response": "我是{{NAME}}，由{{AUTHOR}}训练的人工智能助手。", "tag": "zh"},
    {"query": "你是谁!", "response": "您好！我是{{AUTHOR}}开发的人工智能语言模型，名为{{NAME}}。", "tag": "zh"},
    {"query": "who are you?", "response": "I am {{NAME}}, an AI assistant developed by {{AUTHOR}}.", "tag": "en"},
    {"query": "Are you {{NAME}}?", "response": "Yes, I am {{NAME}}, trained by {{AUTHOR}}.", "tag": "en"},
]


def _contents(ds):
    return [[m["content"] for m in r["messages"]] for r in ds]


def test_self_cognition_placeholders_filled_by_tag(tmp_path):
    path = tmp_path / "self-cognition.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in SELF_COGNITION), encoding="utf-8")
    two = dict(dataset=[str(path)], model_name=["小黄", "Xiao Huang"], model_author=["魔搭", "ModelScope"],
               dataset_shuffle=False)
    expected = [["你是？", "我是小黄，由魔搭训练的人工智能助手。"],
                ["你是谁!", "您好！我是魔搭开发的人工智能语言模型，名为小黄。"],
                ["who are you?", "I am Xiao Huang, an AI assistant developed by ModelScope."],
                ["Are you Xiao Huang?", "Yes, I am Xiao Huang, trained by ModelScope."]]
    for extra in ({}, {"dataset_num_proc": 2}, {"streaming": True}):
        train, _ = load_train_val(data_args(**two, **extra))
        assert _contents(train) == expected, extra
    one = dict(dataset=[str(path)], model_name=["swift-robot"], model_author=["swift"], dataset_shuffle=False)
    train, _ = load_train_val(data_args(**one))
    assert _contents(train) == [["你是？", "我是swift-robot，由swift训练的人工智能助手。"],
                                ["你是谁!", "您好！我是swift开发的人工智能语言模型，名为swift-robot。"],
                                ["who are you?", "I am swift-robot, an AI assistant developed by swift."],
                                ["Are you swift-robot?", "Yes, I am swift-robot, trained by swift."]]
    # rows without a tag column take the English value
    untagged = _write(tmp_path / "untagged.jsonl", [{"messages": [{"role": "user", "content": "Who?"},
                                                                  {"role": "assistant", "content": "{{NAME}}"}]}])
    train, _ = load_train_val(data_args(**{**two, "dataset": [untagged]}))
    assert _contents(train) == [["Who?", "Xiao Huang"]]


def test_self_cognition_placeholders_without_flags_are_an_error(tokenizer, tmp_path):
    path = tmp_path / "self-cognition.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in SELF_COGNITION), encoding="utf-8")
    with pytest.raises(PlaceholderError, match=r"self-cognition\.jsonl row 0 has self-cognition placeholders "
                                               r"\{\{NAME\}\} and \{\{AUTHOR\}\}: pass --model_name and --model_author"):
        build_datasets(data_args(dataset=[str(path)]), tokenizer)
    with pytest.raises(PlaceholderError, match=r"pass --model_author \("):
        build_datasets(data_args(dataset=[str(path)], model_name=["swift-robot"], strict=False), tokenizer)
    with pytest.raises(ValueError, match="--model_name takes one value, or two"):
        DataArgs(dataset=[str(path)], model_name=["a", "b", "c"])


def test_system_from_a_txt_file_resolved_once(tokenizer, tmp_path):
    prompt = "你是小黄。\nAnswer in one line.\\n literally.\n"
    path = tmp_path / "system.txt"
    path.write_text(prompt, encoding="utf-8")
    data = DataArgs(dataset=["x.jsonl"], system=str(path))
    assert data.system == prompt  # the file's content as is (ms-swift reads it whole)
    path.unlink()
    again = dataclasses.replace(data, max_length=64)  # __post_init__ again: not read or unescaped twice
    assert again.system == prompt
    assert DataArgs(system="Line one.\\nLine two.").system == "Line one.\nLine two."  # ms-swift's \\n
    assert DataArgs(system="no_such_dir/prompt").system == "no_such_dir/prompt"
    with pytest.raises(ValueError, match=r"--system '.*missing\.txt' ends in \.txt but is not a file"):
        DataArgs(system=str(tmp_path / "missing.txt"))
    rows = _write(tmp_path / "d.jsonl", [{"query": "hi", "response": "hello"}])
    path.write_text(prompt, encoding="utf-8")
    train, _, _ = build_datasets(data_args(dataset=[rows], system=str(path)), tokenizer)
    assert tokenizer.decode(train[0]["input_ids"]).startswith(f"<|im_start|>system\n{prompt}<|im_end|>\n")
