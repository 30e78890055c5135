"""Configs from files (a run's config.json, a Python get_config()) and dotted overrides."""

import dataclasses
import json
import textwrap

import pytest

from sae_jax.commands import flags as cli
from sae_jax.config import sda3, tiny
from sae_jax.config.files import apply_overrides, config_to_json, load_config, parse_value
from sae_jax.errors import ConfigError


@pytest.mark.parametrize("preset", [tiny, sda3])
def test_a_saved_config_json_loads_back_to_the_same_config(tmp_path, preset):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**config_to_json(preset()), "_run": {"pretrain": False}}))
    config, options = load_config(str(path))
    assert config == preset() and options == {"pretrain": False}
    assert load_config("tiny") == (tiny(), {})


def test_a_python_file_defines_get_config(tmp_path):
    path = tmp_path / "my_config.py"
    path.write_text(
        textwrap.dedent("""
        import dataclasses
        from sae_jax.config import tiny

        def get_config():
            base = tiny()
            layer = dataclasses.replace(base.layers[0], features=48, noise="masking",
                                        noise_level=0.25)
            return base.replace(name="mine", layers=(layer,), batch_size=20)
        """)
    )
    config, options = load_config(str(path))
    assert (config.name, config.batch_size, options) == ("mine", 20, {})
    assert config.layers[0] == dataclasses.replace(
        tiny().layers[0], features=48, noise="masking", noise_level=0.25
    )
    # get_config() may also return the JSON data
    path.write_text(f"def get_config():\n    return {config_to_json(tiny())!r}\n")
    assert load_config(str(path))[0] == tiny()


@pytest.mark.parametrize(
    "body,message",
    [
        ("x = 1\n", "my.py: defines no get_config()"),
        ("def get_config():\n    return 1 / 0\n", "get_config() failed (ZeroDivisionError"),
        ("def get_config():\n    return 'tiny'\n", "must return a sae_jax Config"),
        (
            "from sae_jax.config import tiny\n\ndef get_config():\n"
            "    return tiny().replace(batch_size=0)\n",
            "my.py: batch_size must be a positive integer, got 0",
        ),
    ],
)
def test_a_bad_python_config_is_one_named_error(tmp_path, body, message):
    (tmp_path / "my.py").write_text(body)
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "my.py"))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "config.json: config file not found"),
        ("{not json", "config.json: not a readable JSON config"),
        ('{"layers": 3}', "config.json: layers must be a list of layer objects"),
        ("edit", "config.json: layers[1] has no field 'betta'"),
        ("drop", "config.json: layers[0].optimizer has no field 'lr'"),
        ("invalid", "config.json: layers[0].rho must be in (0, 1), got 2.0"),
    ],
)
def test_a_bad_json_config_is_one_named_error(tmp_path, content, message):
    path = tmp_path / "config.json"
    data = config_to_json(tiny())
    if content == "edit":
        data["layers"][1]["betta"] = 1.0
    elif content == "drop":
        data["layers"][0]["optimizer"]["lr"] = 1.0
    elif content == "invalid":
        data["layers"][0]["rho"] = 2.0
    if content is not None:
        path.write_text(content if content[0] in "{[" else json.dumps(data))
    with pytest.raises(ConfigError, match=r"^[^\n]*$") as e:
        load_config(str(path))
    assert message in str(e.value)


def test_overrides_set_nested_fields_with_their_types():
    config = apply_overrides(
        tiny(),
        [
            ("layers.0.beta", "2"),
            ("finetune_optimizer.learning_rate", "3e-4"),
            ("layers.1.noise", "masking"),  # valid only with the next one: checked at the end
            ("layers.1.noise_level", "0.3"),
            ("layers.1.tied", "true"),
            ("layers.0.top_k", "8"),
            ("test_examples", "None"),
            ("name", "123"),  # a name that looks like a number stays text
        ],
    )
    first, second = config.layers
    assert first == dataclasses.replace(tiny().layers[0], beta=2, top_k=8)
    assert (second.noise, second.noise_level, second.tied) == ("masking", 0.3, True)
    assert config.finetune_optimizer.learning_rate == 3e-4
    assert (config.test_examples, config.name) == (None, "123")
    assert apply_overrides(tiny(), []) == tiny()


@pytest.mark.parametrize(
    "field,text,message",
    [
        ("layers.0.bta", "2", "--config.layers.0.bta=2: no field 'bta' in layers.0; fields: "),
        ("layerz", "2", "--config.layerz=2: no field 'layerz' in the config; fields: name, "),
        ("layers.2.beta", "2", "--config.layers.2.beta=2: layers has 2 entries (0..1); got '2'"),
        ("layers.0.beta.x", "2", "--config.layers.0.beta.x=2: layers.0.beta is a value"),
        ("layers..beta", "2", "--config.layers..beta=2: empty name in the dotted path"),
        ("layers.0.tied", "yes", "--config.layers.0.tied=yes: layers.0.tied is true or false"),
        ("batch_size", "abc", "--config.batch_size=abc: batch_size is a number, got 'abc'"),
        ("batch_size", "0", "--config.batch_size=0: batch_size must be a positive integer"),
        ("batch_size", "2.5", "--config.batch_size=2.5: batch_size must be a positive integer"),
        ("layers.0.noise", "blur", "layers[0].noise must be one of none, masking, gaussian"),
        ("layers", "[]", "--config.layers=[]: layers must hold at least one layer"),
        ("finetune_optimizer.name", "lbfgs", "finetune_optimizer.name must be one of adam"),
    ],
)
def test_a_bad_override_is_one_line_naming_it(field, text, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(tiny(), [(field, text)])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_values_parse_as_json_python_literals_or_text():
    assert [parse_value(t) for t in ("2", "3e-4", "true", "False", "null", "adam", "[1, 2]")] == [
        2,
        3e-4,
        True,
        False,
        None,
        "adam",
        [1, 2],
    ]


def test_the_parser_collects_overrides_in_order_in_both_spellings(capsys):
    p = cli.parser(None)
    flags = p.parse_args(["--config=tiny", "--config.layers.0.beta=2", "--config.seed", "5"])
    assert flags.config == "tiny"
    assert flags.config_overrides == [("layers.0.beta", "2"), ("seed", "5")]
    for argv, message in [
        (["--config.seed"], "--config.seed: give a value, e.g. --config.seed=2"),
        (["--config.seed=1", "--bogus"], "unrecognized arguments: --bogus"),
    ]:
        with pytest.raises(SystemExit) as e:
            p.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
