"""Generation during training runs on one process: a model sharded with FSDP2 (DTensor parameters) is
gathered into a full copy that generates exactly what the unsharded model generates."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from sft.generation_callback import SingleProcessModel
from sft.model import build_model
from sft.model.generate import generate
from tests.helpers import MODEL

# The shared tiny Llama, untied, with a short context and a large init (far-from-uniform attention).
MODEL_CONFIG = {
    **MODEL,
    "tie_word_embeddings": False,
    "max_position_embeddings": 40,
    "initializer_range": 0.2,
}


@pytest.fixture
def one_rank(tmp_path):
    """A process group of this process alone, which fully_shard needs."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def as_module(model: torch.nn.Module, config: dict, device: str = "cpu") -> SimpleNamespace:
    return SimpleNamespace(model=model, hparams={"model_config": config}, device=torch.device(device))


@pytest.mark.parametrize("tied", [False, True])
def test_a_sharded_model_is_gathered_into_one_that_generates_the_same(one_rank, monkeypatch, tied):
    """The full copy generates what the unsharded model does; it is built once and loads the current
    weights at each use."""
    from torch.distributed.fsdp import fully_shard

    from sft import model as models

    config = {**MODEL_CONFIG, "tie_word_embeddings": tied}
    torch.manual_seed(0)
    reference = build_model(config).eval()
    sharded = build_model(config)
    sharded.load_state_dict(reference.state_dict())
    fully_shard(sharded)
    builds = []
    monkeypatch.setattr(models, "build_model", lambda config: builds.append(config) or build_model(config))
    single_process_model = SingleProcessModel()
    for _ in range(2):  # the second evaluation after a training step: new weights, the same copy
        with single_process_model(as_module(sharded, config)) as gathered:
            assert gathered is not sharded
            assert not any(type(p).__name__ == "DTensor" for p in gathered.parameters())
            assert generate(gathered, [5, 17, 3], 10, set()) == generate(reference, [5, 17, 3], 10, set())
        with torch.no_grad():
            for model in (reference, sharded):
                model.model.embed_tokens.weight.mul_(-1.5)
    assert len(builds) == 1
    with single_process_model(as_module(reference, config)) as used:
        assert used is reference  # unsharded (DDP's replica): used as it is


def test_the_gathered_copy_generates_on_the_module_device_and_leaves_it_after(one_rank, monkeypatch):
    """Under FSDP on GPUs the copy is moved to the GPU to generate (not left on the CPU it is gathered to),
    and back to the CPU afterwards. Recorded here with the moves themselves stubbed: there is no GPU."""
    from torch.distributed.fsdp import fully_shard

    sharded = build_model(MODEL_CONFIG)
    fully_shard(sharded)
    moves = []
    monkeypatch.setattr(
        torch.nn.Module, "to", lambda self, device: moves.append(torch.device(device)) or self
    )
    with SingleProcessModel()(as_module(sharded, MODEL_CONFIG, "cuda:0")):
        assert moves == [torch.device("cuda:0")]
    assert moves == [torch.device("cuda:0"), torch.device("cpu")]
