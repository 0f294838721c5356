"""Every option of every config group composes, fits the schema and builds what it configures; the schema
names each bad key."""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from importlib.resources import files
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.fabric.connector import _PRECISION_INPUT_STR
from lightning.pytorch.strategies import Strategy, StrategyRegistry
from omegaconf import OmegaConf, open_dict

from sft.cli.schemas import TrainConfig
from sft.cli.train import build_logger
from sft.config import ConfigError, load_config, to_dict
from sft.data.build import data_files
from sft.hardware import plan_hardware, trainer_kwargs
from sft.model import build_model
from sft.protocol.templates import load_template
from sft.protocol.tokenizer import load_tokenizer, train_bpe
from tests.helpers import ALL_SPECIALS, CORPUS, make_tokenizer

CONF = Path(str(files("sft.conf")))
GROUPS = sorted(
    str(directory.relative_to(CONF))
    for directory in CONF.rglob("*")
    if directory.is_dir() and any(directory.glob("*.yaml")) and directory != CONF
)
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]
PLUGINS = {
    "hydra/launcher": "hydra_plugins.hydra_submitit_launcher",
    "hydra/sweeper": "hydra_plugins.hydra_optuna_sweeper",
}
JINJA = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_the_tree_has_the_groups_and_options_the_docs_promise():
    names = set(OPTIONS)
    for group, option in [
        ("tokenizer", "bpe"), ("tokenizer", "file"), ("template", "chatml"), ("template", "llama3"),
        ("template", "microlm"), ("template", "jinja"), ("data", "sample"), ("data", "jsonl"),
        ("hardware", "cpu"), ("hardware", "gpu"), ("hardware", "ddp"), ("hardware", "ddp_cpu"),
        ("hardware", "bf16"), ("hardware", "fsdp"), ("hardware", "fsdp_cpu"), ("hardware", "cpu_bf16"),
        ("logger", "csv"), ("logger", "tensorboard"),
        ("logger", "wandb"), ("hydra/launcher", "slurm"), ("hydra/launcher", "local"),
        ("experiment", "tiny_cpu_smoke"), ("experiment", "small_gpu_bf16"),
    ]:  # fmt: skip
        assert (group, option) in names


def extra_overrides(group: str, option: str, tmp_path: Path) -> list[str]:
    """What an option needs beyond its YAML to be built here (a file, a small size)."""
    if (group, option) == ("tokenizer", "file"):
        make_tokenizer(vocab_size=300).save(str(tmp_path / "tokenizer.json"))
        return [f"tokenizer.path={tmp_path / 'tokenizer.json'}"]
    if (group, option) == ("template", "jinja"):
        (tmp_path / "chat.jinja").write_text(JINJA)
        return [f"template.path={tmp_path / 'chat.jinja'}", "template.eot='<|im_end|>'"]
    if (group, option) == ("model", "hf"):
        pytest.importorskip("transformers")
        from tests.helpers import make_model_dir

        return [f"model.path={make_model_dir(tmp_path)}"]
    if (group, option) == ("data", "jsonl"):
        (tmp_path / "chats.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
        return [f"data.train=[{tmp_path / 'chats.jsonl'}]"]
    if group == "data":
        return ["data.num_train=8", "data.num_val=4"]
    return []


def validate_config(cfg) -> TrainConfig:
    return load_config(cfg, TrainConfig)


def check_trainer_kwargs(config: TrainConfig, tmp_path: Path) -> None:
    """CPU options build a real Trainer; GPU ones (not runnable here) must name a known precision and
    strategy and only arguments lightning.Trainer takes."""
    kwargs = trainer_kwargs(config, plan_hardware(config.hardware))
    assert set(kwargs) <= set(typing.get_type_hints(L.Trainer.__init__)), set(kwargs)
    if kwargs["accelerator"] == "cpu":
        trainer = L.Trainer(**kwargs, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
        assert trainer.max_steps == config.trainer["max_steps"]
        return
    assert kwargs["accelerator"] == "gpu"
    assert str(kwargs["precision"]) in typing.get_args(_PRECISION_INPUT_STR)
    strategy = kwargs["strategy"]
    assert isinstance(strategy, Strategy) or strategy == "auto" or strategy in StrategyRegistry, strategy
    assert isinstance(kwargs["devices"], int) and (kwargs["devices"] == -1 or kwargs["devices"] >= 1)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_validates_and_instantiates(group, option, tmp_path):
    if group in PLUGINS:
        pytest.importorskip(PLUGINS[group])
    overrides = [f"{group}={option}", *extra_overrides(group, option, tmp_path)]
    with initialize_config_module("sft.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=group.startswith("hydra/"))
    if group.startswith("hydra/"):
        node = cfg.hydra[group.split("/")[1]]
        built = hydra.utils.instantiate(node, _recursive_=False)
        assert type(built).__module__.startswith(PLUGINS[group])
        check_plugin(group, option, cfg)
        return
    config = validate_config(cfg)
    check_trainer_kwargs(config, tmp_path)
    section = getattr(config, group, None)
    if group == "tokenizer":
        tokenizer = (
            load_tokenizer(section.path)
            if option == "file"
            else train_bpe(CORPUS, vocab_size=section.vocab_size, special_tokens=ALL_SPECIALS)
        )
        assert tokenizer.get_vocab_size() > 256
    elif group == "template":
        assert load_template(to_dict(section)).eot
    elif group == "model":
        vocab_size, device = 1024, torch.device("meta")
        if option == "hf":  # its own tokenizer; from_pretrained refuses the meta device (tiny: quick)
            vocab_size, device = load_tokenizer(section.path).get_vocab_size(), torch.device("cpu")
        with device:
            model = build_model(dataclasses.replace(section, vocab_size=vocab_size))
        assert sum(p.numel() for p in model.parameters()) > 0
    elif group == "data":
        train_files, val_files = data_files(section, tmp_path, config.seed)
        assert all(Path(path).is_file() for path in train_files + val_files)
    elif group == "optim":
        parameters = [torch.nn.Parameter(torch.zeros(2))]
        torch.optim.AdamW(parameters, section.lr, section.betas, section.eps, section.weight_decay)
    elif group == "logger":
        with initialize_config_module("sft.conf", version_base="1.3"):
            HydraConfig.instance().set_config(compose("train", overrides=overrides, return_hydra_config=True))
        try:
            logger = build_logger(config, tmp_path, {}, resume_step=None)
            assert isinstance(logger, L.pytorch.loggers.Logger)
        finally:
            HydraConfig.instance().cfg = None
    elif group == "experiment":
        preset = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{option}.yaml"))
        preset.pop("defaults", None)
        for section_name, values in preset.items():  # the preset wins over train.yaml
            for key, value in values.items():
                section = getattr(config, section_name)
                found = section[key] if isinstance(section, dict) else getattr(section, key)
                assert found == value, (section_name, key)


def check_plugin(group: str, option: str, cfg) -> None:
    launcher = cfg.hydra.launcher
    if (group, option) == ("hydra/launcher", "slurm"):
        # One task per GPU, so Lightning uses SLURM's processes instead of launching its own.
        assert launcher.tasks_per_node == launcher.gpus_per_node == cfg.hardware.devices
        assert launcher.nodes == cfg.hardware.num_nodes
        assert launcher.additional_parameters.signal == f"USR1@{launcher.signal_delay_s}"
    if (group, option) == ("hydra/launcher", "local"):
        assert launcher.tasks_per_node == 1  # DDP inside a local job spawns its own processes
    if (group, option) == ("hydra/sweeper", "optuna_lr"):
        assert cfg.hydra.sweeper.direction == "minimize" and "optim.lr" in cfg.hydra.sweeper.params


def test_the_slurm_launcher_writes_an_sbatch_script_with_the_requeue_signal(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from submitit.slurm.slurm import _make_sbatch_string

    overrides = ["hydra/launcher=slurm", "hardware=ddp", "hardware.devices=4", "hardware.num_nodes=2"]
    with initialize_config_module("sft.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    keep = ("partition", "nodes", "gpus_per_node", "tasks_per_node", "signal_delay_s", "setup")
    params = {key: OmegaConf.select(cfg, f"hydra.launcher.{key}") for key in keep}
    params["additional_parameters"] = dict(cfg.hydra.launcher.additional_parameters)
    params["ntasks_per_node"] = params.pop("tasks_per_node")
    script = _make_sbatch_string(command="sft-job", folder=str(tmp_path), **params, time=240, map_count=2)
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --array=0-1%2",
    ):
        assert line in script, (line, script)


def compose_train(*overrides: str):
    with initialize_config_module("sft.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_the_default_config_is_valid_typed_and_resolved():
    config = validate_config(compose_train())
    assert type(config) is TrainConfig and type(config.trainer) is dict
    assert config.protocol.seed == config.seed  # interpolations are resolved
    assert type(to_dict(config)["optim"]) is dict  # what checkpoints keep: plain containers


@pytest.mark.parametrize(
    "override,message",
    [
        ("+optim.lrr=1", "optim.lrr: unknown key; did you mean optim.lr?"),
        ("trainer.max_steps=abc", "trainer.max_steps='abc': expected int"),
        ("+trainer.max_stepz=3", "trainer.max_stepz: not an argument of lightning.Trainer; did you mean"),
        ("+trainer.devices=2", "trainer.devices: set by sft-train; use hardware.devices"),
        ("+trainer.logger=false", "trainer.logger: set by sft-train"),
        ("model.hidden_size=1.5", "model.hidden_size=1.5: expected int"),
        ("data.packing=maybe", "data.packing='maybe': expected bool"),
        ("tokenizer.name=sentencepiece", "tokenizer.name='sentencepiece': expected one of bpe, file"),
        ("+logger.project=x", "logger.project: unknown key"),  # csv takes no project
        ("+sed=1", "sed: unknown key; did you mean seed?"),
        ("+trainer.gradient_clip_val=0.5", "trainer.gradient_clip_val: set by sft-train; use optim.grad_clip"),  # noqa: E501
        ("protocol.mask=last", "protocol.mask='last': expected one of all_assistant, last_turn, all_tokens"),
        ("protocol.max_seq_len=long", "protocol.max_seq_len='long': expected int"),
    ],
)  # fmt: skip
def test_a_bad_key_or_type_is_named(override, message):
    with pytest.raises(ConfigError) as error:
        validate_config(compose_train(override))
    assert message in str(error.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError, match=r"3 problems") as error:
        validate_config(compose_train("+optim.lrr=1", "trainer.max_steps=abc", "+data.batchsize=2"))
    assert "data.batchsize: unknown key; did you mean data.batch_size?" in str(error.value)


def test_a_mandatory_value_left_unset_is_named():
    with pytest.raises(ConfigError, match=r"data.train is not set: give a list of files"):
        validate_config(compose_train("data=jsonl"))


def test_open_trainer_section_accepts_any_lightning_argument():
    overrides = [
        "+trainer.limit_val_batches=0.25",
        "+trainer.max_time=01:00:00",
    ]
    config = validate_config(compose_train(*overrides))
    assert config.trainer["limit_val_batches"] == 0.25


def test_wandb_logger_keys_are_checked_under_logger_wandb():
    assert validate_config(compose_train("logger=wandb", "logger.tags=[a,b]")).logger.tags == ["a", "b"]
    with pytest.raises(ConfigError, match="logger.projct: unknown key; did you mean logger.project?"):
        validate_config(compose_train("logger=wandb", "+logger.projct=x"))


ROOT = Path(__file__).resolve().parents[1]


def documented_commands() -> list[list[str]]:
    """The arguments of every `sft-train` command in the README's bash blocks (continuations joined)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "bin/sft-train" not in line:
                continue
            words = shlex.split(line, comments=True)
            entry = [i for i, word in enumerate(words) if word.endswith("bin/sft-train")]
            if entry:
                commands.append(words[entry[0] + 1 :])
    return commands


def slurm_script_command() -> list[str]:
    """The overrides that scripts/slurm_example.sh passes to sft-train, with SLURM's variables filled in."""
    script = (ROOT / "scripts" / "slurm_example.sh").read_text().replace("\\\n", " ")
    line = next(line for line in script.splitlines() if line.startswith("srun "))
    values = {"SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2", "RUN_DIR": "outputs/slurm/sft-1"}
    line = re.sub(r"\$\{(\w+)\}", lambda match: values[match.group(1)], line)
    assert re.search(r"--ntasks-per-node=(\d+)", script)[1] == re.search(r"--gpus-per-node=(\d+)", script)[1]
    return [word for word in shlex.split(line)[2:] if word != "$@"]


@pytest.mark.parametrize("args", [*documented_commands(), slurm_script_command()], ids=" ".join)
def test_documented_commands_compose_and_validate(args):
    """Each command's config as its first job would get it (sweeps take their first value)."""
    overrides = []
    for override in OverridesParser.create().parse_overrides([arg for arg in args if arg != "-m"]):
        if override.is_sweep_override():
            overrides.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}")
        else:
            overrides.append(override.input_line)
    for group, plugin in PLUGINS.items():
        if any(override.startswith(f"{group}=") for override in overrides):
            pytest.importorskip(plugin)
    with initialize_config_module("sft.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    for node in ("launcher", "sweeper"):
        OmegaConf.resolve(cfg.hydra[node])  # e.g. the SLURM task count from hardware.devices
    with open_dict(cfg):
        del cfg["hydra"]
    config = validate_config(cfg)
    assert trainer_kwargs(config, plan_hardware(config.hardware))["accelerator"] in ("cpu", "gpu")
