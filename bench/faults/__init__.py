"""The fault campaign: fuzz, flood and soak a daemon through MQTT (docs/reliability.md)."""
