"""The fused Schedule-Free step for CUDA as one Triton launch per dtype combination.

One pass over memory per element (read y, g, z, v (and m) once; write y, z, v (and m)), a whole list of tensors
per launch: each program finds its tensor and offset in a small table of pointers. The step's
constants and the optional "do this step" flag are read on the device, so a launch needs no
host value that changes per step (no sync; CUDA-graph capturable once the table is cached).
Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is imported) runs the same
kernel on CPU tensors, which is how the tests check it without a GPU.

    >>> from sf_dist.kernels import triton as tk
    >>> tk.step_(ys, grads, zs, exp_avg_sqs, constants, flag=None, exp_avgs=None, seed=None)  # 14 constants

Each per-element buffer is one table column; the optional ones (v, and AdamW's inner momentum m)
each have a ``HAS_*`` constexpr. The table layout is ``COLUMNS``. bf16 state under fp32/fp64 params
(``state_dtype=torch.bfloat16``) is rounded stochastically in the same pass, from the C++ CPU kernel's
counter-based stream (cpu.cpp: ``mix64``, ``hash32``, ``round_bf16``): the same seed gives the same bits.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

# Table columns, one row per tensor; a row's pointers are raw addresses cast in the kernel.
COLUMNS = ("y", "g", "z", "v", "m", "numel", "stream")  # stream: 1 + the tensor's index in the step's list
CHUNK = 8192  # elements one program steps (a loop of BLOCK-wide vectors); not tuned on a GPU yet
BLOCK = 1024
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
       torch.float64: tl.float64}


def available(device: torch.device) -> bool:
    """Whether the optimizers step tensors on ``device`` with this kernel: CUDA only (on the CPU
    the C++ kernel is faster; the interpreter is for tests)."""
    return device.type == "cuda"


def supports(y: Tensor, g: Tensor, z: Tensor, v: Optional[Tensor], m: Optional[Tensor] = None) -> bool:
    """Whether one tensor's (y, g, z, v, m) can go through the kernel: contiguous, non-empty, known dtypes."""
    ts = [y, g, z] + [t for t in (v, m) if t is not None]
    return y.numel() > 0 and all(t.is_contiguous() and t.dtype in _TL and t.numel() == y.numel() for t in ts)


@triton.jit
def _cast(x, D: tl.constexpr, BF16: tl.constexpr):
    """x (fp32/fp64) as the stored dtype D; bf16 rounds to nearest even by its bits, as torch does
    (the interpreter's own bf16 conversion truncates)."""
    if BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a quiet NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(D)


@triton.jit
def _mix64(z):
    """splitmix64's output function on uint64 (cpu.cpp ``mix64``): a tensor's stream from the step's seed."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _hash32(x):
    """Wellons' lowbias32 on uint32 (cpu.cpp ``hash32``): the random word of one element."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _round_bf16(x, noise):
    """fp32 x into bf16, rounded stochastically with 16 random bits (cpu.cpp ``round_bf16``): they carry
    into the kept bits with probability equal to the dropped fraction; NaN and Inf stay what they are."""
    bits = x.to(tl.uint32, bitcast=True)
    special = (bits & 0x7F800000) == 0x7F800000
    nan = tl.where((bits & 0x007FFFFF) != 0, 0x40, 0).to(tl.uint32)
    out = tl.where(special, (bits >> 16) | nan, (bits + (noise & 0xFFFF)) >> 16)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _state(x, noise, S: tl.constexpr, S_BF16: tl.constexpr, SR: tl.constexpr):
    """A computed state value as stored: rounded stochastically (SR: bf16 state), else cast."""
    if SR:
        return _round_bf16(x.to(tl.float32), noise)
    return _cast(x, S, S_BF16)


@triton.jit
def _step_kernel(table, chunks, consts, flag, seed, HAS_V: tl.constexpr, HAS_M: tl.constexpr, HAS_FLAG: tl.constexpr,
                 P: tl.constexpr, G: tl.constexpr, S: tl.constexpr, C: tl.constexpr,
                 P_BF16: tl.constexpr, S_BF16: tl.constexpr, SR: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    row = table + 7 * t
    yp = tl.load(row).to(tl.pointer_type(P))
    gp = tl.load(row + 1).to(tl.pointer_type(G))
    zp = tl.load(row + 2).to(tl.pointer_type(S))
    vp = tl.load(row + 3).to(tl.pointer_type(S))
    mp = tl.load(row + 4).to(tl.pointer_type(S))
    n = tl.load(row + 5)
    lr = tl.load(consts).to(C)
    ckp1 = tl.load(consts + 1).to(C)
    y_coef = tl.load(consts + 2).to(C)
    wd_y = tl.load(consts + 3).to(C)
    wd_z = tl.load(consts + 4).to(C)
    shrink = tl.load(consts + 5).to(C)
    beta2 = tl.load(consts + 6).to(C)
    one_minus_beta2 = tl.load(consts + 7).to(C)
    inv_bc2 = tl.load(consts + 8).to(C)
    eps = tl.load(consts + 9).to(C)
    normalize = tl.load(consts + 10)
    mu = tl.load(consts + 11).to(C)
    one_minus_mu = tl.load(consts + 12).to(C)
    inv_bc1 = tl.load(consts + 13).to(C)
    if HAS_FLAG:  # a skipped step masks every element: nothing is read or written
        n = tl.where(tl.load(flag) != 0, n, 0)
    if SR:  # this tensor's stream: mix64(seed + stream * K), as the C++ kernel derives it
        stream = _mix64(tl.load(seed).to(tl.uint64) + tl.load(row + 6).to(tl.uint64) * 0xD1B54A32D192ED03)
        lo = stream.to(tl.uint32)
        hi = (stream >> 32).to(tl.uint32)
    for off in tl.static_range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        m = idx < n
        if SR:  # element i's word: hash32 of i's 32-bit fold ^ the stream; z takes its low half, v its high
            fold = idx.to(tl.uint32) ^ ((idx >> 32).to(tl.uint32) * 0x9E3779B9)
            noise = _hash32(fold ^ lo)
            noise_m = _hash32(noise ^ hi)
        else:
            noise = 0
            noise_m = 0
        g = tl.load(gp + idx, mask=m, other=0.0).to(C)
        y0 = tl.load(yp + idx, mask=m, other=0.0).to(C) * shrink
        z0 = tl.load(zp + idx, mask=m, other=0.0).to(C) * shrink
        gn = g
        if HAS_M:  # AdamW's inner momentum: the numerator is the bias-corrected EMA of g
            m1 = tl.load(mp + idx, mask=m, other=0.0).to(C) * mu + g * one_minus_mu
            tl.store(mp + idx, _state(m1, noise_m, S, S_BF16, SR), mask=m)
            gn = m1 * inv_bc1
        if HAS_V:
            v1 = tl.load(vp + idx, mask=m, other=0.0).to(C) * beta2 + g * g * one_minus_beta2
            tl.store(vp + idx, _state(v1, noise >> 16, S, S_BF16, SR), mask=m)
            denom = tl.where(normalize != 0, tl.sqrt(v1 * inv_bc2) + eps, 1.0)
            gn = gn / denom
        gn = gn + wd_y * y0 + wd_z * z0
        tl.store(yp + idx, _cast(y0 + ckp1 * (z0 - y0) + y_coef * gn, P, P_BF16), mask=m)
        tl.store(zp + idx, _state(z0 - lr * gn, noise, S, S_BF16, SR), mask=m)


# Tables keyed by every address, size and dtype they hold: the content is a function of the key,
# so a hit is always valid, and steady-state steps (same params, state, grad buffers) upload nothing.
_TABLES: OrderedDict = OrderedDict()
_MAX_TABLES = 16


def _tables(rows: list[tuple[int, ...]], device: torch.device) -> tuple[Tensor, Tensor]:
    key = (device, CHUNK, tuple(rows))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    chunks = [(i, start) for i, r in enumerate(rows) for start in range(0, r[COLUMNS.index("numel")], CHUNK)]
    host = [torch.tensor(rows, dtype=torch.int64), torch.tensor(chunks, dtype=torch.int64)]
    if device.type == "cuda":  # from pinned memory the upload is asynchronous: no host sync
        host = [t.pin_memory() for t in host]
    hit = tuple(t.to(device, non_blocking=True) for t in host)
    _TABLES[key] = hit
    if len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return hit


def rounds_stochastically(param: torch.dtype, state: torch.dtype) -> bool:
    """Whether the kernel stores state rounded stochastically: bf16 state under fp32/fp64 params."""
    return state == torch.bfloat16 and param in (torch.float32, torch.float64)


def step_(ys: Sequence[Tensor], grads: Sequence[Tensor], zs: Sequence[Tensor],
          exp_avg_sqs: Optional[Sequence[Tensor]], constants: Tensor, flag: Optional[Tensor] = None,
          exp_avgs: Optional[Sequence[Tensor]] = None, seed: Optional[Tensor] = None) -> None:
    """One fused step in place. ``constants``: the 14 float64 step values on the tensors' device,
    [lr, ckp1, y_coef, wd_y, wd_z, shrink, beta2, 1-beta2, 1/bias_correction2, eps, normalize,
    mu, 1-mu, 1/bias_correction1]; ``flag`` (0-dim, on the device): nonzero to step, zero to leave
    every tensor bitwise unchanged; ``exp_avgs``: the inner momentum (needs ``exp_avg_sqs``);
    ``seed`` (0-dim int64 on the device, read there): the rounding stream, needed where
    ``rounds_stochastically``; tensor i of the list rounds with the C++ kernel's stream i.
    Every tensor must pass ``supports``."""
    if not ys:
        return
    device = ys[0].device
    groups: dict[tuple, list[tuple[int, ...]]] = {}
    for i, (y, g, z) in enumerate(zip(ys, grads, zs)):
        v = None if exp_avg_sqs is None else exp_avg_sqs[i]
        m = None if exp_avgs is None else exp_avgs[i]
        dtypes = (y.dtype, g.dtype, z.dtype, None if v is None else v.dtype, None if m is None else m.dtype)
        groups.setdefault(dtypes, []).append((y.data_ptr(), g.data_ptr(), z.data_ptr(), 0 if v is None else v.data_ptr(),
                                              0 if m is None else m.data_ptr(), y.numel(), i + 1))
    for (p, g, s, v, m), rows in groups.items():
        if any(d is not None and d != s for d in (v, m)) or (m is not None and v is None):
            raise ValueError(f"z is {s}, exp_avg_sq {v}, exp_avg {m}: the fused kernel needs one state dtype "
                             "(and exp_avg only beside exp_avg_sq)")
        rounded = rounds_stochastically(p, s)
        if rounded and seed is None:
            raise ValueError(f"bf16 state under {p} params is rounded stochastically: pass seed (a 0-dim int64 "
                             "tensor on the device)")
        table, chunks = _tables(rows, device)
        compute = tl.float64 if p == torch.float64 else tl.float32
        _step_kernel[(chunks.shape[0],)](
            table, chunks, constants, constants if flag is None else flag, seed if rounded else constants,
            HAS_V=v is not None, HAS_M=m is not None, HAS_FLAG=flag is not None, P=_TL[p], G=_TL[g], S=_TL[s], C=compute,
            P_BF16=p == torch.bfloat16, S_BF16=s == torch.bfloat16, SR=rounded, CHUNK=CHUNK, BLOCK=BLOCK)

