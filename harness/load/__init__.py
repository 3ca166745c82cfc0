"""Proxy latency under load: Locust (in its own processes) through the gateway, beside a direct
path and real peer proxies. Entry point: harness.load.bench.run_proxy_bench.

Nothing in this package imports locust except locustfile.py, which only Locust processes load:
locust monkey-patches the process with gevent on import.
"""
