# Tests tagged :pending_python need parts of the Python worker that have not landed yet.
ExUnit.start(exclude: [:pending_python], capture_log: true)
