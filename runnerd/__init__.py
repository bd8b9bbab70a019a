"""runnerd: the daemon that keeps the true record of every experiment run on a machine."""

__version__ = "0.1.0"
