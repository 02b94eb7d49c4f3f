"""``python -m sf_dist.export`` of sf_dist.checkpoint directories: bitwise the live job's
save_eval_weights on every backend, at W=2, in fp32 and float64, train and eval mode; and the
Hugging Face sharded layout, loaded by safetensors and by transformers' from_pretrained."""

import json
import multiprocessing
import os
import signal

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from dist import run_distributed

import sf_dist
from sf_dist import checkpoint
from sf_dist.checkpoint import offline as streamed
from sf_dist.export import main as export_main
from sf_dist.weights import save_eval_weights

BACKENDS = ["plain", "ddp", "zero", "zero_bf16", "fsdp2", "fsdp1"]


def make_model(dtype):
    """With a buffer the same on every rank (per-rank BatchNorm statistics would differ, and a
    checkpoint stores one rank's copy of a replicated buffer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 9), nn.LayerNorm(9), nn.Tanh(), nn.Linear(9, 3)).to(dtype)
    model.register_buffer("scale", torch.linspace(0.5, 1.5, 3, dtype=dtype))
    return model


def build(kind, dtype):
    """(model to train, optimizer) for one backend."""
    model = make_model(torch.bfloat16 if kind == "zero_bf16" else dtype)
    hp = dict(lr=0.02, warmup_steps=1, weight_decay=0.01)
    if kind.startswith("zero"):
        return model, sf_dist.ZeroScheduleFree(model.parameters(), **hp)
    if kind == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        model = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    return model, sf_dist.AdamWScheduleFree(model.parameters(), **hp)


def train(model, opt, rank, steps=3):
    opt.train()
    model.train()
    dtype = next(model.parameters()).dtype
    for k in range(steps):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(2, 8, 4, generator=g, dtype=torch.float64)[rank].to(dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


def _live_and_saved(rank, world, tmp):
    for dtype in (torch.float32, torch.float64):
        for kind in BACKENDS:
            if kind == "zero_bf16" and dtype == torch.float64:
                continue
            for mode in ("train", "eval"):
                name = f"{tmp}/{kind}_{str(dtype)[6:]}_{mode}"
                model, opt = build(kind, dtype)
                train(model, opt, 0 if kind == "plain" else rank)  # a plain module: replicas on the same data
                if mode == "eval":
                    opt.eval()
                save_eval_weights(model, opt, name + ".safetensors")
                checkpoint.save(name, model, opt)
    return True


def test_offline_export_equals_live_save_eval_weights_on_every_backend(tmp_path, monkeypatch):
    monkeypatch.setattr(streamed, "PIECE", 5)  # streamed in 5-element pieces that cross the ranks' slabs
    run_distributed(_live_and_saved, 2, str(tmp_path), timeout=240)
    cases = sorted(p for p in os.listdir(tmp_path) if not p.endswith(".safetensors"))
    assert len(cases) == 2 * (2 * len(BACKENDS) - 1), cases
    for case in cases:
        out = tmp_path / f"{case}.offline.safetensors"
        export_main([str(tmp_path / case), str(out)])
        live, offline = load_file(tmp_path / f"{case}.safetensors"), load_file(out)
        assert set(live) == set(offline), case
        for key, want in live.items():
            assert offline[key].dtype == want.dtype and torch.equal(offline[key], want), (case, key)
    # sharded output of the same export: the HF index and every shard
    shard_dir = tmp_path / "sharded"
    export_main([str(tmp_path / "fsdp2_float64_train"), str(shard_dir), "--max-shard-size", "300B"])
    index = json.loads((shard_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors", files
    merged = {}
    for f in files:
        merged.update(load_file(shard_dir / f))
    live = load_file(tmp_path / "fsdp2_float64_train.safetensors")
    assert set(merged) == set(live) and all(torch.equal(merged[k], v) for k, v in live.items())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in live.values())


def test_sharded_save_eval_weights_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    opt = sf_dist.AdamWScheduleFree(model.parameters(), lr=0.01, warmup_steps=1)
    opt.train()
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    out = tmp_path / "hf"
    config.save_pretrained(out)
    sf_dist.save_eval_weights(model, opt, out, max_shard_size="8KB")
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) >= 3 and "model.safetensors.index.json" in os.listdir(out), shards
    with sf_dist.eval_weights(model, opt):
        want = {k: v.clone() for k, v in model.state_dict().items()}
        logits = model(input_ids=ids).logits
    loaded = transformers.LlamaForCausalLM.from_pretrained(out)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert torch.equal(loaded(input_ids=ids).logits, logits)
    # re-exports killed in each phase: the directory loads as the old export or the new one, never a mix
    old = want
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    with sf_dist.eval_weights(model, opt):
        new = {k: v.clone() for k, v in model.state_dict().items()}
    (out / "notes.txt").write_text("a user's file")
    fork = multiprocessing.get_context("fork")
    for phase, expect in (("tensors", old), ("shards", old), ("index", old), ("cleanup", new)):
        child = fork.Process(target=_killed_sharded_export, args=(phase, model, opt, str(out)))
        child.start()
        child.join(60)
        assert child.exitcode == -signal.SIGKILL, (phase, child.exitcode)
        assert phase != "tensors" or any(f.endswith(".tmp") for f in os.listdir(out))  # swept at the next export
        loaded = transformers.LlamaForCausalLM.from_pretrained(out).state_dict()
        index = json.loads((out / "model.safetensors.index.json").read_text())
        by_index = {}
        for f in sorted(set(index["weight_map"].values())):
            by_index.update(load_file(out / f))
        for got in (loaded, by_index):
            assert all(torch.equal(got[k], expect[k]) for k in by_index), phase
    sf_dist.save_eval_weights(model, opt, out, max_shard_size="8KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(os.listdir(out)) == sorted({"config.json", "notes.txt", "model.safetensors.index.json",
                                              *index["weight_map"].values()}), os.listdir(out)
    # a second, unsharded export into the same directory replaces the shards and drops the index
    sf_dist.save_eval_weights(model, opt, out, max_shard_size="5GB")
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]


def _killed_sharded_export(phase, model, opt, out):
    """In a forked child: SIGKILL in ``phase`` of a sharded re-export into ``out``."""
    import sf_dist.safetensors_stream as stream
    calls = [0]

    def kill_on(owner, name, nth, when=lambda *a: True):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if when(*args):
                calls[0] += 1
                if calls[0] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        setattr(owner, name, wrapper)
    if phase == "tensors":
        kill_on(stream.SafetensorsWriter, "write", 3)
    elif phase == "shards":  # the first shard is published under its new name, the second not yet
        kill_on(os, "replace", 2)
    elif phase == "index":  # every shard published, the index not yet renamed
        kill_on(os, "replace", 1, when=lambda src, dst: str(dst).endswith(stream.INDEX_NAME))
    elif phase == "cleanup":  # the new index is in place, the old shards not yet removed
        kill_on(os, "remove", 1, when=lambda p: not str(p).endswith(".tmp"))
    sf_dist.save_eval_weights(model, opt, out, max_shard_size="8KB")
    os._exit(0)
