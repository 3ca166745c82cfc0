"""toolchains: what curl, wget, pip, git, requests and the model SDKs really do under every deny mode (scenario.py)."""
