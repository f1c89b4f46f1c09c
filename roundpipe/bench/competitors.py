"""Who runs against whom: the optimizer registry, third-party peers and the roofline probes.

A new optimizer's bench rows are one :class:`OptimizerSpec` in :data:`OPTIMIZERS`::

    OptimizerSpec("nadam", "NAdam", {"lr": 2e-3}, PROBE_28, TORCH_DEFAULT_FOREACH),

that is: the ``--optimizer`` name, the class name in ``roundpipe.optim`` (and in
``torch.optim`` unless ``torch_name`` says otherwise), the hyperparameters every
competitor gets, the roofline probe of the bytes its fp32 step must move per
element, and which of torch's implementations exist for it. Third-party
competitors are :class:`Peer` entries; each one that does not import gives a
"not installed" line instead of a row. The roundpipe class is looked up with
``getattr(roundpipe.optim, name, None)``: a name this roundpipe does not have
gives "not available in this roundpipe", never an error.
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .timing import Entry

# ---- roofline probes ----------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """A roofline probe from roundpipe's compiled kernel: an access pattern with no arithmetic.

    ``arrays`` fp32 arrays of the workload's length, passed to ``function`` in order,
    then the length and the thread count. Array 1 is only read and holds 1e-3, the
    others start at 0: no denormals and no overflow in any run's length.
    """

    bytes_per_elem: int
    function: str
    arrays: int
    pattern: str  # what it reads and writes, for the docs and --help


PROBE_28 = Probe(28, "rp_roofline_probe", 4, "4 arrays read, 3 written (fp32 Adam: p, g, m, v)")
PROBE_20 = Probe(20, "rp_roofline_probe3", 3, "3 arrays read, 2 written (SGD momentum: p, g, buf)")
PROBE_16_WRITE = Probe(16, "rp_roofline_probe16", 3,
                       "2 arrays read, 2 written, one of them never read (ASGD before averaging: p, g; ax = p)")
# Adafactor's three passes (adafactor.c): p and g read (norms, row and column sums), g read
# (the update's norm, which needs the finished factors), then p and g read and p written.
PROBE_24_ADAFACTOR = Probe(24, "rp_roofline_probe_adafactor", 3,
                           "p and g read, g read, p and g read and p written (Adafactor's three passes)")


class RooflineProbe:
    """The memory roofline of an optimizer's access pattern over n contiguous fp32 elements.

    It is the memory upper bound of this access pattern on this machine at this
    moment, timed in the same rounds as the optimizers. None of it exists when
    roundpipe's kernel did not build (``available`` is False, ``why`` says why).
    """

    def __init__(self, n: int, probe: Probe = PROBE_28) -> None:
        from .. import _build

        self.n, self.probe = n, probe
        self.why = ""
        k = _build.load_kernel()
        if k is None:
            self.why = "roundpipe's kernel did not build: no roofline probe"
            return
        self.fn = getattr(k.lib, probe.function)
        self.arrays = [torch.zeros(n), torch.full((n,), 1e-3)] + [torch.zeros(n) for _ in range(probe.arrays - 2)]
        self.ptrs = [k.ffi.cast("float *", t.data_ptr()) for t in self.arrays]

    @property
    def available(self) -> bool:
        return not self.why

    def step(self) -> None:
        self.fn(*self.ptrs, self.n, torch.get_num_threads())

    def entry(self) -> Entry | None:
        return Entry("roofline-probe", self.step, self.probe.bytes_per_elem) if self.available else None


# ---- third-party peers --------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A third-party implementation of the same rule: a row when it imports, "not installed" when not."""

    row: str  # its row in the table: "deepspeed", "lion-pytorch"
    label: str  # its name in the header and JSON meta: "DeepSpeedCPUAdagrad"
    module: str
    cls: str
    package: str  # what to pip install; also --no-<package> leaves it out
    kwargs: dict[str, Any] = field(default_factory=dict)  # beyond the spec's hyperparameters


def import_class(module: str, name: str) -> tuple[Any, str]:
    """module.name, or None and why not (quietly: DeepSpeed announces itself on stdout)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return getattr(importlib.import_module(module), name), ""
    except ImportError as e:
        return None, f"not installed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    except Exception as e:  # its op failing to build, say
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def quiet_factory(cls: Any, **kw: Any) -> Callable[[list], Any]:
    """params -> cls(params, **kw), with the construction's stdout (DeepSpeed loading its op) swallowed."""
    def make(ps: list) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):
            return cls(ps, **kw)
    return make


# ---- the registry -------------------------------------------------------------------------

TORCH_FUSED_FOREACH_DEFAULT = ("fused", "foreach", "default")
TORCH_FUSED_DEFAULT = ("fused", "default")
TORCH_FOREACH_DEFAULT = ("foreach", "default")  # torch has no fused CPU kernel for the rule
TORCH_VARIANT_KWARGS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "default": {"foreach": False}}

DEEPSPEED = "deepspeed"


@dataclass(frozen=True)
class Goal:
    """A target of an issue for this rule's workloads: roundpipe's fraction of its roofline, or its speed-up."""

    layouts: tuple[str, ...]  # of "mix", "small", "lora"
    against: str  # "roofline" or a competitor's row
    goal: float


# issue 11 section 7: the same goals for every optimizer, against the peers it has
FAMILY_GOALS = (
    Goal(("mix",), "roofline", 0.90),
    Goal(("mix",), "torch-fused", 1.0),
    Goal(("small", "lora"), "torch-fused", 1.5),
    Goal(("mix", "small", "lora"), "torch-default", 3.0),
    Goal(("mix", "small", "lora"), "lion-pytorch", 5.0),
)
# issue 23: at least 0.9 of its own roofline on the mix, never slower than torch's default or foreach
ISSUE23_GOALS = (
    Goal(("mix",), "roofline", 0.90),
    Goal(("mix", "small", "lora"), "torch-default", 1.0),
    Goal(("mix", "small", "lora"), "torch-foreach", 1.0),
)
# issue 25: 0.8 of the roofline of the bytes it must move; 6x torch's default and foreach on the mix
ADAFACTOR_GOALS = (
    Goal(("mix",), "roofline", 0.80),
    Goal(("mix",), "torch-default", 6.0),
    Goal(("mix",), "torch-foreach", 6.0),
)


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (its kwargs are a dict)
class OptimizerSpec:
    """One optimizer's bench rows: see the module docstring."""

    key: str  # --optimizer name; its workloads are <key>-mix, <key>-small, <key>-lora (Adam's: mix, small, lora)
    name: str  # class name in roundpipe.optim
    kwargs: dict[str, Any]  # the same for every competitor
    probe: Probe  # its fp32 step's bytes per element, and the probe that moves as many
    torch_variants: tuple[str, ...] = ()  # of "fused", "foreach", "default", as torch has them
    peers: tuple[Peer, ...] = ()
    title: str = ""  # the tables' name for it (default: name)
    torch_name: str = ""  # its class in torch.optim (default: name)
    goals: tuple[Goal, ...] = FAMILY_GOALS
    note: str = ""  # what the hyperparameters mean for the bytes moved, when it matters

    @property
    def display(self) -> str:
        return self.title or self.name

    @property
    def bytes_per_elem(self) -> int:
        return self.probe.bytes_per_elem

    def roundpipe_class(self) -> Any:
        """The class in roundpipe.optim, or None when this roundpipe does not have it."""
        import roundpipe.optim

        return getattr(roundpipe.optim, self.name, None)

    def torch_class(self) -> Any:
        return getattr(torch.optim, self.torch_name or self.name, None)

    def kwargs_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kwargs.items())


OPTIMIZERS: list[OptimizerSpec] = [
    OptimizerSpec("adam", "Adam", {"lr": 1e-3}, PROBE_28, TORCH_FUSED_FOREACH_DEFAULT,
                  (Peer("deepspeed", "DeepSpeedCPUAdam", "deepspeed.ops.adam", "DeepSpeedCPUAdam", DEEPSPEED,
                        {"adamw_mode": False}),),  # adamw_mode=False: Adam's coupled decay rule
                  goals=()),  # Adam's targets (issues 4 and 5) are its own: report.check_targets
    OptimizerSpec("adamw", "AdamW", {"lr": 1e-3, "weight_decay": 1e-2}, PROBE_28, TORCH_FUSED_FOREACH_DEFAULT,
                  (Peer("deepspeed", "DeepSpeedCPUAdam (adamw_mode)", "deepspeed.ops.adam", "DeepSpeedCPUAdam",
                        DEEPSPEED, {"adamw_mode": True}),)),
    OptimizerSpec("sgd", "SGD", {"lr": 1e-3, "momentum": 0.9}, PROBE_20, TORCH_FUSED_DEFAULT, title="SGD momentum"),
    OptimizerSpec("adagrad", "Adagrad", {"lr": 1e-2}, PROBE_20, TORCH_FUSED_DEFAULT,
                  (Peer("deepspeed", "DeepSpeedCPUAdagrad", "deepspeed.ops.adagrad", "DeepSpeedCPUAdagrad",
                        DEEPSPEED),)),
    OptimizerSpec("lion", "Lion", {"lr": 1e-4, "betas": (0.9, 0.99)}, PROBE_20, (),
                  (Peer("lion-pytorch", "lion-pytorch", "lion_pytorch", "Lion", "lion-pytorch"),
                   Peer("deepspeed", "DeepSpeedCPULion", "deepspeed.ops.lion", "DeepSpeedCPULion", DEEPSPEED))),
    # issue 23's rules: torch has no fused CPU kernel for them
    OptimizerSpec("adadelta", "Adadelta", {"lr": 1.0}, PROBE_28, TORCH_FOREACH_DEFAULT, goals=ISSUE23_GOALS),
    OptimizerSpec("adamax", "Adamax", {"lr": 2e-3}, PROBE_28, TORCH_FOREACH_DEFAULT, goals=ISSUE23_GOALS),
    OptimizerSpec("asgd", "ASGD", {"lr": 1e-2}, PROBE_16_WRITE, TORCH_FOREACH_DEFAULT, goals=ISSUE23_GOALS,
                  note="t0=1e6 (the default): before averaging starts ax = param is written, not read"),
    OptimizerSpec("nadam", "NAdam", {"lr": 2e-3}, PROBE_28, TORCH_FOREACH_DEFAULT, goals=ISSUE23_GOALS),
    OptimizerSpec("radam", "RAdam", {"lr": 1e-3}, PROBE_28, TORCH_FOREACH_DEFAULT, goals=ISSUE23_GOALS),
    OptimizerSpec("rmsprop", "RMSprop", {"lr": 1e-2}, PROBE_20, TORCH_FOREACH_DEFAULT, goals=ISSUE23_GOALS,
                  note="no momentum, not centered: p, g, square_avg"),
    OptimizerSpec("rprop", "Rprop", {"lr": 1e-2}, PROBE_28, TORCH_FOREACH_DEFAULT, goals=ISSUE23_GOALS),
    # issue 25: the factored second moment is O(rows + cols): param and grad, the grad read twice
    OptimizerSpec("adafactor", "Adafactor", {"lr": 1e-2}, PROBE_24_ADAFACTOR, TORCH_FOREACH_DEFAULT,
                  goals=ADAFACTOR_GOALS, note="state O(rows + cols), left out of B/el; the grad is read twice"),
]
BY_KEY = {s.key: s for s in OPTIMIZERS}
ADAM = BY_KEY["adam"]


def available(spec: OptimizerSpec) -> bool:
    return spec.roundpipe_class() is not None


def not_available_note(spec: OptimizerSpec) -> str:
    return f"not available in this roundpipe (roundpipe.optim has no {spec.name})"


@dataclass
class PeerStatus:
    """Whether each third-party peer imports: its class, or why not ("not installed", "--no-deepspeed")."""

    classes: dict[str, Any] = field(default_factory=dict)  # Peer.label -> class
    why: dict[str, str] = field(default_factory=dict)  # Peer.label -> why not

    def status(self, label: str) -> str:
        return "available" if label in self.classes else self.why.get(label, "not looked up")


def resolve_peers(specs: list[OptimizerSpec], disabled: set[str]) -> PeerStatus:
    """Import every peer of these optimizers once (disabled: the --no-<package> switches given)."""
    out = PeerStatus()
    for spec in specs:
        for peer in spec.peers:
            if peer.label in out.classes or peer.label in out.why:
                continue
            if peer.package in disabled:
                out.why[peer.label] = f"--no-{peer.package}"
                continue
            cls, why = import_class(peer.module, peer.cls)
            if cls is None:
                out.why[peer.label] = why
            else:
                out.classes[peer.label] = cls
    return out


def competitors(spec: OptimizerSpec, peers: PeerStatus,
                variants: tuple[str, ...] | None = None) -> tuple[dict[str, Callable[[list], Any]], dict[str, str]]:
    """(row -> factory(params) -> optimizer, row -> why it has no row) for one optimizer's fp32 workloads.

    variants: torch's implementations to include (default: all the spec lists).
    """
    comps: dict[str, Callable[[list], Any]] = {}
    missing: dict[str, str] = {}
    kw = spec.kwargs
    rp_cls = spec.roundpipe_class()
    if rp_cls is None:
        missing["roundpipe"] = not_available_note(spec)
    else:
        comps["roundpipe"] = quiet_factory(rp_cls, **kw)
    torch_cls = spec.torch_class()
    for v in spec.torch_variants if variants is None else variants:
        if torch_cls is None:
            missing[f"torch-{v}"] = f"torch {torch.__version__} has no torch.optim.{spec.torch_name or spec.name}"
            continue
        comps[f"torch-{v}"] = quiet_factory(torch_cls, **kw, **TORCH_VARIANT_KWARGS[v])
    for peer in spec.peers:
        cls = peers.classes.get(peer.label)
        if cls is None:
            missing[peer.row] = peers.status(peer.label)
        else:
            comps[peer.row] = quiet_factory(cls, **kw, **peer.kwargs)
    return comps, missing
