import pytest

from aurora_core.cli import arg_parser, config_from_args
from aurora_core.config import DEFAULT_CONFIG, ConfigError, Source, flatten, load_config, to_dict


def test_tiny_default_loads_and_overrides_apply():
    cfg = load_config(DEFAULT_CONFIG, ["data.synthetic.train_clips=7", "run.name=exp1", "data.source=refavs"])
    assert cfg.data.synthetic.train_clips == 7
    assert cfg.run.name == "exp1"
    assert cfg.data.source is Source.refavs
    assert cfg.run.dir.name == "exp1"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config(DEFAULT_CONFIG, ["data.no_such_key=1"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="train_clips"):
        load_config(DEFAULT_CONFIG, ["data.synthetic.train_clips=many"])


def test_bad_enum_value():
    with pytest.raises(ConfigError, match="source"):
        load_config(DEFAULT_CONFIG, ["data.source=imagenet"])


def test_range_check():
    with pytest.raises(ConfigError, match="frame_size"):
        load_config(DEFAULT_CONFIG, ["data.frame_size=2"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(DEFAULT_CONFIG, ["data.frame_size"])


def test_bad_yaml_file_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  frame_sise: 32\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*frame_sise"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_exits_2_with_message(capsys):
    args = arg_parser("x").parse_args(["data.nope=1"])
    with pytest.raises(SystemExit) as e:
        config_from_args(args)
    assert e.value.code == 2
    assert "data.nope" in capsys.readouterr().err


def test_flatten_round_trip_types():
    flat = flatten(to_dict(load_config()))
    assert flat["data.source"] == "synthetic"
    assert flat["data.synthetic.seed"] == 0


def test_weight_sync_mode_and_its_check():
    from aurora_core.rl.weight_sync import backend, sync_mode

    with pytest.raises(ConfigError, match="weight_sync"):
        load_config(DEFAULT_CONFIG, ["grpo.weight_sync=nccl"])
    tiny = load_config(DEFAULT_CONFIG)
    assert (sync_mode(tiny.grpo), backend(tiny.grpo)) == ("object_store", "gloo")
    forced = load_config(DEFAULT_CONFIG, ["grpo.weight_sync=broadcast"])
    assert (sync_mode(forced.grpo), backend(forced.grpo)) == ("broadcast", "gloo")
    real = load_config(DEFAULT_CONFIG.parent / "qwen2.5-omni-7b.yaml")
    assert (sync_mode(real.grpo), backend(real.grpo)) == ("broadcast", "nccl")


def test_grpo_length_limit_must_hold_the_answer():
    with pytest.raises(ConfigError, match=r"grpo.max_new_tokens=110 is below model.max_answer_tokens=120"):
        load_config(DEFAULT_CONFIG, ["grpo.max_new_tokens=110"])
    cfg = load_config(DEFAULT_CONFIG, ["grpo.max_new_tokens=40", "grpo.allow_truncation=true"])
    assert cfg.grpo.max_new_tokens == 40
    for bad in ("grpo.loss_agg=sum", "grpo.overlong=drop", "eval.no_seg=maybe", "eval.protocol=mine"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(DEFAULT_CONFIG, [bad])


def test_worker_env_leaves_the_accelerator_to_each_process():
    """A GPU GRPO learner in a run whose supervised stages are on CPUs must not inherit
    DS_ACCELERATOR=cpu: the workers' environment does not set it, each process picks its own."""
    from aurora_core.runtime import worker_env

    for use_gpu in ("false", "true"):
        env = worker_env(load_config(DEFAULT_CONFIG, [f"train.use_gpu={use_gpu}", "grpo.use_gpu=true"]))
        assert "DS_ACCELERATOR" not in env
