"""Helpers for tests/test_distributed.py: the tiny model, the single-process reference, and
the worker that one rank of a 2-process gloo job runs (this file run as a script).

    python3 tests/_dist_helpers.py <case,case,...> <rank> <world_size> <port> <out.pt>

Every rank writes {case: result} to <out.pt> after each case: the gathered gradients, the
decisions and, if the case raised, its traceback (so the test can show it). A rank never waits on a collective for
longer than COLLECTIVE_TIMEOUT_S (the process group's timeout), and the parent kills both
ranks after LAUNCH_TIMEOUT_S in any case.
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

COLLECTIVE_TIMEOUT_S = 30
LAUNCH_TIMEOUT_S = 120
WORLD = 2
BATCH, D_IN, D_HID, D_MID, D_OUT = 16, 8, 32, 16, 4
SEED = 1234


class Net(nn.Module):
    """Linear -> GELU module -> Linear (the GELU's output is kept by fc2: inverted), then two
    functional calls in the root's own forward: F.silu whose only consumer is a frozen
    Linear (which keeps nothing for backward: few-bit in auto, kept in exact), and F.gelu
    kept by the trainable head (inverted in both modes, so the root's forward is rewritten
    in exact mode too)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D_IN, D_HID)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(D_HID, D_MID)
        self.frozen = nn.Linear(D_MID, D_MID)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(D_MID, D_OUT)

    def forward(self, x):
        h = self.fc2(self.act(self.fc1(x)))
        z = self.frozen(F.silu(h)) + h
        return self.head(F.gelu(z))


# The decisions this model must get (site pattern -> variant), bare model, per mode.
EXPECTED = {
    "auto": {"act": "inverted", "<root>:silu#*": "fewbit-3", "<root>:gelu#*": "inverted"},
    "exact": {"act": "inverted", "<root>:silu#*": "kept", "<root>:gelu#*": "inverted"},
}


def make_model() -> Net:
    torch.manual_seed(SEED)
    return Net()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(BATCH, D_IN, generator=g), torch.randn(BATCH, D_OUT, generator=g)


def optimize(model: nn.Module, x: torch.Tensor, mode: str = "auto") -> nn.Module:
    """fewbit_fx.optimize with a fixed RNG state, so every process fits identical tables."""
    import fewbit_fx

    torch.manual_seed(SEED + 2)
    out = fewbit_fx.optimize(model, example_inputs=(x,), mode=mode)
    assert out is model, "optimize() must rewrite in place and return the model"
    return out


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float(), y)


def strip_name(name: str) -> str:
    """A site or parameter name with a DDP 'module.' prefix removed; the root of the wrapped
    module, 'module:<fn>#i', becomes the bare model's '<root>:<fn>#i'."""
    if name.startswith("module."):
        return name[len("module."):]
    if name.startswith("module:"):
        return "<root>:" + name[len("module:"):]
    return name


def decisions(model: nn.Module) -> dict[str, str]:
    """{site: variant} of an optimized model, from fewbit_fx.report(model).rows."""
    import fewbit_fx

    return {strip_name(r.site): r.variant for r in fewbit_fx.report(model).rows}


def rewritten_kinds(model: nn.Module) -> list[str]:
    """Class names of the fewbit_fx.nn modules now inside the model (sorted)."""
    from fewbit_fx.nn import FewBit, Inverted

    return sorted(type(m).__name__ for m in model.modules() if isinstance(m, (FewBit, Inverted)))


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name (prefix stripped): full gradient} of the trainable parameters; DTensor
    gradients (FSDP2) are gathered with full_tensor() (a collective: every rank calls it)."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"no gradient for {name}"
        g = p.grad
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[strip_name(name)] = g.detach().clone()
    return out


def reference(mode: str = "auto") -> dict:
    """One process, full batch: the bare model optimized the same way (its gradients,
    decisions and rewritten modules), the un-optimized model's gradients, and the dry-run
    report of the bare model."""
    import fewbit_fx

    x, y = make_batch()
    torch.manual_seed(SEED + 2)
    rep = fewbit_fx.report(make_model(), example_inputs=(x,), mode=mode)
    plain = make_model()
    loss_fn(plain(x), y).backward()
    model = optimize(make_model(), x, mode)
    loss_fn(model(x), y).backward()
    return {"grads": grads(model), "decisions": decisions(model), "kinds": rewritten_kinds(model),
            "planned": {r.site: r.variant for r in rep.rows},
            "measured": (rep.measured_before, rep.measured_after), "plain_grads": grads(plain)}


# --------------------------------------------------------------------------- the ranks


def _ddp(rank: int, when: str, **ddp_kwargs) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = make_batch()
    model = make_model()
    if when == "before":
        optimize(model, x)
        wrapped = DDP(model, **ddp_kwargs)
        optimized = model  # optimize() was given the bare module: its report is there
    else:
        wrapped = DDP(model, **ddp_kwargs)
        optimize(wrapped, x)
        optimized = wrapped
    assert type(wrapped).__name__ == "DistributedDataParallel"
    return _step(rank, wrapped, optimized, x, y)


def _fsdp(rank: int, when: str, nested: bool = False) -> dict:
    """fully_shard on the root only, or (nested) on every Linear and then the root, as the
    FSDP2 documentation does it for a model's blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    x, y = make_batch()
    model = make_model()
    if when == "before":
        optimize(model, x)
    mesh = init_device_mesh("cpu", (WORLD,))
    if nested:
        for child in (model.fc1, model.fc2, model.frozen, model.head):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert type(model).__name__.startswith("FSDP"), type(model).__name__
    # (checked before any forward: the root keeps its parameters unsharded after one)
    sharded = [n for n, p in model.named_parameters() if hasattr(p, "full_tensor")]
    assert len(sharded) == sum(1 for _ in model.parameters()), "fully_shard left plain parameters"
    if when == "after":
        optimize(model, x)
    result = _step(rank, model, model, x, y)
    result["sharded"] = sharded
    return result


def _step(rank: int, wrapped: nn.Module, optimized: nn.Module, x, y) -> dict:
    """One training step on this rank's half of the batch through the wrapper, then the
    decisions, and (after the gradients are taken) what report() says about the wrapper."""
    import fewbit_fx

    result = {"decisions": decisions(optimized), "kinds": rewritten_kinds(wrapped),
              "reasons": {strip_name(r.site): r.reason for r in fewbit_fx.report(optimized).rows}}
    loss_fn(wrapped(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank]).backward()
    result["grads"] = grads(wrapped)
    result["wrapper_report"] = _attempt(lambda: decisions(wrapped))

    def dry_run():
        torch.manual_seed(SEED + 2)
        rep = fewbit_fx.report(wrapped, example_inputs=(x,))
        return {"decisions": {strip_name(r.site): r.variant for r in rep.rows},
                "measured": (rep.measured_before, rep.measured_after)}

    result["dry_run"] = _attempt(dry_run)
    return result


def _attempt(fn) -> dict:
    try:
        return {"value": fn()}
    except Exception:  # noqa: BLE001 - reported to the test, which fails with it
        return {"error": traceback.format_exc()}


CASES = {
    "ddp-before": lambda rank: _ddp(rank, "before"),
    "ddp-after": lambda rank: _ddp(rank, "after"),
    # one gradient bucket per parameter (DDP accepts any cap; eager DDP trains fine with it)
    "ddp-after-small-buckets": lambda rank: _ddp(rank, "after", bucket_cap_mb=1e-4),
    "fsdp-before": lambda rank: _fsdp(rank, "before"),
    "fsdp-after": lambda rank: _fsdp(rank, "after"),
    "fsdp-nested-before": lambda rank: _fsdp(rank, "before", nested=True),
    "fsdp-nested-after": lambda rank: _fsdp(rank, "after", nested=True),
}


def worker(cases: list[str], rank: int, world: int, port: int, out_path: str) -> int:
    """Run each case in turn, each in a fresh gloo process group (on one TCPStore at
    127.0.0.1:port, a prefix per case), and save {case: result} to out_path."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    results: dict = {}
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timeout)
    except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
        results = {case: {"rank": rank, "error": traceback.format_exc()} for case in cases}
        _save(results, out_path)
        return 1
    for case in cases:
        result: dict = {"rank": rank}
        start = time.monotonic()
        try:
            dist.init_process_group("gloo", store=dist.PrefixStore(case, store), rank=rank,
                                    world_size=world, timeout=timeout)
            try:
                result.update(CASES[case](rank))
            finally:
                dist.destroy_process_group()
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            result["error"] = traceback.format_exc()
        result["seconds"] = time.monotonic() - start
        results[case] = result
        _save(results, out_path)  # after each case, so a later hang keeps the earlier ones
    return 0 if all("error" not in r for r in results.values()) else 1


def _save(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # never a half-written file, even if killed


# --------------------------------------------------------------------------- the launcher


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cases: list[str], tmpdir: str, timeout: float = LAUNCH_TIMEOUT_S) -> dict[str, list[dict]]:
    """Run the cases on WORLD ranks (subprocesses, gloo, 127.0.0.1, a free port picked now);
    return {case: [result of rank 0, result of rank 1]}. A case that a rank did not finish
    (the job ran past `timeout` and both ranks were killed, or a rank died) gets a result
    with "error" holding both ranks' output."""
    port = free_port()
    case = ",".join(cases)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    outs = [os.path.join(tmpdir, f"rank{r}.pt") for r in range(WORLD)]
    logs = [open(os.path.join(tmpdir, f"rank{r}.log"), "w+") for r in range(WORLD)]
    procs = [subprocess.Popen([sys.executable, __file__, case, str(r), str(WORLD), str(port), outs[r]],
                              stdout=logs[r], stderr=subprocess.STDOUT, env=env)
             for r in range(WORLD)]
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = []
    for r, log in enumerate(logs):
        log.seek(0)
        text.append(f"--- rank {r} (exit {procs[r].returncode}) ---\n{log.read()[-6000:]}")
        log.close()
    output = "\n".join(text)
    why = f"ranks still running after {timeout:.0f} s, killed" if timed_out else "rank exited early"
    saved = [torch.load(o, weights_only=False) if os.path.exists(o) else {} for o in outs]
    return {c: [saved[r].get(c) or {"rank": r, "error": f"{c}: no result from rank {r} ({why})\n{output}"}
                for r in range(WORLD)]
            for c in cases}


if __name__ == "__main__":
    _case, _rank, _world, _port, _out = sys.argv[1:6]
    sys.exit(worker(_case.split(","), int(_rank), int(_world), int(_port), _out))
