"""``google.colab.output``: the one call the notebooks make, recorded so a test can check it was made."""

custom_widget_manager_enabled = False


def enable_custom_widget_manager() -> None:
    """On Colab this lets third-party widgets (ipywidgets 7 from PyPI) render; here it only records the call."""
    global custom_widget_manager_enabled
    custom_widget_manager_enabled = True


def disable_custom_widget_manager() -> None:
    global custom_widget_manager_enabled
    custom_widget_manager_enabled = False
