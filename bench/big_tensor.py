"""Peak memory of merging one huge tensor (default: Qwen-72B's 152064×8192 bf16 embedding, 2.5 GB).

    python bench/big_tensor.py [--rows 152064 --cols 8192] [--workdir bench/work]

Builds two single-tensor checkpoints (streamed, so building needs little memory), merges them with
`slerp-merge` in a child process and reports its wall time and peak RSS (from the OS: ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from slerp_plugin.checkpoint import OutputTensor, ShardWriter


def write_checkpoint(folder: Path, rows: int, cols: int, seed: int, like: torch.Tensor | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = "model.embed_tokens.weight"
    g = torch.Generator().manual_seed(seed)
    with ShardWriter(folder / "model.safetensors", [OutputTensor(name, "BF16", (rows, cols))]) as w:
        step = 4096
        for r in range(0, rows, step):
            n = min(step, rows - r)
            block = torch.randn((n, cols), generator=g).to(torch.bfloat16)
            w.write(memoryview(block.reshape(-1).view(torch.uint8).numpy()))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": rows, "hidden_size": cols}))
    (folder / "tokenizer.json").write_text("{}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=152064)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--workdir", type=Path, default=Path("bench/work/big_tensor"))
    args = ap.parse_args()
    a, b, out = args.workdir / "a", args.workdir / "b", args.workdir / "merged"
    for p, seed in ((a, 1), (b, 2)):
        if not (p / "model.safetensors").is_file():
            write_checkpoint(p, args.rows, args.cols, seed)
    shutil.rmtree(out, ignore_errors=True)
    code = (
        "from slerp_plugin.engine import run_merge; from slerp_plugin.spec import MergeSpec; import sys;"
        f"run_merge(MergeSpec(model_1={str(a)!r}, model_2={str(b)!r}, t=0.5, output={str(out)!r}));"
        "import resource; print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        print(r.stderr, file=sys.stderr)
        return 1
    peak_kb = int(r.stdout.split("peak_rss_kb")[-1])
    size = args.rows * args.cols * 2
    print(f"tensor {args.rows}x{args.cols} bf16 = {size / 1e9:.2f} GB; wall {wall:.1f} s; "
          f"peak RSS {peak_kb / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
