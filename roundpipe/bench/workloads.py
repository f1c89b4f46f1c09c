"""What is measured: the parameter sets (shapes) and what each workload times on them.

Adam runs every workload; each other optimizer runs the three throughput
layouts, as workloads named ``<optimizer>-<layout>``:

========================  ===================================================================
``mix``                   a GPT-2-like transformer (``--mix``): embeddings, per layer norms,
                          q/k/v/out projections and the MLP, weights and biases
``small``                 ``--small-count`` tensors of ``--small-size`` elements
``lora``                  a LoRA adapter set (``--lora``): per layer A (r x d) and B (d x r)
                          for q, k, v, out and the two MLP projections, plus biases and norms
``big``                   one tensor of ``--big`` elements (Adam)
``tiny``                  one tensor of ``--tiny`` elements: microseconds per call (Adam)
``in-backward``           one optimizer per param stepped in its post-accumulate-grad hook
``per-tensor``            step time against the number of 16-element tensors
``master-weights``        bf16 params with fp32 master weights, against torch's sequence
``bf16``, ``fp16``        16-bit params and state (torch's layout), against torch's fused step
``grad-scaler``           GradScaler's unscale + step, direct and through scaler.step()
``lowmem``                issue 12's layouts: bf16 moments, stochastic rounding
========================  ===================================================================

Gradients are set once and reused, as after ``zero_grad(set_to_none=False)``;
``--new-grads`` hands every step gradient tensors that are different objects
from the previous step's (as autograd does after ``zero_grad(set_to_none=True)``,
the default), which makes roundpipe rebuild its per-group plan each step.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import competitors as C
from .progress import log
from .timing import Entry, Result, free, median, run_rounds, summarize

LR = 1e-3  # Adam's, in the Adam-only workloads
LAYOUTS = ("mix", "small", "lora")
# Adam's workloads, in the order they run; its mix, small and lora are the registry's layouts without a prefix
ADAM_WORKLOADS = ("big", "mix", "small", "lora", "tiny", "in-backward", "per-tensor", "master-weights", "bf16",
                  "fp16", "grad-scaler", "lowmem")
# Workloads --plot can draw: throughput tables, which carry a roofline-probe row
# (tiny and in-backward are per-call costs in microseconds; per-tensor has no Gelem/s).
ADAM_PLOTTABLE = {"big", "mix", "small", "lora", "master-weights", "bf16", "fp16", "grad-scaler", "lowmem"}


def workload_key(spec: C.OptimizerSpec, layout: str) -> str:
    """The --workloads name of an optimizer's layout: Adam's "mix", the others' "sgd-mix"."""
    return layout if spec.key == "adam" else f"{spec.key}-{layout}"


def split_key(key: str) -> tuple[C.OptimizerSpec, str]:
    """(optimizer, layout or Adam workload) of a --workloads name."""
    opt, sep, layout = key.partition("-")
    if sep and opt in C.BY_KEY and opt != "adam" and layout in LAYOUTS:
        return C.BY_KEY[opt], layout
    return C.ADAM, key


def all_workloads() -> list[str]:
    return [*ADAM_WORKLOADS, *(workload_key(s, lay) for s in C.OPTIMIZERS if s.key != "adam" for lay in LAYOUTS)]


# ---- shapes ---------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    shapes: list[tuple[int, ...]]
    note: str = ""

    @property
    def numel(self) -> int:
        total = 0
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            total += n
        return total


def transformer_shapes(layers: int, d: int, vocab: int, ctx: int, mlp: int) -> list[tuple[int, ...]]:
    """A GPT-2-like parameter list: embeddings, per layer norms + q/k/v/o + MLP (weights and biases)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]  # token and position embeddings
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln_1 weight, bias
        for _ in range(4):  # q, k, v, out projections
            shapes += [(d, d), (d,)]
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(mlp * d, d), (mlp * d,), (d, mlp * d), (d,)]  # fc1, fc2
    shapes += [(d,), (d,)]  # final norm
    return shapes


def lora_shapes(layers: int, d: int, r: int, mlp: int) -> list[tuple[int, ...]]:
    """A LoRA adapter set on a GPT-2-like model: what fine-tuning with adapters (and biases) trains.

    Per layer: A (r x d_in) and B (d_out x r) for the q, k, v and out projections
    and the two MLP projections, the six projection biases and the two norms'
    weight and bias. With layers=12, d=768, r=8, mlp=4: 266 tensors, 1.45M elements.
    """
    shapes: list[tuple[int, ...]] = []
    h = mlp * d
    for _ in range(layers):
        for d_in, d_out in [(d, d)] * 4 + [(d, h), (h, d)]:  # q, k, v, out; fc1, fc2
            shapes += [(r, d_in), (d_out, r)]
        shapes += [(d,)] * 4 + [(h,), (d,)]  # q, k, v, out, fc1, fc2 biases
        shapes += [(d,)] * 4  # ln_1, ln_2 weight and bias
    shapes += [(d,), (d,)]  # final norm
    return shapes


MIX_DEFAULTS = {"layers": 6, "d": 1024, "vocab": 32000, "ctx": 2048, "mlp": 4}
LORA_DEFAULTS = {"layers": 12, "d": 768, "r": 8, "mlp": 4}


def parse_config(spec: str, defaults: dict[str, int], flag: str) -> dict[str, int]:
    """"layers=2,d=512" over the defaults; SystemExit naming the flag on an unknown key or a non-integer."""
    cfg = dict(defaults)
    if spec:
        for kv in spec.split(","):
            k, _, v = kv.partition("=")
            if k not in cfg:
                raise SystemExit(f"{flag}: unknown key {k!r}; keys are {sorted(cfg)}")
            try:
                cfg[k] = int(v)
            except ValueError:
                raise SystemExit(f"{flag}: {k} needs an integer, got {v!r}") from None
    return cfg


def make_params(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype = torch.float32,
                grad_sets: int = 1) -> tuple[list[torch.nn.Parameter], list[list[torch.Tensor]]]:
    """Separately allocated params (as a model's are) and `grad_sets` sets of gradients.

    Grads are randn: Adam's moments settle near g and g^2, far from denormals,
    so that repeated steps on the same grads keep a steady cost.
    """
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    sets = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(grad_sets)]
    for p, g in zip(params, sets[0], strict=True):
        p.grad = g
    return params, sets


def new_grads_hook(params: list, sets: list[list[torch.Tensor]]) -> Callable[[int], None]:
    """Before step r, hand every param grad tensors that are not the ones of step r-1."""
    def before(r: int) -> None:
        gs = sets[r % len(sets)]
        for p, g in zip(params, gs, strict=True):
            p.grad = g
    return before


class Shapes:
    """The run's parameter sets, from its size flags (--mix, --lora, --big, ...)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.mix_cfg = parse_config(args.mix, MIX_DEFAULTS, "--mix")
        self.lora_cfg = parse_config(args.lora, LORA_DEFAULTS, "--lora")
        self.mixed_cfg = parse_config(args.mixed_scale, MIX_DEFAULTS, "--mixed-scale") if args.mixed_scale \
            else self.mix_cfg
        self.mix = Workload("transformer mix", transformer_shapes(**self.mix_cfg),
                            "GPT-2-like " + ",".join(f"{k}={v}" for k, v in self.mix_cfg.items()) + ".")
        self.mixed = Workload("transformer mix", transformer_shapes(**self.mixed_cfg),
                              "GPT-2-like " + ",".join(f"{k}={v}" for k, v in self.mixed_cfg.items()) + ".")
        self.big = Workload("big tensor", [(args.big,)])
        self.small = Workload(f"many small ({args.small_count} x {args.small_size})",
                              [(args.small_size,)] * args.small_count)
        self.tiny = Workload(f"tiny ({args.tiny} elements)", [(args.tiny,)])
        lc = self.lora_cfg
        self.lora = Workload(f"LoRA mix ({lc['layers']} layers, d={lc['d']}, r={lc['r']})", lora_shapes(**lc),
                             "LoRA adapters (A, B) on q, k, v, out, fc1, fc2, with biases and norms: "
                             + ",".join(f"{k}={v}" for k, v in lc.items()) + ".")

    def layout(self, layout: str) -> Workload:
        return {"mix": self.mix, "small": self.small, "lora": self.lora}[layout]

    def family(self, spec: C.OptimizerSpec, layout: str) -> Workload:
        """An optimizer's workload: its title and hyperparameters over the layout's shapes."""
        w = self.layout(layout)
        extra = f" {spec.note}." if spec.note else ""
        note = f"{spec.display} ({spec.kwargs_text()}).{extra} {w.note}".strip()
        return Workload(f"{spec.display}: {w.name}", w.shapes, note)


# ---- fp32 throughput: every optimizer ---------------------------------------------------------


def bench_fp32(w: Workload, args: argparse.Namespace, threads: int, *, warmup: int, reps: int,
               inner: int = 1, kind: str = "throughput", spec: C.OptimizerSpec = C.ADAM) -> Result:
    """fp32 params and grads: one optimizer against its torch implementations, its peers and its roofline."""
    comps, missing = C.competitors(spec, args.peer_status)
    if "roundpipe" in missing:
        log(f"[{w.name}] {missing['roundpipe']}")
        return Result(w.name, threads, w.numel, len(w.shapes), {}, missing["roundpipe"], kind,
                      optimizer=spec.display, missing=missing)
    log(f"[{w.name}] {w.numel:,} elements in {len(w.shapes)} tensors, {threads} threads")
    params, sets = make_params(w.shapes, grad_sets=2 if args.new_grads else 1)
    before = new_grads_hook(params, sets) if args.new_grads else None
    nbytes = spec.bytes_per_elem
    entries = []
    for name, make in comps.items():
        try:
            opt = make(params)
            entries.append(Entry(name, opt.step, nbytes, before))
        except Exception as e:  # a competitor that cannot run here is reported, not fatal
            missing[name] = f"skipped ({type(e).__name__}: {e})"
            log(f"  {name}: {missing[name]}")
    probe = C.RooflineProbe(w.numel, spec.probe)
    roof = probe.entry()
    if roof is None:
        missing["roofline-probe"] = probe.why
    run_rounds(entries + ([roof] if roof else []), warmup, reps, inner)
    note = w.note + (" [--new-grads: fresh grad tensors every step]" if args.new_grads else "")
    res = summarize(w.name, threads, w.numel, len(w.shapes), entries, roof, note, kind)
    res.optimizer = spec.display
    res.missing = missing
    del entries, roof, probe, params, sets
    free()
    return res


def adam_probe(n: int) -> Entry | None:
    """The 28 B/el roofline entry of the Adam-only tables (None without roundpipe's kernel)."""
    return C.RooflineProbe(n, C.PROBE_28).entry()


# ---- mixed precision (issue 5) ----------------------------------------------------------------


def rp_mixed_support() -> tuple[bool, bool, str]:
    """(master_weights works, bf16 moments work, why not) — probed on a 64-element bf16 param."""
    import roundpipe.optim

    p = torch.nn.Parameter(torch.randn(64).bfloat16())
    p.grad = torch.randn(64).bfloat16()
    try:
        roundpipe.optim.Adam([p], lr=LR, master_weights=True).step()
    except Exception as e:
        return False, False, f"master_weights=True unavailable ({type(e).__name__}: {e})"
    try:
        roundpipe.optim.Adam([p], lr=LR, master_weights=True, exp_avg_dtype=torch.bfloat16,
                             exp_avg_sq_dtype=torch.bfloat16).step()
    except Exception as e:
        return True, False, f"bf16 moments unavailable ({type(e).__name__}: {e})"
    return True, True, ""


def rp_bf16_support(dtype: torch.dtype = torch.bfloat16) -> str:
    import roundpipe.optim

    p = torch.nn.Parameter(torch.randn(64).to(dtype))
    p.grad = torch.randn(64).to(dtype)
    try:
        roundpipe.optim.Adam([p], lr=LR).step()
        return ""
    except Exception as e:
        return f"{dtype} params unavailable ({type(e).__name__}: {e})"


class TorchMasterSeq:
    """What a torch mixed-precision loop does: fp32 grad copy, fused Adam on fp32 masters, copy back.

    prealloc=True copies into fp32 grad buffers kept between steps with one
    _foreach_copy_ (the fastest torch spelling); prealloc=False is the common
    ``master.grad = p.grad.float()`` ... ``p.copy_(master)`` per tensor.
    """

    def __init__(self, params: list, prealloc: bool) -> None:
        self.params = params
        self.masters = [p.detach().float().requires_grad_() for p in params]
        self.prealloc = prealloc
        if prealloc:
            self.g32 = [torch.empty_like(m) for m in self.masters]
            for m, g in zip(self.masters, self.g32, strict=True):
                m.grad = g
        self.opt = torch.optim.Adam(self.masters, lr=LR, fused=True)

    def step(self) -> None:
        with torch.no_grad():
            if self.prealloc:
                torch._foreach_copy_(self.g32, [p.grad for p in self.params])
                self.opt.step()
                torch._foreach_copy_([p.data for p in self.params], self.masters)
            else:
                for m, p in zip(self.masters, self.params, strict=True):
                    m.grad = p.grad.float()
                self.opt.step()
                for m, p in zip(self.masters, self.params, strict=True):
                    p.copy_(m)


def bench_master_weights(w: Workload, args: argparse.Namespace, threads: int) -> Result | None:
    import roundpipe.optim

    ok, ok_bf16_moments, why = rp_mixed_support()
    if not ok:
        log(f"[{w.name}] skipped: {why}")
        return Result(w.name, threads, w.numel, len(w.shapes), {}, f"skipped: {why}")
    log(f"[{w.name}] {w.numel:,} elements in {len(w.shapes)} tensors, {threads} threads")
    params, _ = make_params(w.shapes, torch.bfloat16)
    entries = []
    # bytes per element: bf16 grad read 2, fp32 master/m/v read 12 + write 12, bf16 param write 2
    rp = roundpipe.optim.Adam(params, lr=LR, master_weights=True)
    entries.append(Entry("roundpipe master_weights", rp.step, 28))
    if ok_bf16_moments:
        rp16 = roundpipe.optim.Adam(params, lr=LR, master_weights=True, exp_avg_dtype=torch.bfloat16,
                                    exp_avg_sq_dtype=torch.bfloat16)
        # bf16 moments: m and v are 2+2 bytes each instead of 4+4
        entries.append(Entry("roundpipe mw + bf16 moments", rp16.step, 20))
    # grad.float(): read 2, write 4; fused step on fp32: 28; param.copy_(master): read 4, write 2
    entries.append(Entry("torch seq (foreach_copy)", TorchMasterSeq(params, True).step, 40))
    entries.append(Entry("torch seq (grad.float())", TorchMasterSeq(params, False).step, 40))
    roof = adam_probe(w.numel)
    run_rounds(entries + ([roof] if roof else []), args.warmup, args.reps)
    note = (w.note + " bf16 params and grads; fp32 masters and moments. B/el counts one pass "
            "(roundpipe) or the three passes of the torch sequence. " + (why if why else ""))
    res = summarize(w.name, threads, w.numel, len(w.shapes), entries, roof, note.strip(),
                    ref="roundpipe master_weights")
    del entries, roof, params, rp
    free()
    return res


def bench_low_precision_params(w: Workload, args: argparse.Namespace, threads: int,
                               dtype: torch.dtype = torch.bfloat16) -> Result | None:
    """bf16 or fp16 params, grads and moments (torch's layout), against torch's fused step on them."""
    import roundpipe.optim

    why = rp_bf16_support(dtype)
    if why:
        log(f"[{w.name}] skipped: {why}")
        return Result(w.name, threads, w.numel, len(w.shapes), {}, f"skipped: {why}")
    log(f"[{w.name}] {w.numel:,} elements in {len(w.shapes)} tensors, {threads} threads")
    params, _ = make_params(w.shapes, dtype)
    entries = [
        Entry("roundpipe", roundpipe.optim.Adam(params, lr=LR).step, 14),
        Entry("torch-fused", torch.optim.Adam(params, lr=LR, fused=True).step, 14),
        Entry("torch-foreach", torch.optim.Adam(params, lr=LR, foreach=True).step, 14),
    ]
    roof = adam_probe(w.numel)
    run_rounds(entries + ([roof] if roof else []), args.warmup, args.reps)
    res = summarize(w.name, threads, w.numel, len(w.shapes), entries, roof,
                    (w.note + f" {str(dtype)[6:]} params, grads and moments: 14 B/el; x roof compares with the fp32 "
                     "28 B/el probe's bandwidth.").strip())
    del entries, roof, params
    free()
    return res


def conversion_paths() -> str:
    """Which conversions the low-memory rows ran on this host (from the CPU flags the kernel
    is built for, -march=native)."""
    from .. import _build

    flags = set(_build.cpu_flags().split())
    codec = ("AVX-512 vcvtph2ps/vcvtps2ph" if {"avx512f", "avx512bw", "avx512vl"} <= flags
             else "portable loops (no AVX-512BW)")
    return (f"Conversion paths: bf16 <-> fp32 by integer round-to-nearest-even in vector registers "
            f"(vcvtne2ps2bf16 measured no faster on AMD Zen 4, not used); 8-bit codec: {codec}.")


def bench_low_memory(w: Workload, args: argparse.Namespace, threads: int) -> Result:
    """Issue 12's layouts against the ones they slim: fp32 params with bf16 moments against fp32
    moments (28 -> 20 B/el), 8-bit moments (AdamW8bit, issue 26: 16 B/el at block 256, the
    absmax scales left out), and bf16 params with stochastic rounding against round-to-nearest."""
    import roundpipe.optim

    log(f"[{w.name}] {w.numel:,} elements in {len(w.shapes)} tensors, {threads} threads")
    p32, _ = make_params(w.shapes, torch.float32)
    p32b, _ = make_params(w.shapes, torch.float32)
    p16, _ = make_params(w.shapes, torch.bfloat16)
    p16b, _ = make_params(w.shapes, torch.bfloat16)
    p8, _ = make_params(w.shapes, torch.float32)
    bf16 = torch.bfloat16
    entries = [
        Entry("fp32 moments", roundpipe.optim.AdamW(p32, lr=LR).step, 28),
        Entry("bf16 moments", roundpipe.optim.AdamW(p32b, lr=LR, exp_avg_dtype=bf16, exp_avg_sq_dtype=bf16).step, 20),
        Entry("8-bit moments (AdamW8bit)", roundpipe.optim.AdamW8bit(p8, lr=LR).step, 16),
        Entry("bf16 params", roundpipe.optim.AdamW(p16, lr=LR).step, 14),
        Entry("bf16 params, stochastic rounding", roundpipe.optim.AdamW(p16b, lr=LR, bf16_stochastic_round=True).step, 14),
    ]
    roof = adam_probe(w.numel)
    run_rounds(entries + ([roof] if roof else []), args.warmup, args.reps)
    res = summarize(w.name, threads, w.numel, len(w.shapes), entries, roof,
                    (w.note + " AdamW. speedup: fp32 moments' time / each row's. " + conversion_paths()).strip(),
                    ref="fp32 moments")
    del entries, roof, p32, p32b, p16, p16b, p8
    free()
    return res


def bench_grad_scaler(w: Workload, args: argparse.Namespace, threads: int) -> Result:
    """GradScaler's unscale + Adam: direct fused calls, and the whole scaler.step()/update() path."""
    import roundpipe.optim

    log(f"[{w.name}] {w.numel:,} elements in {len(w.shapes)} tensors, {threads} threads")
    params, _ = make_params(w.shapes)
    # Scale 1.0: unscaling in place then leaves the reused grads as they are, so
    # that every step does the same work (a real scale would shrink them towards
    # denormals). The kernels divide by it all the same.
    scale = torch.ones(())
    found_inf = torch.zeros(())
    rp = roundpipe.optim.Adam(params, lr=LR)
    tf = torch.optim.Adam(params, lr=LR, fused=True)
    entries = [
        # unscale in the step: read g and write it back unscaled (+4), as torch's fused kernel does
        Entry("roundpipe step(grad_scale,found_inf)", functools.partial(rp.step, grad_scale=scale, found_inf=found_inf),
              32),  # partial, not a lambda: rp is deleted below
        Entry("torch-fused step(grad_scale,found_inf)", tf.step, 32),
    ]
    tf.grad_scale, tf.found_inf = scale, found_inf  # type: ignore[attr-defined]  # torch's fused Adam reads them

    def scaler_loop(opt: Any) -> Callable[[], None]:
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1 << 30)
        scaler.scale(torch.ones(()))  # creates the scale tensor, as scaling the loss would

        def step() -> None:
            scaler.step(opt)
            scaler.update()
        return step

    # scaler.step: an inf check that reads and rewrites every grad (8), then the step
    rp2 = roundpipe.optim.Adam(params, lr=LR)
    tf2 = torch.optim.Adam(params, lr=LR, fused=True)
    tfe = torch.optim.Adam(params, lr=LR, foreach=True)
    tfd = torch.optim.Adam(params, lr=LR)  # what a CPU user gets without flags: the for-loop step
    entries += [
        Entry("roundpipe via GradScaler", scaler_loop(rp2), 40),
        Entry("torch-fused via GradScaler", scaler_loop(tf2), 40),
        Entry("torch-foreach via GradScaler", scaler_loop(tfe), 36),
        Entry("torch-default via GradScaler", scaler_loop(tfd), 36),
    ]
    roof = adam_probe(w.numel)
    run_rounds(entries + ([roof] if roof else []), args.warmup, args.reps)
    note = (w.note + " fp32. Direct rows pass grad_scale/found_inf to step(); 'via GradScaler' rows run "
            "torch.amp.GradScaler('cpu').step()+update(), whose inf check (unscale_ by 1.0) reads and "
            "rewrites every grad before the fused step unscales it again. Scale 1.0 keeps reused grads "
            "constant.").strip()
    res = summarize(w.name, threads, w.numel, len(w.shapes), entries, roof, note,
                    ref="roundpipe step(grad_scale,found_inf)")
    del entries, roof, params, rp, tf, rp2, tf2, tfe, tfd
    free()
    return res


# ---- per-call overhead: optimizer in backward, per-tensor cost ----------------------------------


def adam_makers() -> dict[str, Callable[[list], Any]]:
    comps, _ = C.competitors(C.ADAM, C.PeerStatus())  # roundpipe and torch's three, no peers
    return comps


def bench_in_backward(args: argparse.Namespace, threads: int) -> list[Result]:
    """One optimizer per parameter, stepped from a post-accumulate-grad hook (PyTorch's tutorial)."""
    out = []
    n = args.tiny
    # 1. The hook's body on one small tensor: step() then zero_grad(), with a fresh
    #    grad tensor each call as autograd gives after zero_grad(set_to_none=True).
    log(f"[in-backward call] {n} elements, {threads} threads")
    p = torch.nn.Parameter(torch.randn(n))
    pool = [torch.randn(n) for _ in range(2)]
    entries = []
    makers = adam_makers()
    calls = [0]
    for name, make in makers.items():
        opt = make([p])

        def hook_body(opt: Any = opt) -> None:
            calls[0] += 1
            p.grad = pool[calls[0] & 1]  # a new grad object each call, as from autograd (same cost for all)
            opt.step()
            opt.zero_grad(set_to_none=True)
        entries.append(Entry(name, hook_body, 28))
    run_rounds(entries, args.warmup, args.overhead_rounds, args.overhead_inner)
    out.append(summarize(f"in-backward: one call, {n} elements", threads, n, 1, entries, None,
                         "hook body per call: p.grad = new tensor; opt.step(); opt.zero_grad()", kind="overhead"))

    # 2. A real backward through a small MLP with a hook per parameter.
    width, depth, batch = args.ib_width, args.ib_depth, 8
    log(f"[in-backward model] MLP {depth} x Linear({width},{width}), batch {batch}, {threads} threads")
    torch.manual_seed(0)
    x = torch.randn(batch, width)
    entries = []

    def model_entry(name: str, make: Callable[[list], Any] | None) -> Entry:
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
        if make is not None:
            opts: dict[Any, Any] = {q: make([q]) for q in model.parameters()}

            def hook(q: torch.Tensor) -> None:
                opts[q].step()
                opts[q].zero_grad(set_to_none=True)
            for q in model.parameters():
                q.register_post_accumulate_grad_hook(hook)

        def it() -> None:
            model(x).square().mean().backward()
            if make is None:
                model.zero_grad(set_to_none=True)
        return Entry(name, it, 28)

    entries.append(model_entry("no optimizer (fwd+bwd only)", None))
    for name in ("roundpipe", "torch-fused", "torch-foreach"):
        entries.append(model_entry(name, makers[name]))
    run_rounds(entries, args.warmup, args.overhead_rounds, max(1, args.overhead_inner // 10))
    nparams = 2 * depth
    res = summarize(f"in-backward: MLP {depth}x{width}, {nparams} params", threads,
                    sum(q.numel() for q in torch.nn.Linear(width, width).parameters()) * depth, nparams,
                    entries, None, "", kind="overhead")
    base = res.rows["no optimizer (fwd+bwd only)"]["median_s"]
    for row in res.rows.values():
        row["optimizer_us_per_param"] = (row["median_s"] - base) / nparams * 1e6
    res.note = ("us per training iteration (forward+backward with one optimizer per param stepped in its "
                "post-accumulate-grad hook). Optimizer cost per param: " + ", ".join(
                    f"{n} {r['optimizer_us_per_param']:.1f} us" for n, r in res.rows.items()
                    if n != "no optimizer (fwd+bwd only)"))
    out.append(res)
    free()
    return out


PER_TENSOR_COUNTS = [1, 16, 256, 4096]
PER_TENSOR_COUNTS_SMALL = [1, 64]  # --quick and --tiny


def bench_per_tensor(args: argparse.Namespace, threads: int) -> list[Result]:
    """Step time against the number of (16-element) tensors: the per-tensor cost, reused and fresh grads."""
    out = []
    counts = PER_TENSOR_COUNTS_SMALL if args.small_run else PER_TENSOR_COUNTS
    makers = adam_makers()
    for fresh in (False, True):
        series: dict[str, list[tuple[int, float]]] = {}
        for count in counts:
            params, sets = make_params([(16,)] * count, grad_sets=2 if fresh else 1)
            before = new_grads_hook(params, sets) if fresh else None
            entries = [Entry(name, makers[name](params).step, 28, before)
                       for name in ("roundpipe", "torch-fused", "torch-foreach")]
            inner = 1 if fresh else max(1, args.overhead_inner // max(1, count // 16))
            run_rounds(entries, args.warmup, args.overhead_rounds, inner)
            for e in entries:
                series.setdefault(e.name, []).append((count, median(e.samples)))
            del entries, params, sets
        rows = {}
        for name, pts in series.items():
            (c0, t0), (c1, t1) = pts[0], pts[-1]
            rows[name] = {
                "points_us": {str(c): t * 1e6 for c, t in pts},
                "fixed_us": t0 * 1e6,
                "per_tensor_us": (t1 - t0) / (c1 - c0) * 1e6,
            }
        out.append(Result(f"per-tensor cost ({'fresh' if fresh else 'reused'} grads)", threads,
                          16 * counts[-1], counts[-1], rows,
                          "step() time for N tensors of 16 elements; per_tensor_us = slope between the "
                          f"smallest and largest N{'; fresh grad objects every step' if fresh else ''}",
                          kind="per-tensor"))
        free()
    return out


# ---- the run's tasks ------------------------------------------------------------------------------


@dataclass
class Task:
    """One workload to run at one thread count: what it calls, and a guess of its seconds for the progress bar."""

    key: str
    label: str
    run: Callable[[], Result | list[Result] | None]
    seconds: float
    stages: int = 1  # run_rounds calls it makes


def _throughput_guess(w: Workload, n_comps: int, rounds: int, nbytes: float) -> float:
    # bandwidth of a few GB/s for one pass, torch's multi-pass competitors several passes, plus ~20 us per
    # tensor and competitor for the Python of the for-loop steps: a guess that the run's own pace corrects
    return rounds * (w.numel * nbytes * 3 * n_comps / 4e9 + len(w.shapes) * n_comps * 20e-6)


def make_task(key: str, args: argparse.Namespace, shapes: Shapes, threads: int) -> Task:
    """The Task of one --workloads name at one thread count."""
    warmup, reps = args.warmup, args.reps
    rounds = warmup + reps
    spec, layout = split_key(key)
    if spec.key != "adam":
        w = shapes.family(spec, layout)
        comps = 1 + len(spec.torch_variants) + len(spec.peers) + 1
        return Task(key, w.name, lambda: bench_fp32(w, args, threads, warmup=warmup, reps=reps, spec=spec),
                    _throughput_guess(w, comps, rounds, spec.bytes_per_elem) if C.available(spec) else 0.0)
    over = args.overhead_rounds + warmup
    if key in ("big", "mix", "small", "lora"):
        w = {"big": shapes.big, "mix": shapes.mix, "small": shapes.small, "lora": shapes.lora}[key]
        return Task(key, f"Adam: {w.name}", lambda: bench_fp32(w, args, threads, warmup=warmup, reps=reps),
                    _throughput_guess(w, 5, rounds, 28))
    if key == "tiny":
        w = shapes.tiny
        return Task(key, "Adam: " + w.name, lambda: bench_fp32(w, args, threads, warmup=warmup,
                                                                reps=args.overhead_rounds,
                                                                inner=args.overhead_inner, kind="overhead"),
                    over * args.overhead_inner * 5 * 30e-6)
    if key == "in-backward":
        return Task(key, "Adam in backward", lambda: bench_in_backward(args, threads),
                    over * args.overhead_inner * 4 * 40e-6 + over * max(1, args.overhead_inner // 10) * 4
                    * args.ib_depth * args.ib_width ** 2 * 8 * 6 / 20e9, stages=2)
    if key == "per-tensor":
        counts = PER_TENSOR_COUNTS_SMALL if args.small_run else PER_TENSOR_COUNTS
        return Task(key, "Adam per-tensor cost", lambda: bench_per_tensor(args, threads),
                    2 * over * 3 * sum(max(args.overhead_inner // max(1, c // 16), 1) * (20e-6 + c * 3e-6)
                                       for c in counts), stages=2 * len(counts))
    mixed = shapes.mixed
    if key == "master-weights":
        w = Workload("mixed: bf16 params, master_weights=True", mixed.shapes, mixed.note)
        return Task(key, w.name, lambda: bench_master_weights(w, args, threads), _throughput_guess(w, 5, rounds, 40))
    if key in ("bf16", "fp16"):
        dtype = torch.bfloat16 if key == "bf16" else torch.float16
        w = Workload(f"mixed: {key} params and state (no master)", mixed.shapes, mixed.note)
        return Task(key, w.name, lambda: bench_low_precision_params(w, args, threads, dtype),
                    _throughput_guess(w, 4, rounds, 14))
    if key == "grad-scaler":
        w = Workload("GradScaler: unscale + step", shapes.mix.shapes, shapes.mix.note)
        return Task(key, w.name, lambda: bench_grad_scaler(w, args, threads), _throughput_guess(w, 7, rounds, 40))
    if key == "lowmem":
        w = Workload("low-memory layouts", mixed.shapes, mixed.note)
        return Task(key, w.name, lambda: bench_low_memory(w, args, threads), _throughput_guess(w, 6, rounds, 28))
    raise ValueError(f"unknown workload {key!r}")
