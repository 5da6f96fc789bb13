"""Data-parallel training of a model of our layers, in 2 CPU processes with gloo: DDP and
FSDP2 (``fully_shard``) end with the same parameters as 1 process on the concatenated batch.

One spawn runs both (process start-up dominates: ~10 s on 2 cores); the tests read its results.
"""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import modweights
from modweights import nn as MN
from modweights.convert import LAYER_TYPES

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6 has FSDP2 only under torch.distributed._composable
    fully_shard = None

WORLD = 2
STEPS = 3
LR = 0.1
DTYPE = torch.float64  # gloo reduces float64: the comparison can be tight


class Net(nn.Module):
    """Our four layers plus a converted (modulated) nn.Linear fed by modweights.condition."""

    def __init__(self):
        super().__init__()
        self.mconv = MN.ModulatedConv2d(3, 4, 3, 5, padding=1)
        self.xconv = MN.MixtureConv2d(4, 4, 3, 2, stride=2, padding=1, bias=True)
        self.mod = MN.ModulatedLinear(4, 6, 5)
        self.mix = MN.MixtureLinear(6, 4, 3)
        self.head = nn.Sequential(nn.Linear(4, 2))
        modweights.convert(self.head, "modulated", style_features=5)
        nn.init.normal_(self.head[0].affine.weight, std=0.1)

    def forward(self, img, w):  # img (B, 3, 6, 6), w (B, 5) -> (B, 9, 2)
        h = self.xconv(torch.relu(self.mconv(img, w)))  # (B, 4, 3, 3)
        h = self.mix(torch.tanh(self.mod(h.flatten(2).transpose(1, 2), w)))
        with modweights.condition(self, w):
            return self.head(h)


def _model():
    torch.manual_seed(0)
    return Net().to(DTYPE)


def _data():
    g = torch.Generator().manual_seed(1)
    B = 4 * WORLD
    return (torch.randn(B, 3, 6, 6, generator=g, dtype=DTYPE), torch.randn(B, 5, generator=g, dtype=DTYPE),
            torch.randn(B, 9, 2, generator=g, dtype=DTYPE))


def _train(model, img, w, target):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        # a mean over the local batch: data parallelism averages it across ranks
        (model(img, w) - target).square().mean().backward()
        opt.step()


def _worker(rank, port, out_dir):
    """One rank's training; on success the process ends with ``os._exit(0)``.

    Why not a normal return: after ``destroy_process_group()`` FSDP2 leaves gloo threads alive
    (DTensor's cached sharding specs keep the DeviceMesh, hence its process groups). A spawned
    child returns through ``sys.exit``, i.e. full interpreter finalization, during which a gloo
    thread that needs the GIL is ended by CPython and its forced unwind through a noexcept frame
    calls ``std::terminate`` ("terminate called without an active exception", SIGABRT) in 10-20%
    of runs. Every result this rank owes is on disk and flushed before ``os._exit``; a failure
    still raises normally, so ``mp.spawn`` reports its traceback.
    """
    _run_rank(rank, port, out_dir)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_rank(rank, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        img, w, target = _data()
        n = img.shape[0] // WORLD
        local = [t[rank * n:(rank + 1) * n] for t in (img, w, target)]

        model = _model()
        _train(nn.parallel.DistributedDataParallel(model), *local)
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(out_dir, "ddp.pt"))

        if fully_shard is not None:
            model = _model()
            for m in model.modules():
                if isinstance(m, LAYER_TYPES):
                    fully_shard(m)  # one FSDP unit per layer of ours, like a transformer block
            fully_shard(model)
            sharded = type(model.mix.weight).__name__
            _train(model, *local)
            full = {k: v.full_tensor() for k, v in model.state_dict().items()}  # collective: every rank
            if rank == 0:
                torch.save(full, os.path.join(out_dir, "fsdp.pt"))
                with open(os.path.join(out_dir, "fsdp_param_type.txt"), "w") as f:
                    f.write(sharded)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    out = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    single = _model()
    _train(single, *_data())
    load = lambda name: torch.load(os.path.join(out, name), weights_only=True)  # noqa: E731
    return {"single": single.state_dict(), "ddp": load("ddp.pt"),
            "fsdp": load("fsdp.pt") if fully_shard is not None else None, "dir": out}


def _assert_same(actual, expected):
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-9, atol=1e-10, msg=k)


def test_ddp_matches_one_process(trained):
    _assert_same(trained["ddp"], trained["single"])
    assert not torch.equal(trained["single"]["mix.weight"], _model().state_dict()["mix.weight"])  # it trained


@pytest.mark.skipif(fully_shard is None, reason="torch.distributed.fsdp.fully_shard (FSDP2) needs torch >= 2.6")
def test_fsdp2_matches_one_process(trained):
    with open(os.path.join(trained["dir"], "fsdp_param_type.txt")) as f:
        assert f.read() == "DTensor"  # our parameters were sharded like any other
    _assert_same(trained["fsdp"], trained["single"])
