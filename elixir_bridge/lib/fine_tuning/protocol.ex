defmodule FineTuning.Protocol do
  @moduledoc """
  The ErlPort messages spoken with `finetune-worker port`: pure encode and decode, no IO.

  Every frame (after the `{:packet, 4}` length) is one External Term Format term:

      # BEAM -> worker
      {:"C", id, :finetune_worker, function, args}   # a call
      {:"M", message}                                 # a cast, e.g. {:cancel, job_id}

      # worker -> BEAM
      {:r, id, result}                                # the reply to call `id`
      {:e, id, {:python, class, message, trace}}      # call `id` raised
      {:"M", pid, event}                              # deliver `event` to `pid`
      {:"P", text}                                    # stray output of the worker

  Frames are decoded with `:erlang.binary_to_term(bin, [:safe])`, which refuses to create
  atoms. The worker only sends the atoms listed in `docs/finetune_worker_atoms.eterm` (what
  `finetune-worker atoms` prints); this module reads that file when it is compiled, so every
  one of them exists once it is loaded.

  Maps from the worker are *records* (keys fixed by the protocol, atoms: `%{step: 10}`) or
  *tables* (keys are names, binaries: the `metrics`, `improvement`, `config`, `format_counts`,
  `tracking` and `details` values), never both; see docs/protocol.md, "Maps".

      iex> bin = FineTuning.Protocol.encode_call(7, :status, ["job-1"])
      iex> :erlang.binary_to_term(bin)
      {:C, 7, :finetune_worker, :status, ["job-1"]}
      iex> FineTuning.Protocol.decode(:erlang.term_to_binary({:r, 7, {:error, :not_found}}))
      {:ok, {:reply, 7, {:error, :not_found}}}
  """

  @typedoc "A decoded frame from the worker."
  @type message ::
          {:reply, non_neg_integer(), term()}
          | {:error_reply, non_neg_integer(), {atom(), term(), term()}}
          | {:message, pid() | term(), term()}
          | {:print, term()}

  @typedoc "Why a frame could not be decoded."
  @type decode_error :: {:undecodable, String.t()} | {:unexpected, term()}

  @typedoc "An event as a subscriber receives it."
  @type event :: {:fine_tuning, String.t(), atom(), map()}

  # Every atom the worker sends, generated from python/finetune_worker/wire/vocabulary.py (a pytest
  # checks the file is current). Consulting it at compile time makes the atoms literals here.
  @atoms_file Path.expand("../../../docs/finetune_worker_atoms.eterm", __DIR__)
  @external_resource @atoms_file
  {:ok, [atoms]} = :file.consult(@atoms_file)
  @atoms atoms

  # Mirrors of python/finetune_worker/wire/vocabulary.py and errors.py, for the functions below;
  # test/vocabulary_test.exs checks that they stay equal.
  @event_types ~w(queued started phase progress metrics eval checkpoint log token reward_request
                  completed failed cancelled)a
  @terminal_types ~w(completed failed cancelled)a
  @phases ~w(loading_model preparing_data training evaluating saving loading merging generating
             launching exporting verifying)a
  @log_levels ~w(debug info warning error)a
  @error_codes ~w(out_of_memory model_not_found dataset_not_found bad_dataset_row
                  unsupported_model output_dir_not_writable output_dir_conflict disk_full
                  adapter_mismatch invalid_merge_config export_mismatch invalid_config
                  distributed_failure training_diverged reward_failed worker_exit
                  internal_error)a
  @error_classes [
    :"finetune_worker.errors.ProtocolError",
    :"finetune_worker.errors.CallError",
    :"finetune_worker.errors.ConfigError",
    :"finetune_worker.errors.InternalError"
  ]

  @doc "Event types (`{:fine_tuning, job_id, type, payload}`), as in `events.EVENT_TYPES`."
  @spec event_types() :: [atom()]
  def event_types, do: @event_types

  @doc "The event types that end a job."
  @spec terminal_types() :: [atom()]
  def terminal_types, do: @terminal_types

  @doc "Values of a `phase` event's `:phase`."
  @spec phases() :: [atom()]
  def phases, do: @phases

  @doc "Values of a `log` event's `:level`."
  @spec log_levels() :: [atom()]
  def log_levels, do: @log_levels

  @doc "Values of a `failed` event's `:error`, as in `errors.ERROR_CODES`."
  @spec error_codes() :: [atom()]
  def error_codes, do: @error_codes

  @doc "Exception classes of `{:e, id, {:python, class, message, trace}}` replies."
  @spec error_classes() :: [atom()]
  def error_classes, do: @error_classes

  @doc "Every atom the worker may send (`docs/finetune_worker_atoms.eterm`)."
  @spec atoms() :: [atom()]
  def atoms, do: @atoms

  @doc "Whether `type` ends a job."
  @spec terminal?(atom()) :: boolean()
  def terminal?(type), do: type in @terminal_types

  @doc "The frame of a call to `finetune_worker:function(args...)`."
  @spec encode_call(non_neg_integer(), atom(), list()) :: binary()
  def encode_call(id, function, args)
      when is_integer(id) and id >= 0 and is_atom(function) and is_list(args) do
    encode({:C, id, :finetune_worker, function, args})
  end

  @doc "The frame of a cast (no reply), e.g. `encode_cast({:cancel, job_id})`."
  @spec encode_cast(term()) :: binary()
  def encode_cast(message), do: encode({:M, message})

  # minor_version 1 is what ErlPort sends (floats as NEW_FLOAT_EXT).
  defp encode(term), do: :erlang.term_to_binary(term, minor_version: 1)

  @doc """
  Decode one frame. Returns `{:ok, message}` or `{:error, reason}` for bytes that are not a
  term (or carry an atom this module does not know) and for terms that are not a message.
  """
  @spec decode(binary()) :: {:ok, message()} | {:error, decode_error()}
  def decode(frame) when is_binary(frame) do
    frame |> binary_to_term() |> classify()
  end

  defp binary_to_term(frame) do
    {:ok, :erlang.binary_to_term(frame, [:safe])}
  rescue
    ArgumentError ->
      {:error, {:undecodable, "#{byte_size(frame)} bytes: #{preview(frame)}"}}
  end

  @doc """
  The call id of a reply frame (`{:r, id, _}` or `{:e, id, _}`) read from its first bytes, for
  a frame that `decode/1` refused: its caller can then be told at once instead of timing out.
  """
  @spec reply_id(binary()) :: {:ok, non_neg_integer()} | :error
  def reply_id(<<131, 104, 3, rest::binary>>) do
    with {:ok, tag, rest} when tag in ["r", "e"] <- atom_prefix(rest),
         {:ok, id} <- integer_prefix(rest) do
      {:ok, id}
    else
      _ -> :error
    end
  end

  def reply_id(_frame), do: :error

  # ATOM_EXT / SMALL_ATOM_EXT (Latin-1) and their UTF-8 twins; one-letter tags read the same.
  defp atom_prefix(<<tag, len::16, name::binary-size(len), rest::binary>>) when tag in [100, 118],
    do: {:ok, name, rest}

  defp atom_prefix(<<tag, len, name::binary-size(len), rest::binary>>) when tag in [115, 119],
    do: {:ok, name, rest}

  defp atom_prefix(_), do: :error

  defp integer_prefix(<<97, id, _::binary>>), do: {:ok, id}
  defp integer_prefix(<<98, id::32-signed, _::binary>>) when id >= 0, do: {:ok, id}
  defp integer_prefix(_), do: :error

  defp classify({:ok, {:r, id, result}}) when is_integer(id), do: {:ok, {:reply, id, result}}

  defp classify({:ok, {:e, id, {:python, class, message, trace}}}) when is_integer(id),
    do: {:ok, {:error_reply, id, {class, message, trace}}}

  defp classify({:ok, {:M, pid, message}}), do: {:ok, {:message, pid, message}}
  defp classify({:ok, {:P, text}}), do: {:ok, {:print, text}}
  defp classify({:ok, other}), do: {:error, {:unexpected, other}}
  defp classify({:error, _} = error), do: error

  defp preview(frame) when byte_size(frame) <= 32, do: inspect(frame)
  defp preview(<<head::binary-size(32), _::binary>>), do: inspect(head) <> "..."

  @doc """
  Turn a job config into the term sent to the worker.

  Accepts a map (atom or string keys; atom values other than booleans and `nil` become
  strings, as JSON would have them), a JSON binary (sent unchanged; the worker parses it), or
  `{:file, path}` (relative paths are expanded against this node's working directory, since
  the worker may run in another one). Returns `{:error, issues}` in the worker's issue format
  when the config cannot be sent at all.
  """
  @spec config_term(term()) :: {:ok, term()} | {:error, [map()]}
  def config_term(config) when is_binary(config), do: {:ok, config}

  def config_term({:file, path}) when is_binary(path) or is_list(path) do
    {:ok, {:file, Path.expand(IO.chardata_to_string(path))}}
  end

  def config_term(config) when is_map(config) and not is_struct(config) do
    case plain(config, []) do
      {:ok, term} -> {:ok, term}
      {:error, path, message, value} -> {:error, [issue(path, message, value)]}
    end
  end

  def config_term(other) do
    {:error,
     [issue([], "a config must be a map, a JSON binary or {:file, path}", inspect(other))]}
  end

  defp plain(value, path) when is_struct(value),
    do: {:error, path, "structs cannot be sent in a config", inspect(value)}

  defp plain(map, path) when is_map(map) do
    Enum.reduce_while(map, {:ok, %{}}, fn {key, value}, {:ok, acc} ->
      with {:ok, key} <- plain_key(key, path),
           {:ok, value} <- plain(value, path ++ [key]) do
        {:cont, {:ok, Map.put(acc, key, value)}}
      else
        error -> {:halt, error}
      end
    end)
  end

  defp plain(list, path) when is_list(list) do
    list
    |> Enum.with_index()
    |> Enum.reduce_while({:ok, []}, fn {value, index}, {:ok, acc} ->
      case plain(value, path ++ [index]) do
        {:ok, value} -> {:cont, {:ok, [value | acc]}}
        error -> {:halt, error}
      end
    end)
    |> case do
      {:ok, acc} -> {:ok, Enum.reverse(acc)}
      error -> error
    end
  end

  defp plain(value, _path) when is_boolean(value) or is_nil(value), do: {:ok, value}
  defp plain(value, _path) when is_atom(value), do: {:ok, Atom.to_string(value)}

  defp plain(value, _path) when is_binary(value) or is_number(value), do: {:ok, value}

  defp plain(value, path),
    do: {:error, path, "only maps, lists, strings, numbers, booleans and nil", inspect(value)}

  defp plain_key(key, _path) when is_binary(key), do: {:ok, key}
  defp plain_key(key, _path) when is_atom(key) and not is_nil(key), do: {:ok, Atom.to_string(key)}

  defp plain_key(key, path),
    do: {:error, path, "config keys must be strings or atoms", inspect(key)}

  defp issue(path, message, value), do: %{path: json_path(path), message: message, value: value}

  # Same notation as the worker's issues: training_parameters.learning_rate, prompts[0].
  defp json_path(path) do
    Enum.reduce(path, "", fn
      index, acc when is_integer(index) -> acc <> "[#{index}]"
      key, "" -> key
      key, acc -> acc <> "." <> key
    end)
  end
end
