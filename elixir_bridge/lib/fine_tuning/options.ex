defmodule FineTuning.Options do
  @moduledoc """
  Validates the options of `FineTuning.Worker`; raises `ArgumentError` naming the bad one.

  | option | default | meaning |
  | --- | --- | --- |
  | `:executable` | `$FINETUNE_WORKER`, else `.venv/bin/finetune-worker` of this repo | the worker program |
  | `:args` | `[]` | extra arguments after `port` |
  | `:env` | `[]` | extra environment, e.g. `[{"CUDA_VISIBLE_DEVICES", "1"}]`; a `nil` value unsets; a value may be a zero-arity function, called when the worker starts |
  | `:cd` | this node's working directory | the worker's working directory |
  | `:stderr` | inherited from this node | a file the worker's stderr (its log) is appended to |
  | `:name` | none | a GenServer name |
  | `:call_timeout` | `30_000` | ms a call may wait for its reply (`:infinity` allowed) |
  | `:startup_timeout` | `60_000` | ms the worker has to answer `info` after it starts |
  | `:shutdown_grace` | `12_000` | ms the worker has to exit after its stdin closes before it is killed; the worker's own job grace (`FINETUNE_WORKER_GRACE`) is set 2 s shorter |

  Secrets in `:env` (a variable named like `*TOKEN`, `*SECRET*`, `*PASSWORD*`, `*API_KEY*`,
  `*CREDENTIAL*`, or a value holding URL credentials `scheme://user:pass@host`) never appear in
  logs, crash reports, `:sys.get_state/1` or supervisor reports: `FineTuning.Worker.child_spec/1`
  and `start_link/1` seal each such value in a closure (`seal_secrets/1`), and the running
  worker's state keeps only `"<redacted>"` in its place (`redact_env/1`).
  """

  @default_call_timeout 30_000
  @default_startup_timeout 60_000
  @default_shutdown_grace 12_000

  # Resolved at compile time: the bridge is built from this repo, whose worker sits in .venv/.
  @project_root Path.expand("../../..", __DIR__)

  @keys [
    :executable,
    :args,
    :env,
    :cd,
    :stderr,
    :name,
    :call_timeout,
    :startup_timeout,
    :shutdown_grace,
    :id
  ]

  @type t :: %{
          executable: String.t(),
          args: [String.t()],
          env: [{charlist(), charlist() | false}] | [{String.t(), String.t() | nil}],
          cd: String.t() | nil,
          stderr: String.t() | nil,
          name: GenServer.name() | nil,
          call_timeout: timeout(),
          startup_timeout: non_neg_integer(),
          shutdown_grace: non_neg_integer()
        }

  @redacted "<redacted>"
  @secret_part ~r/token$|secret|passw|credential|^auth(orization)?$/
  @api_key ~r/api[_\-. ]?key/i
  @url_credentials ~r{://[^/@\s]+@}

  @doc """
  Whether an environment variable holds a secret, by its name or its value (the worker's
  `security.is_secret_name/1` rule, plus URL credentials in the value).
  """
  @spec secret?(String.t(), term()) :: boolean()
  def secret?(name, value) do
    parts = name |> String.downcase() |> String.split(~r/[_\-.\s]+/, trim: true)

    Regex.match?(@api_key, name) or Enum.any?(parts, &Regex.match?(@secret_part, &1)) or
      (is_binary(value) and Regex.match?(@url_credentials, value))
  end

  @doc """
  `opts` with every secret `:env` value (see `secret?/2`) wrapped in a zero-arity function, so
  printing the options (a supervisor report of the child's start call) shows no secret.
  """
  @spec seal_secrets(keyword()) :: keyword()
  def seal_secrets(opts) when is_list(opts) do
    case Keyword.fetch(opts, :env) do
      {:ok, env} when is_map(env) or is_list(env) ->
        sealed =
          Enum.map(env, fn
            {name, value} when is_binary(name) and is_binary(value) ->
              if secret?(name, value), do: {name, fn -> value end}, else: {name, value}

            other ->
              other
          end)

        Keyword.put(opts, :env, sealed)

      _ ->
        opts
    end
  end

  def seal_secrets(opts), do: opts

  @doc "A validated `:env` for display: secret values replaced by `\"<redacted>\"`."
  @spec redact_env([{charlist(), charlist() | false}]) :: [{String.t(), String.t() | nil}]
  def redact_env(env) do
    Enum.map(env, fn {name, value} ->
      name = List.to_string(name)
      value = if value, do: List.to_string(value), else: nil
      if value && secret?(name, value), do: {name, @redacted}, else: {name, value}
    end)
  end

  @doc "The default worker executable: `$FINETUNE_WORKER`, else this repo's `.venv/bin/finetune-worker`."
  @spec default_executable() :: String.t()
  def default_executable do
    case System.get_env("FINETUNE_WORKER") do
      value when value in [nil, ""] -> Path.join(@project_root, ".venv/bin/finetune-worker")
      value -> Path.expand(value)
    end
  end

  @doc "The shutdown grace (ms) the options ask for, without validating anything else."
  @spec shutdown_grace(keyword()) :: non_neg_integer()
  def shutdown_grace(opts) when is_list(opts) do
    case Keyword.get(opts, :shutdown_grace) do
      ms when is_integer(ms) and ms >= 0 -> ms
      _ -> @default_shutdown_grace
    end
  end

  def shutdown_grace(_opts), do: @default_shutdown_grace

  @doc "Validate `opts` and fill in defaults. Raises `ArgumentError` naming the bad option."
  @spec validate!(keyword()) :: t()
  def validate!(opts) do
    unless Keyword.keyword?(opts) do
      raise ArgumentError,
            "FineTuning.Worker options must be a keyword list, got: #{inspect(opts)}"
    end

    case Keyword.keys(opts) -- @keys do
      [] -> :ok
      [key | _] -> raise ArgumentError, "unknown option #{inspect(key)}; known: #{inspect(@keys)}"
    end

    %{
      executable: executable(Keyword.get(opts, :executable, default_executable())),
      args: args(Keyword.get(opts, :args, [])),
      env: env(Keyword.get(opts, :env, [])),
      cd: cd(Keyword.get(opts, :cd)),
      stderr: stderr(Keyword.get(opts, :stderr)),
      name: name(Keyword.get(opts, :name)),
      call_timeout:
        timeout(:call_timeout, Keyword.get(opts, :call_timeout, @default_call_timeout)),
      startup_timeout:
        ms(:startup_timeout, Keyword.get(opts, :startup_timeout, @default_startup_timeout)),
      shutdown_grace:
        ms(:shutdown_grace, Keyword.get(opts, :shutdown_grace, @default_shutdown_grace))
    }
  end

  defp executable(path) when is_binary(path) and path != "", do: Path.expand(path)

  defp executable(other),
    do:
      raise(ArgumentError, "option :executable must be a non-empty path, got: #{inspect(other)}")

  defp args(list) when is_list(list) do
    Enum.each(list, fn
      arg when is_binary(arg) -> :ok
      arg -> raise ArgumentError, "option :args must be a list of strings, got: #{inspect(arg)}"
    end)

    list
  end

  defp args(other),
    do: raise(ArgumentError, "option :args must be a list of strings, got: #{inspect(other)}")

  defp env(env) when is_map(env), do: env(Map.to_list(env))

  defp env(env) when is_list(env) do
    Enum.map(env, fn
      {name, value}
      when is_binary(name) and name != "" and
             (is_binary(value) or is_nil(value) or is_function(value, 0)) ->
        if String.contains?(name, "="),
          do: raise(ArgumentError, "option :env: variable name #{inspect(name)} contains \"=\"")

        {String.to_charlist(name), env_value(name, value)}

      {name, _value} ->
        # The value is not shown: it may be a secret.
        raise ArgumentError,
              "option :env: the value of #{inspect(name)} must be a string, nil or a zero-arity function"

      entry ->
        raise ArgumentError,
              "option :env must hold {\"NAME\", \"value\" | nil} pairs, got: #{inspect(entry)}"
    end)
  end

  defp env(other),
    do:
      raise(ArgumentError, "option :env must be a map or a list of pairs, got: #{inspect(other)}")

  defp env_value(_name, nil), do: false
  defp env_value(_name, value) when is_binary(value), do: String.to_charlist(value)

  defp env_value(name, fun) do
    case fun.() do
      value when is_binary(value) ->
        String.to_charlist(value)

      nil ->
        false

      _ ->
        raise ArgumentError,
              "option :env: the function given for #{inspect(name)} must return a string or nil"
    end
  end

  defp cd(nil), do: nil

  defp cd(dir) when is_binary(dir) do
    dir = Path.expand(dir)

    unless File.dir?(dir),
      do: raise(ArgumentError, "option :cd: #{inspect(dir)} is not a directory")

    dir
  end

  defp cd(other),
    do: raise(ArgumentError, "option :cd must be a directory path, got: #{inspect(other)}")

  defp stderr(nil), do: nil

  defp stderr(path) when is_binary(path) and path != "" do
    path = Path.expand(path)

    unless File.dir?(Path.dirname(path)),
      do: raise(ArgumentError, "option :stderr: directory of #{inspect(path)} does not exist")

    path
  end

  defp stderr(other),
    do: raise(ArgumentError, "option :stderr must be a file path, got: #{inspect(other)}")

  defp name(nil), do: nil
  defp name(name) when is_atom(name), do: name
  defp name({:global, _} = name), do: name
  defp name({:via, module, _} = name) when is_atom(module), do: name

  defp name(other),
    do: raise(ArgumentError, "option :name must be a GenServer name, got: #{inspect(other)}")

  defp timeout(_key, :infinity), do: :infinity
  defp timeout(key, value), do: ms(key, value)

  defp ms(_key, value) when is_integer(value) and value >= 0, do: value

  defp ms(key, value),
    do:
      raise(
        ArgumentError,
        "option #{inspect(key)} must be a non-negative integer (milliseconds), got: #{inspect(value)}"
      )
end
