"""Stand-ins for the outside world on loopback, for tests, benchmarks and scenarios.

`upstream.UpstreamServer` plays api.anthropic.com, package mirrors and any other upstream a
sandbox reaches through the gateway. Nothing here runs in production: the gateway itself never
imports this package.
"""
