"""poplock across hosts, as poplock-cluster(7) sets it up: two POP hosts running Dovecot under systemd
ship their journals with systemd-journal-upload over HTTPS to a deciding host running
systemd-journal-remote, poplock-reader, poplock-policy and poplock-socketmap; a Postfix host and a
qmail-style host (qpsmtpd behind tcpserver and relaylock) ask it over TCP.

All of it runs on this machine (tests/support/cluster.py): the POP hosts and the deciding host are
booted systemd containers, the MTA hosts and the mail clients network namespaces, on one private
bridge. The guide's files and commands are read out of man/poplock-cluster.7 and used as they are.

The tests run in order, as one story on one cluster: the transport is as the guide says; a login
at a POP host lets that client relay through both MTAs (timed over 100 logins); forged logins
grant nothing, whether logged on a POP host by another program or uploaded by a host that is not
listed; with the deciding host down both MTAs refuse relaying and take local mail; once it is
back, nothing is lost or replayed; old received files are vacuumed; a second reader of the same
received directory reaches the same grants.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from support.cluster import (
    AGGREGATOR,
    CLIENTS,
    JOURNAL_REMOTE_PORT,
    OUTSIDER,
    POP_HOSTS,
    RECEIVED,
    Cluster,
    guide_files,
    local_recipient,
    on_this_network,
)
from support.nspawn import wait_until
from support.poplock import ReaderProcess, Setup

from poplock import events

pytestmark = pytest.mark.system

LOGINS = 100
TIMED = CLIENTS[:LOGINS]  # .100 - .199
BY_IMAP_AT_POP2 = CLIENTS[100]
NEVER_LOGGED_IN = CLIENTS[101]
FORGED_BY_LOGGER = CLIENTS[102]
FORGED_BY_OUTSIDER = CLIENTS[103]
WITNESS = CLIENTS[104]
WHILE_DOWN_POP1, WHILE_DOWN_POP2 = CLIENTS[105], CLIENTS[106]
WRONG_PASSWORD = CLIENTS[107]
BY_ROOT = CLIENTS[111]
UPLOADED_TWICE = CLIENTS[112]

POSTFIX_REFUSAL = 554
QPSMTPD_REFUSAL = 550
RELAY_DEADLINE = 30.0  # seconds a login may take to become a relay before the test gives up


_SETUP_FAILED: list[BaseException] = []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    # A cluster that cannot be set up fails the first test; the others say so instead of trying again.
    if _SETUP_FAILED:
        pytest.fail(f"the cluster could not be set up: {_SETUP_FAILED[0]}")
    try:
        running = Cluster(tmp_path_factory.mktemp("cluster")).__enter__()
    except BaseException as error:
        _SETUP_FAILED.append(error)
        raise
    try:
        yield running
    finally:
        running.__exit__(None, None, None)


def received_reader_setup(cluster: Cluster, directory: Path) -> Setup:
    """A poplock configuration on this machine that reads the aggregator's received directory as the guide's does."""
    received = cluster.aggregator.root / RECEIVED.lstrip("/")
    [cluster_conf] = [text for path, text in guide_files("THE DECIDING HOST").items()
                      if path.startswith("/etc/poplock/")]
    reader_conf = on_this_network(cluster_conf).replace(f"Directory={RECEIVED}", f"Directory={received}")
    setup = Setup(directory, extra=reader_conf.replace("[Reader]\n", "", 1))  # Setup writes the [Reader] header
    (directory / "static-allowed").write_text("")
    return setup


@pytest.fixture(scope="module")
def follower(cluster, tmp_path_factory) -> ReaderProcess:
    """A second poplock-reader following the same received directory from the start, outside the aggregator."""
    with ReaderProcess(received_reader_setup(cluster, tmp_path_factory.mktemp("follower"))) as reader:
        yield reader


def report(capsys, text: str) -> None:
    """A line in the test output, whether or not pytest captures it."""
    with capsys.disabled():
        print(f"\n{text}")


def login_line(address: str, local: str = POP_HOSTS["pop1"]) -> str:
    return (f"pop3-login: Login: user=<user000>, method=PLAIN, rip={address}, lip={local}, mpid=4242, "
            f"session=<b7aS8S1hfbZ/AAAF>")


def received_entries(cluster: Cluster, sender: str, *matches: str) -> list[dict]:
    """The entries of one sender's received file on the aggregator, as journalctl reads them."""
    result = cluster.aggregator.run("journalctl", "--no-pager", "--output=json", "--all",
                                    f"--file={RECEIVED}/remote-{sender}*.journal", *matches, check=False)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def wait_until_relayed(relay, client: str, timeout: float = RELAY_DEADLINE) -> float:
    """Try to relay from `client` until the MTA says 250; the seconds it took."""
    started = time.monotonic()
    wait_until(lambda: relay(client)[0] == 250, f"{client} to relay", timeout, pause=0.01)
    return time.monotonic() - started


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))]


# --- 1. the transport, as the guide says ---------------------------------------------------------

def test_dovecot_runs_as_dovecot_service_and_each_pop_host_uploads_its_journal(cluster, follower, capsys):
    report(capsys, f"cluster set up in {cluster.setup_seconds:.1f}s")
    for name, machine in cluster.pop_hosts().items():
        for unit in ("dovecot.service", "systemd-journal-upload.service"):
            container = machine.container
            wait_until(lambda container=container, unit=unit: container.systemctl(
                "is-active", unit, check=False).stdout.strip() == "active", f"{unit} to be active on {name}", 15)
    assert cluster.aggregator.container.systemctl(
        "is-active", "systemd-journal-remote.socket", "poplock-reader.service", "poplock-policy.socket",
        "poplock-socketmap.socket", "journal-remote-vacuum.timer").stdout.split() == ["active"] * 5
    # With --split-mode=host each sender has one file, named after the address it sends from.
    wait_until(lambda: {f"remote-{address}.journal" for address in POP_HOSTS.values()} <= set(
        cluster.received_files()), "a received file from each POP host", 30)
    remote = cluster.aggregator.container.status("systemd-journal-remote.service")
    assert "--split-mode=host" in remote and "--listen-https=-3" in remote, remote


def test_the_uploader_checks_the_receivers_certificate(cluster, tmp_path):
    pop1 = cluster.pop_hosts()["pop1"]
    # Another authority that signed nothing the receiver holds.
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=Another CA", "-keyout", str(tmp_path / "other.key"), "-out",
                    str(tmp_path / "other.pem")], check=True, capture_output=True)
    pop1.write("/root/other-ca.pem", (tmp_path / "other.pem").read_text())
    probe = _journal_file(tmp_path, "MESSAGE=certificate probe\n")
    (pop1.root / "root/probe.journal").write_bytes(probe.read_bytes())
    # The guide's journal-upload.conf.d as it is; in a mount namespace of its own, the CA it names is the other one.
    upload = ["/lib/systemd/systemd-journal-upload", "--file=/root/probe.journal", "--follow=no"]
    refused = pop1.run("unshare", "--mount", "sh", "-c", 'mount --bind /root/other-ca.pem '
                       '/etc/ssl/journal-upload/ca.pem && exec "$@"', "sh", *upload, check=False)
    assert refused.returncode != 0
    assert "SSL certificate problem" in refused.stderr, refused.stderr
    accepted = pop1.run(*upload, check=False)
    assert accepted.returncode == 0, accepted.stderr
    wait_until(lambda: received_entries(cluster, POP_HOSTS["pop1"], "MESSAGE=certificate probe"),
               "the probe in pop1's received file", 10)


def test_a_login_arrives_with_the_fields_the_pop_hosts_journald_recorded(cluster):
    assert cluster.login(WITNESS)
    entries = wait_until(lambda: [entry for entry in received_entries(
        cluster, POP_HOSTS["pop1"], "_SYSTEMD_UNIT=dovecot.service") if f"rip={WITNESS}," in entry["MESSAGE"]],
        "the login in pop1's received file", 30)
    [entry] = entries
    assert entry["SYSLOG_IDENTIFIER"] == "dovecot" and entry["_UID"] == "0"
    assert entry["_HOSTNAME"] == cluster.pop_hosts()["pop1"].container.name
    assert entry["MESSAGE"].startswith(f"pop3-login: Login: user=<{cluster.users[WITNESS]}>, method=PLAIN, ")
    assert received_entries(cluster, POP_HOSTS["pop2"], f"MESSAGE={entry['MESSAGE']}") == []
    cluster.wait_until_granted(WITNESS)


# --- 2. a login lets that client relay through both MTAs -----------------------------------------

def test_a_login_at_pop1_lets_that_client_relay_through_both_mtas(cluster, capsys):
    assert cluster.relay_postfix(NEVER_LOGGED_IN)[0] == POSTFIX_REFUSAL
    assert cluster.relay_qmail(NEVER_LOGGED_IN)[0] == QPSMTPD_REFUSAL
    through_postfix, through_qmail = [], []
    for client in TIMED:
        assert cluster.relay_postfix(client)[0] == POSTFIX_REFUSAL, client
        assert cluster.login(client)
        logged_in = time.monotonic()
        wait_until_relayed(cluster.relay_postfix, client)
        through_postfix.append(time.monotonic() - logged_in)
        wait_until_relayed(cluster.relay_qmail, client)
        through_qmail.append(time.monotonic() - logged_in)
    report(capsys, f"login -> relay over {LOGINS} logins at pop1: "
                   f"Postfix p50 {statistics.median(through_postfix) * 1000:.0f} ms, "
                   f"p99 {percentile(through_postfix, 0.99) * 1000:.0f} ms; "
                   f"qpsmtpd (asked after Postfix) p50 {statistics.median(through_qmail) * 1000:.0f} ms, "
                   f"p99 {percentile(through_qmail, 0.99) * 1000:.0f} ms")
    grants = cluster.grants()
    for client in TIMED:
        assert grants[client]["source"] == "dovecot" and grants[client]["user"] == cluster.users[client]
    assert NEVER_LOGGED_IN not in grants
    assert cluster.relay_postfix(NEVER_LOGGED_IN)[0] == POSTFIX_REFUSAL
    assert cluster.relay_qmail(NEVER_LOGGED_IN)[0] == QPSMTPD_REFUSAL


def test_an_imap_login_at_pop2_lets_that_client_relay_and_a_failed_login_does_not(cluster):
    assert cluster.login(BY_IMAP_AT_POP2, host="pop2", protocol="imap")
    wait_until_relayed(cluster.relay_postfix, BY_IMAP_AT_POP2)
    wait_until_relayed(cluster.relay_qmail, BY_IMAP_AT_POP2)
    cluster.users[WRONG_PASSWORD] = "nobody-here"
    assert not cluster.login(WRONG_PASSWORD, host="pop2")
    first_login = cluster.grants()[WITNESS]["login_time"]
    assert cluster.login(WITNESS, host="pop2")
    wait_until(lambda: cluster.grants()[WITNESS]["login_time"] != first_login, "the witness's second login", 30)
    assert WRONG_PASSWORD not in cluster.grants()


# --- 3. forgeries grant nothing ------------------------------------------------------------------

def test_a_login_line_logged_by_another_program_on_a_pop_host_grants_nothing(cluster):
    pop1 = cluster.pop_hosts()["pop1"]
    by_user, by_root = FORGED_BY_LOGGER, CLIENTS[110]
    # Any local user can claim to be Dovecot through syslog(3); root can, from a unit that is not Dovecot's.
    pop1.run("logger", "-t", "dovecot", "-p", "mail.info", login_line(by_user), user="nobody")
    pop1.run("systemd-run", "--quiet", "--wait", "logger", "-t", "dovecot", "-p", "mail.info", login_line(by_root))
    forged = wait_until(lambda: (found := {address: entry for entry in received_entries(
        cluster, POP_HOSTS["pop1"], "SYSLOG_IDENTIFIER=dovecot") for address in (by_user, by_root)
        if f"rip={address}," in entry["MESSAGE"]}) and len(found) == 2 and found,
        "the forged lines in pop1's received file", 30)
    assert forged[by_user]["_UID"] == "65534" and forged[by_user].get("_SYSTEMD_UNIT") != "dovecot.service"
    assert forged[by_root]["_UID"] == "0" and forged[by_root]["_SYSTEMD_UNIT"].startswith("run-u")
    # pop1's file is read in order: once a later login from it is granted, the forgeries have been read.
    witness = CLIENTS[108]
    assert cluster.login(witness)
    cluster.wait_until_granted(witness)
    for address in (by_user, by_root):
        assert address not in cluster.grants()
        assert cluster.relay_postfix(address)[0] == POSTFIX_REFUSAL
        assert cluster.relay_qmail(address)[0] == QPSMTPD_REFUSAL


def test_root_on_a_listed_pop_host_can_grant_any_address_as_the_guide_warns(cluster):
    """poplock-cluster(7): a listed POP host that is compromised can grant relaying to any address.
    Its root makes Dovecot's own unit log a login that never was; the entry is Dovecot's in every field."""
    pop1 = cluster.pop_hosts()["pop1"]
    drop_in = "/etc/systemd/system/dovecot.service.d/compromised.conf"
    pop1.write(drop_in, f"[Service]\nExecStartPre=/usr/bin/logger -t dovecot -p mail.info '{login_line(BY_ROOT)}'\n")
    try:
        pop1.container.systemctl("daemon-reload")
        pop1.container.systemctl("restart", "dovecot.service")
    finally:
        (pop1.root / drop_in.lstrip("/")).unlink()
        pop1.container.systemctl("daemon-reload")
    [forged] = wait_until(lambda: [entry for entry in received_entries(cluster, POP_HOSTS["pop1"],
                                                                       "SYSLOG_IDENTIFIER=dovecot")
                                   if f"rip={BY_ROOT}," in entry["MESSAGE"]], "the line in pop1's received file", 30)
    assert forged["_UID"] == "0"
    grant = cluster.wait_until_granted(BY_ROOT)
    assert grant["source"] == "dovecot"
    wait_until_relayed(cluster.relay_postfix, BY_ROOT)


def test_an_upload_from_a_host_that_is_not_listed_grants_nothing(cluster, capsys, tmp_path):
    """The outsider claims to be pop1 in every field it can write; only its address gives it away."""
    now = time.time_ns() // 1000
    entry = (f"__REALTIME_TIMESTAMP={now}\n__MONOTONIC_TIMESTAMP={now % 10**9}\n_BOOT_ID={uuid.uuid4().hex}\n"
             f"_MACHINE_ID={(cluster.pop_hosts()['pop1'].root / 'etc/machine-id').read_text().strip()}\n"
             f"_HOSTNAME={cluster.pop_hosts()['pop1'].container.name}\n_SYSTEMD_UNIT=dovecot.service\n"
             f"_UID=0\n_GID=0\n_COMM=log\n_TRANSPORT=syslog\nSYSLOG_IDENTIFIER=dovecot\nSYSLOG_FACILITY=2\n"
             f"PRIORITY=6\nMESSAGE={login_line(FORGED_BY_OUTSIDER)}\n\n")  # an empty line ends the entry
    export = tmp_path / "forged.export"
    export.write_text(entry)
    ca = cluster.certificates / "ca.pem"
    upload = cluster.outsider.run(
        "curl", "--silent", "--show-error", "--max-time", "10", "--cacert", str(ca),
        "-H", "Content-Type: application/vnd.fdo.journal", "--data-binary", f"@{export}",
        f"https://{AGGREGATOR}:{JOURNAL_REMOTE_PORT}/upload")
    outsider_file = f"remote-{OUTSIDER}.journal"
    if upload.returncode == 0:
        # The receiver's IPAddressAllow= did not hold it off: systemd in this container has no BPF firewall.
        assert upload.stdout.strip() == "OK.", upload
        [received] = wait_until(lambda: received_entries(cluster, OUTSIDER, "_SYSTEMD_UNIT=dovecot.service"),
                                "the outsider's file", 10)
        assert received["_HOSTNAME"] == cluster.pop_hosts()["pop1"].container.name
        assert outsider_file in cluster.received_files()
        assert not cluster.aggregator.firewall_enforced(), "the upload got through a working IPAddressAllow="
        report(capsys, "IPAddressAllow= on systemd-journal-remote.socket is not enforced in this container "
                       "(no BPF firewall); the outsider's upload landed in " + outsider_file)
    else:
        assert outsider_file not in cluster.received_files()
        report(capsys, f"the outsider's upload was refused at the socket: {upload.stderr.strip()}")
    witness = CLIENTS[109]
    assert cluster.login(witness)
    cluster.wait_until_granted(witness)
    assert FORGED_BY_OUTSIDER not in cluster.grants()
    assert cluster.relay_postfix(FORGED_BY_OUTSIDER)[0] == POSTFIX_REFUSAL
    assert cluster.relay_qmail(FORGED_BY_OUTSIDER)[0] == QPSMTPD_REFUSAL


def test_a_login_uploaded_twice_is_acted_on_once(cluster):
    """systemd-journal-upload sends its last entry again after each restart: here, a login's."""
    pop1, client, witness = cluster.pop_hosts()["pop1"], UPLOADED_TWICE, CLIENTS[113]
    assert cluster.login(client)
    cluster.wait_until_granted(client)
    [login] = [entry for entry in received_entries(cluster, POP_HOSTS["pop1"], "_SYSTEMD_UNIT=dovecot.service")
               if f"rip={client}," in entry["MESSAGE"] and "Login:" in entry["MESSAGE"]]
    # The entry as pop1's journal holds it, sent once more from pop1 the way the uploader sends it.
    export = pop1.run("journalctl", "--output=export", f"MESSAGE={login['MESSAGE']}").stdout
    assert export.count("\n\n") == 1, export
    pop1.write("/root/again.export", export)
    sent = pop1.run("curl", "--silent", "--show-error", "--cacert", "/etc/ssl/journal-upload/ca.pem",
                    "-H", "Content-Type: application/vnd.fdo.journal", "--data-binary", "@/root/again.export",
                    f"https://{AGGREGATOR}:{JOURNAL_REMOTE_PORT}/upload", check=False)
    assert sent.stdout.strip() == "OK.", sent
    wait_until(lambda: len(received_entries(cluster, POP_HOSTS["pop1"], f"MESSAGE={login['MESSAGE']}")) == 2,
               "the login twice in pop1's received file", 10)
    assert cluster.login(witness)
    cluster.wait_until_granted(witness)
    acted = [entry["POPLOCK_EVENT"] for entry in cluster.aggregator.journal_all_boots(
        "_SYSTEMD_UNIT=poplock-reader.service", f"POPLOCK_CLIENT_ADDRESS={client}")
        if entry.get("POPLOCK_EVENT") in (events.LOGIN_GRANTED.name, events.GRANT_EXTENDED.name,
                                          events.LOGIN_TOO_OLD.name)]
    assert acted == [events.LOGIN_GRANTED.name]


# --- 4. the deciding host down, and back ---------------------------------------------------------

def test_with_the_aggregator_down_both_mtas_refuse_relaying_and_still_take_local_mail(cluster):
    granted = TIMED[0]
    cluster.before_stop = cluster.grants()
    assert granted in cluster.before_stop
    cluster.stop_aggregator()
    assert cluster.relay_postfix(granted)[0] == POSTFIX_REFUSAL
    assert cluster.relay_qmail(granted)[0] == QPSMTPD_REFUSAL
    assert cluster.relay_postfix(granted, recipient=local_recipient())[0] == 250
    assert cluster.relay_qmail(granted, recipient=local_recipient())[0] == 250
    # POP hosts go on taking logins; their journals keep them until the aggregator is back.
    assert cluster.login(WHILE_DOWN_POP1)
    assert cluster.login(WHILE_DOWN_POP2, host="pop2", protocol="imap")
    assert cluster.relay_postfix(WHILE_DOWN_POP1)[0] == POSTFIX_REFUSAL
    assert cluster.relay_qmail(WHILE_DOWN_POP2)[0] == QPSMTPD_REFUSAL


def test_with_the_aggregator_back_nothing_is_lost_or_replayed(cluster):
    cluster.start_aggregator()
    for client in (WHILE_DOWN_POP1, WHILE_DOWN_POP2):
        cluster.wait_until_granted(client, timeout=60)
        wait_until_relayed(cluster.relay_postfix, client)
        wait_until_relayed(cluster.relay_qmail, client)
    after = cluster.grants()
    for address, grant in cluster.before_stop.items():
        assert after[address] == grant, address
    assert cluster.relay_postfix(TIMED[0])[0] == 250
    assert cluster.relay_qmail(TIMED[0])[0] == 250
    # Every login was acted on once, over both boots of the aggregator: none lost, none read twice.
    acted = [entry for entry in cluster.aggregator.journal_all_boots("_SYSTEMD_UNIT=poplock-reader.service")
             if entry.get("POPLOCK_EVENT") in (events.LOGIN_GRANTED.name, events.GRANT_EXTENDED.name,
                                               events.LOGIN_TOO_OLD.name)]
    kinds = {}
    for entry in acted:
        kinds.setdefault(entry["POPLOCK_CLIENT_ADDRESS"], []).append(entry["POPLOCK_EVENT"])
    logged_in = [*TIMED, BY_IMAP_AT_POP2, CLIENTS[108], CLIENTS[109], BY_ROOT, UPLOADED_TWICE, CLIENTS[113],
                 WHILE_DOWN_POP1, WHILE_DOWN_POP2]
    for address in logged_in:
        assert kinds.get(address) == [events.LOGIN_GRANTED.name], (address, kinds.get(address))
    # The witness logged in twice (pop1, then pop2): two logins, each acted on.
    assert len(kinds[WITNESS]) == 2, kinds[WITNESS]
    assert set(kinds) == {*logged_in, WITNESS}


# --- 5. old received files ----------------------------------------------------------------------

def test_the_guides_vacuum_timer_removes_old_received_files_and_never_a_live_one(cluster, tmp_path):
    received = cluster.aggregator.root / RECEIVED.lstrip("/")
    live = cluster.received_files()
    month_ago = (time.time_ns() // 1000) - 30 * 86400 * 10**6
    archived = received / f"remote-10.123.0.99@{uuid.uuid4().hex}-{1:016x}-{month_ago:016x}.journal"
    shutil.copy(_journal_file(tmp_path, "MESSAGE=an old file\n"), archived)
    # A file set aside as corrupt is named after the time it was found so.
    dirty = received / f"remote-10.123.0.98@{month_ago:016x}-{uuid.uuid4().int >> 64:016x}.journal~"
    shutil.copy(_journal_file(tmp_path, "MESSAGE=an old corrupt file\n"), dirty)
    recent = received / f"remote-10.123.0.97@{uuid.uuid4().hex}-{1:016x}-{time.time_ns() // 1000:016x}.journal"
    shutil.copy(_journal_file(tmp_path, "MESSAGE=a recent file\n"), recent)
    grants = cluster.grants()

    cluster.aggregator.container.systemctl("start", "journal-remote-vacuum.service")
    assert not archived.exists() and not dirty.exists()
    assert recent.exists()
    assert set(live) <= set(cluster.received_files())
    assert cluster.grants() == grants
    timer = cluster.aggregator.container.show("journal-remote-vacuum.timer", "ActiveState", "NextElapseUSecRealtime")
    assert timer["ActiveState"] == "active" and timer["NextElapseUSecRealtime"] not in ("", "0")
    recent.unlink()


# --- 6. two deciding hosts, the same answers ------------------------------------------------------

def test_two_more_readers_of_the_same_received_directory_reach_the_same_grants(cluster, follower, tmp_path):
    """One followed the directory live all along (the aggregator down and up, files growing), one reads it
    once now: both end with the aggregator's grants, forgeries left out."""
    once = received_reader_setup(cluster, tmp_path)
    result = once.run_reader()
    assert result.returncode == 0, result.stderr

    def stored(setup: Setup) -> dict[str, dict]:
        return {record["address"]: record for record in map(json.loads, setup.run(
            "show", "--json", "--all", check=True).stdout.splitlines()) if record.get("kind") == "grant"}

    ours = cluster.grants()
    assert ours and stored(once) == ours
    # The follower may still be reading the last entries: the same grants, once it has.
    wait_until(lambda: stored(follower.setup) == ours, "the following reader to reach the aggregator's grants", 15)
    assert follower.process.poll() is None, follower.output()
    for forged in (FORGED_BY_LOGGER, FORGED_BY_OUTSIDER):
        assert forged not in ours


def _journal_file(directory: Path, fields: str) -> Path:
    """A small journal file holding one entry with `fields` (export format), made by systemd-journal-remote."""
    export = directory / f"{uuid.uuid4().hex}.export"
    now = time.time_ns() // 1000
    export.write_text(f"__REALTIME_TIMESTAMP={now}\n__MONOTONIC_TIMESTAMP=1\n_BOOT_ID={uuid.uuid4().hex}\n{fields}\n")
    output = directory / f"{export.stem}.journal"
    result = subprocess.run(["/lib/systemd/systemd-journal-remote", f"--output={output}", str(export)],
                            check=True, capture_output=True, text=True)
    assert "writing 1 entries" in result.stderr or "lost" not in result.stderr, result.stderr
    return output
