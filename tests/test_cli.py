"""The command lines users are shown and the checks `mae submit` makes before a job exists.

No Ray is started and no cluster is reached: what is checked here happens on the user's machine.
"""

import json
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def help_of(module: str) -> str:
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def example_lines(text: str, prog: str) -> list[list[str]]:
    """The example command lines of ``prog`` in a help text (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith(f"{prog} ") and "..." not in line and "[" not in line:
            out.append(shlex.split(line.split("#")[0])[len(prog.split()):])
    return out


@pytest.mark.parametrize("module, prog", [("jobs.pretrain", "mae pretrain"), ("jobs.tune", "mae tune"),
                                          ("jobs.submit", "mae submit")])
def test_the_help_shows_only_config_paths_and_flags_that_work(module, prog):
    """Every config file a command's --help names exists in the checkout, every --flag it shows
    is one its parser takes, and every example command line passes the command's own check (what
    `mae submit` runs before submitting): `mae pretrain --help` showed configs/demo.yaml (it is
    jobs/configs/demo.yaml) and `mae submit --help` a `pretrain --config FILE` that pretrain refuses."""
    import importlib
    text = help_of(module)
    paths = set(re.findall(r"[\w./-]+/[\w.-]+\.ya?ml\b", text))
    assert not [p for p in paths if not os.path.isfile(os.path.join(ROOT, p))], paths
    mod = importlib.import_module(module)
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", text))
    accepted = set(mod.parser()._option_string_actions)
    examples = example_lines(text, prog)
    assert examples, text
    from jobs.submit import check_command
    for argv in examples:
        if prog == "mae submit":  # its own options, then the command's, checked by the command
            ours, theirs = argv[:argv.index("--")], argv[argv.index("--") + 1:]
            mod.parser().parse_args(ours)
            flags -= set(theirs)
            cwd = os.getcwd()
            os.chdir(ROOT)  # config paths are relative to the checkout, as the help says
            try:
                check_command(theirs[0], theirs[1:])
            finally:
                os.chdir(cwd)
        else:
            cwd = os.getcwd()
            os.chdir(ROOT)
            try:
                mod.check(argv)
            finally:
                os.chdir(cwd)
    assert flags <= accepted, flags - accepted


def test_docs_show_the_config_file_as_the_first_argument_and_only_files_that_exist():
    """The docs and the commands' docstrings never pass a config with --config (pretrain and tune
    take it as their first argument), and every jobs/configs/ file they name exists."""
    texts = {}
    for d in ("docs", "jobs"):
        for name in sorted(os.listdir(os.path.join(ROOT, d))):
            if name.endswith((".md", ".py")):
                with open(os.path.join(ROOT, d, name)) as f:
                    texts[f"{d}/{name}"] = f.read()
    with open(os.path.join(ROOT, "README.md")) as f:
        texts["README.md"] = f.read()
    bad = {k for k, t in texts.items() if re.search(r"(mae|--|jobs\.)\s*(pretrain|tune)\b[^\n]*--config\b", t)}
    assert not bad, bad
    named = {p for t in texts.values() for p in re.findall(r"jobs/configs/[\w.-]+\.ya?ml", t)}
    assert named and not [p for p in named if not os.path.isfile(os.path.join(ROOT, p))], named


def test_config_flag_is_refused_with_the_right_form_in_one_line():
    for module in ("jobs.pretrain", "jobs.tune"):
        r = subprocess.run([sys.executable, "-m", module, "--config", "jobs/configs/demo.yaml"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and "CONFIG.yaml" in err[0], r.stderr


# What `mae submit` refuses before anything is sent: (command line, what the one line must say).
REFUSED = [
    (["pretrain", "model.bogus=1"], "pretrain: model.bogus: unknown field"),
    (["pretrain", "data.source=s3://b/x", "train.batch_size=abc"], "train.batch_size='abc': expected int"),
    (["pretrain", "data.source=s3://b/x", "--bogus"], "unrecognized arguments: --bogus"),
    (["pretrain", "--config", "jobs/configs/demo.yaml"], "--config is not an option"),
    (["pretrain", "no/such/config.yaml"], "config file 'no/such/config.yaml' does not exist"),
    (["pretrain", "data.source=s3://b/x", "model.preset=no_such_preset"], "no_such_preset"),
    (["tune", "jobs/configs/demo.yaml", "--search", "annealing"], "argument --search: invalid choice"),
    (["tune", "jobs/configs/demo.yaml", "--space", "model.overrides.mask_ratio=0.5,2"], "mask_ratio"),
    (["evaluate", "s3://b/run", "s3://b/data", "--bogus"], "unrecognized arguments: --bogus"),
    (["evaluate", "s3://b/run", "s3://b/data", "--workers", "0"], "--workers 0"),
    (["prepare", "s3://b/raw"], "required: dst"),
    (["prepare", "s3://b/raw", "s3://b/shards", "--val-fraction", "1.5"], "--val-fraction 1.5"),
]


def test_submit_checks_the_command_line_here_before_any_connection(tmp_path):
    """`mae submit -- pretrain model.bogus=1` with RAY_ADDRESS at a closed port: the command's
    own check fails in one line, and no connection is attempted (nor torch or Ray imported). A
    good command line, for contrast, does try the job server and says it cannot reach it."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"""
import contextlib, io, json, socket, sys
tried = []
_connect = socket.socket.connect
def connect(self, addr):
    tried.append(str(addr))
    return _connect(self, addr)
socket.socket.connect = connect
socket.socket.connect_ex = lambda self, addr: tried.append(str(addr)) or 111
from jobs.cli import main
def run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(["submit", "--", *argv])
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()
out = []
for argv in {json.dumps([a for a, _ in REFUSED])}:
    rc, err = run(argv)
    out.append({{"argv": argv, "rc": rc, "err": err, "tried": list(tried)}})
torch, ray = "torch" in sys.modules, "ray" in sys.modules
rc, err = run(["pretrain", "data.source=s3://b/x"])
print(json.dumps({{"refused": out, "torch": torch, "ray": ray, "good": [rc, err, tried]}}))
"""
    env = {**os.environ, "RAY_ADDRESS": f"http://127.0.0.1:{port}", "HOME": str(tmp_path)}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for case, (argv, want) in zip(res["refused"], REFUSED):
        lines = case["err"].strip().splitlines()
        assert case["rc"] == 2 and len(lines) == 1, case
        assert lines[0].startswith(f"mae submit: error: {argv[0]}: ") and want in lines[0], case
        assert "nothing was submitted" in lines[0] and "cannot reach" not in lines[0], case
        assert case["tried"] == [], case  # no connection attempted
    assert not res["torch"] and not res["ray"], res  # checking a command line needs neither
    rc, err, tried = res["good"]
    assert rc == 2 and "cannot reach a Ray job server" in err and tried, res["good"]


def test_a_config_file_goes_along_with_the_job_wherever_it_lies(tmp_path):
    """The config file named to `mae submit` is a file on this machine: it is checked here and
    shipped in the job's working_dir (the job's command line names the shipped copy); with
    --working-dir DIR it must lie inside DIR, which goes as it is."""
    import shutil

    from jobs.core.common import UserError
    from jobs.submit import build_submission
    cfg = tmp_path / "my run.yaml"  # outside the checkout, with a space in its name
    cfg.write_text("data: {source: s3://b/shards}\ntrain: {max_steps: 10}\n")
    kw = dict(env_names=[], pip=[], entrypoint_num_cpus=None, entrypoint_num_gpus=None, submission_id=None)
    for working_dir in (None, "none"):
        sub = build_submission(["tune", str(cfg), "--name", "x"], working_dir=working_dir, **kw)
        wd = sub["kwargs"]["runtime_env"]["working_dir"]
        try:
            assert sub["staged"] == wd
            assert sub["kwargs"]["entrypoint"] == "python -m jobs.cli tune 'submitted/my run.yaml' --name x"
            with open(os.path.join(wd, "submitted", "my run.yaml")) as f:
                assert f.read() == cfg.read_text()
            want = ["submitted"] if working_dir == "none" else ["jobs", "mae_model", "pipeline", "pyproject.toml",
                                                                 "submitted"]
            assert sorted(os.listdir(wd)) == want
        finally:
            shutil.rmtree(wd)
    (tmp_path / "wd" / "configs").mkdir(parents=True)
    inside = tmp_path / "wd" / "configs" / "a.yaml"
    inside.write_text(cfg.read_text())
    sub = build_submission(["pretrain", str(inside)], working_dir=str(tmp_path / "wd"), **kw)
    assert sub["staged"] is None and sub["kwargs"]["entrypoint"] == "python -m jobs.cli pretrain configs/a.yaml"
    with pytest.raises(UserError, match="not inside --working-dir"):
        build_submission(["pretrain", str(cfg)], working_dir=str(tmp_path / "wd"), **kw)
