"""The Ollama-compatible HTTP API: Home Assistant's Ollama integration (Assist) and Ollama clients on the NPU."""
