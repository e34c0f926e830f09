"""LoRA adapters between megaswift's megatron-core model and HF PEFT folders, in both directions.

Nothing here is per family: an adapter tensor follows the declared mapping of the weight it adapts.
LoRA changes a weight W [out, in] by ``scale * B @ A`` with A [r, in] and B [out, r]. Every base
mapping only regroups, splits or trims dim 0 (`Mapping.row_wise`), so:

- B goes through its weight's own transform: linear_qkv's B splits into q/k/v_proj's by the QKV
  mapping (per query group), linear_fc1's into gate/up_proj's by GatedMLP, a renamed weight's is
  renamed;
- A (the input features) is shared by every HF tensor a fused weight is made of: q/k/v_proj carry
  linear_qkv's one A. Importing needs them equal (Megatron-SWIFT's fused LoRA); a PEFT adapter whose
  q/k/v (gate/up) A matrices differ is refused, naming the module.

Over tensor parallel an adapter is split the way `LoraLinear` holds it (`adapter_shard`): a
column-parallel weight's B like the weight (COLUMN, GLU) and A replicated; a row-parallel weight's A
along dim 1 (ROW) and B replicated. A routed expert's adapter is one PEFT module per expert under
transformers' on-disk per-expert names (`mlp.experts.<E>.gate_proj` ...; fc1's A shared by gate/up,
its B split, as for a dense GatedMLP), split over expert-TP and gathered per expert-parallel rank as
the expert weights are; peft fuses such per-expert adapters into transformers' 3-D experts itself.

The PEFT side is `peft.get_peft_model_state_dict`'s: ``base_model.model.<HF module>.lora_A.weight``
/ ``.lora_B.weight``; a module saved whole (``modules_to_save``) under its HF tensor names; with
``bias="all"`` every bias, a LoRA-wrapped module's as ``<module>.base_layer.bias``. With tied
embeddings and the embedding saved, ``lm_head.weight`` is written too and ``ensure_weight_tying``
set, as peft does, so peft ties lm_head to the trained embedding as megatron does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from megaswift.converters.hf_io import CheckpointError
from megaswift.converters.mappings import Mapping, ModelDims
from megaswift.converters.names import EXPERT, LAYER, fill
from megaswift.converters.sharding import Shard

A, B = "lora_A.weight", "lora_B.weight"
PEFT_PREFIX = "base_model.model."
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
LM_HEAD = "lm_head.weight"   # transformers' name of a tied output layer (not a tensor of its own)
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_[AB]\.weight)$")
MERGE_HINT = "export it with --merge_lora true (an HF model with the adapter folded in) instead"


def adapter_shard(base: Shard, part: str) -> Shard:
    """How LoRA's `part` (A or B) of a weight split as `base` is split: A takes the weight's input
    split, B its output split, the other is replicated (see `LoraLinear`)."""
    if part == A:
        return Shard.ROW if base is Shard.ROW else Shard.REPLICATED
    if part == B:
        return base if base in (Shard.COLUMN, Shard.GLU) else Shard.REPLICATED
    raise ValueError(f"not a LoRA tensor: {part}")


def module_of(hf_name: str) -> str:
    """`model.layers.0.self_attn.q_proj` of `model.layers.0.self_attn.q_proj.weight`."""
    return hf_name.rsplit(".", 1)[0]


def peft_key(hf_name: str, lora_modules: set[str] | frozenset[str] = frozenset()) -> str:
    """PEFT's key of a whole HF tensor (saved module, bias): under `base_layer.` in a LoRA module."""
    module, param = hf_name.rsplit(".", 1)
    if module in lora_modules:
        return f"{PEFT_PREFIX}{module}.base_layer.{param}"
    return PEFT_PREFIX + hf_name


@dataclass(frozen=True)
class LoraMapping(Mapping):
    """LoRA's `part` (A or B) of the weight `base` maps; the HF side is PEFT's key per role."""
    base: Mapping | None = None
    part: str = A
    roles: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def of(cls, base: Mapping, part: str) -> "LoraMapping":
        if not base.row_wise:
            raise ValueError(f"LoRA on {base.mcore}: its mapping {type(base).__name__} changes more "
                             f"than the weight's rows, so the adapter has no PEFT form; {MERGE_HINT}")
        if not base.mcore.endswith(".weight"):
            raise ValueError(f"LoRA on {base.mcore}: not a weight")
        return cls(mcore=base.mcore.removesuffix("weight") + part, shard=adapter_shard(base.shard, part),
                   axis=base.axis, base=base, part=part)

    def hf_names(self, layer=None, expert=None) -> dict[str, str]:
        out = {}
        for role, name in self.base.hf_names(layer, expert).items():
            if not name.endswith(".weight"):
                raise ValueError(f"LoRA on {self.base.mcore}: HF tensor {name} is not a module's weight")
            out[role] = f"{PEFT_PREFIX}{module_of(name)}.{self.part}"
        return out

    def to_hf(self, t, dims):
        if self.part == A:  # one copy each: PEFT files hold no shared storage
            return {role: t.clone() for role in self.base.roles}
        return self.base.to_hf(t, dims)

    def to_mcore(self, hf, dims):
        if self.part == A:
            first, *rest = (hf[r] for r in self.base.roles)
            if any(not torch.equal(first, x) for x in rest):
                raise ValueError(f"{self.base.mcore}: the PEFT adapter's lora_A differs between "
                                 f"{'/'.join(self.base.roles)}, but megatron's fused linear has one A")
            return first
        return self.base.to_mcore(hf, dims)


# -- the model's names, from the family's declarations -------------------------------------------
@dataclass(frozen=True)
class Named:
    """One declared mapping at one global layer (None: not per layer) and, for a routed expert's
    weight, one global expert."""
    mapping: Mapping
    layer: int | None
    expert: int | None = None

    @property
    def mcore(self) -> str:
        return fill(self.mapping.mcore, self.layer, self.expert)

    @property
    def mcore_module(self) -> str:
        return self.mcore.rsplit(".", 1)[0]

    def hf(self) -> dict[str, str]:
        return self.mapping.hf_names(self.layer, self.expert)

    def lora_candidate(self) -> bool:
        """A decoder linear LoRA can wrap: a tensor-parallel weight of a decoder module."""
        return (self.mcore.startswith("decoder.") and self.mcore.endswith(".weight")
                and self.mapping.shard in (Shard.COLUMN, Shard.GLU, Shard.ROW))


# The parts of megatron's MoE layer (`MoELayer` and its pre-MLP norm) and of its dense MLP with the
# pre-MLP norm fused into fc1: an MoE family declares both, each decoder layer is one or the other.
_MOE_PART = re.compile(r"\.(mlp\.(router|experts|shared_experts)|pre_mlp_layernorm)\.")
_DENSE_MLP = re.compile(r"\.mlp\.linear_fc[12]\.")


def _moe_layers(family, hf_config) -> list[int]:
    """1 for each MoE decoder layer, 0 for a dense one (megatron's `moe_layer_freq` of the family)."""
    n = hf_config.num_hidden_layers
    if not family.num_experts(hf_config):
        return [0] * n
    freq = family.transformer_config(hf_config).get("moe_layer_freq", 1)
    return [int(i % freq == 0) for i in range(n)] if isinstance(freq, int) else list(freq)


def declared(family, hf_config) -> list[Named]:
    """Every mapping at every layer it applies to: a routed expert's at each global expert, MoE
    parts on MoE layers only, the dense MLP on dense layers only. Routed experts are named as
    megatron's SequentialMLP names them (`local_experts.{E}.linear_fc1`, the module LoRA wraps);
    grouped experts (`linear_fc1.weight{E}`) have no module per expert and are left out."""
    moe = _moe_layers(family, hf_config)
    experts = family.num_experts(hf_config)
    out = []
    for m in family.mappings(hf_config):
        if EXPERT in m.mcore and EXPERT + "." not in m.mcore:
            continue  # TEGroupedMLP's weight{E}
        expert_ids = range(experts) if EXPERT in m.mcore else [None]
        if LAYER in m.mcore:
            layers = [i for i in range(hf_config.num_hidden_layers)
                      if not (_MOE_PART.search(m.mcore) and not moe[i]) and not (_DENSE_MLP.search(m.mcore) and moe[i])]
            out += [Named(m, i, e) for i in layers for e in expert_ids]
        else:
            out += [Named(m, None, e) for e in expert_ids]
    return out


def _tied(hf_config) -> bool:
    return bool(getattr(hf_config, "tie_word_embeddings", False))


EMBEDDING = "embedding.word_embeddings.weight"   # megatron's (GPTModel's) input embedding


def embedding_hf(everything: list[Named]) -> str:
    """The HF tensor of the input embedding (`model.embed_tokens.weight`), from the declarations."""
    for x in everything:
        if x.mcore == EMBEDDING:
            return next(iter(x.hf().values()))
    raise ValueError(f"the family declares no {EMBEDDING}")


def _names_for(wanted: set[str], universe: set[str], match) -> list[str] | None:
    """The shortest list naming exactly `wanted` among `universe` under `match(name, entry)`: the
    last name component when that is exact, else None."""
    leaves = {w.rsplit(".", 1)[-1] for w in wanted}
    hit = {u for u in universe if any(match(u, leaf) for leaf in leaves)}
    return sorted(leaves) if hit == wanted else None


def _suffix(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


# -- export: megaswift -> PEFT ----------------------------------------------------------------------
@dataclass
class PeftPlan:
    """What a PEFT folder of this rank's trainable parameters holds (merged over ranks by `merge`)."""
    lora_modules: set[str] = field(default_factory=set)    # HF modules with LoRA
    saved_modules: set[str] = field(default_factory=set)   # HF modules saved whole
    saved_tensors: set[str] = field(default_factory=set)   # their HF tensors megaswift trains
    biases: set[str] = field(default_factory=set)          # HF biases (lora_bias all)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def merge(cls, plans: list["PeftPlan"]) -> "PeftPlan":
        out = cls()
        for p in plans:
            out.lora_modules |= p.lora_modules
            out.saved_modules |= p.saved_modules
            out.saved_tensors |= p.saved_tensors
            out.biases |= p.biases
            out.problems += [x for x in p.problems if x not in out.problems]
        return out


def classify(t, lora_bias: str) -> str:
    """'lora', 'bias' (trained by --lora_bias all) or 'save' (a module trained in full) for a
    trainable `convert.Target`."""
    if t.adapter in (A, B):
        return "lora"
    if lora_bias == "all" and t.mcore_name.endswith(".bias"):
        return "bias"
    return "save"


def plan_peft(trainable: list, lora_bias: str) -> PeftPlan:
    """The PEFT layout of this rank's trainable targets (`convert.Target`s), and what PEFT cannot say."""
    plan = PeftPlan()
    for t in trainable:
        kind = classify(t, lora_bias)
        if kind == "lora":
            try:
                plan.lora_modules.update(module_of(n) for n in t.hf_names().values())
                LoraMapping.of(t.mapping, t.adapter).hf_names(t.layer, t.expert)
            except ValueError as e:
                plan.problems.append(str(e))
        elif kind == "bias":
            plan.biases.update(t.hf_names().values())
        elif ".base_layer." in t.name:
            plan.problems.append(
                f"{t.mcore_name} trains in full inside a LoRA-wrapped linear (--modules_to_save names a "
                f"LoRA target or a module holding one); a PEFT module is either LoRA or saved whole")
        else:
            names = t.hf_names().values()
            plan.saved_modules.update(module_of(n) for n in names)
            plan.saved_tensors.update(names)
    return plan


def peft_config(plan: PeftPlan, everything: list[Named], cfg: dict, hf_config, base_name: str) -> dict:
    """adapter_config.json for `plan` (merged over ranks); ValueError for what PEFT cannot say."""
    problems = list(plan.problems)
    both = plan.lora_modules & plan.saved_modules
    if both:
        problems.append(f"{sorted(both)[0]} would be both a LoRA target and a module saved whole")
    hf_tensors = {n for x in everything for n in x.hf().values()}
    all_modules = {module_of(n) for n in hf_tensors}
    for m in sorted(plan.saved_modules):
        untrained = sorted(n for n in hf_tensors if module_of(n) == m and n not in plan.saved_tensors)
        if untrained:
            problems.append(f"PEFT saves HF module {m} whole, but megaswift trains only part of it "
                            f"({untrained[0]} is frozen)")
    if plan.biases and plan.biases != {n for n in hf_tensors if n.endswith(".bias")}:
        problems.append("--lora_bias all trains only some of the model's biases here")
    if problems:
        raise ValueError(f"this LoRA adapter has no PEFT form: {problems[0]}; {MERGE_HINT}")
    targets = _names_for(plan.lora_modules, all_modules, _suffix)
    if targets is None:  # e.g. --target_regex on some layers: peft full-matches a string
        targets = "|".join(re.escape(m) for m in sorted(plan.lora_modules))
    tie = _tied(hf_config) and module_of(embedding_hf(everything)) in plan.saved_modules
    saved = None
    if plan.saved_modules:   # peft matches modules_to_save by `name.endswith(entry)`
        saved = _names_for(plan.saved_modules, all_modules, lambda n, e: n.endswith(e)) or sorted(plan.saved_modules)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": cfg["lora_rank"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": cfg["lora_dropout"],
        "use_rslora": bool(cfg["use_rslora"]), "bias": "all" if plan.biases else "none",
        "target_modules": targets, "modules_to_save": saved, "ensure_weight_tying": tie,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_dora": False, "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None,
    }


def peft_tensors(t, full: torch.Tensor, plan: PeftPlan, lora_bias: str, dims: ModelDims,
                 hf_config) -> dict[str, torch.Tensor]:
    """PEFT's tensors of the trainable target `t` from its full MCore tensor `full`."""
    if classify(t, lora_bias) == "lora":
        m = LoraMapping.of(t.mapping, t.adapter)
        names = m.hf_names(t.layer, t.expert)
        return {names[r]: x for r, x in m.to_hf(full, dims).items()}
    names = t.hf_names()
    out = {peft_key(names[r], plan.lora_modules): x for r, x in t.mapping.to_hf(full, dims).items()}
    if _tied(hf_config) and t.mcore_name == EMBEDDING:
        out[PEFT_PREFIX + LM_HEAD] = next(iter(out.values())).clone()  # peft's tied copy
    return out


# -- import: PEFT -> megaswift ----------------------------------------------------------------------
_UNSUPPORTED = {  # adapter_config.json fields megaswift's LoRA has no counterpart for, and their no-op value
    "use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
    "layers_to_transform": None, "target_parameters": None, "trainable_token_indices": None,
    "use_qalora": False, "layer_replication": None, "use_bdlora": None, "alora_invocation_tokens": None,
}


@dataclass
class PeftFolder:
    dir: Path
    config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def read_peft_folder(path: str) -> PeftFolder:
    """A PEFT LoRA folder's config and tensors, or a one-line error naming --adapters and the fix."""
    from safetensors.torch import load_file

    root = Path(path).expanduser()
    flag = f"--adapters {path}"
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} is not a directory: pass a PEFT adapter folder (adapter_config.json "
                                f"+ {PEFT_WEIGHTS}, as peft's save_pretrained writes)")
    cfg_path = root / PEFT_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{flag} has no {PEFT_CONFIG}: pass a PEFT adapter folder (as peft's "
                                "save_pretrained writes); a megaswift LoRA run exports with --adapter_load")
    try:
        config = json.loads(cfg_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is damaged ({e}); re-save the adapter with peft") from None
    kind = config.get("peft_type")
    if str(kind).upper() != "LORA":
        raise ValueError(f"{flag}: peft_type {kind!r} in {PEFT_CONFIG}; megaswift imports LoRA adapters only "
                         "(peft_type LORA)")
    for key, noop in _UNSUPPORTED.items():
        value = config.get(key, noop)
        if value not in (noop, None, {}, [], False):
            raise ValueError(f"{flag}: {key}={value!r} in {PEFT_CONFIG} has no megaswift counterpart; merge "
                             "the adapter with peft (merge_and_unload) and import the merged model with --model")
    if config.get("bias", "none") not in ("none", "all"):
        raise ValueError(f"{flag}: bias={config['bias']!r}; megaswift has --lora_bias none|all only")
    weights = root / PEFT_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{flag} has no {PEFT_WEIGHTS} (only safetensors adapters are read; re-save "
                                "it with peft's save_pretrained(safe_serialization=True))")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own types
        raise CheckpointError(f"cannot read {weights}: {e}; the file is corrupt, re-save the adapter") from None
    if not any(_LORA_KEY.match(k) for k in tensors):
        raise CheckpointError(f"{weights} holds no LoRA tensor (base_model.model.<module>.lora_A.weight)")
    return PeftFolder(root, config, tensors)


def check_shared_a(folder: PeftFolder, everything: list[Named]) -> None:
    """Fused megatron linears share one A: refuse an adapter whose q/k/v (gate/up) A's differ."""
    for x in everything:
        if not x.lora_candidate() or len(x.mapping.roles) < 2:
            continue
        keys = [f"{PEFT_PREFIX}{module_of(n)}.{A}" for n in x.hf().values()]
        found = [folder.tensors[k] for k in keys if k in folder.tensors]
        if len(found) == len(keys) and any(not torch.equal(found[0], f) for f in found[1:]):
            mods = [module_of(n) for n in x.hf().values()]
            parts = "/".join(m.rsplit(".", 1)[-1] for m in mods)
            raise ValueError(
                f"--adapters {folder.dir}: {module_of(mods[0])} "
                f"{parts} have different lora_A matrices, but megatron fuses them into "
                f"{x.mcore_module.rsplit('.', 1)[-1]} whose LoRA has one A (as Megatron-SWIFT's); merge this "
                "adapter with peft (merge_and_unload) and import the merged model with --model, or train "
                "the adapter with megaswift")


def lora_config_from_peft(folder: PeftFolder, family, hf_config) -> dict:
    """megaswift's LoRA config (`TunerArgs.lora_config()`) of a PEFT folder, checked against the
    family's declarations: every tensor has a place, fused modules are targeted whole."""
    everything = declared(family, hf_config)
    flag = f"--adapters {folder.dir}"
    cfg = folder.config
    keys = set(folder.tensors)
    lora_hf = {m["module"] for k in keys if (m := _LORA_KEY.match(k))}
    # LoRA modules: every fused weight with all or none of its HF modules
    lora_mcore, known = set(), set()
    for x in everything:
        if not x.lora_candidate():
            continue
        mods = [module_of(n) for n in x.hf().values()]
        known.update(mods)
        hit = [m for m in mods if m in lora_hf]
        if hit and len(hit) != len(mods):
            leaves = lambda ms: "/".join(m.rsplit(".", 1)[-1] for m in ms)
            missing = [m for m in mods if m not in lora_hf]
            raise ValueError(f"{flag}: LoRA on {leaves(hit)} but not {leaves(missing)} of {mods[0].rsplit('.', 1)[0]}; "
                             f"megatron fuses {leaves(mods)} into {x.mcore_module.rsplit('.', 1)[-1]}, so its LoRA "
                             f"covers all of them: train with target_modules naming all of {leaves(mods)}, or "
                             "merge the adapter with peft and import the merged model with --model")
        if hit:
            lora_mcore.add(x.mcore_module)
    stray = sorted(lora_hf - known)
    if stray:
        raise ValueError(f"{flag}: LoRA on {stray[0]}, which is not one of the decoder's linear layers "
                         "megaswift's LoRA wraps (q/k/v/o_proj, gate/up/down_proj); merge it with peft instead")
    for k in keys:
        m = _LORA_KEY.match(k)
        if m and folder.tensors[k].shape[0 if m["part"] == A else 1] != cfg.get("r", 8):
            raise CheckpointError(f"{folder.dir / PEFT_WEIGHTS}: {k} has rank {folder.tensors[k].shape}, "
                                  f"{PEFT_CONFIG} says r={cfg.get('r', 8)}")
    check_shared_a(folder, everything)
    candidates = {x.mcore_module for x in everything if x.lora_candidate()}
    leaves = ["all-linear"] if lora_mcore == candidates else _names_for(lora_mcore, candidates, _suffix)
    # whole tensors: biases (bias all) and modules saved whole
    hf_tensors = {n for x in everything for n in x.hf().values()}
    lora_set = frozenset(lora_hf)
    rest = {k for k in keys if not _LORA_KEY.match(k)}
    biases = {n for n in hf_tensors if n.endswith(".bias")}
    bias_all = cfg.get("bias", "none") == "all"
    if bias_all:
        missing = sorted(peft_key(n, lora_set) for n in biases if peft_key(n, lora_set) not in rest)
        if missing:
            raise CheckpointError(f"{folder.dir / PEFT_WEIGHTS}: bias='all' but {missing[0]} is missing")
        rest -= {peft_key(n, lora_set) for n in biases}
    entries = cfg.get("modules_to_save") or []
    all_modules = {module_of(n) for n in hf_tensors}
    saved_hf = {m for m in all_modules if any(m.endswith(e) for e in entries)}
    tie = _tied(hf_config)
    embed = embedding_hf(everything)
    if tie and any(module_of(LM_HEAD).endswith(e) for e in entries) and module_of(embed) not in saved_hf:
        raise ValueError(f"{flag}: modules_to_save trains lm_head apart from embed_tokens, but the model ties "
                         "them (tie_word_embeddings) and megatron keeps one tensor; save embed_tokens too")
    saved_mcore, claimed = set(), set()
    for x in everything:
        names = list(x.hf().values())
        inside = [n for n in names if module_of(n) in saved_hf]
        if not inside:
            continue
        if len(inside) != len(names):
            other = sorted(set(names) - set(inside))[0]
            raise ValueError(f"{flag}: modules_to_save holds {inside[0]} but not {other}, which megatron keeps "
                             f"in one tensor {x.mcore}")
        if not set(names) <= claimed:   # a tied output layer is its embedding: saved with it
            saved_mcore.add(x.mcore_module)
        claimed.update(names)
    for module in sorted(saved_mcore):  # a megatron module is saved whole: all its tensors must be
        for x in everything:
            if x.mcore.startswith(module + ".") and not all(module_of(n) in saved_hf for n in x.hf().values()):
                raise ValueError(f"{flag}: modules_to_save {sorted(saved_hf)[0]} is part of megatron's {module} "
                                 f"(with {x.mcore}), which megaswift trains whole; leave it out of modules_to_save "
                                 "or merge the adapter with peft and import the merged model with --model")
    for m in saved_hf:
        for n in hf_tensors:
            if module_of(n) == m:
                key = peft_key(n, lora_set)
                if key not in keys:
                    raise CheckpointError(f"{folder.dir / PEFT_WEIGHTS}: modules_to_save {m} but {key} is missing")
                rest.discard(key)
    if tie and module_of(embed) in saved_hf:
        head = PEFT_PREFIX + LM_HEAD
        if head in keys:
            if not torch.equal(folder.tensors[head], folder.tensors[PEFT_PREFIX + embed]):
                raise ValueError(f"{flag}: lm_head and embed_tokens differ, but the model ties them "
                                 "(tie_word_embeddings) and megatron keeps one tensor")
            rest.discard(head)
        elif not cfg.get("ensure_weight_tying"):
            raise ValueError(f"{flag}: embed_tokens is saved but lm_head keeps the base's tied weight "
                             "(ensure_weight_tying false), which megatron's tied embedding cannot hold apart; "
                             "re-save the adapter with ensure_weight_tying=True")
    if rest:
        raise CheckpointError(f"{folder.dir / PEFT_WEIGHTS}: {len(rest)} tensor(s) belong to no LoRA module, "
                              f"saved module or bias of the config, e.g. {sorted(rest)[:3]}")
    mcore_modules = {x.mcore_module for x in everything}
    saved_names = _names_for(saved_mcore, mcore_modules, _suffix) or sorted(saved_mcore)
    return {"target_modules": leaves if leaves is not None else ["all-linear"],  # the regex overrides it
            "target_regex": None if leaves is not None else "|".join(re.escape(m) for m in sorted(lora_mcore)),
            "modules_to_save": saved_names, "lora_rank": int(cfg.get("r", 8)),
            "lora_alpha": cfg.get("lora_alpha", 8), "lora_dropout": float(cfg.get("lora_dropout", 0.0)),
            "lora_bias": "all" if bias_all else "none", "use_rslora": bool(cfg.get("use_rslora", False))}


def mcore_tensor(t, folder: PeftFolder, lora_bias: str, lora_modules: frozenset[str], dims: ModelDims):
    """The full MCore tensor of the trainable target `t` from the PEFT tensors; (tensor, keys read)."""
    if classify(t, lora_bias) == "lora":
        m = LoraMapping.of(t.mapping, t.adapter)
        names = m.hf_names(t.layer, t.expert)
    else:
        m = t.mapping
        names = {r: peft_key(n, lora_modules) for r, n in t.hf_names().items()}
    missing = sorted(n for n in names.values() if n not in folder.tensors)
    if missing:
        raise CheckpointError(f"{folder.dir / PEFT_WEIGHTS}: {missing[0]} is missing (needed for {t.mcore_name})")
    return m.to_mcore({r: folder.tensors[n] for r, n in names.items()}, dims), set(names.values())


def lora_hf_modules(folder: PeftFolder) -> frozenset[str]:
    return frozenset(m["module"] for k in folder.tensors if (m := _LORA_KEY.match(k)))


# -- the collective steps: this rank's chunks <-> a PEFT folder -------------------------------------
def _gather_objects(obj) -> list:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass
class PeftExport:
    """This rank's share of a PEFT export, checked: its trainable targets and the folder's config."""
    trainable: list
    plan: PeftPlan
    config: dict


def prepare_peft_export(chunks: list, family, hf_config, cfg: dict, base_name: str) -> PeftExport:
    """What a PEFT folder of this model's trainable parameters (adapters, modules_to_save, biases:
    `set_trainable` decides) holds. Needs only the names, so it runs before the adapter's tensors are
    read. Collective: every rank gets the same config, or raises the same ValueError when PEFT
    cannot express the adapter."""
    from megaswift.converters.convert import current_placement, targets

    trainable = [t for t in targets(chunks, family, hf_config, current_placement()) if t.param.requires_grad]
    plan = PeftPlan.merge(_gather_objects(plan_peft(trainable, cfg["lora_bias"])))
    return PeftExport(trainable, plan, peft_config(plan, declared(family, hf_config), cfg, hf_config, base_name))


def write_peft_folder(export: PeftExport, hf_config, dims: ModelDims, dtype: torch.dtype, out: Path,
                      cfg: dict) -> None:
    """Write `adapter_config.json` + one `adapter_model.safetensors` from the prepared targets (their
    values loaded since). Collective over every rank: the targets' pieces are gathered as for a
    dense export, each stage's writer (TP rank 0 of the first replica) saves its part, rank 0
    merges the parts into the one file peft reads."""
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from megaswift.converters.convert import current_placement, gather_full

    placement = current_placement()
    trainable, plan, config = export.trainable, export.plan, export.config
    tied = _tied(hf_config)
    tensors: dict[str, torch.Tensor] = {}
    for t in trainable:
        lora = classify(t, cfg["lora_bias"]) == "lora"
        full = gather_full(t.param, LoraMapping.of(t.mapping, t.adapter) if lora else t.mapping, placement)
        if full is None or (tied and t.mcore_name == "output_layer.weight"):
            continue
        for k, v in peft_tensors(t, full, plan, cfg["lora_bias"], dims, hf_config).items():
            tensors[k] = v.to(dtype).cpu().contiguous()
    rank = dist.get_rank() if dist.is_initialized() else 0
    part = f".adapter-part-{rank:05d}.safetensors"
    if tensors:
        save_file(tensors, str(out / part), metadata={"format": "pt"})
    parts = [p for p in _gather_objects(part if tensors else None) if p]
    if rank == 0:
        merged: dict[str, torch.Tensor] = {}
        for p in parts:
            merged.update(load_file(str(out / p)))
        save_file(dict(sorted(merged.items())), str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
        for p in parts:
            (out / p).unlink()
        (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if dist.is_initialized():
        dist.barrier()


def load_peft_weights(chunks: list, family, hf_config, dims: ModelDims, folder: PeftFolder, cfg: dict) -> None:
    """Fill this rank's trainable parameters (from `add_lora` + `set_trainable` with `cfg`, which
    `lora_config_from_peft` made) from the PEFT folder; every PEFT tensor must find its place."""
    from megaswift.converters.convert import current_placement, targets
    from megaswift.converters.sharding import shard

    placement = current_placement()
    lora_modules = lora_hf_modules(folder)
    consumed: set[str] = set()
    with torch.no_grad():
        for t in targets(chunks, family, hf_config, placement):
            if not t.param.requires_grad:
                continue
            full, keys = mcore_tensor(t, folder, cfg["lora_bias"], lora_modules, dims)
            m = LoraMapping.of(t.mapping, t.adapter) if classify(t, cfg["lora_bias"]) == "lora" else t.mapping
            rank, size = placement.on(m.axis)
            piece = shard(full, m.shard, rank, size, m.axis)
            if piece.shape != t.param.shape:
                raise CheckpointError(f"{folder.dir / PEFT_WEIGHTS}: {sorted(keys)[0]} gives {t.mcore_name} "
                                      f"shape {tuple(piece.shape)}, the model expects {tuple(t.param.shape)}; "
                                      "the adapter was trained on another model (check --model)")
            t.param.copy_(piece)
            consumed |= keys
    used = set().union(*_gather_objects(consumed))
    tied_head = PEFT_PREFIX + LM_HEAD if _tied(hf_config) else None   # checked equal to the embedding
    left = sorted(k for k in folder.tensors if k not in used and k != tied_head)
    if left:
        raise CheckpointError(f"{folder.dir / PEFT_WEIGHTS}: {len(left)} tensor(s) found no parameter of the "
                              f"model, e.g. {left[:3]}")
