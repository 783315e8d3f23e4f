"""One table spells every setting for the CLI, the settings JSON and the reproduce line: a setting
given on the command line comes back the same through each of them."""
from __future__ import annotations

import argparse
import dataclasses
import shlex

import pytest

from alignit_core import Settings, SettingsError
from alignit_core.cli import parser as cli_parser
from alignit_core.settings import (DEFAULTS, OPTIONS, add_arguments, from_args, from_record, resolve, to_args,
                                   to_record)

# a value other than the default for every option, as typed on a command line
TYPED = {"--seed": "7", "--steps": "12", "--guidance": "5.5", "--size": "96", "--scheduler": "euler",
         "--swap-uncond": None, "--swap-steps": "0.1 0.6", "--swap-kv": "v", "--swap-strength": "0.5",
         "--lora-rest": "0.25", "--long-prompt": "truncate", "--map-resolution": "8", "--map-blocks": "up",
         "--map-steps": "0.2 0.9"}


def _parse(args: list[str]) -> Settings:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return from_args(p.parse_args(args))


def test_every_option_has_a_typed_example_and_no_two_share_a_flag_or_key():
    assert sorted(TYPED) == sorted(o.flag for o in OPTIONS)
    assert len({o.key for o in OPTIONS}) == len(OPTIONS)
    covered = [n for o in OPTIONS for n in o.names]
    assert len(covered) == len(set(covered))
    # every Settings field but the API-only switch is spelled on the command line
    assert set(covered) == {f.name for f in dataclasses.fields(Settings)} - {"record_maps"}


@pytest.mark.parametrize("flag", sorted(TYPED))
def test_a_setting_survives_cli_json_and_reproduce_line(flag):
    typed = [flag] + (shlex.split(TYPED[flag]) if TYPED[flag] else [])
    s = _parse(typed)
    assert s != DEFAULTS  # the flag changed something
    assert from_record(to_record(s)) == s
    assert _parse(to_args(s)) == s


def test_no_flags_give_the_defaults_and_the_reproduce_line_names_only_what_differs():
    assert _parse([]) == DEFAULTS
    line = to_args(dataclasses.replace(DEFAULTS, seed=3, steps=4, swap_kv="k"))
    assert line[:4] == ["--seed", "3", "--steps", "4"] and "--swap-kv" in line and "--map-blocks" not in line


def test_the_generate_command_reads_the_same_table():
    args = cli_parser().parse_args(["generate", "--prompt", "a dog", "--out", "o", "--swap-kv", "k",
                                    "--map-steps", "0", "0.5", "--map-blocks", "up", "mid"])
    s = from_args(args)
    assert (s.swap_kv, s.map_start, s.map_end, s.map_blocks) == ("k", 0.0, 0.5, ("up", "mid"))


def test_resolve_fills_the_models_defaults_and_keeps_what_was_given(tiny_sd):
    s = resolve(tiny_sd, Settings(seed=2, swap_kv="v"))
    assert (s.steps, s.guidance, s.size, s.scheduler, s.seed, s.swap_kv) == (30, 7.5, 64, "ddim", 2, "v")
    assert resolve(tiny_sd, s) == s  # resolving twice changes nothing
    with pytest.raises(SettingsError, match="swap 'x' is not one of kv, k, v"):
        resolve(tiny_sd, Settings(swap_kv="x"))
