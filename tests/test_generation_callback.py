"""Generation during training runs on one process: a model sharded with FSDP2 (DTensor parameters) is
gathered into a full copy that generates exactly what the unsharded model generates."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist

from sft.generation_callback import single_process_model
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


def test_a_sharded_model_is_gathered_into_one_that_generates_the_same(tmp_path):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    reference = build_model(MODEL_CONFIG).eval()
    expected = generate(reference, [5, 17, 3], 10, set())
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        sharded = build_model(MODEL_CONFIG)
        sharded.load_state_dict(reference.state_dict())
        fully_shard(sharded)
        module = SimpleNamespace(model=sharded, hparams={"model_config": MODEL_CONFIG})
        gathered = single_process_model(module)
        assert gathered is not sharded
        assert not any(type(p).__name__ == "DTensor" for p in gathered.parameters())
        assert generate(gathered, [5, 17, 3], 10, set()) == expected
        plain = SimpleNamespace(model=reference, hparams={"model_config": MODEL_CONFIG})
        assert single_process_model(plain) is reference  # unsharded (DDP's replica): used as it is
    finally:
        dist.destroy_process_group()
