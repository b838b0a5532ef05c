"""Offline checks of the deployment files in infra/: they parse, carry the fields their tools need, and
every command they run is accepted by the real entrypoint's argument parser. No Docker, Kubernetes,
cloud or GPU needed; the cron script runs for real against stand-ins for `ray` and its Python SDK."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
NIGHTLY = INFRA / "kuberay" / "nightly.yaml"
CLUSTER = INFRA / "aws" / "cluster.yaml"
CRON = INFRA / "cron" / "nightly-index.sh"
IMAGE_APP_DIR = "/app"  # WORKDIR of infra/Dockerfile, where the repository's files are copied


# ---------------------------------------------------------------- helpers

def load_entrypoint_module():
    """jobs/index_archive.py imported from the repository (not an installed copy)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("facebatch_jobs_index_archive", REPO / "jobs" / "index_archive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_people_entrypoint_module():
    """jobs/cluster_people.py imported from the repository (not an installed copy)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("facebatch_jobs_cluster_people", REPO / "jobs" / "cluster_people.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entrypoint_commands(entrypoint: str) -> list[list[str]]:
    """A RayJob entrypoint (run through a shell by Ray) as its `&&`-chained commands."""
    commands, current = [], []
    for token in shlex.split(entrypoint):
        if token == "&&":
            commands.append(current)
            current = []
        else:
            current.append(token)
    return commands + [current]


def assert_people_entrypoint_accepts(argv: list[str], script_root: Path | str = REPO, image_paths: bool = False) -> None:
    assert argv[0] in ("python", "python3"), argv
    script = argv[1]
    if image_paths:
        assert script.startswith(IMAGE_APP_DIR + "/"), f"{script}: use the absolute path inside the image"
        script = script[len(IMAGE_APP_DIR) + 1:]
    assert (Path(script_root) / script).resolve() == (REPO / "jobs" / "cluster_people.py").resolve(), script
    parser = load_people_entrypoint_module().build_parser()
    try:
        args = parser.parse_args(argv[2:])
    except SystemExit as exc:
        pytest.fail(f"jobs/cluster_people.py rejects {argv[2:]} (exit {exc.code})")
    from facebatch.cli import people_config_from_args

    people_config_from_args(args)


def assert_entrypoint_accepts(argv: list[str], script_root: Path | str = REPO, image_paths: bool = False) -> None:
    """argv is `python <script> args...`; the script must exist and its parser must accept the args."""
    assert argv[0] in ("python", "python3"), argv
    script = argv[1]
    if image_paths:
        assert script.startswith(IMAGE_APP_DIR + "/"), f"{script}: use the absolute path inside the image"
        script = script[len(IMAGE_APP_DIR) + 1:]
    assert (Path(script_root) / script).resolve() == (REPO / "jobs" / "index_archive.py").resolve(), script
    module = load_entrypoint_module()
    parser = module.build_parser()
    try:
        args = parser.parse_args(argv[2:])
    except SystemExit as exc:  # argparse reports errors by exiting
        pytest.fail(f"jobs/index_archive.py rejects {argv[2:]} (exit {exc.code})")
    from facebatch.cli import config_from_args

    config_from_args(args)  # the values are valid too (ConfigError otherwise)


def pod_containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), flags=re.M))


CRON_FIELD_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def valid_cron(expr: str) -> bool:
    fields = expr.split()
    if len(fields) != 5:
        return False
    for text, (low, high) in zip(fields, CRON_FIELD_RANGES):
        for part in text.split(","):
            m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            if not m:
                return False
            values = [int(v) for v in (m.group(2), m.group(3)) if v is not None]
            if any(not low <= v <= high for v in values) or (m.group(4) is not None and int(m.group(4)) < 1):
                return False
    return True


# ---------------------------------------------------------------- all YAML

@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")), ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no document"


def test_cron_expression_checker():
    assert valid_cron("0 2 * * *") and valid_cron("*/15 0-6 1,15 * 1-5")
    assert not valid_cron("0 2 * *") and not valid_cron("61 2 * * *") and not valid_cron("0 2 * * mon-")


# ---------------------------------------------------------------- KubeRay RayJob

def load_rayjob() -> dict:
    (doc,) = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    return doc


def check_rayjob_spec(spec: dict) -> None:
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("ttlSecondsAfterFinished", 0) > 0
    assert spec.get("activeDeadlineSeconds", 0) > 0
    assert spec.get("backoffLimit", 0) >= 1
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode")
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == dockerfile_args()["RAY_VERSION"], "rayVersion must match the image's Ray"
    assert cluster.get("enableInTreeAutoscaling") is True

    head = cluster["headGroupSpec"]
    assert str(head["rayStartParams"].get("num-cpus")) == "0", "no image work on the head"
    images = {c["image"] for c in pod_containers(head["template"])}
    for c in pod_containers(head["template"]):
        assert not c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")

    gpu_groups = []
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in pod_containers(group["template"]):
            images.add(c["image"])
            if int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1:
                gpu_groups.append(group)
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
    # The pipeline sizes its pool from the GPUs present at the start: at least one from the start.
    assert all(g["minReplicas"] >= 1 for g in gpu_groups)
    assert all(images) and len(images) == 1, f"one image for every Ray container, got {images}"
    assert not next(iter(images)).endswith(":latest")
    # Credentials come from a Secret, never inline.
    for template in [head["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        for c in pod_containers(template):
            refs = [e.get("secretRef", {}).get("name") for e in c.get("envFrom", [])]
            refs += [e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") for e in c.get("env", [])]
            assert any(refs), f"container {c['name']} gets no credentials from a Secret"
            assert not any(e.get("name", "").startswith("AWS_") and "value" in e for e in c.get("env", []))

    argv, people = entrypoint_commands(spec["entrypoint"])
    assert_entrypoint_accepts(argv, image_paths=True)
    args = load_entrypoint_module().build_parser().parse_args(argv[2:])
    # The people run follows on the same OUT.
    assert_people_entrypoint_accepts(people, image_paths=True)
    assert people[2] == args.out
    # The pool starts on the GPU pods present and may grow to maxReplicas (the autoscaler adds pods
    # for its pending actors).
    assert args.device == "cuda"
    assert args.num_actors == sum(g["minReplicas"] for g in gpu_groups)
    assert args.max_actors == sum(g["maxReplicas"] for g in gpu_groups)


def test_rayjob():
    doc = load_rayjob()
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayJob"
    assert doc["metadata"]["name"]
    check_rayjob_spec(doc["spec"])


# ---------------------------------------------------------------- nightly schedule

def nightly_docs() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(NIGHTLY.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one object of each kind expected"
    return by_kind


def test_nightly_cronjob():
    docs = nightly_docs()
    assert {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"} <= set(docs)
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    assert valid_cron(cron["spec"]["schedule"]), cron["spec"]["schedule"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0, "a retried launcher would start a second run"
    template = load_rayjob()
    assert job["activeDeadlineSeconds"] > template["spec"]["activeDeadlineSeconds"]
    assert job["activeDeadlineSeconds"] < 24 * 3600
    pod = job["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert pod["restartPolicy"] == "Never"

    # RBAC: the ServiceAccount may create, watch and prune RayJobs, and nothing else.
    role, binding = docs["Role"], docs["RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"] and binding["roleRef"]["kind"] == "Role"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": docs["ServiceAccount"]["metadata"]["name"]}]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert {"create", "get", "list", "delete"} == set(rule["verbs"])

    # The launcher runs launch.py from the mounted ConfigMap, with the template from the same place.
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert volume["name"] == mount["name"] and volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    data = docs["ConfigMap"]["data"]
    assert container["command"][-1] == f"{mount['mountPath']}/launch.py" and "launch.py" in data
    assert env["TEMPLATE"] == f"{mount['mountPath']}/rayjob.yaml" and "rayjob.yaml" in data


def test_nightly_template_is_the_rayjob():
    docs = nightly_docs()
    template = yaml.safe_load(docs["ConfigMap"]["data"]["rayjob.yaml"])
    assert template["apiVersion"] == "ray.io/v1" and template["kind"] == "RayJob"
    # A unique name every night, from the API server.
    assert template["metadata"].get("generateName") and "name" not in template["metadata"]
    env = {e["name"]: e["value"] for e in nightly_docs()["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    key, _, value = env["RUN_SELECTOR"].partition("=")
    assert template["metadata"]["labels"].get(key) == value, "RUN_SELECTOR must match the template's labels"
    # Same run as rayjob.yaml: the two must not drift apart.
    assert template["spec"] == load_rayjob()["spec"]
    check_rayjob_spec(template["spec"])


def load_launcher():
    source = nightly_docs()["ConfigMap"]["data"]["launch.py"]
    namespace: dict = {"__name__": "facebatch_nightly_launcher"}
    exec(compile(source, "launch.py", "exec"), namespace)
    return namespace


KUBERAY_STATES = yaml.safe_load((REPO / "tests" / "fixtures" / "kuberay_rayjob_states.yaml").read_text())["states"]


def test_launcher_knows_every_kuberay_state():
    launcher = load_launcher()
    final = {state for state, info in KUBERAY_STATES.items() if info["final"]}
    assert launcher["TERMINAL"] == final, "the launcher must stop waiting in every state KubeRay never leaves"
    assert launcher["TERMINAL"] | launcher["IN_PROGRESS"] == set(KUBERAY_STATES)
    assert not launcher["TERMINAL"] & launcher["IN_PROGRESS"]


def test_launcher_classifies_runs():
    launcher = load_launcher()
    now = 1767578400.0  # 2026-01-05T02:00:00Z
    deadline_h = launcher["RUN_DEADLINE_SECONDS"] / 3600
    assert 12 < deadline_h < 24

    def rayjob(name, created, status):
        return {"metadata": {"name": name, "creationTimestamp": created}, "status": {"jobDeploymentStatus": status}}

    items = [
        rayjob("c", "2026-01-03T02:00:00Z", "Complete"),
        rayjob("a", "2026-01-01T02:00:00Z", "Failed"),
        rayjob("v", "2026-01-02T02:00:00Z", "ValidationFailed"),  # final: KubeRay never reconciles it again
        rayjob("d", "2026-01-04T18:00:00Z", "Running"),
        {"metadata": {"name": "e", "creationTimestamp": "2026-01-05T01:59:00Z"}},  # just created: no status yet
        rayjob("r", "2026-01-04T20:00:00Z", "Retrying"),
        rayjob("s", "2026-01-03T02:00:00Z", "Suspended"),  # unfinished for two days: past the run deadline
        rayjob("x", "2026-01-04T02:00:00Z", "SomethingNew"),  # unknown state, past the deadline
    ]
    active, stale, finished = launcher["split_runs"](items, now)
    assert sorted(i["metadata"]["name"] for i in active) == ["d", "e", "r"]
    assert sorted(i["metadata"]["name"] for i in stale) == ["s", "x"]
    assert [i["metadata"]["name"] for i in finished] == ["a", "v", "c"]  # oldest first, pruned first


class FakeKubeAPI:
    """The RayJob part of a Kubernetes API server, with KubeRay stood in by a script of status values:
    each GET of the RayJob the launcher created moves it one step along `script` (staying on the last)."""

    def __init__(self, existing=(), script=({},)):
        import http.server
        import threading

        self.jobs = {j["metadata"]["name"]: j for j in existing}
        self.script = list(script)
        self.steps: dict[str, int] = {}
        self.requests: list[tuple[str, str, object]] = []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def handle_any(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                api.requests.append((method, self.path, body))
                assert self.headers["Authorization"] == "Bearer test-token"
                base = "/apis/ray.io/v1/namespaces/nightly-ns/rayjobs"
                path, _, query = self.path.partition("?")
                name = path[len(base) + 1:] if path.startswith(base + "/") else None
                if method == "GET" and path == base:
                    key, _, value = urllib.parse.parse_qs(query)["labelSelector"][0].partition("=")
                    items = [j for j in api.jobs.values() if j["metadata"].get("labels", {}).get(key) == value]
                    return self.reply(200, {"items": items})
                if method == "POST" and path == base:
                    job = yaml.safe_load(body)
                    job["metadata"]["name"] = job["metadata"].pop("generateName") + f"n{len(api.jobs)}"
                    job["metadata"]["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    api.jobs[job["metadata"]["name"]] = job
                    api.steps[job["metadata"]["name"]] = 0
                    return self.reply(201, job)
                if name not in api.jobs:
                    return self.reply(404, {"kind": "Status", "code": 404})
                if method == "DELETE":
                    return self.reply(200, api.jobs.pop(name))
                if name in api.steps:
                    step = api.steps[name]
                    api.jobs[name]["status"] = api.script[min(step, len(api.script) - 1)]
                    api.steps[name] = step + 1
                return self.reply(200, api.jobs[name])

            def do_GET(self):
                self.handle_any("GET")

            def do_POST(self):
                self.handle_any("POST")

            def do_DELETE(self):
                self.handle_any("DELETE")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def deleted(self):
        return [urllib.parse.urlsplit(p).path.rsplit("/", 1)[1] for m, p, _ in self.requests if m == "DELETE"]

    def created(self):
        return [m for m, _, _ in self.requests if m == "POST"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def run_launcher(tmp_path, api: FakeKubeAPI, **env):
    """launch.py from the ConfigMap, run as the CronJob's pod runs it, against `api`."""
    data = nightly_docs()["ConfigMap"]["data"]
    sa = tmp_path / "serviceaccount"
    sa.mkdir(exist_ok=True)
    (sa / "token").write_text("test-token\n")
    (sa / "namespace").write_text("nightly-ns")
    for key in ("launch.py", "rayjob.yaml"):
        (tmp_path / key).write_text(data[key])
    cron_env = {e["name"]: e["value"] for e in nightly_docs()["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **cron_env,
                "TEMPLATE": str(tmp_path / "rayjob.yaml"), "SERVICEACCOUNT_DIR": str(sa),
                "KUBERNETES_API": api.url, "POLL_SECONDS": "0.02", "DELETE_WAIT_SECONDS": "5", **env}
    return subprocess.run([sys.executable, str(tmp_path / "launch.py")], env=full_env,
                          capture_output=True, text=True, timeout=60)


def nightly_rayjob(name, created, status, **extra):
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": name, "creationTimestamp": created, "labels": {"facebatch.io/schedule": "nightly"}},
            "status": {"jobDeploymentStatus": status, **extra}}


def hours_ago(hours):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - hours * 3600))


@pytest.mark.parametrize("state", sorted(KUBERAY_STATES), ids=lambda s: s or "New")
def test_launcher_ends_in_every_kuberay_state(tmp_path, state):
    """The night's RayJob goes through KubeRay's usual steps and then stays in `state`: the launcher
    returns at once for a final state, and for any other one deletes the run at the run deadline."""
    final = KUBERAY_STATES[state]["final"]
    last = {"jobDeploymentStatus": state}
    if state == "Complete":
        last["jobStatus"] = "SUCCEEDED"
    elif state == "ValidationFailed":
        last.update(reason="ValidationFailed", message="The RayJob spec is invalid: something")
    api = FakeKubeAPI(script=[{}, {"jobDeploymentStatus": "Initializing"},
                              {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, last])
    try:
        result = run_launcher(tmp_path, api, RUN_DEADLINE_SECONDS="3600" if final else "1")
    finally:
        api.close()
    out = result.stdout + result.stderr
    assert len(api.created()) == 1, out
    (name,) = api.steps
    if final:
        assert result.returncode == (0 if state == "Complete" else 1), out
        assert api.deleted() == [], "a finished run is kept for inspection"
        if state == "ValidationFailed":
            assert "The RayJob spec is invalid" in out
    else:
        assert result.returncode == 1, out
        assert api.deleted() == [name] and "run deadline" in out, out
        (delete,) = [b for m, _, b in api.requests if m == "DELETE"]
        assert json.loads(delete)["propagationPolicy"] == "Foreground"


def test_launcher_failed_and_stopped_runs_fail_the_night(tmp_path):
    for status in ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"},
                   {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "DeadlineExceeded"}):
        api = FakeKubeAPI(script=[status])
        try:
            assert run_launcher(tmp_path, api).returncode == 1
        finally:
            api.close()


def test_launcher_after_earlier_nights(tmp_path):
    done = {"jobStatus": "SUCCEEDED"}
    script = [{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]
    # A RayJob that KubeRay rejected last night (ValidationFailed) does not block tonight's run.
    api = FakeKubeAPI([nightly_rayjob("facebatch-nightly-old", hours_ago(24), "ValidationFailed")], script)
    try:
        result = run_launcher(tmp_path, api)
    finally:
        api.close()
    assert result.returncode == 0 and len(api.created()) == 1, result.stdout + result.stderr

    # A run still going (within the run deadline) does: skip, exit 75, create nothing.
    api = FakeKubeAPI([nightly_rayjob("facebatch-nightly-going", hours_ago(3), "Retrying")], script)
    try:
        result = run_launcher(tmp_path, api)
    finally:
        api.close()
    assert result.returncode == 75 and not api.created() and not api.deleted()
    assert "facebatch-nightly-going (Retrying)" in result.stdout

    # A run unfinished long past the deadline (its launcher died; stuck in any state) is deleted, and
    # tonight's run goes ahead. Finished ones beyond KEEP_FINISHED are pruned, oldest first.
    old = [nightly_rayjob(f"facebatch-nightly-f{i}", hours_ago(24 * (20 - i)), "Complete", **done) for i in range(3)]
    api = FakeKubeAPI([nightly_rayjob("facebatch-nightly-stuck", hours_ago(30), "Suspended"), *old], script)
    try:
        result = run_launcher(tmp_path, api, KEEP_FINISHED="1")
    finally:
        api.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert api.deleted() == ["facebatch-nightly-stuck", "facebatch-nightly-f0", "facebatch-nightly-f1"]
    assert len(api.created()) == 1


def test_run_deadlines_fit_the_night():
    """A run's attempts, the launcher's run deadline and the CronJob's deadline nest, all inside a day."""
    docs = nightly_docs()
    spec = load_rayjob()["spec"]
    job = docs["CronJob"]["spec"]["jobTemplate"]["spec"]
    env = {e["name"]: e["value"] for e in job["template"]["spec"]["containers"][0]["env"]}
    # KubeRay applies activeDeadlineSeconds to each attempt; there are backoffLimit + 1 of them.
    attempts = (spec["backoffLimit"] + 1) * spec["activeDeadlineSeconds"]
    assert attempts <= 12 * 3600, "infra/README.md promises that a run ends within 12 h"
    assert attempts < int(env["RUN_DEADLINE_SECONDS"]) < job["activeDeadlineSeconds"] < 24 * 3600
    readme = (INFRA / "README.md").read_text()
    assert f"activeDeadlineSeconds: {spec['activeDeadlineSeconds']}" in readme


# ---------------------------------------------------------------- Ray cluster launcher (AWS)

def test_cluster_launcher_config():
    config = yaml.safe_load(CLUSTER.read_text())
    assert config["provider"]["type"] == "aws"
    assert config["max_workers"] >= 1
    assert config["idle_timeout_minutes"] > 0
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "no image work on the head"
    assert re.match(r"^(m|c|r)\d", head["node_config"]["InstanceType"]), "the head is a CPU instance"
    gpu_types = {name: t for name, t in types.items()
                 if name != config["head_node_type"] and re.match(r"^(g|p)\d", t["node_config"]["InstanceType"])}
    assert gpu_types, "no GPU worker type"
    for t in gpu_types.values():
        assert 1 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
        assert "IamInstanceProfile" in t["node_config"]
    assert "IamInstanceProfile" in head["node_config"]
    image = config["docker"]["image"]
    assert image and not image.endswith(":latest")
    # The image bakes everything: no pip installs at node start.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("pip install" in c for c in config.get(key, []))


def test_cluster_launcher_config_passes_rays_schema():
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = yaml.safe_load(CLUSTER.read_text())
    util.validate_config(util.prepare_config(config))  # Ray's own JSON schema for cluster YAMLs


# ---------------------------------------------------------------- Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile():
    instructions = dockerfile_instructions()
    args = dockerfile_args()
    (base,) = [rest for kw, rest in instructions if kw == "FROM"]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu\d+\.\d+", base)
    assert m, f"FROM must be an nvidia/cuda runtime image, got {base!r}"
    # torch's CUDA flavour matches the base image's CUDA version.
    assert args["TORCH_CUDA"] == f"cu{m.group(1)}{m.group(2)}", (base, args["TORCH_CUDA"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"]), "torch must be pinned to an exact version"
    assert args["PYTHON_VERSION"] == "3.11"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["RAY_VERSION"])
    runs = [rest for kw, rest in instructions if kw == "RUN"]
    assert any("download.pytorch.org/whl/" in args["TORCH_INDEX_URL"] and '--index-url "${TORCH_INDEX_URL}"' in r
               and '"torch==${TORCH_VERSION}+${TORCH_CUDA}"' in r for r in runs), "CUDA torch from the PyTorch index"
    # torchvision (nvJPEG for --gpu-jpeg-decode) of the same CUDA flavour, in the same install, and the
    # release made for this torch (torchvision 0.N+15 requires torch 2.N exactly).
    assert any('"torchvision==${TORCHVISION_VERSION}+${TORCH_CUDA}"' in r and '"torch==' in r for r in runs)
    torch_minor = int(args["TORCH_VERSION"].split(".")[1])
    assert re.fullmatch(rf"0\.{torch_minor + 15}\.\d+", args["TORCHVISION_VERSION"]), args["TORCHVISION_VERSION"]
    assert any("from torchvision.io import decode_jpeg" in r for r in runs), "the image checks that nvJPEG's entry imports"
    # The package is copied in and installed (not editable), with Ray pinned to the cluster's version.
    copies = [rest.split() for kw, rest in instructions if kw == "COPY"]
    copied = {src for parts in copies for src in parts[:-1] if not src.startswith("--")}
    assert {"pyproject.toml", "facebatch", "jobs"} <= copied
    for src in copied - {"README.md"}:  # README.md is pyproject's readme; it is written elsewhere
        assert (REPO / src).exists(), f"COPY source {src} missing from the repository"
    assert any(re.search(r"pip install .*\"ray\[default,data\]==\$\{RAY_VERSION\}\" \.", r) for r in runs)
    # The build fails when the model files or the CUDA build are wrong.
    assert any("from facebatch.models import model_hashes" in r and "model_hashes()" in r for r in runs)
    assert any("torch.version.cuda" in r for r in runs)
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    (workdir,) = {rest for kw, rest in instructions if kw == "WORKDIR"}
    assert workdir == IMAGE_APP_DIR
    assert any("index_archive.py --help" in r for r in runs)


# ---------------------------------------------------------------- cron script

def test_cron_script_syntax():
    text = CRON.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert re.search(r"^set -euo pipefail$", text, flags=re.M)
    assert "flock" in text
    assert os.access(CRON, os.X_OK), "the cron script must be executable"
    subprocess.run(["bash", "-n", str(CRON)], check=True)
    # The embedded job-status helper is valid Python and uses the public job SDK.
    (status_py,) = re.findall(r"^STATUS_PY='(.*?)^'$", text, flags=re.M | re.S)
    compile(status_py, "STATUS_PY", "exec")
    assert "from ray.job_submission import" in status_py
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", str(CRON)], check=True)


@pytest.fixture()
def cron_env(tmp_path):
    """Stand-ins for the ray CLI (records its argv) and the Python SDK (answers from env vars)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(
        '#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> "$FAKE_RAY_ARGV"\nprintf "\\1\\0" >> "$FAKE_RAY_ARGV"\n'
        'echo "fake ray: job log line"\n'
        'exit "${FAKE_SUBMIT_RC:-0}"\n')
    # Called as: python -c CODE active PREFIX | python -c CODE wait ID
    (bin_dir / "python").write_text(
        '#!/usr/bin/env bash\ncase "$3" in\n'
        '  active) printf "%s" "${FAKE_ACTIVE:-}"; exit 0 ;;\n'
        '  wait) echo "${FAKE_STATUS:-SUCCEEDED}"; case "${FAKE_STATUS:-SUCCEEDED}" in\n'
        '      SUCCEEDED) exit 0 ;; MISSING) exit 3 ;; *) exit 1 ;; esac ;;\n'
        'esac\nexit 9\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FACEBATCH_SOURCE": "s3://photos/archive/",
        "FACEBATCH_OUT": "s3://index/facebatch/",
        "FACEBATCH_LOG_DIR": str(tmp_path / "logs"),
        "RAY_ADDRESS": "http://10.0.0.1:8265",
        "FAKE_RAY_ARGV": str(tmp_path / "ray-argv"),
    }
    return env, tmp_path


def ray_calls(tmp: Path) -> list[list[str]]:
    """Every argv the fake ray CLI was called with, in order (then forgotten)."""
    fields = (tmp / "ray-argv").read_text().split("\0")[:-1]
    (tmp / "ray-argv").unlink()
    calls, current = [], []
    for field in fields:
        if field == "\1":
            calls.append(current)
            current = []
        else:
            current.append(field)
    return calls


def run_cron(env, **extra):
    return subprocess.run(["bash", str(CRON)], env={**env, **extra}, capture_output=True, text=True, timeout=30)


def test_cron_script_submits_an_accepted_command(cron_env):
    env, tmp = cron_env
    result = run_cron(env)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = ray_calls(tmp)
    assert len(calls) == 2  # the index run, then the people run
    argv = calls[0]
    assert argv[:2] == ["job", "submit"]
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1:]
    assert options[options.index("--address") + 1] == "http://10.0.0.1:8265"
    submission_id = options[options.index("--submission-id") + 1]
    assert re.fullmatch(r"facebatch-nightly-\d{8}T\d{6}Z", submission_id)
    working_dir = Path(options[options.index("--working-dir") + 1])
    assert working_dir.resolve() == REPO.resolve()
    assert command[2:5] == ["s3://photos/archive/", "--out", "s3://index/facebatch/"]
    assert_entrypoint_accepts(command, script_root=working_dir)
    # One log file per run, named after the submission.
    log = (tmp / "logs" / f"{submission_id}.log").read_text()
    assert "fake ray: job log line" in log and "succeeded" in log
    people = calls[1]
    assert people[people.index("--submission-id") + 1] == submission_id + "-people"
    people_command = people[people.index("--") + 1:]
    assert people_command[2] == "s3://index/facebatch/"
    assert_people_entrypoint_accepts(people_command, script_root=working_dir)
    assert "people run succeeded" in log

    custom = run_cron(env, FACEBATCH_ARGS="--device auto --num-actors 2 --limit 1000")
    assert custom.returncode == 0, custom.stdout + custom.stderr
    command = ray_calls(tmp)[0]
    command = command[command.index("--") + 1:]
    assert command[-6:] == ["--device", "auto", "--num-actors", "2", "--limit", "1000"]
    assert_entrypoint_accepts(command, script_root=working_dir)

    # Index only, or people with options of its own.
    assert run_cron(env, FACEBATCH_PEOPLE="0").returncode == 0
    assert len(ray_calls(tmp)) == 1
    labelled = run_cron(env, FACEBATCH_PEOPLE_ARGS="--labels s3://index/labels.csv --full")
    assert labelled.returncode == 0, labelled.stdout + labelled.stderr
    people = ray_calls(tmp)[1]
    people = people[people.index("--") + 1:]
    assert people[-3:] == ["--labels", "s3://index/labels.csv", "--full"]
    assert_people_entrypoint_accepts(people, script_root=working_dir)
    assert run_cron(env, FACEBATCH_PEOPLE="yes").returncode == 2


@pytest.mark.parametrize("status, submit_rc", [("FAILED", 1), ("STOPPED", 0), ("MISSING", 1)])
def test_cron_script_propagates_failure(cron_env, status, submit_rc):
    env, _ = cron_env
    # `ray job submit` exits 0 for a stopped job: the final status decides, not its exit status.
    result = run_cron(env, FAKE_STATUS=status, FAKE_SUBMIT_RC=str(submit_rc))
    assert result.returncode == 1, result.stdout + result.stderr


def test_cron_script_never_overlaps(cron_env):
    env, tmp = cron_env
    # A run still active on the cluster (its cron host rebooted): skip.
    result = run_cron(env, FAKE_ACTIVE="facebatch-nightly-20260101T020000Z")
    assert result.returncode == 75 and "still active" in result.stdout
    assert not (tmp / "ray-argv").exists()
    # The lock held by a run on this host: skip.
    (tmp / "logs").mkdir(exist_ok=True)
    with open(tmp / "logs" / "nightly.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_cron(env)
    assert result.returncode == 75 and "held" in result.stdout
    assert not (tmp / "ray-argv").exists()


def test_cron_script_requires_settings(cron_env):
    env, _ = cron_env
    env = {k: v for k, v in env.items() if k != "FACEBATCH_OUT"}
    result = run_cron(env)
    assert result.returncode == 2 and "FACEBATCH_OUT" in result.stderr


# ---------------------------------------------------------------- the image's user and HOME, as the Ray cluster launcher sees them

def dockerfile_env() -> dict[str, str]:
    """The image's own environment (`docker inspect -f '{{json .Config.Env}}'`) as far as this Dockerfile
    sets it. The nvidia/cuda base adds PATH, CUDA and NVIDIA_* variables, never HOME."""
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions():
        if keyword != "ENV":
            continue
        for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest) or [tuple(rest.split(None, 1))]:
            env[key] = value.strip('"').replace("$PATH", env.get("PATH", "/usr/bin:/bin"))
    return env


def dockerfile_user() -> tuple[str, str]:
    """(user name, home directory in /etc/passwd) of the final USER, from its useradd line."""
    instructions = dockerfile_instructions()
    user = [rest for kw, rest in instructions if kw == "USER"][-1]
    for kw, rest in instructions:
        m = re.search(rf"useradd\s+((?:--?[\w-]+(?:\s+(?!-)\S+)?\s+)*){re.escape(user)}\b", rest) if kw == "RUN" else None
        if m:
            home = re.search(r"(?:--home-dir|-d)\s+(\S+)", m.group(1))
            assert "--create-home" in m.group(1) or "-m" in m.group(1).split(), "the user needs a home directory"
            return user, home.group(1) if home else f"/home/{user}"
    raise AssertionError(f"USER {user} is not created by a useradd in the Dockerfile")


def test_dockerfile_user_and_home():
    user, passwd_home = dockerfile_user()
    env = dockerfile_env()
    # uid 1000 like the rayproject images: the launcher's file_mounts belong to the VM's SSH user (ubuntu,
    # uid 1000 on the Ubuntu AMIs), and the token file is mode 0600.
    assert user == "ray" and re.search(r"useradd\s+--uid 1000\b", DOCKERFILE.read_text())
    # HOME must be in the image's environment: that is where the cluster launcher reads it from.
    assert env.get("HOME") == passwd_home == "/home/ray", env.get("HOME")
    assert env["VIRTUAL_ENV"].startswith(env["HOME"] + "/"), "the venv belongs to the image's user"


class FakeDockerHost:
    """One cluster VM as Ray's DockerCommandRunner talks to it over SSH: answers the docker commands
    that `ray up` runs, with Docker's own rules for HOME (the image's ENV, else the USER's passwd
    entry, else /root), and records what was run."""

    def __init__(self, image: str, ssh_user: str, cluster_name: str):
        self.image = image
        self.ssh_user, self.cluster_name = ssh_user, cluster_name
        self.image_env = dockerfile_env()
        self.user, self.passwd_home = dockerfile_user()
        self.container = None  # {"mounts": [dest, ...]} while one runs
        self.commands: list[str] = []

    def container_home(self) -> str:
        return self.image_env.get("HOME") or self.passwd_home

    def run(self, cmd, with_output=False, **kwargs):
        self.commands.append(cmd)
        out = ""
        if cmd.startswith("command -v docker"):
            out = "/usr/bin/docker"
        elif cmd.startswith("docker inspect -f '{{json .Config.Env}}' "):
            out = json.dumps([f"{k}={v}" for k, v in self.image_env.items()])
        elif cmd.startswith("docker inspect -f '{{.State.Running}}'"):
            out = "true" if self.container else "Error: No such object: ray_container"
        elif cmd.startswith("docker inspect -f '{{.Config.Image}}'"):
            out = self.image if self.container else ""
        elif cmd.startswith("docker inspect -f '{{json .Mounts}}'"):
            out = json.dumps([{"Destination": d} for d in self.container["mounts"]]) if self.container else "[]"
        elif cmd.startswith("docker run "):
            argv = shlex.split(cmd)
            assert self.image in argv
            self.container = {"mounts": [argv[i + 1].split(":", 1)[1] for i, a in enumerate(argv) if a == "-v"],
                              "argv": argv}
        elif re.fullmatch(r"docker exec \S+ printenv HOME", cmd):
            out = self.container_home()
        elif cmd.startswith("docker stop "):
            self.container = None
        elif cmd.startswith("docker info"):
            out = "map[io.containerd.runc.v2:{runc [] <nil>} runc:{runc [] <nil>}]"
        elif cmd.startswith("cat /proc/meminfo"):
            out = "MemTotal: 32000000 kB\nMemAvailable: 30000000 kB"
        elif not cmd.startswith("docker pull "):
            raise AssertionError(f"unexpected command on the VM: {cmd}")
        return out.encode() if with_output else None


def ray_up_once(config: dict, host: FakeDockerHost) -> list[str]:
    """The container part of one `ray up` on the head VM, with Ray's own DockerCommandRunner."""
    command_runner = pytest.importorskip("ray.autoscaler._private.command_runner")
    runner = command_runner.DockerCommandRunner(
        config["docker"], log_prefix="", node_id="head", provider=None,
        auth_config=config["auth"], cluster_name=config["cluster_name"],
        process_runner=subprocess, use_internal_ip=False)
    runner.ssh_command_runner = host  # every command goes to the fake VM instead of over SSH
    start = len(host.commands)
    runner.run_init(as_head=True, file_mounts=dict(config["file_mounts"]), sync_run_yet=True)
    return host.commands[start:]


def test_cluster_launcher_mounts_the_token_where_ray_reads_it():
    config = yaml.safe_load(CLUSTER.read_text())
    assert "RAY_AUTH_MODE=token" in " ".join(config["docker"]["run_options"])
    host = FakeDockerHost(config["docker"]["image"], config["auth"]["ssh_user"], config["cluster_name"])
    first = ray_up_once(config, host)
    assert any(c.startswith("docker run ") for c in first)
    # Ray looks for the token in $HOME/.ray/auth_token of the container's user (Path.home()).
    token = "~/.ray/auth_token"
    assert token in config["file_mounts"]
    want = host.container_home() + token[1:]
    assert want.startswith(host.passwd_home + "/"), "HOME is not the user's home directory"
    assert want in host.container["mounts"], f"token mounted at {host.container['mounts']}, Ray reads {want}"
    assert not any(m.startswith("/root/") for m in host.container["mounts"])

    # A second `ray up` on the running cluster keeps the container (and the Ray processes in it).
    second = ray_up_once(config, host)
    assert not any(c.startswith(("docker stop", "docker run")) for c in second), second


# ---------------------------------------------------------------- NVIDIA driver requirement of the image

NVIDIA_REQUIRE = yaml.safe_load((REPO / "tests" / "fixtures" / "nvidia_cuda_require.yaml").read_text())


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def nvidia_container_accepts(require: str, driver: str, brand: str) -> bool:
    """The NVIDIA container toolkit's NVIDIA_REQUIRE_* check: space-separated constraints ORed,
    comma-separated ones ANDed; `cuda` is the CUDA version of the host's driver."""
    floors = {_version(c): _version(d) for c, d in NVIDIA_REQUIRE["cuda_driver_floor"].items()}
    cuda = max((c for c, d in floors.items() if _version(driver) >= d), default=(0,))
    facts = {"driver": _version(driver), "cuda": cuda}
    ops = {">=": lambda a, b: a >= b, "<": lambda a, b: a < b, ">": lambda a, b: a > b,
           "<=": lambda a, b: a <= b, "=": lambda a, b: a == b}

    def holds(term):
        key, op, value = re.fullmatch(r"(\w+)(>=|<=|=|<|>)(\S+)", term).groups()
        if key == "brand":
            return brand == value
        fact = facts[key]
        return ops[op](fact[:len(_version(value))] if key == "driver" else fact, _version(value))

    return any(all(holds(t) for t in clause.split(",")) for clause in require.split())


def test_nvidia_driver_requirement():
    (base,) = [rest for kw, rest in dockerfile_instructions() if kw == "FROM"]
    assert base == NVIDIA_REQUIRE["image"], "base image changed: refresh tests/fixtures/nvidia_cuda_require.yaml"
    require = NVIDIA_REQUIRE["NVIDIA_REQUIRE_CUDA"]
    ok = lambda driver, brand="tesla": nvidia_container_accepts(require, driver, brand)  # noqa: E731
    # What infra/README.md states: >= 560.28.03 on any GPU; the 535 and 550 branches on non-GeForce GPUs.
    assert ok("560.28.03", "geforce") and ok("570.124.06", "geforcertx") and ok("580.65.06")
    for driver in ("535.54.03", "535.247.01", "550.54.15", "550.163.01"):
        assert ok(driver, "tesla") and ok(driver, "nvidia") and not ok(driver, "geforce"), driver
    # ... and what it refuses, although CUDA minor-version compatibility (>= 525.60.13) would run torch.
    for driver in ("525.60.13", "525.147.05", "530.30.02", "545.23.08", "551.0.0", "555.42.06", "560.0.0"):
        assert not ok(driver), driver
    readme = (INFRA / "README.md").read_text()
    for claim in ("**>= 560.28.03**", "**535**", "**550**", "NVIDIA_DISABLE_REQUIRE=1", "525–534", "536–549"):
        assert claim in readme, claim


# ---------------------------------------------------------------- the manifests against KubeRay's CRDs

KUBERAY_CRD = yaml.safe_load((REPO / "tests" / "fixtures" / "kuberay_rayjob_crd.yaml").read_text())["versions"]


def schema_problems(value, schema: dict, path: str = "spec") -> list[str]:
    """What a Kubernetes API server does with `value` under a structural CRD schema: fields it does not
    know are pruned (silently), wrong types, enum values, minimums and missing required fields are
    rejected. Each problem is 'pruned: <path>' or '<path>: <why>'."""
    kind = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
    else:
        ok = {"object": isinstance(value, dict), "array": isinstance(value, list), "string": isinstance(value, str),
              "boolean": isinstance(value, bool), None: True,
              "integer": isinstance(value, int) and not isinstance(value, bool),
              "number": isinstance(value, (int, float)) and not isinstance(value, bool)}[kind]
    if not ok:
        return [f"{path}: {type(value).__name__} where the CRD wants {kind}"]
    problems = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        problems.append(f"{path}: {value} < {schema['minimum']}")
    if schema.get("x-trimmed") or schema.get("x-kubernetes-preserve-unknown-fields"):
        return problems
    if kind == "object":
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{path}.{key}: required")
        for key, item in value.items():
            if key in properties:
                problems += schema_problems(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                problems += schema_problems(item, extra, f"{path}.{key}")
            elif extra is not True:
                problems.append(f"pruned: {path}.{key}")
    elif kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            problems += schema_problems(item, schema["items"], f"{path}[{i}]")
    return problems


def test_schema_checker():
    spec = KUBERAY_CRD["v1.5.1"]["spec"]
    assert schema_problems({"entrypoint": "x", "backoffLimit": 1}, spec) == []
    assert schema_problems({"entrypoint": "x", "backofLimit": 1}, spec) == ["pruned: spec.backofLimit"]
    assert schema_problems({"entrypoint": 3}, spec) == ["spec.entrypoint: int where the CRD wants string"]
    problems = schema_problems({"rayClusterSpec": {"autoscalerOptions": {"upscalingMode": "Fast"}}}, spec)
    assert problems[0] == "spec.rayClusterSpec.headGroupSpec: required"
    assert problems[1].startswith("spec.rayClusterSpec.autoscalerOptions.upscalingMode: 'Fast' not in")


def manifest_specs() -> dict[str, dict]:
    template = yaml.safe_load(nightly_docs()["ConfigMap"]["data"]["rayjob.yaml"])
    return {"rayjob.yaml": load_rayjob()["spec"], "nightly.yaml": template["spec"]}


@pytest.mark.parametrize("manifest", ["rayjob.yaml", "nightly.yaml"])
def test_rayjob_manifests_against_kuberay_crds(manifest):
    import copy

    spec = manifest_specs()[manifest]
    # v1.5.1, the minimum infra/README.md states, keeps every field.
    assert schema_problems(spec, KUBERAY_CRD["v1.5.1"]["spec"]) == []
    # It is the minimum: v1.5.0 would drop the token authentication.
    assert schema_problems(spec, KUBERAY_CRD["v1.5.0"]["spec"]) == ["pruned: spec.rayClusterSpec.authOptions"]
    # Without authOptions (the README's fallback) v1.2.0 keeps everything, v1.1.1 drops the retries.
    without_auth = copy.deepcopy(spec)
    del without_auth["rayClusterSpec"]["authOptions"]
    assert schema_problems(without_auth, KUBERAY_CRD["v1.2.0"]["spec"]) == []
    assert sorted(schema_problems(without_auth, KUBERAY_CRD["v1.1.1"]["spec"])) == [
        "pruned: spec.backoffLimit", "pruned: spec.submitterConfig"]


def test_kuberay_versions_stated():
    readme = (INFRA / "README.md").read_text()
    assert "KubeRay operator **>= v1.5.1**" in readme and "v1.2.0–v1.5.0" in readme
    assert "v1.1–" not in readme and "from v1.1" not in RAYJOB.read_text()
    assert ">= v1.5.1" in RAYJOB.read_text() and ">= v1.2.0" in RAYJOB.read_text() and ">= v1.5.1" in NIGHTLY.read_text()
