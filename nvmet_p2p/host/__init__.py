"""A Python NVMe-oF host (initiator) for tests, fuzzing, the demo and benchmarks.

`base` speaks NVMe over any queue, `loop` connects to an in-process target through
the loop transport, `rdma` to a target over RDMA with pyverbs.
"""
