"""``roundpipe.optim.Adamax``: torch's Adamax rule on roundpipe's engine; its C loop is ``_kernels/adamax.c``."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor
from torch.optim.adamax import _single_tensor_adamax
from torch.optim.optimizer import ParamsT

from ._for_loop import AdamFamily

__all__ = ["Adamax"]


class Adamax(AdamFamily):
    r"""Adamax (Adam with the infinity norm) on the CPU; a drop-in for ``torch.optim.Adamax``.

    The algorithm is torch's, and fp32 results are bit-identical to torch's default
    CPU implementation (``foreach=False``), NaN bits included:

    .. math::
        \begin{aligned}
        &t \leftarrow t + 1,\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
            \ (\text{negated if maximize})\\
        &\textbf{if } \lambda \ne 0:\ g_t \leftarrow g_t + \lambda\theta_{t-1}\\
        &m_t \leftarrow \text{lerp}(m_{t-1}, g_t, 1-\beta_1)\\
        &u_t \leftarrow \max(\beta_2 u_{t-1},\ |g_t| + \epsilon)\\
        &\theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,\frac{m_t}{u_t}
        \end{aligned}

    torch runs six tensor ops with two temporaries per param; here one pass reads the
    param, grad and both moments and writes the param and moments: 28 bytes per fp32
    element. bfloat16/float16 params are computed in fp32 and rounded once;
    ``master_weights=True`` keeps an fp32 master and fp32 moments for them. complex64
    params are stepped as their real view, as torch does.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma`, a float or a 1-element Tensor (default: 2e-3).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1) (default: (0.9, 0.999)).
        eps: term added to the infinity norm (default: 1e-8).
        weight_decay: L2 penalty :math:`\lambda` (default: 0).
        foreach: accepted for compatibility and ignored, with a warning.
        maximize: maximize the objective instead of minimizing (default: False).
        differentiable, capturable: must be False.
        master_weights: fp32 master copies for 16-bit params (default: False).

    State: ``step`` (a 0-dim float32 tensor), ``exp_avg`` and ``exp_inf``, as in torch.
    """

    _NAME = "Adamax"
    _C_STEP = "rp_adamax_step"
    _C_HYPER = "rp_adamax_hyper"
    _MOMENTS = ("exp_avg", "exp_inf")
    _torch_step = staticmethod(_single_tensor_adamax)
    _GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {
        "foreach": None, "maximize": False, "differentiable": False, "capturable": False, "master_weights": False,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
    ) -> None:
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "foreach": foreach,
            "maximize": maximize, "differentiable": differentiable, "capturable": capturable,
            "master_weights": master_weights,
        }
        super().__init__(params, defaults)
