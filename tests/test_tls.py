"""TLS and credentials against a real mosquitto: trusted CA, mutual TLS, wrong CA, password file, URL secrets.

The certificates are made here with `cryptography`: a CA, a server certificate for 127.0.0.1 and localhost,
a client certificate signed by the CA, and an unrelated "wrong" CA that signed nothing the broker uses.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from conftest import Broker, Recorder, agent_config, free_port, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


# -- a small PKI ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: x509.Certificate | None, issuer_key, *, ca: bool,
          usage=None, sans: tuple[x509.GeneralName, ...] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(_name(subject))
         .issuer_name(issuer.subject if issuer else _name(subject))
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                        critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, encipher_only=False,
                                          decipher_only=False), critical=True)
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, cert: x509.Certificate, key=None) -> tuple[Path, Path | None]:
        cert_path = folder / f"{name}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path = None
        if key is not None:
            key_path = folder / f"{name}.key"
            key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        return cert_path, key_path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("edge-agent test CA", ca_key, None, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert("localhost", server_key, ca, ca_key, ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                   sans=(x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert("edge-agent test client", client_key, ca, ca_key, ca=False,
                   usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    wrong_key = ec.generate_private_key(ec.SECP256R1())
    wrong = _cert("some other CA", wrong_key, None, wrong_key, ca=True)

    ca_path, _ = write("ca", ca)
    server_cert, server_key_path = write("server", server, server_key)
    client_cert, client_key_path = write("client", client, client_key)
    wrong_path, _ = write("wrong-ca", wrong)
    return Pki(ca_path, server_cert, server_key_path, client_cert, client_key_path, wrong_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- a TLS broker and a TLS recorder --------------------------------------------------------------------

class TlsBroker(Broker):
    """conftest's Broker, with a TLS listener (and optionally client certificates, a password file)."""

    def __init__(self, workdir: Path, pki: Pki, *, require_certificate: bool = False, extra_conf: str = ""):
        conf = f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        if require_certificate:
            conf += "require_certificate true\n"
        super().__init__(workdir, extra_conf=conf + extra_conf)

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def log(self) -> str:
        path = self.workdir / f"mosquitto-{self.port}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def start_broker(tmp_path: Path, pki: Pki):
    made: list[TlsBroker] = []

    def start(**kwargs) -> TlsBroker:
        b = TlsBroker(tmp_path, pki, **kwargs)
        b.start()
        made.append(b)
        return b

    yield start
    for b in made:
        b.stop()


class TlsRecorder(Recorder):
    """conftest's Recorder, connecting over TLS (trusting our CA), with a client certificate and/or login."""

    def __init__(self, broker: TlsBroker, pki: Pki, *topics: str, client_cert: bool = False,
                 username: str | None = None, password: str | None = None):
        def configure(client: paho.Client) -> None:
            client.tls_set(ca_certs=str(pki.ca), certfile=str(pki.client_cert) if client_cert else None,
                           keyfile=str(pki.client_key) if client_cert else None)
            if username:
                client.username_pw_set(username, password)

        super().__init__(broker, *topics, configure=configure)

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [p for _, p, _ in self.messages]


@pytest.fixture
def tls_recorder(pki: Pki):
    made: list[TlsRecorder] = []

    def make(broker: TlsBroker, *topics: str, **kwargs) -> TlsRecorder:
        r = TlsRecorder(broker, pki, *topics, **kwargs)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def tls_agent_config(broker: TlsBroker, tmp_path: Path, **mqtt) -> dict:
    cfg = agent_config(broker, tmp_path, mqtt={"url": broker.url, **mqtt})
    cfg["state_dir"] = str(tmp_path / f"state-{cfg['device_id']}")
    return cfg


def connect_failures(agent) -> list[str]:
    return [line for line in agent.log().splitlines() if "mqtt: cannot connect to" in line]


# -- the contracts --------------------------------------------------------------------------------------

def test_agent_publishes_over_tls_to_a_broker_it_trusts(start_broker, tls_recorder, agent_factory, tmp_path, pki):
    broker = start_broker()
    cfg = tls_agent_config(broker, tmp_path, ca_file=str(pki.ca))
    dev = cfg["device_id"]
    rec = tls_recorder(broker, f"edge/{dev}/#")
    agent = agent_factory(cfg).start()

    rec.wait_json("/status", lambda m: m["state"] == "online", timeout=20)
    preds = rec.wait_json("/predictions", count=3, timeout=20)
    assert all(p["task"] == "blazeface" for p in preds)
    assert f"mqtt: connected to mqtts://127.0.0.1:{broker.port}" in agent.log()
    assert agent.stop() == 0
    rec.wait_json("/status", lambda m: m["state"] == "offline", timeout=5)


def test_mutual_tls_client_certificate_is_required_and_accepted(start_broker, tls_recorder, agent_factory,
                                                                tmp_path, pki):
    broker = start_broker(require_certificate=True)
    with_cert = tls_agent_config(broker, tmp_path, ca_file=str(pki.ca), cert_file=str(pki.client_cert),
                                 key_file=str(pki.client_key))
    without_cert = tls_agent_config(broker, tmp_path, ca_file=str(pki.ca))
    rec = tls_recorder(broker, "edge/#", client_cert=True)
    good = agent_factory(with_cert, name="with-cert").start()
    bad = agent_factory(without_cert, name="without-cert").start()

    rec.wait_json(f"{with_cert['device_id']}/status", lambda m: m["state"] == "online", timeout=20)
    rec.wait_json(f"{with_cert['device_id']}/predictions", timeout=10)

    # The broker ends the TLS session before CONNACK; the agent says so, names the fix, and keeps trying.
    # (The broker's "certificate required" alert usually reaches us, but may arrive as a bare EOF.)
    failures = wait_until(lambda: connect_failures(bad), 15, what="the agent without a certificate to say why")
    assert f"mqtts://127.0.0.1:{broker.port}" in failures[0]
    assert "mqtt.cert_file" in failures[0], failures
    wait_until(lambda: broker.log().count("peer did not return a certificate") >= 2, 10, what="a retry")
    assert bad.proc.poll() is None, bad.log()
    assert rec.json(f"{without_cert['device_id']}/status") == []
    assert "mqtt: connected" not in bad.log()
    assert good.stop() == 0 and bad.stop() == 0


def test_wrong_ca_is_refused_with_a_clear_error(start_broker, tls_recorder, agent_factory, tmp_path, pki):
    broker = start_broker()
    cfg = tls_agent_config(broker, tmp_path, ca_file=str(pki.wrong_ca))
    rec = tls_recorder(broker, f"edge/{cfg['device_id']}/#")
    agent = agent_factory(cfg).start()

    failures = wait_until(lambda: connect_failures(agent), 15, what="a certificate error in the agent log")
    assert "certificate verify failed" in failures[0], failures
    assert f"mqtts://127.0.0.1:{broker.port}" in failures[0], failures
    # It retries in the background (the broker sees the attempts) but says it once, and does not crash.
    wait_until(lambda: broker.log().count("alert unknown ca") >= 2, 10, what="a retry")
    assert len(connect_failures(agent)) == 1, agent.log()
    assert agent.proc.poll() is None, agent.log()
    assert "Traceback" not in agent.log()
    assert "mqtt: connected" not in agent.log()
    assert rec.messages == []
    assert agent.stop() == 0


@pytest.mark.skipif(not Path(MOSQUITTO_PASSWD).exists(), reason="mosquitto_passwd (mosquitto package) not found")
def test_password_comes_from_a_file_and_never_appears_in_logs_or_status(start_broker, tls_recorder,
                                                                        agent_factory, tmp_path, pki):
    password = f"pw-{uuid.uuid4().hex}"
    wrong_password = f"wrong-{uuid.uuid4().hex}"
    passwd = tmp_path / "mosquitto.passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-b", "-c", str(passwd), "edge", password], check=True,
                   capture_output=True, timeout=10)
    broker = start_broker(extra_conf=f"allow_anonymous false\npassword_file {passwd}\n")
    (tmp_path / "good-secret").write_text(password + "\n")
    (tmp_path / "bad-secret").write_text(wrong_password + "\n")
    good_cfg = tls_agent_config(broker, tmp_path, ca_file=str(pki.ca), username="edge",
                                password_file=str(tmp_path / "good-secret"))
    good_cfg["log_level"] = "debug"
    bad_cfg = tls_agent_config(broker, tmp_path, ca_file=str(pki.ca), username="edge",
                               password_file=str(tmp_path / "bad-secret"))
    rec = tls_recorder(broker, "edge/#", username="edge", password=password)
    good = agent_factory(good_cfg, name="good").start()
    bad = agent_factory(bad_cfg, name="bad").start()

    dev = good_cfg["device_id"]
    rec.wait_json(f"{dev}/status", lambda m: m["state"] == "online", timeout=20)
    rec.wait_json(f"{dev}/health", lambda m: m["frames_processed"] > 0, timeout=10)
    late = tls_recorder(broker, f"edge/{dev}/#", username="edge", password=password)  # the retained ones
    late.wait_json("/status")
    late.wait_json("/health")
    assert good.stop() == 0
    rec.wait_json(f"{dev}/status", lambda m: m["state"] == "offline", timeout=5)

    for payload in rec.payloads() + late.payloads():
        assert password.encode() not in payload
    assert password not in good.log()
    assert password not in good.config_path.read_text()  # only the file's path is in the config

    # A wrong password: the broker says no, the agent says why, keeps running and never gets online.
    refused = wait_until(lambda: [ln for ln in bad.log().splitlines() if "broker refused the connection" in ln],
                         15, what="the refusal in the agent log")
    assert any(s in refused[0] for s in ("Bad user name or password", "Not authorized")), refused
    assert bad.proc.poll() is None, bad.log()
    assert rec.json(f"{bad_cfg['device_id']}/status") == []
    assert wrong_password not in bad.log()


def test_credentials_in_the_url_are_refused(agent_factory, tmp_path):
    cfg = agent_config(None, tmp_path, mqtt={"url": "mqtt://user:secret@127.0.0.1:1883"})
    agent = agent_factory(cfg).start()
    assert agent.wait(30) in (1, 2), agent.log()
    assert "password_file" in agent.log()
    assert "secret" not in agent.log()
    assert "Traceback" not in agent.log()


@pytest.mark.parametrize("problem", ["missing ca_file", "ca_file is not a certificate",
                                     "key does not match the certificate"])
def test_unusable_tls_files_stop_the_agent_with_a_clear_error(agent_factory, tmp_path, pki, problem):
    not_pem = tmp_path / "not-a-cert.pem"
    not_pem.write_text("hello\n")
    mqtt = {
        "missing ca_file": {"ca_file": str(tmp_path / "nowhere" / "ca.pem")},
        "ca_file is not a certificate": {"ca_file": str(not_pem)},
        "key does not match the certificate": {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert),
                                               "key_file": str(pki.server_key)},
    }[problem]
    cfg = agent_config(None, tmp_path, mqtt={"url": f"mqtts://127.0.0.1:{free_port()}", **mqtt})
    agent = agent_factory(cfg).start()
    assert agent.wait(30) == 2, agent.log()  # a file the config names is unusable: bad input, like a bad key
    assert "Traceback" not in agent.log()
    line = next(ln for ln in agent.log().splitlines() if "cannot start" in ln)
    assert ("mqtt.ca_file" if "ca_file" in problem else "mqtt.cert_file/key_file") in line, line
    assert str(mqtt.get("cert_file") or mqtt["ca_file"]) in line, line
