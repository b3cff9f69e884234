"""What every entrypoint shares: connecting to Ray and turning known errors into one line."""

from __future__ import annotations

import contextlib
import os
import sys

from pipeline import private_api
from pipeline.storage import StorageError, redact


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2."""


class RunFailed(RuntimeError):
    """A run that started and failed (after its retries): printed as one line, exit status 1."""


def parse_args(ap, argv: list[str], *, strict: bool = False):
    """``ap.parse_args(argv)``. ``strict``: an error (an unknown flag, a bad value, a missing
    argument) raises a one-line :class:`UserError` instead of printing the usage and exiting, and
    ``--help`` is refused: how ``mae submit`` checks a command line on the user's machine."""
    if strict:
        if any(x in ("-h", "--help") for x in argv):
            raise UserError(f"--help is not submitted: run `{ap.prog} --help` here")

        def error(message: str):
            raise UserError(message)
        ap.error = error
    return ap.parse_args(argv)


def parse_config_command(prog: str, ap, argv: list[str], *, strict: bool = False):
    """A command that takes ``[CONFIG.yaml] [section.field=value ...]``: ``--config`` refused,
    parsed (``strict``: see :func:`parse_args`), and a first argument that is an override (no
    config file given) moved to the overrides."""
    refuse_config_flag(prog, argv)
    a = parse_args(ap, argv, strict=strict)
    if a.config and "=" in a.config:  # only overrides given
        a.overrides.insert(0, a.config)
        a.config = None
    return a


def refuse_config_flag(prog: str, argv: list[str]) -> None:
    """``--config FILE`` (an old spelling in the docs): the config file is the first argument."""
    if any(x == "--config" or x.startswith("--config=") for x in argv):
        raise UserError(f"--config is not an option: give the config file first, as it is: "
                        f"{prog} CONFIG.yaml [section.field=value ...]")


def say(line: str) -> None:
    """One line to stdout, at once. Not ``print``: in a Ray Train V2 worker ``print`` is patched to
    go to Train's logger *and* to Ray's captured stdout, and every line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def failure_line(e: BaseException) -> str:
    """One line for what Ray Train V2's ``fit()`` raised: the failing worker's own error (rank
    and exception type, first line), not the whole chain of tracebacks."""
    failures = getattr(e, "worker_failures", None)
    rank, err = (min(failures.items(), key=lambda kv: kv[0]) if failures else
                 (None, getattr(e, "controller_failure", None) or e))
    while getattr(err, "cause", None) is not None:  # a RayTaskError carries the raised exception
        err = err.cause
    lines = [x for x in str(err).splitlines() if x.strip()]
    where = f"rank {rank}: " if rank is not None else ""
    return redact(f"{where}{type(err).__name__}: {lines[0] if lines else ''}".strip())


def init_ray(address: str | None = None, num_cpus: float | None = None, **kw):
    """Connect to ``address`` (or ``RAY_ADDRESS``; ``auto`` for a Ray already running here); else
    start a new local single-node Ray on 127.0.0.1 with at least ``num_cpus`` logical CPUs (what the job's trainers and its data
    pipeline need together: on a 2-core machine the trainers alone would hold every CPU and the
    decode tasks would never start)."""
    import math

    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise UserError(f"Ray address {address} is a job server (dashboard) address: send the job there with "
                        "`mae submit -- COMMAND ...`, or give a cluster address (host:6379, ray://host:10001)")
    if address:
        from jobs.core.ship import allowed_env, inside_ray_job, project_root, stage
        if inside_ray_job() or "runtime_env" in kw:
            ray.init(address=address, log_to_driver=True, **kw)
        else:
            # Started by hand against a cluster: its workers get what `mae submit` would give a job,
            # this checkout's code (an allowlist) and the allow-listed storage settings.
            root = project_root()
            wd = stage(root) if root else None
            env = {"env_vars": allowed_env(), **({"working_dir": wd} if wd else {})}
            try:
                ray.init(address=address, log_to_driver=True, runtime_env=env, **kw)
            finally:  # uploaded by init; the copy is no longer needed
                if wd:
                    import shutil
                    shutil.rmtree(wd, ignore_errors=True)
    else:
        # A local Ray is one node: with Ray's multi-node mode off, its GCS, raylet, agents and
        # workers listen on 127.0.0.1 only (else on every interface of the machine).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
            private_api.local_ray_loopback()  # the variable is read at import; ray may be imported already
        try:  # the container's share (cgroup quota, affinity), not the host's cores
            have = private_api.container_cpus()
        except Exception:  # noqa: BLE001
            have = os.cpu_count() or 1
        cpus = max(int(have), math.ceil(num_cpus or 0))
        # address="local": a new Ray of this job's own, never a silent connection to some other
        # Ray found running on the machine (RAY_ADDRESS=auto asks for that one)
        ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 **private_api.local_init_kwargs("127.0.0.1"), **{"resources": {STABLE_RESOURCE: 1000}, **kw})
    return ray


@contextlib.contextmanager
def one_line_errors(prog: str):
    """Known errors -> ``prog: error: ...`` on stderr and exit 2, never a traceback."""
    from mae_model.config import ConfigError
    try:
        yield
    except (UserError, StorageError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"{prog}: error: {redact(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunFailed as e:
        print(f"{prog}: error: the run failed: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def cluster_capacity() -> dict:
    """Resources the cluster has, or may have once its autoscaler has added nodes (a cluster that
    scales from zero workers has no CPUs yet, and must not be refused for it)."""
    import ray

    from pipeline.cluster import autoscaler_limits
    now = dict(ray.cluster_resources())
    for k, v in (autoscaler_limits() or {}).items():
        now[k] = max(now.get(k, 0.0), float(v))
    return now


def check_data_cpus(need_trainers: float, need_data: float, *, what: str) -> None:
    """Refuse at launch what would hang: a job whose trainers (and Tune trial drivers) hold so many
    of the cluster's CPUs that the data pipeline's decode tasks can never be scheduled (Ray Data
    shows them 'backpressured' and raises nothing)."""
    total = cluster_capacity().get("CPU", 0.0)
    if total + 1e-9 >= need_trainers + need_data:
        return
    raise UserError(
        f"{what}: the Ray cluster has {total:g} CPUs; the trainers hold {need_trainers:g} "
        f"(scaling.num_workers x scaling.cpus_per_worker), leaving {max(0.0, total - need_trainers):g} for the "
        f"data pipeline, which needs {need_data:g} (data.decode_cpus): lower scaling.cpus_per_worker or "
        "data.decode_cpus, or add CPUs to the cluster (a local Ray: start it with more logical CPUs)")


# Advertised by the nodes that are not preemptible (the head, on-demand groups): the resource that
# `mae tune` trial drivers ask a sliver of, so a spot reclaim never takes a trial's driver, Train
# controller and stream coordinator (they live on the driver's node).
STABLE_RESOURCE = "mae_stable"

SCRATCH_PREFIX = "mae-run-"
_SCRATCH_STAGING = "mae-new-"  # a scratch dir before its owner file is in; never scanned as one
_STAGING_GRACE_S = 600.0


def _owner_alive(path: str) -> bool | None:
    """True / False for a scratch directory's owning process; None when it names no owner."""
    try:
        with open(os.path.join(path, "owner")) as f:
            pid, started = f.read().split()
    except (OSError, ValueError):
        return None
    import psutil
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 1e-3  # not a reused pid
    except (psutil.Error, ValueError):
        return False


def sweep_scratch() -> None:
    """Remove the scratch directories of this node's dead attempts (see :func:`attempt_scratch`).
    Run when an attempt starts and again when it ends: a killed attempt's process can outlive the
    start of the next one by a moment (its threads finishing), and its directory would stay."""
    import shutil
    import tempfile
    import time
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        if name.startswith(SCRATCH_PREFIX):
            dead = not _owner_alive(path)
        elif name.startswith(_SCRATCH_STAGING):  # its creator was killed between mkdtemp and rename
            try:
                dead = time.time() - os.stat(path).st_mtime > _STAGING_GRACE_S
            except OSError:
                continue
        else:
            continue
        if dead:
            shutil.rmtree(path, ignore_errors=True)


def attempt_scratch() -> str:
    """A scratch directory for this process (one training attempt) in the node's temp dir.

    An attempt normally removes its own at the end; one that is SIGKILLed (a crashed worker, a
    trial cut by a scheduler, the OOM killer, Ray tearing down a failed worker group while the
    attempt removes its scratch) cannot, and its directory holds the local copy of the checkpoint
    it was staging: on a node that runs attempt after attempt for weeks that fills the disk. So
    each new attempt first removes the directories whose owner process is gone, and those with no
    owner at all: a scratch directory gets its name only once its owner file is in (it is made
    under another prefix and renamed), so one without is a removal that was cut short."""
    import tempfile

    import psutil
    sweep_scratch()
    tmp = tempfile.gettempdir()
    staging = tempfile.mkdtemp(prefix=_SCRATCH_STAGING)
    with open(os.path.join(staging, "owner"), "w") as f:
        f.write(f"{os.getpid()} {psutil.Process().create_time()!r}")
    d = os.path.join(tmp, SCRATCH_PREFIX + os.path.basename(staging)[len(_SCRATCH_STAGING):])
    os.rename(staging, d)  # unique: mkdtemp's suffix; a live scratch dir is never empty, so never replaced
    return d
