"""Topic names of the MQTT API, in one place for the daemon and agent-ctl, with the chunk grammar.

A deployment's chunks go under the topic its manifest came on:
``<deploy topic>/<deployment_id>/chunk/<i>``, with ``<deploy topic>`` a device's or a group's.
"""

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
        return group_deploy(self.prefix, group)


def group_deploy(prefix: str, group: str) -> str:
    """Where a group's desired model is retained: ``<prefix>/groups/<group>/deploy``."""
    return f"{prefix}/groups/{group}/deploy"


def chunk_topic(deploy_topic: str, deployment_id: str, index: int) -> str:
    """Chunk ``index`` of a deployment, under the deploy topic its manifest came on."""
    return f"{deploy_topic}/{deployment_id}/chunk/{index}"


def chunk_filter(deploy_topic: str) -> str:
    """The subscription that takes every deployment's chunks under ``deploy_topic``."""
    return f"{deploy_topic}/+/chunk/+"


@dataclass(frozen=True)
class DeployMessage:
    """What a topic under a deploy topic is: the manifest itself (``deployment_id`` None) or one chunk."""

    deploy_topic: str
    deployment_id: str | None = None
    chunk: int | None = None


def parse_deploy_topic(topic: str, deploy_topics: tuple[str, ...]) -> DeployMessage | None:
    """``topic`` as a manifest or a chunk under one of ``deploy_topics``; None for anything else."""
    for base in deploy_topics:
        if topic == base:
            return DeployMessage(base)
        if topic.startswith(base + "/"):
            parts = topic[len(base) + 1:].split("/")  # id, "chunk", i
            if len(parts) == 3 and parts[1] == "chunk" and parts[2].isdigit() and parts[0]:
                return DeployMessage(base, parts[0], int(parts[2]))
            return None
    return None


def device_of(topic: str, prefix: str) -> str | None:
    """The device id in ``<prefix>/<device>/...``, or None for other topics."""
    parts = topic.split("/")
    head = prefix.split("/")
    if len(parts) <= len(head) + 1 or parts[: len(head)] != head or parts[len(head)] == "groups":
        return None
    return parts[len(head)]
