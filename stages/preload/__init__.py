"""The fork server of the local driver's preloaded launcher: `python -m stages.preload`.

Imports what the run's CPU stages import, once, then forks a child per stage that becomes
`python -m stages.<kind> --spec FILE` (server.py: the loop; child.py: what the child sets up
before it runs the stage's module). Why and the wire format: contract/preload.py.
"""
