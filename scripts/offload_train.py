#!/usr/bin/env python
"""A RoundPipe-style offloaded training loop: the GPU computes, the CPU owns the optimizer.

    python scripts/offload_train.py                 # CUDA if present, else a small CPU run
    python scripts/offload_train.py --steps 50 --d-model 2048 --layers 16
    python scripts/offload_train.py --device cpu --steps 3   # what CI runs

The loop, per optimizer step k:

  GPU   forward + backward of micro-batch k in bf16, with the weights of step k-1 already up
  down  the bf16 grads go down, in one copy, into a pinned CPU buffer
  CPU   a background thread upcasts them into the fp32 grads of the fp32 master params and runs
        the optimizer step on the CPU, then rounds the masters to bf16 into a pinned upload buffer
  up    the new bf16 weights go back up in one copy, before micro-batch k+2

While the CPU steps for micro-batch k, the GPU already computes micro-batch k+1. That overlap is
bought with a one-step delayed parameter update (as ZeRO-Offload's "DPU"): micro-batch k+1 runs
on the weights of step k-1, not k. The GPU only stalls when the CPU step takes longer than a
forward + backward; the script reports the share of wall time it spent stalled that way.

With --accum N each step accumulates the grads of N micro-batches first, and the CPU step
overlaps all N micro-batches of the next step.

Three variants run the same model on the same data:

  roundpipe-cpu        fp32 masters + roundpipe.optim.Adam on the CPU, overlapped as above
  torch-fused-cpu      the same loop with torch.optim.Adam(fused=True) on the CPU
  optimizer-on-device  no offload: fp32 masters and torch.optim.Adam(fused=True) on the device,
                       stepped in line (no overlap, no delay); its "waiting" is the optimizer's
                       own share of the device's time

Without CUDA everything runs on the CPU at a small size, so CI exercises the code path; the
figures then say nothing about GPUs. Both CPU variants do the same float arithmetic, so on a
deterministic device their final master params are bit-identical, which the script checks.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import roundpipe.optim as rpo

# ---- a small GPT ------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


# ---- flat buffers -------------------------------------------------------------------------


def flatten_params(model: nn.Module, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Move the model's params into one flat `dtype` buffer on `device`, and give them grads
    that are views of a second flat buffer, so that grads go down and weights go up in one copy
    each. Backward accumulates into existing grads in place, so the grads stay those views."""
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    w = torch.empty(n, device=device, dtype=dtype)
    g = torch.zeros(n, device=device, dtype=dtype)
    off = 0
    for p in params:
        k = p.numel()
        w[off:off + k].copy_(p.detach().reshape(-1))
        p.data = w[off:off + k].view(p.shape)
        p.grad = g[off:off + k].view(p.shape)
        off += k
    return w, g


def check_grads_are_views(model: nn.Module, flat_grad: Tensor) -> None:
    lo, hi = flat_grad.data_ptr(), flat_grad.data_ptr() + flat_grad.numel() * flat_grad.element_size()
    if not all(p.grad is not None and lo <= p.grad.data_ptr() < hi for p in model.parameters()):
        raise RuntimeError("backward replaced a grad instead of accumulating into the flat buffer")


def master_params(flat: Tensor, like: nn.Module) -> list[nn.Parameter]:
    """fp32 master params that are views of one flat fp32 tensor, shaped like the model's."""
    out, off = [], 0
    for p in like.parameters():
        k = p.numel()
        out.append(nn.Parameter(flat[off:off + k].view(p.shape)))
        off += k
    return out


def attach_grads(masters: list[nn.Parameter], flat_grad: Tensor) -> None:
    off = 0
    for m in masters:
        m.grad = flat_grad[off:off + m.numel()].view(m.shape)
        off += m.numel()


# ---- the loop -------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    tokens_per_s: float
    wait_share: float  # share of wall time the device sat idle waiting for the optimizer
    opt_ms: float  # mean optimizer step (incl. up/downcast on the CPU side), ms
    final_loss: float
    master: Tensor  # final fp32 master params, flat, on the CPU


class Clock:
    """Wall time, with the device drained first so that queued work is counted where it ran."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def batches(args, device: torch.device, steps: int):
    """The same synthetic token stream for every variant: per step, `accum` micro-batches."""
    gen = torch.Generator().manual_seed(1234)
    for _ in range(steps):
        micro = []
        for _ in range(args.accum):
            tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen).to(device)
            micro.append((tokens[:, :-1], tokens[:, 1:]))
        yield micro


def build_model(args, device: torch.device) -> tuple[TinyGPT, Tensor]:
    """The model in bf16 on `device`, and its fp32 initial weights, flat, on the CPU."""
    torch.manual_seed(args.seed)
    model = TinyGPT(args.vocab, args.d_model, args.layers, args.heads, args.seq)
    init = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return model.to(device=device, dtype=torch.bfloat16), init


def forward_backward(model: TinyGPT, micro: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Accumulate the grads of the mean loss over the step's micro-batches; return that loss."""
    total = 0.0
    for x, y in micro:
        logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1)) / len(micro)
        loss.backward()
        total = total + loss.detach()
    return total


def run_offloaded(name: str, make_opt, args, device: torch.device) -> Result:
    """fp32 masters and the optimizer on the CPU; the step overlaps the next micro-batch."""
    model, init = build_model(args, device)
    w_dev, g_dev = flatten_params(model, device, torch.bfloat16)
    n = w_dev.numel()
    pin = device.type == "cuda"
    master = init.clone()
    masters = master_params(master, model)
    grad32 = torch.empty(n, dtype=torch.float32)
    attach_grads(masters, grad32)
    opt = make_opt(masters)
    # Double buffers: step k reads down[k % 2] and writes up[k % 2] while the device may still be
    # reading up[(k - 1) % 2]; see the ordering argument in the loop.
    down = [torch.empty(n, dtype=torch.bfloat16, pin_memory=pin) for _ in range(2)]
    up = [torch.empty(n, dtype=torch.bfloat16, pin_memory=pin) for _ in range(2)]
    opt_times: list[float] = []

    def cpu_step(k: int) -> None:
        t0 = time.perf_counter()
        grad32.copy_(down[k % 2])  # bf16 -> fp32 upcast into the masters' grads
        opt.step()
        up[k % 2].copy_(master)  # fp32 -> bf16, ready to go up
        opt_times.append(time.perf_counter() - t0)

    clock = Clock(device)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-optimizer")
    pending: concurrent.futures.Future | None = None
    waited = 0.0
    total = args.warmup + args.steps
    t_start = loss = None
    try:
        for k, micro in enumerate(batches(args, device, total)):
            if k == args.warmup:
                t_start, waited, opt_times[:] = clock.now(), 0.0, []
            g_dev.zero_()
            loss = forward_backward(model, micro)
            if k == 0:
                check_grads_are_views(model, g_dev)
            down[k % 2].copy_(g_dev, non_blocking=True)
            # Drain the device: forward/backward k and its grads' copy are done. From here until
            # the upload below is queued, the device has nothing to do: that is the stall.
            clock.sync()
            t0 = time.perf_counter()
            if pending is not None:
                pending.result()  # step k-1 done: up[(k-1) % 2] holds its weights
                # The device is idle, so step k-2's upload from up[k % 2] has finished and step k
                # may overwrite it; down[k % 2] was last read by step k-2, also finished.
                w_dev.copy_(up[(k - 1) % 2], non_blocking=True)
            waited += time.perf_counter() - t0
            pending = pool.submit(cpu_step, k)
        pending.result()  # the last step, then its weights up
        w_dev.copy_(up[(total - 1) % 2], non_blocking=True)
        elapsed = clock.now() - t_start
    finally:
        pool.shutdown(wait=True)
    return Result(name, args.steps * args.accum * args.batch * args.seq / elapsed, waited / elapsed,
                  1e3 * sum(opt_times) / max(len(opt_times), 1), loss.item(), master)


def run_on_device(name: str, args, device: torch.device) -> Result:
    """No offload: fp32 masters and torch's fused Adam on the device, stepped in line."""
    model, init = build_model(args, device)
    w_dev, g_dev = flatten_params(model, device, torch.bfloat16)
    master = init.to(device)
    masters = master_params(master, model)
    grad32 = torch.empty_like(master)
    attach_grads(masters, grad32)
    opt = torch.optim.Adam(masters, lr=args.lr, fused=True)
    clock = Clock(device)
    in_opt = 0.0
    total = args.warmup + args.steps
    t_start = loss = None
    for k, micro in enumerate(batches(args, device, total)):
        if k == args.warmup:
            t_start, in_opt = clock.now(), 0.0
        g_dev.zero_()
        loss = forward_backward(model, micro)
        t0 = clock.now()
        grad32.copy_(g_dev)
        opt.step()
        w_dev.copy_(master)
        in_opt += clock.now() - t0
    elapsed = clock.now() - t_start
    return Result(name, args.steps * args.accum * args.batch * args.seq / elapsed, in_opt / elapsed,
                  1e3 * in_opt / args.steps, loss.item(), master.cpu())


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the model computes (default: cuda when available); cpu uses small default sizes")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default: 20 on cuda, 5 on cpu)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    ap.add_argument("--d-model", type=int, default=None, help="width (default: 1024 on cuda, 64 on cpu)")
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: 12 on cuda, 2 on cpu)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default: 16 on cuda, 4 on cpu)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default: 32000 on cuda, 512 on cpu)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 1024 on cuda, 64 on cpu)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per micro-batch (default: 16 on cuda, 4 on cpu)")
    ap.add_argument("--accum", type=int, default=1,
                    help="micro-batches per optimizer step (gradient accumulation): the CPU step of "
                         "one step overlaps all the micro-batches of the next (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="model init seed (default: %(default)s)")
    ap.add_argument("--cpu-threads", type=int, default=None,
                    help="torch.set_num_threads, used by the CPU optimizers (default: torch's choice)")
    ap.add_argument("--variants", default="roundpipe-cpu,torch-fused-cpu,optimizer-on-device",
                    help="comma-separated subset to run (default: all three)")
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    defaults = dict(steps=(20, 5), d_model=(1024, 64), layers=(12, 2), heads=(16, 4), vocab=(32000, 512),
                    seq=(1024, 64), batch=(16, 4))
    for key, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, on_gpu if gpu else on_cpu)
    if args.d_model % args.heads:
        ap.error("--d-model must be a multiple of --heads")
    if args.steps < 1 or args.warmup < 0 or args.accum < 1:
        ap.error("--steps and --accum must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    device = torch.device(args.device)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in TinyGPT(args.vocab, args.d_model, args.layers, args.heads, args.seq).parameters())
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (no GPU: a code-path check, not a benchmark)"
    print(f"device: {where}; CPU optimizer threads: {torch.get_num_threads()}; "
          f"roundpipe native kernel: {rpo.native_available()}")
    print(f"model: {n_params / 1e6:.1f}M params, d={args.d_model}, layers={args.layers}, vocab={args.vocab}; "
          f"micro-batch {args.batch}x{args.seq} tokens, {args.accum} per step; "
          f"{args.warmup} warm-up + {args.steps} timed steps")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    makers = {
        "roundpipe-cpu": lambda ps: rpo.Adam(ps, lr=args.lr),
        "torch-fused-cpu": lambda ps: torch.optim.Adam(ps, lr=args.lr, fused=True),
    }
    results = {}
    for v in variants:
        if v in makers:
            results[v] = run_offloaded(v, makers[v], args, device)
        elif v == "optimizer-on-device":
            results[v] = run_on_device(v, args, device)
        else:
            raise SystemExit(f"unknown variant {v!r}")
        r = results[v]
        print(f"{r.name:<20} {r.tokens_per_s:12.1f} tokens/s  {100 * r.wait_share:5.1f}% waiting on the optimizer"
              f"  (optimizer step {r.opt_ms:8.2f} ms, final loss {r.final_loss:.4f})", flush=True)
    if "roundpipe-cpu" in results and "torch-fused-cpu" in results:
        a, b = results["roundpipe-cpu"].master, results["torch-fused-cpu"].master
        if torch.equal(a.view(torch.int32), b.view(torch.int32)):
            print("roundpipe-cpu vs torch-fused-cpu final master params: bit-identical")
        else:  # expected only where the device's forward/backward is not deterministic
            print(f"roundpipe-cpu vs torch-fused-cpu final master params: differ, "
                  f"max |diff| {(a - b).abs().max().item():.3g} (is the device's backward deterministic?)")
    if not math.isfinite(min(r.final_loss for r in results.values())):
        raise SystemExit("a variant's loss is not finite")


if __name__ == "__main__":
    main()
