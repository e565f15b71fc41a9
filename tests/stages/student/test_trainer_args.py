"""train.trainer_args: a valid key reaches the Trainer's args; an unknown key is named with the closest
field; each class of key the project owns is refused with its pointer or reason; resume rules."""
import pytest
from run_configs import make_config
from transformers import TrainerCallback, TrainingArguments

from pipeline.config import load_config
from stages.common.stage_config import save_config
from stages.student.runner import _check_same_config, run_train
from stages.student.trainer import training_arguments


class SeeArgs(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        self.args = args


def test_valid_keys_take_effect_in_the_trainers_args(tiny_model_dir, tiny_cache, tmp_path):
    extra = {"max_grad_norm": 0.25, "optim": "adafactor", "save_total_limit": 5, "accelerator_config": {"even_batches": False}}
    config = make_config(tiny_model_dir, tiny_cache, tmp_path / "run", max_steps=1, report_to="none", trainer_args=extra)
    seen = SeeArgs()
    run_train(config, callbacks=[seen])
    args = seen.args
    assert (args.max_grad_norm, args.optim, args.save_total_limit) == (0.25, "adafactor", 5)
    assert args.accelerator_config.even_batches is False
    assert (args.accelerator_config.dispatch_batches, args.accelerator_config.split_batches) == (False, False)
    assert args.learning_rate == config.train.learning_rate  # the project's keys still set
    # from YAML / command-line overrides too
    loaded = load_config(None, ["train.trainer_args.max_grad_norm=0.5", "train.trainer_args.gradient_checkpointing=true"])
    built = training_arguments(loaded.train, tmp_path, 30)
    assert built.max_grad_norm == 0.5 and built.gradient_checkpointing is True
    assert built.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_an_unknown_key_is_named_with_the_closest_field():
    with pytest.raises(ValueError, match=r"'gradient_checkpoint' \(did you mean 'gradient_checkpointing'\?\)"):
        load_config(None, ["train.trainer_args.gradient_checkpoint=true"])
    with pytest.raises(ValueError, match=r"not TrainingArguments fields.*'zzqx_not_a_field'$"):
        load_config(None, ["train.trainer_args.zzqx_not_a_field=1"])


@pytest.mark.parametrize("key, message", [
    # the project's own train.* fields: a pointer to the key
    ("learning_rate", "use train.learning_rate"),
    ("per_device_train_batch_size", "use train.batch_size"),
    ("gradient_accumulation_steps", "use train.grad_accum"),
    ("num_train_epochs", "use train.epochs"),
    ("max_steps", "use train.max_steps"),
    ("lr_scheduler_type", "use train.lr_scheduler"),
    ("warmup_steps", "use train.warmup_ratio"),
    ("weight_decay", "use train.weight_decay"),
    ("seed", "use train.seed"),
    ("bf16", "use train.bf16"),
    ("save_steps", "use train.save_steps"),
    ("logging_steps", "use train.logging_steps"),
    ("report_to", "use train.report_to"),
    ("output_dir", "use train.output_dir"),
    # what the project depends on: the reason
    ("remove_unused_columns", "teacher arrays are not forward"),
    ("label_names", "called without labels"),
    ("use_cpu", "DDP under torchrun"),
    ("average_tokens_across_devices", "labelled-token count summed over processes"),
    ("logging_dir", "tensorboard"),
    ("save_strategy", "resume"),
    ("logging_strategy", "log.csv"),
    ("include_num_input_tokens_seen", "token count"),
])
def test_keys_the_project_owns_are_refused_with_a_pointer(key, message):
    with pytest.raises(ValueError, match=rf"train\.trainer_args\.{key}: set by the project.*{message}"):
        load_config(None, [f"train.trainer_args.{key}=1"])


@pytest.mark.parametrize("key", ["dispatch_batches", "split_batches"])
def test_batch_dispatching_is_refused_inside_accelerator_config(key):
    with pytest.raises(ValueError, match=rf"accelerator_config\.{key}: set by the project.*not batch-major"):
        load_config(None, [f"train.trainer_args.accelerator_config={{{key}: true, even_batches: false}}"])


def test_every_argument_the_project_sets_is_refused_or_deliberately_open(tmp_path):
    """A field training_arguments() sets away from the TrainingArguments default must be one trainer_args
    refuses; the three left open are harmless to override (checkpoint count, DDP unused-parameter search,
    pinned memory)."""
    ours = training_arguments(load_config(None, []).train, tmp_path, 30).to_dict()
    default = TrainingArguments(output_dir=str(tmp_path / "checkpoints")).to_dict()
    differ = {k for k in ours if ours[k] != default.get(k)}
    open_keys = {"save_total_limit", "ddp_find_unused_parameters", "dataloader_pin_memory"}
    assert {"learning_rate", "remove_unused_columns", "report_to"} <= differ  # the comparison sees something
    overrides = [f"train.trainer_args.{key}=1" for key in sorted(differ - open_keys - {"accelerator_config"})]
    sub = ours["accelerator_config"]  # a mapping: its keys set away from the default, one by one
    overrides += [f"train.trainer_args.accelerator_config={{{k}: true}}" for k in sub if sub[k] != default["accelerator_config"][k]]
    assert len(overrides) == len(differ - open_keys)  # accelerator_config: exactly one key (dispatch_batches) differs
    for override in overrides:
        with pytest.raises(ValueError, match="set by the project"):
            load_config(None, [override])


def test_resume_accepts_checkpointing_changes_and_refuses_optimizer_ones(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(None, ["train.trainer_args.max_grad_norm=0.5"]), run / "config.yaml")
    ok = load_config(None, ["train.trainer_args.max_grad_norm=0.5", "train.trainer_args.gradient_checkpointing=true",
                            "train.trainer_args.gradient_checkpointing_kwargs={use_reentrant: true}", "train.report_to=none"])
    _check_same_config(ok, run / "config.yaml")
    changed = load_config(None, ["train.trainer_args.max_grad_norm=1.0"])
    with pytest.raises(ValueError, match=r"train\.trainer_args\.max_grad_norm: 0\.5 -> 1\.0"):
        _check_same_config(changed, run / "config.yaml")
    added = load_config(None, ["train.trainer_args.max_grad_norm=0.5", "train.trainer_args.optim=adafactor"])
    with pytest.raises(ValueError, match=r"train\.trainer_args\.optim: unset \(transformers default 'adamw_torch_fused'\) -> 'adafactor'"):
        _check_same_config(added, run / "config.yaml")


@pytest.mark.parametrize("override, message", [
    ("train.trainer_args.max_grad_norm=abc", "train.trainer_args.max_grad_norm: expected float, got 'abc'"),
    ("train.trainer_args.optim=adamw_nope", "train.trainer_args.optim: expected one of [[]'adamw_torch', "),
    ("train.trainer_args.gradient_checkpointing=maybe", "train.trainer_args.gradient_checkpointing: expected bool, got 'maybe'"),
    ("train.trainer_args.dataloader_num_workers=1.5", "train.trainer_args.dataloader_num_workers: expected int, got 1.5"),
])
def test_a_value_of_the_wrong_type_is_refused_when_the_config_is_read(override, message):
    """Not at the Trainer's first step, after the model loaded and the run directory was made."""
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_values_of_the_declared_types_pass():
    config = load_config(None, ["train.trainer_args={max_grad_norm: 1, optim: adafactor, save_total_limit: null, "
                                "gradient_checkpointing_kwargs: {use_reentrant: true}}"])
    assert config.train.trainer_args["optim"] == "adafactor"
