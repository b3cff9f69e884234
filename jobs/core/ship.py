"""What a job takes to the cluster: the project's code (an allowlist, never whatever else lies in
the checkout: notes, keys, data, virtualenvs) and a short list of non-secret storage settings.

Used by ``mae submit`` (the job's runtime_env) and by every command started with ``RAY_ADDRESS``
pointing at a cluster (the driver's runtime_env), so both run the same code with the same
environment on the workers.
"""

from __future__ import annotations

import os
import shutil
import tempfile

PROJECT = ("pipeline", "mae_model", "jobs", "pyproject.toml")  # what the workers import, and its metadata
ENV_ALLOW = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
             "AZURE_STORAGE_ACCOUNT_NAME",  # where az:// URIs live (adlfs reads it); not a credential
             # the experiment trackers' own settings (where the runs go, not who may write them)
             "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE",
             "WANDB_BASE_URL")
# A tracker's credentials go along only when the config turns that tracker on (a job that logs to
# W&B needs its key on the cluster): values never printed, never written to a config.
TRACKER_SECRETS = {"mlflow": ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
                   "wandb": ("WANDB_API_KEY",)}
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*")


def project_root() -> str | None:
    """This checkout, when the code runs from one (an installed package ships nothing)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return root if os.path.isfile(os.path.join(root, "pyproject.toml")) else None


def stage(root: str) -> str:
    """A temporary copy of the allowlisted project files of ``root`` (the caller removes it)."""
    out = tempfile.mkdtemp(prefix="mae-ship-")
    for name in PROJECT:
        src = os.path.join(root, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(out, name), ignore=_SKIP)
        elif os.path.isfile(src):
            shutil.copy2(src, os.path.join(out, name))
    return out


def allowed_env(trackers: tuple[str, ...] = ()) -> dict[str, str]:
    """The allow-listed settings that are set in this shell (no storage credentials: cluster nodes
    reach object storage with their own roles), and the credentials of the ``trackers`` turned on."""
    names = ENV_ALLOW + tuple(k for t in trackers for k in TRACKER_SECRETS.get(t, ()))
    return {k: os.environ[k] for k in names if os.environ.get(k)}


def inside_ray_job() -> bool:
    """A submitted job's driver: its runtime_env was already set by the job (code and variables)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
