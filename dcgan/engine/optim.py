"""SGD and Adam/AdamW over engine Parameters, reproducing torch.optim's single-tensor
(CPU default) update rules operation for operation, so results agree to rounding."""

from __future__ import annotations

from typing import Any

import torch

from dcgan.engine.module import Parameter

# torch param_group key -> engine attribute
_GROUP_KEYS = {
    "lr": "lr",
    "momentum": "momentum",
    "weight_decay": "weight_decay",
    "betas": "betas",
    "eps": "eps",
    "decoupled_weight_decay": "decoupled",
}


class Optimizer:
    def __init__(self, params: list[Parameter]):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        self.state: list[dict[str, Any]] = [{} for _ in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad.zero_()

    def step(self) -> None:
        with torch.no_grad():
            for p, st in zip(self.params, self.state, strict=True):
                self._update(p, st)

    def _update(self, p: Parameter, st: dict[str, Any]) -> None:
        raise NotImplementedError

    def _hyper(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """torch.optim layout ({"state": {i: ...}, "param_groups": [...]}); it loads into
        the matching torch optimiser and back. Tensors are copies: torch's own
        load_state_dict keeps same-device tensors as they are, and a live state shared
        between two optimisers would be updated twice per step."""
        group = dict(self._hyper(), params=list(range(len(self.params))))
        return {
            "state": {
                i: {k: v.clone() for k, v in st.items()} for i, st in enumerate(self.state) if st
            },
            "param_groups": [group],
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        group = sd["param_groups"][0]
        for key, attr in _GROUP_KEYS.items():
            if key in group and hasattr(self, attr):
                setattr(self, attr, tuple(group[key]) if key == "betas" else group[key])
        self.state = [{} for _ in self.params]
        for i, st in sd["state"].items():
            p = self.params[int(i)].data
            self.state[int(i)] = {
                k: (v.clone() if k == "step" else v.to(p).clone()) for k, v in st.items()
            }


class SGD(Optimizer):
    """g <- grad + wd * p;  buf <- g (first step) or momentum * buf + g;  p <- p - lr * buf."""

    def __init__(
        self, params: list[Parameter], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ):
        super().__init__(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def _hyper(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "dampening": 0.0,
            "nesterov": False,
            "maximize": False,
        }

    def _update(self, p: Parameter, st: dict[str, Any]) -> None:
        g = p.grad
        if self.weight_decay != 0:
            g = g.add(p.data, alpha=self.weight_decay)
        if self.momentum != 0:
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = g.clone()
            else:
                buf.mul_(self.momentum).add_(g)
            g = buf
        p.data.add_(g, alpha=-self.lr)


class Adam(Optimizer):
    r"""Adam (Kingma & Ba); decoupled=True is AdamW (Loshchilov & Hutter).

    With step t, gradient g (plus wd * p when weight decay is coupled):
        m <- beta1 m + (1 - beta1) g            v <- beta2 v + (1 - beta2) g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    AdamW instead shrinks p <- p (1 - lr wd) before the update and leaves g alone."""

    def __init__(
        self,
        params: list[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ):
        super().__init__(params)
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.weight_decay, self.decoupled = weight_decay, decoupled

    def _hyper(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "amsgrad": False,
            "maximize": False,
            "decoupled_weight_decay": self.decoupled,
        }

    def _update(self, p: Parameter, st: dict[str, Any]) -> None:
        beta1, beta2 = self.betas
        if not st:
            # torch keeps the step count as a float32 0-d tensor; mirror it so state
            # dicts are interchangeable
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p.data)
            st["exp_avg_sq"] = torch.zeros_like(p.data)
        st["step"] += 1
        g = p.grad
        if self.weight_decay != 0:
            if self.decoupled:
                p.data.mul_(1 - self.lr * self.weight_decay)
            else:
                g = g.add(p.data, alpha=self.weight_decay)
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        t = st["step"].item()
        step_size = self.lr / (1 - beta1**t)
        denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(self.eps)
        p.data.addcdiv_(m, denom, value=-step_size)
