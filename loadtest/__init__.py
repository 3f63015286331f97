"""``cnn-loadtest``: closed- and open-loop gRPC load tests with honest tail latencies.

Importing the package does no work; ``python -m loadtest --help`` lists the options.
"""
