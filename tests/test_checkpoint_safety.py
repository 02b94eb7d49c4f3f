"""Checkpoints and exports under attack and faults: crafted files run no code, kills lose nothing,
full and read-only disks fail on every rank in step, damaged or mismatched checkpoints are refused."""

import json
import logging
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from dist import run_distributed

import sf_dist
from sf_dist import checkpoint
from sf_dist.checkpoint.manifest import MANIFEST, crc32_file
from sf_dist.weights import eval_state_dict, eval_weights, save_eval_weights


class Payload:
    """Pickles as a call of os.system: loading it anywhere unrestricted creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def make_model(width=5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2)).double()


def trained(steps=2, groups=1):
    model = make_model()
    params = list(model.parameters())
    spec = params if groups == 1 else [{"params": params[0::2]}, {"params": params[1::2], "lr": 1e-2}]
    opt = sf_dist.AdamWScheduleFree(spec, lr=1e-3, warmup_steps=1)
    more(model, opt, steps)
    return model, opt


def more(model, opt, steps):
    opt.train()
    for k in range(steps):
        g = torch.Generator().manual_seed(k + 10 * opt.param_groups[0]["k"])
        x = torch.randn(8, 4, generator=g, dtype=torch.float64).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def forge_checksums(path):
    """What an attacker can do: rewrite the manifest's sizes and CRCs to match edited files."""
    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    manifest["files"] = {n: crc32_file(os.path.join(path, n)) for n in os.listdir(path) if n != MANIFEST}
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f)


# ---- security --------------------------------------------------------------------------------------
def test_crafted_files_run_no_code_and_name_the_refused_global(tmp_path, caplog):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    import torch.distributed.checkpoint as dcp
    marker = tmp_path / "PWNED"
    root = tmp_path / "ckpt"
    model, opt = trained()
    checkpoint.save(root / "step_1", model, opt, extra={"step": 1})
    more(model, opt, 1)

    # a non-tensor value of the optimizer (DCP stores it as a pickle) carrying a payload
    bytes_evil = root / "step_5"
    checkpoint.save(bytes_evil, model, opt, extra={"step": 5})
    optim_sd = get_optimizer_state_dict(model, opt)
    optim_sd["param_groups"][0]["lr"] = Payload(marker)
    for name in os.listdir(bytes_evil):
        if name.endswith(".distcp") or name == ".metadata":
            os.remove(bytes_evil / name)
    dcp.save({"model": get_model_state_dict(model), "optim": optim_sd}, checkpoint_id=str(bytes_evil))
    forge_checksums(bytes_evil)
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=r"optim\.param_groups\.0\.lr.*(posix|os)\.system"):
        checkpoint.load(bytes_evil, *trained(0))
    assert not marker.exists()

    # a crafted DCP .metadata: latest() only looks, load() would unpickle it
    meta_evil = root / "step_9"
    shutil.copytree(root / "step_1", meta_evil)
    (meta_evil / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    forge_checksums(meta_evil)
    with open(meta_evil / MANIFEST) as f:
        manifest = json.load(f)
    manifest["step"] = 99  # the newest, if it were trusted
    (meta_evil / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="sf_dist.checkpoint"):
        found = checkpoint.latest(root)
    assert not marker.exists()
    assert found == str(root / "step_5")  # step_9 is skipped; step_5's payload is in its data, refused at load
    assert "refused to load global posix.system" in caplog.text or "refused to load global os.system" in caplog.text
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=r"refused to load global (posix|os)\.system"):
        checkpoint.load(meta_evil, *trained(0))
    assert not marker.exists()

    # extra is data: an object is refused at save, with the type and the fix, and nothing is written
    with pytest.raises(TypeError, match=r"extra\['hook'\] is a builtins\.object.*Convert it first"):
        checkpoint.save(root / "step_2", model, opt, extra={"hook": object()})
    assert not (root / "step_2").exists() and not (root / "step_2.tmp").exists()
    with pytest.raises(TypeError, match=r"key 3 is a int"):
        checkpoint.save(root / "step_2", model, opt, extra={3: "x"})
    rng = torch.get_rng_state()
    checkpoint.save(root / "step_3", model, opt, extra={"rng": rng, "pos": (3, 4.5, None), "nested": [{"a": True}]})
    json.loads((root / "step_3" / "extra_0.json").read_text())  # plain JSON
    extra = checkpoint.load(root / "step_3", *trained(0))
    assert torch.equal(extra["rng"], rng) and extra["pos"] == (3, 4.5, None) and extra["nested"] == [{"a": True}]

    # the DeepSpeed exporter: weights_only=True with stand-ins for DeepSpeed's own records only
    from sf_dist.export import main as export_main
    ds = tmp_path / "ds" / "global_step1"
    ds.mkdir(parents=True)
    torch.save({"module": {}, "buffer_names": []}, ds / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": Payload(marker)}, ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(pickle.UnpicklingError, match=r"refused to load global (posix|os)\.system"):
        export_main([str(ds), str(tmp_path / "x.safetensors")])
    assert not marker.exists()


# ---- kills -------------------------------------------------------------------------------------------
def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_on_call(owner, name, nth=1, when=lambda *a, **k: True):
    original, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:
                _die()
        return original(*args, **kwargs)
    setattr(owner, name, wrapper)


def _killed_save(kind, phase, target, model, opt):
    """In a forked child: arm the kill for ``phase``, then save over the existing export/checkpoint."""
    import sf_dist.safetensors_stream as stream
    from torch.distributed.checkpoint import FileSystemWriter
    if kind == "export":
        if phase == "header":
            _kill_on_call(stream.SafetensorsWriter, "write")
        elif phase == "tensors":
            _kill_on_call(stream.SafetensorsWriter, "write", nth=3)
        elif phase == "rename":
            _kill_on_call(os, "replace")
        save_eval_weights(model, opt, target)
    else:
        if phase == "shards":
            _kill_on_call(FileSystemWriter, "finish")  # data written, no .metadata yet
        elif phase == "checksums":
            _kill_on_call(checkpoint, "crc32_file", nth=2)
        elif phase == "manifest":
            _kill_on_call(os, "replace")  # the manifest's temporary is written, not renamed
        elif phase == "first_rename":  # before the old checkpoint is moved aside
            _kill_on_call(os, "rename", when=lambda src, dst: str(src) == target)
        elif phase == "between_renames":  # the old one is moved aside, the new one not yet in place
            _kill_on_call(os, "rename", when=lambda src, dst: str(dst) == target)
        elif phase == "cleanup":
            _kill_on_call(shutil, "rmtree", when=lambda p, *a, **k: str(p).endswith(".old"), nth=2)
        checkpoint.save(target, model, opt, extra={"step": opt.param_groups[0]["k"]})
    os._exit(0)


EXPORT_PHASES = ["header", "tensors", "rename"]
CKPT_PHASES = ["shards", "checksums", "manifest", "first_rename", "between_renames", "cleanup"]


def test_sigkill_in_every_phase_keeps_the_previous_export_and_checkpoint(tmp_path):
    model, opt = trained()
    export, root = str(tmp_path / "x.safetensors"), tmp_path / "ckpt"
    save_eval_weights(model, opt, export)
    good_x = open(export, "rb").read()
    checkpoint.save(root / "last", model, opt, extra={"step": 2})
    more(model, opt, 1)  # the run moved on: the killed saves would write step 3
    fork = multiprocessing.get_context("fork")
    for kind, phases in (("export", EXPORT_PHASES), ("checkpoint", CKPT_PHASES)):
        for phase in phases:
            target = export if kind == "export" else str(root / "last")
            child = fork.Process(target=_killed_save, args=(kind, phase, target, model, opt))
            child.start()
            child.join(60)
            assert child.exitcode == -signal.SIGKILL, (kind, phase, child.exitcode)
            if kind == "export":
                assert open(export, "rb").read() == good_x, phase  # the previous file, byte for byte
                load_file(export)
                continue
            found = checkpoint.latest(root)
            step = checkpoint.load(found, *trained(0))["step"]
            if phase in ("first_rename", "between_renames", "cleanup"):
                assert step == 3, (phase, found)  # the new save was complete: the newest is taken
            else:
                assert (found, step) == (str(root / "last"), 2), (phase, found, step)
            assert checkpoint.load(root / "last", *trained(0))["step"] == step, phase  # by its name too
            checkpoint.save(root / "last", *trained(2), extra={"step": 2})  # a clean save clears leftovers
            assert sorted(os.listdir(root)) == ["last"], (phase, os.listdir(root))
    # the next save into a directory sweeps our temporaries of killed saves there, and nothing else
    mine = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert len(mine) == 1, mine  # the last killed export's temporary (each export swept the one before)
    (tmp_path / ".x.safetensors.notes.tmp").write_text("a user's file")  # not a name mkstemp gives
    save_eval_weights(model, opt, export)
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == [".x.safetensors.notes.tmp"]
    child = fork.Process(target=_killed_save, args=("checkpoint", "shards", str(root / "other"), model, opt))
    child.start()
    child.join(60)
    (root / "notes.tmp").mkdir()
    (root / "notes.tmp" / "todo.txt").write_text("a user's directory")
    assert sorted(os.listdir(root)) == ["last", "notes.tmp", "other.tmp"], os.listdir(root)
    checkpoint.save(root / "last", model, opt, extra={"step": 3})
    assert sorted(os.listdir(root)) == ["last", "notes.tmp"], os.listdir(root)


def test_save_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    model, opt = trained()
    target = tmp_path / "runs"
    (target / "step_1").mkdir(parents=True)
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"'notes\.txt', 'step_1'.*not an sf_dist checkpoint"):
        checkpoint.save(target, model, opt)
    assert (target / "notes.txt").read_text() == "keep me" and (target / "step_1").is_dir()
    (target / "file").write_text("")
    with pytest.raises(FileExistsError, match="is a file"):
        checkpoint.save(target / "file", model, opt)


def test_corrupted_bytes_are_caught_by_checksum(tmp_path):
    model, opt = trained()
    path = tmp_path / "ckpt"
    checkpoint.save(path, model, opt)
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4] = b"\x00\x00\xf6\x42"  # 123.0 as float32, in a tensor
    shard.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"is corrupt: __0_0\.distcp has \d+ bytes with CRC-32"):
        checkpoint.load(path, *trained(0))
    with pytest.raises(RuntimeError, match=r"__0_0\.distcp has \d+ bytes with CRC-32"):
        checkpoint.verify(path)


# ---- silently wrong loads -------------------------------------------------------------------------
def test_latest_orders_by_step_and_falls_back_past_damaged_metadata(tmp_path, caplog):
    model, opt = trained(1)
    checkpoint.save(tmp_path / "step_9", model, opt)
    more(model, opt, 1)
    checkpoint.save(tmp_path / "step_10", model, opt)
    assert checkpoint.latest(tmp_path) == str(tmp_path / "step_10")  # by step, not "step_9" > "step_10"
    meta = tmp_path / "step_10" / ".metadata"
    full = meta.read_bytes()
    for damaged in (full[: len(full) // 2], b""):
        meta.write_bytes(damaged)
        with caplog.at_level(logging.WARNING, logger="sf_dist.checkpoint"):
            assert checkpoint.latest(tmp_path) == str(tmp_path / "step_9")
        assert "skipping" in caplog.text and "step_10" in caplog.text
    forge_checksums(tmp_path / "step_10")  # even with matching sizes and CRCs, a truncated pickle is skipped
    assert checkpoint.latest(tmp_path) == str(tmp_path / "step_9")


def test_mismatched_groups_are_refused_and_dtype_changes_logged(tmp_path, caplog):
    model, opt = trained(groups=2)
    checkpoint.save(tmp_path / "two", model, opt)
    with pytest.raises(RuntimeError, match=r"2 param groups of \[2, 2\] params, this optimizer 1 of \[4\]"):
        checkpoint.load(tmp_path / "two", *trained(0))
    model, opt = trained()
    model.float()
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=1e-3, warmup_steps=1)
    more(model, opt, 1)
    checkpoint.save(tmp_path / "fp32", model, opt)
    low = make_model().bfloat16()
    with caplog.at_level(logging.WARNING, logger="sf_dist.checkpoint"):
        checkpoint.load(tmp_path / "fp32", low, sf_dist.AdamWScheduleFree(low.parameters(), lr=1e-3, warmup_steps=1))
    assert "4 tensors are cast to the model's dtype on load: 0.bias (torch.float32 -> torch.bfloat16)" in caplog.text


# ---- W=2: per-rank extra, full and read-only disks, a dtype safetensors cannot store ------------------
@pytest.fixture
def small_mounts(tmp_path):
    """A full 64 KiB tmpfs and a read-only one (root only), or (None, None, why) where mounting is not allowed."""
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    for where, opts in ((full, "size=64k"), (ro, "size=64k,ro")):
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", str(full)], capture_output=True)
            yield None, None, f"cannot mount a small tmpfs here (needs root and mount rights): {done.stderr.strip()}"
            return
    try:
        yield str(full), str(ro), None
    finally:
        for where in (full, ro):
            subprocess.run(["umount", str(where)], capture_output=True)


def _fsdp2(width):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = make_model(width)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=1e-3, warmup_steps=1)
    more(model, opt, 1)
    return model, opt


def _still_paired(rank):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == 3.0, f"the next collective paired with a leftover one: {t.item()}"


def _faults_worker(rank, world, tmp, full, ro):
    out = {"gather": _gather_faults(rank, tmp)}
    model, opt = _fsdp2(5)
    rng = torch.get_rng_state()
    checkpoint.save(f"{tmp}/ckpt", model, opt, extra={"rank": rank, "rng": rng})
    model2, opt2 = _fsdp2(5)
    extra = checkpoint.load(f"{tmp}/ckpt", model2, opt2)
    assert extra["rank"] == rank and torch.equal(extra["rng"], rng), "extra is per rank"

    big, big_opt = _fsdp2(4000)  # 250 KB of float64 weights: more than the 64 KiB disk
    cases = {} if full is None else {
        "export to a full disk": lambda: save_eval_weights(big, big_opt, f"{full}/x.safetensors"),
        "export to a read-only disk": lambda: save_eval_weights(big, big_opt, f"{ro}/x.safetensors"),
        "checkpoint to a full disk": lambda: checkpoint.save(f"{full}/ckpt", big, big_opt),
        "checkpoint to a read-only disk": lambda: checkpoint.save(f"{ro}/ckpt", big, big_opt),
    }
    odd = make_model()
    odd.register_buffer("phase", torch.zeros(3, dtype=torch.complex64))
    odd_opt = sf_dist.AdamWScheduleFree(odd.parameters(), lr=1e-3)
    more(odd, odd_opt, 1)
    cases["a buffer dtype safetensors cannot store"] = lambda: save_eval_weights(odd, odd_opt, f"{tmp}/odd.safetensors")
    for what, action in cases.items():
        start = time.monotonic()
        try:
            action()
        except Exception as e:  # noqa: BLE001 - the type is what is checked
            out[what] = (type(e).__name__, str(e), time.monotonic() - start)
        else:
            raise AssertionError(f"{what}: rank {rank} did not raise")
        _still_paired(rank)
    return out


def test_faults_reach_every_rank_in_step(tmp_path, small_mounts):
    """Full and read-only disks, a dtype safetensors cannot store, and an OOM on one rank mid-gather
    (FSDP2, FSDP1, ZeroScheduleFree): every rank raises with the cause, in step; per-rank extra; FSDP1
    float64 exports are bitwise. One spawn."""
    full, ro, no_mounts = small_mounts
    ranks = run_distributed(_faults_worker, 2, str(tmp_path), full, ro, timeout=180)
    _check_gather_faults([result.pop("gather") for result in ranks])
    for what in ranks[0]:
        for rank, result in enumerate(ranks):
            kind, message, seconds = result[what]
            assert seconds < 10, (what, rank, seconds)
            assert kind != "CheckpointException", (what, message)
            if "full" in what:  # torch's own writer reports ENOSPC as "unexpected pos": the free space is named
                free = re.search(r"\((\d+) bytes free on the disk", message)
                assert "No space left" in message or (free and int(free.group(1)) < 8192), (what, rank, message)
            elif "read-only" in what:
                assert "Read-only file system" in message, (what, rank, message)
            else:
                assert "complex64" in message and "safetensors cannot store" in message, (what, rank, message)
    # rank 0 raised the OSError itself; rank 1 was told which rank failed and why
    if no_mounts is None:
        assert ranks[1]["export to a full disk"][1].startswith("rank 0 could not write")
    # saved by 2 ranks, loaded by 1: rank 0's extra, with a warning
    model, opt = make_model(), None
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=1e-3, warmup_steps=1)
    assert checkpoint.load(tmp_path / "ckpt", model, opt)["rank"] == 0
    if no_mounts is not None:
        pytest.skip(f"the rest passed; full and read-only disks not tried: {no_mounts}")


# ---- FSDP2: rank 1 SIGKILLed while it streams its shards to rank 0 -------------------------------------
def _rank1_killed_mid_export(rank, world, tmp):
    model, opt = _fsdp2(64)
    target = f"{tmp}/x.safetensors"
    save_eval_weights(model, opt, target)
    good = open(target, "rb").read() if rank == 0 else None
    more(model, opt, 1)
    if rank == 1:
        _kill_on_call(dist, "send", nth=3)  # after two tensors went out
    try:
        save_eval_weights(model, opt, target)
    except Exception as e:  # noqa: BLE001 - rank 0 sees the dead peer, whatever gloo calls it
        verdict = {"error": f"{type(e).__name__}: {e}"[:200], "intact": open(target, "rb").read() == good,
                   "leftovers": sorted(f for f in os.listdir(tmp) if f.endswith(".tmp"))}
        with open(f"{tmp}/verdict.json", "w") as f:
            json.dump(verdict, f)
        os._exit(0)
    raise AssertionError("rank 0 finished an export whose rank 1 was killed")


def test_export_with_rank1_killed_keeps_the_previous_file(tmp_path):
    from dist import RankFailed
    with pytest.raises(RankFailed, match="returned no result"):
        run_distributed(_rank1_killed_mid_export, 2, str(tmp_path), timeout=60)
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["intact"] and verdict["leftovers"] == [], verdict


# ---- a failure on one rank while x is gathered reaches every rank, still in step ---------------------
class _Fault:
    """While ``armed``, make ``owner.name`` raise MemoryError once on ``rank`` in each run of a function
    wrapped by ``around``: an OOM in the middle of the export gather, on that rank only."""

    def __init__(self, owner, name, rank):
        self.name, self.rank, self.armed, self.active = name, rank, False, False
        original = getattr(owner, name)

        def failing(*args, **kwargs):
            if self.active and dist.get_rank() == self.rank:
                self.active = False  # one OOM, then the agreement that reports it runs normally
                raise MemoryError(f"injected OOM in {name} on rank {self.rank}")
            return original(*args, **kwargs)
        setattr(owner, name, failing)

    def around(self, owner, name):
        original = getattr(owner, name)

        def scoped(*args, **kwargs):
            self.active = self.armed
            try:
                return original(*args, **kwargs)
            finally:
                self.active = False
        setattr(owner, name, scoped)


def _fsdp1_float64_is_bitwise(rank, model, opt, path):
    """FSDP1 keeps float64 exports bitwise (no float32 gather buffers)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    sd = eval_state_dict(model, opt)
    save_eval_weights(model, opt, path)
    with eval_weights(model, opt), FSDP.summon_full_params(model, writeback=False):
        x = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        saved = load_file(path)
        assert len(x) == 4
        for name, want in x.items():
            assert sd[name].dtype == torch.float64 and torch.equal(sd[name], want), name
            assert torch.equal(saved[name], want), name


def _gather_faults(rank, tmp):
    """Inject each OOM during save_eval_weights and eval_state_dict; return (type, message, seconds) per case."""
    import sf_dist.weights as weights
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    fsdp1 = FSDP(make_model(), use_orig_params=True, device_id=torch.device("cpu"),
                 auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))
    fsdp1_opt = sf_dist.AdamWScheduleFree(fsdp1.parameters(), lr=1e-3, warmup_steps=1)
    more(fsdp1, fsdp1_opt, 3)
    _fsdp1_float64_is_bitwise(rank, fsdp1, fsdp1_opt, f"{tmp}/fsdp1.safetensors")
    plain = make_model()
    zero_opt = sf_dist.ZeroScheduleFree(plain.parameters(), lr=1e-3, warmup_steps=1)
    more(plain, zero_opt, 1)
    backends = {"fsdp2": _fsdp2(5), "fsdp1": (fsdp1, fsdp1_opt), "zero": (plain, zero_opt)}
    contiguous = _Fault(torch.Tensor, "contiguous", rank=1)  # rank 1 copying its rows / shards out
    contiguous.around(weights, "gather_x")
    allocate = _Fault(torch, "empty", rank=0)  # rank 0 allocating the whole tensor
    allocate.around(weights, "gather_x")
    clone = _Fault(torch.Tensor, "clone", rank=1)  # ZeroScheduleFree: rank 1 saving y before its swap
    clone.around(sf_dist.ZeroScheduleFree, "eval")
    out = {}
    for kind, (model, opt) in backends.items():
        faults = {"zero": [clone]}.get(kind, [contiguous, allocate])
        y = [p.detach().clone() for p in opt.param_groups[0]["params"]]
        for fault in faults:
            for export in ("save_eval_weights", "eval_state_dict"):
                call = (lambda: save_eval_weights(model, opt, f"{tmp}/{kind}.safetensors")) \
                    if export == "save_eval_weights" else (lambda: eval_state_dict(model, opt))
                start, fault.armed = time.monotonic(), True
                try:
                    call()
                except Exception as e:  # noqa: BLE001 - the type is what is checked
                    out[kind, fault.name, export] = (type(e).__name__, str(e), time.monotonic() - start)
                else:
                    raise AssertionError(f"{kind} {export}: rank {rank} did not raise")
                fault.armed = False
                _still_paired(rank)
                assert opt.train_mode and all(torch.equal(a, b.detach()) for a, b in
                                              zip(y, opt.param_groups[0]["params"])), (kind, "y changed")
        save_eval_weights(model, opt, f"{tmp}/{kind}.safetensors")  # and the next export works
    return out


def _check_gather_faults(ranks):
    """Each injected OOM raised on both ranks within 10 s: its own MemoryError on the failing rank, a
    RuntimeError naming that rank and the cause on the other."""
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 10
    for key in ranks[0]:
        failing = 0 if key[1] == "empty" else 1
        for rank, (kind, message, seconds) in enumerate(result[key] for result in ranks):
            assert seconds < 10, (key, rank, seconds)
            assert f"injected OOM in {key[1]} on rank {failing}" in message, (key, rank, message)
            if rank == failing:
                assert kind == "MemoryError", (key, rank, kind)
            else:
                assert kind == "RuntimeError" and message.startswith(f"rank {failing} could not"), (key, message)


# ---- old pickled checkpoints: refused by load, migrated only when trusted -------------------------------
def _old_format_save(path, model, opt, extra):
    """The layout sf_dist wrote before its manifest (git show 783908e^:sf_dist/checkpoint.py): DCP with
    the pickled extra and optimizer class among the entries."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    opt.init_state()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
             "extra": pickle.dumps(extra), "optimizer_class": pickle.dumps(type(opt).__name__)}
    dcp.save(state, checkpoint_id=str(path), no_dist=True)


def test_old_pickled_checkpoints_migrate_only_when_trusted(tmp_path, capsys, monkeypatch):
    from sf_dist.checkpoint.migrate import main as migrate_main
    model, opt = trained()
    old, new = tmp_path / "old", tmp_path / "new"
    _old_format_save(old, model, opt, {"step": 2, "rng": torch.arange(3)})
    with pytest.raises(RuntimeError, match=rf"python -m sf_dist\.checkpoint\.migrate {old} NEW --trust-pickle"):
        checkpoint.load(old, *trained(0))
    with pytest.raises(SystemExit):
        migrate_main([str(old), str(new)])
    assert "--trust-pickle" in capsys.readouterr().err and not new.exists()
    marker = tmp_path / "PWNED"
    _old_format_save(tmp_path / "crafted", model, opt, Payload(marker))
    with pytest.raises(SystemExit):
        migrate_main([str(tmp_path / "crafted"), str(tmp_path / "crafted_new")])
    assert not marker.exists()  # not trusted: nothing unpickled
    migrate_main([str(old), str(new), "--trust-pickle"])
    fresh, fresh_opt = trained(0)
    extra = checkpoint.load(new, fresh, fresh_opt)
    assert extra["step"] == 2 and torch.equal(extra["rng"], torch.arange(3))
    checkpoint.verify(new)
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b) and torch.equal(fresh_opt.state[a]["z"], opt.state[b]["z"])
    assert fresh_opt.param_groups[0]["k"] == opt.param_groups[0]["k"] == 2
    from sf_dist.export import main as export_main  # it exports offline as a new checkpoint does
    export_main([str(new), str(tmp_path / "offline.safetensors")])
    save_eval_weights(model, opt, str(tmp_path / "live.safetensors"))
    live, offline = load_file(tmp_path / "live.safetensors"), load_file(tmp_path / "offline.safetensors")
    assert live.keys() == offline.keys() and all(torch.equal(offline[k], v) for k, v in live.items())
    from sf_dist.checkpoint import offline as streamed  # pieces it cannot read as bytes (2-D mesh blocks):
    monkeypatch.setattr(streamed, "_raw_bytes", lambda *args: None)  # whole tensors through dcp.load
    export_main([str(new), str(tmp_path / "whole.safetensors")])
    whole = load_file(tmp_path / "whole.safetensors")
    assert whole.keys() == live.keys() and all(torch.equal(whole[k], v) for k, v in live.items())
    more(model, opt, 1)  # and the migrated run continues exactly where the old one would
    more(fresh, fresh_opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
