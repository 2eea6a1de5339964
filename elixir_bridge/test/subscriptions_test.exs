defmodule FineTuning.SubscriptionsTest do
  use ExUnit.Case, async: true

  alias FineTuning.Subscriptions

  defp ev(job, type, payload \\ %{}), do: {:fine_tuning, job, type, payload}

  test "events of a known job go to its subscribers; the terminal one ends the job" do
    a = self()
    b = spawn(fn -> :ok end)
    {[], s} = Subscriptions.job_submitted(Subscriptions.new(), "j1", a)
    assert {{:ok, :added}, s} = Subscriptions.subscribe(s, "j1", b)
    assert {{:ok, :already}, s} = Subscriptions.subscribe(s, "j1", a)

    assert {:deliver, [^a, ^b], s} = Subscriptions.route(s, ev("j1", :progress), false)
    s = Subscriptions.unsubscribe(s, "j1", b)
    assert {:deliver, [^a], s} = Subscriptions.route(s, ev("j1", :completed), false)

    assert Subscriptions.unfinished(s) == []
    done = ev("j1", :completed)
    assert {{:ok, {:finished, ^done}}, _} = Subscriptions.subscribe(s, "j1", b)
    assert {:unknown, _} = Subscriptions.route(s, ev("j1", :log), false)
  end

  test "events that precede the submit reply are held, then handed back in order" do
    s = Subscriptions.new()
    assert {:held, s} = Subscriptions.route(s, ev("j1", :queued), true)
    assert {:held, s} = Subscriptions.route(s, ev("j1", :started), true)
    assert {:held, s} = Subscriptions.route(s, ev("j2", :queued), true)

    {held, s} = Subscriptions.job_submitted(s, "j1", self())
    assert held == [ev("j1", :queued), ev("j1", :started)]

    assert Subscriptions.unfinished(s) == [{"j1", [self()]}]
    assert {["j2"], s} = Subscriptions.drop_held(s)
    assert {[], _} = Subscriptions.drop_held(s)
    assert {:unknown, _} = Subscriptions.route(s, ev("j3", :queued), false)
    assert {{:error, :not_found}, _} = Subscriptions.subscribe(s, "j3", self())
  end

  test "only the last `keep` terminal events are remembered" do
    s =
      Enum.reduce(1..5, Subscriptions.new(2), fn i, s ->
        {[], s} = Subscriptions.job_submitted(s, "j#{i}", self())
        {:deliver, _, s} = Subscriptions.route(s, ev("j#{i}", :failed), false)
        s
      end)

    assert Map.keys(s.finished) |> Enum.sort() == ["j4", "j5"]
    assert {{:error, :not_found}, _} = Subscriptions.subscribe(s, "j1", self())
  end
end
