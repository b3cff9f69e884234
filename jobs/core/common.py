"""What every entrypoint shares: connecting to Ray and turning known errors into one line."""

from __future__ import annotations

import contextlib
import os
import sys

from pipeline.storage import StorageError, redact


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2."""


def init_ray(address: str | None = None, num_cpus: int | None = None, **kw):
    """Connect to ``address`` (or ``RAY_ADDRESS``); else start a local single-node Ray on
    127.0.0.1. Storage variables are forwarded so that workers reach the same endpoint."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise UserError(f"Ray address {address} is a job server (dashboard) address: send the job there with "
                        "`mae submit -- COMMAND ...`, or give a cluster address (host:6379, ray://host:10001)")
    if address:
        ray.init(address=address, log_to_driver=True, **kw)
    else:
        ray.init(_node_ip_address="127.0.0.1", num_cpus=num_cpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", **kw)
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
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
