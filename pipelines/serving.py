"""Where models published before the serving code moved to ``storage/`` find ``MergedModel``.

A model logged as code keeps its own copy of the serving file; a text model's copy runs
``from pipelines.serving import MergedModel``. This name keeps those registered versions
loadable; new models are logged from :mod:`storage.serving`.
"""

from storage.serving import MergedModel

__all__ = ["MergedModel"]
