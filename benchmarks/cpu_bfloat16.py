"""Does this CPU compute bfloat16 natively? One training step of the offline teacher, float32 vs bf16 autocast.

    python benchmarks/cpu_bfloat16.py [--tokens 200] [--batch 8]

SmolLM2-135M-Instruct (offline), random token ids, forward + backward + AdamW step, in this order:
float32, bf16 autocast, float32 again (the two float32 steps bracket the bf16 one, so a machine that is
busy for a while shows as two different float32 times). Prints seconds per step and the ratio. Where
``bfloat16_is_emulated`` is true (no AMX or AVX512-BF16) expect bf16 to be far slower; where the CPU has
native bfloat16 it should be faster than float32.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from amid_pipeline.models import bfloat16_is_emulated, smollm2_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_teacher()), dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, bfloat16 emulated: {bfloat16_is_emulated('cpu')}")
    seconds = {}
    for name in ("float32", "bf16 autocast", "float32 again"):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if name.startswith("bf16") else nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds[name] = time.perf_counter() - started
        print(f"{name}: {seconds[name]:.1f} s/step", flush=True)
    print(f"bf16 / float32: {seconds['bf16 autocast'] / min(seconds['float32'], seconds['float32 again']):.1f}x")


if __name__ == "__main__":
    main()
