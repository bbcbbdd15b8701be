"""The deployment manifests under infra/ agree with the project and with each other.

Nothing here starts a container (the tests must run where images cannot be pulled); instead every
manifest is parsed and checked against what it refers to: services it waits for, ports and hosts it
connects to, images pinned to a tag, and every project command it runs (`python -m stages.X`,
`torchrun -m ...`, `tisslm <command>`) resolved against the files and the typer app that exist. The
checkers return lists of problems, so each test also shows that a broken manifest is caught.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
K8S_DIR = INFRA / "k8s"
DOCKERFILE = INFRA / "Dockerfile"
MLFLOW_DOCKERFILE = INFRA / "mlflow.Dockerfile"
WORKFLOWS = ROOT / ".github" / "workflows"
WORK_POOL = "tisslm-process"
NAMESPACE = "tisslm"


# ---------------------------------------------------------------- loading


def interpolate(node):
    """Compose's variable substitution with nothing set in the environment: ${VAR:-default} and
    ${VAR-default} become the default, ${VAR} becomes empty, $$ a literal $ (as `docker compose config`)."""
    if isinstance(node, dict):
        return {key: interpolate(value) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value) for value in node]
    if isinstance(node, str):
        pattern = r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}"
        return re.sub(pattern, lambda m: "$" if m.group(0) == "$$" else (m.group(2) or ""), node)
    return node


@cache
def compose() -> dict:
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()))


@cache
def k8s_docs() -> tuple[tuple[Path, dict], ...]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.y*ml")):
        docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return tuple(docs)


def k8s(kind: str, name: str | None = None) -> list[dict]:
    return [d for _, d in k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def constraint(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and name.strip().lower() == package.lower():
            return version.strip()
    raise AssertionError(f"constraints.txt pins no {package}")


def project_image() -> str:
    return f"tisslm:{project_version()}"


# ---------------------------------------------------------------- shell commands


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script: argv lists split at newlines, ; && || | & and
    grouping, without redirections, leading VAR=value assignments and keywords (if, then, exec...)."""
    script = re.sub(r"\$\{\{.*?\}\}", "EXPR", script.replace("\\\n", " "))
    separators = {";", "&&", "||", "|", "&", "(", ")", "{", "}", ";;"}
    redirections = {">", ">>", "<", "<<", ">&", "<&", ">|", "2>", "&>"}
    keywords = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "for", "!", "exec", "time"}
    commands: list[list[str]] = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        skip_next = False
        for token in lexer:
            if skip_next:
                skip_next = False
            elif token in separators:
                commands.append(current)
                current = []
            elif token in redirections or re.fullmatch(r"\d?>>?|\d?<", token):
                skip_next = True
            elif not current and (token in keywords or re.fullmatch(r"[A-Za-z_]\w*=.*", token)):
                continue
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def argv_commands(argv: list[str] | str | None) -> list[list[str]]:
    """Commands an exec-form argv runs: itself, or the script of `sh -c SCRIPT`."""
    if not argv:
        return []
    if isinstance(argv, str):
        return shell_commands(argv)
    if Path(argv[0]).name in {"sh", "bash"} and len(argv) >= 3 and argv[1] == "-c":
        return shell_commands(argv[2])
    return [list(argv)]


# ---------------------------------------------------------------- project command checker


@cache
def tisslm_cli():
    """The command tree typer builds from the app (typer vendors click: groups have `.commands`)."""
    import typer.main

    from tisslm.cli import app

    return typer.main.get_command(app)


@cache
def torchrun_parser():
    from torch.distributed.run import get_args_parser

    return get_args_parser()


def check_module(module: str, args: list[str]) -> list[str]:
    if module == "torch.distributed.run":
        return check_torchrun(args)
    if module == "tisslm.cli":
        return check_tisslm(args)
    if module.split(".")[0] not in {"stages", "pipelines", "tisslm"}:
        return []
    base = (ROOT / "src" if module.startswith("tisslm") else ROOT).joinpath(*module.split("."))
    if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
        return []
    return [f"python -m {module}: neither {base.relative_to(ROOT)}.py nor a package there"]


def check_torchrun(args: list[str]) -> list[str]:
    """Parse with torchrun's own parser; the training script or module must exist."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parsed = torchrun_parser().parse_args(args)
    except SystemExit:
        return [f"torchrun {shlex.join(args)}: {errors.getvalue().strip().splitlines()[-1]}"]
    if parsed.module:
        return check_module(parsed.training_script, parsed.training_script_args)
    if not (ROOT / parsed.training_script).is_file():
        return [f"torchrun {parsed.training_script}: no such script"]
    return []


def check_tisslm(args: list[str]) -> list[str]:
    """Walk the typer app's command groups (`tisslm pipeline run`), then let click parse the options
    of the command reached, as it would at run time."""
    command, path, rest = tisslm_cli(), ["tisslm"], list(args)
    while isinstance(getattr(command, "commands", None), dict):
        names = [a for a in rest if not a.startswith("-")]
        if not names:
            return []  # `tisslm --help`, or a group alone: prints its help
        name = names[0]
        rest = rest[rest.index(name) + 1 :]
        sub = command.commands.get(name)
        if sub is None:
            return [f"{' '.join(path)}: no command {name!r} (has: {', '.join(sorted(command.commands))})"]
        command, path = sub, [*path, name]
    try:
        with contextlib.redirect_stdout(io.StringIO()), command.make_context(" ".join(path), rest):
            pass
    except typer.Exit:
        pass  # --help
    except typer.TyperException as err:  # click's usage errors, as typer's vendored click raises them
        return [f"{shlex.join([*path, *rest])}: {err.format_message()}"]
    return []


def check_command(argv: list[str]) -> list[str]:
    """Problems with one command line, if it runs project code; [] for anything else."""
    program, args = Path(argv[0]).name, argv[1:]
    if re.fullmatch(r"python(3(\.\d+)?)?", program):
        if "-m" in args:
            i = args.index("-m")
            return check_module(args[i + 1], args[i + 2 :]) if i + 1 < len(args) else ["python -m without module"]
        return []
    if program == "torchrun":
        return check_torchrun(args)
    if program == "tisslm":
        return check_tisslm(args)
    return []


# ---------------------------------------------------------------- where commands are


def compose_commands() -> dict[str, list[list[str]]]:
    found = {}
    for name, service in compose()["services"].items():
        entrypoint, command = service.get("entrypoint"), service.get("command")
        if isinstance(entrypoint, str):
            entrypoint = shlex.split(entrypoint)
        if isinstance(command, str):
            command = shlex.split(command)
        found[f"compose:{name}"] = argv_commands([*(entrypoint or []), *(command or [])])
    return found


def pod_specs() -> list[tuple[str, dict]]:
    """Every pod spec in the k8s documents (Deployment templates, PyTorchJob replica templates,
    TrainingRuntime job templates), and for each TrainJob, which has no pod template of its own, the
    trainer pod Trainer builds from its runtime (rendered_trainjob_pod_spec)."""
    specs = []

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                specs.append((where, node))
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    for path, doc in k8s_docs():
        walk(doc, f"{path.name}:{doc['kind']}/{doc['metadata']['name']}")
        if doc["kind"] == "TrainJob":
            rendered = rendered_trainjob_pod_spec(doc, training_runtime(doc))
            specs.append((f"{path.name}:TrainJob/{doc['metadata']['name']}(rendered {TRAINER_NODE})", rendered))
    return specs


def k8s_containers() -> list[tuple[str, dict]]:
    return [
        (f"{where}/{c['name']}", c)
        for where, spec in pod_specs()
        for c in [*spec.get("initContainers", []), *spec["containers"]]
    ]


def k8s_commands() -> dict[str, list[list[str]]]:
    return {where: argv_commands([*(c.get("command") or []), *(c.get("args") or [])]) for where, c in k8s_containers()}


# ---------------------------------------------------------------- Kubeflow Trainer v2 (TrainJob)

# Written against kubeflow/trainer v2.3.0 (pkg/apis/trainer/v1alpha1, pkg/runtime/framework/plugins).
TRAINER_API = "trainer.kubeflow.org/v1alpha1"
TRAINER_GROUP = "trainer.kubeflow.org"
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
TRAINER_NODE = "node"  # the replicated job and the container Trainer runs the training in
TRAINER_PORT = 29500  # constants.ContainerTrainerPort
# The fields the API has; a misspelt or retired one (podTemplateOverrides of v2.1, podSpecOverrides of
# v2.0) is pruned by the API server or rejected, and the job would run without it.
TRAINJOB_SPEC_FIELDS = {
    "runtimeRef",
    "initializer",
    "trainer",
    "runtimePatches",
    "suspend",
    "activeDeadlineSeconds",
    "managedBy",
}
TRAINER_FIELDS = {"image", "command", "args", "env", "numNodes", "numProcPerNode", "resourcesPerNode"}
RUNTIME_REF_FIELDS = {"name", "apiGroup", "kind"}
RUNTIME_SPEC_FIELDS = {"mlPolicy", "podGroupPolicy", "template"}
REPLICATED_JOB_FIELDS = {"name", "groupName", "replicas", "dependsOn", "template"}
PET_ENV = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
# Containers whose env only the Trainer / Initializer APIs may set, not runtime patches.
ENV_BY_API_ONLY = {TRAINER_NODE, "dataset-initializer", "model-initializer"}


def trainjob() -> dict:
    (job,) = k8s("TrainJob")
    return job


def training_runtime(job: dict) -> dict | None:
    """The TrainingRuntime (same namespace) or ClusterTrainingRuntime the job's runtimeRef names, if
    among the documents."""
    ref = job["spec"].get("runtimeRef", {})
    kind = ref.get("kind", "ClusterTrainingRuntime")
    namespace = None if kind == "ClusterTrainingRuntime" else job["metadata"].get("namespace")
    for _, doc in k8s_docs():
        if (doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace")) == (
            kind,
            ref.get("name"),
            namespace,
        ):
            return doc
    return None


def replicated_jobs(runtime: dict) -> list[dict]:
    return runtime["spec"]["template"]["spec"]["replicatedJobs"]


def ancestor_job(runtime: dict, ancestor: str) -> dict | None:
    found = [
        r
        for r in replicated_jobs(runtime)
        if r["template"].get("metadata", {}).get("labels", {}).get(ANCESTOR_LABEL) == ancestor
    ]
    return found[0] if found else None


def upsert(items: list[dict], new: list[dict], key: str) -> list[dict]:
    """A strategic merge of lists keyed by `key` (env by name, volumes by name, mounts by mountPath)."""
    merged = {item[key]: item for item in items}
    for item in new:
        merged[item[key]] = {**merged.get(item[key], {}), **item}
    return list(merged.values())


def rendered_trainjob_pod_spec(job: dict, runtime: dict | None) -> dict:
    """The pod spec of the trainer's nodes as Trainer builds it: the runtime's trainer job template
    (torch-distributed's bare `node` container when the runtime is not among the documents), the
    TrainJob's runtimePatches merged in, then the trainer's image, command, args, resourcesPerNode and
    env on the `node` container. The PET_* variables are left to operator_env_trainjob."""
    rjob = ancestor_job(runtime, "trainer") if runtime else None
    spec = copy.deepcopy(
        rjob["template"]["spec"]["template"]["spec"] if rjob else {"containers": [{"name": TRAINER_NODE}]}
    )
    rjob_name = rjob["name"] if rjob else TRAINER_NODE
    for patch in job["spec"].get("runtimePatches", []):
        for rpatch in (
            patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", [])
        ):
            if rpatch["name"] != rjob_name:
                continue
            pod_patch = rpatch.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
            for key, value in pod_patch.items():
                if key == "volumes":
                    spec["volumes"] = upsert(spec.get("volumes", []), value, "name")
                elif key in {"containers", "initContainers"}:
                    for cpatch in value:
                        for container in spec.get(key, []):
                            if container["name"] == cpatch["name"]:
                                container["env"] = upsert(container.get("env", []), cpatch.get("env", []), "name")
                                mounts = cpatch.get("volumeMounts", [])
                                container["volumeMounts"] = upsert(
                                    container.get("volumeMounts", []), mounts, "mountPath"
                                )
                                if "securityContext" in cpatch:
                                    container["securityContext"] = cpatch["securityContext"]
                else:
                    spec[key] = value
    trainer = job["spec"].get("trainer", {})
    for container in spec["containers"]:
        if container["name"] == TRAINER_NODE:
            container.update({key: trainer[key] for key in ["image", "command", "args"] if key in trainer})
            if "resourcesPerNode" in trainer:
                container["resources"] = trainer["resourcesPerNode"]
            container["env"] = upsert(container.get("env", []), trainer.get("env", []), "name")
    return spec


def trainjob_problems(job: dict, runtime: dict | None) -> list[str]:
    """What the Trainer v2.3.0 API server or its admission webhook would reject, or silently drop."""
    problems = []
    if job.get("apiVersion") != TRAINER_API:
        problems.append(f"TrainJob apiVersion {job.get('apiVersion')}, not {TRAINER_API}")
    spec = job.get("spec", {})
    problems += [f"TrainJob spec.{f}: no such field" for f in sorted(set(spec) - TRAINJOB_SPEC_FIELDS)]
    ref = spec.get("runtimeRef", {})
    problems += [f"TrainJob spec.runtimeRef.{f}: no such field" for f in sorted(set(ref) - RUNTIME_REF_FIELDS)]
    if ref.get("apiGroup", TRAINER_GROUP) != TRAINER_GROUP:
        problems.append(f"runtimeRef.apiGroup {ref['apiGroup']}")
    trainer = spec.get("trainer", {})
    problems += [f"TrainJob spec.trainer.{f}: no such field" for f in sorted(set(trainer) - TRAINER_FIELDS)]
    for key in ["numNodes", "numProcPerNode"]:
        if key in trainer and not (isinstance(trainer[key], int) and trainer[key] >= 1):
            problems.append(f"trainer.{key}: {trainer[key]!r} is not a positive integer")
    reserved = sorted(e["name"] for e in trainer.get("env", []) if e["name"] in PET_ENV)
    if reserved:
        problems.append(f"trainer.env sets {reserved}, which the torch plugin reserves")
    if runtime is None:
        return [*problems, f"runtimeRef {ref}: no such runtime among the documents"]
    if runtime.get("apiVersion") != TRAINER_API:
        problems.append(f"{runtime['kind']} apiVersion {runtime.get('apiVersion')}, not {TRAINER_API}")
    rspec = runtime["spec"]
    problems += [f"{runtime['kind']} spec.{f}: no such field" for f in sorted(set(rspec) - RUNTIME_SPEC_FIELDS)]
    if "torch" not in rspec.get("mlPolicy", {}):
        problems.append("the runtime has no mlPolicy.torch: no PET_* variables for torchrun")
    containers = {}
    for i, rjob in enumerate(replicated_jobs(runtime)):
        problems += [
            f"replicatedJobs[{rjob['name']}].{f}: no such field" for f in sorted(set(rjob) - REPLICATED_JOB_FIELDS)
        ]
        pod = rjob["template"]["spec"]["template"]["spec"]
        containers[rjob["name"]] = {c["name"] for c in [*pod.get("initContainers", []), *pod["containers"]]}
        earlier = {r["name"] for r in replicated_jobs(runtime)[:i]}
        for dep in rjob.get("dependsOn", []):
            if dep["name"] not in earlier or dep.get("status") not in {"Ready", "Complete"}:
                problems.append(f"replicatedJobs[{rjob['name']}] depends on {dep}: not an earlier job's Ready/Complete")
        if len(rjob.get("dependsOn", [])) > 1:
            problems.append(f"replicatedJobs[{rjob['name']}]: JobSet supports one dependsOn item")
    node = ancestor_job(runtime, "trainer")
    if node is None or TRAINER_NODE not in containers.get(node["name"], set()):
        problems.append(f"no job labelled {ANCESTOR_LABEL}: trainer with a container {TRAINER_NODE!r}")
    for patch in spec.get("runtimePatches", []):
        if "/" not in patch.get("manager", ""):
            problems.append(f"runtimePatches manager {patch.get('manager')!r} is not domain-prefixed")
        for rpatch in (
            patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", [])
        ):
            if rpatch["name"] not in containers:
                problems.append(f"runtimePatches: no replicated job {rpatch['name']} in the runtime")
                continue
            pod_patch = rpatch.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
            for cpatch in [*pod_patch.get("initContainers", []), *pod_patch.get("containers", [])]:
                if cpatch["name"] not in containers[rpatch["name"]]:
                    problems.append(f"runtimePatches: job {rpatch['name']} has no container {cpatch['name']} to patch")
                if cpatch.get("env") and cpatch["name"] in ENV_BY_API_ONLY:
                    problems.append(
                        f"runtimePatches: env of {cpatch['name']} is set through the Trainer/Initializer API"
                    )
                if set(cpatch) - {"name", "env", "volumeMounts", "securityContext"}:
                    problems.append(f"runtimePatches: {cpatch['name']}: only env, volumeMounts, securityContext patch")
    return problems


# ---------------------------------------------------------------- what torchrun gets in each pod


def operator_env_pytorchjob(job: dict, replica_type: str, index: int) -> dict[str, str]:
    """The PET_* variables the training-operator v1 (pkg/controller.v1/pytorch/envvar.go) gives a pod."""
    replicas = job["spec"]["pytorchReplicaSpecs"]
    (master,) = replicas["Master"]["template"]["spec"]["containers"]
    (port,) = [p["containerPort"] for p in master["ports"] if p["name"] == "pytorchjob-port"]
    return {
        "PET_NNODES": str(sum(r["replicas"] for r in replicas.values())),
        "PET_NPROC_PER_NODE": str(job["spec"]["nprocPerNode"]),
        "PET_NODE_RANK": str(index + (1 if replica_type == "Worker" else 0)),
        "PET_MASTER_ADDR": f"{job['metadata']['name']}-master-0",
        "PET_MASTER_PORT": str(port),
    }


def operator_env_trainjob(job: dict, index: int) -> dict[str, str]:
    """The PET_* variables Trainer's torch plugin (plugins/torch/torch.go) gives pod `index` of the node Job."""
    name, trainer = job["metadata"]["name"], job["spec"]["trainer"]
    return {
        "PET_NNODES": str(trainer.get("numNodes", 1)),
        "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", "auto")),
        "PET_NODE_RANK": str(index),  # the Job completion index
        "PET_MASTER_ADDR": f"{name}-{TRAINER_NODE}-0-0.{name}",
        "PET_MASTER_PORT": str(TRAINER_PORT),
    }


def torchrun_run(argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    """torchrun's options as it resolves them in a pod with `env`: its parser reads the PET_* defaults
    when it is built, so build one under that environment (and none of the test's own PET_*)."""
    from torch.distributed.run import get_args_parser

    assert Path(argv[0]).name == "torchrun", argv
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return get_args_parser().parse_args(argv[1:])


def rendered_train_runs() -> dict[str, list[argparse.Namespace]]:
    """Per train job kind, the torchrun run of every node, in node-rank order."""
    (job,) = k8s("PyTorchJob")
    pods = []
    for replica_type in ["Master", "Worker"]:
        spec = job["spec"]["pytorchReplicaSpecs"][replica_type]
        (container,) = [c for c in spec["template"]["spec"]["containers"] if c["name"] == "pytorch"]
        (argv,) = argv_commands([*(container.get("command") or []), *(container.get("args") or [])])
        pods += [torchrun_run(argv, operator_env_pytorchjob(job, replica_type, i)) for i in range(spec["replicas"])]
    runs = {"PyTorchJob": pods}
    tj = trainjob()
    (node,) = [
        c for c in rendered_trainjob_pod_spec(tj, training_runtime(tj))["containers"] if c["name"] == TRAINER_NODE
    ]
    (argv,) = argv_commands([*(node.get("command") or []), *(node.get("args") or [])])
    runs["TrainJob"] = [
        torchrun_run(argv, operator_env_trainjob(tj, i)) for i in range(tj["spec"]["trainer"]["numNodes"])
    ]
    return runs


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_commands(path: Path) -> dict[str, list[list[str]]]:
    found = {}
    for i, (keyword, rest) in enumerate(dockerfile_instructions(path)):
        if keyword in {"RUN", "CMD", "ENTRYPOINT"}:
            argv = json.loads(rest) if rest.startswith("[") else rest
            found[f"{path.name}:{keyword}#{i}"] = argv_commands(argv)
    return found


def workflow_commands() -> dict[str, list[list[str]]]:
    found = {}
    for path in sorted(WORKFLOWS.glob("*.y*ml")):
        for job_name, job in yaml.safe_load(path.read_text())["jobs"].items():
            for i, step in enumerate(job.get("steps", [])):
                if "run" in step:
                    found[f"{path.name}:{job_name}.steps[{i}]"] = shell_commands(step["run"])
    return found


def all_commands() -> dict[str, list[list[str]]]:
    return compose_commands() | k8s_commands() | dockerfile_commands(DOCKERFILE) | workflow_commands()


# ---------------------------------------------------------------- images


def image_problem(ref: str) -> str | None:
    """None for a reference pinned to a tag other than latest (or to a digest)."""
    if "@sha256:" in ref:
        return None
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"{ref}: no tag (means latest)"
    if last.rsplit(":", 1)[1] == "latest":
        return f"{ref}: the latest tag moves"
    return None


def dockerfile_bases(path: Path) -> list[str]:
    return [rest.split()[0] for keyword, rest in dockerfile_instructions(path) if keyword == "FROM"]


def compose_image_problems(spec: dict) -> list[str]:
    problems = []
    for name, service in spec["services"].items():
        build, image = service.get("build"), service.get("image")
        if build is not None:
            context = COMPOSE_FILE.parent / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{name}: builds from {dockerfile}, which does not exist")
                continue
            problems += [
                f"{name}: {dockerfile.name}: {p}" for b in dockerfile_bases(dockerfile) if (p := image_problem(b))
            ]
            if image is not None and image.split(":")[0] == "tisslm":
                if dockerfile.resolve() != DOCKERFILE.resolve():
                    problems.append(f"{name}: {image} must be built from infra/Dockerfile, not {dockerfile}")
                if image != project_image():
                    problems.append(f"{name}: {image} is not tagged with the project version ({project_image()})")
        elif image is None:
            problems.append(f"{name}: neither image nor build")
        elif image.split(":")[0] == "tisslm":
            problems.append(f"{name}: uses the project image {image} without building it")
        elif p := image_problem(image):
            problems.append(f"{name}: {p}")
    return problems


# ---------------------------------------------------------------- .dockerignore


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex)))
    return rules


def dockerignored(path: str) -> bool:
    """Docker's rules: patterns are relative to the context root, a matching directory excludes
    everything under it, and the last matching pattern wins."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    excluded = False
    for negate, regex in dockerignore_rules():
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def copy_sources(path: Path) -> list[str]:
    sources = []
    for keyword, rest in dockerfile_instructions(path):
        if keyword in {"COPY", "ADD"}:
            args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue  # from another stage or image, not the context
            sources += [a for a in args if not a.startswith("--")][:-1]
    return sources


# ================================================================ tests: the command checker


@pytest.mark.parametrize(
    "command",
    [
        "python -m stages.nonexistent",
        "python3 -m tisslm.flows.nonexistent",
        "torchrun --nnodes=2 -m stages.nonexistent",
        "python -m torch.distributed.run --standalone -m stages.nonexistent",
        "torchrun --no-such-option -m stages.train",
        ".venv/bin/tisslm nonexistent",
        "tisslm pipeline nonexistent",
        "tisslm info --no-such-option",
        "tisslm info",  # --model is required
    ],
)
def test_checker_flags_commands_that_do_not_exist(command):
    assert check_command(shlex.split(command)), f"{command!r} was accepted"


@pytest.mark.parametrize(
    "command",
    [
        "python -m stages.train",
        ".venv/bin/python -m stages.evaluate",
        "torchrun --nnodes=2 --nproc-per-node=2 -m stages.train",
        "python -m torch.distributed.run --standalone --nproc-per-node=2 -m stages.train",
        "tisslm info --model models/model --json",
        "tisslm --help",
        "dvc pull --allow-missing",  # not project code: nothing to check
    ],
)
def test_checker_accepts_commands_that_exist(command):
    assert check_command(shlex.split(command)) == []


def test_shell_splitting_finds_every_command():
    script = """
    # a comment
    if [ -n "$X" ]; then FOO=1 exec .venv/bin/tisslm info --model m; fi
    dvc remote add --local -f -d r "s3://b" && dvc pull --allow-missing tokenize || echo "no" >> "$GITHUB_STEP_SUMMARY"
    python -m stages.train \\
        --ignored
    """
    assert shell_commands(script) == [
        ["[", "-n", "$X", "]"],
        [".venv/bin/tisslm", "info", "--model", "m"],
        ["dvc", "remote", "add", "--local", "-f", "-d", "r", "s3://b"],
        ["dvc", "pull", "--allow-missing", "tokenize"],
        ["echo", "no"],
        ["python", "-m", "stages.train", "--ignored"],
    ]
    assert argv_commands(["/bin/sh", "-c", "a x && b y"]) == [["a", "x"], ["b", "y"]]


def test_every_project_command_in_the_manifests_exists():
    """Compose services, k8s containers, the Dockerfile and the workflows. Commands the other work
    streams are adding (tisslm pipeline ...) fail here until they land."""
    found = all_commands()
    flat = [shlex.join(argv) for commands in found.values() for argv in commands]
    # The sweep reaches the commands that matter (else it would pass vacuously).
    for needle in ["-m stages.train", "tisslm pipeline retrain", "prefect worker start", "dvc pull"]:
        assert any(needle in c for c in flat), f"no command with {needle!r} found"
    problems = [f"{where}: {p}" for where, commands in found.items() for argv in commands for p in check_command(argv)]
    assert problems == []


# ================================================================ tests: docker-compose


SERVICES = {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker"}
DEPENDS = {
    "minio-init": {"minio": "service_healthy"},
    "mlflow": {
        "postgres": "service_healthy",
        "minio": "service_healthy",
        "minio-init": "service_completed_successfully",
    },
    "prefect-server": {"postgres": "service_healthy"},
    "prefect-worker": {
        "prefect-server": "service_healthy",
        "mlflow": "service_healthy",
        "minio-init": "service_completed_successfully",
    },
}
PORTS = {"postgres": 5432, "minio": 9000, "mlflow": 5000, "prefect-server": 4200}


def dependency_problems(spec: dict) -> list[str]:
    services = spec["services"]
    problems = [f"missing service {s}" for s in sorted(SERVICES - set(services))]
    graph = {}
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        graph[name] = set(depends)
        for target, options in depends.items():
            if target not in services:
                problems.append(f"{name} depends on unknown service {target}")
            elif options.get("condition") == "service_healthy" and "healthcheck" not in services[target]:
                problems.append(f"{name} waits for {target} to be healthy, but {target} has no healthcheck")
        for target, condition in DEPENDS.get(name, {}).items():
            if depends.get(target, {}).get("condition") != condition:
                problems.append(f"{name} must depend on {target} with condition {condition}")

    def visit(node: str, stack: tuple[str, ...]) -> None:
        if node in stack:
            problems.append(f"dependency cycle: {' -> '.join([*stack, node])}")
            return
        for nxt in graph.get(node, ()):
            visit(nxt, (*stack, node))

    for name in graph:
        visit(name, ())
    return problems


def published_ports(service: dict) -> dict[int, int]:
    """container port -> host port, from the short syntax [ip:]host:container[/proto]."""
    ports = {}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports[int(entry["target"])] = int(entry["published"])
        else:
            parts = str(entry).split("/")[0].split(":")
            ports[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else int(parts[-1])
    return ports


def test_compose_services_and_dependencies():
    assert dependency_problems(compose()) == []


def test_compose_dependency_check_catches_a_broken_stack():
    broken = copy.deepcopy(compose())
    del broken["services"]["mlflow"]["depends_on"]["minio"]
    del broken["services"]["minio"]["healthcheck"]
    broken["services"]["postgres"]["depends_on"] = {"prefect-server": {"condition": "service_started"}}
    problems = dependency_problems(broken)
    assert any("mlflow must depend on minio" in p for p in problems)
    assert any("minio has no healthcheck" in p for p in problems)
    assert any("cycle" in p for p in problems)


def test_compose_ports_are_published_on_loopback_and_match_the_readme():
    readme = (INFRA / "README.md").read_text()
    for name, port in PORTS.items():
        service = compose()["services"][name]
        assert published_ports(service).get(port) == port, f"{name} does not publish {port}"
        for entry in service["ports"]:
            assert str(entry).startswith("127.0.0.1:"), f"{name} publishes {entry} on every interface"
    assert "export MLFLOW_TRACKING_URI=http://localhost:5000" in readme
    assert "export PREFECT_API_URL=http://localhost:4200/api" in readme
    assert "endpointurl http://localhost:9000" in readme


def test_compose_images_are_pinned_or_built_here():
    assert compose_image_problems(compose()) == []
    images = {name: s.get("image") for name, s in compose()["services"].items()}
    assert images["postgres"].startswith("postgres:16.")
    assert re.fullmatch(r"minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", images["minio"])
    # Server and client speak the same protocol version: the images follow constraints.txt.
    assert images["prefect-server"] == f"prefecthq/prefect:{constraint('prefect')}-python3.11"
    assert dockerfile_bases(MLFLOW_DOCKERFILE) == [f"ghcr.io/mlflow/mlflow:v{constraint('mlflow')}"]
    assert images["prefect-worker"] == project_image()
    # The MLflow server's drivers are those tests/test_mlflow_stack.py runs the server with.
    installed = set(re.findall(r'"?([\w.\[\]-]+==[\w.]+)"?', MLFLOW_DOCKERFILE.read_text()))
    assert installed == {f"psycopg[binary]=={constraint('psycopg')}", f"boto3=={constraint('boto3')}"}


def test_image_check_catches_floating_tags():
    broken = copy.deepcopy(compose())
    broken["services"]["postgres"]["image"] = "postgres"
    broken["services"]["minio"]["image"] = "minio/minio:latest"
    broken["services"]["prefect-worker"]["build"]["dockerfile"] = "mlflow.Dockerfile"
    broken["services"]["minio-init"] = {"image": project_image()}
    problems = compose_image_problems(broken)
    assert len(problems) == 4, problems
    assert image_problem("registry.local:5000/team/app") is not None
    assert image_problem("registry.local:5000/team/app:1.2") is None
    assert image_problem("app@sha256:" + "0" * 64) is None


def test_mlflow_server_uses_postgres_and_minio_through_the_server():
    services = compose()["services"]
    args = {}
    for arg in services["mlflow"]["command"]:
        key, _, value = arg.partition("=")
        args[key] = value
    store = urlsplit(args["--backend-store-uri"])
    assert store.scheme == "postgresql" and store.hostname == "postgres" and store.port == 5432
    assert store.path == "/" + services["postgres"]["environment"]["POSTGRES_DB"]
    assert "--serve-artifacts" in args
    bucket = urlsplit(args["--artifacts-destination"])
    assert bucket.scheme == "s3" and bucket.netloc in created_buckets()
    env = services["mlflow"]["environment"]
    assert urlsplit(env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    assert env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    from tisslm.tracking import SERVER_ENVIRONMENT

    assert SERVER_ENVIRONMENT.items() <= env.items()  # the same server settings as `tisslm ui`'s


def created_buckets() -> set[str]:
    init = compose()["services"]["minio-init"]
    buckets = set()
    for argv in argv_commands([*init["entrypoint"], *init["command"]]):
        if argv[:2] == ["mc", "mb"]:
            buckets |= {a.split("/", 1)[1] for a in argv[2:] if not a.startswith("-")}
    return buckets


def test_mlflow_server_accepts_the_hosts_clients_use():
    """MLflow 3 answers 403 to an unexpected Host header: check with MLflow's own matcher."""
    from mlflow.server.security_utils import is_allowed_host_header

    (allowed,) = [a.split("=", 1)[1] for a in compose()["services"]["mlflow"]["command"] if a.startswith("--allowed-")]
    hosts = [h.strip() for h in allowed.split(",")]
    worker_uri = urlsplit(compose()["services"]["prefect-worker"]["environment"]["MLFLOW_TRACKING_URI"])
    for host in [worker_uri.netloc, "localhost:5000", "127.0.0.1:5000"]:
        assert is_allowed_host_header(hosts, host), host
    assert not is_allowed_host_header(hosts, "evil.example.com:5000")


def test_prefect_server_has_its_own_postgres_database():
    services = compose()["services"]
    url = urlsplit(services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert url.scheme == "postgresql+asyncpg" and url.hostname == "postgres" and url.port == 5432
    database = url.path.lstrip("/")
    assert database != services["postgres"]["environment"]["POSTGRES_DB"]
    init_sql = INFRA / "postgres" / "init-databases.sql"
    assert re.search(rf"CREATE DATABASE {database}\b", init_sql.read_text(), re.IGNORECASE)
    mounts = services["postgres"]["volumes"]
    assert any(m.startswith("./postgres/init-databases.sql:/docker-entrypoint-initdb.d/") for m in mounts)


def test_prefect_worker_polls_the_process_pool_and_reaches_the_servers():
    services = compose()["services"]
    worker = services["prefect-worker"]
    assert_worker_command(argv_commands(worker["command"]))
    env = worker["environment"]
    api = urlsplit(env["PREFECT_API_URL"])
    server_args = services["prefect-server"]["command"]
    assert api.hostname == "prefect-server" and api.path == "/api"
    assert str(api.port) == server_args[server_args.index("--port") + 1]
    mlflow = urlsplit(env["MLFLOW_TRACKING_URI"])
    assert mlflow.hostname == "mlflow" and mlflow.port == 5000
    # The DVC remote is set at start, to a bucket minio-init creates, at MinIO's address on this network.
    commands = argv_commands(worker["command"])
    (add,) = [argv for argv in commands if argv[:3] == ["dvc", "remote", "add"]]
    assert urlsplit(add[-1]).scheme == "s3" and urlsplit(add[-1]).netloc in created_buckets()
    (endpoint,) = [argv for argv in commands if argv[:3] == ["dvc", "remote", "modify"] and "endpointurl" in argv]
    assert urlsplit(endpoint[-1]).hostname == "minio"


def assert_worker_command(commands: list[list[str]]) -> None:
    (start,) = [argv for argv in commands if argv[:3] == ["prefect", "worker", "start"]]
    assert start[start.index("--pool") + 1] == WORK_POOL, start
    assert start[start.index("--type") + 1] == "process", start


# ================================================================ tests: Dockerfile


def test_dockerfile_installs_the_project_with_the_constraints():
    instructions = dockerfile_instructions(DOCKERFILE)
    (base,) = dockerfile_bases(DOCKERFILE)
    assert base.startswith("python:3.11-slim")
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert re.search(r"pip install -c constraints\.txt -e \"?\.\[hf,export\]\"?", runs)
    assert constraint("torch") == "2.13.0"
    workdir = [rest for keyword, rest in instructions if keyword == "WORKDIR"]
    assert workdir == ["/app"]  # the k8s volume mounts and compose volumes assume it


def test_dockerfile_copy_sources_exist_and_are_in_the_context():
    sources = copy_sources(DOCKERFILE)
    assert {"src/", "stages/", "pipelines/", "dvc.yaml", "params.yaml", "constraints.txt"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_data_and_stores_out_but_not_code():
    for path in ["data/raw/x.parquet", "models/model/model.safetensors", ".venv/bin/python", ".git/HEAD"]:
        assert dockerignored(path), path
    for path in ["mlflow.db", "mlruns/0/meta.yaml", ".dvc/cache/files/md5/00/x", ".dvc/config.local"]:
        assert dockerignored(path), path
    for path in ["src/tisslm/data/clean.py", "src/tisslm/cli.py", "stages/train.py", "dvc.lock", ".dvc/config"]:
        assert not dockerignored(path), path


# ================================================================ tests: Kubernetes


def test_k8s_documents_are_complete_and_in_one_namespace():
    docs = k8s_docs()
    kinds = [d["kind"] for _, d in docs]
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "PyTorchJob", "TrainJob", "Deployment"} <= set(kinds)
    assert kinds[0] == "Namespace", "kubectl apply -f applies files in name order: the namespace first"
    for path, doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), path
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path.name}: {doc['kind']}"
    assert [d["metadata"]["name"] for d in k8s("Namespace")] == [NAMESPACE]


def test_k8s_pods_refer_to_volumes_and_config_that_exist():
    claims = {d["metadata"]["name"] for d in k8s("PersistentVolumeClaim")}
    config_maps = {d["metadata"]["name"] for d in k8s("ConfigMap")}
    assert pod_specs()
    for where, spec in pod_specs():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, where
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: mount of unknown volume {mount['name']}"
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, where
                if "secretRef" in source:  # not in Git: must not block pods on clusters with workload identity
                    assert source["secretRef"].get("optional") is True, where
    for _, container in k8s_containers():
        assert image_problem(container["image"]) is None
        if container["image"].split(":")[0] == "tisslm":
            assert container["image"] == project_image()


def config_map_env() -> dict[str, str]:
    (config,) = k8s("ConfigMap", "tisslm-config")
    return config["data"]


def test_k8s_config_provides_the_tracking_and_prefect_urls():
    env = config_map_env()
    assert urlsplit(env["MLFLOW_TRACKING_URI"]).scheme in {"http", "https"}
    assert urlsplit(env["PREFECT_API_URL"]).path.endswith("/api")


def test_k8s_workspace_is_shared_across_nodes():
    (pvc,) = k8s("PersistentVolumeClaim", "tisslm-workspace")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def replica(kind: str) -> dict:
    (job,) = k8s("PyTorchJob")
    return job["spec"]["pytorchReplicaSpecs"][kind]


def test_pytorchjob_master_and_worker_run_the_train_stage_alike():
    (job,) = k8s("PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    master, worker = replica("Master"), replica("Worker")
    assert master["replicas"] == 1 and worker["replicas"] >= 1
    (m,), (w,) = master["template"]["spec"]["containers"], worker["template"]["spec"]["containers"]
    # The operator finds the training container and the rendezvous port by these names.
    assert m["name"] == w["name"] == "pytorch"
    assert m["ports"] == w["ports"] and m["ports"][0]["name"] == "pytorchjob-port"
    for key in ["image", "command", "args", "env", "envFrom", "volumeMounts", "resources"]:
        assert m.get(key) == w.get(key), f"Master and Worker differ in {key}"
    assert m["image"] == project_image()
    assert master["restartPolicy"] == worker["restartPolicy"] == "OnFailure"


def assert_runs_the_dvc_train_stage_under_torchrun(argv: list[str]) -> None:
    """The stage of dvc.yaml, under torchrun with every rendezvous setting left to the operator's
    PET_* variables (an explicit --standalone or --nnodes would fight them)."""
    train_cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["cmd"]
    (dvc_argv,) = shell_commands(train_cmd)
    assert dvc_argv[:2] == ["python", "-m"]
    assert Path(argv[0]).name == "torchrun"
    parsed = torchrun_parser().parse_args(argv[1:])
    assert parsed.module and parsed.training_script == dvc_argv[2]
    assert parsed.training_script_args == dvc_argv[3:]  # the paths dvc.yaml gives the stage
    assert not parsed.standalone
    assert not any(a.split("=")[0] in {"--nnodes", "--node-rank", "--node_rank", "--master-addr"} for a in argv)
    assert check_command(argv) == []


def assert_pulls_what_the_train_stage_reads(init: dict) -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def outs(stage: str) -> set[str]:
        return {o if isinstance(o, str) else next(iter(o)) for o in stages[stage].get("outs", [])}

    (pull,) = [argv for argv in argv_commands(init["command"]) if argv[:2] == ["dvc", "pull"]]
    targets = [a for a in pull[2:] if not a.startswith("-")]
    assert set(targets) <= set(stages), f"dvc pull of unknown stages: {set(targets) - set(stages)}"
    pulled = set().union(*(outs(t) for t in targets))
    produced_elsewhere = {d for d in stages["train"]["deps"] if any(d in outs(s) for s in stages if s != "train")}
    assert produced_elsewhere and produced_elsewhere <= pulled
    mounts = {m["mountPath"] for m in init["volumeMounts"]}
    assert {"/app/data", "/app/models"} <= mounts


def test_pytorchjob_runs_the_dvc_train_command_under_torchrun():
    (argv,) = argv_commands(replica("Master")["template"]["spec"]["containers"][0]["command"])
    assert_runs_the_dvc_train_stage_under_torchrun(argv)
    (job,) = k8s("PyTorchJob")
    assert int(job["spec"]["nprocPerNode"]) >= 1


def test_pytorchjob_pulls_what_the_train_stage_reads():
    (init,) = replica("Master")["template"]["spec"]["initContainers"]
    assert_pulls_what_the_train_stage_reads(init)


# ---------------------------------------------------------------- Kubeflow Trainer v2 TrainJob


def test_trainjob_follows_the_trainer_v2_api():
    job = trainjob()
    assert job["apiVersion"] == TRAINER_API and job["kind"] == "TrainJob"
    assert trainjob_problems(job, training_runtime(job)) == []
    # The runtime is torch-distributed's (mlPolicy.torch, the `node` job and container) plus the pull.
    runtime = training_runtime(job)
    ref = job["spec"]["runtimeRef"]
    assert (runtime["kind"], runtime["metadata"]["name"]) == (ref.get("kind", "ClusterTrainingRuntime"), ref["name"])
    assert ancestor_job(runtime, "trainer")["name"] == TRAINER_NODE
    # kubectl apply creates a file's documents in order; the webhook wants the runtime first.
    docs = [d for _, d in k8s_docs()]
    assert docs.index(runtime) < docs.index(job)


def test_trainjob_check_catches_what_the_api_rejects():
    job, runtime = copy.deepcopy(trainjob()), copy.deepcopy(training_runtime(trainjob()))
    assert trainjob_problems(job, None)  # runtimeRef to a runtime that is not there
    job["spec"]["podTemplateOverrides"] = []  # v2.1's field, gone since v2.2
    job["spec"]["trainer"]["numProcPerNode"] = "auto"  # an int in v2.3
    job["spec"]["trainer"]["envFrom"] = []
    job["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "1"})
    job["spec"]["runtimePatches"] = [
        {
            "manager": "tisslm.dev/manual",
            "trainingRuntimeSpec": {
                "template": {
                    "spec": {
                        "replicatedJobs": [
                            {
                                "name": TRAINER_NODE,
                                "template": {
                                    "spec": {
                                        "template": {
                                            "spec": {
                                                "initContainers": [{"name": "pull"}],  # patches cannot add containers
                                                "containers": [{"name": TRAINER_NODE, "env": [{"name": "X"}]}],
                                            }
                                        }
                                    }
                                },
                            }
                        ]
                    }
                }
            },
        }
    ]
    del runtime["spec"]["mlPolicy"]["torch"]
    problems = trainjob_problems(job, runtime)
    assert len(problems) == 7, problems


def test_trainjob_runs_the_pytorchjobs_command():
    job = trainjob()
    trainer = job["spec"]["trainer"]
    assert isinstance(trainer["numNodes"], int) and trainer["numNodes"] >= 2
    assert isinstance(trainer["numProcPerNode"], int) and trainer["numProcPerNode"] >= 1
    assert trainer["image"] == project_image()
    (argv,) = argv_commands([*trainer["command"], *trainer.get("args", [])])
    assert_runs_the_dvc_train_stage_under_torchrun(argv)
    (master,) = replica("Master")["template"]["spec"]["containers"]
    assert [*trainer["command"], *trainer.get("args", [])] == [*master["command"], *master.get("args", [])]


def test_trainjob_pods_match_the_pytorchjobs():
    """Image, env, ConfigMap and Secret, resources, mounts and volumes of the rendered trainer pod are
    the PyTorchJob's Master pod's."""
    job = trainjob()
    pod = rendered_trainjob_pod_spec(job, training_runtime(job))
    master_pod = replica("Master")["template"]["spec"]
    (node,) = [c for c in pod["containers"] if c["name"] == TRAINER_NODE]
    (master,) = master_pod["containers"]
    for key in ["image", "command", "args", "env", "envFrom", "volumeMounts", "resources"]:
        assert node.get(key) == master.get(key), f"TrainJob and PyTorchJob differ in {key}"
    assert pod["volumes"] == master_pod["volumes"]
    assert pod["securityContext"] == master_pod["securityContext"]
    assert pod["restartPolicy"] == replica("Master")["restartPolicy"] == "OnFailure"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"tisslm-workspace"}
    mounts = {m["mountPath"]: m for m in node["volumeMounts"]}
    assert mounts["/app/data"]["subPath"] == "data" and mounts["/app/models"]["subPath"] == "models"
    (dshm,) = [v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"]["name"]]
    assert dshm["emptyDir"]["medium"] == "Memory"


def test_trainjob_pulls_what_the_train_stage_reads_before_the_nodes_start():
    runtime = training_runtime(trainjob())
    init_job = ancestor_job(runtime, "dataset-initializer")
    (init,) = init_job["template"]["spec"]["template"]["spec"]["containers"]
    assert_pulls_what_the_train_stage_reads(init)
    # The same pull as the PyTorchJob's init container, with the same config, credentials and mounts.
    (master_init,) = replica("Master")["template"]["spec"]["initContainers"]
    for key in ["image", "command", "envFrom", "volumeMounts"]:
        assert init.get(key) == master_init.get(key), f"the pulls differ in {key}"
    # One pull, and the nodes start once it has completed.
    assert init_job["template"]["spec"].get("parallelism", 1) == 1 and init_job.get("replicas", 1) == 1
    assert ancestor_job(runtime, "trainer")["dependsOn"] == [{"name": init_job["name"], "status": "Complete"}]


def test_both_train_jobs_render_to_the_same_torchrun_run():
    """Render each manifest's train command into what torchrun makes of it in every pod, with the
    PET_* variables its operator sets: the same nodes, processes, world size, module and arguments."""
    kinds = {d["kind"] for _, d in k8s_docs()}
    assert {"PyTorchJob", "TrainJob"} <= kinds
    runs = rendered_train_runs()
    assert set(runs) == {"PyTorchJob", "TrainJob"}
    per_pod = {"node_rank", "master_addr", "master_port"}
    reference = {k: v for k, v in vars(runs["PyTorchJob"][0]).items() if k not in per_pod}
    train_cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["cmd"]
    (dvc_argv,) = shell_commands(train_cmd)
    for kind, pods in runs.items():
        assert len(pods) >= 2, kind
        assert [int(p.node_rank) for p in pods] == list(range(len(pods))), kind
        assert len({(p.master_addr, p.master_port) for p in pods}) == 1, f"{kind}: the nodes meet at one address"
        for p in pods:
            assert {k: v for k, v in vars(p).items() if k not in per_pod} == reference, kind
            assert int(p.nnodes) == len(pods) and not p.standalone
            assert p.module and [p.training_script, *p.training_script_args] == dvc_argv[2:]
    world_size = int(reference["nnodes"]) * int(reference["nproc_per_node"])
    assert world_size >= 2
    # train.batch_size is the global batch: it must divide among the processes, whatever their number.
    batch_size = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["batch_size"]
    assert batch_size % world_size == 0, f"train.batch_size={batch_size} over {world_size} processes"


def test_readme_applies_one_train_job_at_a_time():
    """Both jobs write the same checkpoints on the one workspace: never apply both, nor the whole k8s/."""
    readme = (INFRA / "README.md").read_text()
    applies = [
        argv
        for block in re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
        for argv in shell_commands(block)
        if argv[:2] == ["kubectl", "apply"]
    ]
    assert applies
    job_files = {"infra/k8s/30-pytorchjob.yaml", "infra/k8s/31-trainjob.yaml"}
    applied = set()
    for argv in applies:
        files = {argv[i + 1].rstrip("/") for i, a in enumerate(argv[:-1]) if a == "-f"}
        assert "infra/k8s" not in files, shlex.join(argv)
        assert len(files & job_files) <= 1, shlex.join(argv)
        applied |= files
    assert job_files <= applied
    assert {f"infra/k8s/{p.name}" for p in K8S_DIR.glob("*.y*ml")} <= applied


def test_k8s_prefect_worker_deployment():
    (deployment,) = k8s("Deployment", "tisslm-prefect-worker")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    template = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (container,) = template["spec"]["containers"]
    assert container["image"] == project_image()
    assert_worker_command(argv_commands(container["command"]))
    env = {e["name"] for e in container.get("env", [])}
    from_config = {s["configMapRef"]["name"] for s in container.get("envFrom", []) if "configMapRef" in s}
    assert "PREFECT_API_URL" in env or ("tisslm-config" in from_config and "PREFECT_API_URL" in config_map_env())
    assert "MLFLOW_TRACKING_URI" in env or "MLFLOW_TRACKING_URI" in config_map_env()


def test_prefect_deployments_use_the_workers_pool():
    """pipelines/prefect.yaml (the orchestration work) must target the pool the workers poll."""
    path = ROOT / "pipelines" / "prefect.yaml"
    assert path.is_file(), "pipelines/prefect.yaml is missing"
    deployments = {d["name"]: d for d in yaml.safe_load(path.read_text())["deployments"]}
    assert {"tisslm-retrain", "tisslm-hpo"} <= set(deployments)
    for name in ["tisslm-retrain", "tisslm-hpo"]:
        assert deployments[name]["work_pool"]["name"] == WORK_POOL, name
    schedules = deployments["tisslm-retrain"].get("schedules") or [deployments["tisslm-retrain"].get("schedule")]
    assert any(s and s.get("cron") for s in schedules), "tisslm-retrain has no cron schedule"
