"""sft-train model=hf: a tiny random transformers Llama saved to a temporary directory (no network) is
fine-tuned through the real entry point, and its export loads in transformers with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="4.56")  # model=hf's floor ([hf] extra)

from sft.checkpoint import load_for_inference  # noqa: E402
from sft.export import export_checkpoint  # noqa: E402
from tests.helpers import make_model_dir, metric_rows, summary, train  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return make_model_dir(tmp_path / "tiny-llama")


def test_sft_train_fine_tunes_a_local_pretrained_model(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["model=hf", f"model.path={model_dir}", "data.num_train=64", "trainer.max_steps=6"]
    schedule = ["optim.lr=1e-2", "optim.warmup_steps=0", "trainer.val_check_interval=6"]
    train(run_dir, tmp_path / "cache", *overrides, *schedule)
    result = summary(run_dir)
    assert Path(result["checkpoint"]).is_file() and result["steps"] == 6
    losses = metric_rows(run_dir, "train/loss")
    assert all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert losses[5] < losses[0], losses  # assistant-only loss on the template's inferred spans goes down
    assert "eval/exact_match" in result["metrics"]  # greedy generation through the KV-cache path ran

    bundle = load_for_inference(result["checkpoint"])  # rebuilt from model.path + the trained state_dict
    out = export_checkpoint(result["checkpoint"], tmp_path / "exported")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([bundle.tokenizer.encode("<|im_start|>user\nHello<|im_end|>\n").ids])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, bundle.model(ids), atol=1e-5, rtol=0)
        pretrained = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        assert not torch.allclose(pretrained(ids).logits, bundle.model(ids), atol=1e-4)  # it was fine-tuned
