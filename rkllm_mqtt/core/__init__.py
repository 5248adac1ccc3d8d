"""The core that knows no front door: jobs, cancel tokens, the scheduler and how each sees the runtime."""
