"""Schedule-Free update kernels: free functions over lists of plain local tensors.

They know nothing of ranks, sharding or param groups; every operation is elementwise, so they
run unchanged on a whole tensor, an FSDP shard or a ZeRO flat slice. Three paths, one math:

    v  = b2*v + (1-b2)*g*g                       (AdamW / RAdam only)
    m  = mu*m + (1-mu)*g;  g' = m/bc1            (AdamW's inner_momentum mu > 0 only; else g' = g)
    gn = g' / (sqrt(v/bc2) + eps)  if normalize else g'
    gn += wd*y (decay_at="y") or wd*z (decay_at="z");  decay_at="all": y, z *= 1-lr*wd first
    y  = lerp(y, z, ckp1) + y_coef*gn ;  z -= lr*gn

State stored narrower than the params (bf16 z and moments under fp32/fp64 params) is rounded back
stochastically: inside the one pass of the fused kernels (C++ on the CPU, Triton on CUDA: one
counter-based stream, no host sync), else (per-tensor, foreach, compiled) on widened copies afterwards.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..schedule import StepScalars
from .rounding import stochastic_round_

IMPLS = ("single", "foreach", "fused")


def step_(ys: Sequence[Tensor], grads: Sequence[Tensor], zs: Sequence[Tensor],
          exp_avg_sqs: Optional[Sequence[Tensor]], s: StepScalars, impl: str = "single",
          ok: Optional[Tensor] = None, exp_avgs: Optional[Sequence[Tensor]] = None,
          generator: Optional[torch.Generator] = None, seed: Optional[Tensor] = None) -> None:
    """Apply one Schedule-Free step in place to ``ys``, ``zs`` (and ``exp_avg_sqs``, ``exp_avgs``).

    ``ok`` (a 0-dim bool tensor on the tensors' device) selects the sync-free form: ``s`` may hold
    device tensors, and where ``ok`` is False every tensor is left bitwise unchanged. ``exp_avgs``
    (the inner momentum) must be given exactly when ``s.inner_momentum > 0``. ``generator`` is the
    random stream of the stochastic rounding of bf16 state (on the tensors' device); ``seed``, a 0-dim
    int64 tensor there, the fused kernels' (default: drawn from ``generator``).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown kernel impl {impl!r}; expected one of {IMPLS}")
    if (exp_avgs is not None) != (s.inner_momentum > 0):
        raise ValueError(f"exp_avgs must be given exactly when inner_momentum > 0 (got {s.inner_momentum})")
    moments = [ts for ts in (exp_avg_sqs, exp_avgs) if ts is not None]
    stored = [list(ts) for ts in (zs, *moments)]
    in_kernel = {i for i in range(len(ys))
                 if impl == "fused" and _rounds_in_kernel(ys[i], grads[i], [ts[i] for ts in stored], ok)}
    widened = [i for i in range(len(ys)) if zs[i].itemsize < ys[i].itemsize and i not in in_kernel]
    if widened:  # stepped on copies in the params' dtype, rounded back below
        wide = [list(ts) for ts in stored]
        for ts in wide:
            for i in widened:
                ts[i] = ts[i].to(ys[i].dtype)
        zs = wide[0]
        exp_avg_sqs = None if exp_avg_sqs is None else wide[1]
        exp_avgs = None if exp_avgs is None else wide[-1]
    if not in_kernel:
        seed = None
    elif seed is None:
        seed = _draw_seed(generator, ys[min(in_kernel)].device)
    if ok is not None:
        _masked_step(ys, grads, zs, exp_avg_sqs, s, ok, fused=impl == "fused", exp_avgs=exp_avgs, seed=seed)
    elif impl == "single":
        for i in range(len(ys)):
            _single_tensor_step(ys[i], grads[i], zs[i], None if exp_avg_sqs is None else exp_avg_sqs[i], s,
                                None if exp_avgs is None else exp_avgs[i])
    elif impl == "foreach":
        _foreach_step(list(ys), list(grads), list(zs), None if exp_avg_sqs is None else list(exp_avg_sqs), s,
                      None if exp_avgs is None else list(exp_avgs))
    else:
        _fused_step(ys, grads, zs, exp_avg_sqs, s, exp_avgs, seed)
    if widened:  # a skipped sync-free step rounds back the unchanged widened values: exact
        for ts, ws in zip(stored, wide):
            stochastic_round_([ts[i] for i in widened], [ws[i] for i in widened], generator)


def _rounds_in_kernel(y: Tensor, g: Tensor, state: list[Tensor], ok: Optional[Tensor]) -> bool:
    """Whether a fused kernel steps this bf16 state under fp32/fp64 params in its one pass: the C++ CPU
    kernel (host-scalar step) or the Triton one (either step). ``state``: z, then v and m where present."""
    if not (y.dtype in (torch.float32, torch.float64) and y.numel() > 0
            and all(t.dtype == torch.bfloat16 for t in state) and all(t.is_contiguous() for t in (y, g, *state))):
        return False
    if _on_cpu_kernel(y):
        return ok is None
    module = _triton_kernels()
    z, v, m = (state + [None, None])[:3]
    return module is not None and module.available(y.device) and module.supports(y, g, z, v, m)


def _draw_seed(generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """One 62-bit seed of the fused kernels' counter-based rounding stream, a 0-dim int64 tensor drawn on
    ``device`` from ``generator`` (on that device): the Triton kernel reads it there, so no host sync."""
    return torch.randint(0, 1 << 62, (), generator=generator, device=device)


def triton_available(device: torch.device) -> bool:
    """Whether the Triton multi-tensor kernel steps tensors on ``device`` (CUDA with triton installed)."""
    module = _triton_kernels()
    return module is not None and module.available(device)


def swap_(ys: Sequence[Tensor], zs: Sequence[Tensor], weight: float, foreach: bool = False) -> None:
    """y <- lerp(y, z, weight): weight 1-1/b1 turns y into x, weight 1-b1 turns x back into y.
    A z stored narrower than y (state_dtype=torch.bfloat16) is widened first."""
    if not ys:
        return
    zs = [z if z.dtype == y.dtype else z.to(y.dtype) for y, z in zip(ys, zs)]
    if foreach:
        torch._foreach_lerp_(list(ys), list(zs), weight)
    else:
        for y, z in zip(ys, zs):
            y.lerp_(z, weight)


def _single_tensor_step(y: Tensor, g: Tensor, z: Tensor, v: Optional[Tensor], s: StepScalars,
                        m: Optional[Tensor] = None) -> None:
    if s.decay_at == "all" and s.weight_decay != 0:
        y.mul_(s.shrink)
        z.mul_(s.shrink)
    if v is not None:
        v.mul_(s.beta2).addcmul_(g, g, value=1 - s.beta2)
    num = g
    if m is not None:
        m.mul_(s.inner_momentum).add_(g, alpha=s.one_minus_inner_momentum)
        num = m.div(s.bias_correction1)
    if s.normalize:
        gn = num.div_(v.div(s.bias_correction2).sqrt_().add_(s.eps)) if m is not None else \
            g / v.div(s.bias_correction2).sqrt_().add_(s.eps)
    else:
        gn = g.clone() if s.weight_decay != 0 and s.decay_at != "all" and m is None else num
    if s.weight_decay != 0 and s.decay_at != "all":
        gn.add_(y if s.decay_at == "y" else z, alpha=s.weight_decay)
    y.lerp_(z, s.ckp1)
    y.add_(gn, alpha=s.y_coef)
    z.sub_(gn, alpha=s.lr)


def _foreach_step(ys: list[Tensor], grads: list[Tensor], zs: list[Tensor],
                  vs: Optional[list[Tensor]], s: StepScalars, ms: Optional[list[Tensor]] = None) -> None:
    if s.decay_at == "all" and s.weight_decay != 0:
        torch._foreach_mul_(ys, s.shrink)
        torch._foreach_mul_(zs, s.shrink)
    if vs is not None:
        torch._foreach_mul_(vs, s.beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - s.beta2)
    num = grads
    if ms is not None:
        torch._foreach_mul_(ms, s.inner_momentum)
        torch._foreach_add_(ms, grads, alpha=s.one_minus_inner_momentum)
        num = torch._foreach_div(ms, s.bias_correction1)
    if s.normalize:
        denom = torch._foreach_div(vs, s.bias_correction2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, s.eps)
        if ms is not None:
            torch._foreach_div_(num, denom)
            gn = num
        else:
            gn = torch._foreach_div(grads, denom)
        del denom
        if s.weight_decay != 0 and s.decay_at != "all":
            torch._foreach_add_(gn, ys if s.decay_at == "y" else zs, alpha=s.weight_decay)
    elif s.weight_decay != 0 and s.decay_at != "all":
        gn = torch._foreach_add(num, ys if s.decay_at == "y" else zs, alpha=s.weight_decay)
    else:
        gn = num
    torch._foreach_lerp_(ys, zs, s.ckp1)
    torch._foreach_add_(ys, gn, alpha=s.y_coef)
    torch._foreach_sub_(zs, gn, alpha=s.lr)


# ---- fused: one pass over memory per tensor ----------------------------------------------------
# On the CPU a small C++ kernel (cpu.cpp beside this file, built on first use) steps a whole
# list in one call; on CUDA a Triton kernel (triton.py) steps a whole list per dtype in one
# launch; elsewhere a torch.compile'd per-tensor function. All take the step scalars as one small
# tensor, so their per-step change never triggers a rebuild or recompile.

def _fused_step(ys: Sequence[Tensor], grads: Sequence[Tensor], zs: Sequence[Tensor],
                exp_avg_sqs: Optional[Sequence[Tensor]], s: StepScalars,
                exp_avgs: Optional[Sequence[Tensor]] = None, seed: Optional[Tensor] = None) -> None:
    n = len(ys)
    vs = [None] * n if exp_avg_sqs is None else list(exp_avg_sqs)
    ms = [None] * n if exp_avgs is None else list(exp_avgs)
    fusable = [i for i in range(n) if ys[i].numel() > 0 and
               all(t.is_contiguous() for t in (ys[i], grads[i], zs[i], vs[i], ms[i]) if t is not None)]
    for i in sorted(set(range(n)) - set(fusable)):  # strided tensors (empty ones have nothing to do)
        _single_tensor_step(ys[i], grads[i], zs[i], vs[i], s, ms[i])
    cpu = [i for i in fusable if _on_cpu_kernel(ys[i])]
    if cpu:
        pick = lambda ts: [ts[i] for i in cpu]
        _cpu_extension()
        torch.ops.sf_dist.fused_step(pick(ys), pick(grads), pick(zs), [] if exp_avg_sqs is None else pick(vs),
                                     [] if exp_avgs is None else pick(ms),
                                     fused_constants(s, torch.float64, torch.device("cpu")),
                                     0 if seed is None else int(seed))
    _accelerator_step([i for i in fusable if not _on_cpu_kernel(ys[i])], ys, grads, zs, vs, s, None, ms, seed)


def _masked_step(ys: Sequence[Tensor], grads: Sequence[Tensor], zs: Sequence[Tensor],
                 exp_avg_sqs: Optional[Sequence[Tensor]], s: StepScalars, ok: Tensor, fused: bool,
                 exp_avgs: Optional[Sequence[Tensor]] = None, seed: Optional[Tensor] = None) -> None:
    """The sync-free step: device scalars, every store masked by ``ok``. ``fused`` takes the Triton
    kernel (or the compiled one; ``seed``: the Triton kernel's rounding stream); otherwise one eager
    out-of-place update per tensor (any device, the meta device included)."""
    n = len(ys)
    vs = [None] * n if exp_avg_sqs is None else list(exp_avg_sqs)
    ms = [None] * n if exp_avgs is None else list(exp_avgs)
    nonempty = [i for i in range(n) if ys[i].numel() > 0]
    if fused:
        _accelerator_step(nonempty, ys, grads, zs, vs, s, ok, ms, seed)
        return
    if nonempty:
        c = fused_constants(s, torch.float64, ys[0].device)
        for i in nonempty:
            _update(ys[i], grads[i], zs[i], vs[i], c.to(_compute_dtype(ys[i])), ok, ms[i])


def _accelerator_step(indices: list[int], ys: Sequence[Tensor], grads: Sequence[Tensor], zs: Sequence[Tensor],
                      vs: list[Optional[Tensor]], s: StepScalars, ok: Optional[Tensor],
                      ms: list[Optional[Tensor]], seed: Optional[Tensor] = None) -> None:
    """Fused step of non-CPU-kernel tensors: one Triton launch per dtype where it runs (rounding bf16
    state from ``seed``), else compiled (strided tensors, which only the sync-free path sends here,
    take the eager update)."""
    if not indices:
        return
    c = fused_constants(s, torch.float64, ys[indices[0]].device)
    module = _triton_kernels()
    tri = [i for i in indices if module is not None and module.available(ys[i].device)
           and module.supports(ys[i], grads[i], zs[i], vs[i], ms[i])]
    if tri:
        pick = lambda ts: [ts[i] for i in tri]
        module.step_(pick(ys), pick(grads), pick(zs), None if vs[tri[0]] is None else pick(vs), c, ok,
                     None if ms[tri[0]] is None else pick(ms), seed)
    for i in sorted(set(indices) - set(tri)):
        group = [ys[i], grads[i], zs[i]] + ([] if vs[i] is None else [vs[i]]) + ([] if ms[i] is None else [ms[i]])
        kind = "sgd" if vs[i] is None else "adam" if ms[i] is None else "adam_momentum"
        if all(t.is_contiguous() for t in group):
            _compiled(kind)(*map(_flat_alias, group), c.to(_compute_dtype(ys[i])), ok)
        else:
            _update(ys[i], grads[i], zs[i], vs[i], c.to(_compute_dtype(ys[i])), ok, ms[i])


@functools.cache
def _triton_kernels() -> Any:
    """sf_dist.kernels.triton, or None where triton does not import."""
    try:
        from . import triton as module
    except ImportError:
        return None
    return module


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _on_cpu_kernel(t: Tensor) -> bool:
    """Whether the C++ CPU kernel (rather than the compiled one) steps this tensor."""
    return t.device.type == "cpu"


def fused_constants(s: StepScalars, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The fused kernels' 14 step constants: [lr, ckp1, y_coef, wd_y, wd_z, shrink, beta2, 1-beta2,
    1/bias_correction2, eps, normalize, mu, 1-mu, 1/bias_correction1] (mu: inner momentum), each computed
    in float64 (on the host, or on the device for the sync-free path) and rounded once to ``dtype``."""
    additive = s.weight_decay if s.decay_at != "all" else 0.0
    values = [s.lr, s.ckp1, s.y_coef, additive if s.decay_at == "y" else 0.0,
              additive if s.decay_at == "z" else 0.0, s.shrink,
              s.beta2 if s.beta2 is not None else 0.0, s.one_minus_beta2, s.inv_bias_correction2, s.eps,
              s.normalize if isinstance(s.normalize, Tensor) else float(s.normalize),
              s.inner_momentum, s.one_minus_inner_momentum, s.inv_bias_correction1]
    if any(isinstance(v, Tensor) for v in values):  # device scalars: no host value is read or copied
        return torch.stack([v.to(device, torch.float64) if isinstance(v, Tensor) else
                            torch.full((), v, dtype=torch.float64, device=device) for v in values]).to(dtype)
    return torch.tensor(values, dtype=dtype, device=device)


@functools.cache
def cpu_kernel_error() -> Optional[str]:
    """Why the fused C++ CPU kernel cannot be used in this process (None when it builds and loads)."""
    try:
        _cpu_extension()
        return None
    except RuntimeError as e:
        return str(e)


@functools.cache
def _cpu_extension() -> None:
    """Build (once per machine, cached under TORCH_EXTENSIONS_DIR) and load the CPU kernel."""
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-fno-math-errno"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    try:
        load(name="sf_dist_fused_step", sources=[str(Path(__file__).with_name("cpu.cpp"))],
             extra_cflags=flags + ["-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:  # no compiler, no ninja, ...
        raise RuntimeError(f"fused=True on the CPU needs to build a small C++ kernel and that failed ({e}); "
                           "install a C++ compiler and ninja, or use foreach=True / the default path") from e


def _adam_update(y: Tensor, g: Tensor, z: Tensor, v: Tensor, c: Tensor, ok: Optional[Tensor]) -> None:
    lr, ckp1, y_coef, wd_y, wd_z, shrink, beta2, one_minus_beta2, inv_bc2, eps, normalize = c.unbind()[:11]
    y0 = y * shrink
    z0 = z * shrink
    v1 = v * beta2 + g * g * one_minus_beta2
    denom = torch.where(normalize > 0, torch.sqrt(v1 * inv_bc2) + eps, torch.ones_like(v1))
    gn = g / denom + wd_y * y0 + wd_z * z0
    y1, z1 = torch.lerp(y0, z0, ckp1) + y_coef * gn, z0 - lr * gn
    if ok is not None:  # a skipped step writes back the old values: bitwise unchanged
        y1, z1, v1 = torch.where(ok, y1, y), torch.where(ok, z1, z), torch.where(ok, v1, v)
    y.copy_(y1)
    z.copy_(z1)
    v.copy_(v1)


def _adam_momentum_update(y: Tensor, g: Tensor, z: Tensor, v: Tensor, m: Tensor, c: Tensor,
                          ok: Optional[Tensor]) -> None:
    lr, ckp1, y_coef, wd_y, wd_z, shrink, beta2, one_minus_beta2, inv_bc2, eps, normalize, mu, one_minus_mu, \
        inv_bc1 = c.unbind()
    y0 = y * shrink
    z0 = z * shrink
    v1 = v * beta2 + g * g * one_minus_beta2
    m1 = m * mu + g * one_minus_mu
    denom = torch.where(normalize > 0, torch.sqrt(v1 * inv_bc2) + eps, torch.ones_like(v1))
    gn = m1 * inv_bc1 / denom + wd_y * y0 + wd_z * z0
    y1, z1 = torch.lerp(y0, z0, ckp1) + y_coef * gn, z0 - lr * gn
    if ok is not None:  # a skipped step writes back the old values: bitwise unchanged
        y1, z1, v1, m1 = torch.where(ok, y1, y), torch.where(ok, z1, z), torch.where(ok, v1, v), torch.where(ok, m1, m)
    y.copy_(y1)
    z.copy_(z1)
    v.copy_(v1)
    m.copy_(m1)


def _sgd_update(y: Tensor, g: Tensor, z: Tensor, c: Tensor, ok: Optional[Tensor]) -> None:
    lr, ckp1, y_coef, wd_y, wd_z, shrink = c.unbind()[:6]
    y0 = y * shrink
    z0 = z * shrink
    gn = g + wd_y * y0 + wd_z * z0
    y1, z1 = torch.lerp(y0, z0, ckp1) + y_coef * gn, z0 - lr * gn
    if ok is not None:
        y1, z1 = torch.where(ok, y1, y), torch.where(ok, z1, z)
    y.copy_(y1)
    z.copy_(z1)


def _update(y: Tensor, g: Tensor, z: Tensor, v: Optional[Tensor], c: Tensor, ok: Optional[Tensor],
            m: Optional[Tensor] = None) -> None:
    """The fused math in eager torch ops over one tensor (any layout, any device)."""
    if v is None:
        _sgd_update(y, g, z, c, ok)
    elif m is None:
        _adam_update(y, g, z, v, c, ok)
    else:
        _adam_momentum_update(y, g, z, v, m, c, ok)


COMPILED_KERNELS = {"adam": _adam_update, "adam_momentum": _adam_momentum_update, "sgd": _sgd_update}


@functools.cache
def _compiled(kind: str) -> Callable:
    return torch.compile(COMPILED_KERNELS[kind], dynamic=True, fullgraph=True)


def _flat_alias(t: Tensor) -> Tensor:
    """A 1-D tensor over ``t``'s memory that is not a view, so the compiled graph has no base shape
    to guard on: one graph per dtype serves every size but 1, which torch specialises. (An
    unbacked length would avoid that graph but measured 20 ms per call.)"""
    return torch.empty((0,), dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))
