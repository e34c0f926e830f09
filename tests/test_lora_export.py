"""LoRA export and import: a megaswift LoRA run as a merged HF model and as a PEFT adapter folder,
checked against peft itself; a PEFT folder imported back as a LoRA checkpoint, bitwise; across
TP/PP layouts; bad input refused before any work.

Real `megatron` runs on the tiny llama with SmolLM2's tokenizer (tied embeddings, the embedding
trained as a module to save); the PEFT mapping logic also in memory for qwen2 (QKV bias with 3
heads a group, untied lm_head, bias='all').
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_bitwise_equal, ok, read_safetensors_dir, run_cli, run_megatron

LORA = ["--train_type", "lora", "--lora_dropout", "0", "--lr", "1e-2", "--modules_to_save", "word_embeddings"]
PEFT_WEIGHTS = "adapter_model.safetensors"
TOL = 1e-5


def _sft(model_dir, dataset, save, iters, *extra):
    return ["sft", "--model", str(model_dir), "--dataset", dataset, *(["--save", str(save)] if save else []),
            "--train_iters", str(iters), "--global_batch_size", "8", "--micro_batch_size", "2", "--max_length", "512",
            "--add_version", "false", *LORA, *extra]


def _out(proc) -> str:
    ok(proc)
    return proc.stdout + proc.stderr


def _here(args: list[str]) -> str:
    """`megatron <args>` as one rank in this process (no new interpreter importing megatron-core and
    transformers again, ~8 s a run); its log. For single-process exports only."""
    import contextlib
    import io

    from megaswift import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(list(args))
    assert rc == 0, err.getvalue()[-4000:]
    return err.getvalue()


@pytest.fixture(scope="module")
def lora_run(model_dir, dataset, tmp_path_factory):
    """3 iterations at lr 1e-2: B far from zero, the embedding trained (modules_to_save)."""
    save = tmp_path_factory.mktemp("lora-export") / "run"
    ok(run_megatron(_sft(model_dir, dataset, save, 3)))
    return save


@pytest.fixture(scope="module")
def peft_dir(lora_run):
    """The run as a PEFT folder at TP=1, its base taken from the run's args.json."""
    out = lora_run.parent / "peft"
    assert "base model from" in _here(["export", "--adapter_load", str(lora_run), "--to_hf", "true", "--save", str(out)])
    return out


@pytest.fixture(scope="module")
def merged_dir(lora_run, model_dir):
    out = lora_run.parent / "merged"
    _here(["export", "--adapter_load", str(lora_run), "--model", str(model_dir), "--to_hf", "true",
           "--merge_lora", "true", "--save", str(out)])
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_peft_folder_loads_in_peft_and_equals_the_merged_export(model_dir, peft_dir, merged_dir):
    import peft
    from transformers import AutoModelForCausalLM

    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    assert config["modules_to_save"] == ["embed_tokens"] and config["ensure_weight_tying"] is True
    assert (config["r"], config["lora_alpha"], config["bias"]) == (8, 32, "none")
    assert config["base_model_name_or_path"] == str(model_dir)
    base = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base(), peft_dir).eval()
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    # every tensor of the file is what peft holds, and peft would save exactly these keys
    saved = load_file(peft_dir / PEFT_WEIGHTS)
    live = peft.get_peft_model_state_dict(model)
    assert_bitwise_equal(saved, {k: v.detach() for k, v in live.items()})
    assert any(k.endswith("q_proj.lora_B.weight") and v.abs().max() > 0 for k, v in saved.items())
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with_adapter, folded, plain = _logits(model, ids), _logits(merged, ids), _logits(base(), ids)
    diff = (with_adapter - folded).abs().max().item()
    print(f"PEFT-loaded vs merged export: max |logit diff| {diff:.3e}")
    assert diff <= TOL
    assert (plain - folded).abs().max().item() > 1e-2  # the adapter changes the model


def test_peft_export_tp2_equals_tp1(lora_run, peft_dir, tmp_path):
    out = tmp_path / "tp2"
    ok(run_megatron(["export", "--adapter_load", str(lora_run), "--to_hf", "true", "--save", str(out),
                     "--tensor_model_parallel_size", "2"], nproc=2))
    assert_bitwise_equal(load_file(peft_dir / PEFT_WEIGHTS), load_file(out / PEFT_WEIGHTS))
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((peft_dir / "adapter_config.json").read_text())


def test_import_then_export_at_pp2_is_bitwise_and_trains(peft_dir, model_dir, dataset, tmp_path):
    imported = tmp_path / "imported"
    _here(["export", "--adapters", str(peft_dir), "--model", str(model_dir), "--to_mcore", "true",
           "--save", str(imported)])
    record = json.loads((imported / "args.json").read_text())
    assert record["tuner"]["train_type"] == "lora" and record["model_args"]["model"] == str(model_dir)
    assert (record["tuner"]["lora_rank"], record["tuner"]["target_modules"]) == (8, ["all-linear"])
    assert record["tuner"]["modules_to_save"] == ["word_embeddings"]  # tied: the output layer with it
    assert (imported / "hf_config" / "config.json").exists()
    again = tmp_path / "again"
    ok(run_megatron(["export", "--adapter_load", str(imported), "--to_hf", "true", "--save", str(again),
                     "--pipeline_model_parallel_size", "2"], nproc=2))
    assert_bitwise_equal(load_file(peft_dir / PEFT_WEIGHTS), load_file(again / PEFT_WEIGHTS))
    assert json.loads((again / "adapter_config.json").read_text()) == json.loads((peft_dir / "adapter_config.json").read_text())
    # training continues from the imported adapter
    text = _out(run_megatron(_sft(model_dir, dataset, None, 1, "--adapter_load", str(imported), "--finetune", "true")))
    assert f"loaded adapters from {imported}" in text and "[1/1" in text


def test_merged_export_from_an_mcore_base_at_pp2(lora_run, model_dir, merged_dir, tmp_path):
    """--load <mcore base> instead of --model, under PP=2: the same merged model, bitwise."""
    base = tmp_path / "base"
    _here(["export", "--model", str(model_dir), "--to_mcore", "true", "--save", str(base)])
    out = tmp_path / "merged"
    ok(run_megatron(["export", "--load", str(base), "--adapter_load", str(lora_run), "--to_hf", "true",
                     "--merge_lora", "true", "--save", str(out), "--pipeline_model_parallel_size", "2"], nproc=2))
    assert_bitwise_equal(read_safetensors_dir(merged_dir), read_safetensors_dir(out))


# -- the PEFT mapping in memory, both directions, on a folder peft itself wrote ----------------------
def _peft_folder(hf_dir, out, *, shared_a=True, bias="all", targets=None, tied_save=True):
    """A PEFT LoRA folder saved by peft, random B (and A shared by fused modules unless not `shared_a`)."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tied = model.config.tie_word_embeddings
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias=bias, task_type="CAUSAL_LM",
                          target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"],
                          modules_to_save=["embed_tokens"] + ([] if tied else ["lm_head"]) if tied_save else None,
                          ensure_weight_tying=tied and tied_save)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if shared_a:
            for layer in model.base_model.model.model.layers:
                for group in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
                    mods = [getattr(group[0], n) for n in group[1] if hasattr(getattr(group[0], n), "lora_A")]
                    for m in mods[1:]:
                        m.lora_A["default"].weight.copy_(mods[0].lora_A["default"].weight)
    model.save_pretrained(out)
    return out


def test_peft_mapping_round_trip_in_memory(tiny_model_dir, tmp_path):
    """qwen2 (3 heads a group, QKV bias, untied): PEFT -> full MCore tensors -> PEFT is bitwise, and
    each MCore tensor is what the HF weights' own mappings give for the LoRA delta (B @ A)."""
    from megaswift.converters import adapters as ad
    from megaswift.converters.convert import Target
    from megaswift.model.hf import HFModel, load_hf_config

    hf_dir = tiny_model_dir("qwen2")
    folder = ad.read_peft_folder(str(_peft_folder(hf_dir, tmp_path / "peft")))
    hf = HFModel.from_config(load_hf_config(hf_dir), 128, 1)
    cfg = ad.lora_config_from_peft(folder, hf.family, hf.config)
    assert cfg["target_modules"] == ["all-linear"] and cfg["lora_bias"] == "all"
    assert cfg["modules_to_save"] == ["output_layer", "word_embeddings"] and (cfg["lora_rank"], cfg["lora_alpha"]) == (4, 8)
    lora_modules = ad.lora_hf_modules(folder)
    # the trainable targets a LoRA model of this config has, with full (TP=1) tensors
    fake = []
    for x in ad.declared(hf.family, hf.config):
        if x.lora_candidate():
            fake += [Target(None, x.mcore, x.mapping, x.layer, adapter=part, name=x.mcore_module + "." + part)
                     for part in (ad.A, ad.B)]
        elif x.mcore.endswith(".bias") or x.mcore_module in ("embedding.word_embeddings", "output_layer"):
            fake.append(Target(None, x.mcore, x.mapping, x.layer, name=x.mcore))
    plan = ad.plan_peft(fake, "all")
    written = ad.peft_config(plan, ad.declared(hf.family, hf.config), cfg, hf.config, str(hf_dir))
    assert written["target_modules"] == sorted(json.loads((folder.dir / "adapter_config.json").read_text())["target_modules"])
    assert (written["modules_to_save"], written["bias"], written["ensure_weight_tying"]) == (["embed_tokens", "lm_head"], "all", False)
    back = {}
    for t in fake:
        full, _ = ad.mcore_tensor(t, folder, "all", lora_modules, hf.dims)
        back.update(ad.peft_tensors(t, full, plan, "all", hf.dims, hf.config))
        if t.adapter == ad.B and "linear_qkv" in t.mcore_name:  # delta of the fused weight, by the base QKV mapping
            a, _ = ad.mcore_tensor(Target(None, t.mcore_name, t.mapping, t.layer, adapter=ad.A), folder, "all",
                                   lora_modules, hf.dims)
            q = folder.tensors[f"base_model.model.model.layers.{t.layer}.self_attn.q_proj.lora_B.weight"]
            qa = folder.tensors[f"base_model.model.model.layers.{t.layer}.self_attn.q_proj.lora_A.weight"]
            assert torch.equal(t.mapping.to_hf(full @ a, hf.dims)["q"], q @ qa)
    assert_bitwise_equal(folder.tensors, back)
    # a module trained whole inside a LoRA-wrapped linear (--modules_to_save linear_qkv) has no PEFT form
    qkv = next(t for t in fake if t.adapter == ad.A and "linear_qkv" in t.mcore_name)
    whole = Target(None, qkv.mcore_name, qkv.mapping, qkv.layer, name=qkv.name.replace(ad.A, "base_layer.weight"))
    with pytest.raises(ValueError, match="no PEFT form.*--merge_lora true"):
        ad.peft_config(ad.plan_peft(fake + [whole], "all"), ad.declared(hf.family, hf.config), cfg, hf.config, "x")


# -- bad input: one line naming the flag, before any work --------------------------------------------
def _fails(args, out, *phrases):
    proc = run_cli(["export", *args, "--save", str(out)])
    assert proc.returncode != 0
    for p in phrases:
        assert p in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


def test_bad_adapter_input(lora_run, peft_dir, model_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    _fails(["--adapter_load", str(tmp_path / "nope"), "--to_hf", "true"], out, "--adapter_load", "does not exist")
    (tmp_path / "empty").mkdir()
    _fails(["--adapter_load", str(tmp_path / "empty"), "--to_hf", "true"], out, "--adapter_load", "has no args.json")
    full = tmp_path / "full"
    full.mkdir()
    record = json.loads((lora_run / "args.json").read_text())
    record["tuner"]["train_type"] = "full"
    (full / "args.json").write_text(json.dumps(record))
    _fails(["--adapter_load", str(full), "--to_hf", "true"], out, "--adapter_load", "records no LoRA run")
    _fails(["--load", str(lora_run), "--to_hf", "true", "--merge_lora", "true"], out,
           "--merge_lora true needs --adapter_load")
    _fails(["--adapter_load", str(lora_run), "--to_mcore", "true", "--model", str(model_dir)], out,
           "--adapter_load exports a LoRA run with --to_hf true")
    _fails(["--adapters", str(tmp_path / "empty"), "--to_mcore", "true", "--model", str(model_dir)], out,
           "--adapters", "has no adapter_config.json")
    _fails(["--adapters", str(peft_dir), "--to_hf", "true"], out, "--adapters (a PEFT folder) imports with --to_mcore")

    def edited(name, config=None, tensors=None):
        d = tmp_path / name
        shutil.copytree(peft_dir, d)
        if config:
            cfg = json.loads((d / "adapter_config.json").read_text())
            cfg.update(config)
            (d / "adapter_config.json").write_text(json.dumps(cfg))
        if tensors:
            t = tensors(load_file(d / PEFT_WEIGHTS))
            save_file(t, d / PEFT_WEIGHTS)
        return ["--adapters", str(d), "--to_mcore", "true", "--model", str(model_dir)]

    _fails(edited("ia3", {"peft_type": "IA3"}), out, "--adapters", "peft_type 'IA3'", "LoRA adapters only")
    _fails(edited("dora", {"use_dora": True}), out, "--adapters", "use_dora=True")
    qkv = "base_model.model.model.layers.1.self_attn."
    _fails(edited("q_only", tensors=lambda t: {k: v for k, v in t.items() if not k.startswith((qkv + "k_proj", qkv + "v_proj"))}),
           out, "LoRA on q_proj but not k_proj/v_proj", "linear_qkv")

    def different_a(t):
        t[qkv + "k_proj.lora_A.weight"] = t[qkv + "k_proj.lora_A.weight"] + 1
        return t
    _fails(edited("diff_a", tensors=different_a), out, "model.layers.1.self_attn q_proj/k_proj/v_proj have different "
           "lora_A matrices", "linear_qkv")
    # an adapter plain peft trained (independent A per module) is refused the same way
    plain = _peft_folder(tiny_model_dir("qwen2"), tmp_path / "plain", shared_a=False, bias="none", tied_save=False)
    _fails(["--adapters", str(plain), "--to_mcore", "true", "--model", str(tiny_model_dir("qwen2"))], out,
           "different lora_A matrices")


def test_lora_on_some_layers_is_a_regex_both_ways(tiny_model_dir, tmp_path):
    """LoRA on some layers' q/k/v only: PEFT gets a full-match regex it applies to exactly those
    modules, and a PEFT folder of such an adapter imports as megatron's --target_regex on them."""
    import re

    import peft
    from transformers import AutoModelForCausalLM

    from megaswift.converters import adapters as ad
    from megaswift.converters.convert import Target
    from megaswift.model.hf import HFModel, load_hf_config

    hf_dir = tiny_model_dir("llama")
    hf = HFModel.from_config(load_hf_config(hf_dir), 128, 1)
    everything = ad.declared(hf.family, hf.config)
    chosen = [x for x in everything if x.lora_candidate() and x.layer in (0, 2) and "linear_qkv" in x.mcore]
    fake = [Target(None, x.mcore, x.mapping, x.layer, adapter=part, name=x.mcore_module + "." + part)
            for x in chosen for part in (ad.A, ad.B)]
    cfg = {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False}
    config = ad.peft_config(ad.plan_peft(fake, "none"), everything, cfg, hf.config, str(hf_dir))
    assert isinstance(config["target_modules"], str) and config["modules_to_save"] is None
    wanted = {f"model.layers.{i}.self_attn.{m}" for i in (0, 2) for m in ("q_proj", "k_proj", "v_proj")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir), peft.LoraConfig(**config))
    got = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert got == wanted
    folder = ad.read_peft_folder(str(_peft_folder(hf_dir, tmp_path / "peft", bias="none", tied_save=False,
                                                  targets=config["target_modules"])))
    back = ad.lora_config_from_peft(folder, hf.family, hf.config)
    assert back["modules_to_save"] == [] and back["target_regex"]
    rx = re.compile(back["target_regex"])
    assert {x.mcore_module for x in everything if x.lora_candidate() and rx.fullmatch(x.mcore_module)} == \
        {x.mcore_module for x in chosen}
