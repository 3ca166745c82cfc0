"""isolation: can an agent in the sandbox steal keys or reach what it must not? (scenario.py)"""
