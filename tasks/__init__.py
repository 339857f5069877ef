"""Pipeline steps: pure functions first, one thin `run(params, paths)` per stage doing the I/O."""
