"""Benchmark `megatron export` on SmolLM2-135M: wall time and peak RSS of each direction, and the floor.

The floor, measured in the same run, is a process that only reads the same safetensors bytes and
writes them back with safetensors (torch + safetensors imports included). Goals on a 2-core CPU
machine: each direction <= 15 s end to end and <= 1.0 GB peak RSS.

`--moe`: a synthetic Qwen3-MoE (64 experts x 8 layers, random bf16 weights in sharded
safetensors) converted with `--expert_model_parallel_size 4` on 4 ranks. The largest rank's peak
RSS must stay below its own shard (a quarter of the experts plus the dense weights) + 2 x the
largest single tensor + the import baseline (a process that imports megaswift, torch,
transformers and megatron-core and starts one gloo rank, measured in the same run).

    python bench/export_bench.py [--repeats 2] [--moe]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLOOR = """
import sys, glob, os
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for f in sorted(glob.glob(os.path.join(src, '*.safetensors'))):
    save_file(load_file(f), os.path.join(dst, os.path.basename(f)))
"""

MEASURE = """
import resource, subprocess, sys, time, json
t = time.perf_counter()
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measure(cmd: list[str]) -> dict:
    """Wall time and peak RSS of `cmd`, measured by a fresh parent so RSS is the command's own."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)
    res = json.loads(out.stdout)
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit status {res['rc']}")
    return res


BASELINE = """
from megaswift.args.parallel import ParallelArgs
from megaswift.runtime.distributed import destroy_distributed, init_distributed
import megaswift.commands.export, megaswift.converters.convert, megaswift.model.builder, transformers  # noqa
init_distributed(ParallelArgs())
destroy_distributed()
"""

MOE = dict(layers=8, experts=64, hidden=1024, moe_ffn=512, heads=16, kv_heads=4, head_dim=64, vocab=32000)


def synthetic_moe(out: Path) -> dict:
    """Write a Qwen3-MoE of random bf16 weights as one safetensors file per layer; its byte counts."""
    import json as _json

    import torch
    from safetensors.torch import save_file

    c = MOE
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": c["hidden"],
           "intermediate_size": 4 * c["hidden"], "moe_intermediate_size": c["moe_ffn"], "num_experts": c["experts"],
           "num_experts_per_tok": 8, "num_hidden_layers": c["layers"], "num_attention_heads": c["heads"],
           "num_key_value_heads": c["kv_heads"], "head_dim": c["head_dim"], "vocab_size": c["vocab"],
           "norm_topk_prob": True, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "dtype": "bfloat16",
           "max_position_embeddings": 4096}
    (out / "config.json").write_text(_json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    weight_map, sizes = {}, {"experts": 0, "dense": 0, "largest": 0}

    def put(fname, tensors):
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = fname
            b = t.numel() * t.element_size()
            sizes["experts" if ".experts." in k else "dense"] += b
            sizes["largest"] = max(sizes["largest"], b)

    h, q, kv, f = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"], c["moe_ffn"]
    put("embed.safetensors", {"model.embed_tokens.weight": rand(c["vocab"], h), "lm_head.weight": rand(c["vocab"], h),
                              "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.k_proj.weight": rand(kv, h),
             p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, q),
             p + "self_attn.q_norm.weight": torch.ones(c["head_dim"], dtype=torch.bfloat16),
             p + "self_attn.k_norm.weight": torch.ones(c["head_dim"], dtype=torch.bfloat16),
             p + "mlp.gate.weight": rand(c["experts"], h)}
        for e in range(c["experts"]):
            t.update({p + f"mlp.experts.{e}.gate_proj.weight": rand(f, h), p + f"mlp.experts.{e}.up_proj.weight": rand(f, h),
                      p + f"mlp.experts.{e}.down_proj.weight": rand(h, f)})
        put(f"layer{i:02d}.safetensors", t)
    (out / "model.safetensors.index.json").write_text(_json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sizes


def moe_main(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="megaswift-moe-bench-"))
    try:
        sizes = synthetic_moe(work / "hf")
        megatron = [sys.executable, "-m", "megaswift.cli", "export"]
        os.environ["NPROC_PER_NODE"] = "4"
        best = None
        for i in range(args.repeats):
            r = measure(megatron + ["--model", str(work / "hf"), "--to_mcore", "true", "--save", str(work / f"mc{i}"),
                                    "--expert_model_parallel_size", "4"])
            best = r if best is None or r["seconds"] < best["seconds"] else best
            shutil.rmtree(work / f"mc{i}", ignore_errors=True)
        del os.environ["NPROC_PER_NODE"]
        base = measure([sys.executable, "-c", BASELINE])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = 1e6
    shard = sizes["experts"] / 4 + sizes["dense"]
    bound = shard / mb + 2 * sizes["largest"] / mb + base["peak_rss_mb"]
    c = MOE
    print(f"synthetic qwen3_moe: {c['experts']} experts x {c['layers']} layers, {(sizes['experts'] + sizes['dense']) / 1e9:.2f} GB "
          f"of bf16 safetensors, {os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"megatron export --to_mcore at EP=4 (4 ranks): {best['seconds']:.1f} s, largest rank peak RSS "
          f"{best['peak_rss_mb']:.0f} MB")
    print(f"bound: own shard {shard / mb:.0f} MB + 2 x largest tensor {2 * sizes['largest'] / mb:.0f} MB + import "
          f"baseline {base['peak_rss_mb']:.0f} MB = {bound:.0f} MB -> {'met' if best['peak_rss_mb'] <= bound else 'NOT met'}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs per case; the best is reported")
    ap.add_argument("--moe", action="store_true", help="the synthetic MoE case at EP=4 instead")
    args = ap.parse_args()
    if args.moe:
        return moe_main(args)
    from megaswift.assets import fetch_smollm2

    hf = fetch_smollm2()
    megatron = [sys.executable, "-m", "megaswift.cli", "export"]
    work = Path(tempfile.mkdtemp(prefix="megaswift-bench-"))
    cases = {
        "floor (safetensors read+write)": lambda i: [sys.executable, "-c", FLOOR, str(hf), str(work / f"floor{i}")],
        "megatron export --to_mcore": lambda i: megatron + ["--model", str(hf), "--to_mcore", "true",
                                                             "--save", str(work / f"mc{i}")],
        "megatron export --to_hf": lambda i: megatron + ["--load", str(work / f"mc{i}"), "--to_hf", "true",
                                                          "--save", str(work / f"hf{i}")],
    }
    best: dict[str, dict] = {}
    try:
        for i in range(args.repeats):
            for name, cmd in cases.items():
                r = measure(cmd(i))
                if name not in best or r["seconds"] < best[name]["seconds"]:
                    best[name] = r
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 1e6
    print(f"SmolLM2-135M-Instruct, {size:.0f} MB of bf16 safetensors, {os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"{'case':34s} {'seconds':>8s} {'peak RSS MB':>12s}")
    for name, r in best.items():
        print(f"{name:34s} {r['seconds']:8.2f} {r['peak_rss_mb']:12.0f}")
    floor = best["floor (safetensors read+write)"]["seconds"]
    for name in list(cases)[1:]:
        r = best[name]
        goal = r["seconds"] <= 15 and r["peak_rss_mb"] <= 1000
        print(f"{name}: {r['seconds'] / floor:.1f}x the floor's time; goal (<=15 s, <=1000 MB) "
              f"{'met' if goal else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
