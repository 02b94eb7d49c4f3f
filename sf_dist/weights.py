"""The eval weights x of a Schedule-Free run, one API on every backend.

Training keeps y in the parameters; evaluation and export want x. These helpers hand out x
(as a context, a state dict, a safetensors file or through ``model.state_dict()``) and leave
y bitwise unchanged afterwards, on a plain module, DDP, FSDP2, FSDP1 or a DeepSpeed engine.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from .backends.deepspeed import is_deepspeed
from .backends.fsdp import drop_gathered_copies, gather_x, is_fsdp1, is_sharded, is_sharded_tensor
from .distributed import agreed_train_mode, every_rank_io, rank0_io
from .frameworks import unwrap_optimizer
from .kernels import swap_
from .optim import ScheduleFreeOptimizer, local
from .safetensors_stream import check_specs, open_writer, parse_size

__all__ = ["eval_weights", "eval_state_dict", "save_eval_weights", "register_eval_state_dict_hook",
           "own_state_dict_calls"]

# Set while sf_dist itself reads a state dict (checkpoints store y): the eval hook stands aside.
_HOOKS_SUSPENDED = [False]


# ---- x in the parameters (context) ---------------------------------------------------------
@contextlib.contextmanager
def eval_weights(model: nn.Module, optimizer: Any) -> Iterator[nn.Module]:
    """Context manager: the params hold x inside, y again afterwards (bitwise for sf_dist's own
    optimizers, which restore a copy of the local shard rather than re-deriving y).

    ``optimizer`` may be the one a framework hands out (Accelerate's, DeepSpeed's engine optimizer).

    >>> with sf_dist.eval_weights(model, opt):
    ...     val_loss = evaluate(model)
    """
    optimizer = unwrap_optimizer(optimizer)
    if not optimizer.train_mode:
        yield model
        return
    snapshot: list[tuple[Tensor, Tensor]] = []

    def enter() -> None:
        snapshot.extend(_snapshot_y(optimizer) if isinstance(optimizer, ScheduleFreeOptimizer) else [])
        drop_gathered_copies(model)
        optimizer.eval()

    try:  # sharded: every rank is in here together, so a failure on one (an OOM copying y) reaches all
        if is_sharded(model):
            every_rank_io(enter, "put x in the params")
        else:
            enter()
        yield model
    finally:
        drop_gathered_copies(model)
        optimizer.train()
        with torch.no_grad():
            for y, saved in snapshot:
                y.copy_(saved)


def _snapshot_y(optimizer: ScheduleFreeOptimizer) -> list[tuple[Tensor, Tensor]]:
    """(local y, a copy) for every param eval() will move: those with state."""
    return [(local(p), local(p).clone()) for group in optimizer.param_groups for p in group["params"]
            if "z" in optimizer.state.get(p, {})]


# ---- x as tensors, without touching y ----------------------------------------------------------
class _PresentX:
    """x is what the values hold (eval mode, or inside eval_weights): hand it out as is, copying
    the values that alias a parameter in ``live`` (they change back once y is restored)."""

    def __init__(self, live: set[int]) -> None:
        self._live = live

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, Tensor) or is_sharded_tensor(value):  # FSDP1's shards are copies
            return value
        aliased = local(value).numel() > 0 and local(value).untyped_storage().data_ptr() in self._live
        return value.detach().clone() if aliased else value

    def local_x(self, value: Tensor) -> Tensor:
        """This rank's x data of ``value``, for sending (no copy needed)."""
        return local(value)

    def into(self, value: Tensor, dest: Tensor) -> None:
        """Write this rank's x of ``value`` into ``dest`` (same shape)."""
        dest.copy_(local(value))


class _DerivedX(_PresentX):
    """x = lerp(y, z, 1-1/b1) computed per value from the param it aliases; y is never written."""

    def __init__(self, by_storage: dict[tuple, tuple[Tensor, float, bool]]) -> None:
        super().__init__(set())
        self._by_storage = by_storage

    def _find(self, value: Any) -> Optional[tuple[Tensor, float, bool]]:
        if not isinstance(value, Tensor) or is_sharded_tensor(value):
            return None
        return self._by_storage.get(_storage_key(local(value)))

    def __call__(self, value: Any) -> Any:
        found = self._find(value)
        if found is None:
            return value
        x = value.detach().clone()
        _to_x_(local(x), found)
        return x

    def local_x(self, value: Tensor) -> Tensor:
        found = self._find(value)
        if found is None:
            return local(value)
        x = local(value).clone()
        _to_x_(x, found)
        return x

    def into(self, value: Tensor, dest: Tensor) -> None:
        dest.copy_(local(value))
        found = self._find(value)
        if found is not None:
            _to_x_(dest, found)


def _to_x_(y: Tensor, found: tuple[Tensor, float, bool]) -> None:
    """Turn a copy of y into x in place with optimizer.eval()'s own kernel call: the same x."""
    z, weight, foreach = found
    swap_([y], [z], weight, foreach=foreach)


def _derived_x(optimizer: Any, values: Iterable[Any]) -> Optional[_DerivedX]:
    """A _DerivedX over the optimizer's params, or None when some param with state is not among
    ``values`` by storage (then x must come from eval())."""
    by_storage: dict[tuple, tuple[Tensor, float, bool]] = {}
    for group in optimizer.param_groups:
        weight = 1 - 1 / optimizer.interpolation(group)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "z" in state and local(p).numel() > 0:
                by_storage[_storage_key(local(p))] = (local(state["z"]), weight, bool(group["foreach"]))
    seen = {_storage_key(local(v)) for v in values if isinstance(v, Tensor) and not is_sharded_tensor(v)}
    return _DerivedX(by_storage) if seen.issuperset(by_storage) else None


def _is_tensor(value: Any) -> bool:
    """A tensor value of a state dict (plain, DTensor or ShardedTensor), not an extra_state object."""
    return isinstance(value, Tensor) or is_sharded_tensor(value)


def _storage_key(t: Tensor) -> tuple:
    return (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


@contextlib.contextmanager
def _x_state(model: nn.Module, optimizer: Any,
             read: Callable[[], dict[str, Any]]) -> Iterator[tuple[dict[str, Any], _PresentX]]:
    """Yield ``(read(), x_of)``: ``x_of(value)`` is the x of a state-dict value. y is bitwise
    unchanged once the block exits.

    In eval mode the values are x already. For sf_dist optimizers on plain, DDP and FSDP2
    modules, x is derived tensor by tensor and the params are never written. Otherwise (FSDP1
    views, other optimizers) the params hold x inside the block and ``x_of`` copies the values
    that alias them.
    """
    if not optimizer.train_mode:  # the params hold x already
        yield read(), _PresentX(set())
        return
    if isinstance(optimizer, ScheduleFreeOptimizer) and not is_fsdp1(model):
        sd = read()
        derived = _derived_x(optimizer, sd.values())
        if derived is not None:
            yield sd, derived
            return
    live = {local(p).untyped_storage().data_ptr() for p in model.parameters() if local(p).numel() > 0}
    with eval_weights(model, optimizer):
        yield read(), _PresentX(live)


@contextlib.contextmanager
def own_state_dict_calls() -> Iterator[None]:
    """Read the model's real state dict (y) even while an eval hook is registered."""
    before, _HOOKS_SUSPENDED[0] = _HOOKS_SUSPENDED[0], True
    try:
        yield
    finally:
        _HOOKS_SUSPENDED[0] = before


def _sharded_state_dict(model: nn.Module) -> dict[str, Any]:
    """Plain FQNs (no wrapper prefixes) to local-shard values: DTensor, ShardedTensor or Tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    with own_state_dict_calls():
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))


# ---- public exports ----------------------------------------------------------------------------
def eval_state_dict(model: nn.Module, optimizer: Any, full: bool = True,
                    cpu_offload: bool = True) -> dict[str, Any]:
    """The x weights as a state dict with plain names; y is left bitwise unchanged.

    ``full=True``: whole tensors on rank 0, ``{}`` on the other ranks (a collective: call it on
    every rank), gathered one tensor at a time. ``full=False``: this rank's shards (DTensors on
    FSDP2), ready for torch.distributed.checkpoint.
    """
    optimizer = unwrap_optimizer(optimizer)
    agreed_train_mode(optimizer)
    if is_deepspeed(model):
        from .backends.deepspeed import engine_state_dict
        with eval_weights(model, optimizer):
            return engine_state_dict(model, full, cpu_offload)
    out: dict[str, Any] = {}
    with _x_state(model, optimizer, lambda: _sharded_state_dict(model)) as (sd, x_of):
        for name, value in sd.items():
            if not full:
                out[name] = x_of(value)
                continue
            if not _is_tensor(value):
                continue  # extra_state objects: not weights
            whole = gather_x(value, x_of, name)
            if whole is None:
                continue
            if cpu_offload:
                whole = whole.cpu()
            if type(value) is Tensor and whole.numel() > 0 and whole.data_ptr() == value.data_ptr():
                whole = whole.clone()  # never hand out a live parameter or buffer
            out[name] = whole
    return out


def save_eval_weights(model: nn.Module, optimizer: Any, path: str | os.PathLike,
                      max_shard_size: Union[int, str, None] = None) -> None:
    """Write x to a safetensors file with plain names that a single-process
    ``model.load_state_dict(safetensors.torch.load_file(path), strict=True)`` accepts.

    A collective (call it on every rank); rank 0 writes, streaming one gathered tensor at a
    time, so peak memory stays near the largest tensor rather than the whole model. The file is
    replaced atomically: a crash leaves the previous one intact. With ``max_shard_size`` ("5GB",
    or bytes) ``path`` is a directory that gets the Hugging Face layout (``model-0000k-of-0000n.safetensors``
    and ``model.safetensors.index.json``, or one ``model.safetensors``).

    >>> sf_dist.save_eval_weights(model, opt, "model.safetensors")
    >>> sf_dist.save_eval_weights(model, opt, "hf_dir", max_shard_size="5GB")
    """
    optimizer = unwrap_optimizer(optimizer)
    agreed_train_mode(optimizer)
    path = os.fspath(path)
    if max_shard_size is not None:
        parse_size(max_shard_size)  # a bad value fails here, on every rank, before any collective
    if is_deepspeed(model):  # x per tensor from DeepSpeed's full y and z; nothing is swapped
        from .backends.deepspeed import engine_weight_specs, engine_weights
        _stream(path, engine_weight_specs(model), engine_weights(model, as_x=True), max_shard_size)
        return
    with _x_state(model, optimizer, lambda: _sharded_state_dict(model)) as (sd, x_of):
        entries = [(n, v) for n, v in sd.items() if _is_tensor(v)]
        _stream(path, [(n, v.dtype, tuple(v.shape)) for n, v in entries],
                ((name, gather_x(value, x_of, name)) for name, value in entries), max_shard_size)


def _stream(path: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
            tensors: Iterable[tuple[str, Optional[Tensor]]], max_shard_size: Union[int, str, None]) -> None:
    """Rank 0 writes each whole tensor as it arrives (None elsewhere); every rank runs through
    ``tensors``, whose items are collectives, even after a failed write."""
    check_specs(specs)  # on every rank, before any collective
    writer = rank0_io(lambda: open_writer(path, specs, max_shard_size), f"open {path} for writing")
    failed: list[BaseException] = []
    try:
        for name, whole in tensors:
            if writer is not None and not failed:
                try:
                    writer.write(name, whole)
                except Exception as e:  # keep receiving: the other ranks are still sending
                    failed.append(e)
            del whole
    except BaseException:  # the gather itself failed (a rank died): drop the temporary
        if writer is not None:
            writer.abort()
        raise

    def finish() -> None:
        if failed:
            writer.abort()
            raise failed[0]
        writer.close()  # fsync and rename: a full disk or a read-only directory fails here

    rank0_io(finish, f"write {path}")  # every rank hears of a failed write, close or rename; also the barrier


# ---- state_dict() hook ---------------------------------------------------------------------------
class EvalStateDictHandle:
    """Returned by register_eval_state_dict_hook; ``remove()`` restores plain state_dict()."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def remove(self) -> None:
        if "state_dict" in self._model.__dict__:
            del self._model.__dict__["state_dict"]


def register_eval_state_dict_hook(model: nn.Module, optimizer: Any) -> EvalStateDictHandle:
    """Make ``model.state_dict()`` (hence get_model_state_dict and DCP saves of the model) give x
    while training continues at y. ``handle.remove()`` undoes it.

    The whole state_dict call is wrapped, so the swap happens around the engine's own hooks
    (FSDP1 unshards inside them). sf_dist.checkpoint still stores y.
    """
    optimizer = unwrap_optimizer(optimizer)
    if "state_dict" in model.__dict__:
        raise RuntimeError("an eval state_dict hook (or another state_dict override) is already on this "
                           "model: remove() the previous handle first")
    plain_state_dict = model.state_dict
    sharded = is_sharded(model)

    def state_dict(*args: Any, **kwargs: Any) -> Any:
        if _HOOKS_SUSPENDED[0]:
            return plain_state_dict(*args, **kwargs)
        if sharded:
            agreed_train_mode(optimizer)
        with _x_state(model, optimizer, lambda: plain_state_dict(*args, **kwargs)) as (sd, x_of):
            for key, value in sd.items():
                sd[key] = x_of(value)
        return sd

    model.__dict__["state_dict"] = state_dict
    return EvalStateDictHandle(model)
