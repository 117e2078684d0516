"""Views over the kit's DataFrames: ipywidgets + matplotlib. They never run an engine."""
