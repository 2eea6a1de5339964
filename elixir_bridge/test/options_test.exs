defmodule FineTuning.OptionsTest do
  # Not async: one test sets FINETUNE_WORKER in the OS environment.
  use ExUnit.Case, async: false

  alias FineTuning.Options
  import FineTuning.TestHelpers

  test "defaults" do
    opts = Options.validate!([])
    assert opts.executable == Options.default_executable()
    assert opts.args == []
    assert opts.env == []
    assert opts.cd == nil
    assert opts.call_timeout == 30_000
    assert opts.startup_timeout == 60_000
    assert opts.shutdown_grace == 12_000
  end

  test "the default executable is this repo's .venv/bin/finetune-worker, or $FINETUNE_WORKER" do
    previous = System.get_env("FINETUNE_WORKER")
    System.delete_env("FINETUNE_WORKER")
    assert Options.default_executable() == worker_executable()

    System.put_env("FINETUNE_WORKER", "/opt/fw/bin/finetune-worker")

    try do
      assert Options.validate!([]).executable == "/opt/fw/bin/finetune-worker"
    after
      if previous,
        do: System.put_env("FINETUNE_WORKER", previous),
        else: System.delete_env("FINETUNE_WORKER")
    end
  end

  test "env accepts a map or pairs, with nil to unset" do
    assert Options.validate!(env: %{"CUDA_VISIBLE_DEVICES" => "1"}).env ==
             [{~c"CUDA_VISIBLE_DEVICES", ~c"1"}]

    assert Options.validate!(env: [{"A", "x"}, {"B", nil}]).env == [
             {~c"A", ~c"x"},
             {~c"B", false}
           ]
  end

  test "valid values are kept" do
    opts =
      Options.validate!(
        executable: "/bin/true",
        args: ["--grace", "2"],
        cd: System.tmp_dir!(),
        name: {:global, :ft},
        call_timeout: :infinity,
        startup_timeout: 0,
        shutdown_grace: 100
      )

    assert opts.executable == "/bin/true"
    assert opts.args == ["--grace", "2"]
    assert opts.cd == Path.expand(System.tmp_dir!())
    assert opts.name == {:global, :ft}
    assert opts.call_timeout == :infinity
    assert opts.shutdown_grace == 100
  end

  for {opts, named} <- [
        {[bogus: 1], ":bogus"},
        {[executable: ""], ":executable"},
        {[executable: :fw], ":executable"},
        {[args: "--x"], ":args"},
        {[args: [~c"--x"]], ":args"},
        {[env: [{"A", 1}]], ":env"},
        {[env: [{"A=B", "1"}]], ":env"},
        {[env: "A=1"], ":env"},
        {[cd: "/no/such/dir"], ":cd"},
        {[cd: 42], ":cd"},
        {[stderr: "/no/such/dir/worker.log"], ":stderr"},
        {[stderr: ""], ":stderr"},
        {[name: "worker"], ":name"},
        {[call_timeout: -1], ":call_timeout"},
        {[call_timeout: 1.5], ":call_timeout"},
        {[startup_timeout: :infinity], ":startup_timeout"},
        {[shutdown_grace: "5s"], ":shutdown_grace"}
      ] do
    test "#{inspect(opts)} raises ArgumentError naming #{named}" do
      error = assert_raise ArgumentError, fn -> Options.validate!(unquote(opts)) end
      assert error.message =~ unquote(named)
    end
  end

  test "options must be a keyword list" do
    assert_raise ArgumentError, ~r/keyword list/, fn -> Options.validate!(%{name: :x}) end
  end

  test "start_link fails with the ArgumentError for a bad option" do
    assert {:error, {{%ArgumentError{message: message}, _stack}, _child}} =
             start_supervised({FineTuning.Worker, call_timeout: -5})

    assert message =~ ":call_timeout"
  end

  test "child_spec leaves the supervisor time for the shutdown grace" do
    spec = FineTuning.Worker.child_spec(name: :ft_a, shutdown_grace: 2_000)
    assert spec.id == :ft_a
    assert spec.shutdown == 7_000
    assert spec.start == {FineTuning.Worker, :start_link, [[name: :ft_a, shutdown_grace: 2_000]]}
  end
end
