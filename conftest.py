"""Root pytest configuration: ``sharpscope/__main__.py`` is not collected for doctests (importing it runs the
command line)."""
collect_ignore = ["sharpscope/__main__.py"]
