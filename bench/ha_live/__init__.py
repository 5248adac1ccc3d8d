"""The Home Assistant examples of docs/home-assistant.md, executed in a real Home Assistant (see run.py)."""
