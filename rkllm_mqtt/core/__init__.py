"""The core that knows no front door: jobs, cancel tokens and the scheduler."""
