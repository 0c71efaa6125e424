"""The engine: ``generate`` in named steps, the controller every face drives, results and their traces,
schedulers, attention maps, previews and the runners that carry work off the caller's thread.

It stands on loading/, methods/ and structure/; it never imports views or widgets.
"""
