"""sft-eval's validation examples are the ones training validated on, for each way a run gets them."""

from __future__ import annotations

import pytest

from sft.data.build import protocol_config
from sft.data.validation import validation_examples
from sft.protocol.pipeline import Accounting, ConversationEncoder
from tests.data.test_datamodule import make_config, setup_module_for, two_files  # noqa: F401 (fixture)


@pytest.mark.parametrize("split", ["val_fraction", "val_files"])
def test_validation_examples_are_the_datamodules_held_out_examples(tmp_path, two_files, split):  # noqa: F811
    data = {"val_fraction": 0.25} if split == "val_fraction" else {"val": two_files[1:]}
    files = two_files if split == "val_fraction" else two_files[:1]
    config = make_config(tmp_path, files, packing=False, **data)
    datamodule = setup_module_for(config)
    dataset = datamodule.val_dataset
    trained = [dataset.index[int(i)] for i in dataset.example_ids]
    prepared = datamodule.prepared
    encoder = ConversationEncoder(prepared.tokenizer, prepared.template, protocol_config(config["protocol"]))
    examples, description = validation_examples(config["data"], config["seed"], encoder, Accounting())
    assert len(examples) == len(trained) > 0
    for example, (ids, labels) in zip(examples, trained, strict=True):
        assert example.input_ids.tolist() == ids.tolist() and example.labels.tolist() == labels.tolist()
    assert ("val_fraction=0.25" in description) == (split == "val_fraction")


def test_a_run_without_validation_data_says_how_to_give_some(tmp_path, two_files):  # noqa: F811
    config = make_config(tmp_path, two_files)
    with pytest.raises(ValueError, match=r"no validation data .* data\.val=\[\.\.\.\]"):
        validation_examples(config["data"], 7, None, Accounting())
