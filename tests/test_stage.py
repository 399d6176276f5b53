"""jobs/stage.py: the one way every job checks, skips or resets, works and commits its output."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from jobs.stage import Stage, upstream
from pipeline import manifest, storage
from pipeline.config import ConfigError


@dataclass(kw_only=True)
class ToyConfig:
    """A stage that writes its words in upper case."""

    words: str
    output: str
    kind: str = "upper"
    bad: bool = False
    overwrite: bool = False


def _toy(calls: list[str], **fields) -> Stage:
    def inputs(config: ToyConfig) -> dict:
        calls.append("inputs")
        return {"words": storage.read_text(config.words)}

    def check(config: ToyConfig) -> list[str]:
        calls.append("check")
        if config.bad:
            raise ConfigError("--bad: the check failed; pass --bad false")
        return storage.read_text(config.words).split()

    def work(config: ToyConfig, words: list[str]) -> dict:
        calls.append("work")
        storage.write_text(storage.join(config.output, "words.txt"), " ".join(w.upper() for w in words))
        return {"words": len(words)}

    return Stage(**{"name": "toy {kind}", "config": ToyConfig, "outputs": ("words.txt", "sub"), "inputs": inputs,
                    "check": check, "work": work, "done": lambda c, m: f"{m['words']} words", **fields})


@pytest.fixture
def words(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("kumquat apple")
    return path


def test_a_stage_works_then_commits_and_a_rerun_skips(tmp_path, words, capsys):
    calls: list[str] = []
    stage, config = _toy(calls), ToyConfig(words=str(words), output=str(tmp_path / "out"))
    result = stage.run(config)
    assert calls == ["inputs", "check", "work"]
    assert (tmp_path / "out" / "words.txt").read_text() == "KUMQUAT APPLE"
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert written == result and result["stage"] == "toy upper" and result["words"] == 2
    assert result["inputs"] == {"words": "kumquat apple"} and result["config"]["kind"] == "upper"
    assert "toy upper: 2 words" in capsys.readouterr().err  # the end line, after the commit

    calls.clear()
    assert stage.run(config) == result and calls == ["inputs"]  # complete, same inputs and settings: reused
    assert "is complete (manifest.json); skipping" in capsys.readouterr().err


def test_changed_inputs_redo_the_stage_and_other_settings_are_one_line(tmp_path, words):
    calls: list[str] = []
    stage, config = _toy(calls), ToyConfig(words=str(words), output=str(tmp_path / "out"))
    stage.run(config)
    words.write_text("river")
    calls.clear()
    assert stage.run(config)["words"] == 1 and calls == ["inputs", "check", "work"]
    assert (tmp_path / "out" / "words.txt").read_text() == "RIVER"
    with pytest.raises(storage.UserError, match=r"complete toy lower output made with other settings .*kind"):
        stage.run(ToyConfig(words=str(words), output=str(tmp_path / "out"), kind="lower"))
    assert stage.run(ToyConfig(words=str(words), output=str(tmp_path / "out"), kind="lower", overwrite=True))


def test_the_checks_run_before_the_output_is_touched(tmp_path, words):
    stage, config = _toy([]), ToyConfig(words=str(words), output=str(tmp_path / "out"))
    stage.run(config)
    words.write_text("river")  # the output is stale now, but the check fails: it stays as it was
    with pytest.raises(ConfigError, match="the check failed"):
        stage.run(ToyConfig(words=str(words), output=str(tmp_path / "out"), bad=True))
    assert (tmp_path / "out" / "words.txt").read_text() == "KUMQUAT APPLE"
    assert manifest.is_complete(str(tmp_path / "out"))


def test_a_reset_deletes_only_the_stage_own_names_keeps_what_it_keeps_and_refuses_a_user_directory(tmp_path, words):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "stale.txt").write_text("old")
    (out / "kept").mkdir()
    (out / "kept" / "reused.txt").write_text("a sub-output the stage reuses")
    _toy([], keep=("kept",)).run(ToyConfig(words=str(words), output=str(out)))
    assert not (out / "sub").exists() and (out / "kept" / "reused.txt").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("a user's file")
    with pytest.raises(storage.UserError, match="holds files that are not a toy upper output"):
        _toy([]).run(ToyConfig(words=str(words), output=str(mine)))
    assert (mine / "notes.md").read_text() == "a user's file" and not (mine / "words.txt").exists()


def test_a_stage_that_resumes_resets_nothing_itself(tmp_path, words):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").mkdir()
    (out / "sub" / "checkpoint").write_text("step 40")
    _toy([], reset=False).run(ToyConfig(words=str(words), output=str(out)))
    assert (out / "sub" / "checkpoint").read_text() == "step 40"


def test_upstream_stamps_a_job_output_or_names_the_job_to_run_first(tmp_path):
    done, partial = str(tmp_path / "pre"), str(tmp_path / "partial")
    storage.make_dirs(done)
    written = manifest.write(done, "preprocess", {}, 0.0)
    assert upstream(preprocessed=(done, "jobs.preprocess")) == {"preprocessed_at": written["finished_at"]}
    assert upstream(init=(partial, None)) == {"init_at": None}  # any output: None while incomplete
    with pytest.raises(ConfigError, match=r"--targets .*partial holds no complete jobs.targets output.*run jobs.targets"):
        upstream(targets=(partial, "jobs.targets"))
    with pytest.raises(ConfigError, match="is a preprocess output, not a jobs.targets output"):
        upstream(targets=(done, "jobs.targets"))
