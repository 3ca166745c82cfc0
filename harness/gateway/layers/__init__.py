"""The protocol layers of one sandbox connection, one module each, in the spirit of mitmproxy's.

http1      the HTTP/1 server side: request heads, their limits, the keep-alive loop
request    one request the gateway sees: its destination, the policy, forwarding
connect    CONNECT: target checks, policy, a blind tunnel or interception
intercept  a tunnel the gateway must see into: TLS with a CA leaf, or plain HTTP inside
answers    what the gateway says in the upstream's place: denies and http_status toxics

session.py stacks them. No two import each other: http1 returns a CONNECT to session.py instead
of calling connect, so intercept can serve http1 inside a tunnel.
"""
