"""The conventions shared by the five scripts (README, "Conventions"): one vocabulary of flags, presets that
parse, concrete defaults in --help. Read from the scripts themselves, so a script that drifts fails here."""
import dataclasses
import importlib
import os
import re
import subprocess
import sys
import typing

import pytest

from conftest import REPO

SCRIPTS = ["wgan_optimizer_study", "alpha_dual_gan", "adaptive_wgan", "tempered_lens", "sqd_monitor"]

# Every script has these (infrastructure of a run).
EVERYWHERE = {"preset", "seed", "cuda", "threads", "matmul_precision", "track", "wandb_project_name", "output_dir",
              "run_name", "save_model", "resume", "dataset", "data_root", "batch_size", "lr"}
# A concept has one name and one type in every script that has it.
SHARED_TYPES = {
    "seed": int, "num_seeds": int, "cuda": bool, "threads": int, "track": bool, "wandb_project_name": str,
    "output_dir": str, "run_name": str | None, "save_model": bool, "resume": str | None, "data_root": str,
    "num_train": int, "batch_size": int, "lr": float, "epochs": int, "z_dim": int, "n_critic": int,
    "gp_weight": float, "fid_samples": int, "inception_weights": str | None,
    "fid_extractor": typing.Literal["inception", "digits"],
    "matmul_precision": typing.Literal["auto", "highest", "high", "medium"],
}
# Names that said the same thing differently before the conventions: never again.
RETIRED = {"critic_steps", "n_d", "gp_lambda", "nz", "num_samples", "num_train_samples", "fid_inception_weights",
           "torch_deterministic", "cells", "device"}
# The only fields whose default may be None: "nothing given" (no preset ever defines them).
MAY_BE_NONE = {"run_name", "resume", "inception_weights"}


def load(name):
    return importlib.import_module(name)


def unwrap(annotation):
    """tyro.conf.Suppress[X] and other Annotated wrappers → X."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def is_suppressed(annotation) -> bool:
    return typing.get_origin(annotation) is typing.Annotated and any(
        "Suppress" in repr(m) for m in typing.get_args(annotation)[1:])


def visible_fields(module):
    hints = typing.get_type_hints(module.Args, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(module.Args) if not is_suppressed(hints[f.name])}


@pytest.mark.parametrize("name", SCRIPTS)
def test_shared_vocabulary(name):
    fields = visible_fields(load(name))
    assert not EVERYWHERE - set(fields), f"{name} lacks {sorted(EVERYWHERE - set(fields))}"
    assert not RETIRED & set(fields), f"{name} still has {sorted(RETIRED & set(fields))} as flags"
    for field, expected in SHARED_TYPES.items():
        if field in fields:
            assert unwrap(fields[field]) == expected, f"{name}.Args.{field}: {fields[field]} is not {expected}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_dataset_is_a_choice(name):
    annotation = unwrap(visible_fields(load(name))["dataset"])
    assert typing.get_origin(annotation) is typing.Literal, f"{name}: --dataset is free text ({annotation})"


@pytest.mark.parametrize("name", SCRIPTS)
def test_presets_parse_and_define_every_value(name):
    module = load(name)
    assert {"default", "cpu-mini"} <= set(module.PRESETS), f"{name}: presets {sorted(module.PRESETS)}"
    preset_choices = set(typing.get_args(unwrap(visible_fields(module)["preset"])))
    assert preset_choices == set(module.PRESETS), f"{name}: --preset choices differ from PRESETS"
    for key, preset in module.PRESETS.items():
        assert isinstance(preset, module.Args) and preset.preset == key
        args = module.parse_args(["--preset", key])
        assert args == preset, f"{name} --preset {key} parsed to something else"
        for field in dataclasses.fields(module.Args):
            if field.name not in MAY_BE_NONE:
                assert getattr(preset, field.name) is not None, f"{name} preset {key}: {field.name} is None"
    # a flag after the preset overrides it, and only it
    args = module.parse_args(["--preset", "cpu-mini", "--seed", "123"])
    assert args == dataclasses.replace(module.PRESETS["cpu-mini"], seed=123)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_concrete_defaults(name):
    proc = subprocess.run([sys.executable, str(REPO / f"{name}.py"), "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    blocks = {}  # first flag of each option → its whole help text (rich boxes wrap it over several lines)
    flag = None
    for line in proc.stdout.splitlines():
        m = re.match(r"\W*(--[a-z0-9-]+)", line)
        if m:
            flag = m.group(1)[2:].replace("-", "_")
        if flag:
            blocks[flag] = blocks.get(flag, "") + line
    shown_none = {f for f, text in blocks.items() if "(default: None)" in text}
    assert shown_none <= MAY_BE_NONE, f"{name} --help shows None for {sorted(shown_none - MAY_BE_NONE)}"
    text = proc.stdout
    for flag in ("--preset", "--resume", "--matmul-precision", "--run-name"):
        assert flag in text, f"{name} --help lacks {flag}"
