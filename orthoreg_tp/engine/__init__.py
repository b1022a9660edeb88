"""The recipes' experiment engine: configs, data, models, training loops, schedules, run records.

The toolbox (``orthoreg_tp``) never imports this package; the recipes and the command-line tool do.
"""
