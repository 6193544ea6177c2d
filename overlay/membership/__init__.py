"""Membership between agents: SWIM failure detection and anti-entropy of node records.

`swim` is the protocol as pure data and decisions (no I/O, time passed in),
`effective` merges etcd's view with gossip for the data plane, `service` is
the gRPC shell, `tls` loads the mutual-TLS credentials.
"""
