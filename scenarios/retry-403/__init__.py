"""retry-403: how long agents keep hammering a blocked domain, and which gateway answer ends it (scenario.py)."""
