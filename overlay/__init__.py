"""A VXLAN overlay network for container clusters."""

__version__ = "0.1.0"
