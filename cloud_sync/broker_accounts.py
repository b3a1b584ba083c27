"""Device accounts on the MQTT broker, kept by cloud-sync: made at enrollment, disabled at revocation.

`[mqtt] manage_accounts = "mosquitto-dynsec"` drives Mosquitto's dynamic security plugin over MQTT (JSON
commands on `$CONTROL/dynamic-security/v1`, answers on `.../response`): each enrolled device gets a client
(username = its device id, password = its device token) and a role that lets it publish only its own
telemetry, status and reported state and subscribe only to its own desired state (the same grants as the
static acl_file, cloud_sync/telemetry/acl.py). Revoking disables the client, which also disconnects it.
Other brokers (EMQX, HiveMQ, VerneMQ) authenticate against an HTTP hook or a database instead; see
docs/mqtt.md. Not the telemetry subscriber, nor the device registry (the truth: accounts follow it).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import structlog
from paho.mqtt.client import Client, MQTTMessage

from cloud_sync.errors import InvalidArgument, StoreUnavailable
from cloud_sync.mqtt_client import broker_address, mqtt_client, read_password
from cloud_sync.store.devices import check_device_id, is_reserved
from cloud_sync.telemetry.acl import DEVICE_READS, DEVICE_WRITES

__all__ = ["CLOUD_ROLE", "DynsecAccounts", "cloud_acls", "device_acls", "device_role"]

log = structlog.get_logger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
COMMAND_TIMEOUT_S = 10.0
# Answers the plugin gives for what is there already or gone already: fine for idempotent commands.
_EXISTS = ("already exists",)
_MISSING = ("not found",)
_INTERNAL = ("internal error",)


def device_role(device_id: str) -> str:
    """The dynamic-security role of one device (role names are apart from client names)."""
    return f"edgefleet-device-{device_id}"


def device_acls(device_id: str, prefix: str) -> list[dict[str, Any]]:
    """What a device may do: publish its own telemetry, status and reported state; read its desired state."""
    base = f"{prefix}/devices/{device_id}"
    return [
        *({"acltype": "publishClientSend", "topic": f"{base}/{kind}", "allow": True} for kind in DEVICE_WRITES),
        *({"acltype": "subscribeLiteral", "topic": f"{base}/{kind}", "allow": True} for kind in DEVICE_READS),
    ]


# The role of cloud-sync's own broker user: without it a user made by `mosquitto_ctrl dynsec init` administers
# accounts but may not publish one desired state (the broker drops the publish, found by tests/fleet).
CLOUD_ROLE = "edgefleet-cloud-sync"


def cloud_acls(prefix: str) -> list[dict[str, Any]]:
    """What cloud-sync may do (the acl_file's `user cloud-sync`): read what devices publish, publish desired."""
    base = f"{prefix}/devices/+"
    return [
        *({"acltype": "subscribePattern", "topic": f"{base}/{kind}", "allow": True} for kind in DEVICE_WRITES),
        *({"acltype": "publishClientSend", "topic": f"{base}/{kind}", "allow": True} for kind in DEVICE_READS),
    ]


def _check_device(device_id: str) -> str:
    check_device_id(device_id)  # no wildcards, "/" or spaces: the id goes into topics
    if is_reserved(device_id):
        raise InvalidArgument(f"device id {device_id!r} is reserved for cloud-sync's broker identities")
    return device_id


class DynsecAccounts:
    """Device accounts through Mosquitto's dynamic security plugin. Thread-safe; blocking (call off the loop)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        username: str | None,
        password: str | None,
        client_id: str,
        timeout_s: float = COMMAND_TIMEOUT_S,
    ) -> None:
        self._address = broker_address(url)
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._pending: dict[str, Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt_client(
            self._address, client_id, username=username, password=password, reconnect_delay=(1, 30)
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    @classmethod
    def from_config(cls, mqtt: Any, client_id: str) -> DynsecAccounts:
        """From cloud-sync's [mqtt] section (reads the password file: call off the loop)."""
        username = mqtt.accounts_username or mqtt.username or None
        password_file = mqtt.accounts_password_file or mqtt.password_file
        password = read_password(password_file, "mqtt.accounts_password_file")
        return cls(mqtt.url, prefix=mqtt.topic_prefix, username=username, password=password, client_id=client_id)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (paho's thread reconnects after a loss). Returns at once; commands wait for the connection."""
        self._client.connect_async(self._address.host, self._address.port, keepalive=30)
        self._client.loop_start()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.cancel()

    # -- accounts -----------------------------------------------------------------------------------------

    def create(self, device_id: str, device_token: str) -> None:
        """The device's role and client (username = device id, password = token); idempotent."""
        _check_device(device_id)
        role = device_role(device_id)
        self._run(
            {"command": "createRole", "rolename": role, "acls": device_acls(device_id, self._prefix)},
            ok=_EXISTS,
        )
        # A client of that name left by an earlier attempt is replaced (the plugin answers "Internal error" to
        # adding a role a client has already, so it is not patched in place).
        self._run({"command": "deleteClient", "username": device_id}, ok=_MISSING)
        self._run(
            {"command": "createClient", "username": device_id, "password": device_token, "roles": [{"rolename": role}]}
        )
        log.info("broker_accounts.created", device=device_id)

    def disable(self, device_id: str) -> None:
        """The device cannot log in any more, and is disconnected if it is connected; idempotent."""
        _check_device(device_id)
        self._run({"command": "disableClient", "username": device_id}, ok=_MISSING)
        log.info("broker_accounts.disabled", device=device_id)

    def delete(self, device_id: str) -> None:
        """The device's client and role gone (an enrollment that did not commit); idempotent."""
        _check_device(device_id)
        self._run({"command": "deleteClient", "username": device_id}, ok=_MISSING)
        self._run({"command": "deleteRole", "rolename": device_role(device_id)}, ok=_MISSING)

    def grant_cloud_sync(self, usernames: Iterable[str]) -> None:
        """Give cloud-sync's own broker users CLOUD_ROLE (made if missing); idempotent."""
        self._run({"command": "createRole", "rolename": CLOUD_ROLE, "acls": cloud_acls(self._prefix)}, ok=_EXISTS)
        for username in usernames:
            if not self._has_role(username, CLOUD_ROLE):
                # Mosquitto 2.0.11 adds the role, disconnects the user's clients (this one too, when the user
                # is the same) and may answer "Internal error": what counts is the role being there after.
                self._run({"command": "addClientRole", "username": username, "rolename": CLOUD_ROLE}, ok=_INTERNAL)
                if not self._has_role(username, CLOUD_ROLE):
                    raise StoreUnavailable(f"the broker did not give {username!r} the role {CLOUD_ROLE}")
            log.info("broker_accounts.cloud_role", user=username, role=CLOUD_ROLE)

    def _has_role(self, username: str, role: str) -> bool:
        found = self._run({"command": "getClient", "username": username})
        roles = (found.get("data") or {}).get("client", {}).get("roles", [])
        return any(isinstance(r, dict) and r.get("rolename") == role for r in roles)

    def disable_all(self, device_ids: Iterable[str]) -> int:
        """Disable each of `device_ids` (the revoked devices, at start: a revocation the broker missed)."""
        count = 0
        for device_id in device_ids:
            self.disable(device_id)
            count += 1
        return count

    # -- the command channel --------------------------------------------------------------------------------

    def _run(self, command: dict[str, Any], ok: tuple[str, ...] = ()) -> dict[str, Any]:
        """Send one command and wait for its answer; an error answer not in `ok` raises StoreUnavailable (the
        broker holds the accounts: like the database, it can be away, and the caller may retry; an enrollment
        token stays unused)."""
        if not self._subscribed.wait(self._timeout_s):
            raise StoreUnavailable(
                f"the MQTT broker at {self._address.host}:{self._address.port} is not reachable for account "
                f"commands (waited {self._timeout_s:.0f} s): check the broker and mqtt.accounts_username; retry"
            )
        correlation = secrets.token_hex(8)
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            self._pending[correlation] = future
        try:
            payload = json.dumps({"commands": [{**command, "correlationData": correlation}]})
            self._client.publish(CONTROL_TOPIC, payload, qos=1)
            try:
                answer = future.result(self._timeout_s)
            except FutureTimeout:
                raise StoreUnavailable(
                    f"the MQTT broker did not answer {command['command']} within {self._timeout_s:.0f} s: is the "
                    "dynamic security plugin loaded, and may mqtt.accounts_username use it? retry"
                ) from None
        finally:
            with self._lock:
                self._pending.pop(correlation, None)
        error = str(answer.get("error") or "")
        if error and not any(word in error.lower() for word in ok):
            raise StoreUnavailable(f"the broker refused {command['command']}: {error}")
        return answer

    def _on_connect(self, client: Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        if reason.is_failure:
            log.warning("broker_accounts.connect_refused", reason=str(reason))
            return
        client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_subscribe(self, _c: Client, _u: object, _mid: int, codes: list[Any], _p: object) -> None:
        if all(not code.is_failure for code in codes):
            self._subscribed.set()
        else:
            log.error("broker_accounts.subscribe_refused", topic=RESPONSE_TOPIC, codes=[str(c) for c in codes])

    def _on_disconnect(self, _c: Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        self._subscribed.clear()

    def _on_message(self, _c: Client, _u: object, message: MQTTMessage) -> None:
        try:
            answers = json.loads(message.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            return
        for answer in answers if isinstance(answers, list) else ():
            correlation = answer.get("correlationData") if isinstance(answer, dict) else None
            with self._lock:
                future = self._pending.get(correlation) if isinstance(correlation, str) else None
            if future is not None and not future.done():
                future.set_result(answer)
