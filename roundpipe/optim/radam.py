"""``roundpipe.optim.RAdam``: torch's RAdam rule on roundpipe's engine; its C loop is ``_kernels/radam.c``."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor
from torch.optim.optimizer import ParamsT
from torch.optim.radam import _single_tensor_radam

from ._for_loop import AdamFamily

__all__ = ["RAdam"]


class RAdam(AdamFamily):
    r"""RAdam (rectified Adam, Liu et al. 2019) on the CPU; a drop-in for ``torch.optim.RAdam``.

    The algorithm is torch's, and fp32 results are bit-identical to torch's default
    CPU implementation (``foreach=False``), NaN bits included:

    .. math::
        \begin{aligned}
        &t \leftarrow t + 1,\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
            \ (\text{negated if maximize})\\
        &\textbf{if } \lambda \ne 0:\ \textbf{if } \text{decoupled\_weight\_decay}:
            \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)
            \ \textbf{else}\ g_t \leftarrow g_t + \lambda\theta_{t-1}\\
        &m_t \leftarrow \text{lerp}(m_{t-1}, g_t, 1-\beta_1),\quad
            v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2\\
        &\rho_\infty \leftarrow 2/(1-\beta_2) - 1,\quad
            \rho_t \leftarrow \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)\\
        &\textbf{if } \rho_t > 5:\ \theta_t \leftarrow \theta_{t-1} - \gamma\,\frac{m_t}{1-\beta_1^t}
            \,\frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t} + \epsilon}\, r_t,\quad
            r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}\\
        &\textbf{else}:\ \theta_t \leftarrow \theta_{t-1} - \gamma\,\frac{m_t}{1-\beta_1^t}
        \end{aligned}

    Whether a step is rectified is decided per param from its own step count, as in
    torch. torch runs up to fourteen tensor ops per param; here one pass reads the
    param, grad and both moments and writes the param and moments: 28 bytes per fp32
    element. bfloat16/float16 params are computed in fp32 and rounded once;
    ``master_weights=True`` keeps an fp32 master and fp32 moments for them. complex64
    params are stepped as their real view, as torch does.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma`, a float or a 1-element Tensor (default: 1e-3).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1) (default: (0.9, 0.999)).
        eps: term added to the denominator (default: 1e-8).
        weight_decay: weight decay :math:`\lambda` (default: 0).
        decoupled_weight_decay: decay the param as AdamW does instead of adding
            :math:`\lambda\theta` to the grad (default: False).
        foreach: accepted for compatibility and ignored, with a warning.
        maximize: maximize the objective instead of minimizing (default: False).
        capturable, differentiable: must be False.
        master_weights: fp32 master copies for 16-bit params (default: False).

    State: ``step`` (a 0-dim float32 tensor), ``exp_avg`` and ``exp_avg_sq``, as in torch.
    """

    _NAME = "RAdam"
    _C_STEP = "rp_radam_step"
    _C_HYPER = "rp_radam_hyper"
    _MOMENTS = ("exp_avg", "exp_avg_sq")
    _TORCH_OPTIONS = ("decoupled_weight_decay",)
    _torch_step = staticmethod(_single_tensor_radam)
    _GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {
        "foreach": None, "maximize": False, "differentiable": False, "decoupled_weight_decay": False,
        "capturable": False, "master_weights": False,
    }
    _BOOL_OPTIONS = ("decoupled_weight_decay", "maximize", "capturable", "differentiable")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        master_weights: bool = False,
    ) -> None:
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "maximize": maximize,
            "foreach": foreach, "capturable": capturable, "decoupled_weight_decay": decoupled_weight_decay,
            "differentiable": differentiable, "master_weights": master_weights,
        }
        super().__init__(params, defaults)

    def _fill_hyper(self, h: Any, group: dict[str, Any]) -> None:
        super()._fill_hyper(h, group)  # torch's exp_avg_sq.sqrt() too (rules.h, rp_torch_sqrt)
        h.decoupled_weight_decay = bool(group["decoupled_weight_decay"])
