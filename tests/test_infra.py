"""The deployment manifests under infra/ agree with the project and with each other.

Nothing here starts a container (the tests must run where images cannot be pulled); instead every
manifest is parsed and checked against what it refers to: services it waits for, ports and hosts it
connects to, images pinned to a tag, and every project command it runs (`python -m stages.X`,
`torchrun -m ...`, `tisslm <command>`) resolved against the files and the typer app that exist. The
checkers return lists of problems, so each test also shows that a broken manifest is caught.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path
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
    """Every pod spec in the k8s documents (Deployment templates, PyTorchJob replica templates)."""
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
    return specs


def k8s_containers() -> list[tuple[str, dict]]:
    return [
        (f"{where}/{c['name']}", c)
        for where, spec in pod_specs()
        for c in [*spec.get("initContainers", []), *spec["containers"]]
    ]


def k8s_commands() -> dict[str, list[list[str]]]:
    return {where: argv_commands([*(c.get("command") or []), *(c.get("args") or [])]) for where, c in k8s_containers()}


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
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "PyTorchJob", "Deployment"} <= set(kinds)
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


def test_pytorchjob_runs_the_dvc_train_command_under_torchrun():
    """The stage of dvc.yaml, under torchrun with every rendezvous setting left to the operator's
    PET_* variables (an explicit --standalone or --nnodes would fight them)."""
    (argv,) = argv_commands(replica("Master")["template"]["spec"]["containers"][0]["command"])
    train_cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["cmd"]
    (dvc_argv,) = shell_commands(train_cmd)
    assert dvc_argv[:2] == ["python", "-m"]
    assert Path(argv[0]).name == "torchrun"
    parsed = torchrun_parser().parse_args(argv[1:])
    assert parsed.module and parsed.training_script == dvc_argv[2]
    assert parsed.training_script_args == dvc_argv[3:]  # the paths dvc.yaml gives the stage
    assert not parsed.standalone
    assert not any(a.split("=")[0] in {"--nnodes", "--node-rank", "--node_rank", "--master-addr"} for a in argv)
    (job,) = k8s("PyTorchJob")
    assert int(job["spec"]["nprocPerNode"]) >= 1
    assert check_command(argv) == []


def test_pytorchjob_pulls_what_the_train_stage_reads():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def outs(stage: str) -> set[str]:
        return {o if isinstance(o, str) else next(iter(o)) for o in stages[stage].get("outs", [])}

    (init,) = replica("Master")["template"]["spec"]["initContainers"]
    (pull,) = [argv for argv in argv_commands(init["command"]) if argv[:2] == ["dvc", "pull"]]
    targets = [a for a in pull[2:] if not a.startswith("-")]
    assert set(targets) <= set(stages), f"dvc pull of unknown stages: {set(targets) - set(stages)}"
    pulled = set().union(*(outs(t) for t in targets))
    produced_elsewhere = {d for d in stages["train"]["deps"] if any(d in outs(s) for s in stages if s != "train")}
    assert produced_elsewhere and produced_elsewhere <= pulled
    mounts = {m["mountPath"] for m in init["volumeMounts"]}
    assert {"/app/data", "/app/models"} <= mounts


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
