defmodule FineTuning.Pool.Server do
  @moduledoc false
  # The pool's scheduler (see FineTuning.Pool for what it promises). One GenServer holds the
  # workers that joined, the jobs (queued by priority, then arrival), and which worker runs
  # which job. It submits a job to a worker with itself as the subscriber, relays the worker's
  # events to the job's subscribers under the pool's job id, and decides what an ending means:
  # a job whose worker died, or that was cancelled without anybody asking (its worker stopped),
  # or that yielded to a higher priority, goes back to the queue and resumes from its last
  # checkpoint on the next worker that fits.
  #
  # A worker job that may still be running where the pool cannot see it (the scheduler
  # restarted, or the worker's node was cut off) is remembered as the job's `adopt` id: when
  # that worker joins (again), the pool asks it for its jobs and takes the job back instead of
  # running it twice. A job cancelled while it waits so is remembered in `orphans`, and its
  # worker job is cancelled when it shows up.

  use GenServer
  require Logger

  alias FineTuning.Pool.Store
  alias FineTuning.Protocol

  @submit_timeout 60_000
  @worker_call_timeout 10_000
  # A restarted job whose output folder is still locked by its previous worker (a process that
  # is still saving its checkpoint while it dies, or one cut off from us that still runs) is
  # tried again after this long, up to @max_conflicts times.
  @retry_ms 1_000
  @max_conflicts 60
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
            orphans: MapSet.new(),
            seq: 0,
            telemetry?: false

  def start_link(opts) do
    GenServer.start_link(__MODULE__, opts, Keyword.take(opts, [:name]))
  end

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)

    case Store.open(Keyword.get(opts, :data_dir)) do
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

  # A job the store knew: ended ones are kept (for idempotent resubmission); queued ones queue
  # again; a running one waits @adopt_ms for its worker to join again and be adopted, then is
  # placed anew and resumes from its checkpoint.
  defp restore(record, state) do
    job = Map.merge(new_job_fields(), record)

    job =
      if job.state == :running do
        Process.send_after(self(), :dispatch, @adopt_ms + 10)

        %{
          job
          | state: :queued,
            restarts: job.restarts + 1,
            adopt: job.worker_job,
            not_before: monotonic() + @adopt_ms
        }
      else
        job
      end

    %{
      state
      | jobs: Map.put(state.jobs, job.id, %{job | worker_job: nil}),
        seq: max(state.seq, job.seq)
    }
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
      adopt: nil,
      queued_at: monotonic()
    }
  end

  # ---- calls ------------------------------------------------------------------------------------

  @impl true
  def handle_call({:pool_submit, config, subscriber, opts}, _from, state),
    do: submit(state, config, subscriber, opts)

  # FineTuning.submit/3 on a pool: a job with the default priority and needs.
  def handle_call({:submit, config, subscriber, _timeout}, _from, state),
    do: submit(state, config, subscriber, [])

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
        Task.start(fn ->
          GenServer.reply(
            from,
            safe_call(pid, {:call, :rewards, [wid, request, rewards], timeout}, :infinity)
          )
        end)

        {:noreply, state}

      _ ->
        {:reply, {:error, :not_found}, state}
    end
  end

  def handle_call(:status, _from, state), do: {:reply, pool_status(state), state}

  def handle_call({:drain, on?}, _from, state) do
    state = %{state | draining: on?}
    {:reply, :ok, if(on?, do: state, else: dispatch(state))}
  end

  # A worker that is already known (a join retried after a slow reply) keeps what it runs.
  def handle_call({:join, pid, _meta}, _from, %{workers: workers} = state)
      when is_map_key(workers, pid),
      do: {:reply, :ok, state}

  def handle_call({:join, pid, meta}, _from, state) when is_pid(pid) and is_map(meta) do
    worker = Map.merge(meta, %{pid: pid, ref: Process.monitor(pid), job: nil, stopping: false})
    Logger.info("FineTuning.Pool: worker #{inspect(pid)} joined from #{meta.node}")

    {:reply, :ok, %{state | workers: Map.put(state.workers, pid, worker)},
     {:continue, {:joined, pid}}}
  end

  # FineTuning.info/validate/shutdown/os_pid and anything else a pool does not take.
  def handle_call({:call, function, _args, _timeout}, _from, state),
    do: {:reply, {:error, {:not_supported_by_pool, function}}, state}

  def handle_call(other, _from, state),
    do: {:reply, {:error, {:not_supported_by_pool, elem_or(other)}}, state}

  defp elem_or(message) when is_tuple(message), do: elem(message, 0)
  defp elem_or(message), do: message

  @impl true
  def handle_continue({:joined, pid}, state), do: {:noreply, state |> adopt(pid) |> dispatch()}

  # A worker that joins may be running jobs the pool lost sight of (see the module doc): take
  # them back, and cancel the ones that were cancelled meanwhile.
  defp adopt(state, pid) do
    waiting =
      for {id, %{adopt: wid, state: :queued}} <- state.jobs, wid != nil, into: %{}, do: {wid, id}

    if waiting == %{} and MapSet.size(state.orphans) == 0 do
      state
    else
      listed =
        safe_call(pid, {:call, :jobs, [], @worker_call_timeout}, @worker_call_timeout + 1_000)

      for %{job_id: wid} <- List.wrap(listed),
          MapSet.member?(state.orphans, wid),
          do: ask_cancel(%{worker: pid, worker_job: wid, id: nil})

      listed
      |> List.wrap()
      |> Enum.filter(&(is_map(&1) and Map.has_key?(waiting, &1[:job_id])))
      |> Enum.reduce(state, fn %{job_id: wid}, state ->
        adopt_one(state, pid, wid, waiting[wid])
      end)
    end
  end

  defp adopt_one(state, pid, wid, id) do
    job = state.jobs[id]

    job = %{
      job
      | state: :running,
        worker: pid,
        worker_job: wid,
        adopt: nil,
        not_before: nil,
        restarts: max(job.restarts - 1, 0)
    }

    state = %{
      state
      | workers: Map.update!(state.workers, pid, &%{&1 | job: job.id}),
        by_worker_job: Map.put(state.by_worker_job, wid, job.id)
    }

    # A job that ended meanwhile: its terminal event is handled as if it had just come.
    case safe_call(pid, {:subscribe, wid, self()}, @worker_call_timeout) do
      {:ok, {:finished, event}} -> send(self(), event)
      _ -> :ok
    end

    store(put_job(state, job), job)
  end

  defp submit(state, config, subscriber, opts) do
    key = Keyword.get(opts, :key)

    cond do
      key != nil and Map.has_key?(state.jobs, key) ->
        # Idempotent: the same key attaches to the job that already has it.
        job = state.jobs[key]
        if job.terminal, do: send(subscriber, job.terminal)

        {:reply, {:ok, key},
         put_job(state, %{job | subscribers: MapSet.put(job.subscribers, subscriber)})}

      state.draining ->
        {:reply, {:error, :draining}, state}

      true ->
        case accept(state, config, subscriber, opts) do
          {:ok, id, state} -> {:reply, {:ok, id}, dispatch(state)}
          {:error, issues} -> {:reply, {:error, issues}, state}
        end
    end
  end

  defp accept(state, config, subscriber, opts) do
    key = Keyword.get(opts, :key)

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
          needs: %{
            devices: Keyword.get(opts, :devices, 1),
            labels: Keyword.get(opts, :labels, [])
          },
          state: :queued,
          checkpoint: nil,
          terminal: nil,
          attempts: 0,
          restarts: 0,
          submitted_at: System.system_time(:millisecond),
          subscribers: MapSet.new([subscriber])
        })

      state = store(put_job(%{state | seq: seq}, job), job)
      notify(job, :queued, %{position: queue_position(state, id), kind: kind(term)})
      {:ok, id, state}
    end
  end

  # The config is checked by a worker (any: validation is a call, answered while a job runs);
  # with none reachable the job is queued unchecked and the worker it is placed on checks it.
  defp validate(state, term) do
    case state.workers |> Map.values() |> Enum.reject(& &1.stopping) do
      [] ->
        :ok

      [worker | _] ->
        case safe_call(
               worker.pid,
               {:call, :validate, [term], @worker_call_timeout},
               @worker_call_timeout + 1_000
             ) do
          {:error, issues} when is_list(issues) -> {:error, issues}
          _ok_or_unreachable -> :ok
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
        # A job waiting to be adopted may still run on a worker that has not joined yet.
        state =
          if job.adopt, do: %{state | orphans: MapSet.put(state.orphans, job.adopt)}, else: state

        {:reply, :ok, finish(state, job, :cancelled, %{step: 0, checkpoint: job.checkpoint})}
    end
  end

  # Asks the worker to cancel; a refusal (the worker is gone, or the job ended) comes back as
  # {:cancel_refused, id}, so a preemption that cannot happen is forgotten.
  defp ask_cancel(%{worker: pid, worker_job: wid} = job) do
    me = self()

    Task.start(fn ->
      case safe_call(pid, {:call, :cancel, [wid], @worker_call_timeout}, :infinity) do
        :ok -> :ok
        _refused -> if job[:id], do: send(me, {:cancel_refused, job.id, wid})
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

  def handle_info({:DOWN, _ref, :process, pid, reason}, state),
    do: {:noreply, state |> forget_worker(pid, reason) |> dispatch()}

  def handle_info({:cancel_refused, id, wid}, state) do
    case state.jobs[id] do
      %{worker_job: ^wid, preempting: true} = job ->
        {:noreply, put_job(state, %{job | preempting: false, preempted_for: nil})}

      _ ->
        {:noreply, state}
    end
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

  # A cancel the user asked for wins over everything else that could have stopped the job.
  defp worker_event(state, %{cancel_requested: true} = job, :cancelled, payload),
    do: finish(release(state, job), job, :cancelled, payload)

  defp worker_event(state, %{preempting: true} = job, :cancelled, payload),
    do: requeue(release(state, job), job, :preempted, payload[:checkpoint])

  # Cancelled without anybody asking: its worker is stopping (its node shuts down). It saved a
  # checkpoint; the job goes on elsewhere, and the worker takes no new job.
  defp worker_event(state, job, :cancelled, payload),
    do:
      state
      |> release(job)
      |> stopping(job.worker)
      |> requeue(job, :worker_stopped, payload[:checkpoint])

  defp worker_event(state, job, :failed, %{error: :worker_exit} = payload),
    do:
      state
      |> release(job)
      |> stopping(job.worker)
      |> requeue(job, {:worker_exit, payload[:status]}, nil)

  defp worker_event(state, job, :failed, %{error: :output_dir_conflict})
       when job.restarts > 0 and job.conflicts < @max_conflicts and not job.cancel_requested do
    # The previous run of this job still holds its folder's lock (a worker that is dying, or
    # one cut off from us: it is adopted if it joins again). Try again shortly.
    Process.send_after(self(), :dispatch, @retry_ms)
    job = %{job | conflicts: job.conflicts + 1, not_before: monotonic() + @retry_ms}
    state |> release(job) |> back_to_queue(job)
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
    now = monotonic()
    queued = for job <- sorted_jobs(state), job.state == :queued, ready?(job, now), do: job.id
    {state, _skipped} = Enum.reduce(queued, {state, MapSet.new()}, &place/2)
    state
  end

  defp ready?(%{not_before: nil}, _now), do: true
  defp ready?(%{not_before: t}, now), do: now >= t

  # `skipped`: workers that did not answer during this dispatch (not tried again in it).
  defp place(id, {state, skipped}) do
    job = state.jobs[id]

    case Enum.find(idle_workers(state, skipped), &fits?(&1, job.needs)) do
      nil -> {maybe_preempt(state, job), skipped}
      worker -> start_on(state, job, worker, skipped)
    end
  end

  defp idle_workers(state, skipped) do
    state.workers
    |> Map.values()
    |> Enum.filter(&(&1.job == nil and not &1.stopping and not MapSet.member?(skipped, &1.pid)))
    |> Enum.sort_by(&{&1.node, &1.pid})
  end

  defp fits?(worker, needs),
    do: worker.devices >= needs.devices and Enum.all?(needs.labels, &(&1 in worker.labels))

  defp start_on(state, job, worker, skipped) do
    config = if job.attempts > 0 or job.restarts > 0, do: resumable(job.config), else: job.config
    tracked = state.by_worker_job

    case safe_call(
           worker.pid,
           {:submit, config, self(), @submit_timeout},
           @submit_timeout + 1_000
         ) do
      {:ok, wid} when not is_map_key(tracked, wid) ->
        job = %{
          job
          | state: :running,
            worker: worker.pid,
            worker_job: wid,
            attempts: job.attempts + 1,
            preempting: false,
            not_before: nil
        }

        telemetry(state, [:placement], %{queue_time_ms: monotonic() - job.queued_at}, %{
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

        {store(put_job(state, job), job), skipped}

      {:error, issues} when is_list(issues) ->
        details = %{"issues" => Enum.map(issues, &Map.new/1)}
        message = "the config was refused by the worker it was placed on"
        payload = %{error: :invalid_config, message: message, hint: nil, details: details}
        {finish(state, job, :failed, payload), skipped}

      {:error, {:python, _class, message, _trace}} ->
        payload = %{error: :invalid_config, message: to_string(message), hint: nil, details: %{}}
        {finish(state, job, :failed, payload), skipped}

      _unreachable_or_busy ->
        # The worker is going down, timed out or answered with a job id we already track: the
        # job stays queued and is tried again shortly, on another worker if one is free.
        Process.send_after(self(), :dispatch, @retry_ms)

        {put_job(state, %{job | not_before: monotonic() + @retry_ms}),
         MapSet.put(skipped, worker.pid)}
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
      |> Enum.filter(&(&1.job != nil and not &1.stopping and fits?(&1, job.needs)))
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

  defp stopping(state, pid) do
    case Map.fetch(state.workers, pid) do
      {:ok, w} -> %{state | workers: Map.put(state.workers, pid, %{w | stopping: true})}
      :error -> state
    end
  end

  # `adopt`: the worker job id to take back if its worker joins again (see the module doc).
  defp requeue(state, job, reason, checkpoint, adopt \\ nil)

  defp requeue(state, %{cancel_requested: true} = job, _reason, checkpoint, _adopt),
    do:
      finish(state, job, :cancelled, %{
        step: job.step || 0,
        checkpoint: checkpoint || job.checkpoint
      })

  defp requeue(state, job, reason, checkpoint, adopt) do
    checkpoint = checkpoint || job.checkpoint
    telemetry(state, [:requeue], %{}, %{job_id: job.id, reason: reason, checkpoint: checkpoint})
    notify(job, :requeued, %{reason: reason, checkpoint: checkpoint, attempts: job.attempts})

    job = %{
      job
      | restarts: job.restarts + 1,
        checkpoint: checkpoint,
        adopt: adopt,
        queued_at: monotonic()
    }

    back_to_queue(state, job)
  end

  defp back_to_queue(state, job) do
    job = %{
      job
      | state: :queued,
        worker: nil,
        worker_job: nil,
        preempting: false,
        preempted_for: nil
    }

    send(self(), :dispatch)
    store(put_job(state, job), job)
  end

  defp finish(state, job, type, payload) do
    event = {:fine_tuning, job.id, type, payload}
    Enum.each(job.subscribers, &send(&1, event))
    job = %{job | state: type, terminal: event, worker: nil, worker_job: nil, adopt: nil}
    send(self(), :dispatch)
    store(put_job(state, job), job)
  end

  # A worker that went away. Its running job goes back to the queue; when the worker may still
  # be running it (its node was cut off, not known dead), its job id is kept for adoption.
  defp forget_worker(state, pid, reason) do
    case Map.pop(state.workers, pid) do
      {nil, _} ->
        state

      {worker, workers} ->
        Process.demonitor(worker.ref, [:flush])
        state = %{state | workers: workers}

        case worker.job && state.jobs[worker.job] do
          %{state: :running, worker: ^pid} = job ->
            state = %{state | by_worker_job: Map.delete(state.by_worker_job, job.worker_job)}

            if reason == :noconnection,
              do: requeue(state, job, {:node_down, worker.node}, nil, job.worker_job),
              else: requeue(state, job, {:worker_down, reason}, nil)

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
          %{
            pid: w.pid,
            node: w.node,
            devices: w.devices,
            labels: w.labels,
            job: w.job,
            stopping: w.stopping
          }
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
    %{
      job_id: job.id,
      state: Atom.to_string(job.state),
      priority: job.priority,
      needs: job.needs,
      node: job.worker && get_in(state.workers, [job.worker, :node]),
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

  defp safe_call(server, message, timeout) do
    GenServer.call(server, message, timeout)
  catch
    :exit, reason -> {:unreachable, reason}
  end

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

  defp monotonic, do: System.monotonic_time(:millisecond)

  defp telemetry(%{telemetry?: false}, _event, _measurements, _meta), do: :ok

  defp telemetry(%{name: name}, event, measurements, meta),
    do:
      :telemetry.execute([:fine_tuning, :pool | event], measurements, Map.put(meta, :pool, name))
end
