"""The KubeRay manifests (configs/kuberay/) and the container image they run (Dockerfile).

- Each manifest validates against its KubeRay CRD's ``openAPIV3Schema`` with ``jsonschema``: as the
  plain schema (types, enums, required fields) and "strict", with unknown fields as errors, which is
  what ``kubectl apply``'s default field validation (Strict) does with them; negative cases show
  what each catches and where a typo still passes (map keys, object metadata).
- The RayJob's entrypoint is a command line of our own CLI (its parser, our config loader); the
  RayService's serveConfigV2 is a Ray Serve config whose application args pass ``build_app``'s checks.
- Token auth in both, one image name (kustomization.yaml), GPU worker groups, the model volume.
- The Dockerfile installs exactly what pyproject.toml declares: the project's wheel, with torch
  first at the Makefile's pin, and no second list of packages.

The CRDs are the KubeRay operator's, copied into the repository as test data (tests/data/kuberay/,
its README.md: source, version, licence, and the hashes checked here), so the tests read nothing
outside the repository.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "configs" / "kuberay"
MANIFESTS = {"RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}
CRD_DIR = REPO / "tests" / "data" / "kuberay"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
CLUSTER_KEY = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
GPU = "nvidia.com/gpu"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# -- the product, imported where used (a move of the CLI or of the app is one line here) --------


def _cli() -> Any:
    """The module of the ``llava-features`` command (pyproject's [project.scripts] entry)."""
    module = _pyproject()["project"]["scripts"]["llava-features"].split(":")[0]
    return importlib.import_module(module)


def _app() -> Any:
    """The Serve application's builder module (``import_path: deployments.app:build_app`` builds with it)."""
    return importlib.import_module("deployments.build")


# -- files -------------------------------------------------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_LOADER)


@functools.cache
def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@functools.cache
def _manifest_cached(kind: str) -> dict[str, Any]:
    docs = list(yaml.load_all((KUBERAY / MANIFESTS[kind]).read_text(), Loader=_LOADER))
    assert len(docs) == 1, f"{MANIFESTS[kind]} holds one object"
    return docs[0]


def manifest(kind: str) -> dict[str, Any]:
    """A fresh copy of the manifest (tests may change it)."""
    return copy.deepcopy(_manifest_cached(kind))


def cluster(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"][CLUSTER_KEY[obj["kind"]]]


def ray_containers(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group, pod spec, Ray container) of the head and of every worker group (the Ray container is
    the first one, as KubeRay takes it)."""
    spec = cluster(obj)
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    return [(name, g["template"]["spec"], g["template"]["spec"]["containers"][0]) for name, g in groups]


def gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


def gpu_capacity(obj: dict[str, Any]) -> int:
    """GPUs of the cluster at its largest."""
    workers = cluster(obj).get("workerGroupSpecs", [])
    return sum(
        g["maxReplicas"] * g.get("numOfHosts", 1) * gpus(g["template"]["spec"]["containers"][0])
        for g in workers
    )


def all_values(node: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [
            x for v in node.values() for x in all_values(v, key)
        ]
    if isinstance(node, list):
        return [x for v in node for x in all_values(v, key)]
    return []


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@functools.cache
def _serve_config_text() -> str:
    return _manifest_cached("RayService")["spec"]["serveConfigV2"]


# -- the CRD schemas -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crds() -> dict[str, dict[str, Any]]:
    """{kind: the CRD object} for RayJob and RayService."""
    return {kind: _yaml(CRD_DIR / name) for kind, name in CRD_FILES.items()}


@pytest.fixture(scope="module")
def schemas(crds) -> dict[str, dict[str, Any]]:
    """{kind: {"plain": the CRD's v1 openAPIV3Schema, "strict": the same, closed (see strict)}}."""
    return {kind: {"plain": v1_schema(crd), "strict": strict(v1_schema(crd))} for kind, crd in crds.items()}


def v1_schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def strict(schema: Any) -> Any:
    """The schema with every object closed to fields it does not declare (``additionalProperties:
    false``), except maps (an ``additionalProperties`` schema) and ``x-kubernetes-preserve-unknown-fields``
    subtrees: what Kubernetes' structural-schema pruning drops and Strict field validation refuses."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
    for key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
        if isinstance(out.get(key), dict | list):
            out[key] = strict(out[key])
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def schema_errors(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]


def _walk_schema(schema: dict[str, Any], path: str = "") -> Any:
    """(path, sub-schema) of every schema node reachable through properties, items and maps."""
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk_schema(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk_schema(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk_schema(schema["additionalProperties"], f"{path}{{}}")


def test_crd_copies_are_the_recorded_ones():
    """The copies are the files their README describes (upstream, cut to v1): an edit or an upgrade
    of the test data updates the hashes there, next to its source and version."""
    recorded = dict(
        reversed(m.groups())
        for m in re.finditer(r"^([0-9a-f]{64})  (\S+\.yaml)$", (CRD_DIR / "README.md").read_text(), re.M)
    )
    actual = {name: hashlib.sha256((CRD_DIR / name).read_bytes()).hexdigest() for name in CRD_FILES.values()}
    assert recorded == actual


def test_crds_are_kuberays_v1_schemas(crds):
    for kind, crd in crds.items():
        assert crd["kind"] == "CustomResourceDefinition"
        assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == ("ray.io", kind)
        jsonschema.Draft202012Validator.check_schema(v1_schema(crd))


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_validates_against_its_crd(schemas, kind):
    obj = manifest(kind)
    assert (obj["apiVersion"], obj["kind"]) == ("ray.io/v1", kind)
    assert schema_errors(schemas[kind]["plain"], obj) == []
    assert schema_errors(schemas[kind]["strict"], obj) == []


def test_where_the_schemas_leave_objects_open(crds):
    """Where a typo can get past the strict check: no subtree keeps unknown fields
    (x-kubernetes-preserve-unknown-fields), the only free-form object is the top-level metadata
    (ObjectMeta, which the API server validates itself), and the rest are maps with free keys (typed
    values): rayStartParams, labels, annotations, resources' limits and requests... The GPU resource
    name, a map key, is therefore checked by name in test_gpu_worker_groups."""
    for crd in crds.values():
        nodes = list(_walk_schema(v1_schema(crd)))
        assert [p for p, s in nodes if s.get("x-kubernetes-preserve-unknown-fields")] == []
        assert [
            p
            for p, s in nodes
            if s.get("type") == "object" and not {"properties", "additionalProperties"} & set(s)
        ] == [".metadata"]
        maps = {p for p, s in nodes if isinstance(s.get("additionalProperties"), dict)}
        key = CLUSTER_KEY[crd["spec"]["names"]["kind"]]
        assert f".spec.{key}.headGroupSpec.rayStartParams" in maps
        assert f".spec.{key}.workerGroupSpecs[].template.spec.containers[].resources.limits" in maps


def _rename(d: dict[str, Any], old: str, new: str) -> None:
    d[new] = d.pop(old)


def _worker(obj: dict[str, Any]) -> dict[str, Any]:
    """The Ray container of the first worker group."""
    return cluster(obj)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _misspell_spec_field(o):
    _rename(o["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish")


def _misspell_container_field(o):
    _rename(_worker(o), "volumeMounts", "volumeMount")


def _misspell_cluster_field(o):
    _rename(cluster(o), "authOptions", "authOption")


def _integer_as_string(o):
    o["spec"]["ttlSecondsAfterFinished"] = "600"


def _outside_enum(o):
    cluster(o)["authOptions"]["mode"] = "Token"


def _unquoted_ray_start_param(o):
    cluster(o)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _no_group_name(o):
    del cluster(o)["workerGroupSpecs"][0]["groupName"]


def _misspell_map_key(o):
    _rename(_worker(o)["resources"]["limits"], GPU, "nvidia.com/gpus")


def _misspell_metadata_field(o):
    o["metadata"]["lables"] = {}


# (kind, change, error text of the plain schema, error text of the strict one); None: accepted.
_MISTAKES = {
    "misspelled spec field": (
        "RayJob",
        _misspell_spec_field,
        None,
        "'shutdownAfterJobFinish' was unexpected",
    ),
    "misspelled container field": ("RayJob", _misspell_container_field, None, "'volumeMount' was unexpected"),
    "misspelled cluster field": ("RayService", _misspell_cluster_field, None, "'authOption' was unexpected"),
    "integer as a string": ("RayJob", _integer_as_string, "'600' is not of type 'integer'", "not of type"),
    "value outside an enum": ("RayService", _outside_enum, "'Token' is not one of", "is not one of"),
    "unquoted rayStartParams value": (
        "RayService",
        _unquoted_ray_start_param,
        "0 is not of type 'string'",
        "0 is not",
    ),
    "worker group without groupName": ("RayService", _no_group_name, "'groupName' is a required", "required"),
    # Where both let a typo through (test_where_the_schemas_leave_objects_open): keys of maps, and
    # ObjectMeta, which the API server checks itself. Hence the GPU key is checked by name elsewhere.
    "misspelled map key": ("RayJob", _misspell_map_key, None, None),
    "misspelled metadata field": ("RayJob", _misspell_metadata_field, None, None),
}


@pytest.mark.parametrize("what", list(_MISTAKES))
def test_schema_validation_catches_mistakes(schemas, what):
    """A misspelled field passes plain JSON Schema (the CRDs never say additionalProperties: false;
    Kubernetes would prune it, or refuse it under kubectl's default Strict field validation) and fails
    the strict check; wrong types, enums and missing required fields fail both."""
    kind, change, plain_error, strict_error = _MISTAKES[what]
    obj = manifest(kind)
    change(obj)
    for mode, expected in (("plain", plain_error), ("strict", strict_error)):
        errors = schema_errors(schemas[kind][mode], obj)
        if expected is None:
            assert errors == [], (mode, errors)
        else:
            assert errors and any(expected in e for e in errors), (mode, errors)


# -- the RayJob: our encode command ----------------------------------------------------------


def _entrypoint_args() -> list[str]:
    argv = shlex.split(manifest("RayJob")["spec"]["entrypoint"])
    assert argv[0] == "llava-features", "the entrypoint runs our console script directly"
    assert "llava-features" in _pyproject()["project"]["scripts"]
    return argv[1:]


def test_rayjob_entrypoint_is_our_encode_command():
    ns = _cli().build_parser().parse_args(_entrypoint_args())
    assert ns.command == "encode" and ns.model is None and ns.config
    # Relative to the image's working directory, which holds a copy of configs/ (see the Dockerfile).
    config_file = REPO / ns.config
    assert config_file.is_file() and config_file.parent == REPO / "configs"
    ns.config = str(config_file)
    config = _cli().load_cli_config(ns)  # exactly what `llava-features encode` loads
    assert config.model.checkpoint and config.model.local_files_only  # from the model volume, never a hub
    assert config.job.num_gpus_per_actor == 1
    placeholder = "s3://YOUR-BUCKET/"  # what a user edits (an invalid bucket name: fails fast)
    assert ns.input.startswith(placeholder) and ns.output.startswith(placeholder)
    # Every encoder actor gets a GPU of the worker group at its largest.
    low, high = config.job.actors
    assert 1 <= low <= high and high * config.job.num_gpus_per_actor <= gpu_capacity(manifest("RayJob"))
    # A retry (backoffLimit) runs the same command on a fresh cluster: it must resume, not refuse.
    if manifest("RayJob")["spec"].get("backoffLimit", 0) > 0:
        assert ns.resume


def test_rayjob_entrypoint_typos_fail(capsys):
    args = _entrypoint_args()
    bad = [a.replace("--num-gpus-per-actor", "--num-gpu-per-actor") for a in args]
    with pytest.raises(SystemExit):
        _cli().build_parser().parse_args(bad)
    assert "unrecognized arguments: --num-gpu-per-actor" in capsys.readouterr().err


def test_rayjob_lifecycle():
    spec = manifest("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 24 * 3600  # requires shutdownAfterJobFinishes
    assert "deletionStrategy" not in spec  # its rules exclude shutdownAfterJobFinishes and the TTL
    assert spec["submissionMode"] == "K8sJobMode"


# -- the RayService: our Serve application ---------------------------------------------------


def serve_config_problems(text: str) -> list[str]:
    """What is wrong with a serveConfigV2: Ray's schema (which ignores unknown keys, so those are
    checked here), then each application's args through build_app's own checks."""
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    raw = yaml.safe_load(text)
    problems = [f"unknown key {k!r}" for k in set(raw) - set(ServeDeploySchema.model_fields)]
    problems += [
        f"unknown http_options key {k!r}"
        for k in set(raw.get("http_options") or {}) - set(HTTPOptionsSchema.model_fields)
    ]
    for app in raw.get("applications") or []:
        problems += [
            f"unknown application key {k!r}" for k in set(app) - set(ServeApplicationSchema.model_fields)
        ]
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValueError as exc:
        return [*problems, str(exc)]
    for app in schema.applications:
        if app.import_path != "deployments.app:build_app":
            problems.append(f"{app.name}: import_path {app.import_path}")
            continue
        try:
            config = _app().resolve_app_config(app.args)  # the known args, our config and its sections
            _app().deployment_options(config, app.args.get("ray_actor_options"))
        except ValueError as exc:  # ConfigError
            problems.append(f"{app.name}: {exc}")
    return problems


def test_rayservice_serve_config_is_our_application(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.chdir(REPO)  # the image's working directory holds configs/ as the repository does
    assert serve_config_problems(_serve_config_text()) == []
    schema = ServeDeploySchema.model_validate(yaml.safe_load(_serve_config_text()))
    (app,) = schema.applications
    module, name = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), name))
    args = app.args
    assert set(args) <= set(_app().BUILD_ARGS)
    assert not args.get("make_tiny_if_missing"), "a real model: never the tiny random-weight stand-in"
    assert "api_key" not in args.get("serve", {}), "the API key comes from a Secret, not the manifest"
    assert (REPO / args["config"]).is_file()
    config = _app().resolve_app_config(args)
    assert (
        config.model.checkpoint and ".demo" not in config.model.checkpoint and config.model.local_files_only
    )
    encoder = _app().deployment_options(config)["encoder"]
    assert encoder["ray_actor_options"]["num_gpus"] == 1
    assert encoder["autoscaling_config"]["max_replicas"] <= gpu_capacity(manifest("RayService"))
    # The Serve proxies listen on every interface, on the port KubeRay's Serve service and readiness
    # check use: the worker port named "serve".
    assert schema.http_options.host == "0.0.0.0"
    for group, _, container in ray_containers(manifest("RayService")):
        if group != "head":
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            assert ports.get("serve") == schema.http_options.port


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda app: app["args"]["serve"].update(max_replica=4), "Unknown key(s) in section 'serve'"),
        (lambda app: app["args"].update(confg=app["args"].pop("config")), "Unknown build_app arg"),
        (lambda app: app["args"].update(config="configs/llava-v1.5-7B.yaml"), "Config file not found"),
        (lambda app: app["args"]["serve"].update(min_replicas=5), "serve replicas must satisfy"),
        (lambda app: app.update(argz=app.pop("args")), "unknown application key 'argz'"),
    ],
)
def test_serve_config_mistakes_fail(monkeypatch, change, message):
    monkeypatch.chdir(REPO)
    raw = yaml.safe_load(_serve_config_text())
    change(raw["applications"][0])
    problems = serve_config_problems(yaml.safe_dump(raw))
    assert any(message in p for p in problems), problems


def test_rayservice_leaves_probes_to_kuberay():
    """KubeRay injects liveness/readiness probes only into Ray containers that have none, and on
    RayService workers its readiness probe includes the Serve proxy's /-/healthz: setting a probe
    here would drop that check."""
    for _, _, container in ray_containers(manifest("RayService")):
        assert not {"livenessProbe", "readinessProbe"} & set(container)


# -- both: auth, image, GPUs, model volume, Ray version --------------------------------------


def test_token_auth_on_in_both():
    options = [cluster(manifest(kind))["authOptions"] for kind in sorted(MANIFESTS)]
    assert options[0] == options[1]
    assert options[0]["mode"] == "token" and options[0]["secretName"]
    assert "enableK8sTokenAuth" not in options[0]  # KubeRay: not supported for RayJob / RayService
    api_key_env = _app().API_KEY_ENV
    for kind in MANIFESTS:
        for group, _, container in ray_containers(manifest(kind)):
            env = env_of(container)
            # KubeRay sets RAY_AUTH_MODE / RAY_AUTH_TOKEN from authOptions; no token in a manifest.
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env), (kind, group)
            if kind == "RayService":  # the endpoint's API key, from a Secret
                api_key = env[api_key_env]
                assert "value" not in api_key and "secretKeyRef" in api_key["valueFrom"], group


def test_one_image_name():
    kustomization = _yaml(KUBERAY / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in KUBERAY.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    (image,) = kustomization["images"]
    assert image["newName"] and image["newTag"]
    for kind in MANIFESTS:
        obj = manifest(kind)
        images = all_values(obj, "image")
        assert images and set(images) == {image["name"]}, kind
        containers = [
            c for key in ("containers", "initContainers") for cs in all_values(obj, key) for c in cs
        ]
        assert len(containers) == len(images), "every container names the image, nothing else does"


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed"
)
def test_kustomize_rewrites_every_image():
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUBERAY)], capture_output=True, text=True, timeout=120, check=True
    )
    built = list(yaml.safe_load_all(out.stdout))
    (image,) = _yaml(KUBERAY / "kustomization.yaml")["images"]
    images = all_values(built, "image")
    expected = sum(len(all_values(manifest(kind), "image")) for kind in MANIFESTS)
    assert images == [f"{image['newName']}:{image['newTag']}"] * expected


def test_gpu_worker_groups():
    for kind in MANIFESTS:
        groups = ray_containers(manifest(kind))
        assert gpus(groups[0][2]) == 0, "the head has no GPU"
        assert cluster(manifest(kind))["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
        workers = [(spec, c) for group, spec, c in groups if group != "head"]
        assert workers and all(gpus(c) >= 1 for _, c in workers), kind
        for spec, c in workers:
            assert c["resources"]["requests"][GPU] == c["resources"]["limits"][GPU]
            assert any(t.get("key") == GPU for t in spec.get("tolerations", []))


def test_model_volume_on_every_ray_container():
    pvc = _yaml(KUBERAY / "models-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert set(pvc["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}, "read by every node"
    for kind in MANIFESTS:
        for group, spec, container in ray_containers(manifest(kind)):
            hf_home = env_of(container)["HF_HOME"]["value"]
            (mount,) = [
                m for m in container["volumeMounts"] if hf_home.startswith(m["mountPath"].rstrip("/") + "/")
            ]
            assert mount.get("readOnly") is True, (kind, group)
            (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
            assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], (kind, group)


# -- the Dockerfile --------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of ./Dockerfile; continuation lines joined, a RUN's heredoc appended."""
    lines, out, i = (REPO / "Dockerfile").read_text().splitlines(), [], 0
    while i < len(lines):
        line, i = lines[i], i + 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line, i = line[:-1] + " " + lines[i].strip(), i + 1
        instruction, _, rest = line.strip().partition(" ")
        heredoc = re.match(r"<<-?[\"']?(\w+)[\"']?", rest.strip())
        if instruction.upper() == "RUN" and heredoc:
            body = []
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            rest = "\n".join(body)
        out.append((instruction.upper(), rest.strip()))
    return out


def build_args() -> dict[str, str]:
    """ARG defaults, ${...} in them resolved."""
    values: dict[str, str] = {}
    for instruction, rest in dockerfile():
        if instruction == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            values[name] = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], value)
    return values


def pip_commands() -> list[tuple[str, list[str]]]:
    """(install | wheel, its arguments) of every pip command the Dockerfile runs, in order."""
    commands = []
    for instruction, rest in dockerfile():
        if instruction != "RUN":
            continue
        text = re.sub(r"\$\{\w+:\+[^}]*\}", "", rest)  # ${VAR:+--option ...}: an option when VAR is set
        for part in re.split(r"&&|\|\||;|\n|\|", text):
            words = shlex.split(part) if "pip" in part else []
            for j in range(len(words) - 1):
                if words[j] == "pip" and words[j + 1] in ("install", "wheel"):
                    commands.append((words[j + 1], words[j + 2 :]))
    return commands


# pip options followed by a value (a path or a URL, not a requirement).
_VALUE_OPTIONS = {"-w", "--wheel-dir", "-i", "--index-url", "--extra-index-url", "-c", "--constraint"}


def _operands(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in _VALUE_OPTIONS:
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out


def test_dockerfile_base_image_is_the_official_ray_cuda_image_of_the_manifests():
    args = build_args()
    froms = [rest for instruction, rest in dockerfile() if instruction == "FROM"]
    assert froms and all(f.split()[0] == "${BASE_IMAGE}" for f in froms)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-cu(\d+)", args["BASE_IMAGE"])
    assert match, args["BASE_IMAGE"]
    assert match.group(1) == args["RAY_VERSION"]
    for kind in MANIFESTS:
        assert cluster(manifest(kind))["rayVersion"] == args["RAY_VERSION"], kind
    assert Requirement(f"python{_pyproject()['project']['requires-python']}").specifier.contains(
        f"3.{match.group(2)}"
    )


def test_dockerfile_installs_what_pyproject_declares_and_nothing_else():
    commands = pip_commands()
    args = build_args()
    for _, cmd_args in commands:
        assert not {"-r", "--requirement"} & set(cmd_args), "no requirements file: pyproject.toml is the list"
    operands = [(kind, o) for kind, cmd_args in commands for o in _operands(cmd_args)]
    # Local paths (the source tree, the built wheel) and the Makefile's torch pin, nothing else.
    named = [o for _, o in operands if not o.startswith((".", "/"))]
    assert named == ["${TORCH_SPEC}"], named
    assert ("wheel", ".") in operands, (
        "the project is built from its source tree (setup.py compiles the resampler)"
    )
    wheel_install = next(
        i for i, (kind, o) in enumerate(operands) if kind == "install" and o.endswith(".whl")
    )
    assert operands.index(("install", "${TORCH_SPEC}")) < wheel_install, "torch first, as the Makefile does"
    # The pin: the Makefile's, and within pyproject's range.
    makefile = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert makefile and args["TORCH_SPEC"] == makefile.group(1)
    pinned = Requirement(args["TORCH_SPEC"])
    (declared,) = [
        Requirement(d) for d in _pyproject()["project"]["dependencies"] if Requirement(d).name == "torch"
    ]
    assert declared.specifier.contains(next(iter(pinned.specifier)).version)
    # No pyproject dependency is named anywhere in a pip command.
    names = {Requirement(d).name for d in _pyproject()["project"]["dependencies"]} - {"torch"}
    mentioned = {re.split(r"[<>=!~\[ ;]", a)[0].lower() for _, cmd_args in commands for a in cmd_args}
    assert not names & mentioned


def test_dockerfile_copies_what_the_build_and_the_manifests_read():
    instructions = dockerfile()
    copies = [rest.split() for instruction, rest in instructions if instruction == "COPY"]
    sources = {
        s
        for words in copies
        if not any(w.startswith("--from=") for w in words)
        for s in words[:-1]
        if not s.startswith("--")
    }
    assert all((REPO / s).exists() for s in sources), sources
    project = _pyproject()
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"pyproject.toml", "setup.py", project["project"]["readme"], *packages} <= sources
    # configs/ lands in the final working directory, where the manifests' relative paths resolve.
    names = [instruction for instruction, _ in instructions]
    last_workdir = len(names) - 1 - names[::-1].index("WORKDIR")
    assert instructions[-1][0] == "COPY" and instructions[-1][1].split()[-2:] == ["configs", "./configs"]
    assert "FROM" not in names[last_workdir:], "the WORKDIR of the final stage"
    assert instructions[last_workdir][1].startswith("/home/ray/")  # the base image's user's home
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"**/*.so", ".venv"} <= set(ignored), "no local build of the extension or venv in the image"
