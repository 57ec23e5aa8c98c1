"""Engine replicas on Ray Serve (`amber serve --ray`): the same API in front of several engines.

`wire.py` is what crosses between processes, `replica.py` the engine side, `remote.py` the API
side's stand-in for a local engine, `app.py` the Ray Serve application and its launch.
Nothing here is imported by a plain `amber serve`; Ray is an optional dependency (`.[ray]`).
"""
