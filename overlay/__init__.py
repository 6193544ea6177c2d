"""A VXLAN overlay network for container clusters.

Kept empty on purpose: the CNI executable imports `overlay.cni.client` on
every pod start, and anything imported here would be paid for each time.
"""

__version__ = "0.1.0"
