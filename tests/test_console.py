"""The console of a job (pipeline/console.py): what reaches the terminal, what only the log file keeps."""

import os
import re
import subprocess
import sys
import textwrap

from pipeline import console
from jobs.common import _pop_verbose

from tests.conftest import REPO


def test_only_our_lines_reach_the_terminal_and_worker_lines_lose_rays_prefix():
    worker = "\x1b[36m(RayTrainWorker pid=27250)\x1b[0m [train] step 10/24 epoch 1/2 loss 0.94870"
    assert console.for_console(worker) == "[train] step 10/24 epoch 1/2 loss 0.94870"
    assert console.for_console("(RayTrainWorker pid=1, ip=10.0.0.2) [train] step 3/9 [repeated 2x across cluster]") \
        == "[train] step 3/9"
    nested = "(MapWorker(MapBatches(FeatureActor)) pid=26884) Loading weights: 100%|##| 39/39"
    assert console.for_console(nested) is None
    assert console.for_console("[17:47:16] preprocess: 1 files, 0.1 MB") == "[17:47:16] preprocess: 1 files, 0.1 MB"
    assert console.for_console("error: --lr must be > 0") == "error: --lr must be > 0"
    for noise in ["(PlacementGroupCleaner pid=27757) Failed to query Ray Train Controller actor state.",
                  "2026-12-01 17:47:10,012\tWARNING authentication_token_setup.py:85 -- Token authentication",
                  "[2026-12-01 17:47:36,011 E 26423 26423] core_worker.cc:2465: Actor with class name",
                  "(RayTrainWorker pid=1) Found credentials in environment variables.",
                  "/x/execution_options.py:436: RayDeprecationWarning: `exclude_resources` is deprecated"]:
        assert console.for_console(noise) is None, noise


def test_secrets_in_urls_never_reach_the_log():
    line = "reading s3://AKIA123:s3cr3t@bucket/x and https://h/f?X-Amz-Signature=abc123&X-Amz-Credential=K%2F1 now"
    scrubbed = console.scrub(line)
    assert "s3cr3t" not in scrubbed and "abc123" not in scrubbed and "AKIA123" not in scrubbed and "K%2F1" not in scrubbed
    assert scrubbed.startswith("reading s3://REDACTED@bucket/x and https://h/f?X-Amz-Signature=REDACTED")


def test_verbose_is_taken_off_the_arguments():
    assert _pop_verbose(["--verbose", "--lr", "1"]) == (["--lr", "1"], True)
    assert _pop_verbose(["--verbose", "false", "--overwrite"]) == (["--overwrite"], False)
    assert _pop_verbose(["--verbose=true"]) == ([], True)
    assert _pop_verbose(["--a", "b"]) == (["--a", "b"], False)


_SCRIPT = textwrap.dedent("""
    import os, sys, warnings
    from pipeline import console
    from pipeline.console import log
    with console.session("probe", verbose={verbose}):
        log("probe: start")
        print("(RayTrainWorker pid=7) [train] step 1/2 loss 0.5")
        print("(RayTrainWorker pid=7) [train] step 1/2 loss 0.5")  # the same line again: shown once
        print("(TrainController pid=8) Requesting resources: {{'CPU': 1}} * 1")
        warnings.warn("`x` is deprecated", DeprecationWarning, stacklevel=1)
        os.write(2, b"[2026-12-01 17:47:36,011 E 1 1] core_worker.cc:2465: C++ writes to fd 2 directly\\n")
        sys.stdout.write("Loading weights: 100%|##| 39/39\\r\\n")
        log("probe: done s3://KEY:SECRET@bucket/x")
""")


def _probe(tmp_path, verbose: bool) -> tuple[list[str], str]:
    env = {**os.environ, "BERTRAM_LOG_DIR": str(tmp_path / "logs"), "PYTHONWARNINGS": "always"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(verbose=verbose)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (log,) = (tmp_path / "logs").glob("probe-*.log")
    return out.stderr.splitlines() + out.stdout.splitlines(), log.read_text(encoding="utf-8")


def test_a_session_shows_ours_once_and_keeps_every_line_in_the_log(tmp_path):
    shown, full = _probe(tmp_path, verbose=False)
    text = [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", line) for line in shown]
    assert text[:3] == ["probe: start", "[train] step 1/2 loss 0.5", "probe: done s3://REDACTED@bucket/x"]
    assert len(shown) == 4 and shown[3].split("] ", 1)[1].startswith("full log: ")
    for kept in ("Requesting resources", "is deprecated", "core_worker.cc", "Loading weights", "probe: start"):
        assert kept in full, kept
    assert full.count("[train] step 1/2") == 2 and "SECRET" not in full


def test_verbose_shows_everything(tmp_path):
    shown, _ = _probe(tmp_path, verbose=True)
    joined = "\n".join(shown)
    assert "Requesting resources" in joined and "core_worker.cc" in joined and "is deprecated" in joined


def test_progress_lines_carry_rate_and_eta(monkeypatch, capsys):
    monkeypatch.setattr(console, "PROGRESS_EVERY_S", 0.0)
    assert list(console.progress(iter([2, 3, 5]), total=10, unit="words", desc="probe", count=lambda n: n)) == [2, 3, 5]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2  # after the first and second items; the last one is the stage's own end line
    assert "probe: 2/10 words (20%)" in lines[0] and "/s, ETA " in lines[0]
    assert console.format_progress(12_480, 46_720, 52.9, "contexts") == "12,480/46,720 contexts (27%), 235.9/s, ETA 2m25s"
