"""Scenario folders. Each folder is a package imported by harness/scenario/loader.py as
`scenarios.<folder name with - as _>`; see harness/scenario/__init__.py for what a folder holds."""
