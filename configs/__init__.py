"""The presets: one file per preset, each with a `get_config()` returning a switchjax Config.

`--config=NAME` (and `switchjax.load_config("NAME")`) loads NAME.py here. setup.py installs this
directory as the package `switchjax.configs`, so the presets come with every install of
switchjax; a new preset is a new file here. Names starting with "_" are not presets.
"""
