"""mae jobs list | status ID | logs ID [--follow] | stop ID: the cluster's jobs.

The address comes from --address or RAY_ADDRESS (the job server, http://HEAD:8265); a cluster with
token authentication needs RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, as for `mae submit`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from jobs.core.common import one_line_errors
from jobs.submit import client, cluster_errors, follow, job_server


def _when(ms) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _status(j) -> str:
    return str(j.status).rsplit(".", 1)[-1]


def cmd_list(c, a) -> int:
    jobs = sorted(c.list_jobs(), key=lambda j: j.start_time or 0)
    if not jobs:
        print("no jobs on this cluster")
        return 0
    rows = [["id", "status", "started (UTC)", "ended (UTC)", "entrypoint"]]
    for j in jobs:
        ep = j.entrypoint.replace("python -m jobs.cli ", "mae ")
        rows.append([j.submission_id or j.job_id or "-", _status(j), _when(j.start_time), _when(j.end_time),
                     ep if len(ep) <= 70 else ep[:67] + "..."])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def cmd_status(c, a) -> int:
    j = c.get_job_info(a.id)
    print(f"{a.id}: {_status(j)}")
    if j.message:
        print(f"  {j.message}")
    print(f"  started {_when(j.start_time)}, ended {_when(j.end_time)}")
    print(f"  entrypoint: {j.entrypoint}")
    return 0


def cmd_logs(c, a) -> int:
    if a.follow:
        return follow(c, a.id, a.addr)
    sys.stdout.write(c.get_job_logs(a.id))
    return 0


def cmd_stop(c, a) -> int:
    stopped = c.stop_job(a.id)
    print(f"{a.id}: {'stop requested' if stopped else 'not running (nothing to stop)'}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mae jobs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default=None, help="job server, http://HEAD:8265 (default: RAY_ADDRESS)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="every job of the cluster").set_defaults(fn=cmd_list)
    for name, fn, help_ in (("status", cmd_status, "a job's status and message"),
                            ("logs", cmd_logs, "a job's logs (--follow: stream to the end)"),
                            ("stop", cmd_stop, "stop a running job")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("id", help="submission id (as printed by mae submit)")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        p.set_defaults(fn=fn)
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    with one_line_errors(f"mae jobs {a.cmd}"):
        a.addr = job_server(a.address)
        c = client(a.addr)
        with cluster_errors(a.addr):
            return a.fn(c, a)


if __name__ == "__main__":
    raise SystemExit(main())
