"""The core that knows no front door: jobs, cancel tokens, the scheduler, and the runtime's interfaces.

The interfaces (``runtime_view.py``) are how the scheduler and the front doors see the worker supervisor.
"""
