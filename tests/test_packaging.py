"""Tests for packaging/: the systemd unit and install.sh.

Needs the Debian package ``systemd`` (for /usr/bin/systemd-analyze); the tests FAIL,
not skip, when it is missing. systemd does not have to be running (PID 1): ``verify``
works offline on a unit file.

install.sh is only ever run with ``--root <tmpdir>``, so it never touches the real
system's users, /etc, /opt or systemctl.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "packaging" / "edge-agent.service"
INSTALL = REPO / "packaging" / "install.sh"
EXEC_START_BIN = "/opt/edge-agent/venv/bin/edge-agent"


# --------------------------------------------------------------------------- helpers


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail(
            "systemd-analyze not found: install the Debian package 'systemd' (apt-get install -y systemd)"
        )
    return path


def verify_unit(text: str, tmp_path: Path, name: str = "edge-agent.service") -> tuple[int, list[str]]:
    """Run ``systemd-analyze verify`` on unit *text*; return (exit code, problem lines).

    verify fails (exit 1, "Command ... is not executable") when ExecStart's binary does
    not exist, and /opt/edge-agent/venv/bin/edge-agent does not exist on a dev or CI
    machine. So the unit is copied to a temp dir with only that path rewritten to an
    executable stub in the temp dir (arguments and every other directive untouched).
    We deliberately do not use ``verify --root``: it needs a complete OS tree
    (sysinit.target, /bin/kill, ...) and fails on a bare staging root.

    Unknown or invalid directives do NOT change verify's exit code (systemd only logs
    "Unknown key ..., ignoring"), so its output is scanned as well: any line that names
    the unit file or unit and says Unknown/Invalid/Failed/error counts as a problem.
    Users/groups are not checked by verify (edge-agent, render need not exist here).
    """
    stub = tmp_path / "stub-bin" / "edge-agent"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit_dir = tmp_path / "units"
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit = unit_dir / name
    unit.write_text(text.replace(EXEC_START_BIN, str(stub)))
    proc = subprocess.run(
        [systemd_analyze(), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_LOG_COLOR": "0"},
    )
    out = (proc.stdout + proc.stderr).splitlines()
    bad = re.compile(r"unknown|invalid|failed|error|not executable|ignoring", re.I)
    problems = [line for line in out if (name in line or str(unit) in line) and bad.search(line)]
    return proc.returncode, problems


def unit_directives(path: Path = UNIT) -> dict[str, list[str]]:
    """Parse a unit file into {"Section.Key": [values...]} (keys may repeat)."""
    result: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"malformed line in {path.name}: {raw!r}"
        result.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return result


def make_source(tmp_path: Path, with_project: bool = False) -> Path:
    """A throwaway --source tree: config/agent.yaml (the repo's, or a stub) and docs.

    With *with_project* it also holds a copy of the Python project (agent/, setup.cfg,
    pyproject.toml, README.md), so pip's in-tree build (build/, *.egg-info) never
    writes into the real checkout that other people are working in.
    """
    src = tmp_path / "src"
    (src / "config").mkdir(parents=True)
    default_conf = REPO / "config" / "agent.yaml"
    if default_conf.is_file():
        shutil.copy2(default_conf, src / "config" / "agent.yaml")
    else:  # the lead's default config may not exist yet
        (src / "config" / "agent.yaml").write_text(
            "# default edge-agent config (test stub)\nstate_dir: /var/lib/edge-agent\n"
        )
    if (REPO / "docs" / "service.md").is_file():
        (src / "docs").mkdir()
        shutil.copy2(REPO / "docs" / "service.md", src / "docs" / "service.md")
    if with_project:
        for name in ("setup.cfg", "pyproject.toml", "README.md", "setup.py"):
            if (REPO / name).is_file():
                shutil.copy2(REPO / name, src / name)
        shutil.copytree(
            REPO / "agent",
            src / "agent",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
        )
    return src


def run_install(
    root: Path, *args: str, skip_pip: bool = True, env_extra: dict | None = None, check: bool = True
):
    env = {**os.environ, **(env_extra or {})}
    env.pop("EDGE_AGENT_SKIP_PIP", None)
    if skip_pip:
        env["EDGE_AGENT_SKIP_PIP"] = "1"
    # Use the interpreter running the tests for the venv (>= 3.11 with venv/ensurepip).
    cmd = ["bash", str(INSTALL), "--root", str(root), "--python", sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, (
            f"install.sh {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def tree_snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """{relative path: (mode, content for files)}, skipping the venv's interpreter internals."""
    snap: dict[str, tuple[int, bytes | None]] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        st = p.lstat()
        content = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
        snap[rel] = (stat.S_IMODE(st.st_mode), content)
    return snap


def assert_nothing_world_writable(root: Path) -> None:
    offenders = [
        str(p.relative_to(root))
        for p in [root, *root.rglob("*")]
        if not p.is_symlink() and p.lstat().st_mode & stat.S_IWOTH
    ]
    assert not offenders, f"world-writable: {offenders}"


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# --------------------------------------------------------------------------- unit file


def test_systemd_analyze_verify_passes(tmp_path):
    rc, problems = verify_unit(UNIT.read_text(), tmp_path)
    assert rc == 0 and not problems, f"systemd-analyze verify: rc={rc}\n" + "\n".join(problems)


def test_verify_helper_catches_bad_directives(tmp_path):
    """Guard against a vacuous verify test: a typo'd key and bad DeviceAllow are reported."""
    broken = UNIT.read_text().replace(
        "[Service]\n", "[Service]\nWatchDogSecs=30\nDeviceAllow=char-video4linux rwz\n", 1
    )
    _, problems = verify_unit(broken, tmp_path, name="broken-agent.service")
    text = "\n".join(problems)
    assert "WatchDogSecs" in text and "rwz" in text, text
    # and a missing ExecStart binary is a hard failure
    missing = UNIT.read_text().replace(EXEC_START_BIN, "/nonexistent/edge-agent")
    rc, problems = verify_unit(missing, tmp_path / "missing")
    assert rc != 0 and any("not executable" in line for line in problems), problems


def test_unit_parses_with_configparser():
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # keep key case
    cp.read(UNIT)
    assert set(cp.sections()) == {"Unit", "Service", "Install"}
    assert cp["Service"]["Type"] == "notify"


def test_unit_has_required_directives():
    d = unit_directives()
    one = {k: v[-1] for k, v in d.items()}
    assert one["Service.Type"] == "notify"
    assert one["Service.NotifyAccess"] == "main"
    assert one["Service.ExecStart"] == f"{EXEC_START_BIN} --config /etc/edge-agent/agent.yaml"
    assert one["Service.ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Service.Restart"] == "on-failure"
    assert one["Service.RestartSec"] == "5"
    assert one["Service.WatchdogSec"] == "30"
    assert one["Service.TimeoutStopSec"] == "15"
    assert one["Service.StateDirectory"] == "edge-agent"
    assert one["Service.ConfigurationDirectory"] == "edge-agent"
    assert one["Service.User"] == "edge-agent"
    assert one["Service.Group"] == "edge-agent"
    groups = " ".join(d["Service.SupplementaryGroups"]).split()
    assert "video" in groups and "render" in groups
    assert "PYTHONUNBUFFERED=1" in " ".join(d["Service.Environment"])
    assert one["Service.NoNewPrivileges"] == "yes"
    assert one["Service.ProtectSystem"] == "strict"
    assert one["Service.ProtectHome"] == "yes"
    assert one["Service.PrivateTmp"] == "yes"
    assert one["Service.UMask"] == "0027"
    assert one["Service.DevicePolicy"] == "closed"
    families = one["Service.RestrictAddressFamilies"].split()
    assert set(families) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    allows = d["Service.DeviceAllow"]
    assert "char-video4linux rw" in allows
    assert "char-drm rw" in allows
    for node in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm"):
        assert f"{node} rw" in allows
    assert one["Install.WantedBy"] == "multi-user.target"


def test_unit_avoids_settings_that_break_inference_or_cameras():
    d = unit_directives()
    # onnxruntime / XNNPACK JIT needs W+X memory; PrivateDevices hides /dev/video*.
    assert "Service.MemoryDenyWriteExecute" not in d
    assert d.get("Service.PrivateDevices", ["no"])[-1] in ("no", "false")
    text = UNIT.read_text()
    assert "MemoryDenyWriteExecute" in text and "PrivateDevices" in text, "keep the comments explaining why"


def test_device_allow_entries_use_forms_systemd_accepts():
    for entry in unit_directives()["Service.DeviceAllow"]:
        spec, _, rights = entry.partition(" ")
        assert re.fullmatch(r"[rwm]+", rights), entry
        if spec.startswith("/"):
            assert spec.startswith("/dev/") and "*" not in spec and "?" not in spec, (
                f"paths may not glob: {entry}"
            )
        else:
            assert re.fullmatch(r"(char|block)-[A-Za-z0-9_*?./-]+", spec), entry


# --------------------------------------------------------------------------- install.sh


def test_install_sh_passes_bash_syntax_check():
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)
    assert os.access(INSTALL, os.X_OK), "install.sh should be executable"


def test_install_sh_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (optional: apt-get install -y shellcheck)")
    proc = subprocess.run([shellcheck, str(INSTALL)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_install_into_root_layout_and_modes(tmp_path):
    src = make_source(tmp_path)
    root = tmp_path / "root"
    proc = run_install(root, "--source", str(src))
    out = proc.stdout + proc.stderr
    assert "skipping user/group creation" in out
    assert "systemctl enable --now edge-agent" in out  # printed, not run

    unit = root / "etc/systemd/system/edge-agent.service"
    conf = root / "etc/edge-agent/agent.yaml"
    state = root / "var/lib/edge-agent"
    venv = root / "opt/edge-agent/venv"
    assert unit.read_text() == UNIT.read_text()
    assert conf.read_bytes() == (src / "config/agent.yaml").read_bytes()
    assert not (root / "etc/edge-agent/agent.yaml.dist").exists()
    assert (venv / "pyvenv.cfg").is_file()
    assert mode(unit) == 0o644
    assert mode(conf) == 0o640
    assert mode(state) == 0o750
    assert mode(root / "etc/edge-agent") == 0o755
    assert_nothing_world_writable(root)


def test_install_twice_is_idempotent(tmp_path):
    src = make_source(tmp_path)
    root = tmp_path / "root"
    run_install(root, "--source", str(src))
    first = tree_snapshot(root)
    run_install(root, "--source", str(src))
    assert tree_snapshot(root) == first


def test_existing_config_is_kept_and_dist_written(tmp_path):
    src = make_source(tmp_path)
    root = tmp_path / "root"
    conf = root / "etc/edge-agent/agent.yaml"
    conf.parent.mkdir(parents=True)
    conf.write_text("# my site config\nmqtt:\n  host: broker.local\n")
    conf.chmod(0o600)
    before = conf.read_bytes()

    for _ in range(2):  # and stays that way on re-run
        proc = run_install(root, "--source", str(src))
        assert conf.read_bytes() == before
        assert mode(conf) == 0o600  # the user's file is not touched at all
        dist = root / "etc/edge-agent/agent.yaml.dist"
        assert dist.read_bytes() == (src / "config/agent.yaml").read_bytes()
        assert mode(dist) == 0o640
        assert "agent.yaml.dist" in proc.stdout


def test_state_dir_mode_is_fixed_on_rerun(tmp_path):
    src = make_source(tmp_path)
    root = tmp_path / "root"
    state = root / "var/lib/edge-agent"
    state.mkdir(parents=True)
    state.chmod(0o777)
    (state / "outbox.db").write_text("keep me")
    run_install(root, "--source", str(src))
    assert mode(state) == 0o750
    assert (state / "outbox.db").read_text() == "keep me"


def test_uninstall_keeps_config_and_state(tmp_path):
    src = make_source(tmp_path)
    root = tmp_path / "root"
    run_install(root, "--source", str(src))
    (root / "var/lib/edge-agent/outbox.db").write_text("queued")
    run_install(root, "--uninstall")
    assert not (root / "etc/systemd/system/edge-agent.service").exists()
    assert not (root / "opt/edge-agent").exists()
    assert (root / "etc/edge-agent/agent.yaml").is_file()
    assert (root / "var/lib/edge-agent/outbox.db").read_text() == "queued"
    # uninstalling again is harmless
    run_install(root, "--uninstall")


def test_uninstall_purge_removes_config_and_state(tmp_path):
    src = make_source(tmp_path)
    root = tmp_path / "root"
    run_install(root, "--source", str(src))
    run_install(root, "--uninstall", "--purge")
    for rel in (
        "etc/systemd/system/edge-agent.service",
        "opt/edge-agent",
        "etc/edge-agent",
        "var/lib/edge-agent",
    ):
        assert not (root / rel).exists(), rel
    run_install(root, "--uninstall", "--purge")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--purge"], "--purge only makes sense with --uninstall"),
        (["--bogus"], "unknown argument: --bogus"),
        # run_install passes --python first; the later (bogus) one wins
        (["--python", "/nonexistent/python3"], "not found"),
    ],
)
def test_bad_invocations_fail_clearly(tmp_path, args, message):
    proc = run_install(tmp_path / "root", *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_python_without_venv_module_fails_clearly(tmp_path):
    fake = tmp_path / "python3"
    # A "python" that passes the version check but has no venv/ensurepip.
    fake.write_text(
        f'#!/bin/sh\ncase "$*" in *venv*|*ensurepip*) exit 1;; esac\nexec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    proc = run_install(tmp_path / "root", "--python", str(fake), skip_pip=False, check=False)
    assert proc.returncode != 0
    assert "python3-venv" in proc.stderr
    assert not (tmp_path / "root/opt/edge-agent/venv").exists()


def test_real_pip_install_creates_console_scripts(tmp_path):
    """The one slow-ish test (~10 s): a real venv + pip install of the project.

    --no-deps keeps it fast and offline-friendly: the console scripts are generated
    from the project's own entry points, so bin/edge-agent exists without numpy,
    onnxruntime etc. Build isolation stays on (pip fetches setuptools/wheel from the
    configured index/wheel cache), exactly as a user's install would build.
    """
    if not (REPO / "setup.cfg").is_file() and not (REPO / "pyproject.toml").is_file():
        pytest.fail("no setup.cfg/pyproject.toml in the repo")
    src = make_source(tmp_path, with_project=True)
    root = tmp_path / "root"
    env = {"EDGE_AGENT_PIP_ARGS": "--no-deps --quiet"}
    proc = run_install(root, "--source", str(src), skip_pip=False, env_extra=env)
    venv = root / "opt/edge-agent/venv"
    for script in ("edge-agent", "agent-ctl"):
        exe = venv / "bin" / script
        assert exe.is_file() and os.access(exe, os.X_OK), f"{exe} missing:\n{proc.stdout}\n{proc.stderr}"
    out = subprocess.run(
        [str(venv / "bin/python"), "-c", "import agent, sys; sys.stdout.write(agent.__version__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert out.stdout.strip()
    # Re-running upgrades in place (venv kept, scripts still there).
    run_install(root, "--source", str(src), skip_pip=False, env_extra=env)
    assert (venv / "bin/edge-agent").is_file()
    assert (venv / "bin/edge-agent").read_text().startswith(f"#!{venv}/bin/python")
    assert_nothing_world_writable(root)


def test_systemd_extra_failure_falls_back_to_tflite_only(tmp_path):
    """systemd-python needs libsystemd-dev to build; when [tflite,systemd] fails the
    installer retries with [tflite] and says why. Uses a stub venv python that logs the
    pip calls and fails any spec with the systemd extra (fast, no network)."""
    src = make_source(tmp_path, with_project=True)
    root = tmp_path / "root"
    venv_bin = root / "opt/edge-agent/venv/bin"
    venv_bin.mkdir(parents=True)
    log = tmp_path / "pip.log"
    stub = venv_bin / "python"
    stub.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$*" in\n'
        '  "-m pip --version") exit 0 ;;\n'
        '  *"-m pip install"*",systemd]") echo "Cannot find libsystemd" >&2; exit 1 ;;\n'
        f'  *"-m pip install"*) printf "#!/bin/sh\\n" > {venv_bin}/edge-agent; chmod 755 {venv_bin}/edge-agent; exit 0 ;;\n'
        "esac\nexit 2\n"
    )
    stub.chmod(0o755)
    proc = run_install(
        root, "--source", str(src), skip_pip=False, env_extra={"EDGE_AGENT_PIP_ARGS": "--no-deps"}
    )
    calls = [line for line in log.read_text().splitlines() if "pip install" in line]
    assert len(calls) == 2, calls
    assert calls[0].endswith(f"{src}[tflite,systemd]") and "--no-deps" in calls[0]
    assert calls[1].endswith(f"{src}[tflite]")
    assert "libsystemd-dev" in proc.stderr and "built-in sd_notify" in proc.stderr


def test_installed_default_config_finds_the_bundled_model(tmp_path):
    """The service's default config names models/face/...: install.sh ships it where the unit looks."""
    root = tmp_path / "root"
    r = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--no-enable"], capture_output=True, text=True,
                       env={**os.environ, "EDGE_AGENT_SKIP_PIP": "1"})
    assert r.returncode == 0, r.stderr
    share = root / "opt/edge-agent/share"
    assert (share / "models/face/blazeface.tflite").is_file() and (share / "assets/demo.mp4").is_file()
    assert "Environment=EDGE_AGENT_SHARE=/opt/edge-agent/share" in UNIT.read_text()
    check = subprocess.run([sys.executable, "-m", "agent.ctl", "config", "check", str(root / "etc/edge-agent/agent.yaml")],
                           capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "EDGE_AGENT_SHARE": str(share), "PYTHONPATH": str(REPO)})
    assert check.returncode == 0, check.stderr
    assert str(share / "models/face/blazeface.tflite") in subprocess.run(
        [sys.executable, "-c", "from agent.config import load_config; import sys; print(load_config(sys.argv[1]).model.path)",
         str(root / "etc/edge-agent/agent.yaml")], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "EDGE_AGENT_SHARE": str(share), "PYTHONPATH": str(REPO)}).stdout


def test_every_folder_of_the_package_goes_into_the_wheel():
    # `packages = find:` skips a folder without __init__.py: an editable install hides it, and an
    # installed agent (packaging/install.sh, a Pi) dies with "No module named 'agent.deploy'".
    from setuptools import find_packages

    found = set(find_packages(str(REPO), include=["agent", "agent.*"]))
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "agent").rglob("*.py")}
    assert folders - found == set()


def test_the_device_page_goes_into_the_wheel(tmp_path):
    # The page's files are package data: without setup.cfg's [options.package_data] an installed
    # agent would fail at start with the HTTP server on (its default), not only in a checkout.
    import zipfile

    src = make_source(tmp_path, with_project=True)
    out = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("edge_agent-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"agent/web/static/{n}" for n in ("index.html", "app.js", "app.css", "favicon.svg")} <= names
