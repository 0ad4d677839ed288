"""README's "On a host" install steps, run as written in a clean venv in a copy of this
checkout, which stands in for the operator's clone (there is no package on PyPI).

The ``sh`` block is taken from the README itself, so the steps cannot drift from what is
tested. System paths move into a temp dir (/opt/overcommitd, /etc/overcommitd,
/usr/local/bin, /etc/systemd/system); what needs a real host is left out: apt-get (done
by scripts/setup-host.sh), systemctl and
``overcommitd status`` (no running daemon). The example config's ``qemu:///system``
becomes libvirt's test driver, so ``run --dry-run --once`` decides for real guests of a
fake host. pip uses its cache (~/.cache/pip): libvirt-python's wheel is built once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.conftest import need_binaries

REPO = Path(__file__).resolve().parents[1]
NODE = Path(__file__).parent / "data" / "testnode.xml"
NOT_HERE = ("apt-get ", "systemctl ", "overcommitd status")


def readme_install_steps() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## On a host", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block, "README's On a host section has no sh block"
    return [line.split("   #", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_install_steps_work_in_a_clean_venv(tmp_path: Path) -> None:
    need_binaries("python3", "pkg-config", "gcc")
    steps = readme_install_steps()
    assert any(s.startswith("apt-get install") and "python3-venv" in s for s in steps)
    clone = tmp_path / "clone"
    shutil.copytree(
        REPO,
        clone,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", ".cache", "*.egg-info", "build", "__pycache__", ".*_cache", ".hypothesis", ".benchmarks"
        ),
    )
    root = tmp_path / "root"
    moves = {
        "/opt/overcommitd": str(root / "opt"),
        "/etc/overcommitd": str(root / "etc"),
        "/usr/local/bin": str(root / "bin"),
        "/etc/systemd/system/": str(root / "systemd") + "/",
    }
    for d in ("bin", "systemd"):
        (root / d).mkdir(parents=True)
    env = {
        "PATH": f"{root / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),  # pip's cache
        "OVERCOMMITD_CONFIG": str(root / "etc" / "overcommitd.toml"),  # where /etc/overcommitd moved
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    ran = []
    for step in steps:
        if step.startswith(NOT_HERE):
            continue
        command = step
        for system_path, here in moves.items():
            command = command.replace(system_path, here)
        out = subprocess.run(
            ["bash", "-ec", command], cwd=clone, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        assert out.returncode == 0, f"README step failed: {step}\n{out.stdout}\n{out.stderr}"
        ran.append((step, out))
        if step.startswith("install -D") and "config.example.toml" in step:
            cfg = root / "etc" / "overcommitd.toml"
            assert oct(cfg.stat().st_mode & 0o777) == "0o640"  # it may hold the broker's password
            cfg.write_text(cfg.read_text().replace('uri = "qemu:///system"', f'uri = "test://{NODE}"'))
            cfg.write_text(cfg.read_text().replace("/run/overcommitd/status.sock", str(tmp_path / "status.sock")))
    by_start = {step.split(" ", 2)[1] if step.startswith("overcommitd") else step: out for step, out in ran}
    assert "ok (policy trim" in by_start["check-config"].stdout
    table = by_start["run"].stdout
    assert "GUEST" in table and "plain" in table and "autodeflate" in table
    assert "(default" in by_start["run"].stderr  # it said which config it used
    assert (root / "systemd" / "overcommitd.service").exists()
    # the installed command is the venv's, not this checkout's
    help_out = subprocess.run(
        [str(root / "bin" / "overcommitd"), "--help"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert help_out.returncode == 0 and "check-config" in help_out.stdout and "status" in help_out.stdout
    # The host install is the daemon's alone: the simulator's commands say what to install.
    replay_out = subprocess.run(
        [str(root / "bin" / "overcommitd"), "replay", "--hours", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert replay_out.returncode == 2 and "pip install 'overcommitd[sim]'" in replay_out.stderr, replay_out.stderr
    no_sim = subprocess.run(
        [str(root / "opt" / "bin" / "python"), "-c", "import scipy"], capture_output=True, timeout=60, check=False
    )
    assert no_sim.returncode != 0  # scipy, matplotlib, dask... are not pulled in by the daemon
    site = subprocess.run(
        [str(root / "opt" / "bin" / "python"), "-c", "import overcommitd; print(overcommitd.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=tmp_path,  # `python -c` puts the working directory first on sys.path
    ).stdout
    assert str(root / "opt") in site and str(REPO) not in site
