"""Chat templates: normalised rows -> ``input_ids`` and ``labels`` (Megatron-SWIFT's ``--template``,
``--system`` and ``--loss_scale``).

Every template is a Jinja chat template rendered by ``tokenizer.apply_chat_template``: the tokenizer's
own or a built-in one (:data:`BUILTIN_TEMPLATES`). So the text of a sample is exactly
``apply_chat_template(messages, tokenize=False)`` and its ids are exactly what
``apply_chat_template(messages, tokenize=True)`` returns (the text tokenised once, with
``add_special_tokens=False``: templates write their own BOS).

``--template`` takes ms-swift's template names:

* unset: the tokenizer's own chat template (an error when it has none).
* ``chatml`` and ``default``: always the built-in template of that name.
* a model-family name (:data:`FAMILY_TEMPLATES`: ``qwen``, ``qwen2``, ``qwen2_5``, ``qwen2_5_math``,
  ``qwq_preview``, ``qwq``, ``qwen3``, ``qwen3_thinking``, ``qwen3_nothinking``, ``llama3``,
  ``llama3_1``, ``llama3_2``, ``llama3_3``): the tokenizer's own chat template when it has one (so
  the rendering stays that of the model's chat template), else the family's built-in fallback
  (ChatML with the family's ms-swift default system prompt for the Qwen names, ``llama3`` for the
  Llama-3 names; ms-swift's ``<think>`` prefixes and Llama-3.2 date header are not reproduced by
  the fallbacks). One info line on the ``megaswift.data`` logger says which was used.
* anything else: an error listing the known names.

Which tokens are trained (labels != -100), as in ms-swift:

* An **assistant span** covers, for one assistant message, the text the model has to generate after
  the generation prompt, up to and including the end-of-turn marker:

  - start: where ``render(messages[:i], add_generation_prompt=True)`` ends, when that render is a
    prefix of the full render and the text between it and the message content holds no special token
    (so Qwen3's empty ``<think>\\n\\n</think>\\n\\n`` before the last answer is trained, like ms-swift's
    qwen3 template trains its non-thinking prefix); otherwise where the content itself starts (found
    in the full render after the previous span; for templates that rewrite the content, its stripped
    form or the part after ``</think>`` is looked for too). The role header is never trained.
  - end: the content's end plus the end-of-turn marker: the one special token (tokenizer special or
    added special token, e.g. ``<|im_end|>``, ``<|eot_id|>``, the EOS) written right after the
    content, optional spaces/tabs before it included. The newline templates put after the marker is
    not trained (ms-swift trains the suffix / ``_add_dynamic_eos`` marker, not ``chat_sep``'s newline).
    No special token right after the content (e.g. the ``default`` template between turns): no marker.

* A token is trained when its character span overlaps a trained assistant span.
* ``loss_scale="default"``: every assistant span. ``"last_round"``: the spans of the assistant
  messages after the last user message (all of them when there is no user message). ``"all"``: every
  token, labels == input_ids. ``"ignore_empty_think"`` (ms-swift's ``<think>\\s*</think>\\s*``
  weighted 0): as ``default``, but an empty think block at the start of an assistant span
  (``<think>``, only whitespace, ``</think>`` and the whitespace after it, e.g. the
  ``<think>\\n\\n</think>\\n\\n`` Qwen3's template writes before the last answer) is not trained;
  a think block with reasoning in it is.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Optional

logger = logging.getLogger("megaswift.data")

LOSS_SCALES = ("default", "last_round", "all", "ignore_empty_think")
IGNORE_INDEX = -100

_CHATML_BODY = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
# ms-swift's default system prompts of its qwen2_5, qwen2_5_math and qwq_preview templates.
QWEN2_5_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN2_5_MATH_DEFAULT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QWQ_PREVIEW_DEFAULT_SYSTEM = ("You are a helpful and harmless assistant. You are Qwen developed by Alibaba. "
                              "You should think step-by-step.")


def _chatml_with_default_system(system: str) -> str:
    """ChatML that writes ``system`` as the system message when the conversation has none."""
    quoted = system.replace("\\", "\\\\").replace("'", "\\'")
    return ("{% if messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\\n" + quoted + "<|im_end|>\\n' }}{% endif %}" + _CHATML_BODY)


BUILTIN_TEMPLATES: dict[str, str] = {
    # <|im_start|>role\ncontent<|im_end|>\n per message.
    "chatml": _CHATML_BODY,
    # chatml plus ms-swift's qwen default system prompt when the conversation has none.
    "qwen": _chatml_with_default_system(QWEN_DEFAULT_SYSTEM),
    # the same with ms-swift's qwen2_5 / qwen2_5_math / qwq_preview default system prompts.
    "qwen2_5": _chatml_with_default_system(QWEN2_5_DEFAULT_SYSTEM),
    "qwen2_5_math": _chatml_with_default_system(QWEN2_5_MATH_DEFAULT_SYSTEM),
    "qwq_preview": _chatml_with_default_system(QWQ_PREVIEW_DEFAULT_SYSTEM),
    # Llama-3: <|begin_of_text|> then <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>.
    "llama3": (
        "{{ '<|begin_of_text|>' }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Plain generation template (`megatron pt`): contents concatenated, no role markup, EOS at the end.
    # A BOS is prepended (see Template) when the tokenizer itself adds one when encoding text.
    "default": ("{% for message in messages %}{{ message['content'] }}{% endfor %}"
                "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}"),
}
# Markup a built-in template writes, which should be single special tokens of the tokenizer.
_CHATML_MARKUP = ("<|im_start|>", "<|im_end|>")
_BUILTIN_MARKUP = {"chatml": _CHATML_MARKUP, "qwen": _CHATML_MARKUP, "qwen2_5": _CHATML_MARKUP,
                   "qwen2_5_math": _CHATML_MARKUP, "qwq_preview": _CHATML_MARKUP,
                   "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
# ms-swift --template names of model families -> the built-in used when the tokenizer has no chat
# template of its own (with one, the tokenizer's own is used). qwen2, llama3_1 and llama3_3 are
# ms-swift model types (whose models use its qwen / llama3_2 templates), accepted as aliases.
FAMILY_TEMPLATES: dict[str, str] = {
    "qwen": "qwen", "qwen2": "qwen", "qwen2_5": "qwen2_5", "qwen2_5_math": "qwen2_5_math",
    "qwq_preview": "qwq_preview", "qwq": "chatml", "qwen3": "chatml", "qwen3_thinking": "chatml",
    "qwen3_nothinking": "chatml",
    "llama3": "llama3", "llama3_1": "llama3", "llama3_2": "llama3", "llama3_3": "llama3",
}
# Names that always mean the built-in template.
_PLAIN_BUILTINS = ("chatml", "default")
KNOWN_TEMPLATES: tuple[str, ...] = (*_PLAIN_BUILTINS, *FAMILY_TEMPLATES)
# ms-swift's ignore_empty_think loss scale: an empty think block (and the whitespace after it) weighs 0.
_EMPTY_THINK_RE = re.compile(r"<think>\s*</think>\s*")


class Template:
    """Turns normalised rows into token ids and labels with one chat template.

    Args:
        tokenizer: a *fast* Hugging Face tokenizer (character offsets are needed).
        name: ``None`` for the tokenizer's own ``chat_template``, else an ms-swift template name
            (:data:`KNOWN_TEMPLATES`): ``chatml``/``default`` are built-ins; a model-family name uses
            the tokenizer's own chat template when it has one, else its built-in fallback
            (:data:`FAMILY_TEMPLATES`; see the module docstring).
        system: system prompt replacing the row's system message (or inserted first when the row has
            none), and so also the template's default system prompt.
        loss_scale: ``"default"``, ``"last_round"``, ``"all"`` or ``"ignore_empty_think"`` (see the
            module docstring).

    ``builtin`` is the built-in template used (None for the tokenizer's own).
    A plain picklable object: ``dataset.map(template.encode_batch, batched=True, num_proc=N)`` works.
    """

    def __init__(self, tokenizer: Any, name: Optional[str] = None, system: Optional[str] = None,
                 loss_scale: str = "default") -> None:
        if loss_scale not in LOSS_SCALES:
            raise ValueError(f"--loss_scale {loss_scale!r} is not one of {', '.join(LOSS_SCALES)}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; templates need character offsets")
        self.tokenizer = tokenizer
        self.name = name
        self.system = system
        self.loss_scale = loss_scale
        has_own = bool(getattr(tokenizer, "chat_template", None))
        if name is None:
            if not has_own:
                raise ValueError(f"the tokenizer has no chat template; pass --template "
                                 f"({', '.join(KNOWN_TEMPLATES)}) to choose a built-in one")
            self.builtin: Optional[str] = None
        elif name in _PLAIN_BUILTINS:
            self.builtin = name
        elif name in FAMILY_TEMPLATES:
            self.builtin = None if has_own else FAMILY_TEMPLATES[name]
            if has_own:
                logger.info("--template %s: using the tokenizer's own chat template", name)
            else:
                logger.info("--template %s: the tokenizer has no chat template; using the built-in %s template",
                            name, self.builtin)
        else:
            raise ValueError(f"unknown --template {name!r}; known: {', '.join(KNOWN_TEMPLATES)} "
                             "(or leave it unset to use the tokenizer's own chat template)")
        if self.builtin is None:
            self.chat_template: str = tokenizer.get_chat_template()
        else:
            self.chat_template = BUILTIN_TEMPLATES[self.builtin]
            if self.builtin == "default":
                if tokenizer.eos_token is None:
                    raise ValueError("--template default ends every sample with the EOS token, "
                                     "but the tokenizer has none")
                if _adds_bos(tokenizer):
                    self.chat_template = "{{ bos_token }}" + self.chat_template
        specials = {t for t in tokenizer.all_special_tokens if t}
        specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content}
        missing = [t for t in _BUILTIN_MARKUP.get(self.builtin or "", ()) if t not in specials]
        if missing:
            logger.warning("--template %s writes %s, which this tokenizer does not have as special tokens: "
                           "they will be tokenised as plain text; is --template right for this model?",
                           self.builtin, " ".join(missing))
        alternatives = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        self._special_re = re.compile(f"(?:{alternatives})") if specials else None
        self._marker_re = re.compile(f"[ \\t]*(?:{alternatives})") if specials else None

    # ------------------------------------------------------------------ rendering
    def with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """``messages`` with ``--system`` applied (copies; the input is left alone)."""
        messages = [dict(m) for m in messages]
        if self.system is not None:
            if messages and messages[0]["role"] == "system":
                messages[0]["content"] = self.system
            else:
                messages.insert(0, {"role": "system", "content": self.system})
        return messages

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
               tools: Optional[list] = None) -> str:
        """The conversation as text, ``--system`` applied: what :meth:`encode` tokenises
        (``tokenizer.apply_chat_template(..., tokenize=False)`` with this template)."""
        return self._render(self.with_system(messages), add_generation_prompt, tools)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                tools: Optional[list] = None) -> str:
        kwargs = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    # ------------------------------------------------------------------ encoding
    def encode(self, row: dict[str, Any]) -> dict[str, list[int]]:
        """Encode one normalised row.

        Returns ``input_ids`` and ``labels`` (same length; -100 where not trained), plus
        ``rejected_input_ids`` / ``rejected_labels`` when ``row["rejected_response"]`` is set: the same
        conversation with the last assistant message's content replaced by the rejected response.
        Raises ValueError for rows that cannot be encoded (no assistant message to train on,
        an assistant message the template does not render, bad ``tools`` JSON).
        """
        messages = self.with_system(row["messages"])
        tools = _parse_tools(row.get("tools"))
        out = dict(zip(("input_ids", "labels"), self._encode_messages(messages, tools)))
        rejected = row.get("rejected_response")
        if rejected is not None:
            if not messages or messages[-1]["role"] != "assistant":
                raise ValueError("a row with a rejected_response must end with an assistant message")
            rejected_messages = messages[:-1] + [{**messages[-1], "content": rejected}]
            out["rejected_input_ids"], out["rejected_labels"] = self._encode_messages(rejected_messages, tools)
        return out

    def encode_batch(self, batch: dict[str, list]) -> dict[str, list]:
        """Batched form of :meth:`encode` for ``datasets.map(batched=True)``: columns in, columns out.

        The rejected columns are present when the batch has a ``rejected_response`` column
        (None for rows without one)."""
        n = len(batch["messages"])
        rows = [{k: batch[k][i] for k in batch} for i in range(n)]
        encoded = [self.encode(r) for r in rows]
        keys = ["input_ids", "labels"] + (["rejected_input_ids", "rejected_labels"]
                                          if "rejected_response" in batch else [])
        return {k: [e.get(k) for e in encoded] for k in keys}

    def _encode_messages(self, messages: list[dict[str, str]], tools: Optional[list]) -> tuple[list[int], list[int]]:
        text = self._render(messages, tools=tools)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(enc["input_ids"])
        if self.loss_scale == "all":
            return input_ids, list(input_ids)
        spans = self._assistant_spans(messages, text, tools)
        labels = [IGNORE_INDEX] * len(input_ids)
        k = 0
        for t, (s, e) in enumerate(enc["offset_mapping"]):
            e = max(e, s + 1)  # a token is trained when its characters overlap a span
            while k < len(spans) and spans[k][1] <= s:
                k += 1
            if k == len(spans):
                break
            if spans[k][0] < e:
                labels[t] = input_ids[t]
        return input_ids, labels

    def _assistant_spans(self, messages: list[dict[str, str]], text: str,
                         tools: Optional[list]) -> list[tuple[int, int]]:
        """Character spans of the trained assistant messages (see the module docstring)."""
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant:
            raise ValueError("the row has no assistant message to train on")
        if self.loss_scale == "last_round":
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
            trained = {i for i in assistant if i > last_user}
        else:
            trained = set(assistant)
        spans, cursor = [], 0
        for i, message in enumerate(messages):
            content = message["content"]
            if message["role"] != "assistant":
                if message["role"] != "system" and content:  # keeps a later search off this message's text
                    pos = text.find(content, cursor)
                    cursor = pos + len(content) if pos >= 0 else cursor
                continue
            if i not in trained:
                found = self._find_content(text, content, cursor)
                cursor = found[0] + len(found[1]) if found else cursor
                continue
            prompt_end = self._prompt_end(messages[:i], text, tools)
            found = self._find_content(text, content, cursor if prompt_end is None else prompt_end)
            if found is None or (prompt_end is None and not found[1]):
                raise ValueError(f"cannot find assistant message {i} ({content[:40]!r}...) in the text the "
                                 f"chat template renders; choose another --template")
            pos, rendered = found
            start = pos
            if prompt_end is not None and not (self._special_re and self._special_re.search(text, prompt_end, pos)):
                start = prompt_end
            end = pos + len(rendered)
            if self.loss_scale == "ignore_empty_think":
                empty_think = _EMPTY_THINK_RE.match(text, start, end)
                start = empty_think.end() if empty_think else start
            marker = self._marker_re.match(text, end) if self._marker_re else None
            end = marker.end() if marker else end
            spans.append((start, end))
            cursor = end
        return spans

    def _prompt_end(self, prefix: list[dict[str, str]], text: str, tools: Optional[list]) -> Optional[int]:
        """Where the generation prompt after ``prefix`` ends in ``text``; None if that render is no prefix."""
        if not prefix:
            return None
        try:
            prompt = self._render(prefix, add_generation_prompt=True, tools=tools)
        except Exception:  # templates may refuse partial conversations  # noqa: BLE001
            return None
        return len(prompt) if text.startswith(prompt) else None

    @staticmethod
    def _find_content(text: str, content: str, start: int) -> Optional[tuple[int, str]]:
        """(position, rendered form) of an assistant content in ``text`` from ``start``: as is, stripped,
        or only the part after ``</think>`` (templates that drop earlier turns' reasoning)."""
        candidates = [content, content.strip()]
        if "</think>" in content:
            candidates.append(content.split("</think>")[-1].strip())
        for i, candidate in enumerate(candidates):
            if candidate or i == 0:
                pos = text.find(candidate, start)
                if pos >= 0:
                    return pos, candidate
        return None


def _adds_bos(tokenizer: Any) -> bool:
    """Whether encoding plain text with special tokens prepends the BOS (ms-swift's auto_add_bos)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _parse_tools(tools: Any) -> Optional[list]:
    """``row["tools"]`` (a JSON string, or already parsed) as a list for the chat template."""
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ValueError(f"tools is not valid JSON ({e.msg}): {tools[:80]!r}") from e
    return tools if isinstance(tools, list) else [tools]
