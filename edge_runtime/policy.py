"""Scaling policies from the cloud: a JSON document of the config's policy sections, parsed into an effective policy.

Pure: parsing, overlaying and comparing policies. Applying one to a running agent is `Agent.apply_policy`'s job.
The types and the parser live in edgefleet/policy.py, which the cloud shares to validate policies on the way
in; here they raise the device's ConfigError.
"""

from __future__ import annotations

from edge_runtime.errors import ConfigError
from edgefleet import policy as _shared
from edgefleet.policy import MAX_POLICY_BYTES, POLICY_SECTIONS, EffectivePolicy, PolicyChange

__all__ = ["MAX_POLICY_BYTES", "POLICY_SECTIONS", "EffectivePolicy", "PolicyChange", "parse_policy"]


def parse_policy(document: str | bytes, base: EffectivePolicy) -> EffectivePolicy:
    """The effective policy a document (DesiredState.policy_json) asks for, over `base` (the config file's).

    The document is a JSON object of policy sections, each an object of that section's keys, e.g.
    `{"inference": {"max_batch_size": 8}, "telemetry": {"interval_s": 5}}`. A key it leaves out keeps the
    base's value; an empty document means the base itself. Each section is checked by the same loader as the
    TOML config (types, bounds, cross-field rules), so a ConfigError names the key (`inference.max_batch_sze`).
    """
    return _shared.parse_policy(document, base, ConfigError)
