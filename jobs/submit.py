"""mae submit [--address URL] [--follow] -- pretrain|finetune|tune|evaluate|prepare|preflight ARGS...

Runs one of the project's commands as a Ray job on a cluster (Ray Job Submission): this checkout
goes along as the job's ``working_dir`` (an allowlist: pipeline/, mae_model/, jobs/, pyproject.toml;
nothing else that lies in the checkout), the command runs as
``python -m jobs.cli CMD ARGS`` on the head, and the submission id is printed. ``--follow``
streams the job's logs to the end and exits with its status (0 succeeded, 1 failed, 3 stopped).

    export RAY_ADDRESS=http://head.example.com:8265      # the dashboard / job server
    export RAY_AUTH_TOKEN=...                             # if the cluster uses token auth
    mae submit --follow -- pretrain jobs/configs/mae_vit_base_imagenet.yaml data.source=s3://b/shards

Before anything is sent, the command line is checked here by the command's own parser and config
loader: an unknown flag or field, or a bad value, fails in one line and no job is created. A
config file (pretrain, tune) is a file on this machine: it must exist and parse, and it goes
along with the job (as submitted/NAME in its working_dir), wherever it lies. Paths and URIs
inside the arguments (data.source, SRC, DST, ...) are the cluster's and are not read here.

Environment: only non-secret storage settings (AWS_ENDPOINT_URL*, AWS_REGION, AWS_DEFAULT_REGION,
AZURE_STORAGE_ACCOUNT_NAME) are copied into the job, when set here. Cluster nodes normally reach
object storage with their own roles; to copy a credential anyway name it: ``--env AWS_ACCESS_KEY_ID
--env AWS_SECRET_ACCESS_KEY`` (its value then sits in the job's runtime_env, which anyone with
access to the dashboard can read). Values are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import importlib
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import uuid

from jobs.core.common import UserError, one_line_errors
from jobs.core.ship import allowed_env, project_root, stage
from pipeline.private_api import RAY_PACKAGING_LOGGERS
from pipeline.storage import SECRET_ENV, redact

SUBMITTABLE = ("pretrain", "finetune", "tune", "evaluate", "prepare", "preflight")
EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
_SECRETISH = re.compile(r"(SECRET|TOKEN|PASSWORD|CREDENTIAL|ACCESS_KEY|PRIVATE)", re.I)


# ---------------------------------------------------------------------------- the client
def auth_token() -> str | None:
    """The cluster token: RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH, else
    ~/.ray/auth_token (where `ray get-auth-token --generate` puts it)."""
    tok = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if tok:
        return tok
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN_PATH") and not os.path.isfile(path):
        raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: no such file: point it at the file holding the "
                        "cluster's token")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip() or None
    return None


def job_server(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS "
                        "(the head's dashboard / job server address)")
    if address.startswith("ray://"):
        raise UserError(f"{address}: that is a Ray Client address; jobs are submitted to the dashboard's "
                        "job server: http://HEAD:8265")
    return address if "://" in address else f"http://{address}"


_CHATTY = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk", *RAY_PACKAGING_LOGGERS)


def client(address: str | None, *, verbose: bool = False):
    """A JobSubmissionClient, with the token (if any) sent as a bearer header; refusals and
    unreachable servers become one clear line."""
    import logging

    from ray.job_submission import JobSubmissionClient
    for name in _CHATTY:  # packaging chatter (one line per ignored file) unless asked for
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    addr = job_server(address)
    tok = auth_token()
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    with cluster_errors(addr):
        return JobSubmissionClient(addr, headers=headers)


class cluster_errors:
    """Context: the job server's refusals and connection failures -> UserError (one line)."""

    def __init__(self, addr: str):
        self.addr = addr

    def __enter__(self):
        return self

    def __exit__(self, et, e, tb):
        if e is None or isinstance(e, (UserError, KeyboardInterrupt, SystemExit)):
            return False
        from ray.exceptions import AuthenticationError
        msg = redact(str(e))
        if isinstance(e, AuthenticationError) or "401" in msg[:80] or "403" in msg[:80]:
            have = "the token sent was refused" if auth_token() else "no token was sent"
            raise UserError(f"{self.addr} refused the client ({have}): the cluster uses token authentication; "
                            "set RAY_AUTH_TOKEN to its token or RAY_AUTH_TOKEN_PATH to a file holding it "
                            "(on the head: `ray get-auth-token`)") from None
        if isinstance(e, ConnectionError) or "Failed to connect" in msg or "Connection refused" in msg:
            raise UserError(f"cannot reach a Ray job server at {self.addr}: check --address / RAY_ADDRESS "
                            "(the dashboard address, default port 8265) and that the head runs the "
                            "dashboard (ray[default])") from None
        if "does not exist" in msg.lower() or "not found" in msg.lower():
            raise UserError(f"{self.addr}: {msg.splitlines()[0][:200]} (see `mae jobs list`)") from None
        return False


# ---------------------------------------------------------------------------- what is sent
def trackers_of(cmd: str, args: list[str]) -> tuple[str, ...]:
    """The experiment trackers the submitted command's config turns on (their credentials go along)."""
    if cmd not in ("pretrain", "tune", "finetune"):
        return ()
    from jobs.core.config import load
    a = importlib.import_module(f"jobs.{cmd}").parse(args, strict=True)
    if cmd == "finetune":
        from jobs.finetune import config_of
        track = config_of(a, "", []).track
    else:
        track = load(a.config, a.overrides).track
    return tuple(t for t in ("mlflow", "wandb") if getattr(track, t))


def job_env(extra: list[str], trackers: tuple[str, ...] = ()) -> tuple[dict[str, str], list[str]]:
    """(variables for the job, notes to print). Allow-listed settings when set here, the
    credentials of the trackers the command turns on, plus the variables named with --env. Notes
    name variables, never values."""
    env, notes = allowed_env(trackers), []
    for k in extra:
        if "=" in k:
            raise UserError(f"--env {k.split('=', 1)[0]}=...: give only the NAME; its value is read from "
                            "this shell's environment (values on command lines end up in shell history)")
        if k not in os.environ:
            raise UserError(f"--env {k}: not set in this shell; export it first or drop --env {k}")
        if k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            raise UserError(f"--env {k}: the cluster sets this for its jobs itself; do not forward it")
        env[k] = os.environ[k]
        if k in SECRET_ENV or _SECRETISH.search(k):
            notes.append(f"forwarding {k} as you asked: it is readable in the job's runtime_env on the dashboard")
    return env, notes


def check_command(cmd: str, args: list[str]) -> str | None:
    """The command line checked here, before a job exists, by the command's own parser and config
    loader (``jobs.<cmd>.check``; none of them imports torch or Ray or reads storage): one line
    when it is wrong. -> the local config file it names, if any."""
    from mae_model.config import ConfigError
    module = importlib.import_module(f"jobs.{cmd}")
    try:
        return module.check(args)
    except (UserError, ConfigError, ValueError) as e:
        raise UserError(f"{cmd}: {e} (checked here: nothing was submitted)") from None


SHIPPED_CONFIG = "submitted"  # the config file's folder in the job's working_dir


def _ship_config(path: str, wd: str) -> str:
    """Copy the local config file into the (temporary) working_dir; -> its path there."""
    os.makedirs(os.path.join(wd, SHIPPED_CONFIG), exist_ok=True)
    rel = f"{SHIPPED_CONFIG}/{os.path.basename(path)}"
    shutil.copy2(path, os.path.join(wd, rel))
    return rel


def build_submission(argv: list[str], *, env_names: list[str], working_dir: str | None,
                     pip: list[str], entrypoint_num_cpus: float | None, entrypoint_num_gpus: float | None,
                     submission_id: str | None) -> dict:
    """The keyword arguments of ``JobSubmissionClient.submit_job`` (no network), with the notes to
    print and ``staged``: a temporary working_dir made here, for the caller to remove."""
    if not argv:
        raise UserError(f"nothing to run: mae submit [OPTIONS] -- {'|'.join(SUBMITTABLE)} ARGS...")
    cmd, args = argv[0], list(argv[1:])
    if cmd not in SUBMITTABLE:
        raise UserError(f"{cmd!r} cannot be submitted: choose one of {', '.join(SUBMITTABLE)} "
                        "(put mae submit's own options before --)")
    config = check_command(cmd, args)  # first: a wrong command line costs no upload and no connection
    env, notes = job_env(env_names, trackers_of(cmd, args))
    runtime_env: dict = {"env_vars": env}
    wd = project_root() if working_dir is None else (None if working_dir == "none" else working_dir)
    if wd and not os.path.isdir(wd):
        raise UserError(f"--working-dir {wd}: not a directory")
    named = wd if working_dir not in (None, "none") else None
    if named and config:
        rel = os.path.relpath(os.path.realpath(config), os.path.realpath(named))
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            raise UserError(f"{config}: the config file is not inside --working-dir {named}, which goes as it "
                            "is: the job would not find it; put it there")
    staged = None
    if named:
        runtime_env["working_dir"] = named  # a directory named with --working-dir goes as it is
    elif wd or config:
        # this checkout: a temporary copy of the project's allowlist; with the project installed on
        # the cluster (--working-dir none) only the config file goes (the caller removes either)
        staged = stage(wd) if wd else tempfile.mkdtemp(prefix="mae-ship-")
        runtime_env["working_dir"] = staged
    try:
        if config:
            new = rel if named else _ship_config(config, staged)
            args[args.index(config)] = new  # (the first: the config file comes before any override)
    except BaseException:
        if staged:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    if pip:
        runtime_env["pip"] = list(pip)
    sid = submission_id or f"mae-{cmd}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    kw = dict(entrypoint=f"python -m jobs.cli {cmd} " + " ".join(shlex.quote(x) for x in args),
              runtime_env=runtime_env, submission_id=sid,
              metadata={"mae_command": cmd, "submitted_by": _user()})
    if entrypoint_num_cpus is not None:
        kw["entrypoint_num_cpus"] = entrypoint_num_cpus
    if entrypoint_num_gpus is not None:
        kw["entrypoint_num_gpus"] = entrypoint_num_gpus
    return {"kwargs": kw, "notes": notes, "staged": staged}


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "unknown"


# ---------------------------------------------------------------------------- following
def follow(c, sid: str, addr: str) -> int:
    """Stream a job's logs until it ends; -> the exit status for its final state."""
    async def tail() -> None:
        async for chunk in c.tail_job_logs(sid):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        with cluster_errors(addr):
            asyncio.run(tail())
            status = str(c.get_job_status(sid))
            while status in ("PENDING", "RUNNING"):  # the log stream can end a moment early
                time.sleep(1)
                status = str(c.get_job_status(sid))
    except KeyboardInterrupt:
        print(f"\nstopped following; job {sid} keeps running (mae jobs stop {sid})", file=sys.stderr)
        return 130
    status = status.rsplit(".", 1)[-1]
    print(f"job {sid}: {status}", file=sys.stderr)
    return EXIT.get(status, 1)


# ---------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mae submit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage="mae submit [OPTIONS] -- {pretrain,finetune,tune,evaluate,prepare,preflight} ARGS...")
    ap.add_argument("--address", default=None, help="job server, http://HEAD:8265 (default: RAY_ADDRESS)")
    ap.add_argument("--follow", "-f", action="store_true", help="stream the logs; exit with the job's status")
    ap.add_argument("--env", action="append", default=[], metavar="NAME",
                    help="also copy this variable into the job (by name; repeatable)")
    ap.add_argument("--working-dir", default=None,
                    help="directory shipped as the job's working_dir (default: this checkout; "
                         "'none' when the cluster image has the project installed; a config file "
                         "still goes along)")
    ap.add_argument("--pip", action="append", default=[], help="extra pip requirement for the job (repeatable)")
    ap.add_argument("--entrypoint-num-cpus", type=float, default=None,
                    help="CPUs reserved for the job's driver (default 0: it only coordinates)")
    ap.add_argument("--entrypoint-num-gpus", type=float, default=None, help="GPUs reserved for the driver")
    ap.add_argument("--submission-id", default=None, help="job id to use (default mae-CMD-TIME-RANDOM)")
    ap.add_argument("--verbose", "-v", action="store_true", help="show Ray's packaging log lines")
    ap.add_argument("--dry-run", action="store_true", help="print what would be submitted (no values of variables)")
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    if not theirs and ours and ours[0] in SUBMITTABLE:  # `mae submit pretrain ...` without --
        ours, theirs = [], ours
    a = parser().parse_args(ours)
    with one_line_errors("mae submit"):
        sub = build_submission(theirs, env_names=a.env, working_dir=a.working_dir, pip=a.pip,
                               entrypoint_num_cpus=a.entrypoint_num_cpus,
                               entrypoint_num_gpus=a.entrypoint_num_gpus, submission_id=a.submission_id)
        for n in sub["notes"]:
            print(f"mae submit: note: {n}", file=sys.stderr)
        try:
            return _send(a, sub["kwargs"])
        finally:
            if sub["staged"]:
                shutil.rmtree(sub["staged"], ignore_errors=True)


def _send(a, kw: dict) -> int:
    if a.dry_run:
        re_ = kw["runtime_env"]
        print(f"entrypoint: {kw['entrypoint']}\nsubmission id: {kw['submission_id']}\n"
              f"working_dir: {_shipped(re_.get('working_dir'))}\n"
              f"env: {', '.join(sorted(re_['env_vars'])) or '(none)'}")
        return 0
    addr = job_server(a.address)
    c = client(addr, verbose=a.verbose)
    with cluster_errors(addr):
        sid = c.submit_job(**kw)
    print(sid, flush=True)
    if not a.follow:
        print(f"follow it: mae jobs logs {sid} --follow   (address {addr})", file=sys.stderr)
        return 0
    return follow(c, sid, addr)


def _shipped(wd: str | None) -> str:
    return "(none)" if not wd else ", ".join(sorted(os.listdir(wd)))


if __name__ == "__main__":
    raise SystemExit(main())
