"""TLS, mutual TLS, bearer tokens and tenants through the Python client,
against the real binary: certificates made with the openssl CLI, tokens
files written here, SIGHUP reloads observed through the server's log."""

import hashlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time

import pytest
import torch

import normserve
from conftest import ServerProcess

ALICE = "alice-Token-123"  # tenant acme, stored as a hash
BOB = "bob-Token-456"      # tenant globex, stored in plain
ROOT = "root-Token-789"    # admin


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki():
    """A CA, a server certificate for localhost/127.0.0.1 and a client
    certificate signed by it, and a client certificate of another CA."""
    d = tempfile.mkdtemp(prefix="normserve-pki-")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                "-subj", f"/CN=normserve test {ca}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)

    def leaf(name, ca, extensions):
        openssl("req", "-x509", *ec, "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}",
                "-addext", "basicConstraints=CA:FALSE", *sum((["-addext", e] for e in extensions), []),
                cwd=d)

    leaf("server", "ca", ["subjectAltName=DNS:localhost,IP:127.0.0.1", "extendedKeyUsage=serverAuth"])
    leaf("client", "ca", ["extendedKeyUsage=clientAuth"])
    leaf("stranger", "other-ca", ["extendedKeyUsage=clientAuth"])
    return lambda name: os.path.join(d, name)


def write_tokens(path, *lines):
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)  # the server reads the old or the new file, never half


def entry(token, tenant, role, hashed=False):
    credential = "sha256:" + hashlib.sha256(token.encode()).hexdigest() if hashed else token
    return f"{credential} {tenant} {role}"


ALL_TOKENS = (
    "# tenants of the security tests",
    entry(ALICE, "acme", "user", hashed=True),
    entry(BOB, "globex", "user"),
    entry(ROOT, "ops", "admin", hashed=True),
)


@pytest.fixture(scope="module")
def pki():
    return make_pki()


@pytest.fixture(scope="module")
def secured(pki):
    """A server with mutual TLS and tokens."""
    tokens = pki("tokens")
    write_tokens(tokens, *ALL_TOKENS)
    # Every request logged (the access log at rate 1): the tests below check
    # that no token ever reaches a log line.
    server = ServerProcess("--access-log-sample", "1", "--tls-cert", pki("server.crt"), "--tls-key", pki("server.key"),
                           "--tls-client-ca", pki("ca.crt"), "--auth-tokens", tokens)
    yield server
    assert server.stop() == 0
    log = "".join(server.log)
    for token in (ALICE, BOB, ROOT):
        assert token not in log, "a token was logged"


def tls(pki, client="client"):
    if client is None:
        return normserve.TLSConfig(root_certificates=pki("ca.crt"))
    return normserve.TLSConfig(root_certificates=pki("ca.crt"), client_certificate=pki(f"{client}.crt"),
                               client_key=pki(f"{client}.key"))


def connect(server, pki, token, client="client"):
    return normserve.connect(server.address, token=token, tls=tls(pki, client), timeout=30)


def test_sessions_work_end_to_end_over_mutual_tls_with_a_token(secured, pki):
    alice = connect(secured, pki, ALICE)
    session = alice.create_session("2d", 3, session_id="layer")
    local = torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(session.forward(x), local(x))
        torch.testing.assert_close(session.eval()(x), local.eval()(x))
    assert alice.server_info().sessions == 1
    alice.delete_session("layer")


def test_the_handshake_needs_the_right_ca_and_a_client_certificate(secured, pki):
    for client in (None, "stranger"):
        with pytest.raises(normserve.Unavailable):
            connect(secured, pki, ALICE, client=client).server_info()
    wrong_root = normserve.TLSConfig(root_certificates=pki("other-ca.crt"), client_certificate=pki("client.crt"),
                                     client_key=pki("client.key"))
    with pytest.raises(normserve.Unavailable):
        normserve.connect(secured.address, token=ALICE, tls=wrong_root, timeout=30).server_info()
    with pytest.raises(normserve.Unavailable):
        normserve.connect(secured.address, token=ALICE, timeout=30).server_info()  # plaintext


def test_calls_without_a_valid_token_are_unauthenticated(secured, pki):
    for token in (None, "not-a-token", ALICE + "x"):
        client = connect(secured, pki, token)
        for call in (client.server_info, lambda: list(client.list_sessions()),
                     lambda: client.compare(torch.randn(4, 2))):
            with pytest.raises(normserve.Unauthenticated) as caught:
                call()
            if token:
                assert token not in caught.value.details


def test_tenants_see_only_their_own_sessions_and_the_admin_sees_all(secured, pki):
    alice, bob, root = (connect(secured, pki, t) for t in (ALICE, BOB, ROOT))
    alice.create_session("1d", 2, session_id="mine")
    with pytest.raises(normserve.NotFound) as theirs:
        bob.get_session("mine")
    assert [s.session_id for s in bob.list_sessions()] == []
    # Bob's own "mine" is another session.
    bobs = bob.create_session("1d", 5, session_id="mine")
    assert not bobs.already_existed
    assert [s.session_id for s in alice.list_sessions()] == ["mine"]
    assert sorted(s.session_id for s in root.list_sessions()) == ["acme/mine", "globex/mine"]
    assert root.get_session("acme/mine").info().num_features == 2
    root.delete_session("acme/mine")
    with pytest.raises(normserve.NotFound) as missing:
        alice.get_session("mine")
    # What Bob got for Alice's session is what any missing session gets.
    assert theirs.value.details == missing.value.details
    bob.delete_session("mine")


def wait_for_log(server, text, seen, timeout=30):
    """Waits until the server logs a new line containing `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = list(server.log)
        if sum(text in line for line in lines) > seen:
            return
        time.sleep(0.02)
    raise AssertionError(f"the server never logged {text!r}: {''.join(server.log[-20:])}")


def count_log(server, text):
    return sum(text in line for line in list(server.log))


def test_sighup_reloads_tokens_and_a_broken_file_keeps_the_previous_ones(pki):
    tokens = pki("reload-tokens")
    write_tokens(tokens, *ALL_TOKENS)
    server = ServerProcess("--access-log-sample", "1", "--auth-tokens", tokens)
    try:
        alice = normserve.connect(server.address, token=ALICE, timeout=30)
        bob = normserve.connect(server.address, token=BOB, timeout=30)
        alice.server_info()
        bob.server_info()

        # Revoke Alice.
        write_tokens(tokens, entry(BOB, "globex", "user"))
        seen = count_log(server, "tokens file reloaded")
        server.proc.send_signal(signal.SIGHUP)
        wait_for_log(server, "tokens file reloaded", seen)
        with pytest.raises(normserve.Unauthenticated):
            alice.server_info()
        bob.server_info()

        # A broken file changes nothing.
        write_tokens(tokens, f"{ALICE} acme user", "this line is broken")
        seen = count_log(server, "tokens file not reloaded")
        server.proc.send_signal(signal.SIGHUP)
        wait_for_log(server, "tokens file not reloaded", seen)
        bob.server_info()
        with pytest.raises(normserve.Unauthenticated):
            alice.server_info()
        assert server.proc.poll() is None, "SIGHUP stopped the server"
    finally:
        assert server.stop() == 0
    assert ALICE not in "".join(server.log) and BOB not in "".join(server.log)


def reload_tokens(server, path, *lines):
    write_tokens(path, *lines)
    seen = count_log(server, "tokens file reloaded")
    server.proc.send_signal(signal.SIGHUP)
    wait_for_log(server, "tokens file reloaded", seen)


def test_a_revoked_token_ends_its_open_stream_before_the_next_message(pki):
    tokens = pki("stream-tokens")
    write_tokens(tokens, *ALL_TOKENS)
    server = ServerProcess("--auth-tokens", tokens)
    try:
        alice = normserve.connect(server.address, token=ALICE, timeout=30)
        session = alice.create_session("1d", 4)
        xs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        revoked = threading.Event()

        def inputs():
            yield xs[0]
            revoked.wait(timeout=30)
            yield from xs[1:]

        outputs = session.forward_stream(inputs(), train=True)
        module = torch.nn.BatchNorm1d(4)
        with torch.no_grad():
            torch.testing.assert_close(next(outputs), module(xs[0]))
        # Revoke Alice while her stream is open: its next message is refused.
        reload_tokens(server, tokens, entry(BOB, "globex", "user"))
        revoked.set()
        with pytest.raises(normserve.Unauthenticated, match="revoked"):
            next(outputs)

        # Nothing after the revocation was applied.
        reload_tokens(server, tokens, *ALL_TOKENS)
        info = alice.get_session(session.session_id).info()
        assert (info.version, info.num_batches_tracked) == (2, 1)
        torch.testing.assert_close(session.state_dict()["running_mean"], module.running_mean)
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("args, expected", [
    (["--auth-tokens", "TOKENS"], "line 1"),
    (["--auth-tokens", "MISSING"], "MISSING"),
    (["--tls-cert", "GARBAGE", "--tls-key", "KEY"], "--tls-cert"),
    (["--tls-cert", "CERT", "--tls-key", "GARBAGE"], "--tls-key"),
    (["--tls-cert", "CERT", "--tls-key", "KEY", "--tls-client-ca", "GARBAGE"], "--tls-client-ca"),
    (["--tls-cert", "CERT"], "--tls-key"),
])
def test_bad_security_files_stop_the_start_with_exit_code_2(pki, args, expected):
    garbage = pki("garbage.pem")
    with open(garbage, "w") as f:
        f.write("not PEM\n")
    broken = pki("broken-tokens")
    with open(broken, "w") as f:
        f.write("secret-value-only\n")
    paths = {"TOKENS": broken, "MISSING": pki("no-such-file"), "GARBAGE": garbage,
             "CERT": pki("server.crt"), "KEY": pki("server.key")}
    argv = [paths.get(a, a) for a in args]
    expected = paths.get(expected, expected)
    binary = os.environ.get("NORMSERVE_BIN", "target/release/normserve")
    done = subprocess.run([binary, "--listen", "127.0.0.1:0", "--durability", "none", *argv],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert expected in done.stderr, done.stderr
    assert "secret-value-only" not in done.stderr


def test_command_line_over_mutual_tls_with_a_token(secured, pki):
    """`normserve <command>` with --tls-ca/--tls-cert/--tls-key and --token:
    health works, the tenant's own sessions list, no token is refused."""
    binary = os.environ.get("NORMSERVE_BIN", "target/release/normserve")
    alice = connect(secured, pki, ALICE)
    alice.create_session("1d", 2, session_id="cli-layer")
    tls_args = ["--addr", secured.address, "--tls-ca", pki("ca.crt"),
                "--tls-cert", pki("client.crt"), "--tls-key", pki("client.key")]

    def run(*args, token=None):
        env = {k: v for k, v in os.environ.items() if k != "NORMSERVE_TOKEN"}
        if token:
            env["NORMSERVE_TOKEN"] = token
        return subprocess.run([binary, *args, *tls_args], capture_output=True, text=True, timeout=60, env=env)

    assert run("health").stdout.strip() == "SERVING"
    listed = run("sessions", "list", "--json", token=ALICE)
    assert listed.returncode == 0, listed.stderr
    assert [s["sessionId"] for s in json.loads(listed.stdout)["sessions"]] == ["cli-layer"]
    refused = run("sessions", "list")
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    assert ALICE not in refused.stderr
    plain = subprocess.run([binary, "health", "--addr", secured.address, "--timeout", "3"],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0
    alice.delete_session("cli-layer")
