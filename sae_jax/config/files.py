"""Configs as files and as dotted overrides, on top of the frozen dataclasses.

A config is named by ``--config``: a preset (``seed``), a run's ``config.json``, or a
Python file defining ``get_config()`` (as flax's examples do). Any field can then be
overridden in the dotted style of ``ml_collections.config_flags``:
``--config.layers.0.beta=2 --config.finetune_optimizer.learning_rate=3e-4``.
Every result goes through ``Config.validate``; every mistake is a ``ConfigError``
whose one-line message names the file or the override at fault.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sae_jax.config.presets import get_preset
from sae_jax.config.schema import Config, LayerConfig, OptimizerConfig
from sae_jax.errors import CheckpointError, ConfigError
from sae_jax.files import read_json

RUN_KEY = "_run"  # a run's config.json keeps its run options (e.g. no pretraining) here


def config_to_json(config: Config) -> dict[str, Any]:
    """The config as JSON data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _build(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)``, with a ``ConfigError`` naming an unknown or missing field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be an object, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'the config'} has no field {unknown[0]!r}")
    try:
        return cls(**data)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or 'the config'}: {e}") from None


def config_from_json(data: dict[str, Any]) -> Config:
    """The inverse of ``config_to_json`` (keys starting with ``_`` are ignored);
    ``ConfigError`` for an unknown or missing field. Values are not validated."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    layers = data.get("layers")
    if not isinstance(layers, list):
        raise ConfigError(f"layers must be a list of layer objects, got {layers!r}")
    built = []
    for i, layer in enumerate(layers):
        where = f"layers[{i}]"
        if isinstance(layer, dict) and "optimizer" in layer:
            optimizer = _build(OptimizerConfig, layer["optimizer"], f"{where}.optimizer")
            layer = {**layer, "optimizer": optimizer}
        built.append(_build(LayerConfig, layer, where))
    data["layers"] = tuple(built)
    for key in ("softmax_optimizer", "finetune_optimizer"):
        if key in data:
            data[key] = _build(OptimizerConfig, data[key], key)
    return _build(Config, data, "")


def load_config(spec: str) -> tuple[Config, dict[str, Any]]:
    """The config named by ``spec`` and the run options saved with it.

    Args:
      spec: a preset name; a ``.json`` file (a run's ``config.json``, whose
        ``"_run"`` options, e.g. ``{"pretrain": false}``, are returned too); or a
        ``.py`` file whose ``get_config()`` returns a ``Config`` (or its JSON data).
        Paths are relative to the current directory, ``~`` expanded.

    Returns:
      ``(config, options)``, the config validated.
    """
    if not spec.endswith((".json", ".py")):
        return get_preset(spec), {}
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a readable JSON config ({e})") from None
        config = _checked(path, lambda: config_from_json(data))
        options = data.get(RUN_KEY, {}) if isinstance(data, dict) else {}
        return config, options if isinstance(options, dict) else {}
    return _checked(path, lambda: _from_python(path)), {}


def _checked(path: Path, make) -> Config:
    try:
        return make().validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _from_python(path: Path) -> Config:
    """Run ``path`` as a module and call its ``get_config()``."""
    spec = importlib.util.spec_from_file_location(f"_sae_jax_config_{path.stem}", path)
    assert spec is not None and spec.loader is not None  # a path always has both
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise ConfigError("defines no get_config()")
        config = module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # the user's code: report it in one line
        raise ConfigError(f"get_config() failed ({type(e).__name__}: {e})") from None
    if isinstance(config, dict):
        return config_from_json(config)
    if not isinstance(config, Config):
        raise ConfigError(
            f"get_config() must return a sae_jax Config (or its JSON data), "
            f"got {type(config).__name__}"
        )
    return config


def parse_value(text: str) -> Any:
    """An override's value: JSON (``2``, ``3e-4``, ``true``, ``null``, ``[1, 2]``), Python's
    ``True``/``False``/``None``, or else the text itself (``adam``)."""
    python = {"True": True, "False": False, "None": None}
    if text in python:
        return python[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _set(node: Any, keys: Sequence[str], value: Any, text: str, where: str = "") -> Any:
    """A copy of the JSON ``node`` with the field at ``keys`` set to ``value``."""
    key, rest = keys[0], keys[1:]
    here = f"{where}.{key}" if where else key
    if isinstance(node, list):
        if not (key.isdigit() and int(key) < len(node)):
            raise ConfigError(f"{where} has {len(node)} entries (0..{len(node) - 1}); got {key!r}")
        index = int(key)
        copy = list(node)
        copy[index] = _set(node[index], rest, value, text, here) if rest else value
        return copy
    if not isinstance(node, dict):
        raise ConfigError(f"{where} is a value, not a group of fields")
    if key not in node:
        raise ConfigError(f"no field {key!r} in {where or 'the config'}; fields: {', '.join(node)}")
    if rest:
        return {**node, key: _set(node[key], rest, value, text, here)}
    return {**node, key: _typed(here, node[key], value, text)}


def _typed(name: str, old: Any, value: Any, text: str) -> Any:
    """``value`` checked against the type of the value it replaces."""
    if isinstance(old, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} is true or false, got {text!r}")
    elif isinstance(old, (int, float)) and (isinstance(value, (str, bool, list, dict))):
        raise ConfigError(f"{name} is a number, got {text!r}")
    elif isinstance(old, str) and not isinstance(value, str):
        return text  # a name that looks like a number stays a name
    elif isinstance(old, (list, dict)) and type(value) is not type(old):
        raise ConfigError(f"{name} is a {type(old).__name__}, got {text!r}")
    return value


def apply_overrides(config: Config, overrides: Sequence[tuple[str, str]]) -> Config:
    """``config`` with each ``(dotted.field, text)`` of ``overrides`` set, in order.

    ``layers.0.beta`` is the field ``beta`` of the first layer; ``text`` is parsed by
    ``parse_value`` and must fit the type of the value it replaces. The result is
    validated once all are set (so ``noise=masking`` may come before ``noise_level``);
    a ``ConfigError`` names the override(s), as ``--config.<field>=<text>``.
    """
    data = config_to_json(config)
    for field, text in overrides:
        keys = field.split(".")
        try:
            if not all(keys):
                raise ConfigError("empty name in the dotted path")
            data = _set(data, keys, parse_value(text), text)
        except ConfigError as e:
            raise ConfigError(f"--config.{field}={text}: {e}") from None
    if not overrides:
        return config
    try:
        return config_from_json(data).validate()
    except ConfigError as e:
        flags = " ".join(f"--config.{field}={text}" for field, text in overrides)
        raise ConfigError(f"{flags}: {e}") from None


def with_defaults(data: dict[str, Any], validate: bool = False) -> dict[str, Any]:
    """A config's JSON with the fields added to ``Config`` since it was written at their
    defaults, its run options (``RUN_KEY``) kept; ``ConfigError`` if it is no config
    (with ``validate``, also if a value is invalid)."""
    config = config_from_json(data)
    if validate:
        config.validate()
    return config_to_json(config) | ({RUN_KEY: data[RUN_KEY]} if RUN_KEY in data else {})


def read_config(path: Path) -> dict[str, Any]:
    """The JSON of a run's ``config.json``, checked to be a valid config;
    ``CheckpointError`` naming the file if it is not. Fields added to ``Config``
    since the file was written come back with their defaults (``with_defaults``)."""
    data = read_json(path, "run's config")
    try:
        return with_defaults(data, validate=True)
    except Exception as e:  # wrong type, missing, unknown or invalid fields
        raise CheckpointError(f"{path}: not a sae_jax config ({type(e).__name__}: {e})") from None


def config_differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON configs differ, as ``path: old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += config_differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out += config_differences(a, b, f"{path}[{i}]")
        return out
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]
