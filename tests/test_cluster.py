"""The cluster configs in cluster/: Ray's own schema for the launcher YAML, the fields a KubeRay
RayJob needs, and that every `python -m jobs.X ...` command they name would start (module
exists, --config exists, every flag is a field of the job's config). Nothing is launched."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from jobs.cli import JOBS

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"

# jobs modules that cluster/ files may name before they exist (e.g. "train" while jobs/train.py
# is being built): their commands are not checked. Remove a name once its module lands.
PLANNED: set[str] = set()

# Places where a `python -m jobs.X` (or `bertram X`) command counts as one a user would run.
COMMAND_FILES = sorted(CLUSTER.glob("*.yaml")) + sorted(CLUSTER.glob("*.sh")) + [CLUSTER / "README.md",
                                                                                 REPO / "README.md"]


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- (1) the Ray cluster launcher config -------------------------------------------------------

def test_launcher_config_passes_rays_own_validation():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load("aws-gpu.yaml")
    # What `ray up` does before it talks to AWS (commands._bootstrap_config): prepare_config
    # merges the AWS defaults, the setup commands and the per-type worker bounds (no network),
    # then validate_config checks ray-schema.json. Not called here, because they need AWS
    # credentials and network: the provider's fillout_available_node_types_resources
    # (unneeded: every node type lists its resources) and bootstrap_config (IAM, subnets, keys).
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)

    # The schema has teeth: a misspelt key in a node type is rejected.
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["resource"] = bad["available_node_types"]["gpu_worker"].pop("resources")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))

    assert config["provider"]["type"] == "aws" and config["provider"]["region"] == "us-west-2"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU", 0) > 0, "the head runs data tasks: give it its CPUs"
    assert not head["resources"].get("GPU")
    gpu = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert len(gpu) == 1, gpu
    (worker,) = gpu.values()
    assert worker["resources"]["GPU"] == 1
    assert worker["node_config"]["InstanceType"] == "g5.xlarge"
    assert (worker["min_workers"], worker["max_workers"]) == (0, 8)
    assert worker["max_workers"] <= config["max_workers"]
    assert worker["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")

    # Ray on the nodes is the version the client runs (the launcher requires it).
    setup = config["head_setup_commands"] + config["worker_setup_commands"]
    pins = {m.group(1) for cmd in setup for m in re.finditer(r"\bray(?:\[[^\]]*\])?==([\w.]+)", cmd)}
    assert pins == {ray.__version__}, pins

    # The synced repository is installed on every node.
    assert config["file_mounts"] == {"~/bertram": "."}
    for cmds in (config["head_setup_commands"], config["worker_setup_commands"]):
        assert any(re.search(r"pip install .*-e ~/bertram\b", c) for c in cmds), cmds
        assert any(re.search(r"pip install .*\btorch\b", c) for c in cmds), cmds
    excluded = {p.strip("/").removeprefix("**/").removesuffix("/**") for p in config["rsync_exclude"]}
    assert {".venv", ".cache", "out", ".git"} <= excluded, excluded

    head_start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=0.0.0.0" in head_start
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])


# --- (2) the KubeRay RayJob --------------------------------------------------------------------

def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_kuberay_rayjob_has_the_fields_a_rayjob_needs():
    import ray
    from ray.runtime_env import RuntimeEnv

    job = _load("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.run ")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"].get("num-cpus") != "0", "the head runs data tasks: give it its CPUs"
    groups = [head, *cluster["workerGroupSpecs"]]
    for group in groups:
        # Kubernetes rejects non-string values in this map[string]string.
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), group["rayStartParams"]
        for c in _containers(group):
            repo, _, tag = c["image"].partition(":")
            assert repo == "rayproject/ray" and tag.split("-")[0] == ray.__version__, c["image"]

    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") == "1" for c in _containers(g))]
    assert len(gpu_groups) == 1, "one worker group whose container asks for nvidia.com/gpu: \"1\""
    (gpu,) = gpu_groups
    assert gpu["groupName"]
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert all(c["image"].endswith("-gpu") for c in _containers(gpu))
    assert any(t.get("key") == "nvidia.com/gpu" for t in gpu["template"]["spec"].get("tolerations", []))

    # The runtime env is one Ray accepts, and installs what the stock image lacks: every
    # dependency of pyproject.toml except Ray itself (the image's Ray must stay).
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)
    assert env["working_dir"].endswith(".zip")
    assert "ray" not in {_norm(re.match(r"[A-Za-z0-9_.-]+", p).group()) for p in env["pip"]}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("tomllib (Python 3.11+) reads pyproject.toml for the pip check")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {_norm(re.match(r"[A-Za-z0-9_.-]+", d).group()) for d in deps} - {"ray"}
    pip = {_norm(re.match(r"[A-Za-z0-9_.-]+", p).group()) for p in env["pip"]}
    assert wanted <= pip, f"runtimeEnvYAML pip lacks {sorted(wanted - pip)}"


# --- (3) every `python -m jobs.X ...` named in cluster/ would start ----------------------------

_COMMAND = re.compile(r"(?:\bpython3? -m jobs\.|(?:^|(?<=[\s`(]))(?:\.venv/bin/)?bertram )(\w+)([^`\"\n]*)",
                      re.MULTILINE)
_SHELL_STOP = {"|", "||", "&&", ";", "&", ">", ">>", "2>&1"}


def _commands_in(text: str) -> list[tuple[str, list[str]]]:
    text = text.replace("\\\n", " ")
    out = []
    for m in _COMMAND.finditer(text):
        if not m.group(0).startswith("python") and m.group(1) not in JOBS:
            continue  # "bertram" in prose, not the command
        args = []
        for tok in shlex.split(m.group(2), comments=True):
            if tok in _SHELL_STOP:
                break
            args.append(tok)
        if "--help" not in args:
            out.append((m.group(1), args))
    return out


def _yaml_strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _yaml_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _yaml_strings(v)
    elif isinstance(node, str):
        yield node


def _all_commands() -> list[tuple[str, str, list[str]]]:
    """(where, module, args) for every jobs command in COMMAND_FILES: their text (comments and
    code blocks included), their YAML string values, and what local-head.sh --print prints."""
    found = []
    for path in COMMAND_FILES:
        text = path.read_text()
        if path.suffix == ".md":  # the commands of its code blocks (prose names jobs too)
            text = "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL))
        where = str(path.relative_to(REPO))
        found += [(where, mod, args) for mod, args in _commands_in(text)]
        if path.suffix == ".yaml":
            for doc in yaml.safe_load_all(text):
                for s in _yaml_strings(doc):
                    found += [(f"{where} (value)", mod, args) for mod, args in _commands_in(s)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    printed = subprocess.run(["bash", str(CLUSTER / "local-head.sh"), "--print"], env=env,
                             capture_output=True, text=True, check=True, timeout=60).stdout
    found += [("local-head.sh --print", mod, args) for mod, args in _commands_in(printed)]
    return found


def _config_class(module) -> type:
    """The job's config dataclass: the one `...Config` dataclass the module defines."""
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == module.__name__
               and v.__name__.endswith("Config")]
    assert len(classes) == 1, f"{module.__name__}: expected one *Config dataclass, found {classes}"
    return classes[0]


def test_every_jobs_command_in_cluster_files_would_start(monkeypatch):
    from pipeline.config import parse

    monkeypatch.chdir(REPO)  # --config paths are relative to the repository root
    commands = _all_commands()
    where_run = {where for where, mod, _ in commands if mod == "run"}
    for name in ("cluster/kuberay-rayjob.yaml", "cluster/kuberay-rayjob.yaml (value)", "cluster/aws-gpu.yaml",
                 "cluster/README.md", "README.md", "local-head.sh --print"):
        assert name in where_run, f"no `python -m jobs.run` command found in {name}"

    for planned in PLANNED:
        assert not (REPO / "jobs" / f"{planned}.py").exists(), f"jobs/{planned}.py exists: remove it from PLANNED"

    checked = 0
    for where, mod, args in commands:
        if mod in PLANNED:
            continue
        assert (REPO / "jobs" / f"{mod}.py").is_file(), f"{where}: python -m jobs.{mod}: no jobs/{mod}.py"
        for i, arg in enumerate(args):
            if arg == "--config" or arg.startswith("--config="):
                path = arg.partition("=")[2] or args[i + 1]
                assert (REPO / path).is_file(), f"{where}: --config {path} does not exist"
        cls = _config_class(importlib.import_module(f"jobs.{mod}"))
        # Raises ConfigError on an unknown flag (with the closest field) or a value of the wrong type.
        config = parse(cls, list(args), prog=f"python -m jobs.{mod}")
        assert isinstance(config, cls)
        checked += 1
    assert checked >= 5
    assert {"serve", "infer", "preprocess"} <= {mod for where, mod, _ in commands if where == "README.md"}


# --- (4) the local-head script ---------------------------------------------------------------

def test_local_head_script_is_valid_bash():
    script = CLUSTER / "local-head.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert re.search(r"ray start --head .*--num-cpus=.*--dashboard-host=127\.0\.0\.1 .*--dashboard-port=", text,
                     re.S)
    assert "--disable-usage-stats" in text and "ray stop --force" in text and "RAY_AUTH_MODE" in text
    assert os.access(script, os.X_OK)
    bad = subprocess.run(["bash", str(script), "--no-such-option"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2


# --- (5) the runtime env of `ray job submit` --------------------------------------------------

def test_runtime_env_uploads_the_code_without_the_venv():
    from ray._private.runtime_env.packaging import _get_excludes
    from ray.runtime_env import RuntimeEnv

    env = _load("runtime_env.yaml")
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own type checks (excludes: list[str], env_vars: dict[str, str], ...)
    assert env["working_dir"] == "."
    secret = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
    assert not [k for k in env.get("env_vars", {}) if secret.search(k)], "no credentials in runtime_env.yaml"

    # Ray's own matcher, as in packaging the working_dir: the directories themselves must
    # match, so that Ray skips them instead of walking them.
    excluded = _get_excludes(REPO, env["excludes"])
    for path in (".venv", ".venv/bin/python", ".cache", ".git", "out", "out/demo/manifest.json"):
        assert excluded(REPO / path), f"{path} would be uploaded"
    for path in ("jobs/run.py", "jobs/configs/bert-base.yaml", "pipeline/config.py", "pyproject.toml"):
        assert not excluded(REPO / path), f"{path} would be left out"


# --- (4) the Serve config for `serve deploy` -----------------------------------------------------

def test_serve_config_passes_serves_schema_and_builds_the_application(tmp_path, tiny_bert):
    """cluster/serve.yaml: Serve's own schema accepts it, and its import_path's builder, given its args
    with a real (tiny) model in place of the bucket, builds the application with those settings."""
    from ray.serve.schema import ServeDeploySchema

    from tests.test_infer_job import _save_model

    spec = _load("serve.yaml")
    ServeDeploySchema.parse_obj(spec)
    [app] = spec["applications"]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    model = _save_model(str(tmp_path / "fused"), "add", tiny_bert)
    deployment = builder({**app["args"], "bertram": model})._bound_deployment  # (Serve has no public accessor)
    assert deployment.ray_actor_options["num_gpus"] == app["args"]["gpus_per_replica"]
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (app["args"]["min_replicas"], app["args"]["max_replicas"])
    assert "credential" not in yaml.safe_dump(app.get("runtime_env", {})).lower()
