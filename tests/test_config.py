"""Typed configs: flags, YAML presets, --help from docstrings, clear errors; every shipped preset parses."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs.preprocess import PreprocessConfig
from jobs.run import RunConfig
from pipeline.config import ConfigError, help_text, parse

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))


@dataclass
class Toy:
    """A toy config."""

    name: str
    """The name."""
    steps: int = 3
    """How many steps."""
    rate: float = 0.5
    """A rate."""
    flag: bool = False
    """A switch."""
    note: str | None = None
    """Optional note."""


def test_flags_both_styles_and_bare_bool():
    cfg = parse(Toy, ["--name", "x", "--steps=7", "--flag", "--rate", "2"])
    assert (cfg.name, cfg.steps, cfg.rate, cfg.flag, cfg.note) == ("x", 7, 2.0, True, None)
    assert parse(Toy, ["--name=x", "--flag", "false"]).flag is False


def test_yaml_then_flags_override(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("name: from-yaml\nsteps: 11\n")
    cfg = parse(Toy, ["--config", str(preset), "--steps", "12"])
    assert (cfg.name, cfg.steps) == ("from-yaml", 12)


@pytest.mark.parametrize("argv, message", [
    (["--name", "x", "--stepz", "3"], "did you mean --steps"),
    (["--name", "x", "--steps", "three"], "--steps: expected int"),
    (["--name", "x", "--flag", "maybe"], "unexpected argument"),
    (["--steps", "3"], "missing required --name"),
    (["--name"], "--name: a value is required"),
])
def test_bad_flags_name_the_field(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(Toy, argv)


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        parse(Toy, ["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse(Toy, ["--config", str(bad)])


def test_help_lists_every_field_with_doc_and_default():
    text = help_text(PreprocessConfig, "python -m jobs.preprocess", "doc")
    for name in ("corpus", "output", "words", "min_count_target", "num_buckets", "max_contexts_per_word",
                 "context_window", "lowercase", "overwrite"):
        assert f"--{name} " in text
    assert "Words occurring at least this often get contexts" in text
    assert "(default: 100)" in text and "(required)" in text


def test_checks_in_post_init():
    with pytest.raises(ConfigError, match="--num_buckets must be >= 1"):
        parse(PreprocessConfig, ["--corpus", "c", "--output", "o", "--num_buckets", "0"])
    for output in ("c/", "c/out"):
        with pytest.raises(ConfigError, match="must not be --corpus or inside it"):
            parse(PreprocessConfig, ["--corpus", "c", "--output", output])


def test_nested_sections_take_dotted_flags():
    cfg = parse(RunConfig, ["--preprocess.num_buckets", "3", "--output", "o"])
    assert cfg.preprocess.num_buckets == 3 and cfg.output == "o"


@pytest.mark.parametrize("preset", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(preset):
    first_line = preset.read_text().splitlines()[0]
    assert first_line.startswith("# python -m jobs."), "a preset's first line is the command that runs it"
    cfg = parse(RunConfig, ["--config", str(preset)])
    assert cfg.output and cfg.corpus
