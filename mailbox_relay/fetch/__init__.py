"""fetch and watch: one pass over one folder (rules.py), the fetch command (once.py), watch
(watch.py) and status (status.py), whatever source a folder comes from."""
