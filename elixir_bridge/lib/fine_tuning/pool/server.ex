defmodule FineTuning.Pool.Server do
  @moduledoc false
  # The pool's scheduler (see FineTuning.Pool for what it promises). One GenServer holds the
  # workers that joined, the jobs (queued by priority, then arrival), and which worker runs
  # which job. It submits a job to a worker with itself as the subscriber, relays the worker's
  # events to the job's subscribers under the pool's job id, and decides what an ending means:
  # a job whose worker died, or that was cancelled without anybody asking (its worker stopped),
  # or that yielded to a higher priority, goes back to the queue and resumes from its last
  # checkpoint on the next worker that fits.

  use GenServer
  require Logger

  alias FineTuning.Pool.Store
  alias FineTuning.Protocol

  @submit_timeout 60_000
  # A restarted job whose output folder is still locked by its previous worker (a process that
  # is still saving its checkpoint while it dies) is tried again after this long, a few times.
  @retry_ms 1_000
  @max_conflicts 30
  # How long a job that was running when the scheduler went down waits for its worker to join
  # again (and be adopted) before it is placed anew.
  @adopt_ms 5_000

  @compile {:no_warn_undefined, :telemetry}

  defstruct name: nil,
            store: nil,
            draining: false,
            workers: %{},
            jobs: %{},
            by_worker_job: %{},
            seq: 0,
            telemetry?: false

  def start_link(opts) do
    case Keyword.get(opts, :name) do
      nil -> GenServer.start_link(__MODULE__, opts)
      name -> GenServer.start_link(__MODULE__, opts, name: name)
    end
  end

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)

    case Store.open(Keyword.get(opts, :data_dir), Keyword.get(opts, :name, self())) do
      {:ok, store} ->
        state = %__MODULE__{
          name: Keyword.get(opts, :name),
          store: store,
          telemetry?: Code.ensure_loaded?(:telemetry)
        }

        {:ok, Enum.reduce(Store.load(store), state, &restore/2)}

      {:error, reason} ->
        {:stop, reason}
    end
  end

  # A job the store knew: finished ones are kept (for idempotent resubmission), the others
  # go back to the queue. A running one may still run on its worker (only this scheduler went
  # down): for @adopt_ms it waits for that worker to join again and is adopted (see join/3);
  # after that it is placed anew and resumes from its checkpoint.
  defp restore(record, state) do
    job = Map.merge(new_job_fields(), record)

    job =
      case job.state do
        :running ->
          %{
            job
            | state: :queued,
              restarts: job.restarts + 1,
              adopt: job.worker_job,
              not_before: now() + @adopt_ms
          }

        :queued ->
          job

        _ended ->
          job
      end

    job = %{job | worker_job: nil}
    if job.not_before, do: Process.send_after(self(), :dispatch, @adopt_ms + 10)

    %{state | jobs: Map.put(state.jobs, job.id, job), seq: max(state.seq, job.seq)}
  end

  defp new_job_fields do
    %{
      subscribers: MapSet.new(),
      worker: nil,
      worker_job: nil,
      preempting: false,
      preempted_for: nil,
      cancel_requested: false,
      step: nil,
      total_steps: nil,
      percent: nil,
      conflicts: 0,
      not_before: nil,
      adopt: nil
    }
  end

  # ---- calls ------------------------------------------------------------------------------------

  @impl true
  def handle_call({:pool_submit, config, subscriber, opts}, _from, state) do
    submit(state, config, subscriber, opts)
  end

  # FineTuning.submit/3 on a pool: a job with the default priority and needs.
  def handle_call({:submit, config, subscriber, _timeout}, _from, state) do
    submit(state, config, subscriber, [])
  end

  def handle_call({:subscribe, id, pid}, _from, state) do
    case Map.fetch(state.jobs, id) do
      :error ->
        {:reply, {:error, :not_found}, state}

      {:ok, %{terminal: terminal}} when terminal != nil ->
        {:reply, {:ok, {:finished, terminal}}, state}

      {:ok, job} ->
        reply = if MapSet.member?(job.subscribers, pid), do: :already, else: :added

        {:reply, {:ok, reply},
         put_job(state, %{job | subscribers: MapSet.put(job.subscribers, pid)})}
    end
  end

  def handle_call({:unsubscribe, id, pid}, _from, state) do
    case Map.fetch(state.jobs, id) do
      {:ok, job} ->
        {:reply, :ok, put_job(state, %{job | subscribers: MapSet.delete(job.subscribers, pid)})}

      :error ->
        {:reply, :ok, state}
    end
  end

  def handle_call({:call, :cancel, [id], _timeout}, _from, state), do: cancel(state, id)
  def handle_call({:call, :status, [id], _timeout}, _from, state), do: job_status(state, id)

  def handle_call({:call, :jobs, [], _timeout}, _from, state),
    do: {:reply, Enum.map(sorted_jobs(state), &job_map(state, &1)), state}

  # A GRPO job's reward answer goes to the worker that runs it, under that worker's job id.
  def handle_call({:call, :rewards, [id, request, rewards], timeout}, from, state) do
    case state.jobs[id] do
      %{state: :running, worker: pid, worker_job: wid} ->
        spawn(fn ->
          reply =
            try do
              GenServer.call(pid, {:call, :rewards, [wid, request, rewards], timeout}, :infinity)
            catch
              :exit, _ -> {:error, :not_found}
            end

          GenServer.reply(from, reply)
        end)

        {:noreply, state}

      _ ->
        {:reply, {:error, :not_found}, state}
    end
  end

  def handle_call({:call, function, _args, _timeout}, _from, state),
    do: {:reply, {:error, {:not_supported_by_pool, function}}, state}

  def handle_call(:status, _from, state), do: {:reply, pool_status(state), state}

  def handle_call({:drain, on?}, _from, state) do
    state = %{state | draining: on?}
    {:reply, :ok, if(on?, do: state, else: dispatch(state))}
  end

  def handle_call({:join, pid, meta}, _from, state) when is_pid(pid) do
    state = forget_worker(state, pid, :rejoined)
    worker = Map.merge(meta, %{pid: pid, ref: Process.monitor(pid), job: nil})
    Logger.info("FineTuning.Pool: worker #{inspect(pid)} joined from #{meta.node}")
    state = adopt(%{state | workers: Map.put(state.workers, pid, worker)}, pid)
    {:reply, :ok, dispatch(state)}
  end

  # A worker that joins may be running a job this scheduler's previous life placed there: take
  # it back (its events come here again) instead of starting it a second time.
  defp adopt(state, pid) do
    waiting =
      for {id, %{adopt: wid, state: :queued}} <- state.jobs, wid != nil, into: %{}, do: {wid, id}

    running =
      if waiting == %{} do
        []
      else
        try do
          GenServer.call(pid, {:call, :jobs, [], 10_000}, 11_000)
        catch
          :exit, _ -> []
        end
      end

    running
    |> List.wrap()
    |> Enum.filter(
      &(is_map(&1) and &1[:state] in ["queued", "running"] and Map.has_key?(waiting, &1[:job_id]))
    )
    |> Enum.reduce(state, fn %{job_id: wid}, state ->
      job = state.jobs[waiting[wid]]
      # One that ended meanwhile: its terminal event is handled as if it had just come.
      with {:ok, {:finished, event}} <- FineTuning.subscribe(pid, wid, self()),
           do: send(self(), event)

      job = %{
        job
        | state: :running,
          worker: pid,
          worker_job: wid,
          adopt: nil,
          not_before: nil,
          restarts: job.restarts - 1
      }

      worker = %{state.workers[pid] | job: job.id}

      state = %{
        state
        | workers: Map.put(state.workers, pid, worker),
          by_worker_job: Map.put(state.by_worker_job, wid, job.id)
      }

      store(put_job(state, job), job)
    end)
  end

  defp submit(state, config, subscriber, opts) do
    key = Keyword.get(opts, :key)

    cond do
      key != nil and Map.has_key?(state.jobs, key) ->
        # Idempotent: the same key attaches to the job that already has it.
        job = state.jobs[key]
        if job.terminal, do: send(subscriber, job.terminal), else: nil

        {:reply, {:ok, key},
         put_job(state, %{job | subscribers: MapSet.put(job.subscribers, subscriber)})}

      state.draining ->
        {:reply, {:error, :draining}, state}

      true ->
        with {:ok, term} <- Protocol.config_term(config),
             :ok <- validate(state, term) do
          seq = state.seq + 1
          id = key || "pool-#{System.unique_integer([:positive])}-#{seq}"

          job =
            Map.merge(new_job_fields(), %{
              id: id,
              key: key,
              seq: seq,
              config: term,
              priority: Keyword.get(opts, :priority, 0),
              needs: needs(opts),
              state: :queued,
              checkpoint: nil,
              terminal: nil,
              attempts: 0,
              restarts: 0,
              submitted_at: System.system_time(:millisecond)
            })

          job = %{job | subscribers: MapSet.new([subscriber])}
          state = store(put_job(%{state | seq: seq}, job), job)
          notify(job, :queued, %{position: queue_position(state, id), kind: kind(term)})
          {:reply, {:ok, id}, dispatch(state)}
        else
          {:error, issues} -> {:reply, {:error, issues}, state}
        end
    end
  end

  defp needs(opts) do
    %{devices: Keyword.get(opts, :devices, 1), labels: List.wrap(Keyword.get(opts, :labels, []))}
  end

  # The config is checked by a worker (any: validation is a call, answered while a job runs);
  # with none joined yet the job is queued unchecked and its first worker checks it.
  defp validate(state, term) do
    case Map.keys(state.workers) do
      [] ->
        :ok

      [pid | _] ->
        try do
          case GenServer.call(
                 pid,
                 {:call, :validate, [term], @submit_timeout},
                 @submit_timeout + 1_000
               ) do
            :ok -> :ok
            {:error, issues} when is_list(issues) -> {:error, issues}
            _other -> :ok
          end
        catch
          :exit, _ -> :ok
        end
    end
  end

  defp cancel(state, id) do
    case Map.fetch(state.jobs, id) do
      :error ->
        {:reply, {:error, :not_found}, state}

      {:ok, %{terminal: t}} when t != nil ->
        {:reply, :ok, state}

      {:ok, %{state: :running} = job} ->
        ask_cancel(job)
        {:reply, :ok, put_job(state, %{job | cancel_requested: true})}

      {:ok, job} ->
        {:reply, :ok, finish(state, job, :cancelled, %{step: 0, checkpoint: job.checkpoint})}
    end
  end

  defp ask_cancel(%{worker: pid, worker_job: wid}) do
    spawn(fn ->
      try do
        FineTuning.cancel(pid, wid)
      catch
        :exit, _ -> :ok
      end
    end)
  end

  # ---- events from the workers -----------------------------------------------------------------

  @impl true
  def handle_info({:fine_tuning, wid, type, payload}, state) do
    case Map.fetch(state.by_worker_job, wid) do
      {:ok, id} -> {:noreply, worker_event(state, state.jobs[id], type, payload)}
      :error -> {:noreply, state}
    end
  end

  def handle_info({:DOWN, _ref, :process, pid, reason}, state) do
    {:noreply, state |> forget_worker(pid, reason) |> dispatch()}
  end

  def handle_info(:dispatch, state), do: {:noreply, dispatch(state)}
  def handle_info({:EXIT, _pid, _reason}, state), do: {:noreply, state}
  def handle_info(_message, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state), do: Store.close(state.store)

  # The worker's own queued event is dropped: the pool sent its own when the job was accepted.
  defp worker_event(state, _job, :queued, _payload), do: state

  defp worker_event(state, job, :checkpoint, payload) do
    notify(job, :checkpoint, payload)
    job = %{job | checkpoint: payload[:path]}
    store(put_job(state, job), job)
  end

  defp worker_event(state, job, :progress, payload) do
    notify(job, :progress, payload)

    put_job(state, %{
      job
      | step: payload[:step],
        total_steps: payload[:total_steps],
        percent: payload[:percent]
    })
  end

  defp worker_event(state, job, :completed, payload),
    do: finish(release(state, job), job, :completed, payload)

  defp worker_event(state, %{preempting: true} = job, :cancelled, payload) do
    requeue(release(state, job), job, :preempted, payload[:checkpoint])
  end

  defp worker_event(state, %{cancel_requested: true} = job, :cancelled, payload),
    do: finish(release(state, job), job, :cancelled, payload)

  # Cancelled without anybody asking: its worker is stopping (its node shuts down). It saved a
  # checkpoint; the job goes on elsewhere.
  defp worker_event(state, job, :cancelled, payload),
    do: requeue(release(state, job), job, :worker_stopped, payload[:checkpoint])

  defp worker_event(state, job, :failed, %{error: :worker_exit} = payload),
    do: requeue(release(state, job), job, {:worker_exit, payload[:status]}, job.checkpoint)

  defp worker_event(state, job, :failed, %{error: :output_dir_conflict} = payload)
       when job.restarts > 0 and job.conflicts < @max_conflicts do
    # The previous worker of this job still holds its folder's lock (it is dying): try again.
    job = %{job | conflicts: job.conflicts + 1, not_before: now() + @retry_ms}
    Process.send_after(self(), :dispatch, @retry_ms)
    state |> release(job) |> back_to_queue(job, nil, payload)
  end

  defp worker_event(state, job, :failed, payload),
    do: finish(release(state, job), job, :failed, payload)

  defp worker_event(state, job, type, payload) do
    notify(job, type, payload)
    state
  end

  # ---- placement ---------------------------------------------------------------------------------

  defp dispatch(%{draining: true} = state), do: state

  defp dispatch(state) do
    queued = for job <- sorted_jobs(state), job.state == :queued, ready?(job), do: job
    Enum.reduce(queued, state, &place/2)
  end

  defp ready?(%{not_before: nil}), do: true
  defp ready?(%{not_before: t}), do: now() >= t

  defp place(job, state) do
    job = state.jobs[job.id]

    case Enum.find(idle_workers(state), &fits?(&1, job.needs)) do
      nil -> maybe_preempt(state, job)
      worker -> start_on(state, job, worker)
    end
  end

  defp idle_workers(state) do
    state.workers
    |> Map.values()
    |> Enum.filter(&(&1.job == nil))
    |> Enum.sort_by(&{&1.node, inspect(&1.pid)})
  end

  defp fits?(worker, needs),
    do: worker.devices >= needs.devices and Enum.all?(needs.labels, &(&1 in worker.labels))

  defp start_on(state, job, worker) do
    config = if job.attempts > 0 or job.restarts > 0, do: resumable(job.config), else: job.config

    result =
      try do
        GenServer.call(
          worker.pid,
          {:submit, config, self(), @submit_timeout},
          @submit_timeout + 1_000
        )
      catch
        :exit, reason -> {:unreachable, reason}
      end

    case result do
      {:ok, wid} ->
        job = %{
          job
          | state: :running,
            worker: worker.pid,
            worker_job: wid,
            attempts: job.attempts + 1,
            preempting: false,
            not_before: nil
        }

        telemetry(state, [:placement], %{queue_time_ms: now() - job.submitted_at}, %{
          job_id: job.id,
          node: worker.node,
          worker: worker.pid,
          attempt: job.attempts
        })

        state = %{
          state
          | workers: Map.put(state.workers, worker.pid, %{worker | job: job.id}),
            by_worker_job: Map.put(state.by_worker_job, wid, job.id)
        }

        store(put_job(state, job), job)

      {:unreachable, _} ->
        # It went down between joining and now; its :DOWN will remove it.
        state

      {:error, issues} when is_list(issues) ->
        finish(state, job, :failed, %{
          error: :invalid_config,
          message: "the config was refused by the worker it was placed on",
          hint: nil,
          details: %{"issues" => Enum.map(issues, &Map.new/1)}
        })

      {:error, other} ->
        finish(state, job, :failed, %{
          error: :internal_error,
          message: inspect(other),
          hint: nil,
          details: %{}
        })
    end
  end

  # A job restarted on another worker resumes from its checkpoints whatever its config said:
  # a train (or sweep) config given as a map gets "resume": "auto" (JSON text and files are sent
  # as they are; their resume is "auto" unless they set it otherwise).
  defp resumable(config) when is_map(config) do
    if Map.get(config, "job", "train") in ["train", "sweep"] and
         (Map.has_key?(config, "model_name") or Map.has_key?(config, "train")),
       do: Map.put(config, "resume", "auto"),
       else: config
  end

  defp resumable(config), do: config

  # No free worker fits: a lower-priority running job on a worker that would fit yields (it
  # saves a checkpoint and goes back to the queue), unless one already yields for this job.
  defp maybe_preempt(state, job) do
    yielding =
      Enum.any?(Map.values(state.jobs), &(&1.preempted_for == job.id and &1.state == :running))

    victim =
      state.workers
      |> Map.values()
      |> Enum.filter(&(&1.job != nil and fits?(&1, job.needs)))
      |> Enum.map(&state.jobs[&1.job])
      |> Enum.filter(
        &(&1.priority < job.priority and not &1.preempting and not &1.cancel_requested)
      )
      |> Enum.min_by(&{&1.priority, -&1.seq}, fn -> nil end)

    if yielding or victim == nil do
      state
    else
      ask_cancel(victim)

      telemetry(state, [:preemption], %{}, %{
        job_id: victim.id,
        for: job.id,
        priority: job.priority
      })

      notify(victim, :log, %{
        level: :info,
        message: "yielding to job #{job.id} (priority #{job.priority})"
      })

      put_job(state, %{victim | preempting: true, preempted_for: job.id})
    end
  end

  # ---- job endings ---------------------------------------------------------------------------

  defp release(state, job) do
    workers =
      case Map.fetch(state.workers, job.worker) do
        {:ok, w} -> Map.put(state.workers, job.worker, %{w | job: nil})
        :error -> state.workers
      end

    %{state | workers: workers, by_worker_job: Map.delete(state.by_worker_job, job.worker_job)}
  end

  defp requeue(state, job, reason, checkpoint) do
    telemetry(state, [:requeue], %{}, %{job_id: job.id, reason: reason, checkpoint: checkpoint})

    notify(job, :requeued, %{
      reason: reason,
      checkpoint: checkpoint || job.checkpoint,
      attempts: job.attempts
    })

    job = %{job | restarts: job.restarts + 1, checkpoint: checkpoint || job.checkpoint}
    back_to_queue(state, job, reason, nil)
  end

  defp back_to_queue(state, job, _reason, _payload) do
    job = %{
      job
      | state: :queued,
        worker: nil,
        worker_job: nil,
        preempting: false,
        preempted_for: nil
    }

    state = store(put_job(state, job), job)
    send(self(), :dispatch)
    state
  end

  defp finish(state, job, type, payload) do
    event = {:fine_tuning, job.id, type, payload}
    Enum.each(job.subscribers, &send(&1, event))
    job = %{job | state: type, terminal: event, worker: nil, worker_job: nil}
    state = store(put_job(state, job), job)
    send(self(), :dispatch)
    state
  end

  defp forget_worker(state, pid, reason) do
    case Map.pop(state.workers, pid) do
      {nil, _} ->
        state

      {worker, workers} ->
        Process.demonitor(worker.ref, [:flush])
        state = %{state | workers: workers}

        case worker.job && state.jobs[worker.job] do
          %{state: :running, worker: ^pid} = job ->
            why =
              if reason == :noconnection,
                do: {:node_down, worker.node},
                else: {:worker_down, reason}

            requeue(
              %{state | by_worker_job: Map.delete(state.by_worker_job, job.worker_job)},
              job,
              why,
              nil
            )

          _ ->
            state
        end
    end
  end

  # ---- status -------------------------------------------------------------------------------------

  defp pool_status(state) do
    %{
      draining: state.draining,
      workers:
        for w <- Map.values(state.workers) do
          %{pid: w.pid, node: w.node, devices: w.devices, labels: w.labels, job: w.job}
        end,
      queue: for(job <- sorted_jobs(state), job.state == :queued, do: job.id),
      running: for(job <- sorted_jobs(state), job.state == :running, do: job_map(state, job))
    }
  end

  defp job_status(state, id) do
    case Map.fetch(state.jobs, id) do
      {:ok, job} -> {:reply, job_map(state, job), state}
      :error -> {:reply, {:error, :not_found}, state}
    end
  end

  defp job_map(state, job) do
    node = if job.worker, do: state.workers[job.worker][:node]

    %{
      job_id: job.id,
      state: Atom.to_string(job.state),
      priority: job.priority,
      needs: job.needs,
      node: node,
      worker: job.worker,
      attempts: job.attempts,
      restarts: job.restarts,
      step: job.step,
      total_steps: job.total_steps,
      percent: job.percent,
      checkpoint: job.checkpoint,
      submitted_at: job.submitted_at
    }
  end

  # ---- helpers -----------------------------------------------------------------------------------

  # Highest priority first, then first come.
  defp sorted_jobs(state), do: state.jobs |> Map.values() |> Enum.sort_by(&{-&1.priority, &1.seq})

  defp queue_position(state, id) do
    state
    |> sorted_jobs()
    |> Enum.filter(&(&1.state in [:queued, :running]))
    |> Enum.find_index(&(&1.id == id))
    |> Kernel.+(1)
  end

  defp put_job(state, job), do: %{state | jobs: Map.put(state.jobs, job.id, job)}

  @persisted [:id, :key, :seq, :config, :priority, :needs, :state, :checkpoint, :terminal] ++
               [:attempts, :restarts, :submitted_at, :worker_job]
  defp store(state, job) do
    Store.put(state.store, Map.take(job, @persisted))
    state
  end

  defp notify(job, type, payload),
    do: Enum.each(job.subscribers, &send(&1, {:fine_tuning, job.id, type, payload}))

  defp kind(%{"job" => kind}) when is_binary(kind), do: kind
  defp kind(_config), do: nil

  defp now, do: System.system_time(:millisecond)

  defp telemetry(%{telemetry?: false}, _event, _measurements, _meta), do: :ok

  defp telemetry(%{name: name}, event, measurements, meta),
    do:
      :telemetry.execute([:fine_tuning, :pool | event], measurements, Map.put(meta, :pool, name))
end
