"""The main job: train a small model on the CPU with torch's Adam and with roundpipe's.

Runs with no arguments and no downloads. The same model, data and seed are
trained three times: torch.optim.Adam as users get it by default, torch's
fused=True kernel, and roundpipe.optim.Adam. It prints the loss curves side by
side, the time spent in optimizer.step() for each, and the speed-up.
"""

from __future__ import annotations

import time

import torch
from torch import nn

import roundpipe
import roundpipe.optim

STEPS = 30
SEED = 0


def make_model() -> nn.Module:
    """A small transformer-like stack: many tensors, large and small (5.3M params in 41 tensors)."""
    layers: list[nn.Module] = [nn.Embedding(4096, 256)]
    for _ in range(6):
        layers += [nn.LayerNorm(256), nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)]
    layers += [nn.LayerNorm(256), nn.Linear(256, 4096)]
    return nn.Sequential(*layers)


def train(make_optimizer) -> tuple[list[float], float, nn.Module]:
    torch.manual_seed(SEED)
    model = make_model()
    opt = make_optimizer(model.parameters())
    data = torch.Generator().manual_seed(SEED + 1)
    losses, step_time = [], 0.0
    for _ in range(STEPS):
        tokens = torch.randint(0, 4096, (16, 64), generator=data)
        targets = (tokens * 7 + 3) % 4096  # a learnable token-to-token map
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=False)
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        step_time += time.perf_counter() - t0
        losses.append(loss.item())
    return losses, step_time, model


def main() -> None:
    n_params = sum(p.numel() for p in make_model().parameters())
    n_tensors = len(list(make_model().parameters()))
    print(f"roundpipe {roundpipe.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"native kernel: {roundpipe.optim.native_available()}")
    print(f"model: {n_params / 1e6:.1f}M parameters in {n_tensors} tensors, {STEPS} steps\n")
    runs = {
        "torch Adam (default)": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "torch Adam fused=True": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
        "roundpipe Adam": lambda ps: roundpipe.optim.Adam(ps, lr=1e-3),
    }
    results = {name: train(factory) for name, factory in runs.items()}
    names = list(results)
    print("step  " + "  ".join(f"{n:>22}" for n in names))
    for s in range(STEPS):
        if s < 5 or s % 5 == 4:
            print(f"{s + 1:4d}  " + "  ".join(f"{results[n][0][s]:22.6f}" for n in names))
    print()
    ours = results["roundpipe Adam"][1]
    for name in names:
        t = results[name][1]
        print(f"{name:>22}: optimizer.step() {1e3 * t / STEPS:7.2f} ms/step   speed-up of roundpipe: {t / ours:5.2f}x")
    same = all(
        torch.equal(a, b)
        for a, b in zip(results["roundpipe Adam"][2].parameters(), results["torch Adam fused=True"][2].parameters(),
                        strict=True)
    )
    print(f"\nroundpipe's weights are bit-identical to torch fused=True: {same}")


if __name__ == "__main__":
    main()
