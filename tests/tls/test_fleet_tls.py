"""The whole loop over TLS on loopback: enrollment issues a client certificate, then uplink, MQTT telemetry and
desired state, and a model download all run over TLS with it; wrong and expired certificates are refused with
a clear message, by the broker and by cloud-sync's device port (mTLS).

One module-scoped fleet (tests/tls/conftest.py): cloud-sync with [tls] + client_ca_file + [fleet_ca], a
Mosquitto TLS listener that requires the fleet's client certificates, one real edge-agent process.
"""

from __future__ import annotations

import datetime
import ssl
import stat
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_runtime.agent.identity import client_certificate_expiry
from tests.fleet.harness import digits_input, events, expected_output
from tests.tls.conftest import DEVICE, TlsFleet
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

CONVERGE_S = 60.0


def test_the_cloud_serves_tls_and_says_so(tls_fleet: TlsFleet) -> None:
    ready = tls_fleet.ready
    assert ready["http"].startswith("https://") and ready["grpc_tls"] == "mtls", ready
    assert tls_fleet.api.get("/healthz").json() == {"status": "ok"}


def test_a_device_trusting_another_ca_is_told_which_file_and_why(tls_fleet: TlsFleet) -> None:
    said = tls_fleet.enroll_stderr
    assert said.startswith("exit 1:"), said
    assert str(tls_fleet.other_ca.cert_file) in said and "CERTIFICATE_VERIFY_FAILED" in said, said
    assert "Traceback" not in said


def test_enrollment_issues_a_client_certificate_for_a_key_made_on_the_device(tls_fleet: TlsFleet) -> None:
    identity = tls_fleet.agent.enrolled()
    assert identity.device_id == DEVICE and identity.client_certificate and identity.server_ca
    for path in (identity.client_key_file, identity.client_cert_file, identity.fleet_ca_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    cert = x509.load_pem_x509_certificate(identity.client_cert_file.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEVICE
    assert cert.issuer == tls_fleet.fleet_ca.certificate.subject
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    expiry = client_certificate_expiry(tls_fleet.agent.data_dir)
    assert expiry == cert.not_valid_after_utc
    days = (expiry - datetime.datetime.now(datetime.timezone.utc)).days
    assert 88 <= days <= 90, days  # fleet_ca.validity_days' default
    assert identity.server_ca_file.read_bytes() == tls_fleet.server_ca.cert_file.read_bytes()
    # The token was not used up by the refused try with the wrong CA: it enrolled this device.
    (token,) = tls_fleet.api.get("/v1/enrollment-tokens").json()["tokens"]
    assert (token["state"], token["used_by"]) == ("used", DEVICE)


def test_telemetry_and_presence_flow_over_the_tls_listener(tls_fleet: TlsFleet) -> None:
    def seen() -> bool:
        device = tls_fleet.api.get(f"/v1/devices/{DEVICE}").json()
        return bool(device.get("online")) and device.get("telemetry") is not None

    wait_for(seen, 30, "the device's presence and telemetry over MQTT/TLS")
    log = tls_fleet.broker.log_text()
    assert f"on port {tls_fleet.broker_tls_port}" in log and f"as {DEVICE} (" in log, log


def test_a_model_pushed_and_assigned_downloads_over_mtls_and_serves(
    tls_fleet: TlsFleet, model_packages: dict[str, Path]
) -> None:
    pushed = tls_fleet.ok("models", "push", model_packages["digits:1"])
    assert "digits" in pushed
    tls_fleet.ok("models", "assign", "digits", "1", "--selector", "site=lab")

    def converged() -> bool:
        state = tls_fleet.api.get(f"/v1/devices/{DEVICE}/state").json()
        models = {m["name"]: m for m in state["models"]}
        return bool(state["converged"]) and models.get("digits", {}).get("state") == "ACTIVE"

    wait_for(converged, CONVERGE_S, "the device to download and activate digits v1 (desired state over MQTT/TLS)")
    x = digits_input(3, seed=7)
    with tls_fleet.agent.client() as client:
        reply = client.infer("digits", {"pixels": x})
    np.testing.assert_allclose(
        reply.outputs["probabilities"], expected_output(model_packages["digits:1"], x), rtol=1e-5, atol=1e-6
    )
    assert events(tls_fleet.agent.proc, "uplink.started", tls=True, client_certificate=True)


def test_results_upload_over_mtls(tls_fleet: TlsFleet) -> None:
    def uploaded() -> list[object]:
        results: list[object] = tls_fleet.api.get("/v1/results", params={"device_id": DEVICE}).json()["results"]
        return results

    assert wait_for(uploaded, 30, "the device's results to arrive over the mTLS uplink")


def _mqtt_attempt(fleet: TlsFleet, cert: Path, key: Path) -> dict[str, str]:
    """A client with this certificate at the broker's TLS listener: what paho reports."""
    client = Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id="intruder", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.tls_set(
        ca_certs=str(fleet.server_ca.cert_file), certfile=str(cert), keyfile=str(key), cert_reqs=ssl.CERT_REQUIRED
    )
    outcome: dict[str, str] = {}

    def connected(_c: Client, _u: object, _f: object, reason: object, _p: object) -> None:
        outcome.setdefault("connected", str(reason))

    def disconnected(_c: Client, _u: object, _f: object, reason: object, _p: object) -> None:
        outcome.setdefault("disconnected", str(reason))

    client.on_connect = connected
    client.on_disconnect = disconnected
    try:
        client.connect("127.0.0.1", fleet.broker_tls_port, 5)
        wait_for(lambda: client.loop(0.05) != 0 or outcome, 10, "the broker to answer")
    except (OSError, ssl.SSLError) as exc:
        outcome["error"] = repr(exc)
    finally:
        client.disconnect()
    return outcome


@pytest.mark.parametrize("kind", ["other-ca", "expired"])
def test_the_broker_refuses_a_certificate_of_another_ca_or_an_expired_one(tls_fleet: TlsFleet, kind: str) -> None:
    pki = tls_fleet.pki
    if kind == "expired":
        cert, key = pki.client(tls_fleet.fleet_ca, DEVICE, name="expired", expired=True)
    else:
        cert, key = pki.client(tls_fleet.other_ca, DEVICE, name="foreign")
    outcome = _mqtt_attempt(tls_fleet, cert, key)
    assert "connected" not in outcome, outcome
    wait_for(
        lambda: "certificate verify failed" in tls_fleet.broker.log_text(),
        10,
        "the broker to log why it refused the certificate",
    )


REPORT_METHOD = "/edgefleet.v1.Control/Report"


def _report_with(fleet: TlsFleet, cert: Path | None, key: Path | None) -> grpc.RpcError:
    """A Control/Report call (an empty report) with the device's token and this client certificate."""
    credentials = grpc.ssl_channel_credentials(
        fleet.server_ca.cert_file.read_bytes(),
        key.read_bytes() if key else None,
        cert.read_bytes() if cert else None,
    )
    with grpc.secure_channel(fleet.grpc_target, credentials) as channel:
        call = channel.unary_unary(REPORT_METHOD)
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", metadata=(("authorization", f"Bearer {fleet.agent.token}"),), timeout=10)
    return refused.value


def test_the_device_port_answers_a_call_with_the_issued_certificate(tls_fleet: TlsFleet) -> None:
    identity = tls_fleet.agent.enrolled()
    error = _report_with(tls_fleet, identity.client_cert_file, identity.client_key_file)
    # Through TLS and the token check: the empty report itself is what is refused.
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())


@pytest.mark.parametrize("kind", ["none", "other-ca", "expired"])
def test_the_device_port_refuses_a_missing_foreign_or_expired_client_certificate(
    tls_fleet: TlsFleet, kind: str
) -> None:
    pki = tls_fleet.pki
    cert: Path | None = None
    key: Path | None = None
    if kind == "expired":
        cert, key = pki.client(tls_fleet.fleet_ca, DEVICE, name="grpc-expired", expired=True)
    elif kind == "other-ca":
        cert, key = pki.client(tls_fleet.other_ca, DEVICE, name="grpc-foreign")
    error = _report_with(tls_fleet, cert, key)
    # Even with the device's valid token: without a certificate of the fleet no call gets through.
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())


def _telemetry_seq(fleet: TlsFleet) -> int:
    return int(fleet.api.get(f"/v1/devices/{DEVICE}").json()["telemetry"]["seq"])


def test_z_a_revoked_device_with_a_valid_certificate_gets_nothing_through_the_broker(tls_fleet: TlsFleet) -> None:
    # Last: it ends the device's membership. Its certificate stays valid until it expires, and the broker never
    # asks a device known by its certificate for a password: a merely disabled account let it reconnect a second
    # later and go on publishing telemetry the cloud stored. Its broker account and role are deleted now.
    first = _telemetry_seq(tls_fleet)
    wait_for(lambda: _telemetry_seq(tls_fleet) > first, 10, "telemetry (every 0.5 s) before the revocation")
    log_size = len(tls_fleet.broker.log_text())
    tls_fleet.ok("devices", "revoke", DEVICE)
    wait_for(
        lambda: f"as {DEVICE} (" in tls_fleet.broker.log_text()[log_size:].split("deleteRole", 1)[-1],
        30,
        "the revoked device (its certificate still valid) to reconnect after its role was deleted",
    )
    last = _telemetry_seq(tls_fleet)
    with pytest.raises(AssertionError, match="timed out"):
        wait_for(lambda: _telemetry_seq(tls_fleet) > last, 3, "telemetry from the revoked device")
