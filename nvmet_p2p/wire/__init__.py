"""Wire formats of NVMe and NVMe over Fabrics: bytes in, values out, and back.

`status` holds the status codes, `command` the queue entries, SGLs and fabrics
commands, `identify` the Identify data structures, `log` the log pages (including
the discovery log).  Nothing in this package does I/O.
"""
