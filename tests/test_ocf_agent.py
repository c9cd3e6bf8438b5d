"""The OCF agent on its own: meta-data, parameter checks through Pacemaker's own tools,
promotion scores, and ``ocf-tester`` (in a one-node cluster: the agent sets promotion
scores and the pair's epoch in the CIB)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import pytest

from repdisk.cli import ocf
from tests.helpers.cluster import Cluster
from tests.helpers.netns import Net, unavailable

AGENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ocf",
                     "repdisk")


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: make setup installs it (scripts/setup.sh)")


def test_meta_data_validates_against_the_ocf_schema(tmp_path) -> None:
    need("xmllint")
    md = subprocess.run([AGENT, "meta-data"], capture_output=True, text=True, check=True).stdout
    assert '<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">' in md
    path = tmp_path / "md.xml"
    path.write_text(md)
    done = subprocess.run(["xmllint", "--noout", "--relaxng",
                           "/usr/share/resource-agents/metadata.rng", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for p in ocf.PARAMS:
        assert f'<parameter name="{p.name}"' in md
    for action in ("start", "stop", "promote", "demote", "notify", "monitor", "meta-data",
                   "validate-all"):
        assert f'<action name="{action}"' in md
    assert 'role="Promoted"' in md and 'role="Unpromoted"' in md


def validate(*options: str) -> subprocess.CompletedProcess:
    """crm_resource --validate of ocf:repdisk:repdisk (this clone's, through the env)."""
    argv = ["crm_resource", "--validate", "--class", "ocf", "--provider", "repdisk",
            "--agent", "repdisk"]
    for o in options:
        argv += ["--option", o]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture
def disk(tmp_path) -> str:
    path = str(tmp_path / "d.img")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return path


def good(disk: str, tmp_path) -> list[str]:
    host = os.uname().nodename
    return [f"disks={disk}", f"nodes={host}=127.0.0.1 peer=127.0.0.2", "insecure=yes",
            f"control={tmp_path}/c.qmp", f"run_dir={tmp_path}/run"]


def test_crm_resource_validate_accepts_good_parameters(disk, tmp_path) -> None:
    need("crm_resource")
    assert os.path.exists("/usr/lib/ocf/resource.d/repdisk/repdisk"), \
        "make setup writes the agent into /usr/lib/ocf/resource.d/repdisk"
    done = validate(*good(disk, tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("change, code, words", [
    ("disks=/nonexistent/d.img", ocf.ERR_ARGS,
     "parameter disks: /nonexistent/d.img does not exist"),
    ("write_mode=fast", ocf.ERR_CONFIGURED, "parameter write_mode: unknown mode 'fast'"),
    ("max_lag=512K", ocf.ERR_CONFIGURED,
     "parameter max_lag: 524288 bytes is too small: use at least 1M"),
    ("max_lag=lots", ocf.ERR_CONFIGURED, "parameter max_lag: "),
    ("control=/" + "x" * 120 + "/c.qmp", ocf.ERR_CONFIGURED, "parameter control: "),
    ("control=/dev/null/c.qmp", ocf.ERR_ARGS, "parameter control: cannot create /dev/null"),
    ("nodes=n1=10.0.0.1", ocf.ERR_CONFIGURED, "parameter nodes: names 1 node; a pair has "
                                               "exactly 2, separated by a space"),
    ("nodes=n1=10.0.0.1,n2=10.0.0.2", ocf.ERR_CONFIGURED, "parameter nodes: names 1 node"),
    ("checkpoint_intervall=30s", ocf.ERR_CONFIGURED,     # a typo would be ignored
     "unknown parameter checkpoint_intervall (did you mean checkpoint_interval?): "
     "crm_resource --show-metadata ocf:repdisk:repdisk lists them"),
    ("checkpoint_interval=soon", ocf.ERR_CONFIGURED, "parameter checkpoint_interval: "),
    ("insecure=no", ocf.ERR_CONFIGURED, "parameter tls: is off"),
])
def test_crm_resource_validate_names_the_bad_parameter(disk, tmp_path, change, code,
                                                       words) -> None:
    need("crm_resource")
    key = change.split("=", 1)[0]
    options = [o for o in good(disk, tmp_path) if not o.startswith(key + "=")] + [change]
    done = validate(*options)
    out = done.stdout + done.stderr
    assert words in out, out
    # crm_resource reports the agent's OCF code in its own words and exit status.
    env = {f"OCF_RESKEY_{o.split('=', 1)[0]}": o.split("=", 1)[1] for o in options}
    assert ocf.run("validate-all", env) == code
    assert done.returncode != 0


def test_libvirt_domain_is_the_guest_instead_of_guest_qmp(disk, tmp_path) -> None:
    """A VirtualDomain guest: the checkpointer pauses it through libvirt (item 4 of issue 20,
    vmtests/test_vm_pacemaker_libvirt.py runs it in a cluster); never both ways at once."""
    env = {f"OCF_RESKEY_{k}": v for k, v in (o.split("=", 1) for o in good(disk, tmp_path))}
    env["OCF_RESKEY_libvirt_domain"] = "guest"
    cfg = ocf.AgentConfig.from_env(env)
    assert (cfg.libvirt_domain, cfg.libvirt_uri, cfg.guest_qmp) == ("guest", "qemu:///system",
                                                                      "")
    assert ocf.run("validate-all", env) == ocf.SUCCESS
    env["OCF_RESKEY_guest_qmp"] = f"{tmp_path}/guest.qmp"
    with pytest.raises(ocf.AgentError, match="^parameter libvirt_domain: libvirt owns that "
                                             "guest's monitor: give libvirt_domain or "
                                             "guest_qmp, not both$"):
        ocf.AgentConfig.from_env(env)
    assert ocf.run("validate-all", env) == ocf.ERR_CONFIGURED


def query(stage: str = "running", **extra) -> dict:
    disk = {"disk": "disk0", "stage": stage, "consistent": True,
            "last_checkpoint": {"time": time.time() - 1}}
    return {"role": "secondary", "epoch": 3, "fenced": None, "sealed": {},
            "failed-over": False, "state-role": "secondary", "disks": [disk], **extra}


def test_promotion_scores_follow_the_data() -> None:
    s = ocf.score
    assert s(query(role="primary", **{"state-role": "primary"}), 3, 2) == ocf.SCORE_NEWEST
    assert s(query(), 3, 2) == ocf.SCORE_NEWEST                   # peer checkpoints it
    old = query()
    old["disks"][0]["last_checkpoint"]["time"] -= 60
    assert s(old, 3, 2) == ocf.SCORE_PEER_UNKNOWN                 # peer silent
    assert s(query(sealed={"disk0": 3}), 3, 2) == ocf.SCORE_NEWEST
    assert s(query("done", **{"failed-over": True}), 3, 2) == ocf.SCORE_NEWEST
    assert s(query("none", **{"state-role": "primary"}), 3, 2) == ocf.SCORE_LAST_PRIMARY
    assert s(query("none", epoch=0, **{"state-role": ""}), None, 2) == ocf.SCORE_FIRST
    # Never promoted: an older epoch, fenced, inconsistent, or a secondary that only rejoined.
    assert s(query(), 4, 2) is None
    assert s(query(role="primary", fenced="lost"), 3, 2) is None
    bad = query()
    bad["disks"][0]["consistent"] = False
    assert s(bad, 3, 2) is None
    assert s(query("none"), 3, 2) is None
    assert s(query("none", epoch=0, **{"state-role": ""}), 1, 2) is None


@pytest.mark.timeout(300)
def test_ocf_tester_passes(tmp_path) -> None:
    need("ocf-tester")
    why = unavailable()
    if why:
        pytest.skip(why)
    folder = tempfile.mkdtemp(prefix="rdoct-")
    ok = False
    with Net() as net:
        cluster = Cluster(net, folder, 1, options={"stonith-enabled": "false"})
        try:
            n1 = cluster.nodes[0]
            with open(n1.path("/var/lib/repdisk/d.img"), "wb") as f:
                f.truncate(16 << 20)
            cluster.boot()
            done = n1.run(["ocf-tester", "-n", "octest",
                           "-o", "disks=/var/lib/repdisk/d.img",
                           "-o", f"nodes=n1={n1.address} n2=10.213.100.2",
                           "-o", "insecure=yes", "-o", "control=/var/lib/repdisk/c.qmp",
                           "-o", "run_dir=/var/lib/repdisk/run",
                           "/usr/lib/ocf/resource.d/repdisk/repdisk"],
                          check=False, timeout=240)
            out = done.stdout + done.stderr
            assert done.returncode == 0, out
            assert "passed all tests" in out, out
            print(out)
            ok = True
        finally:
            cluster.close()
            if ok:
                shutil.rmtree(folder, ignore_errors=True)
