"""The device check for one CUDA GPU: numerics, step time and bandwidth, host syncs, graph capture, FSDP2.

    python -m sf_dist.bench gpu [--params 1.0e9] [--reps 20] [--skip-fsdp]

Sections, each printing PASS/FAIL lines or figures (about 2-4 minutes on one H100/H200):
1. numerics: the default (Triton) kernel against sf_dist's foreach path and schedulefree 1.4.1 on
   CUDA, AdamW/SGD/RAdam, every decay_at (and AdamW's inner momentum, against the explicit oracle), in
   float64 (rtol 1e-5) and float32 (the reference's rtol 1e-5/atol 1e-6), through train -> eval -> train;
   bf16 state (``state_dtype=torch.bfloat16``): the Triton kernel's stochastic rounding against the C++
   CPU kernel for the same seed, bitwise on exactly computed values and unbiased over 4096 rounds, then
   10 AdamW steps (with and without inner momentum, fp32 and fp64 params) step by step.
2. step time at about ``--params`` parameters in 4096x4096 tensors: torch AdamW fused (the anchor),
   sf_dist default, sf_dist without the check, sf_dist foreach, schedulefree foreach; fp32, and bf16
   params (state as each optimizer makes it), and sf_dist with bf16 state under fp32 params (20 bytes
   moved per param instead of 28, state bytes per param measured); plus the sf_dist kernel alone on
   bf16 params with fp32 state. Achieved bandwidth = bytes moved per element (read y, g, z, v; write
   y, z, v) / time, against a measured device copy and the nominal peak where the device name is known.
3. host syncs: ``torch.cuda.set_sync_debug_mode("error")`` around train/step/eval/train of the three
   optimizers with default settings, including a skipped (NaN) step.
4. CUDA graph: ``opt.step()`` captured once and replayed equals eager steps bitwise.
5. FSDP2, one rank, NCCL: steps, a skipped step, and ``sf_dist.eval_state_dict`` against the reference.
Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable

import torch

import sf_dist
from sf_dist import kernels
from sf_dist.schedule import StepScalars

NOMINAL_TBPS = {"H200": 4.8, "H100 SXM": 3.35, "H100 PCIe": 2.0, "H100": 3.35, "A100-SXM4-80GB": 2.04,
                "A100 80GB PCIe": 1.94, "A100": 1.56, "L40S": 0.864, "A10G": 0.6}  # vendor data sheets
OURS = {"adamw": sf_dist.AdamWScheduleFree, "sgd": sf_dist.SGDScheduleFree, "radam": sf_dist.RAdamScheduleFree}
FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    """Print a PASS/FAIL line and remember failures for the exit status."""
    print(f"  {'PASS' if ok else 'FAIL'}  {what}")
    if not ok:
        FAILED.append(what)


def _hp(kind: str, decay_at: str, inner_momentum: float = 0.0) -> dict:
    lr = 0.5 if kind == "sgd" else 0.01
    hp = dict(lr=lr, weight_decay=0.05, r=0.5, weight_lr_power=2.0, decay_at=decay_at)
    if inner_momentum:
        hp["inner_momentum"] = inner_momentum
    if kind != "radam":
        hp["warmup_steps"] = 4
    return hp


def numerics(device: torch.device) -> None:
    """Section 1: the default kernel against foreach and the reference, fp64 and fp32."""
    import schedulefree

    from sf_dist.reference import ReferenceScheduleFree

    theirs = {"adamw": schedulefree.AdamWScheduleFree, "sgd": schedulefree.SGDScheduleFree,
              "radam": schedulefree.RAdamScheduleFree}
    shapes = [(257, 129), (4097,), (3, 5, 7), (1,), (0, 4), (70000,)]
    print("1. numerics on", torch.cuda.get_device_name(device))
    for dtype in (torch.float64, torch.float32):
        for kind in OURS:
            for decay_at, mu in [("y", 0.0), ("z", 0.0), ("all", 0.0)] + ([("z", 0.9)] if kind == "adamw" else []):
                gen = torch.Generator().manual_seed(0)
                init = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
                ps = [[t.to(device, copy=True).requires_grad_() for t in init] for _ in range(3)]
                hp = _hp(kind, decay_at, mu)
                ref = (theirs[kind](ps[2], **{k: v for k, v in hp.items() if k != "decay_at"}) if decay_at == "y"
                       else ReferenceScheduleFree(ps[2], kind=kind, **hp))
                opts = [OURS[kind](ps[0], **hp), OURS[kind](ps[1], foreach=True, **hp), ref]
                worst = [0.0, 0.0]
                for phase in ("train", "eval", "train"):
                    for o in opts:
                        getattr(o, phase)()
                    if phase == "train":
                        for k in range(10):
                            grads = [torch.randn(s, generator=gen, dtype=dtype).to(device) for s in shapes]
                            for o, qs in zip(opts, ps):
                                for p, g in zip(qs, grads):
                                    p.grad = g.clone()
                                o.step()
                    for j in (0, 1):  # the excess over atol + rtol*|b|, in units of rtol*|b| + atol
                        for a, b in zip(ps[j], ps[2]):
                            if a.numel():
                                err = ((a - b).abs() / (1e-6 + 1e-5 * b.abs())).max()
                                worst[j] = max(worst[j], float(err.detach()))
                ok = max(worst) <= 1.0
                check(ok, f"{str(dtype)[6:]:8s} {kind:5s} decay_at={decay_at}{f' mu={mu}' if mu else ''}: default vs reference "
                          f"{worst[0]:.2f}, foreach vs reference {worst[1]:.2f} (of the tolerance)")
    bf16_state(device)


# Scalars under which one step writes z = -g/2, v = g*g and m = g/2 (one float32 operation on g each),
# so both kernels round the same float32 values.
EXACT = StepScalars(lr=1.0, ckp1=0.0, y_coef=0.0, weight_decay=0.0, decay_at="y", beta2=0.0, eps=1e-8,
                    normalize=False, inner_momentum=0.5)


def _both_kernels(state: list[list[torch.Tensor]], device: torch.device, s: StepScalars, seed: int) -> list:
    """One fused step of ``state`` ([ys, gs, zs, vs, ms], CPU tensors, bf16 z/v/m, ms empty without inner
    momentum) on the C++ CPU kernel in place, and of a copy on ``device`` through the Triton kernel, with
    the same seed; returns the copy."""
    from sf_dist.kernels import triton as tk

    on_device = [[t.to(device, copy=True) for t in ts] for ts in state]
    torch.ops.sf_dist.fused_step(*state, kernels.fused_constants(s, torch.float64, torch.device("cpu")), seed)
    ys, gs, zs, vs, ms = on_device
    tk.step_(ys, gs, zs, vs, kernels.fused_constants(s, torch.float64, device), None, ms or None,
             seed=torch.tensor(seed, dtype=torch.int64, device=device))
    return on_device


def _bf16_steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 values lie between a and b (bf16, their bits read as sign-magnitude integers)."""
    ia, ib = (t.view(torch.int16).int() for t in (a, b))
    return (torch.where(ia < 0, -32768 - ia, ia) - torch.where(ib < 0, -32768 - ib, ib)).abs()


def bf16_state(device: torch.device) -> None:
    """Section 1, bf16 state: the Triton kernel's stochastic rounding against the C++ CPU kernel."""
    if kernels.cpu_kernel_error() is not None:
        check(False, f"bf16 state: the C++ CPU kernel, the oracle here, does not build ({kernels.cpu_kernel_error()})")
        return
    gen = torch.Generator().manual_seed(0)
    x, reps = torch.randn(1000, generator=gen) * torch.logspace(-6, 6, 1000), 4096
    g = x.repeat(reps)
    state = [[torch.zeros_like(g)], [g]] + [[torch.zeros_like(g, dtype=torch.bfloat16)] for _ in range(3)]
    got = _both_kernels(state, device, EXACT, seed=12345)
    same = all(torch.equal(a[0].cpu().view(torch.int16), b[0].view(torch.int16)) for a, b in zip(got[2:], state[2:]))
    check(same, "bf16 state: Triton z, v, m bitwise equal to the C++ kernel's for the same seed (4.1M values)")
    for name, t, want in (("z", got[2][0], -x / 2), ("v", got[3][0], x * x), ("m", got[4][0], x / 2)):
        bits = want.contiguous().view(torch.int32) & -65536  # the bf16 value below |want| by magnitude
        low = bits.view(torch.float32).double()
        ulp = (bits + 65536).view(torch.float32).double().abs() - low.abs()
        frac = (want.double().abs() - low.abs()) / ulp
        se = ulp * (frac * (1 - frac) / reps).sqrt()
        inexact = frac > 0
        zs = ((t.float().cpu().view(reps, -1).double().mean(0) - want.double()) / se)[inexact]
        nearest = ((want.to(torch.bfloat16).double() - want.double()) / se)[inexact]
        check(float(zs.abs().max()) < 5.0, f"bf16 state: {name} unbiased, mean of 4096 roundings within "
              f"{float(zs.abs().max()):.1f} (max) / {float(zs.abs().mean()):.2f} (mean) standard errors of the value "
              f"(round-to-nearest: {float(nearest.abs().mean()):.0f} mean)")
    shapes = [(257, 129), (4097,), (3, 5, 7), (1,), (70000,)]
    for dtype in (torch.float32, torch.float64):
        for mu in (0.0, 0.9):
            gen = torch.Generator().manual_seed(1)
            ys = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
            zeros = lambda: [torch.zeros_like(y, dtype=torch.bfloat16) for y in ys]  # noqa: E731
            state = [ys, [], [y.to(torch.bfloat16) for y in ys], zeros(), zeros() if mu else []]
            worst_y, worst_ulps, differ, total = 0.0, 0, 0, 0
            for k in range(1, 11):
                ckp1 = 1 / k
                s = StepScalars(lr=0.01, ckp1=ckp1, y_coef=0.01 * (0.9 * (1 - ckp1) - 1), weight_decay=0.05,
                                decay_at="y", beta2=0.999, bias_correction2=1 - 0.999**k, eps=1e-8, normalize=True,
                                inner_momentum=mu, bias_correction1=1 - mu**k if mu else 1.0)
                state[1] = [torch.randn(s_, generator=gen, dtype=dtype) for s_ in shapes]
                got = _both_kernels(state, device, s, seed=1000 + k)
                for a, b in zip(got[0], state[0]):
                    worst_y = max(worst_y, float(((a.cpu() - b).abs() / (1e-6 + 1e-5 * b.abs())).max()))
                for ts, us in zip(got[2:], state[2:]):
                    for a, b in zip(ts, us):
                        apart = _bf16_steps_apart(a.cpu(), b)
                        worst_ulps = max(worst_ulps, int(apart.max()))
                        differ, total = differ + int((apart > 0).sum()), total + b.numel()
            check(worst_y <= 1.0 and worst_ulps <= 1 and differ <= total // 1000,
                  f"bf16 state, {str(dtype)[6:]} params{f' mu={mu}' if mu else ''}: 10 steps, y vs the C++ kernel "
                  f"{worst_y:.2f} of the tolerance; state {differ} of {total} values differ (target <= 0.1%), "
                  f"at most {worst_ulps} bf16 step(s) apart (target <= 1)")


def _time(step: Callable[[], None], reps: int) -> float:
    """Median milliseconds of ``step`` by CUDA events, after 3 warm-up calls."""
    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _copy_bandwidth(device: torch.device, numel: int) -> float:
    """Measured device-to-device copy, in TB/s (bytes read + written)."""
    src = torch.empty(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = _time(lambda: dst.copy_(src), 10)
    return 2 * 4 * numel / (ms * 1e-3) / 1e12


def step_time(device: torch.device, target: float, reps: int) -> None:
    """Section 2: step time against torch fused AdamW at about ``target`` params."""
    import schedulefree

    n_tensors = max(1, round(target / 4096**2))
    numel = n_tensors * 4096**2
    name = torch.cuda.get_device_name(device)
    copy = _copy_bandwidth(device, 1 << 28)
    nominal = next((v for k, v in NOMINAL_TBPS.items() if k in name), None)
    print(f"2. step time, {numel / 1e9:.2f}B params in {n_tensors} tensors of 4096x4096; device copy "
          f"{copy:.2f} TB/s" + (f", nominal peak {nominal} TB/s" if nominal else ", nominal peak unknown"))
    rows = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "sf_dist AdamW (default)": lambda ps: sf_dist.AdamWScheduleFree(ps, lr=1e-3),
        "sf_dist AdamW, no check": lambda ps: sf_dist.AdamWScheduleFree(ps, lr=1e-3, nonfinite="ignore"),
        "sf_dist AdamW foreach": lambda ps: sf_dist.AdamWScheduleFree(ps, lr=1e-3, foreach=True),
        "schedulefree AdamW foreach": lambda ps: schedulefree.AdamWScheduleFree(ps, lr=1e-3, foreach=True),
    }
    half_state = {"sf_dist AdamW, bf16 state":
                  lambda ps: sf_dist.AdamWScheduleFree(ps, lr=1e-3, state_dtype=torch.bfloat16)}
    for dtype in (torch.float32, torch.bfloat16):
        anchor = None
        for row, make in (dict(rows, **half_state) if dtype == torch.float32 else rows).items():
            ps = [torch.nn.Parameter(torch.randn(4096, 4096, device=device, dtype=dtype)) for _ in range(n_tensors)]
            for p in ps:
                p.grad = torch.randn_like(p) * 1e-3
            opt = make(ps)
            if hasattr(opt, "train"):
                opt.train()
            ms = _time(opt.step, reps)
            anchor = anchor or ms
            state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                        if isinstance(t, torch.Tensor)) / numel  # bytes per param, as measured
            moved = 3 * ps[0].element_size() + 2 * state  # read y, g and the state; write y and the state
            tbps = moved * numel / (ms * 1e-3) / 1e12
            print(f"  {str(dtype)[6:]:8s} {row:28s} {ms:8.2f} ms {ms / anchor:5.2f}x  state {state:4.1f} B/param  "
                  f"{tbps:5.2f} TB/s ({tbps / copy:4.0%} of copy"
                  + (f", {tbps / nominal:4.0%} of nominal)" if nominal else ")"))
            if row == "sf_dist AdamW (default)" and dtype == torch.float32:
                fp32_state_ms = ms
                check(ms <= anchor, f"default fp32 step {ms / anchor:.2f}x torch fused AdamW (target <= 1.0x)")
                if nominal:
                    check(tbps >= 0.8 * nominal, f"default fp32 step at {tbps / nominal:.0%} of nominal peak (target >= 80%)")
            if row in half_state:
                check(ms <= fp32_state_ms and state == 4.0,
                      f"bf16 state: {state:.1f} B/param (target 4.0), step {ms / fp32_state_ms:.2f}x fp32 state's "
                      f"(target <= 1.0x; it moves 20 B/param instead of 28)")
            del opt, ps
            torch.cuda.empty_cache()
    ys = [torch.randn(4096, 4096, device=device, dtype=torch.bfloat16) for _ in range(n_tensors)]
    gs = [torch.randn_like(y) for y in ys]
    zs = [y.float() for y in ys]
    vs = [torch.zeros_like(z) for z in zs]
    s = StepScalars(lr=1e-3, ckp1=0.1, y_coef=-1e-3, weight_decay=0.0, decay_at="y", beta2=0.999,
                    bias_correction2=0.01, eps=1e-8, normalize=True)
    ms = _time(lambda: kernels.step_(ys, gs, zs, vs, s, impl="fused"), reps)
    moved = numel * (2 + 2 + 4 + 4 + 2 + 4 + 4)  # read y, g (bf16), z, v (fp32); write y (bf16), z, v (fp32)
    print(f"  bf16 params, fp32 state: sf_dist fused kernel {ms:.2f} ms, {moved / (ms * 1e-3) / 1e12:.2f} TB/s")


def syncs(device: torch.device) -> None:
    """Section 3: no host sync in train/step/eval/train under the defaults, a skipped step included."""
    print("3. host syncs (torch.cuda.set_sync_debug_mode('error'))")
    for kind, cls in OURS.items():
        ps = [torch.nn.Parameter(torch.randn(s, device=device)) for s in [(64, 32), (7,), (0,)]]
        opt = cls(ps)
        error = None
        torch.cuda.set_sync_debug_mode("error")
        try:
            for k in range(4):
                opt.train()
                for p in ps:
                    p.grad = torch.randn_like(p)
                if k == 2:
                    ps[0].grad[0, 0] = float("nan")
                opt.step()
                opt.eval()
            opt.train()
        except RuntimeError as e:
            error = e
        finally:
            torch.cuda.set_sync_debug_mode("default")
        check(error is None, f"{kind}: no host sync in 4 steps with train/eval" + (f" ({error})" if error else ""))
        check(opt.skipped_steps == 1 and int(opt.state_dict()["param_groups"][0]["k"]) == 3,
              f"{kind}: the NaN step was skipped (skipped_steps={opt.skipped_steps})")


def graph(device: torch.device) -> None:
    """Section 4: a captured and replayed step() equals eager steps bitwise."""
    print("4. CUDA graph capture of step()")
    for kind, cls in OURS.items():
        gen = torch.Generator(device=device).manual_seed(0)
        init = [torch.randn(s, device=device, generator=gen) for s in [(300, 70), (33,)]]
        grads = [[torch.randn_like(t) for t in init] for _ in range(8)]
        eager_ps = [torch.nn.Parameter(t.clone()) for t in init]
        graph_ps = [torch.nn.Parameter(t.clone()) for t in init]
        eager, captured = cls(eager_ps), cls(graph_ps)
        eager.train(), captured.train()
        for p in graph_ps:
            p.grad = torch.zeros_like(p)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for k in range(3):  # warm-up steps build state and the kernel's pointer table
                for p, g in zip(graph_ps, grads[k]):
                    p.grad.copy_(g)
                captured.step()
        torch.cuda.current_stream().wait_stream(side)
        for k in range(3):
            for p, g in zip(eager_ps, grads[k]):
                p.grad = g.clone()
            eager.step()
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                captured.step()
            for k in range(3, 8):
                for p, gr in zip(graph_ps, grads[k]):
                    p.grad.copy_(gr)
                g.replay()
                for p, gr in zip(eager_ps, grads[k]):
                    p.grad = gr.clone()
                eager.step()
            torch.cuda.synchronize()
            same = all(torch.equal(a, b) for a, b in zip(eager_ps, graph_ps))
            check(same, f"{kind}: 5 replays equal 5 eager steps bitwise")
        except RuntimeError as e:
            check(False, f"{kind}: capture failed ({e})")


def fsdp2(device: torch.device) -> None:
    """Section 5: FSDP2 at W=1 over NCCL: steps, a skipped step and the eval export."""
    import schedulefree
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    print("5. FSDP2, W=1, NCCL")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        def model() -> torch.nn.Module:
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(device)

        sharded, plain = model(), model()
        mesh = init_device_mesh("cuda", (1,))
        for layer in sharded:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        ours = sf_dist.AdamWScheduleFree(sharded.parameters(), lr=0.01, warmup_steps=2)
        ref = schedulefree.AdamWScheduleFree(plain.parameters(), lr=0.01, warmup_steps=2)
        ours.train(), ref.train()
        gen = torch.Generator(device=device).manual_seed(1)
        for k in range(6):
            x = torch.randn(32, 16, device=device, generator=gen)
            for m, o in ((sharded, ours), (plain, ref)):
                o.zero_grad()
                m(x).pow(2).mean().backward()
            if k == 3:  # a NaN on the sharded model: skipped there, the reference does not step
                next(sharded.parameters()).grad.to_local().view(-1)[0] = float("nan")
                ours.step()
                continue
            ours.step(), ref.step()
        x_ours = sf_dist.eval_state_dict(sharded, ours)
        ref.eval()
        x_ref = plain.state_dict()
        close = all(torch.allclose(x_ours[k].float().cpu(), v.float().cpu(), rtol=1e-4, atol=1e-6) for k, v in x_ref.items())
        check(ours.skipped_steps == 1, f"one skipped step counted (skipped_steps={ours.skipped_steps})")
        check(close and set(x_ours) == set(x_ref), "eval_state_dict (x) equals schedulefree's eval weights (fp32, rtol 1e-4)")
    finally:
        dist.destroy_process_group()


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m sf_dist.bench gpu``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1.0e9, help="step-time size in parameters (default 1e9)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--skip-fsdp", action="store_true")
    return parser


def main() -> None:
    args = parser().parse_args()
    if not torch.cuda.is_available():
        sys.exit("python -m sf_dist.bench gpu needs a CUDA device and this machine has none")
    device = torch.device("cuda", torch.cuda.current_device())
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}, "
          f"Triton kernel {'on' if kernels.triton_available(device) else 'OFF (pip install triton)'}")
    sections: list[Callable[[], None]] = [lambda: numerics(device), lambda: step_time(device, args.params, args.reps),
                                          lambda: syncs(device), lambda: graph(device)]
    if not args.skip_fsdp:
        sections.append(lambda: fsdp2(device))
    for section in sections:  # one section's crash is a FAIL line, not the end of the others
        try:
            section()
        except Exception as e:  # noqa: BLE001 - reported, counted, and the next section runs
            check(False, f"section raised {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
    print(f"{len(FAILED)} check(s) failed" if FAILED else "all checks passed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
