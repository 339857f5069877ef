"""The core library: pure functions and the contracts every stage stands on (no stage imports here)."""
