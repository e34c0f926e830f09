"""Recognise row formats without configuration and normalise every row to one canonical form.

Canonical row (what every later stage consumes)::

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
     "rejected_response": str | None,   # preference rows only
     "tools": str | None,               # JSON text of the tool list, if the row had one
     "__source__": str, "__row__": int} # bookkeeping: file and 0-based row, for errors

Recognised inputs (column names as in ms-swift / LLaMA-Factory / OpenAI / TRL): ``messages``
(OpenAI, incl. simple ``tool_calls``), ``conversations`` (ShareGPT ``from``/``value``, with
optional LLaMA-Factory ``chosen``/``rejected``), ``chosen_messages``/``rejected_messages``,
``prompt``+``chosen``+``rejected`` or ``chosen``/``rejected`` message lists, alpaca
``instruction``/``input``/``output``, ``query``/``response``, ``prompt``/``completion`` and
plain ``text`` (pretraining: the text is the assistant response). ``system`` and ``history``
columns are honoured where the format has them.

Preference rows (``rejected_response`` set) come from: ms-swift ``messages`` (ending with the chosen
assistant turn) + ``rejected_response`` (or + ``rejected_messages``); LLaMA-Factory sharegpt
``conversations`` + ``chosen``/``rejected`` message dicts; LLaMA-Factory alpaca
``instruction``/``input`` + ``chosen``/``rejected`` strings, or an ``output`` list
``[chosen, rejected]`` (its older ranking format); TRL's ``prompt``/``chosen``/``rejected`` (strings
or message lists) and its implicit-prompt form (``chosen``/``rejected`` full conversations);
``chosen_messages``/``rejected_messages`` (LLaMA-Factory v1). Where the rejected side is a full
conversation, everything before its last message must equal the chosen side's ("prompt mismatch").

Self-cognition rows (ms-swift's ``swift/self-cognition`` and any row like it) hold ``{{NAME}}`` and
``{{AUTHOR}}`` placeholders in their text and a ``tag`` column ``zh`` or ``en``. As ms-swift's
SelfCognitionPreprocessor, normalisation fills them from ``--model_name`` / ``--model_author``
(:class:`SelfCognition`): the first value in ``zh`` rows, the second in the others (rows without a
``tag`` too); a single value serves both. A row with a placeholder whose flag is not given is a
:class:`PlaceholderError` naming the flag and the file, whatever ``--strict`` says.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from collections import Counter
from typing import Any, Optional, Sequence, Union

import datasets
import pyarrow.compute as pc

logger = logging.getLogger("megaswift.data")
AnyDataset = Union[datasets.Dataset, datasets.IterableDataset]

REASONS = ("unknown format", "missing field", "wrong type", "empty assistant turn",
           "no assistant turn", "invalid JSON", "invalid UTF-8", "prompt mismatch")
CANONICAL_COLUMNS = ("messages", "rejected_response", "tools", "__source__", "__row__")
CANONICAL_FEATURES = datasets.Features({
    "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    "rejected_response": datasets.Value("string"),
    "tools": datasets.Value("string"),
    "__source__": datasets.Value("string"),
    "__row__": datasets.Value("int64"),
})
_FLAGGED_FEATURES = datasets.Features({**CANONICAL_FEATURES, "__reason__": datasets.Value("string"),
                                       "__detail__": datasets.Value("string")})
# map() fingerprints module functions by name only: key cached results to this file's code too
_CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
          "gpt": "assistant", "bot": "assistant", "model": "assistant", "function_call": "assistant",
          "tool": "tool", "observation": "tool", "function": "tool", "ipython": "tool"}


class RowError(ValueError):
    """A row that cannot be normalised. ``reason`` is one of REASONS (stable, for counting)."""

    def __init__(self, reason: str, detail: str = "", source: Optional[str] = None,
                 row: Optional[int] = None, line: Optional[int] = None):
        super().__init__(reason, detail, source, row, line)
        self.reason, self.detail, self.source, self.row, self.line = reason, detail, source, row, line

    def __str__(self) -> str:
        where = "" if self.source is None else str(self.source)
        if self.row is not None:
            where += f" row {self.row}"
        if self.line is not None:
            where += f" (line {self.line})" if self.row is not None else f" line {self.line}"
        msg = f"{where.strip()}: {self.reason}" if where.strip() else self.reason
        return msg + (f" ({self.detail})" if self.detail else "")


class PlaceholderError(ValueError):
    """A self-cognition placeholder without the ``--model_name``/``--model_author`` value to fill it."""


_PLACEHOLDERS = {"{{NAME}}": "model_name", "{{AUTHOR}}": "model_author"}


class SelfCognition:
    """``--model_name`` / ``--model_author`` (each: no value, one for both languages, or Chinese and
    English) filling the ``{{NAME}}`` / ``{{AUTHOR}}`` placeholders of normalised rows."""

    def __init__(self, model_name: Sequence[str] = (), model_author: Sequence[str] = ()):
        self.values = {"{{NAME}}": _zh_en(model_name), "{{AUTHOR}}": _zh_en(model_author)}

    def __bool__(self) -> bool:
        return any(v is not None for v in self.values.values())

    def fill(self, messages: list[dict], rejected: Optional[str], tag: Any,
             where: Optional[str] = None) -> tuple[list[dict], Optional[str]]:
        """``messages`` and ``rejected`` with the placeholders replaced (for ``tag``'s language);
        ``where`` (file and row) names the row in a PlaceholderError."""
        texts = [m["content"] for m in messages] + ([rejected] if rejected is not None else [])
        present = [p for p in _PLACEHOLDERS if any(p in t for t in texts)]
        if not present:
            return messages, rejected
        missing = [_PLACEHOLDERS[p] for p in present if self.values[p] is None]
        if missing:
            flags = " and ".join(f"--{m}" for m in missing)
            raise PlaceholderError(
                f"{where or 'a dataset row'} has self-cognition placeholders {' and '.join(present)}: "
                f"pass {flags} (e.g. --model_name 小黄 'Xiao Huang' --model_author 魔搭 ModelScope) to fill them")
        lang = 0 if tag == "zh" else 1

        def sub(text: str) -> str:
            for p in present:
                text = text.replace(p, self.values[p][lang])
            return text

        messages = [{**m, "content": sub(m["content"])} for m in messages]
        return messages, (sub(rejected) if rejected is not None else None)


def _zh_en(values: Union[str, Sequence[str], None]) -> Optional[tuple[str, str]]:
    """(Chinese, English) from a flag's values; one value serves both (ms-swift)."""
    if not values:
        return None
    values = [values] if isinstance(values, str) else list(values)
    if len(values) > 2:
        raise ValueError(f"self-cognition names take one or two values (Chinese, English), got {values}")
    return values[0], values[-1]


def _has(row: dict, key: str) -> bool:
    return row.get(key) is not None


def _text(value: Any, field: str) -> str:
    """A string field; numbers (CSV columns) become text, anything else is a wrong type."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):  # content parts
        parts = []
        for p in value:
            if p.get("type", "text") != "text":
                raise RowError("wrong type", f"{field!r} has a non-text part {p.get('type')!r}")
            t = p.get("text") if p.get("text") is not None else p.get("value")
            if not isinstance(t, str):
                raise RowError("wrong type", f"{field!r} has a text part without a string")
            parts.append(t)
        return "".join(parts)
    raise RowError("wrong type", f"{field!r} must be a string, got {type(value).__name__}")


def _list(row: dict, key: str) -> list:
    """A list field; a string holding a JSON list (CSV cells) is decoded."""
    value = row[key]
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, list):
        raise RowError("wrong type", f"{key!r} must be a list, got {type(value).__name__}")
    return value


def _drop_nones(x: Any) -> Any:
    """Remove None-valued keys that Arrow's schema union adds to free-form nested objects."""
    if isinstance(x, dict):
        return {k: _drop_nones(v) for k, v in x.items() if v is not None}
    return [_drop_nones(v) for v in x] if isinstance(x, list) else x


def _tool_call_text(calls: Any) -> Optional[str]:
    """JSON text for simple tool calls ({name, arguments}), as LLaMA-Factory's function_call."""
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for c in calls:
        f = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            return None
        args = f.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        out.append({"name": f["name"], "arguments": _drop_nones(args) if args is not None else {}})
    return json.dumps(out[0] if len(out) == 1 else out, ensure_ascii=False) if out else None


def _message(m: Any, field: str) -> dict:
    if not isinstance(m, dict):
        raise RowError("wrong type", f"{field!r} items must be objects, got {type(m).__name__}")
    role = m.get("role") if m.get("role") is not None else m.get("from")
    if role is None:
        raise RowError("missing field", f"a message in {field!r} has no 'role'/'from'")
    if not isinstance(role, str) or role.lower() not in _ROLES:
        raise RowError("wrong type", f"unknown role {role!r} in {field!r}")
    raw = m.get("content") if m.get("content") is not None else m.get("value")
    content = "" if raw is None else _text(raw, f"{field}.content")
    calls = m.get("tool_calls") or m.get("function_call")
    if calls:
        call_text = _tool_call_text(calls)
        if call_text is not None:
            content = f"{content}\n{call_text}" if content.strip() else call_text
    elif raw is None:
        raise RowError("missing field", f"a message in {field!r} has no 'content'/'value'")
    return {"role": _ROLES[role.lower()], "content": content}


def _messages(row: dict, key: str) -> list[dict]:
    return [_message(m, key) for m in _list(row, key)]


def _assistant_text(value: Any, field: str) -> str:
    """chosen/rejected given as a string, a {"from"/"role", "value"/"content"} dict or a message list."""
    if isinstance(value, dict):
        return _message(value, field)["content"]
    if isinstance(value, list) and value and isinstance(value[0], dict) and ("role" in value[0] or "from" in value[0]):
        msgs = [_message(m, field) for m in value]
        if msgs[-1]["role"] != "assistant":
            raise RowError("no assistant turn", f"{field!r} does not end with an assistant message")
        return msgs[-1]["content"]
    return _text(value, field)


def _rejected_conversation(row: dict, key: str, chosen: list[dict]) -> str:
    """The last assistant text of a full rejected conversation whose prompt must match ``chosen``'s."""
    rejected = _messages(row, key)
    if not rejected or rejected[-1]["role"] != "assistant":
        raise RowError("no assistant turn", f"{key!r} does not end with an assistant message")
    if rejected[:-1] != chosen[:-1]:
        raise RowError("prompt mismatch", f"the messages before the last one of {key!r} differ from the "
                       "chosen conversation's")
    return rejected[-1]["content"]


def _pairs(row: dict, key: str = "history") -> list[dict]:
    out = []
    for pair in (_list(row, key) if _has(row, key) else []):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowError("wrong type", f"{key!r} must be a list of [query, response] pairs")
        out += [_user(_text(pair[0], key)), _asst(_text(pair[1], key))]
    return out


def _system(row: dict) -> list[dict]:
    s = _text(row["system"], "system") if _has(row, "system") else ""
    return [{"role": "system", "content": s}] if s.strip() else []


def _need(row: dict, *keys: str) -> None:
    for k in keys:
        if not _has(row, k):
            raise RowError("missing field", f"no {k!r}")


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _asst(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _opt(row: dict, key: str) -> Optional[str]:
    return _assistant_text(row[key], key) if _has(row, key) else None


def _prompt(row: dict) -> list[dict]:
    """A ``prompt`` column: a message list or a user string."""
    p = row["prompt"]
    return _messages(row, "prompt") if isinstance(p, list) else [_user(_text(p, "prompt"))]


def _preference(row: dict) -> tuple[list[dict], Optional[str]]:
    """Rows with chosen/rejected; returns (messages ending with chosen, rejected text)."""
    if _has(row, "chosen_messages"):
        _need(row, "rejected_messages")
        chosen = _messages(row, "chosen_messages")
        return chosen, _rejected_conversation(row, "rejected_messages", chosen)
    _need(row, "chosen", "rejected")
    if _has(row, "conversations"):
        prompt = _system(row) + _messages(row, "conversations")
    elif _has(row, "prompt"):
        prompt = _system(row) + _prompt(row)
    elif _has(row, "instruction") or _has(row, "input"):
        prompt = _system(row) + _alpaca_prompt(row)
    elif isinstance(row["chosen"], list):  # implicit prompt: full conversations
        chosen = _messages(row, "chosen")
        if isinstance(row["rejected"], list) and len(row["rejected"]) > 1:
            return chosen, _rejected_conversation(row, "rejected", chosen)
        return chosen, _opt(row, "rejected")
    else:
        raise RowError("missing field", "string 'chosen'/'rejected' need a 'prompt'")
    return prompt + [_asst(_assistant_text(row["chosen"], "chosen"))], _opt(row, "rejected")


def _alpaca_prompt(row: dict) -> list[dict]:
    """history + instruction/input joined with a newline (empty parts skipped)."""
    parts = [_text(row[k], k) for k in ("instruction", "input") if _has(row, k)]
    parts = [p for p in parts if p]
    if not parts:
        raise RowError("missing field", "alpaca row has no 'instruction'")
    return _pairs(row) + [_user("\n".join(parts))]


def _build(row: dict) -> tuple[list[dict], Optional[str]]:
    """Detect the format and return (messages, rejected_response) before validation."""
    if _has(row, "messages"):
        messages = _messages(row, "messages")
        if _has(row, "rejected_messages") and not _has(row, "rejected_response"):
            return messages, _rejected_conversation(row, "rejected_messages", messages)
        return messages, _opt(row, "rejected_response")
    if _has(row, "chosen") or _has(row, "chosen_messages"):
        return _preference(row)
    if _has(row, "conversations"):
        return _system(row) + _messages(row, "conversations"), None
    if any(_has(row, k) for k in ("instruction", "input", "output")):
        _need(row, "output")
        prompt = _system(row) + _alpaca_prompt(row)
        if isinstance(row["output"], list) and not any(isinstance(x, dict) for x in row["output"]):
            # LLaMA-Factory's older ranking rows: [chosen, rejected] (a list of dicts: content parts)
            if len(row["output"]) != 2:
                raise RowError("wrong type", f"a list 'output' must be [chosen, rejected], got "
                               f"{len(row['output'])} items")
            return prompt + [_asst(_text(row["output"][0], "output[0]"))], _text(row["output"][1], "output[1]")
        return prompt + [_asst(_text(row["output"], "output"))], None
    if _has(row, "query") or _has(row, "response"):
        _need(row, "query", "response")
        turn = [_user(_text(row["query"], "query")), _asst(_text(row["response"], "response"))]
        return _system(row) + _pairs(row) + turn, _opt(row, "rejected_response")
    if _has(row, "prompt") or _has(row, "completion"):
        _need(row, "prompt", "completion")
        return _prompt(row) + [_asst(_assistant_text(row["completion"], "completion"))], None
    if _has(row, "text"):
        return [_asst(_text(row["text"], "text"))], None
    cols = sorted(k for k in row if not k.startswith("__") and row[k] is not None)
    raise RowError("unknown format", f"columns {cols}")


def _decode(row: dict) -> dict:
    """Rows that the loader could only keep as raw JSON text (see sources.py) are decoded here."""
    try:
        obj = json.loads(row["__json__"])
    except json.JSONDecodeError as e:
        raise RowError("invalid JSON", e.msg) from None
    if not isinstance(obj, dict):
        raise RowError("wrong type", f"a row must be a JSON object, got {type(obj).__name__}")
    return obj


def normalize(row: dict, self_cognition: Optional[SelfCognition] = None) -> dict:
    """Normalise one raw row to the canonical form; raise RowError (naming source/row) if bad.

    ``{{NAME}}``/``{{AUTHOR}}`` placeholders are filled by ``self_cognition`` (by the row's ``tag``);
    a placeholder it has no value for raises PlaceholderError naming the flag and the file."""
    source, index, line = row.get("__source__"), row.get("__row__"), row.get("__line__")
    try:
        if row.get("__error__") is not None:  # a row the loader could not parse (sources.py)
            raise RowError(*json.loads(row["__error__"]))
        data = _decode(row) if row.get("__json__") is not None else row
        messages, rejected = _build(data)
        where = f"{source} row {index}" if index is not None else source
        messages, rejected = (self_cognition or _NO_SELF_COGNITION).fill(messages, rejected, data.get("tag"), where)
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError("no assistant turn")
        if messages[-1]["role"] != "assistant":
            raise RowError("no assistant turn", f"the conversation ends with a {messages[-1]['role']} message")
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and not m["content"].strip():
                raise RowError("empty assistant turn", f"message {i}")
        if rejected is not None and not rejected.strip():
            raise RowError("empty assistant turn", "the rejected response is empty")
        tools = data.get("tools")
        if tools is not None and not isinstance(tools, str):
            tools = json.dumps(_drop_nones(tools), ensure_ascii=False)
    except RowError as e:
        e.source, e.row, e.line = source, index, line
        raise
    return {"messages": messages, "rejected_response": rejected, "tools": tools or None,
            "__source__": source, "__row__": index}


_NO_SELF_COGNITION = SelfCognition()


def _normalize_flagged(row: dict, code_version: str = _CODE_VERSION,
                       self_cognition: Optional[SelfCognition] = None) -> dict:
    """Map function: the canonical row plus __reason__/__detail__ (None when the row is good)."""
    try:
        return {**normalize(row, self_cognition), "__reason__": None, "__detail__": None}
    except RowError as e:
        detail = json.dumps([e.detail, e.line])
        return {"messages": [], "rejected_response": None, "tools": None, "__source__": row.get("__source__"),
                "__row__": row.get("__row__"), "__reason__": e.reason, "__detail__": detail}


def _raise_flagged(row: dict) -> dict:
    if row["__reason__"] is not None:
        detail, line = json.loads(row["__detail__"])
        raise RowError(row["__reason__"], detail, row["__source__"], row["__row__"], line)
    return row


class _StreamDropCounter:
    """Filter for streams: keeps good rows, counts dropped ones (in the iterating process) and
    logs the first few."""

    LOG_FIRST = 10

    def __init__(self, counts: Counter):
        self.counts = counts

    def __call__(self, row: dict) -> bool:
        if row["__reason__"] is None:
            return True
        self.counts[row["__reason__"]] += 1
        n = sum(self.counts.values())
        if n <= self.LOG_FIRST:
            try:
                _raise_flagged(row)
            except RowError as e:
                more = "; further dropped rows are counted without logging" if n == self.LOG_FIRST else ""
                logger.warning("dropped %s%s", e, more)
        return False


def _summarize(counts_by_source: dict[str, Counter]) -> None:
    for source, c in counts_by_source.items():
        parts = ", ".join(f"{n} {reason}" for reason, n in c.most_common())
        logger.warning("dropped %d rows of %s: %s", sum(c.values()), source, parts)


def normalize_dataset(ds: AnyDataset, *, strict: bool, num_proc: int = 1,
                      counts: Optional[Counter] = None,
                      self_cognition: Optional[SelfCognition] = None) -> tuple[AnyDataset, Counter]:
    """Normalise every row of ``ds`` (keeping only canonical columns), filling self-cognition
    placeholders with ``self_cognition`` (a placeholder without a value: PlaceholderError).

    strict=True: the first bad row (lowest index) raises RowError naming its file and row.
    strict=False: bad rows are dropped; returns the Counter of dropped rows by reason and logs
    one summary line per source to the ``megaswift.data`` logger. For an IterableDataset the
    work is lazy: errors are raised / rows dropped during iteration, and the returned Counter
    fills up as the stream is consumed in this process. Pass ``counts`` to add to an existing Counter.
    """
    counts = Counter() if counts is None else counts
    if isinstance(ds, datasets.IterableDataset):
        out = ds.map(_normalize_flagged, features=_FLAGGED_FEATURES, fn_kwargs={"self_cognition": self_cognition})
        out = out.select_columns(list(_FLAGGED_FEATURES))
        out = out.map(_raise_flagged) if strict else out.filter(_StreamDropCounter(counts))
        return out.select_columns(list(CANONICAL_COLUMNS)), counts
    if len(ds) == 0:
        return datasets.Dataset.from_dict({c: [] for c in CANONICAL_COLUMNS}, features=CANONICAL_FEATURES), counts
    keep = {"__source__", "__row__"}
    out = ds.map(_normalize_flagged, remove_columns=[c for c in ds.column_names if c not in keep],
                 features=_FLAGGED_FEATURES,
                 fn_kwargs={"code_version": _CODE_VERSION, "self_cognition": self_cognition},
                 num_proc=num_proc if num_proc > 1 and len(ds) > 1 else None, desc="normalising rows")
    table = out.data.table  # map() output has no indices mapping: rows in order
    bad = table.filter(pc.is_valid(table.column("__reason__")))
    if bad.num_rows:
        if strict:
            _raise_flagged(bad.slice(0, 1).to_pylist()[0])
        by_source: dict[str, Counter] = {}
        for r in bad.select(["__source__", "__reason__"]).to_pylist():
            by_source.setdefault(r["__source__"], Counter())[r["__reason__"]] += 1
            counts[r["__reason__"]] += 1
        first = _StreamDropCounter.LOG_FIRST
        for r in bad.slice(0, first).to_pylist():  # the first few by file, row and line
            try:
                _raise_flagged(r)
            except RowError as e:
                logger.warning("dropped %s", e)
        _summarize(by_source)
        out = out.filter(lambda reasons: [r is None for r in reasons], input_columns="__reason__",
                         batched=True, num_proc=None)
    return out.remove_columns(["__reason__", "__detail__"]), counts
