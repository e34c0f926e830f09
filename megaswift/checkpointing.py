"""megatron-core distributed checkpoints (torch_dist) in Megatron-LM's directory layout.

    <dir>/latest_checkpointed_iteration.txt   "release" or the iteration number; written last
    <dir>/release/ or <dir>/iter_0000100/     the torch_dist checkpoint (reshardable over TP/PP)
    <dir>/args.json                           how the checkpoint was made (model, layout, dtype),
                                              with the keys Megatron-SWIFT reads (`CheckpointRecord`)
    <dir>/hf_config/                          the HF config, generation config and tokenizer

Megatron-SWIFT (`swift export --to_mcore`, `megatron sft`) writes the same layout (iteration 1
for an export) with ms-swift's args.json and no hf_config/: `model/source.py` reads those.

A checkpoint directory only becomes visible through the tracker, written after every rank has
finished, so a crash during a save leaves the previous checkpoint usable.

Every load goes through `load_state` / `load_common`: no pickle in the checkpoint runs code
(`runtime/safe_load.py`), and a damaged tracker, iteration directory or shard is a one-line
CheckpointError naming the file, checked before megatron-core reads anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from torch.distributed.checkpoint.api import CheckpointException

from megaswift.converters.hf_io import CheckpointError
from megaswift.runtime.safe_load import damaged, read_metadata, restricted_unpickling

TRACKER = "latest_checkpointed_iteration.txt"
ARGS = "args.json"
HF_CONFIG = "hf_config"
_ITERATION = re.compile(r"release|iter_\d{7}")


def iteration_dir(root: Path, iteration: int | str) -> Path:
    return root / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")


def per_layer(state):
    """`state` with every decoder-layer tensor under its own key (`decoder.layers.<global layer>.…`)
    instead of megatron's one tensor stacked over all layers.

    A stacked tensor must be covered by the layers of all ranks together; a subset of layers
    (LoRA on some layers, optimizer state of a partly frozen model) is not, and megatron-core
    refuses to save it. Per-layer keys stay reshardable over pipeline layouts (the key carries the
    global layer number). Factories (SwiGLU's gate/up split) get the same treatment on what they build.
    """
    if isinstance(state, dict):
        return {k: per_layer(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(per_layer(v) for v in state)
    if isinstance(state, ShardedTensorFactory):
        build = state.build_fn
        return dataclasses.replace(state, build_fn=lambda *a, **k: per_layer(build(*a, **k)))
    if isinstance(state, ShardedTensor) and state.prepend_axis_num and state.key.startswith("decoder.layers."):
        v = state
        layer = v.global_offset[0]
        return dataclasses.replace(
            v, key=v.key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1),
            global_shape=v.global_shape[1:], global_offset=v.global_offset[1:],
            axis_fragmentations=v.axis_fragmentations[1:] if v.axis_fragmentations else None,
            prepend_axis_num=v.prepend_axis_num - 1)
    return state


def model_state_dict(models, trainable_only: bool = False) -> dict:
    """Megatron-LM's keys: `model` for one chunk, `model0`, `model1` ... for virtual stages.

    `trainable_only`: just the parameters that train (a LoRA run's adapters and modules_to_save),
    which is what a LoRA checkpoint holds (per decoder layer, see `per_layer`); the frozen base
    comes from `--load` / `--model`.
    """
    def state(m):
        sd = m.sharded_state_dict()
        if trainable_only:
            keep = {n for n, p in m.named_parameters() if p.requires_grad}
            sd = per_layer({k: v for k, v in sd.items() if k in keep})
        return sd

    if len(models) == 1:
        return {"model": state(models[0])}
    return {f"model{i}": state(m) for i, m in enumerate(models)}


def load_model_states(models, loaded: dict, trainable_only: bool = False) -> None:
    """Put the loaded model state(s) into the chunks: every parameter, or exactly the trainable ones."""
    for i, m in enumerate(models):
        result = m.load_state_dict(loaded["model" if len(models) == 1 else f"model{i}"], strict=not trainable_only)
        if trainable_only:
            want = {n for n, p in m.named_parameters() if p.requires_grad}
            missing = sorted(want & set(result.missing_keys))
            if missing or result.unexpected_keys:
                raise CheckpointError(f"the adapter checkpoint does not match the adapters of this run: "
                                      f"missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}")


def save_models(models, root: Path, iteration: int | str = "release", extra: dict | None = None) -> Path:
    """Save this rank's chunks into `root`; every rank calls it. Returns the iteration dir."""
    state = model_state_dict(models)
    state.update(extra or {})
    return save_state(state, root, iteration)


def save_state(state: dict, root: Path, iteration: int | str, extra=None) -> Path:
    """dist_checkpointing.save of `state` into root/<iteration dir>, then `extra(ckpt_dir)` on
    every rank (files of its own), then the tracker (last)."""
    ckpt = iteration_dir(root, iteration)
    if _rank() == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    _barrier()
    state = {**state, "checkpoint_version": 3.0,
             "iteration": 0 if iteration == "release" else int(iteration)}
    dist_checkpointing.save(state, str(ckpt))  # into an empty dir, as it expects
    if extra is not None:
        extra(ckpt)
    _barrier()
    if _rank() == 0:
        tmp = root / (TRACKER + ".tmp")
        tmp.write_text(str(iteration))
        os.replace(tmp, root / TRACKER)
    _barrier()
    return ckpt


def resolve(root: Path) -> Path:
    """The iteration directory the tracker of `root` points at, or a clear error."""
    tracker = root / TRACKER
    if not tracker.exists():
        raise CheckpointError(f"{root} is not a megatron checkpoint: {TRACKER} is missing "
                              "(was the save interrupted? pass a directory written by "
                              "`megatron export --to_mcore` or a training run)")
    text = tracker.read_bytes().decode("utf-8", "replace").strip()
    if text != "release" and not (text.isascii() and text.isdigit()):
        raise CheckpointError(f"{tracker} is damaged: it holds {text[:40]!r}, not an iteration number "
                              f"or 'release'; {_iterations_hint(root)}")
    ckpt = iteration_dir(root, text)
    if not ckpt.is_dir():
        raise CheckpointError(f"{tracker} names iteration {text}, but {ckpt} does not exist; "
                              f"{_iterations_hint(root)}")
    if not (ckpt / "metadata.json").exists():
        raise CheckpointError(f"{ckpt} named by {tracker} is not a complete torch_dist checkpoint; "
                              f"{_iterations_hint(root, ckpt)}")
    _check_format(ckpt)
    return ckpt


def _iterations_hint(root: Path, but: Path | None = None) -> str:
    """Which complete iterations `root` holds, for errors about the one the tracker names."""
    found = sorted(p.name for p in root.iterdir()
                   if p != but and _ITERATION.fullmatch(p.name) and (p / "metadata.json").is_file())
    if not found:
        return f"{root} holds no complete iteration: re-save the checkpoint"
    return f"{root} holds {', '.join(found)}: write the one to load (its number, or release) into {TRACKER}"


def _check_format(ckpt: Path) -> None:
    """Only torch_dist with megatron's torch common file: the formats whose readers
    `restricted_unpickling` guards (megatron-core would pick its reader from this file)."""
    path = ckpt / "metadata.json"
    try:
        fmt = json.loads(path.read_text())
        backends = (fmt["sharded_backend"], fmt["common_backend"])
    except (ValueError, KeyError, TypeError) as e:
        raise damaged(path, f"{type(e).__name__}: {e}") from None
    if backends != ("torch_dist", "torch"):
        raise CheckpointError(f"{path}: a {backends[0]!r}/{backends[1]!r} checkpoint; megaswift loads "
                              "torch_dist checkpoints only (re-save it with megatron-core's torch_dist format)")


def _check_shards(ckpt: Path) -> None:
    """Every file the checkpoint's index names exists inside `ckpt` and is long enough.

    A truncated or missing shard is named here, before megatron-core starts: torch would fail
    deep inside its reader ("PytorchStreamReader failed reading zip archive", EOFError) with a
    traceback that names no file.
    """
    index = ckpt / ".metadata"
    md = read_metadata(index)
    need: dict[str, int] = {}
    try:
        for info in (md.storage_data or {}).values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), int(info.offset) + int(info.length))
    except (AttributeError, TypeError, ValueError) as e:
        raise damaged(index, f"{type(e).__name__}: {e}") from None
    for rel, size in sorted(need.items()):
        path = ckpt / rel
        if Path(rel).name != rel or rel in ("", ".", ".."):
            raise damaged(index, f"it names a file outside the checkpoint: {rel!r}")
        if not path.is_file():
            raise damaged(path, f"missing; {index} lists it")
        if path.stat().st_size < size:
            raise damaged(path, f"truncated: {path.stat().st_size} bytes, {index.name} needs {size}")


def _read_failure(e: CheckpointException) -> BaseException | None:
    """The per-rank failure inside torch's CheckpointException that is a damaged file (a shard
    whose bytes are not what the index says), or None for anything else (e.g. a shape mismatch)."""
    for failure in e.failures.values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, CheckpointError | EOFError | pickle.UnpicklingError | zipfile.BadZipFile | OSError) or (
                isinstance(exc, RuntimeError) and "PytorchStreamReader" in str(exc)):
            return exc
    return None


def load_state(sharded_state: dict, ckpt: Path) -> dict:
    """dist_checkpointing.load of the iteration directory `ckpt` (from `resolve`), safely."""
    with restricted_unpickling(ckpt):
        _check_shards(ckpt)
        try:
            return dist_checkpointing.load(sharded_state, str(ckpt))
        except CheckpointException as e:
            cause = _read_failure(e)
            if isinstance(cause, CheckpointError):
                raise cause from None
            if cause is not None:
                raise damaged(ckpt, f"{type(cause).__name__}: {cause}") from None
            raise


def load_common(ckpt: Path) -> dict:
    """The common (non-sharded) state of the iteration directory `ckpt`, safely."""
    with restricted_unpickling(ckpt):
        _check_shards(ckpt)
        return dist_checkpointing.load_common_state_dict(str(ckpt))


def stored_shape(ckpt: Path, key: str) -> tuple[int, ...] | None:
    """The global shape the iteration directory `ckpt` stores tensor `key` with (None: no such tensor),
    read from its index alone."""
    meta = read_metadata(ckpt / ".metadata").state_dict_metadata.get(key)
    size = getattr(meta, "size", None)
    return tuple(size) if size is not None else None


def load_models(models, root: Path, trainable_only: bool = False) -> None:
    """Load this rank's chunks from `root` at whatever TP/PP it was saved with (only the trainable
    parameters, from a LoRA checkpoint, with `trainable_only`)."""
    loaded = load_state(model_state_dict(models, trainable_only), resolve(root))
    load_model_states(models, loaded, trainable_only)


SWIFT_LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_bias", "use_rslora", "target_modules",
                   "target_regex", "modules_to_save")
"""LoRA flags Megatron-SWIFT's `--adapter_load` reads from a run's args.json (MegatronTunerMixin.load_tuner_config)."""


@dataclass
class CheckpointRecord:
    """`args.json`: what rebuilds a checkpoint's model, written by export and by training alike.

    ``flags`` holds a training run's flags by group (``mode``, ``model_args``, ``parallel``,
    ``data``, ``train``, ``runtime``), kept at the top level of the file. The file also carries the
    keys ms-swift 3.8 reads from a checkpoint's args.json, so Megatron-SWIFT can `--load` it:
    ``model`` (MegatronTrainArguments takes the model from it when `--model` is not given),
    ``model_type`` (only when known: a missing one lets ms-swift infer it from the model, as it did
    the first time; an HF `model_type` is not ms-swift's), ``torch_dtype``, ``model_dir``, and from
    `swift_keys` ``train_type`` and, for a LoRA run, its adapter flags and base ``load``.
    """
    family: str
    torch_dtype: str
    padded_vocab_size: int
    make_vocab_size_divisible_by: int
    saved_with: dict | None = None          # the layout it was written at (TP, PP)
    source_model: str | None = None         # the HF model it was converted from
    model: str | None = None                # ms-swift's `model`: the HF model, as --model named it
    model_dir: str | None = None            # ms-swift's `model_dir`: that model's local folder
    model_type: str | None = None           # ms-swift's model type, when one was given or read
    flags: dict = field(default_factory=dict)
    megaswift_checkpoint: int = 1

    def swift_keys(self) -> dict:
        """`train_type` (and a LoRA run's adapter flags and base `load`), in ms-swift's spelling."""
        tuner = self.flags.get("tuner") or {}
        keys = {"train_type": tuner.get("train_type", "full")}
        if keys["train_type"] == "lora":
            keys.update({k: tuner[k] for k in SWIFT_LORA_KEYS if k in tuner})
            base = (self.flags.get("model_args") or {}).get("load")
            if base:
                keys["load"] = base
        return keys

    def write(self, root: Path) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "flags" and v is not None}
        tmp = root / (ARGS + ".tmp")
        tmp.write_text(json.dumps({**self.swift_keys(), **data, **self.flags}, indent=2, default=str) + "\n")
        os.replace(tmp, root / ARGS)

    @classmethod
    def read(cls, root: Path) -> "CheckpointRecord":
        path = root / ARGS
        data = read_args(root)
        if data is None:
            raise CheckpointError(f"{path} is missing: {root} was not written by megaswift; "
                                  "re-export it with `megatron export --to_mcore`")
        if not is_megaswift_record(data):
            raise CheckpointError(f"{path} was written by ms-swift (Megatron-SWIFT) or Megatron-LM, not megaswift: "
                                  "such a checkpoint is read as --load only (with --model <hf dir> for its config)")
        try:
            known = {f.name for f in fields(cls)} - {"flags"}
            derived = {"train_type", "load", *SWIFT_LORA_KEYS}
            return cls(**{k: v for k, v in data.items() if k in known},
                       flags={k: v for k, v in data.items() if k not in known and k not in derived})
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path} is damaged ({e}); re-export the checkpoint with "
                                  "`megatron export --to_mcore`") from None


def read_args(root: Path) -> dict | None:
    """`root`'s args.json as a dict (megaswift's record or ms-swift's arguments); None when absent."""
    path = root / ARGS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path} is damaged ({e}); re-export the checkpoint") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is damaged (it holds a {type(data).__name__}, not an object); "
                              "re-export the checkpoint")
    return data


def is_megaswift_record(data: dict) -> bool:
    """megaswift writes `family` (and `megaswift_checkpoint`); ms-swift's arguments have neither."""
    return "family" in data or "megaswift_checkpoint" in data


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
