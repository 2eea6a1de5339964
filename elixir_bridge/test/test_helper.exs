# Tests tagged :pending_python need parts of the Python worker that have not landed yet.
# The workers these tests start import the training stack only when a job needs it (most never
# train; dozens of background imports would share the cores with the tests). Users get the
# warm-up by default (docs/elixir.md, "Start-up").
if System.get_env("FINETUNE_WORKER_WARM") in [nil, ""],
  do: System.put_env("FINETUNE_WORKER_WARM", "0")

ExUnit.start(exclude: [:pending_python], capture_log: true)
