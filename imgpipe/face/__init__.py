"""The face: the CLI, the Python API, the stack runner and the worker launchers.

The only subpackage that imports every layer (``orchestrator``, ``workers``, ``db``);
the kernel modules next to it (``imgpipe/*.py``) import nothing above themselves.
"""
