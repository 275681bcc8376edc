"""Data parallelism on CPU with gloo: 2 ranks × B/2 rows train the same SAE as 1 rank × B rows."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from saelab.store import ActivationStore
from saelab.train import TrainConfig, train
from factories import make_synthetic_store

NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def _config(arch: str) -> TrainConfig:
    return TrainConfig(architecture=arch, d_sae=64, k=4, batch_size=128, tokens=128 * 12, lr=3e-3,
                       l1_coefficient=1.0, resample_every=0, checkpoint_every=0, eval_tokens=1024, device="cpu")


def _rank(rank: int, world: int, port: int, store_path: str, arch: str, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    sae = train(ActivationStore.open(store_path), _config(arch), progress=False)
    if rank == 0:
        save_file({n: getattr(sae, n).detach().contiguous() for n in NAMES}, result)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    return make_synthetic_store(tmp_path_factory.mktemp("ddp") / "acts", rows=8192).path


@pytest.mark.parametrize("arch", [pytest.param("topk", marks=pytest.mark.slow(ci=True)),
                                  pytest.param("relu", marks=pytest.mark.slow)])
def test_two_ranks_equal_one_rank(store_path, tmp_path, arch, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    single = train(ActivationStore.open(store_path), _config(arch), progress=False)
    result = str(tmp_path / "ddp.safetensors")
    mp.spawn(_rank, args=(2, _free_port(), str(store_path), arch, result), nprocs=2, join=True)
    ddp = load_file(result)
    for n in NAMES:
        ref = getattr(single, n).detach()
        assert torch.allclose(ddp[n], ref, atol=2e-5, rtol=1e-4), (n, (ddp[n] - ref).abs().max())
    assert not torch.allclose(ddp["W_dec"], _untrained_decoder(arch))      # it did train


def _untrained_decoder(arch: str) -> torch.Tensor:
    from saelab.sae import SAE, SAEConfig

    cfg = _config(arch).resolved(16)
    sae = SAE(SAEConfig(16, cfg.d_sae, arch, cfg.k))
    sae.reset_parameters(seed=cfg.seed)
    return sae.W_dec.detach()
