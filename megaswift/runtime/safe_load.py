"""Reading a checkpoint runs no code: every pickle in it is unpickled against a fixed list of classes.

A torch_dist checkpoint holds pickles in three places, and with megatron-core 0.16.1 on torch 2.13
a `__reduce__` planted in two of them runs at `megatron sft/export --load`:

  <ckpt>/.metadata      torch.distributed.checkpoint's `FileSystemReader.read_metadata` calls
                        plain `pickle.load` (the index of every tensor and object in the shards)
  objects in .distcp    `DefaultLoadPlanner.load_bytes` calls `torch.load(weights_only=False)` on
                        the non-tensor entries (megatron's ShardedObjects: layers' `_extra_state`,
                        the distributed optimizer's bucket layout)
  <ckpt>/common.pt      megatron's `TorchCommonLoadStrategy.load_common` calls `torch.load` with
                        torch's default, weights-only since torch 2.6 but a full unpickle under
                        TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1

`restricted_unpickling()` swaps those three readers for the duration of one load and puts them
back afterwards. `.metadata` goes through `MetadataUnpickler`, which admits only the records
torch.distributed.checkpoint writes there (`METADATA_GLOBALS`, found by recording every class
unpickled from checkpoints megaswift saved: export, training with Adam, SGD, the distributed
optimizer, float32 and bfloat16). The shards' object entries go through `torch_load`: weights-only,
with no extra globals, as megaswift's writers (`save_state`, `save_training_state`) put only tensors,
numbers, strings and containers there. common.pt goes through `load_common_file`: the same, except
for the records Megatron-LM keeps there (`FOREIGN_ENTRIES`: its flags as an argparse.Namespace,
which Megatron-SWIFT fills with ms-swift's and transformers' objects, and the rerun state
machine's enum); a class or function named inside those becomes an inert `Unresolved` stand-in
(nothing is imported, nothing is called), one named anywhere else is refused. A refused class is a
`CheckpointError` naming the file and the class; a file that cannot be parsed is one naming the
file as damaged.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pickle
from pathlib import Path

import torch

from megaswift.converters.hf_io import CheckpointError

METADATA_GLOBALS = frozenset({
    "torch.distributed.checkpoint.metadata.Metadata",
    "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",  # TensorProperties' memory format
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    # megatron's writer adds every rank's save plan (`all_local_plans`) to the metadata
    "torch.distributed.checkpoint.planner.SavePlan",
    "torch.distributed.checkpoint.planner.WriteItem",
    "torch.distributed.checkpoint.planner.WriteItemType",
    "torch.distributed.checkpoint.planner.TensorWriteData",
    "torch.Size",
    "torch.serialization._get_layout",  # how a torch.layout pickles itself: a lookup by name
    "collections.OrderedDict",
})
"""Classes and functions `.metadata` may name, besides the constants `_is_torch_constant` admits."""

TORCH_LOAD_GLOBALS: tuple = ()
"""Globals admitted to the shards' object entries (and megaswift's rng files) beyond torch's own
weights-only set (tensors, storages, dtypes, OrderedDict). None: megaswift writes no other type there."""

COMMON_GLOBALS: tuple = (argparse.Namespace,)
"""Globals admitted to common.pt besides `TORCH_LOAD_GLOBALS`: Megatron-LM's save_checkpoint pickles
its flags there as an argparse.Namespace (`state_dict['args'] = args`), a plain attribute bag."""

FOREIGN_ENTRIES = ("args", "rerun_state_machine")
"""common.pt entries Megatron-LM fills with its run's own objects, which megaswift never reads:
`args` (Megatron-SWIFT sets ms-swift's ModelInfo, ModelMeta and MegatronModelMeta, transformers'
config, functions and megatron enums on it) and `rerun_state_machine` (a RerunMode enum)."""

NEVER_NAMED = frozenset({"builtins", "os", "sys", "posix", "nt", "subprocess", "runpy", "importlib", "pickle",
                         "marshal", "shutil", "socket", "ctypes", "code", "codeop", "pty", "webbrowser"})
"""Modules whose names in a checkpoint can only be there to run code (exec, eval, system ...): refused
even inside `FOREIGN_ENTRIES` (torch's own builtins, set or slice, are in its weights-only set)."""


def _is_torch_constant(module: str, name: str) -> bool:
    """torch.float32, torch.strided, torch.contiguous_format ...: values, never called. (`vars`,
    not getattr: torch's module __getattr__ would import a lazily loaded submodule by that name.)"""
    return (module == "torch" and not name.startswith("_")
            and isinstance(vars(torch).get(name), (torch.dtype, torch.layout, torch.memory_format)))


def refused(name: str | Path, cls: str) -> CheckpointError:
    """`name` (a file, or a file and entry) pickles `cls`, which no checkpoint megaswift reads holds."""
    return CheckpointError(f"{name} holds a disallowed object {cls} and will not be loaded: a megatron "
                           "checkpoint holds no such object, so the file was altered or is not a "
                           "checkpoint (loading it could run code); use a checkpoint from a trusted source")


def damaged(name: str | Path, why: object) -> CheckpointError:
    """`name` cannot be parsed; `why`'s first sentence says how (torch's messages run on)."""
    detail = str(why).strip().splitlines()[0].split(". ")[0] if str(why).strip() else type(why).__name__
    return CheckpointError(f"{name} is damaged ({detail}): re-save the checkpoint or load an earlier iteration")


class MetadataUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only `METADATA_GLOBALS` and torch dtype/layout constants;
    any other class or function in the stream is refused before it can be called."""

    def __init__(self, file, name: str | Path):
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str):
        if f"{module}.{name}" in METADATA_GLOBALS or _is_torch_constant(module, name):
            return super().find_class(module, name)
        raise refused(self.name, f"{module}.{name}")


def unpickle_metadata(file, name: str | Path):
    """The torch.distributed.checkpoint `Metadata` in `file`, restricted; CheckpointError otherwise."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        md = MetadataUnpickler(file, name).load()
    except CheckpointError:
        raise
    except Exception as e:  # EOFError, UnpicklingError, ... of a truncated or overwritten file
        raise damaged(name, f"{type(e).__name__}: {e}") from None
    if not isinstance(md, Metadata):
        raise damaged(name, f"holds a {type(md).__name__}, not torch.distributed.checkpoint Metadata")
    return md


def read_metadata(path: Path):
    """`<ckpt>/.metadata`, restricted (see `unpickle_metadata`)."""
    if not path.is_file():
        raise damaged(path, "missing")
    with open(path, "rb") as f:
        return unpickle_metadata(f, path)


@contextlib.contextmanager
def _only_safe_globals(admitted):
    """Within: torch.load(weights_only=True) admits torch's own set plus `admitted`, and not the
    globals libraries registered process-wide (megatron-core registers 16 at import, among them
    argparse.Namespace, pathlib.PosixPath and numpy's array reconstructor)."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(list(admitted))
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def torch_load(f, name: str | Path, admitted=TORCH_LOAD_GLOBALS):
    """torch.load(weights_only=True) of a path or buffer, admitting `admitted` only.

    weights_only is passed explicitly, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot lift it."""
    with _only_safe_globals(admitted):
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise damaged(name, "missing") from None
        except pickle.UnpicklingError as e:
            unsafe = _unsafe_globals(f)
            if unsafe:
                raise refused(name, unsafe[0]) from None
            lines = [ln for ln in str(e).splitlines() if ln.strip().startswith("WeightsUnpickler error")]
            raise damaged(name, lines[0].strip() if lines else "UnpicklingError") from None
        except Exception as e:  # RuntimeError "PytorchStreamReader failed ...", EOFError ...
            raise damaged(name, f"{type(e).__name__}: {e}") from None


class Unresolved:
    """Stands in for a class or function a checkpoint's pickle names and megaswift never imports:
    it keeps the name (`name`, on its class) and what it was pickled with (`args`, `state`), and
    does nothing else, so none of the original's code can run."""
    name = "?"

    def __new__(cls, *args, **_kwargs):
        self = object.__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *_args, **_kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<unresolved {self.name}>"


def _stand_in(name: str) -> type:
    return type("Unresolved", (Unresolved,), {"name": name, "__qualname__": f"Unresolved[{name}]"})


def _stand_in_outside(state: dict, allowed: tuple) -> str | None:
    """The name of the first `Unresolved` in `state` outside the entries `allowed`, or None."""
    stack = [v for k, v in state.items() if k not in allowed]
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Unresolved) or (isinstance(obj, type) and issubclass(obj, Unresolved)):
            return obj.name
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, argparse.Namespace):
            stack.extend(vars(obj).values())
    return None


def load_common_file(path: Path) -> dict:
    """A checkpoint's common.pt (megaswift's, or Megatron-LM's with its `args`), weights-only.

    Tensors, numbers, strings, containers and argparse.Namespace load as themselves. Megatron-LM's
    own records (`FOREIGN_ENTRIES`) may name further classes and functions (a Megatron-SWIFT
    checkpoint's `args` holds ms-swift objects): each becomes an `Unresolved` stand-in. One named
    outside those entries, or from a module in `NEVER_NAMED`, is refused."""
    with _only_safe_globals(COMMON_GLOBALS):
        names = _unsafe_globals(path)
    for full in names:
        if full.split(".", 1)[0] in NEVER_NAMED:
            raise refused(path, full)
    state = torch_load(path, path, admitted=(*COMMON_GLOBALS, *((_stand_in(n), n) for n in names)))
    if not isinstance(state, dict):
        raise damaged(path, f"holds a {type(state).__name__}, not a dict")
    outside = _stand_in_outside(state, FOREIGN_ENTRIES)
    if outside is not None:
        raise refused(path, outside)
    return state


def _unsafe_globals(f) -> list[str]:
    """The globals torch refused in `f` (torch reads the pickle's opcodes, runs nothing)."""
    if isinstance(f, io.IOBase):
        f.seek(0)
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception:
        return []


class _MetadataPickle:
    """Stands in for the `pickle` module of torch.distributed.checkpoint.filesystem, whose only
    `pickle.load` is read_metadata's; every other attribute is the real module's."""

    def __init__(self, load):
        self.load = load

    def __getattr__(self, attr):
        return getattr(pickle, attr)


@contextlib.contextmanager
def restricted_unpickling(ckpt: Path):
    """While active, megatron-core and torch.distributed.checkpoint read `ckpt` without running code.

    Three call sites are replaced (see the module docstring) and restored on exit; nothing else in
    the process changes. torch swallows an exception raised while it reads the metadata (it falls
    back to a per-rank file and fails with an AssertionError) and wraps one raised while it reads
    the shards in a CheckpointException; the first CheckpointError our readers raised is re-raised
    instead, so the message names the file and the class.
    """
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
    from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner
    from torch.distributed.checkpoint import default_planner, filesystem
    from torch.distributed.checkpoint._traverse import set_element

    current = getattr(filesystem, "pickle", None)
    if ((current is not pickle and not isinstance(current, _MetadataPickle))  # nested: already ours
            or MCoreLoadPlanner.load_bytes is not default_planner.DefaultLoadPlanner.load_bytes):
        # fail closed: a torch whose readers moved must be reviewed before it loads anything
        raise RuntimeError("this torch reads checkpoint metadata differently from what "
                           "megaswift/runtime/safe_load.py guards; update that module")
    errors: list[CheckpointError] = []

    def record(fn):
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except CheckpointError as e:
                errors.append(e)
                raise
        return wrapped

    @record
    def load_bytes(planner, read_item, value):  # DefaultLoadPlanner.load_bytes, weights-only
        fqn = read_item.dest_index.fqn
        try:
            name = f"{ckpt / planner.metadata.storage_data[read_item.storage_index].relative_path} (entry {fqn})"
        except (AttributeError, KeyError, TypeError):
            name = f"{ckpt} (entry {fqn})"
        obj = torch_load(value, name)
        if planner.flatten_state_dict:
            set_element(planner.original_state_dict, planner.mappings[fqn], obj)
        else:
            planner.state_dict[fqn] = obj

    @record
    def load_common(_strategy, checkpoint_dir):  # TorchCommonLoadStrategy.load_common, weights-only
        return load_common_file(Path(checkpoint_dir) / COMMON_STATE_FNAME)

    saved = (filesystem.pickle, default_planner.DefaultLoadPlanner.load_bytes, TorchCommonLoadStrategy.load_common)
    filesystem.pickle = _MetadataPickle(record(lambda file, **_kw: unpickle_metadata(
        file, getattr(file, "name", ckpt / ".metadata"))))
    default_planner.DefaultLoadPlanner.load_bytes = load_bytes
    TorchCommonLoadStrategy.load_common = load_common
    try:
        yield
    except BaseException as e:
        if errors and e is not errors[0]:
            raise errors[0] from None
        raise
    finally:
        filesystem.pickle, default_planner.DefaultLoadPlanner.load_bytes, TorchCommonLoadStrategy.load_common = saved
