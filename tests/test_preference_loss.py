"""The DPO loss family (megaswift.training.preference_loss) against TRL's DPOTrainer itself.

A tiny random Llama policy, a *different* random Llama as reference, four preference rows of
different lengths and an offline word-level tokenizer. For every loss type and option, TRL's
``DPOTrainer.train()`` runs one step and its logged iteration-1 loss, rewards, log-probs and
nll_loss must equal ours (fp32, rel <= 1e-5), ours computed from log-probs our own helper takes
from the same two models. Per pair, TRL's ``concatenated_forward`` log-probs and its ``dpo_loss``
outputs must equal ours too.

The reference is TRL 0.27.2 (see the module docstring of preference_loss for why): it predates
transformers 5.23, whose ``_is_package_available`` returns a (truthy) tuple, so TRL's optional
import checks are shimmed to booleans before the trainer is imported.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from megaswift.training.preference_loss import (LOSS_TYPES, BCOPairState, PreferenceLossConfig, dpo_loss,
                                                metric_sums, metrics_from_sums, sequence_logps)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REL = 1e-5
ROWS = {  # prompt, chosen, rejected (word-level tokens; the trainer appends <eos> to completions)
    "prompt": ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13 w14", "w15"],
    "chosen": ["w20 w21", "w22", "w23 w24 w25 w26", "w27 w28 w29"],
    "rejected": ["w30", "w31 w32 w33", "w34 w35", "w36 w37 w38 w39 w40 w41"],
}


def _trl():
    import trl
    import trl.import_utils as iu

    if not trl.__version__.startswith("0.27."):
        pytest.fail(f"the reference is TRL 0.27.x (pyproject's test extras), found {trl.__version__}")
    orig = iu._is_package_available
    if not getattr(orig, "_megaswift_shim", False):
        def shim(name, return_version=False):
            r = orig(name, return_version)
            return r if return_version or not isinstance(r, tuple) else r[0]
        shim._megaswift_shim = True
        iu._is_package_available = shim
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.utils import RunningMoments
    return DPOConfig, DPOTrainer, RunningMoments


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, "<bos>": 3, **{f"w{i}": i for i in range(4, 100)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>", bos_token="<bos>")


def _llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
                      initializer_range=0.3)  # peaked distributions: log-ratios far from 0
    return LlamaForCausalLM(cfg).float().eval()


def _completion_token_logps(model, prompt, completion):
    """log p(completion token | everything before), one unpadded sequence: our own helper."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt) - 1:]


@pytest.fixture(scope="module")
def env():
    from datasets import Dataset

    DPOConfig, DPOTrainer, RunningMoments = _trl()
    tok = _tokenizer()
    policy, ref = _llama(0), _llama(1)
    rows = []
    for p, c, r in zip(*ROWS.values()):
        pi, ci, ri = (tok(s, add_special_tokens=False)["input_ids"] for s in (p, c, r))
        ci, ri = ci + [tok.eos_token_id], ri + [tok.eos_token_id]
        assert 0 not in ci  # TRL's nll_loss drops label id 0 (its padding value)
        rows.append(dict(prompt=pi, chosen=ci, rejected=ri,
                         logps={(m, k): _completion_token_logps(model, pi, ids)
                                for m, model in (("policy", policy), ("ref", ref))
                                for k, ids in (("chosen", ci), ("rejected", ri))}))
    return dict(DPOConfig=DPOConfig, DPOTrainer=DPOTrainer, RunningMoments=RunningMoments, tok=tok,
                policy=policy, ref=ref, rows=rows, dataset=Dataset.from_dict(ROWS))


def _ours(env, cfg, order=None):
    """Our iteration-1 figures (and per-pair tensors) from our own log-probs of the two models."""
    rows = env["rows"] if order is None else [env["rows"][i] for i in order]

    def seq(model, kind):
        tl = [r["logps"][(model, kind)] for r in rows]
        T = max(len(t) for t in tl)
        token_logps = torch.stack([torch.nn.functional.pad(t, (0, T - len(t))) for t in tl])
        mask = torch.stack([torch.arange(T) < len(t) for t in tl])
        return sequence_logps(cfg, token_logps, mask)

    pc, pr, rc, rr = seq("policy", "chosen"), seq("policy", "rejected"), seq("ref", "chosen"), seq("ref", "rejected")
    chosen_tok = torch.cat([r["logps"][("policy", "chosen")] for r in rows])
    nll_sum, nll_count = -chosen_tok.sum(), torch.tensor(chosen_tok.numel())
    state = BCOPairState()
    losses, cr, rj = dpo_loss(cfg, pc, pr, rc, rr, state=state,
                              nll_loss=nll_sum / nll_count if cfg.needs_nll else None)
    sums = metric_sums(cfg, losses, cr, rj, pc, pr, nll_sum, nll_count)
    return metrics_from_sums(sums), dict(pc=pc, pr=pr, rc=rc, rr=rr, losses=losses, cr=cr, rj=rj, state=state)


def _trainer(env, trl_kwargs, tmp_path):
    args = env["DPOConfig"](
        output_dir=str(tmp_path), per_device_train_batch_size=len(env["rows"]), max_steps=1, logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, max_length=None, max_prompt_length=None, max_completion_length=None,
        dataloader_num_workers=0, learning_rate=1e-3, seed=0, **trl_kwargs)
    return env["DPOTrainer"](model=copy.deepcopy(env["policy"]), ref_model=env["ref"], args=args,
                             train_dataset=env["dataset"], processing_class=env["tok"])


def _rel(ours, theirs, what):
    ours, theirs = float(ours), float(theirs)
    assert math.isfinite(ours) and math.isfinite(theirs), (what, ours, theirs)
    assert abs(ours - theirs) <= REL * max(abs(theirs), 1e-6), f"{what}: ours {ours!r} TRL {theirs!r}"


def _rel_t(ours, theirs, what):
    for i, (a, b) in enumerate(zip(ours.tolist(), theirs.tolist(), strict=True)):
        _rel(a, b, f"{what}[{i}]")


# (id, our PreferenceLossConfig kwargs, TRL DPOConfig kwargs)
CASES = [(t, dict(loss_type=t), dict(loss_type=t)) for t in LOSS_TYPES] + [
    ("sigmoid-label_smoothing", dict(label_smoothing=0.1), dict(label_smoothing=0.1)),
    ("robust-label_smoothing", dict(loss_type="robust", label_smoothing=0.2),
     dict(loss_type="robust", label_smoothing=0.2)),
    ("exo_pair-label_smoothing", dict(loss_type="exo_pair", label_smoothing=0.01),
     dict(loss_type="exo_pair", label_smoothing=0.01)),
    ("aot-label_smoothing", dict(loss_type="aot", label_smoothing=0.1), dict(loss_type="aot", label_smoothing=0.1)),
    ("aot_pair-label_smoothing", dict(loss_type="aot_pair", label_smoothing=0.1),
     dict(loss_type="aot_pair", label_smoothing=0.1)),
    ("sigmoid-rpo_alpha", dict(rpo_alpha=0.5), dict(rpo_alpha=0.5)),
    ("ipo-rpo_alpha", dict(loss_type="ipo", rpo_alpha=1.0), dict(loss_type="ipo", rpo_alpha=1.0)),
    ("sigmoid-reference_free", dict(reference_free=True), dict(reference_free=True)),
    ("apo_zero-reference_free", dict(loss_type="apo_zero", reference_free=True),
     dict(loss_type="apo_zero", reference_free=True)),
    ("sppo_hard-reference_free", dict(loss_type="sppo_hard", reference_free=True),
     dict(loss_type="sppo_hard", reference_free=True)),
    ("sigmoid-js_divergence", dict(f_divergence_type="js_divergence"), dict(f_divergence_type="js_divergence")),
    ("sigmoid-alpha_divergence", dict(f_divergence_type="alpha_divergence"),
     dict(f_divergence_type="alpha_divergence")),
    ("sigmoid-alpha_divergence-0.5", dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
     dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5)),
    # forward KL is TRL 0.27's alpha-divergence at α = 1 ((1 - u^-α)/α, so f'(u) = 1 - 1/u)
    ("sigmoid-forward_kl", dict(f_divergence_type="forward_kl"),
     dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)),
    ("hinge-js_divergence-reference_free", dict(loss_type="hinge", f_divergence_type="js_divergence",
                                                reference_free=True),
     dict(loss_type="hinge", f_divergence_type="js_divergence", reference_free=True)),
    ("discopop-tau", dict(loss_type="discopop", discopop_tau=0.2), dict(loss_type="discopop", discopop_tau=0.2)),
    ("beta-0.5", dict(beta=0.5, loss_type="nca_pair"), dict(beta=0.5, loss_type="nca_pair")),
    ("mpo-sigmoid+bco_pair+sft", dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
     dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])),
    ("ipo+hinge", dict(loss_type="ipo,hinge", loss_weights=[1.0, 0.5]),
     dict(loss_type=["ipo", "hinge"], loss_weights=[1.0, 0.5])),
]


@pytest.mark.parametrize("ours_kw,trl_kw", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_iteration_1_equals_trl_dpo_trainer(env, tmp_path, ours_kw, trl_kw):
    cfg = PreferenceLossConfig(**ours_kw)
    tr = _trainer(env, trl_kw, tmp_path)

    # per pair: TRL's log-probs and dpo_loss on the batch its dataloader yields, against ours
    batch = next(iter(tr.get_train_dataloader()))
    prompts = [ids[m.bool()].tolist() for ids, m in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]
    order = [[r["prompt"] for r in env["rows"]].index(p) for p in prompts]
    _, mine = _ours(env, cfg, order)
    with torch.no_grad():
        out = tr.concatenated_forward(tr.model, batch)
        ref_c, ref_r = tr.compute_ref_log_probs(batch)
    for ours_t, theirs_t, what in ((mine["pc"], out["chosen_logps"], "logps/chosen"),
                                   (mine["pr"], out["rejected_logps"], "logps/rejected"),
                                   (mine["rc"], ref_c, "ref logps/chosen"), (mine["rr"], ref_r, "ref logps/rejected")):
        _rel_t(ours_t, theirs_t, what)
    if len(cfg.loss_types) == 1 and cfg.rpo_alpha is None:
        with torch.no_grad():
            losses, cr, rj = tr.dpo_loss(out["chosen_logps"], out["rejected_logps"], ref_c, ref_r,
                                         cfg.loss_types[0], out)
            ol, ocr, orj = dpo_loss(cfg, out["chosen_logps"], out["rejected_logps"], ref_c, ref_r,
                                    state=BCOPairState(), nll_loss=out.get("nll_loss"))
        _rel_t(ol, losses, "per-pair loss")
        _rel_t(ocr, cr, "per-pair chosen reward")
        _rel_t(orj, rj, "per-pair rejected reward")
    if "bco_pair" in cfg.loss_types:  # the per-pair check moved TRL's running mean: back to iteration 0
        tr.running = env["RunningMoments"](tr.accelerator)

    # end to end: one DPOTrainer step; its logged iteration-1 figures against ours
    tr.train()
    logged = tr.state.log_history[0]
    figures, mine = _ours(env, cfg)
    names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]
    if cfg.needs_nll:
        names.append("nll_loss")
    else:
        assert "nll_loss" not in figures and "nll_loss" not in logged
    for name in names:
        _rel(figures[name], logged[name], name)
    assert figures["rewards/accuracies"] == pytest.approx(logged["rewards/accuracies"], abs=1e-7)
    if "bco_pair" in cfg.loss_types:
        assert mine["state"].mean == pytest.approx(tr.running.mean, rel=REL)
        assert mine["state"].count == tr.running.count


def test_unknown_loss_type_lists_the_valid_names():
    with pytest.raises(ValueError) as e:
        PreferenceLossConfig(loss_type="sigmoidd")
    for name in LOSS_TYPES:
        assert name in str(e.value)
    assert "sigmoidd" in str(e.value)
    with pytest.raises(ValueError, match="aot_pair"):
        PreferenceLossConfig(loss_type=["sigmoid", "nope"])


@pytest.mark.parametrize("kw,match", [
    (dict(f_divergence_type="kl"), "reverse_kl, forward_kl, js_divergence, alpha_divergence"),
    (dict(loss_type="bco_pair", f_divergence_type="js_divergence"), "only applies"),
    (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.0), "non-zero"),
    (dict(label_smoothing=0.5), r"\[0, 0.5\)"),
    (dict(label_smoothing=-0.1), r"\[0, 0.5\)"),
    (dict(loss_type="ipo", label_smoothing=0.1), "ignored"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "weights"),
    (dict(beta=0.0), "beta"),
    (dict(rpo_alpha=-1.0), "rpo_alpha"),
    (dict(discopop_tau=0.0), "discopop_tau"),
])
def test_bad_options_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        PreferenceLossConfig(**kw)


def test_missing_inputs_are_clear_errors():
    x = torch.tensor([-3.0, -4.0])
    with pytest.raises(ValueError, match="BCOPairState"):
        dpo_loss(PreferenceLossConfig(loss_type="bco_pair"), x, x, x, x)
    with pytest.raises(ValueError, match="nll_loss"):
        dpo_loss(PreferenceLossConfig(rpo_alpha=1.0), x, x, x, x)
    with pytest.raises(ValueError, match="reference_free"):
        dpo_loss(PreferenceLossConfig(), x, x, None, None)
    losses, cr, _ = dpo_loss(PreferenceLossConfig(reference_free=True), x, x - 1, None, None)
    assert torch.allclose(cr, 0.1 * x)


def test_bco_pair_state_round_trip(env):
    """Iterations 1-3 straight through equal iteration 1, a save/restore (dict and TRL's JSON), 2-3;
    the running mean after each equals TRL's RunningMoments fed the same rewards."""
    cfg = PreferenceLossConfig(loss_type="bco_pair")
    g = torch.Generator().manual_seed(0)
    batches = [tuple(-10 + torch.randn(4, generator=g) for _ in range(4)) for _ in range(3)]

    straight, state = [], BCOPairState()
    trl_running = env["RunningMoments"](accelerator=_Single())
    for b in batches:
        losses, cr, rj = dpo_loss(cfg, *b, state=state)
        trl_running.update(torch.cat((cr, rj)).mean())
        assert state.mean == trl_running.mean and state.count == trl_running.count
        straight.append(losses)

    resumed, state = [], BCOPairState()
    resumed.append(dpo_loss(cfg, *batches[0], state=state)[0])
    saved = state.state_dict()
    restored = BCOPairState()
    restored.load_state_dict(saved)
    resumed.append(dpo_loss(cfg, *batches[1], state=restored)[0])
    restored = BCOPairState.from_json(restored.to_json())
    resumed.append(dpo_loss(cfg, *batches[2], state=restored)[0])
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    assert restored.mean == trl_running.mean and restored.count == trl_running.count


class _Single:
    use_distributed = False
    is_main_process = True


def test_bco_pair_all_reduce_over_ranks_equals_trl_global_statistics():
    """Two simulated data-parallel ranks: the moments fold in both ranks' batch means, as TRL's."""
    cfg = PreferenceLossConfig(loss_type="bco_pair")
    ranks = [tuple(torch.tensor(v) for v in vals) for vals in
             (([-3.0, -5.0], [-4.0, -6.0], [-3.5, -5.2], [-3.9, -6.1]),
              ([-2.0, -7.0], [-2.5, -7.5], [-2.2, -7.1], [-2.4, -7.7]))]
    means = [torch.cat((0.1 * (pc - rc), 0.1 * (pr - rr))).mean() for pc, pr, rc, rr in ranks]
    reduced = iter([torch.stack([sum(means), torch.tensor(2.0)]),
                    torch.stack([sum((m - sum(means) / 2) ** 2 for m in means)]),
                    ])
    state = BCOPairState()
    dpo_loss(cfg, *ranks[0], state=state, all_reduce=lambda t: next(reduced).reshape(t.shape))
    assert state.mean == pytest.approx(float(sum(means) / 2), rel=1e-6)
    assert state.count == pytest.approx(2.0)


def test_metric_sums_add_across_micro_batches():
    """Sums and counts of two halves, added, give the figures of the whole batch."""
    cfg = PreferenceLossConfig(rpo_alpha=1.0)
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-10 + torch.randn(6, generator=g) for _ in range(4))
    tok_nll = torch.rand(20, generator=g)
    whole = metrics_from_sums(metric_sums(cfg, *dpo_loss(cfg, pc, pr, rc, rr, nll_loss=tok_nll.mean()), pc, pr,
                                          tok_nll.sum(), torch.tensor(20)))
    parts = []
    for s, ts in ((slice(0, 2), slice(0, 7)), (slice(2, 6), slice(7, 20))):
        parts.append(metric_sums(cfg, *dpo_loss(cfg, pc[s], pr[s], rc[s], rr[s], nll_loss=tok_nll.mean()),
                                 pc[s], pr[s], tok_nll[ts].sum(), torch.tensor(ts.stop - ts.start)))
    added = metrics_from_sums({k: (parts[0][k][0] + parts[1][k][0], parts[0][k][1] + parts[1][k][1])
                               for k in parts[0]})
    assert set(added) == set(whole) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                        "rewards/margins", "logps/chosen", "logps/rejected", "nll_loss"}
    for k in whole:
        assert added[k] == pytest.approx(whole[k], rel=1e-6)
