"""The MiniCanvas UNet's forward pass six ways: what else could make an evaluation cell faster.

    python benchmarks/unet_variants.py [--repeats 5] [--threads 2] [--batch 64] [--model minicanvas]

One leaderboard cell is about 14 pipeline calls x 25 steps of this forward pass at batch 64 (32 images and their
unconditional twins), so its time is nearly all the cell's. Variants, interleaved in one process:

- ``eager``: the UNet as diffusers builds it (contiguous tensors, PyTorch's SDPA kernel choice);
- ``channels_last``: weights and input in channels-last memory format (oneDNN convolutions without reorders);
- ``math_sdpa``: attention through the plain math kernel instead of the fused CPU flash kernel;
- ``compiled``: ``torch.compile`` (inductor), after one warm-up call whose time is printed separately;
- ``autocast_bf16``: the fp32 UNet under CPU autocast to bfloat16 (matmuls and convolutions in bfloat16);
- ``bf16_weights``: a bfloat16 copy of the UNet fed bfloat16 inputs, the output cast back to float32.

bfloat16 is lower precision, so it could only be adopted where no verdict moves (the issue's condition); its
difference from ``eager`` is printed as the largest absolute and the relative (Frobenius) difference.

Each variant's output is compared with ``eager``'s (largest absolute difference): only a variant within rounding
would change no measured number. Seconds per forward pass: best and median of ``--repeats`` rounds of 10 calls.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default="minicanvas")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import erasekit

    unet = erasekit.load(args.model).pipeline.unet.eval()
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    states = torch.randn(args.batch, 77, cfg.cross_attention_dim, generator=gen)
    t = torch.tensor(500)

    def eager():
        return unet(x, t, encoder_hidden_states=states).sample

    x_last = x.contiguous(memory_format=torch.channels_last)

    def channels_last():
        unet.to(memory_format=torch.channels_last)
        try:
            return unet(x_last, t, encoder_hidden_states=states).sample
        finally:
            unet.to(memory_format=torch.contiguous_format)

    def math_sdpa():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return unet(x, t, encoder_hidden_states=states).sample

    compiled_unet = torch.compile(unet)

    def compiled():
        return compiled_unet(x, t, encoder_hidden_states=states).sample

    def autocast_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return unet(x, t, encoder_hidden_states=states).sample.float()

    unet_bf16 = copy.deepcopy(unet).to(torch.bfloat16)
    x_bf16, states_bf16 = x.bfloat16(), states.bfloat16()

    def bf16_weights():
        return unet_bf16(x_bf16, t, encoder_hidden_states=states_bf16).sample.float()

    variants = {
        "eager": eager,
        "channels_last": channels_last,
        "math_sdpa": math_sdpa,
        "compiled": compiled,
        "autocast_bf16": autocast_bf16,
        "bf16_weights": bf16_weights,
    }
    print(f"load average before: {os.getloadavg()[0]:.2f}; torch {torch.__version__}, {args.threads} thread(s), "
          f"batch {args.batch}", flush=True)  # fmt: skip
    with torch.no_grad():
        reference = eager()
        start = time.perf_counter()
        compiled()
        print(f"torch.compile warm-up call: {time.perf_counter() - start:.1f} s", flush=True)
        outputs = {name: f() for name, f in variants.items()}
        diffs = {name: (out - reference).abs().max().item() for name, out in outputs.items()}
        relative = {
            name: ((out - reference).norm() / reference.norm()).item() for name, out in outputs.items()
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, f in variants.items():
                f()
                start = time.perf_counter()
                for _ in range(10):
                    f()
                times[name].append((time.perf_counter() - start) / 10)
    base = statistics.median(times["eager"])
    print(
        "| variant | s / forward (best) | (median) | speed-up (median) | max abs diff vs eager | relative diff |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"| {name} | {min(ts):.4f} | {med:.4f} | {base / med:.2f}x | {diffs[name]:.1e} | {relative[name]:.1e} |"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
