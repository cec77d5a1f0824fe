"""Topic names of the MQTT API, in one place for the daemon and agent-ctl."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    prefix: str
    device: str

    def _t(self, leaf: str) -> str:
        return f"{self.prefix}/{self.device}/{leaf}"

    @property
    def status(self) -> str:
        return self._t("status")

    @property
    def predictions(self) -> str:
        return self._t("predictions")

    @property
    def health(self) -> str:
        return self._t("health")

    @property
    def events(self) -> str:
        return self._t("events")

    @property
    def deploy(self) -> str:
        return self._t("deploy")

    @property
    def cmd(self) -> str:
        return self._t("cmd")

    @property
    def cmd_response(self) -> str:
        return self._t("cmd/response")

    def group_deploy(self, group: str) -> str:
        return f"{self.prefix}/groups/{group}/deploy"


def device_of(topic: str, prefix: str) -> str | None:
    """The device id in ``<prefix>/<device>/...``, or None for other topics."""
    parts = topic.split("/")
    head = prefix.split("/")
    if len(parts) <= len(head) + 1 or parts[: len(head)] != head or parts[len(head)] == "groups":
        return None
    return parts[len(head)]
