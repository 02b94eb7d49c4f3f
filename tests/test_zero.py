"""ZeroScheduleFree against schedulefree 1.4.1 on the full batch, plus its memory, traffic and checkpoints.

One spawn per world size runs every optimizer x stage, so the file stays within its time budget;
each check raises inside the ranks with a message naming what differed.
"""

import contextlib
import copy
import math

import pytest
import schedulefree
import torch
import torch.distributed as dist
from torch import nn

import sf_dist
import sf_dist.checkpoint
from dist import run_distributed
from sf_dist.weights import eval_state_dict, eval_weights, register_eval_state_dict_hook, save_eval_weights
from sf_dist import ZeroScheduleFree
from sf_dist.backends.zero import buckets as zbuckets

RTOL, ATOL = 1e-5, 1e-6
BATCH = 24  # divisible by W * micro-batches (W = 1..4, 1 or 2 micro-batches): mean losses average exactly
OURS = {"adamw": sf_dist.AdamWScheduleFree, "sgd": sf_dist.SGDScheduleFree, "radam": sf_dist.RAdamScheduleFree}
THEIRS = {"adamw": schedulefree.AdamWScheduleFree, "sgd": schedulefree.SGDScheduleFree,
          "radam": schedulefree.RAdamScheduleFree}
HP = {"adamw": dict(lr=0.05, warmup_steps=2), "sgd": dict(lr=0.3, warmup_steps=2), "radam": dict(lr=0.05)}
TINY = 1e-4  # bucket_cap_mb: 13 float64 elements, so most params get a bucket of their own


class Net(nn.Module):
    """Uneven sizes (35, 7, 21, 3, 4 elements); ``sometimes`` gets a gradient only every third step."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(5, 7).to(dtype)
        self.l2 = nn.Linear(7, 3).to(dtype)
        self.sometimes = nn.Parameter(torch.randn(4, dtype=dtype))

    def forward(self, x, step=1):
        out = self.l2(torch.tanh(self.l1(x)))
        return out + self.sometimes[:3] if step % 3 == 0 else out


def _groups(net, kind):
    """Two groups: decayed weights (+ ``sometimes``) and undecayed biases at half the lr."""
    lr = HP[kind]["lr"]
    return [{"params": [net.l1.weight, net.l2.weight, net.sometimes], "weight_decay": 0.05},
            {"params": [net.l1.bias, net.l2.bias], "weight_decay": 0.0, "lr": lr / 2}]


def _data(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 5, generator=gen, dtype=torch.float64), torch.randn(BATCH, 3, generator=gen,
                                                                                  dtype=torch.float64)


def _backward(net, step, rank, world, micro=1, no_sync=None):
    """This rank's slice of the batch, in ``micro`` accumulated backward passes (all but the last
    inside ``no_sync()`` when given)."""
    x, y = _data(step)
    n = BATCH // world // micro
    for m in range(rank * micro, (rank + 1) * micro):
        last = m == (rank + 1) * micro - 1
        with contextlib.nullcontext() if no_sync is None or last else no_sync():
            (nn.functional.mse_loss(net(x[m * n:(m + 1) * n], step), y[m * n:(m + 1) * n]) / micro).backward()


def _close(ours, ref, what):
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, {name}: {m}")


class Pair:
    """A ZeroScheduleFree model and the single-process reference, stepped on the same batches."""

    def __init__(self, rank, world, kind, stage, cap=25.0, clip=None, micro=1, no_sync=False):
        self.rank, self.world, self.clip, self.micro = rank, world, clip, micro
        self.net, self.ref = Net(), Net()
        self.opt = ZeroScheduleFree(_groups(self.net, kind), OURS[kind], stage=stage, bucket_cap_mb=cap,
                                    **HP[kind])
        self.ref_opt = THEIRS[kind](_groups(self.ref, kind), **HP[kind])
        self.no_sync = self.opt.no_sync if no_sync else None
        self.opt.train()
        self.ref_opt.train()
        self.k = 0

    def steps(self, n, what):
        for _ in range(n):
            _backward(self.net, self.k, self.rank, self.world, self.micro, self.no_sync)
            _backward(self.ref, self.k, 0, 1)
            if self.clip is not None:
                norm = self.opt.clip_grad_norm_(self.clip)
                ref_norm = nn.utils.clip_grad_norm_(list(self.ref.parameters()), self.clip)
                torch.testing.assert_close(norm, ref_norm.double(), rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"{what}: global grad norm at step {self.k}: {m}")
            self.opt.step()
            self.ref_opt.step()
            self.opt.zero_grad()
            self.ref_opt.zero_grad()
            self.k += 1
        _close(self.net, self.ref, f"{what}: y after {self.k} steps")


def _equality(rank, world):
    """Every optimizer x stage x bucketing: y each step, x in eval mode, y again after train().

    The small-bucket runs clip and take two accumulated backward passes a step.
    """
    for kind in OURS:
        for stage in (1, 2):
            for cap, clip, micro in ((25.0, None, 1), (TINY, 0.05, 2)):
                what = f"W={world} {kind} stage {stage} cap {cap} clip {clip} micro-batches {micro}"
                pair = Pair(rank, world, kind, stage, cap, clip, micro)
                pair.steps(4, what)
                y = [p.detach().clone() for p in pair.net.parameters()]
                pair.opt.eval()
                pair.ref_opt.eval()
                _close(pair.net, pair.ref, f"{what}: x in eval mode")
                pair.opt.train()
                pair.ref_opt.train()
                for a, b in zip(pair.net.parameters(), y):
                    assert torch.equal(a, b), f"{what}: train() after eval() changed y"
                pair.steps(2, what)


def _memory_and_traffic(rank, world):
    """Held elements per rank (2N/W + padding for AdamW), and collective volumes equal to DDP's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5)).double()
    total = sum(p.numel() for p in net.parameters())
    x = torch.randn(8, 40, dtype=torch.float64)
    ddp_volume = _ddp_allreduce_volume(net, x)
    out = {}
    for stage in (1, 2):
        opt = ZeroScheduleFree(net.parameters(), stage=stage, bucket_cap_mb=0.01)  # 1310 elements a bucket
        opt.train()
        def one_step():  # two micro-batches, the first without communication
            with opt.no_sync():
                net(x[:4]).square().mean().backward()
            net(x[4:]).square().mean().backward()
            opt.step()
        sent = _count_collectives(one_step)
        padded = sum(b.world * b.shard for b in opt.all_buckets())
        nb = len(opt.all_buckets())
        assert nb > 1 and padded - total < world * nb, (nb, padded, total)
        held = opt.held_numel()
        owned = sum(b.hi - b.lo for b in opt.all_buckets())
        assert held["state"] == 2 * owned and owned <= math.ceil(total / world) + nb, (held, owned, total)
        assert held["grad"] == owned and held["master"] == 0, held
        expected = {"reduce_scatter" if stage == 2 else "all_reduce": [padded, nb], "all_gather": [padded, nb],
                    "guard": [3, 1]}  # the core's one all-reduce of (non-finite, eval mode, no CPU kernel) flags
        n_params = len(list(net.parameters()))  # plus one of "had a gradient" flags, one per param
        expected.setdefault("all_reduce", [0, 0])
        expected["all_reduce"] = [expected["all_reduce"][0] + n_params, expected["all_reduce"][1] + 1]
        if world == 1:  # nothing to reduce, gather or agree on
            expected = {}
        assert sent == expected, (sent, expected)
        assert abs(padded - ddp_volume) < world * nb, (padded, ddp_volume)
        out[stage] = {"state": held["state"], "grad": held["grad"], "total": total}
        opt.zero_grad()
        for h in opt._hooks:
            h.remove()
    return out


def _ddp_allreduce_volume(net, x):
    """Elements DDP all-reduces in one step, counted by a comm hook on a copy of ``net``."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    counted = [0]

    def hook(state, bucket):
        counted[0] += bucket.buffer().numel()
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

    ddp = DDP(copy.deepcopy(net))
    ddp.register_comm_hook(None, hook)
    ddp(x).square().mean().backward()
    return counted[0]


def _count_collectives(fn):
    """{name: [elements, calls]} of the ZeRO collectives run by ``fn`` (wrapping the functions)."""
    sent = {}

    def wrap(name, f, arg):
        def counted(*args, **kwargs):
            entry = sent.setdefault("guard" if args[arg].numel() == 3 else name, [0, 0])
            entry[0] += args[arg].numel()
            entry[1] += 1
            return f(*args, **kwargs)
        return counted

    saved = zbuckets._reduce_scatter, zbuckets._all_gather, dist.all_reduce
    zbuckets._reduce_scatter = wrap("reduce_scatter", saved[0], 1)
    zbuckets._all_gather = wrap("all_gather", saved[1], 0)
    dist.all_reduce = wrap("all_reduce", saved[2], 0)
    try:
        fn()
    finally:
        zbuckets._reduce_scatter, zbuckets._all_gather, dist.all_reduce = saved
    return sent


def _exports_errors_bf16(rank, world, tmp):
    """eval exports leave y bitwise; bad constructions fail on every rank; bf16 keeps fp32 masters."""
    pair = Pair(rank, world, "adamw", 2, TINY, micro=2, no_sync=True)
    pair.steps(3, "exports (2 backward passes a step, the first in no_sync())")
    y = {n: p.detach().clone() for n, p in pair.net.named_parameters()}
    pair.ref_opt.eval()
    x = {n: p.detach().clone() for n, p in pair.ref.named_parameters()}
    pair.ref_opt.train()
    with eval_weights(pair.net, pair.opt):
        for n, p in pair.net.named_parameters():
            torch.testing.assert_close(p.detach(), x[n], rtol=RTOL, atol=ATOL)
    sd = eval_state_dict(pair.net, pair.opt, full=True)
    save_eval_weights(pair.net, pair.opt, f"{tmp}/x.safetensors")
    handle = register_eval_state_dict_hook(pair.net, pair.opt)
    hooked = pair.net.state_dict()
    handle.remove()
    for n, p in pair.net.named_parameters():
        assert torch.equal(p, y[n]), f"export changed y of {n}"
        torch.testing.assert_close(hooked[n], x[n], rtol=RTOL, atol=ATOL)
    if rank == 0:
        from safetensors.torch import load_file
        saved = load_file(f"{tmp}/x.safetensors")
        for n in x:
            torch.testing.assert_close(sd[n], x[n], rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(saved[n], x[n], rtol=RTOL, atol=ATOL)
    else:
        assert sd == {}, sd.keys()

    # per-rank state_dict round trip, and every rank slicing the consolidated single-process dict
    saved = (copy.deepcopy(pair.opt.state_dict()), {n: p.detach().clone() for n, p in pair.net.named_parameters()})
    full = [pair.opt.consolidated_state_dict()]
    dist.broadcast_object_list(full, src=0)
    fresh = Net()
    fresh.load_state_dict(saved[1])
    fresh_opt = ZeroScheduleFree(_groups(fresh, "adamw"), stage=1, **HP["adamw"])
    fresh_opt.load_state_dict(full[0])
    assert fresh_opt.train_mode and fresh_opt.param_groups[0]["k"] == 3
    pair.steps(2, "before the per-rank reload")
    pair.net.load_state_dict(saved[1])
    pair.opt.load_state_dict(saved[0])
    for net, opt in ((pair.net, pair.opt), (fresh, fresh_opt)):
        for k in (3, 4):
            _backward(net, k, rank, world)
            opt.step()
            opt.zero_grad()
        _close(net, pair.ref, "after reloading the state dict")
    with pytest.raises(ValueError, match="saved by rank 0 of 2"):
        pair.opt.load_state_dict(copy.deepcopy(saved[0]) | {"zero": {**saved[0]["zero"], "world_size": 2, "rank": 0,
                                                                     "layout": [[1]]}})
    pair.net.l1.weight.data = pair.net.l1.weight.data.clone()
    with pytest.raises(RuntimeError, match=r"parameter of shape \(7, 5\) no longer lives"):
        pair.opt.step()

    # a frozen param shares the bucket: the hooks still launch it during backward, it never moves
    frozen = Net()
    frozen.l1.weight.requires_grad_(False)
    before = frozen.l1.weight.detach().clone()
    opt = ZeroScheduleFree(frozen.parameters())
    opt.train()
    _backward(frozen, 0, rank, world)
    assert len(opt.all_buckets()) == 1 and opt.all_buckets()[0]._local is None, "not launched in backward"
    opt.step()
    assert torch.equal(frozen.l1.weight, before)

    # a NaN in rank 1's gradient lands in one rank's shard; every rank agrees to skip the step
    frozen.l1.bias.register_hook(lambda g: g.fill_(float("nan")) if rank == 1 else g)
    y_before = [p.detach().clone() for p in frozen.parameters()]
    _backward(frozen, 1, rank, world)
    opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(a, b) for a, b in zip(frozen.parameters(), y_before))

    wrong = nn.Linear(5, 7 if rank == 0 else 6).double()
    with pytest.raises(ValueError, match=r"param 0 of group 0 is \(6, 5\) torch.float64 on rank 1"):
        ZeroScheduleFree(wrong.parameters())
    with pytest.raises(ValueError, match="group 0 has 1 params on rank 1 but 2 on rank 0"):
        ZeroScheduleFree(list(nn.Linear(5, 7, bias=rank == 0).parameters()))
    with pytest.raises(ValueError, match="Invalid ZeRO stage: 3"):
        ZeroScheduleFree(Net().parameters(), stage=3)
    with pytest.raises(RuntimeError, match="eval mode"):
        ZeroScheduleFree(Net().parameters()).step()
    with pytest.raises(RuntimeError, match="cannot add param groups after construction"):
        ZeroScheduleFree(Net().parameters()).add_param_group({"params": [nn.Parameter(torch.zeros(2))]})

    # bf16 + fp32 params in one group: two buckets, fp32 masters. Oracle: every rank sees the full
    # batch (so the averaged bf16 gradient is exact) and a single-process optimizer steps fp32
    # copies of the params with those gradients; the bf16 params are the rounded copies.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7).bfloat16(), nn.Tanh(), nn.Linear(7, 3))
    emu = copy.deepcopy(net)
    master = [p.detach().float().clone() for p in emu.parameters()]
    emu_opt = sf_dist.AdamWScheduleFree(master, lr=0.01)
    opt = ZeroScheduleFree(net.parameters(), lr=0.01)
    emu_opt.train()
    opt.train()
    assert [b.master.dtype for b in opt.all_buckets()] == [torch.float32, torch.float32]
    assert opt.held_numel()["master"] == opt.all_buckets()[0].hi - opt.all_buckets()[0].lo
    for k in range(5):
        xb, yb = (t.float() for t in _data(k))
        for m in (net, emu):
            nn.functional.mse_loss(m[2](m[1](m[0](xb.bfloat16()).float())), yb).backward()
        for mp, p in zip(master, emu.parameters()):
            mp.grad, p.grad = p.grad.float(), None
        emu_opt.step()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for mp, p in zip(master, emu.parameters()):
                p.copy_(mp)
    for b, (mw, mb) in zip(opt.all_buckets(), (master[:2], master[2:])):
        flat = torch.cat([mw.reshape(-1), mb.reshape(-1)])[b.lo:b.hi]
        torch.testing.assert_close(b.master, flat, rtol=RTOL, atol=ATOL, msg=lambda m: f"fp32 master: {m}")
    for a, c in zip(net.parameters(), emu.parameters()):
        assert torch.equal(a, c), "params are not the master rounded to their dtype"
    with torch.no_grad():  # weights loaded into the model after the optimizer was built are kept
        net[0].weight.add_(1.0)
    b = opt.all_buckets()[0]
    opt.eval()
    opt.train()
    torch.testing.assert_close(b.master, torch.cat([net[0].weight.reshape(-1), net[0].bias])[b.lo:b.hi].float())
    y16 = [p.detach().clone() for p in net.parameters()]
    with eval_weights(net, opt):
        pass
    assert all(torch.equal(a, c) for a, c in zip(net.parameters(), y16)), "bf16 y changed by eval/train"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_reference(world, tmp_path):
    """Equality at W=1..4, AdamW/SGD/RAdam, stages 1 and 2; memory + traffic at 1, 2, 4; exports at 2."""
    run_distributed(_check_world, world, str(tmp_path), timeout=300)


def _check_world(rank, world, tmp):
    _equality(rank, world)
    if world in (1, 2, 4):
        _memory_and_traffic(rank, world)
    if world == 2:
        _exports_errors_bf16(rank, world, tmp)


# ---- checkpoints ---------------------------------------------------------------------------------
CKPT_CASES = [("adamw", 2), ("sgd", 1), ("radam", 2)]


def _save_phase(rank, world, tmp, leg):
    """Run (or resume) each case, check it against the uninterrupted reference, save for the next leg."""
    out = {}
    for kind, stage in CKPT_CASES:
        what = f"{kind} stage {stage} leg {leg} at W={world}"
        pair = Pair(rank, world, kind, stage, TINY)
        if leg > 0:
            _replay_reference(pair, 3 * leg)  # the reference runs the earlier legs uninterrupted
            extra = sf_dist.checkpoint.load(f"{tmp}/{kind}{leg - 1}", pair.net, pair.opt)
            assert extra == {"k": 3 * leg}, extra
            assert pair.opt.param_groups[0]["k"] == 3 * leg
            _close(pair.net, pair.ref, f"{what}: y right after load")
            pair.opt.eval()
            pair.ref_opt.eval()
            _close(pair.net, pair.ref, f"{what}: x right after load")
            pair.opt.train()
            pair.ref_opt.train()
        pair.steps(3, what)
        sf_dist.checkpoint.save(f"{tmp}/{kind}{leg}", pair.net, pair.opt, extra={"k": pair.k})
        full = pair.opt.consolidated_state_dict()
        if rank == 0:
            out[kind] = _check_consolidated(full, pair, kind, what)
        else:
            assert full == {}
    return out


def _replay_reference(pair, n):
    for k in range(n):
        _backward(pair.ref, k, 0, 1)
        pair.ref_opt.step()
        pair.ref_opt.zero_grad()
    pair.k = n


def _check_consolidated(full, pair, kind, what):
    """The consolidated dict loads into the single-process class and steps on like the reference."""
    net = Net()
    net.load_state_dict({n: p.detach() for n, p in pair.net.named_parameters()})
    # rank 0 alone: "ignore" keeps the core's step from an all-reduce the other ranks never join
    opt = OURS[kind](_groups(net, kind), nonfinite="ignore", **HP[kind])
    opt.load_state_dict(full)
    ref_state = pair.ref_opt.state_dict()["state"]
    for i, s in ref_state.items():
        for key in s:
            torch.testing.assert_close(full["state"][i][key], s[key], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{what}: consolidated state {i}.{key}: {m}")
    _backward(net, pair.k, 0, 1)
    opt.step()
    _backward(pair.ref, pair.k, 0, 1)
    ref_copy = {n: p.detach().clone() for n, p in pair.ref.named_parameters()}
    saved = copy.deepcopy(pair.ref_opt.state_dict())
    pair.ref_opt.step()
    _close(net, pair.ref, f"{what}: single-process step from the consolidated dict")
    pair.ref.load_state_dict(ref_copy)  # undo, so the next leg's reference replays cleanly
    pair.ref_opt.load_state_dict(saved)
    pair.ref_opt.zero_grad()
    return len(full["state"])


def test_checkpoint_reshards_4_to_2_to_3(tmp_path):
    """sf_dist.checkpoint at W=4, resumed at W=2, saved, resumed at W=3; every leg matches the reference."""
    run_distributed(_save_phase, 4, str(tmp_path), 0, timeout=300)
    run_distributed(_save_phase, 2, str(tmp_path), 1, timeout=300)
    counts = run_distributed(_save_phase, 3, str(tmp_path), 2, timeout=300)
    assert counts[0] == {kind: 5 for kind, _ in CKPT_CASES}  # z (and moments) for all 5 params


class Branchy(nn.Module):
    """``side`` is used only where ``take`` is true (a branch one rank does not take)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Linear(5, 3).double()
        self.side = nn.Linear(5, 3).double()

    def forward(self, x, take):
        return self.body(x) + self.side(x) if take else self.body(x)


def _branch_on_some_ranks(rank, world):
    """``side`` gets a gradient on rank 0 only: every rank must apply the DDP average (rank 0's
    gradient plus zeros, over W), with one bucket per param (it used to hang) and the default one
    (it used to leave ``side`` untrained)."""
    moved = {}
    for stage in (1, 2):
        for cap in (25.0, TINY):
            net, ref = Branchy(), Branchy()
            opt = ZeroScheduleFree(net.parameters(), stage=stage, bucket_cap_mb=cap, lr=0.05, warmup_steps=2)
            ref_opt = schedulefree.AdamWScheduleFree(ref.parameters(), lr=0.05, warmup_steps=2)
            opt.train()
            ref_opt.train()
            start = ref.side.weight.detach().clone()
            for k in range(3):
                x, y = _data(k)
                n = BATCH // world
                nn.functional.mse_loss(net(x[rank * n:(rank + 1) * n], rank == 0), y[rank * n:(rank + 1) * n]).backward()
                opt.step()
                opt.zero_grad()
                # the reference: the mean over ranks of each rank's loss, rank 0 alone through ``side``
                loss = sum(nn.functional.mse_loss(ref(x[r * n:(r + 1) * n], r == 0), y[r * n:(r + 1) * n])
                           for r in range(world)) / world
                loss.backward()
                ref_opt.step()
                ref_opt.zero_grad()
            _close(net, ref, f"W={world} stage {stage} cap {cap}: a param with a gradient on rank 0 only")
            moved[(stage, cap)] = (net.side.weight.detach() - start).abs().max().item()
    return moved


def test_param_with_a_gradient_on_some_ranks_only_is_averaged_and_never_hangs():
    moved = run_distributed(_branch_on_some_ranks, 2, timeout=60)[0]
    assert min(moved.values()) > 1e-3, moved  # trained, as in the reference
