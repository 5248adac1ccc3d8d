"""rkllm-mqtt: an MQTT bridge for Rockchip's RKLLM runtime."""

__all__ = ["__version__"]

__version__ = "0.1.0"
