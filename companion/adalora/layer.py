"""The SVD-form adapter of AdaLoRA: ``h = W0 x + (alpha / r0) * P Lambda Q x`` (paper §3.1, Eq. 3).

Zhang et al. (2023) write the update of a frozen weight ``W0`` (d1 x d2) as
``Delta = P Lambda Q`` with ``P`` (d1 x r), a diagonal ``Lambda = diag(lambda)`` and ``Q``
(r x d2). Nothing here computes an SVD: ``P``, ``lambda`` and ``Q`` are ordinary trainable
parameters, and the orthogonality regulariser (:mod:`.regularization`) keeps ``P`` and ``Q``
close to orthonormal so that ``lambda`` behaves like singular values. Pruning a rank sets one
``lambda_i`` to zero and leaves its vectors in place, so the triplet can come back later.

Names follow PEFT (``peft.tuners.adalora.layer.SVDLinear``) so that code moves between the
two without renaming; the paper's letters are in brackets:

========  ==========  =========  ====================================================
PEFT      paper       shape      initialisation (PEFT ``reset_lora_parameters``)
========  ==========  =========  ====================================================
lora_B    P           (out, r)   N(0, 0.02^2)
lora_E    Lambda      (r, 1)     0, so Delta = 0 and the model starts as pretrained
lora_A    Q           (r, in)    N(0, 0.02^2)
ranknum   --          (1,)       float(init_r), a buffer that is never updated
========  ==========  =========  ====================================================

The output is scaled by ``lora_alpha / (ranknum + 1e-5)``. PEFT adds ``1e-5`` against a
division by zero and keeps ``ranknum`` at ``init_r`` for the whole run, even after ranks are
masked: the first author reports that rescaling after pruning hurt (QingruZhang/AdaLoRA#12).
So the effective scale is the constant ``alpha / init_r``, not ``alpha / current_rank``.

The frozen base is an ``nn.Linear`` or a 4-bit ``Linear4bit``, bitsandbytes' or the companion's
(:class:`companion.quant.Linear4bit`) (QLoRA + AdaLoRA; the adapter then computes in its own dtype
and is cast back, as PEFT's ``SVDLinear4bit`` does, and merging is refused, as PEFT has no merge
for ``SVDLinear4bit`` either).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..quant.linear4bit import Linear4bit

INIT_STD = 0.02  # PEFT AdaLoraLayer.reset_lora_parameters
RANKNUM_EPS = 1e-5  # PEFT SVDLinear.forward: scaling / (ranknum + 1e-5)


def is_linear4bit(module: nn.Module) -> bool:
    """True for a 4-bit base: bitsandbytes' ``Linear4bit`` (checked without importing bitsandbytes
    when unused) or the companion's :class:`companion.quant.Linear4bit`."""
    if isinstance(module, Linear4bit):
        return True
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


class SVDLinear(nn.Module):
    """A frozen linear layer plus ``P Lambda Q``; reproduces PEFT ``SVDLinear`` / ``SVDLinear4bit``."""

    def __init__(self, base_layer: nn.Module, init_r: int, lora_alpha: float,
                 lora_dropout: float = 0.0):
        super().__init__()
        if not (isinstance(base_layer, nn.Linear) or is_linear4bit(base_layer)):
            raise TypeError(f"SVDLinear wraps torch.nn.Linear or a 4-bit Linear4bit, got "
                            f"{type(base_layer).__name__}; pick target_modules that are linear layers")
        if not isinstance(init_r, int) or init_r < 1:
            raise ValueError(f"init_r must be a positive integer, got {init_r!r}")
        if lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {lora_alpha}; the paper and PEFT's "
                             "examples use 8-32")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.base_layer = base_layer
        base_layer.weight.requires_grad = False
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.init_r, self.lora_alpha = init_r, lora_alpha
        self.scaling = lora_alpha  # PEFT: scaling = lora_alpha, divided by ranknum in forward
        self.quantized = is_linear4bit(base_layer)
        # As get_peft_model leaves them: the base dtype for fp32/fp64, float32 for 16-bit and 4-bit bases
        # (its autocast_adapter_dtype=True upcasts them).
        w = base_layer.weight
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        kw = dict(device=w.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # Registration order lora_A, lora_B, lora_E is PEFT's parameter order.
        self.lora_A = nn.Parameter(torch.empty(init_r, self.in_features, **kw))  # Q: (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, init_r, **kw))  # P: (out, r)
        self.lora_E = nn.Parameter(torch.empty(init_r, 1, **kw))  # Lambda: (r, 1)
        self.register_buffer("ranknum", torch.full((1,), float(init_r), **kw))
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Paper §3.1: Lambda = 0, P and Q Gaussian; PEFT's std is 0.02."""
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A, mean=0.0, std=INIT_STD)
        nn.init.normal_(self.lora_B, mean=0.0, std=INIT_STD)

    @property
    def effective_rank(self) -> int:
        """Number of non-zero singular values lambda_i: the rank of Delta = P Lambda Q."""
        return int(torch.count_nonzero(self.lora_E.detach()))

    def delta_weight(self) -> torch.Tensor:
        """Delta W = P (Lambda Q) * alpha / (ranknum + 1e-5), shape (out, in); PEFT get_delta_weight."""
        # (out, r) @ ((r, in) * (r, 1)) -> (out, in)
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + RANKNUM_EPS)

    def merge(self) -> None:
        """Add Delta W into the base weight, so that forward costs one matmul."""
        if self.quantized:
            raise TypeError(f"merging into a 4-bit base ({type(self.base_layer).__module__}."
                            f"{type(self.base_layer).__name__}) is not supported (PEFT's SVDLinear4bit does not "
                            "merge either): wrap a 16-bit copy of the base with SVDLinear, copy the adapter "
                            "(lora_A, lora_B, lora_E) into it and merge there, or keep the adapter unmerged")
        if not self.merged:
            self.base_layer.weight.data += self.delta_weight().detach()
            self.merged = True

    def unmerge(self) -> None:
        """Subtract Delta W again; a no-op when not merged."""
        if self.merged:
            self.base_layer.weight.data -= self.delta_weight().detach()
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out)
        if self.merged:
            return result
        ranknum = self.ranknum + RANKNUM_EPS
        if self.quantized:  # PEFT SVDLinear4bit: clone, adapter in its own dtype, cast back, scale
            result = result.clone()
            expected = result.dtype
            x = x.to(self.lora_A.dtype)
            output = (self.lora_dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T).to(expected)
            result += output * self.scaling / ranknum  # in place: keeps the base's output dtype
            return result
        x = x.to(self.lora_A.dtype)
        # (..., in) @ (in, r) @ (r, out) -> (..., out), as in PEFT SVDLinear.forward
        result += (self.lora_dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling / ranknum
        return result

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, init_r={self.init_r}, "
                f"lora_alpha={self.lora_alpha}, quantized={self.quantized}")


def _matches(name: str, targets: list[str]) -> bool:
    """PEFT's rule: the module name equals a target or ends with ``"." + target``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_adalora(model: nn.Module, target_modules: list[str], init_r: int = 12,
                   lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                   trainable_modules: tuple[str, ...] = ()) -> nn.Module:
    """Replace every linear layer named by ``target_modules`` with an :class:`SVDLinear`, in place.

    Every other parameter is frozen, except those of modules named in ``trainable_modules``
    (for example ``("classifier",)``: PEFT's ``task_type="SEQ_CLS"`` trains the new head too).
    Defaults are PEFT's ``AdaLoraConfig`` defaults (``init_r=12``, ``lora_alpha=8``). Returns ``model``.
    """
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules must be a non-empty list of module names, got {target_modules!r}, "
                         "e.g. ['query', 'value'] for BERT or ['q_proj', 'v_proj'] for Llama")
    names = [n for n, _ in model.named_modules() if n and _matches(n, list(target_modules))]
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_linear4bit(m)]
        raise ValueError(f"no module matches target_modules={list(target_modules)}; linear layers of this "
                         f"model include {linear[:8]}")
    for p in model.parameters():
        p.requires_grad = False
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SVDLinear(getattr(parent, child), init_r, lora_alpha, lora_dropout))
    for name, module in model.named_modules():
        if name and _matches(name, list(trainable_modules)):
            module.requires_grad_(True)
    return model


def adalora_layers(model: nn.Module) -> dict[str, SVDLinear]:
    """The :class:`SVDLinear` layers of ``model`` by module name, in module order."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}
    if not layers:
        raise ValueError("the model has no SVDLinear layers; call inject_adalora(model, target_modules) first")
    return layers
