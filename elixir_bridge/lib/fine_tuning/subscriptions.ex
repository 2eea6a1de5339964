defmodule FineTuning.Subscriptions do
  @moduledoc false
  # Who receives which job's events: pure bookkeeping for FineTuning.Worker, no messages sent.
  #
  # The worker emits `queued` (and, for a fast job, more) before it replies to `submit`, so a
  # job's first events can name a job id we have not seen yet. While a submit is pending such
  # events are held, and handed back in order when the reply names their job.

  alias FineTuning.Protocol

  defstruct jobs: %{}, held: %{}, finished: %{}, finished_order: :queue.new(), keep: 256

  @type t :: %__MODULE__{
          jobs: %{String.t() => [pid()]},
          held: %{String.t() => [Protocol.event()]},
          finished: %{String.t() => Protocol.event()},
          finished_order: :queue.queue(String.t()),
          keep: non_neg_integer()
        }

  @doc "Empty bookkeeping that remembers the terminal events of the last `keep` jobs."
  @spec new(non_neg_integer()) :: t()
  def new(keep \\ 256), do: %__MODULE__{keep: keep}

  @doc """
  A submit named `job_id`: register its subscriber (`nil`: none, the events go nowhere);
  returns the held events, oldest first.
  """
  @spec job_submitted(t(), String.t(), pid() | nil) :: {[Protocol.event()], t()}
  def job_submitted(subs, job_id, subscriber) do
    {held, rest} = Map.pop(subs.held, job_id, [])
    pids = if subscriber, do: [subscriber], else: []
    {Enum.reverse(held), %{subs | jobs: Map.put(subs.jobs, job_id, pids), held: rest}}
  end

  @doc """
  Where an event goes: `{:deliver, pids, subs}` for a known job (which ends with a terminal
  event), `{:held, subs}` when `hold?` (a submit is pending), else `{:unknown, subs}`.
  """
  @spec route(t(), Protocol.event(), boolean()) ::
          {:deliver, [pid()], t()} | {:held, t()} | {:unknown, t()}
  def route(subs, {:fine_tuning, job_id, type, _} = event, hold?) do
    case subs.jobs do
      %{^job_id => pids} ->
        subs = if Protocol.terminal?(type), do: finish(subs, job_id, event), else: subs
        {:deliver, pids, subs}

      _ when hold? ->
        {:held, %{subs | held: Map.update(subs.held, job_id, [event], &[event | &1])}}

      _ ->
        {:unknown, subs}
    end
  end

  @doc "Forget held events (no submit is pending any more); returns the jobs they named."
  @spec drop_held(t()) :: {[String.t()], t()}
  def drop_held(subs), do: {Map.keys(subs.held), %{subs | held: %{}}}

  @doc "Add `pid` to a running job's subscribers; a finished job answers with its terminal event."
  @spec subscribe(t(), String.t(), pid()) ::
          {{:ok, :added | :already | {:finished, Protocol.event()}} | {:error, :not_found}, t()}
  def subscribe(subs, job_id, pid) do
    case subs do
      %{jobs: %{^job_id => pids}} ->
        if pid in pids,
          do: {{:ok, :already}, subs},
          else: {{:ok, :added}, put_in(subs.jobs[job_id], pids ++ [pid])}

      %{finished: %{^job_id => event}} ->
        {{:ok, {:finished, event}}, subs}

      _ ->
        {{:error, :not_found}, subs}
    end
  end

  @doc "Remove `pid` from a job's subscribers."
  @spec unsubscribe(t(), String.t(), pid()) :: t()
  def unsubscribe(subs, job_id, pid) do
    case subs.jobs do
      %{^job_id => pids} -> put_in(subs.jobs[job_id], List.delete(pids, pid))
      _ -> subs
    end
  end

  @doc "Jobs that have not ended, with their subscribers."
  @spec unfinished(t()) :: [{String.t(), [pid()]}]
  def unfinished(subs), do: Map.to_list(subs.jobs)

  defp finish(subs, job_id, event) do
    order = :queue.in(job_id, subs.finished_order)
    finished = Map.put(subs.finished, job_id, event)

    {finished, order} =
      if :queue.len(order) > subs.keep do
        {{:value, old}, order} = :queue.out(order)
        {Map.delete(finished, old), order}
      else
        {finished, order}
      end

    %{subs | jobs: Map.delete(subs.jobs, job_id), finished: finished, finished_order: order}
  end
end
