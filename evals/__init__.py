"""The evaluators: one module per protocol (``knn``, ``linear``, ``detection``), each a pure
function ``evaluate(checkpoint, cfg) -> metrics``, registered by its ``configs/eval/<name>.yaml``
(``module``, ``headline``, settings). ``common`` holds what they share; ``cli`` is
``launch/evaluate.py``. Only the process that runs an evaluation imports its module."""
