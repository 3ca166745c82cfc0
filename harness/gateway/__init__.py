"""The egress gateway: a credential-injecting, policy-enforcing forward proxy.

Every sandbox reaches the outside world only through its own listener on this gateway, so the
gateway knows which sandbox is speaking by which listener accepted the connection, never by
anything the guest sends. See process.py for the harness-facing API and cli.py for the
stand-alone entry point.
"""
