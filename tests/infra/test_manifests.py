"""infra/: Dockerfiles, the KubeRay RayJob + CronJob, the AWS cluster launcher config.

Docker, Kubernetes and AWS are not reachable here, so these are structural checks of what a
user relies on, plus the checks that *can* run locally: the RayJob's entrypoint is executed by
/bin/sh exactly as Ray's job supervisor would, with ``--dry-run`` appended, so the real job
parser validates every flag and value; the AWS config goes through Ray's own
``prepare_config`` / ``validate_config`` and its JSON schema.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _pinned_torch() -> str:
    text = (REPO / "constraints-dev.txt").read_text()
    return re.search(r"^torch==([\w.]+)$", text, re.M).group(1)


# ------------------------------------------------------------------------------ RayJob


def test_rayjob_runs_the_job_with_the_documented_flags() -> None:
    (job,) = _load_all(INFRA / "k8s" / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["generateName"]  # one name per daily run
    spec = job["spec"]
    entry = spec["entrypoint"]
    assert entry.startswith("python /app/jobs/embed_laion.py ")
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["activeDeadlineSeconds"] < 24 * 3600  # one run ends before the next

    # Run the entrypoint as Ray does (a /bin/sh command line) against this checkout, with
    # --dry-run: the job's own parser and validation check every flag and value.
    env = {**os.environ, "PATH": f"{Path(sys.prefix) / 'bin'}:{os.environ['PATH']}"}
    today = dt.datetime.now(dt.timezone.utc).date()
    out = subprocess.run(
        ["/bin/sh", "-c", entry.replace("/app/", f"{REPO}/") + " --dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    ).stdout
    cfg = yaml.safe_load(out)
    assert cfg["input"] == "s3://laion-curation/urls/part-*.parquet"
    assert cfg["output"] == f"s3://laion-curation/curated/{today.isoformat()}"
    yesterday = (today - dt.timedelta(days=1)).isoformat()
    assert cfg["dedup"]["against"] == f"s3://laion-curation/curated/{yesterday}"
    assert (cfg["embed"]["model"], cfg["embed"]["pretrained"]) == ("ViT-L-14", "openai")
    assert cfg["embed"]["num_gpus"] == 1.0

    cluster = spec["rayClusterSpec"]
    # The cluster runs the Ray release the project is tested with.
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"].endswith("-cpu")
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]
    assert gpu["image"].endswith("-cuda")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert groups["gpu"]["maxReplicas"] >= groups["gpu"]["minReplicas"] >= 0
    cpu = groups["cpu"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]


# ----------------------------------------------------------------------------- CronJob


def _cron_field_ok(field: str, lo: int, hi: int) -> bool:
    for part in field.split(","):
        base, _, step = part.partition("/")
        if step and not step.isdigit():
            return False
        if base == "*":
            continue
        a, _, b = base.partition("-")
        nums = [a] + ([b] if b else [])
        if not all(n.isdigit() and lo <= int(n) <= hi for n in nums):
            return False
    return True


def test_cronjob_creates_the_rayjob_daily_with_least_privilege() -> None:
    docs = _load_all(INFRA / "k8s" / "cronjob.yaml")
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    sa, role, binding, cron = (
        by_kind[k] for k in ("ServiceAccount", "Role", "RoleBinding", "CronJob")
    )
    # The Role grants RayJob creation and nothing beyond RayJobs.
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert "create" in rule["verbs"] and not {"delete", "*"} & set(rule["verbs"])
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"]}]

    assert cron["apiVersion"] == "batch/v1"
    fields = cron["spec"]["schedule"].split()
    ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    assert len(fields) == 5 and all(
        _cron_field_ok(f, *r) for f, r in zip(fields, ranges, strict=True)
    )
    assert fields[2:] == ["*", "*", "*"], "runs every day"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    (container,) = pod["containers"]
    assert "kubectl" in container["image"]
    assert container["args"][:2] == ["create", "-f"]  # create: the RayJob uses generateName

    # The file kubectl reads is rayjob.yaml, through the ConfigMap kustomize generates.
    kust = yaml.safe_load((INFRA / "k8s" / "kustomization.yaml").read_text())
    assert kust["resources"] == ["cronjob.yaml"]  # rayjob.yaml itself is not applied
    (gen,) = kust["configMapGenerator"]
    assert gen["files"] == ["rayjob.yaml"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] != "/tmp"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == gen["name"]
    assert container["args"][2] == f"{mount['mountPath']}/rayjob.yaml"


# ----------------------------------------------------------------------------- Docker


def _dockerfile(name: str) -> tuple[dict[str, str], list[str]]:
    text = (INFRA / name).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    copies = re.findall(r"^COPY (.+) \S+$", text, re.M)
    return args, [p for line in copies for p in line.split()]


def test_dockerfiles_pin_the_tested_releases_and_copy_what_exists() -> None:
    for name, index in (("Dockerfile", "/whl/cpu"), ("Dockerfile.cuda", "/whl/cu")):
        args, copied = _dockerfile(name)
        assert args["TORCH_VERSION"] == _pinned_torch()
        assert args["RAY_VERSION"] == ray.__version__
        assert index in args["TORCH_INDEX"]
        text = (INFRA / name).read_text()
        assert "wget" in text  # KubeRay's probes exec wget in the Ray container
        assert "\nUSER ray" in text  # not root
        assert "jobs" in copied and "pipeline" in copied and "clip_model" in copied
        for path in copied:
            assert (REPO / path).exists(), f"{name} copies {path}, which is not in the repo"
        # The build context is the repo root (.venv is GBs); the per-Dockerfile ignore file
        # must let through exactly what is copied.
        lines = (INFRA / f"{name}.dockerignore").read_text().splitlines()
        ignore = [x.strip() for x in lines if x.strip() and not x.startswith("#")]
        assert ignore[0] == "*"
        allowed = {p.lstrip("!").rstrip("/") for p in ignore if p.startswith("!")}
        assert set(copied) <= allowed


# -------------------------------------------------------------------------------- AWS


def test_aws_cluster_config_passes_rays_validation_and_has_gpu_workers() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    validate_config(prepare_config(config))  # what `ray up` runs before touching AWS

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no GPU worker type"
    for t in gpu:
        assert t["node_config"]["InstanceType"].split(".")[0][0] in "gp"  # g5/p4d/... families
        assert t["docker"]["worker_image"].endswith("-cuda")
        assert "--gpus all" in t["docker"]["worker_run_options"]
        assert t["max_workers"] >= 1
    assert config["head_node_type"] in types
    # The job API stays on the head's loopback (reached through `ray dashboard`'s tunnel).
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
