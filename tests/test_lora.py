"""LoRA on megatron-core's linears: exact at start, merge == unmerged, only adapters train, loss
parity across layouts, adapter-only checkpoints, exact resume through --adapter_load, freezing flags."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import logged, ok, run_cli, run_megatron, tiered
from megaswift.args.parallel import ParallelArgs
from megaswift.args.train import TrainArgs
from megaswift.args.tuner import TunerArgs
from megaswift.converters.convert import load_hf_weights
from megaswift.converters.hf_io import HFReader
from megaswift.data.collate import collate_padding_free
from megaswift.model.forward import forward_logits
from megaswift.model.hf import HFModel, load_hf_config
from megaswift.runtime.distributed import destroy_distributed, init_distributed
from megaswift.training.method import LanguageModeling
from megaswift.training.setup import build_model, wrap_and_optimize
from megaswift.training.step import train_step
from megaswift.tuners import add_lora, count_parameters, set_trainable
from megaswift.tuners.lora import LoraLinear, adapters_off
from test_training import ITERS, RTOL, _kill_after_checkpoint, _sft_args

LORA = ["--train_type", "lora", "--lora_dropout", "0", "--lr", "1e-3"]


def _rows(vocab: int, n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for length in (9, 14, 6)[:n]:
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids[1:] + [-100]})
    return out


@pytest.fixture
def qwen2_chunk(tiny_model_dir):
    """One process, a tiny qwen2 (QKV bias, 3 heads a group) loaded from HF, float32."""
    src = tiny_model_dir("qwen2")
    hf = HFModel.from_config(load_hf_config(src), 128, 1)
    parallel = ParallelArgs()
    init_distributed(parallel)
    try:
        train = TrainArgs(train_iters=2, lr=1e-2, weight_decay=0.1)
        chunks, config = build_model(hf, parallel, torch.float32, train)
        load_hf_weights(chunks, hf.family, hf.config, HFReader(src), hf.dims)
        yield chunks, config, hf, train
    finally:
        destroy_distributed()


def _cfg(**kw) -> dict:
    return {**TunerArgs(train_type="lora", lora_dropout=0.0).lora_config(), **kw}


def test_zero_b_is_the_base_bitwise_and_merge_equals_unmerged(qwen2_chunk):
    chunks, config, hf, _ = qwen2_chunk
    batch = collate_padding_free(_rows(hf.dims.vocab_size), pad_id=0, multiple=1)
    base = forward_logits(chunks[0], batch, config)
    assert add_lora(chunks, _cfg(), seed=1) == 4 * hf.config.num_hidden_layers
    assert torch.equal(forward_logits(chunks[0], batch, config), base)  # B = 0: exactly the base
    g = torch.Generator().manual_seed(2)
    layers = [m for m in chunks[0].modules() if isinstance(m, LoraLinear)]
    with torch.no_grad():
        for m in layers:
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    unmerged = forward_logits(chunks[0], batch, config)
    assert (unmerged - base).abs().max() > 1e-2  # the adapter does something
    with adapters_off(chunks):  # the reference model of LoRA preference training: the base, exactly
        assert torch.equal(forward_logits(chunks[0], batch, config), base)
    with torch.no_grad():
        for m in layers:
            m.merge_()
            m.lora_B.weight.zero_()
    merged = forward_logits(chunks[0], batch, config)
    assert (merged - unmerged).abs().max() <= 1e-5


def test_only_adapters_train_and_init_follows_peft(qwen2_chunk):
    chunks, config, hf, train = qwen2_chunk
    add_lora(chunks, _cfg(lora_rank=4, lora_alpha=16, use_rslora=True), seed=1)
    set_trainable(chunks, TunerArgs(train_type="lora"))
    qkv = chunks[0].decoder.layers[0].self_attention.linear_qkv
    assert qkv.scaling == 16 / 2  # rsLoRA: alpha / sqrt(r)
    bound = (6.0 / (6.0 * hf.config.hidden_size)) ** 0.5  # kaiming_uniform(a=sqrt(5)): 1/sqrt(fan_in)
    assert 0.9 * bound < qkv.lora_A.weight.abs().max() <= bound and not qkv.lora_B.weight.any()
    counts = count_parameters(chunks)
    adapters = sum(p.numel() for n, p in chunks[0].named_parameters() if ".lora_" in n)
    assert counts.trainable == adapters and counts.total == sum(p.numel() for p in chunks[0].parameters())
    before = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    model, optimizer, scheduler = wrap_and_optimize(chunks, config, train, 2)
    method = LanguageModeling(pad_id=0)
    for _ in range(2):  # step 1 moves B only (A's gradient is B^T dy = 0); step 2 moves A too
        metrics = train_step(model, optimizer, scheduler, [iter([method.collate(_rows(hf.dims.vocab_size))])],
                             1, config, method)
        assert metrics["grad_norm"] > 0
    for n, p in chunks[0].named_parameters():
        if ".lora_" in n:
            assert not torch.equal(p, before[n]), n
        else:  # frozen: bitwise untouched (no weight decay, no update)
            assert torch.equal(p, before[n]), n


@pytest.fixture(scope="module")
def lora_run(model_dir, dataset, tmp_path_factory):
    """A one-process LoRA run of ITERS iterations (the parity reference)."""
    save = tmp_path_factory.mktemp("lora-ref") / "run"
    ok(run_megatron(_sft_args(model_dir, dataset, save, ITERS, *LORA)))
    return save


@pytest.fixture(scope="module")
def lora_reference(lora_run):
    save = lora_run
    return {"loss": logged(save), "grad_norm": logged(save, "grad_norm"), "eval_loss": logged(save, "eval_loss"),
            "trainable_params": logged(save, "trainable_params")}


LAYOUTS = {
    "tp2_sp": (2, ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true"]),
    "pp2": (2, ["--pipeline_model_parallel_size", "2"]),
    "cp2": (2, ["--context_parallel_size", "2"]),
    "dp2_distopt": (2, ["--use_distributed_optimizer", "true"]),
}


@pytest.mark.parametrize("layout", tiered(sorted(LAYOUTS), {"pp2", "cp2", "dp2_distopt"}))
def test_lora_loss_parity_with_one_process(layout, lora_reference, model_dir, dataset, tmp_path):
    nproc, flags = LAYOUTS[layout]
    save = tmp_path / "run"
    ok(run_megatron(_sft_args(model_dir, dataset, save, ITERS, *LORA, *flags), nproc=nproc, timeout=600))
    for key, want in lora_reference.items():
        have = logged(save, key)
        assert sorted(have) == sorted(want), (key, have)
        for it, w in want.items():
            assert abs(have[it] - w) <= RTOL * abs(w), f"{key} at iteration {it}: {have[it]} vs {w}"
    assert logged(save)[ITERS] < logged(save)[1]
    # the checkpoint holds the adapters only, split as trained and readable at any layout
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(str(save / f"iter_{ITERS:07d}")).read_metadata().state_dict_metadata)
    model_keys = {k for k in keys if k.startswith(("decoder.", "embedding.", "output_layer."))}
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), sorted(model_keys)[:5]


def test_lora_resume_after_sigkill_equals_uninterrupted(model_dir, dataset, tmp_path):
    full, killed, resumed = tmp_path / "full", tmp_path / "killed", tmp_path / "resumed"
    ok(run_megatron(_sft_args(model_dir, dataset, full, 6, *LORA)))
    _kill_after_checkpoint(_sft_args(model_dir, dataset, killed, 6, "--save_interval", "3", *LORA), killed, 3, 1)
    # the base comes from --model as before; the run's adapters, optimizer, schedule and data position from --adapter_load
    out = ok(run_megatron(_sft_args(model_dir, dataset, resumed, 6, *LORA, "--adapter_load", str(killed))))
    assert f"resumed from {killed} at iteration 3" in out.stderr
    want, got = logged(full), logged(resumed)
    assert sorted(got) == [4, 5, 6]
    for it in got:
        assert got[it] == want[it], (it, got[it], want[it])
    assert sum(f.stat().st_size for f in (killed / "iter_0000003").rglob("*") if f.is_file()) < 2_000_000


def test_freezing_flags_and_targets(model_dir, dataset, tmp_path):
    """Full training with frozen prefixes counts exactly what trains; LoRA on chosen modules only."""
    args = _sft_args(model_dir, dataset, tmp_path / "frozen", 1, "--freeze_parameters", "embedding",
                     "decoder.layers.0", "--trainable_parameters_regex", r"decoder\.layers\.0\.mlp\..*")
    ok(run_megatron(args))
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, f, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * h // c.num_attention_heads
    attn = h + h * (h + 2 * kv) + h * h  # input norm + qkv + proj
    mlp = h + 2 * f * h + f * h          # pre-mlp norm + fc1 + fc2
    total = logged(tmp_path / "frozen", "total_params")[0]
    assert logged(tmp_path / "frozen", "trainable_params")[0] == (layers - 1) * (attn + mlp) + mlp + h  # + final norm
    # LoRA on one layer's QKV only, embeddings trained in full: the checkpoint (and the optimizer
    # state of a partly frozen model) covers a subset of layers, keyed per layer
    lora = _sft_args(model_dir, dataset, tmp_path / "qkv", 1, "--train_type", "lora", "--target_regex",
                     r"decoder\.layers\.1\..*linear_qkv", "--lora_rank", "4", "--modules_to_save", "word_embeddings",
                     "--pipeline_model_parallel_size", "2")
    ok(run_megatron(lora, nproc=2))
    embedding = total - layers * (attn + mlp) - h  # the padded vocab's rows (tied: one matrix)
    assert embedding % h == 0 and embedding // h >= c.vocab_size
    assert logged(tmp_path / "qkv", "trainable_params")[0] == 4 * (h + h + 2 * kv) + embedding
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(str(tmp_path / "qkv" / "iter_0000001")).read_metadata().state_dict_metadata)
    assert {k for k in keys if k.startswith("decoder.")} == {
        "decoder.layers.1.self_attention.linear_qkv.lora_A.weight", "decoder.layers.1.self_attention.linear_qkv.lora_B.weight"}
    assert "embedding.word_embeddings.weight" in keys
    bad = run_cli(_sft_args(model_dir, dataset, tmp_path / "bad", 1, "--train_type", "lora",
                            "--target_modules", "q_proj"))
    assert bad.returncode != 0 and "--target_modules q_proj" in bad.stderr and "linear_qkv" in bad.stderr


def test_lora_defaults_follow_megatron_swift():
    from megaswift.args.job import parse_job

    lora = parse_job(["--model", "m", "--dataset", "d", "--train_iters", "1", "--train_type", "lora"], "sft")
    assert lora.train.lr == 1e-4 and lora.tuner.lora_rank == 8 and lora.tuner.lora_alpha == 32
    assert lora.tuner.lora_dropout == 0.05 and lora.tuner.target_modules == ["all-linear"]
    full = parse_job(["--model", "m", "--dataset", "d", "--train_iters", "1"], "sft")
    assert full.train.lr == 1e-5 and full.tuner.train_type == "full"
    rec = json.loads(json.dumps(lora.as_record(), default=str))
    assert rec["tuner"]["train_type"] == "lora"


def test_adapter_flags_bad_input(lora_run, model_dir, dataset, tmp_path):
    """Mixing up base and adapters, or contradicting the run's adapters, fails before any work."""
    def fails(*extra, model=True):
        args = _sft_args(model_dir, dataset, tmp_path / "out", 1, *extra)
        if not model:
            i = args.index("--model")
            del args[i:i + 2]
        proc = run_cli(args)
        assert proc.returncode != 0
        assert not (tmp_path / "out").exists()
        return proc.stderr.strip().splitlines()[-1]

    line = fails("--load", str(lora_run), "--train_type", "lora", model=False)
    assert "LoRA run's adapters only" in line and "--adapter_load" in line
    line = fails("--train_type", "lora", "--adapter_load", str(lora_run), "--lora_rank", "16")
    assert "--lora_rank 8 in the run, 16 here" in line
    line = fails("--train_type", "lora", "--adapter_load", str(tmp_path / "nothing"))
    assert "--adapter_load" in line and "no such directory" in line
    line = fails("--adapter_load", str(lora_run))
    assert "--train_type lora" in line
    # the run's own LoRA flags are used when not given (here: the default rank would also match)
    args = _sft_args(model_dir, dataset, tmp_path / "cont", 1, "--train_type", "lora", "--adapter_load",
                     str(lora_run), "--finetune", "true", "--lora_dropout", "0")
    out = ok(run_megatron(args))
    assert f"loaded adapters from {lora_run} (iteration 0)" in out.stderr
    assert json.loads((tmp_path / "cont" / "args.json").read_text())["tuner"]["adapter_load"] == str(lora_run)


def test_lora_bias_all_and_modules_to_save_train(qwen2_chunk):
    """--lora_bias all trains every bias (qwen2's QKV biases), --modules_to_save the named modules in full."""
    chunks, _, hf, _ = qwen2_chunk
    add_lora(chunks, _cfg(target_modules=["linear_proj"]), seed=1)
    set_trainable(chunks, TunerArgs(train_type="lora", lora_bias="all", modules_to_save=["output_layer"]))
    trainable = {n for n, p in chunks[0].named_parameters() if p.requires_grad}
    layers = hf.config.num_hidden_layers
    assert {n for n in trainable if n.endswith(".bias")} == {
        f"decoder.layers.{i}.self_attention.linear_qkv.bias" for i in range(layers)}
    assert {n for n in trainable if ".lora_" in n} == {
        f"decoder.layers.{i}.self_attention.linear_proj.lora_{ab}.weight" for i in range(layers) for ab in "AB"}
    assert "output_layer.weight" in trainable and "embedding.word_embeddings.weight" not in trainable  # untied
    assert len(trainable) == 3 * layers + 1
